# syntax=docker/dockerfile:1
# ztunnel-redirect node agent. Build from the repository root:
#   docker build -t ztunnel-redirect:0.1.0 .
#
# The base is pinned by tag only. Pin it by digest as well (python:3.11-slim-bookworm@sha256:...)
# where the build runs: no container engine or registry was reachable where this file was written,
# so a digest could not be looked up and verified, and an unverified digest would be worse than none.
# Both stages must use the same base: the venv's interpreter is a symlink to the base's Python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the project and its dependencies in a venv (pip compiles the bytecode) ------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ztunnel_redirect ./ztunnel_redirect
# Dependencies resolve from pyproject.toml's ranges (there is no lock file yet); every dependency
# ships manylinux wheels for CPython 3.11, so no compiler is needed.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ztunnel-redirect" \
      org.opencontainers.image.description="nftables-native traffic redirection agent for Istio ambient mode" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnftables (the agent calls it in-process through ctypes) comes with nftables, which also gives
# operators `nft` for inspection; iproute2 gives `ip` (policy routing is done over rtnetlink, `ip`
# is for debugging on the node). iptables (nft and legacy flavours) and ipset are only for reading
# and removing Istio's iptables-backend rules when a node migrates in place. Versions are bookworm's as of writing: a Debian point release that
# replaces them fails the build loudly rather than shipping something untested.
# Then every setuid/setgid bit is removed: nothing in the image may gain privileges on exec.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nftables=1.0.6-2+deb12u2 \
        iproute2=6.1.0-3 \
        iptables=1.8.9-2 \
        ipset=7.17-1 \
    && rm -rf /var/lib/apt/lists/* \
    && find / -xdev -type f -perm /6000 -exec chmod a-s {} +
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Root (uid 0), on purpose; the DaemonSet drops every capability but NET_ADMIN (nftables, routes),
# SYS_ADMIN (setns into pod netns) and SYS_PTRACE (opening other processes' /proc/<pid>/ns/net).
# A non-root user cannot hold them: Kubernetes puts added capabilities of a non-root container only
# in its bounding set (no ambient capabilities), so they would have to be file capabilities on the
# Python interpreter, which would privilege every Python process in the image and which
# no_new_privs disables. The agent also writes the CNI plugin and conflist into the host's
# root-owned CNI directories, as their owner.
# hadolint ignore=DL3002
USER 0:0
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on port 8000.
ENTRYPOINT ["ztunnel-redirect"]
CMD ["agent"]
