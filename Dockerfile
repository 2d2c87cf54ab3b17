# syntax=docker/dockerfile:1
# ztunnel-redirect node agent. Build from the repository root with `make image` (podman), or:
#   docker build -t ztunnel-redirect:0.1.0 .
#
# The base is pinned by tag only. Pin it by digest as well (...python:3.11-slim-bookworm@sha256:...)
# where the build runs: no registry was reachable where this file was written, so a digest could
# not be looked up and verified, and an unverified digest would be worse than none. Where no
# registry is reachable, `make image` makes this base from Debian packages (tools/build-image).
# Every stage uses the same base: the venv's interpreter is a symlink to the base's Python.
# No RUN line has a pipe, so no SHELL is needed (podman's default OCI format would drop one).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --- cni: the CNI plugin, a static Go binary (Debian's Go; the module has no dependencies) -------
FROM ${PYTHON_IMAGE} AS cni
RUN apt-get update \
    && apt-get install -y --no-install-recommends golang-go=2:1.19~1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src/cniplugin
COPY cniplugin ./
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags='-s -w -buildid=' \
        -o /out/ztunnel-redirect-cni ./

# --- builder: the agent and its dependencies in a venv (pip compiles the bytecode) --------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore leaves out ztunnel_redirect/testing and the demo: the agent never imports them.
COPY pyproject.toml README.md ./
COPY ztunnel_redirect ./ztunnel_redirect
# Dependencies resolve from pyproject.toml's ranges (there is no lock file yet); every dependency
# ships manylinux wheels for CPython 3.11, so no compiler is needed. pip and setuptools only
# install: they leave the venv once it is built (setuptools builds the project in pip's isolated
# build environment, not in the venv).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools
# What the agent never loads at run time: C/Cython sources and type stubs that wheels carry, and
# test suites. kubernetes_asyncio's generated API and model classes (all imported by its client:
# 26 MB of source and 21 MB of bytecode, most of both docstrings) are kept as bytecode only,
# compiled without docstrings (they use neither asserts nor __doc__): an exception inside them
# still names the file and line, without the source text. That halves the venv.
WORKDIR /opt/venv/lib/python3.11/site-packages
RUN find . \( -name '*.c' -o -name '*.h' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' \
        -o -name '*_test.py' \) -delete \
    && find . -depth -type d -name tests -exec rm -rf {} + \
    && find kubernetes_asyncio/client/api kubernetes_asyncio/client/models -name __pycache__ \
        -exec rm -rf {} + \
    && /opt/venv/bin/python -m compileall -q -b -o 2 \
        kubernetes_asyncio/client/api kubernetes_asyncio/client/models \
    && find kubernetes_asyncio/client/api kubernetes_asyncio/client/models -name '*.py' -delete

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ztunnel-redirect" \
      org.opencontainers.image.description="nftables-native traffic redirection agent for Istio ambient mode" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# libnftables (the agent calls it in-process through ctypes) comes with nftables, which also gives
# operators `nft` for inspection; iproute2 gives `ip` (policy routing is done over rtnetlink, `ip`
# is for debugging on the node). iptables (nft and legacy flavours) and ipset are only for reading
# and removing Istio's iptables-backend rules when a node migrates in place. Versions are
# bookworm's as of writing: a Debian point release that replaces them fails the build loudly
# rather than shipping something untested. apt's downloads, lists and logs go in the same layer
# (the base may or may not clean them: Debian's own images do, a plain debootstrap does not).
# Then every setuid/setgid bit is removed: nothing in the image may gain privileges on exec.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nftables=1.0.6-2+deb12u2 \
        iproute2=6.1.0-3 \
        iptables=1.8.9-2 \
        ipset=7.17-1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
    && find / -xdev -type f -perm /6000 -exec chmod a-s {} +
COPY --from=builder /opt/venv /opt/venv
# The agent copies the plugin from here into the node's CNI bin dir.
COPY --from=cni /out/ztunnel-redirect-cni /opt/ztunnel-redirect/cni/ztunnel-redirect-cni
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
