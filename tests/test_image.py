"""The image: built from the Dockerfile with podman (`tools/build-image`, as `make image` does) and
run as the DaemonSet runs it, as the agent of a test node.

The image is built once per test session (from scratch about 70 s here: the base
from Debian packages where no registry is reachable, Go and the venv; then seconds from podman's
layer cache). The container gets what deploy/base/daemonset.yaml gives the agent: the host's
network and pid namespaces, only its capabilities, a read-only root filesystem with a memory /tmp,
the host's netns directory (propagating new mounts), the CNI directories at the DaemonSet's paths
(here temporary directories) and the sockets' directories. The agent inside talks to the test API
server and the fake ztunnel (ZDS over the shared socket directory) and programs pods that are
network namespaces, through libnftables in the image; host rules go to the test node's netns, so
nothing in the root netns changes. Containers are removed (`podman rm -f`) also on failure.

Skips only where podman cannot run; `make test` installs podman and mmdebstrap.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.testing.agentprocess import (
    PLUGIN_NAME,
    AgentProcess,
    connect_ztunnel,
    standin_of,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.netnslab import Netns
from ztunnel_redirect.testing.node import TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind
from ztunnel_redirect.testing.traffic import App, request

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT: Final = 1200.0
"""From scratch on a 2-core machine: base, apt, Go and pip; about 70 s here when nothing is
cached, far less with podman's layer cache."""
pytestmark = [pytest.mark.kernel, pytest.mark.image, pytest.mark.timeout(BUILD_TIMEOUT + 120)]

TAG: Final = "ztunnel-redirect:test"
"""Not the release tag (`make image`'s): a test run never replaces an image built by hand."""
LIMITS: Final = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192")
"""Without CAP_SYS_RESOURCE (this VM), podman cannot raise its default limits itself."""
NS = "demo"
WAIT = 15.0
APP_PORT = 8080
MIB = 1 << 20
VENV_BUDGET: Final = 50 * MIB
APT_LAYER_BUDGET: Final = 20 * MIB
CAPABILITY_BITS: Final = {"NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21}


def podman(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *argv], capture_output=True, text=True, check=False, timeout=timeout
    )


@pytest.fixture(scope="session")
def image() -> str:
    """The image built from this tree (once per session), or a skip where podman cannot run."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`make test` installs it from Debian's archive)")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}")
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()}")
    build = subprocess.run(
        [str(ROOT / "tools" / "build-image"), TAG],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
    )
    if build.returncode != 0:
        tail = "\n".join((build.stdout + build.stderr).splitlines()[-40:])
        pytest.fail(f"tools/build-image failed ({build.returncode}):\n{tail}")
    return TAG


def _agent_container() -> dict[str, Any]:
    daemonset = yaml.safe_load((ROOT / "deploy" / "base" / "daemonset.yaml").read_text())
    pod_spec = daemonset["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is True
    assert pod_spec["hostPID"] is True
    (container,) = pod_spec["containers"]
    result: dict[str, Any] = container
    return result


def _layers(image: str) -> list[tuple[int, str]]:
    """(size in bytes, instruction) of every layer, newest first."""
    result = podman("history", "--no-trunc", "--format", "json", image)
    assert result.returncode == 0, result.stderr
    return [(int(layer["size"]), str(layer["CreatedBy"])) for layer in json.loads(result.stdout)]


def _in_image(image: str, *argv: str) -> str:
    result = podman(
        "run", "--rm", "--network", "none", *LIMITS, "--entrypoint", argv[0], image, *argv[1:]
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- what the image holds ------------------------------------------------------------------------


def test_the_image_holds_what_the_agent_runs_and_nothing_else(image: str) -> None:
    venv = int(_in_image(image, "du", "--summarize", "--bytes", "/opt/venv").split()[0])
    assert 0 < venv <= VENV_BUDGET, f"the venv takes {venv / MIB:.1f} MiB"
    apt = [size for size, created_by in _layers(image) if "apt-get install" in created_by]
    assert len(apt) == 1
    assert 0 < apt[0] <= APT_LAYER_BUDGET, f"apt layer {apt[0] / MIB:.1f} MiB (apt's cache left?)"

    found = _in_image(
        image,
        "python",
        "-c",
        "import importlib.util as u, ctypes.util as cu, ztunnel_redirect.app.cli;"
        "unused = ('pip', 'setuptools', 'ztunnel_redirect.testing', 'ztunnel_redirect.app.demo');"
        "print([m for m in unused if u.find_spec(m)], cu.find_library('nftables'))",
    )
    assert found.split() == ["[]", "libnftables.so.1"]
    plugin = f"/opt/ztunnel-redirect/cni/{PLUGIN_NAME}"
    assert _in_image(image, "stat", "-c", "%a %s", plugin).split()[0] == "755"
    # Static: no program interpreter for the host's loader to resolve (file(1) is not in the image).
    elf = _in_image(
        image, "python", "-c", f"print(b'/lib64/ld-linux' in open('{plugin}','rb').read())"
    )
    assert elf.strip() == "False"
    setuid = _in_image(image, "find", "/", "-xdev", "-type", "f", "-perm", "/6000")
    assert setuid == ""


# --- the agent from the image --------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server:
        yield server


@pytest.fixture
def node(api: ApiServer) -> Iterator[TestNode]:
    with TestNode(api) as the_node:
        yield the_node


def _tables(netns: Netns) -> set[str]:
    return {
        line.removeprefix("table ") for line in netns.exec("nft", "list", "tables").splitlines()
    }


def _root_tables() -> set[str]:
    """The root netns's nftables tables (read only)."""
    out = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {line.removeprefix("table ") for line in out.splitlines()}


def _container_argv(
    image: str, name: str, node: TestNode, bin_dir: Path, conf_dir: Path
) -> list[str]:
    """`podman run` as the kubelet runs the DaemonSet's agent container, against `node`."""
    container = _agent_container()
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    argv = [
        "podman", "run", "--rm", "--name", name,
        "--network", "host", "--pid", "host", *LIMITS,
        "--user", f"{context['runAsUser']}:{context['runAsGroup']}",
        "--cap-drop", "ALL", "--cap-add", ",".join(context["capabilities"]["add"]),
        "--security-opt", "apparmor=unconfined",
        "--read-only" if context["readOnlyRootFilesystem"] else "--read-only=false",
        "--tmpfs", mounts["tmp"],
        "--volume", f"{bin_dir}:{mounts['cni-bin-dir']}",
        "--volume", f"{conf_dir}:{mounts['cni-conf-dir']}",
        # HostToContainer: pods' netns mounted after the agent started appear inside too.
        "--volume", f"/run/netns:{mounts['host-netns']}:ro,rslave",
        # The node's kubeconfig, fake /proc, ztunnel socket directory and run directory, at the
        # same paths as outside (the test's stand-ins for the DaemonSet's host directories).
        "--volume", f"{node.root}:{node.root}",
        image,
        *container["args"],
    ]  # fmt: skip
    flags = node.agent_argv(
        "--log-format", "json", "--install-cni", readiness_port=0, metrics_port=0
    )
    return argv + flags[flags.index("agent") + 1 :]


async def test_the_image_runs_the_agent_with_the_daemonsets_capabilities(
    image: str, node: TestNode, tmp_path: Path
) -> None:
    """The agent from the image installs the CNI plugin, enrolls a pod (rules in its netns through
    the image's libnftables, ztunnel given its netns) and traffic is redirected."""
    a, b = node.add_pod("a", NS), node.add_pod("b", NS)
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    conflist = conf_dir / "10-calico.conflist"
    shutil.copyfile(ROOT / "tests" / "data" / "cni" / conflist.name, conflist)
    root_tables = _root_tables()

    name = f"zr-image-{secrets.token_hex(3)}"
    agent = AgentProcess(
        _container_argv(image, name, node, bin_dir, conf_dir), log_path=tmp_path / "agent.log"
    )
    fake = None
    try:
        await agent.start()  # ready: its servers listen, the CNI entry is in place
        fake = await connect_ztunnel(node.ztunnel_socket, timeout=WAIT)

        # Only the DaemonSet's capabilities, effective in the agent's process.
        effective = await asyncio.to_thread(_effective_capabilities, name)
        added = _agent_container()["securityContext"]["capabilities"]["add"]
        assert effective == sum(1 << CAPABILITY_BITS[cap] for cap in added)

        # The plugin copied out to the node's CNI bin dir, our entry last in the primary config.
        plugin = bin_dir / PLUGIN_NAME
        assert plugin.is_file()
        assert plugin.stat().st_mode & 0o777 == 0o755
        assert json.loads(conflist.read_text())["plugins"][-1]["type"] == PLUGIN_NAME

        node.enroll_namespace(NS)
        for pod in (a, b):
            await node.api.wait_for_annotation(
                NS, pod.name, c.STATUS_ANNOTATION, "enabled", timeout=WAIT
            )
            async with asyncio.timeout(WAIT):
                await fake.wait_request(RequestKind.ADD, pod.uid)
            assert {f"inet {t}" for t in c.POD_TABLES} <= _tables(pod.lab.netns)
        assert f"inet {c.HOST_TABLE}" in _tables(node.lab.node)

        with App(b.path, APP_PORT, name=b.name):
            reply = await asyncio.to_thread(request, a.path, b.ips[0], APP_PORT)
            assert reply == f"app {b.name} saw {a.ips[0]}\n".encode()
            hop = await asyncio.to_thread(
                standin_of(fake, a).wait_for, _outbound_to((b.ips[0], APP_PORT)), timeout=5.0
            )
            assert hop.client[0] == a.ips[0]
    finally:
        if fake is not None:
            await fake.close()
        await agent.stop()
        podman("rm", "--force", "--ignore", name)
        print(agent.tail())
    assert agent.returncode == 0, "SIGTERM through podman: the agent exits cleanly"
    assert podman("container", "exists", name).returncode == 1
    # Host rules went to the test node's netns; the root netns got no table of ours.
    ours = {f"inet {t}" for t in (*c.POD_TABLES, c.HOST_TABLE)}
    assert (_root_tables() - root_tables) & ours == set()


def _effective_capabilities(container: str) -> int:
    """CapEff of the container's main process (the agent), as a bit mask."""
    inspect = podman("inspect", "--format", "{{.State.Pid}}", container)
    assert inspect.returncode == 0, inspect.stderr
    status = Path(f"/proc/{inspect.stdout.strip()}/status").read_text()
    (line,) = (line for line in status.splitlines() if line.startswith("CapEff:"))
    return int(line.split()[1], 16)


def _outbound_to(target: tuple[str, int]) -> Any:
    def matches(hop: Hop) -> bool:
        return hop.kind is HopKind.OUTBOUND and hop.original_dst == target

    return matches
