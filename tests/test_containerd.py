"""End to end through a real container runtime: containerd's CRI plugin runs the CNI chain (a real
bridge + host-local primary, then our plugin) when the test asks it for pod sandboxes over CRI, as
kubelet does.

The node is a network namespace (`TestNode`): containerd runs in it (`testing.containerd`), so does
the bridge `zrbr0` and every sandbox's veth; the sandboxes' addresses (10.233.0.0/24) exist only in
there. The real agent process runs against the test API server with the host netns set to the
node's and the real /proc, and chains itself into the test's CNI conf dir as on a node. A fake
ztunnel (a real ZDS client) starts a ztunnel stand-in in each netns it gets, so that a sandbox's
first connection proves the redirect. Nothing sleeps to wait: the agent's log lines, the fake
ztunnel's requests and the API server's state are waited for on conditions under timeouts.

Skipped, with the reason, where containerd, runc, the CNI plugins or busybox-static are missing
(`make system-packages` installs them) or without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.testing import containerd as ctd
from ztunnel_redirect.testing.agentprocess import AgentProcess, built_plugin, connect_ztunnel
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.containerd import Containerd, Sandbox
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import Netns
from ztunnel_redirect.testing.node import NODE_NAME, TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin
from ztunnel_redirect.testing.traffic import App, request

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(ctd.unavailable() is not None, reason=str(ctd.unavailable())),
]

MESH_NS: Final = "shop"
PLAIN_NS: Final = "plain"
APP_PORT: Final = 8080
EVENT_TIMEOUT: Final = 15.0
TRAFFIC_TIMEOUT: Final = 5.0
TIMED_RUNS: Final = 10


def measure(name: str, value: str) -> None:
    """One `MEASURE:` line on stdout (`pytest -s` shows them)."""
    print(f"MEASURE: {name} {value}")


# --- what depends on the CNI plugin --------------------------------------------------------------
# The plugin is the static executable `make cni-plugin` builds; the agent copies it into the
# node's CNI bin dir. With the agent unreachable it reads the agent's decision file in the run dir
# (no credentials on the node): a pod it does not know in an enrolled namespace fails closed.


class Plugin:
    """The installed plugin, as on a node."""

    fail_closed_text: Final = "agent not reachable"
    """In the error a mesh pod's failed ADD carries when the agent is down."""


# --- the node ------------------------------------------------------------------------------------


@dataclass
class Node:
    api: ApiServer
    node: TestNode
    containerd: Containerd
    work: Path
    agents: list[AgentProcess] = field(default_factory=list)
    ztunnels: list[FakeZtunnel] = field(default_factory=list)
    apps: list[App] = field(default_factory=list)

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def start_agent(self) -> AgentProcess:
        """The agent, installing and chaining our plugin into the node's CNI dirs; returns once
        its entry is in the primary's conflist."""
        agent = AgentProcess.for_node(
            self.node,
            "--log-level", "debug", "--reconcile-period", "2", "--proc-root", "/proc",
            "--install-cni", "--cni-bin-dir", str(self.containerd.cni_bin_dir),
            "--cni-conf-dir", str(self.containerd.cni_conf_dir),
            "--cni-plugin-binary", str(built_plugin()),
            log_path=self.work / f"agent-{len(self.agents)}.log",
        )  # fmt: skip
        self.agents.append(agent)
        await agent.start()
        await agent.wait_event("cni_plugin_installed")
        return agent

    async def ztunnel(self) -> FakeZtunnel:
        zt = await connect_ztunnel(self.node.ztunnel_socket)
        self.ztunnels.append(zt)
        return zt

    def create_pod(self, name: str, namespace: str) -> str:
        """The pod in the API, scheduled here, before its sandbox exists (no IPs); its UID."""
        created = self.api.create_pod(
            {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Pending"},
            }
        )
        return str(created["metadata"]["uid"])

    async def run_sandbox(self, name: str, namespace: str, uid: str) -> Sandbox:
        """RunPodSandbox as kubelet asks for it; then kubelet reports its IPs in the API."""
        config = ctd.sandbox_config(name, namespace, uid)
        sandbox = await asyncio.to_thread(self.containerd.run, config)
        self.api.patch_pod(
            namespace,
            name,
            {
                "status": {
                    "phase": "Running",
                    "podIP": sandbox.ips[0],
                    "podIPs": [{"ip": ip} for ip in sandbox.ips],
                }
            },
        )
        return sandbox

    async def pod(self, name: str, namespace: str) -> Sandbox:
        return await self.run_sandbox(name, namespace, self.create_pod(name, namespace))

    async def remove(self, sandbox: Sandbox) -> None:
        """StopPodSandbox (the CNI DEL) and RemovePodSandbox."""
        await asyncio.to_thread(self.containerd.remove, sandbox.id)

    def app(self, sandbox: Sandbox) -> App:
        app = App(sandbox.path, APP_PORT, name=sandbox.name)
        app.start()
        self.apps.append(app)
        return app

    async def close(self) -> None:
        errors: list[BaseException] = []
        for zt in reversed(self.ztunnels):
            try:
                await zt.close()
            except Exception as exc:
                errors.append(exc)
        for app in self.apps:
            try:
                await asyncio.to_thread(app.close)
            except Exception as exc:
                errors.append(exc)
        for agent in self.agents:
            try:
                await agent.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    work = Path(tempfile.mkdtemp(prefix="zr-containerd-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            api = await stack.enter_async_context(ApiServer())
            test_node = stack.enter_context(TestNode(api))
            runtime = Containerd.on_node(test_node.lab.node.path, work)
            stack.callback(runtime.close)
            await asyncio.to_thread(runtime.start)
            test_node.namespace(MESH_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})
            test_node.namespace(PLAIN_NS)
            cluster = Node(api, test_node, runtime, work)
            try:
                yield cluster
            finally:
                await cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- what the agent did, seen from outside -----------------------------------------------------


def netns_of(sandbox: Sandbox) -> Netns:
    """The sandbox's netns (containerd binds it under /var/run/netns, i.e. /run/netns)."""
    return Netns(Path(sandbox.path).name)


def kernel_view(ns: Netns) -> str:
    """What the agent may write in a netns: nft ruleset, IPv4 rules and routes of every table."""
    return "\n".join(
        (
            ns.exec("nft", "list", "ruleset"),
            ns.ip("rule", "show"),
            ns.ip("-4", "route", "show", "table", "all"),
        )
    )


def host_set(node: Node) -> set[str]:
    """The pod IPs in the node's probe set (empty when there is no table)."""
    try:
        out = node.node.lab.node.exec("nft", "-j", "list", "set", "inet", c.HOST_TABLE,
                                      c.HOST_SET_V4)  # fmt: skip
    except RuntimeError:
        return set()
    return {
        str(e["elem"]["val"] if isinstance(e, dict) else e)
        for item in json.loads(out)["nftables"]
        for e in item.get("set", {}).get("elem", [])
    }


def annotation(node: Node, sandbox: Sandbox) -> str | None:
    pod = node.api.get_pod(sandbox.namespace, sandbox.name) or {}
    value = (pod.get("metadata", {}).get("annotations") or {}).get(c.STATUS_ANNOTATION)
    return None if value is None else str(value)


async def enabled(node: Node, sandbox: Sandbox) -> None:
    def holds(pod: dict[str, Any] | None) -> bool:
        annotations = (pod or {}).get("metadata", {}).get("annotations") or {}
        return annotations.get(c.STATUS_ANNOTATION) == "enabled"

    await node.api.wait_for_pod(sandbox.namespace, sandbox.name, holds, timeout=EVENT_TIMEOUT)


def inode(path: str) -> int:
    return Path(path).stat().st_ino


async def caught(zt: FakeZtunnel, client: Sandbox, server: Sandbox) -> Hop:
    """One new connection from client to server's app, proven to pass the client's stand-in."""
    workload = zt.workloads.get(PodUid(client.uid))
    assert workload is not None, f"ztunnel has no workload for {client.name}"
    standin = workload.data_plane
    assert isinstance(standin, Standin)
    standin.clear()
    reply = await asyncio.to_thread(
        request, client.path, server.ips[0], APP_PORT, timeout=TRAFFIC_TIMEOUT
    )
    assert reply == f"app {server.name} saw {client.ips[0]}\n".encode()
    return await asyncio.to_thread(
        standin.wait_for,
        lambda h: h.kind is HopKind.OUTBOUND and h.original_dst == (server.ips[0], APP_PORT),
        timeout=TRAFFIC_TIMEOUT,
    )


# --- tests -------------------------------------------------------------------------------------


async def test_mesh_sandbox_is_redirected_from_its_first_connection_and_tidied_up_on_removal(
    node: Node,
) -> None:
    await node.start_agent()
    conflist = json.loads(node.containerd.primary_conf.read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "ztunnel-redirect-cni"]
    zt = await node.ztunnel()
    server = await node.pod("server", PLAIN_NS)
    await asyncio.to_thread(node.app, server)

    web = await node.pod("web-0", MESH_NS)

    # The CNI ADD ran inside RunPodSandbox: ztunnel had the sandbox's netns before it returned.
    added = [r for r in zt.requests if r.kind is RequestKind.ADD and r.uid == web.uid]
    assert len(added) == 1
    assert added[0].netns_inode == inode(web.path)
    assert (added[0].name, added[0].namespace) == ("web-0", MESH_NS)
    # containerd 1.6 passes K8S_POD_UID in CNI_ARGS: the plugin hands the agent the pod's UID.
    assert node.agent.find("cni_add_received", pod_uid=web.uid)
    view = kernel_view(netns_of(web))
    assert c.NAT_TABLE in view
    assert f"lookup {c.ROUTE_TABLE}" in view
    await enabled(node, web)
    assert web.ips[0] in host_set(node)
    hop = await caught(zt, web, server)
    assert hop.client[0] == web.ips[0]
    # The pod outside the mesh started with no rules of ours.
    assert c.NAT_TABLE not in kernel_view(netns_of(server))
    assert annotation(node, server) is None
    assert node.agent.find("cni_add_skipped", pod=f"{PLAIN_NS}/server")

    await node.remove(web)

    async with asyncio.timeout(EVENT_TIMEOUT):
        await zt.wait_request(RequestKind.DEL, web.uid)
    assert web.ips[0] not in host_set(node)
    assert not await asyncio.to_thread(Path(web.path).exists)
    assert zt.violations == []


async def test_agent_down_fails_a_mesh_sandbox_closed_and_kubelets_retry_succeeds(
    node: Node,
) -> None:
    await node.start_agent()
    await node.agent.stop()  # down, its entry left in the chain (as after a crash or upgrade)

    plain = await node.pod("batch-0", PLAIN_NS)
    uid = node.create_pod("web-0", MESH_NS)
    with pytest.raises(grpc.RpcError) as failed:
        await node.run_sandbox("web-0", MESH_NS, uid)

    assert c.NAT_TABLE not in kernel_view(netns_of(plain))
    details = str(failed.value.details())
    assert Plugin.fail_closed_text in details, details

    await node.start_agent()
    zt = await node.ztunnel()
    web = await node.run_sandbox("web-0", MESH_NS, uid)  # kubelet's retry: the same pod

    async with asyncio.timeout(EVENT_TIMEOUT):
        added = await zt.wait_request(RequestKind.ADD, uid)
    assert added.netns_inode == inode(web.path)
    await enabled(node, web)
    assert c.NAT_TABLE in kernel_view(netns_of(web))


async def test_restarted_agent_finds_running_sandboxes_by_their_cgroup_and_rewrites_nothing(
    node: Node,
) -> None:
    first = await node.start_agent()
    zt = await node.ztunnel()
    server = await node.pod("server", PLAIN_NS)
    await asyncio.to_thread(node.app, server)
    web = await node.pod("web-0", MESH_NS)
    await enabled(node, web)
    await first.wait_count("drift_pass_done", 2, since=first.mark)
    namespaces = {"node": node.node.lab.node, "web": netns_of(web)}
    before = {name: kernel_view(ns) for name, ns in namespaces.items()}

    assert await first.stop() == 0
    await zt.close()
    second = await node.start_agent()
    zt = await node.ztunnel()
    await second.wait_count("drift_pass_done", 2, since=second.mark)

    # Found through /proc: the pause process sits in the cgroup containerd made from the
    # sandbox's cgroup parent (/kubepods/besteffort/pod<uid>/<sandbox id>).
    cgroup = await asyncio.to_thread(Path(f"/proc/{web.pid}/cgroup").read_text)
    assert f"{ctd.pod_cgroup_parent(web.uid)}/{web.id}\n" in cgroup
    assert second.find("pods_adopted", pods=1, netns_found=1)
    adds = [r for r in zt.requests if r.kind is RequestKind.ADD]
    assert [(r.uid, r.netns_inode) for r in adds] == [(web.uid, inode(web.path))]
    assert {name: kernel_view(ns) for name, ns in namespaces.items()} == before
    for written in ("pod_rules_applied", "drift_repaired", "host_drift_repaired", "work_failed"):
        assert second.find(written) == [], written
    await caught(zt, web, server)


async def test_run_pod_sandbox_latency_with_and_without_our_plugin(node: Node) -> None:
    def configs(prefix: str, namespace: str) -> list[Any]:
        return [
            ctd.sandbox_config(name, namespace, node.create_pod(name, namespace))
            for name in (f"{prefix}-{i}" for i in range(TIMED_RUNS))
        ]

    # One untimed sandbox first: the first one also pays containerd's and the kernel's warm-up.
    await node.remove(await node.pod("warm-up", PLAIN_NS))
    without = await asyncio.to_thread(
        ctd.run_pod_sandbox_latency, node.containerd, configs("bare", PLAIN_NS)
    )
    await node.start_agent()
    zt = await node.ztunnel()
    plain = await asyncio.to_thread(
        ctd.run_pod_sandbox_latency, node.containerd, configs("plain", PLAIN_NS)
    )
    mesh_configs = configs("mesh", MESH_NS)
    mesh = await asyncio.to_thread(ctd.run_pod_sandbox_latency, node.containerd, mesh_configs)

    added = {r.uid for r in zt.requests if r.kind is RequestKind.ADD}
    assert {cfg.metadata.uid for cfg in mesh_configs} <= added
    measure("run_pod_sandbox_without_plugin", without.summary())
    measure("run_pod_sandbox_with_plugin_not_in_mesh", plain.summary())
    measure("run_pod_sandbox_with_plugin_mesh", mesh.summary())
