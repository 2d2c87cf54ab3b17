"""End to end: the CNI plugin, the agent process and ZDS, driven as a container runtime drives them
(issue "CNI plugin and ZDS", point 6).

The agent runs as its own process against a `TestNode` (lab network namespaces, a fake /proc and
the fake API server). For each new pod the test does what the runtime and the primary CNI do: the
pod exists in the API without IPs, its netns and veth exist; the plugin file is run with the
`CNI_*` environment and a network config with `prevResult` on stdin; then the kubelet reports the
IPs. A `FakeZtunnel` (a real ZDS client) starts a ztunnel stand-in in the pod netns on each `Add`,
so the first connection of the pod's app proves the redirect (an OUTBOUND hop).

Nothing sleeps to wait: the agent's JSON log lines (its stderr, also written to a file) and the
fake ztunnel's requests are waited for on conditions under timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.testing.agentprocess import (
    AgentProcess,
    CniRuntime,
    built_plugin,
    connect_ztunnel,
    metric,
    prev_result,
    standin_of,
    wait_pod_settled,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import GARBAGE, Behaviour, FakeZtunnel, ReceivedRequest
from ztunnel_redirect.testing.node import NodePod, TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind
from ztunnel_redirect.testing.traffic import App, request

pytestmark = pytest.mark.kernel

MESH_NS = "shop"
PLAIN_NS = "plain"
APP_PORT = 8080

EVENT_TIMEOUT = 15.0
TRAFFIC_TIMEOUT = 5.0

# CNI error codes of the plugin (cniplugin/README.md).
CODE_INVALID_CONFIG = 7
CODE_TRY_AGAIN_LATER = 11
CODE_PLUGIN = 999


def measure(name: str, value: float, unit: str = "ms") -> None:
    """One `MEASURE:` line on stdout (`pytest -s` shows them)."""
    print(f"MEASURE: {name}={value:.1f}{unit}")


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Cluster:
    api: ApiServer
    node: TestNode
    runtime: CniRuntime
    work: Path
    stack: contextlib.AsyncExitStack
    agents: list[AgentProcess] = field(default_factory=list)
    ztunnels: list[FakeZtunnel] = field(default_factory=list)
    apps: list[App] = field(default_factory=list)

    async def start_agent(self, *flags: str) -> AgentProcess:
        agent = AgentProcess.for_node(
            self.node, "--log-level", "debug", "--reconcile-period", "2", *flags,
            log_path=self.work / f"agent-{len(self.agents)}.log",
        )  # fmt: skip
        self.agents.append(agent)
        await agent.start()
        return agent

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def ztunnel(
        self, *, serve: bool = True, behaviour: Behaviour | None = None
    ) -> FakeZtunnel:
        """A new ztunnel connects and has received its snapshot."""
        zt = await connect_ztunnel(self.node.ztunnel_socket, serve=serve, behaviour=behaviour)
        self.ztunnels.append(zt)
        return zt

    def app(self, pod: NodePod) -> App:
        app = App(pod.path, APP_PORT, name=pod.name)
        app.start()
        self.apps.append(app)
        return app

    async def new_pod(self, name: str, namespace: str = MESH_NS, **kw: Any) -> NodePod:
        """A sandbox as the primary CNI leaves it (netns, veth, IPs); in the API without IPs."""
        return await asyncio.to_thread(self.node.add_pod, name, namespace, ips=False, **kw)

    async def running_pod(self, name: str, namespace: str, **kw: Any) -> NodePod:
        """A pod that already runs with its IPs reported."""
        return await asyncio.to_thread(self.node.add_pod, name, namespace, **kw)

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


@pytest.fixture(scope="session")
def plugin() -> Path:
    return built_plugin()


@pytest.fixture
async def cluster(plugin: Path) -> AsyncIterator[Cluster]:
    work = Path(tempfile.mkdtemp(prefix="zr-e2e-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            api = await stack.enter_async_context(ApiServer())
            node = stack.enter_context(TestNode(api))
            runtime = CniRuntime.for_node(node, work / "bin", plugin)
            runtime.install()  # as the installer does: the file in the CNI bin dir
            node.namespace(MESH_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})
            node.namespace(PLAIN_NS)
            cluster = Cluster(api, node, runtime, work, stack)
            try:
                yield cluster
            finally:
                await cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- helpers ----------------------------------------------------------------------------------


async def cni_add_seconds(cluster: Cluster) -> tuple[float, float]:
    samples = await cluster.agent.metrics()
    name = "ztunnel_redirect_cni_add_duration_seconds"
    return metric(samples, f"{name}_sum"), metric(samples, f"{name}_count")


async def settle(cluster: Cluster, pod: NodePod) -> None:
    """The kubelet reports the pod's IPs; then until the agent has handled every event of it."""
    await asyncio.to_thread(cluster.node.report_ips, pod)
    await wait_pod_settled(cluster.api, cluster.agent, pod)


async def enroll(cluster: Cluster, name: str) -> NodePod:
    """A mesh pod through the runtime's path: sandbox, plugin ADD, IPs reported, settled."""
    pod = await cluster.new_pod(name)
    outcome = await cluster.runtime.add(pod)
    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    await settle(cluster, pod)
    return pod


def inode(path: str) -> int:
    return Path(path).stat().st_ino


def requests_for(zt: FakeZtunnel, pod: NodePod) -> list[RequestKind]:
    return [r.kind for r in zt.requests if r.uid == pod.uid]


async def connect(client: NodePod, server: NodePod) -> bytes:
    return await asyncio.to_thread(
        request, client.path, server.ips[0], APP_PORT, timeout=TRAFFIC_TIMEOUT
    )


async def caught(cluster: Cluster, zt: FakeZtunnel, client: NodePod, server: NodePod) -> Hop:
    """One new connection from client to server's app, proven to pass the client's stand-in."""
    standin = standin_of(zt, client)
    standin.clear()
    reply = await connect(client, server)
    assert reply == f"app {server.name} saw {client.ips[0]}\n".encode()
    return await asyncio.to_thread(
        standin.wait_for,
        lambda h: h.kind is HopKind.OUTBOUND and h.original_dst == (server.ips[0], APP_PORT),
        timeout=TRAFFIC_TIMEOUT,
    )


@pytest.fixture
async def server(cluster: Cluster) -> NodePod:
    """A pod outside the mesh with an app that names the address it saw."""
    pod = await cluster.running_pod("server", PLAIN_NS)
    await asyncio.to_thread(cluster.app, pod)
    return pod


# --- the ADD path -------------------------------------------------------------------------------


async def test_add_hands_the_pod_to_ztunnel_before_returning_and_traffic_is_redirected(
    cluster: Cluster, server: NodePod
) -> None:
    await cluster.start_agent()
    zt = await cluster.ztunnel()
    pod = await cluster.new_pod("web-0")

    before_sum, before_count = await cni_add_seconds(cluster)
    outcome = await cluster.runtime.add(pod)

    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert outcome.json == prev_result(pod)
    # Before answering, the agent installed the pod's rules and ztunnel took its netns.
    await cluster.agent.wait_event("pod_rules_applied", netns=pod.path)
    async with asyncio.timeout(EVENT_TIMEOUT):
        added = await zt.wait_request(RequestKind.ADD, pod.uid)
    assert added.fds == 1
    assert added.netns_inode == inode(pod.path)
    assert (added.name, added.namespace) == ("web-0", MESH_NS)
    after_sum, after_count = await cni_add_seconds(cluster)
    assert after_count == before_count + 1
    samples = await cluster.agent.metrics()
    assert metric(samples, "istio_cni_plugin_requests_total", response_code="200") == 1
    assert metric(samples, "ztunnel_connected") == 1
    measure("cni_add_plugin_process", outcome.seconds * 1e3)
    measure("cni_add_agent_part", (after_sum - before_sum) * 1e3)

    await settle(cluster, pod)
    hop = await caught(cluster, zt, pod, server)
    assert hop.client[0] == pod.ips[0]
    assert zt.violations == []


async def test_the_plugins_log_lines_appear_in_the_agents_log_with_the_pod(
    cluster: Cluster,
) -> None:
    agent = await cluster.start_agent()
    await cluster.ztunnel()
    pod = await cluster.new_pod("web-0")
    log_socket = Path(cluster.node.run_dir) / c.PLUGIN_LOG_SOCKET

    # A sandbox in the host's netns is refused: the plugin says why in both logs. (An ADD the
    # agent took sends nothing at info: the agent logged it already.)
    outcome = await cluster.runtime.run("ADD", pod, netns=f"/proc/{os.getpid()}/ns/net")

    assert outcome.rc == 1, outcome.stdout + outcome.stderr
    line = "ADD failed: ztunnel-redirect agent refused pod: "
    assert line in outcome.stderr  # the runtime's log
    event = await agent.wait_event("cni_plugin_log", pod=f"{MESH_NS}/web-0", source="cni-plugin")
    assert line in event["message"]
    assert event["level"] == "error"
    assert stat.S_IMODE(log_socket.lstat().st_mode) == 0o600
    await agent.stop()
    assert not log_socket.exists()


async def test_a_network_config_at_cni_0_3_0_adds_and_deletes(
    cluster: Cluster, server: NodePod
) -> None:
    # Some primary CNIs still declare 0.3.0; the whole conflist, our plugin too, then runs at it.
    await cluster.start_agent()
    zt = await cluster.ztunnel()
    pod = await cluster.new_pod("web-0")
    conf = cluster.runtime.conf(pod)
    conf["cniVersion"] = conf["prevResult"]["cniVersion"] = "0.3.0"
    stdin = json.dumps(conf).encode()

    outcome = await cluster.runtime.run("ADD", pod, stdin=stdin)

    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert outcome.json == conf["prevResult"]
    async with asyncio.timeout(EVENT_TIMEOUT):
        await zt.wait_request(RequestKind.ADD, pod.uid)
    await settle(cluster, pod)
    await caught(cluster, zt, pod, server)
    deleted = await cluster.runtime.run("DEL", pod, stdin=stdin)
    assert (deleted.rc, deleted.stdout) == (0, ""), deleted.stderr


async def test_pod_stays_redirected_between_add_and_the_kubelet_reporting_its_ips(
    cluster: Cluster, server: NodePod
) -> None:
    await cluster.start_agent()
    zt = await cluster.ztunnel()
    pod = await cluster.new_pod("web-0")
    # The watch's ADDED event for the IP-less pod is handled (nothing to do yet).
    await cluster.agent.wait_event("work_done", key=pod.uid)
    mark = cluster.agent.mark

    outcome = await cluster.runtime.add(pod)
    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    # The annotation written by the ADD comes back through the watch, still without IPs
    # (the kubelet has not reported them); the agent handles that update.
    await cluster.agent.wait_event("work_done", key=pod.uid, since=mark)

    assert cluster.agent.find("pod_leaving_mesh", pod_uid=pod.uid) == []
    assert requests_for(zt, pod) == [RequestKind.ADD]
    # The app's very first connection goes through the ztunnel that got the pod at ADD.
    await caught(cluster, zt, pod, server)


async def test_pod_not_for_the_mesh_passes_at_once_without_ztunnel(cluster: Cluster) -> None:
    await cluster.start_agent()  # and no ztunnel connected at all
    pod = await cluster.new_pod("batch-0", PLAIN_NS)

    outcome = await cluster.runtime.add(pod)

    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert outcome.json == prev_result(pod)
    await cluster.agent.wait_event("cni_add_skipped", pod=f"{PLAIN_NS}/batch-0")
    tables = await asyncio.to_thread(pod.lab.netns.exec, "nft", "list", "tables")
    assert c.NAT_TABLE not in tables
    measure("cni_add_not_in_mesh_plugin_process", outcome.seconds * 1e3)


async def test_mesh_pod_without_ztunnel_fails_closed(cluster: Cluster) -> None:
    await cluster.start_agent()
    pod = await cluster.new_pod("web-0")

    outcome = await cluster.runtime.add(pod)

    assert outcome.rc != 0
    error = outcome.json
    assert error["code"] == CODE_PLUGIN
    assert "no ztunnel connected" in error["msg"]


async def test_agent_down_fails_the_add_and_the_retry_succeeds_once_it_is_up(
    cluster: Cluster,
) -> None:
    pod = await cluster.new_pod("web-0")

    down = await cluster.runtime.add(pod)

    assert down.rc != 0
    error = down.json
    assert error["code"] == CODE_TRY_AGAIN_LATER
    # What an operator must check: the socket, the agent's DaemonSet, and why it matters.
    assert cluster.runtime.event_socket in error["msg"]
    assert "DaemonSet" in error["msg"]
    # An agent that never ran left no decision file: the plugin cannot tell.
    assert f"cannot tell whether pod {MESH_NS}/web-0 is in the ambient mesh" in error["msg"]

    await cluster.start_agent()
    zt = await cluster.ztunnel()
    retried = await cluster.runtime.add(pod)

    assert retried.rc == 0, retried.stdout + retried.stderr
    assert retried.json == prev_result(pod)
    async with asyncio.timeout(EVENT_TIMEOUT):
        added = await zt.wait_request(RequestKind.ADD, pod.uid)
    assert added.netns_inode == inode(pod.path)


# --- the agent stopped: the plugin decides from the file the real agent wrote -----------------
# One test per row of the decision table (cniplugin/README.md); each runs the real agent until
# its decision file holds what the row needs, stops it, and runs the plugin as the runtime does.

AGENT_NS = "istio-system"
AGENT_POD = "ztunnel-redirect-a1b2c"
"""The agent's own pod name (POD_NAME): its DaemonSet's pods are `ztunnel-redirect-<suffix>`."""


def decision_file(cluster: Cluster) -> Path:
    return Path(cluster.node.run_dir) / c.DECISION_FILE


def decided(cluster: Cluster) -> dict[str, Any]:
    try:
        content: dict[str, Any] = json.loads(decision_file(cluster).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return content


async def run_then_stop_agent(
    cluster: Cluster, *known: NodePod, flags: Sequence[str] = ()
) -> dict[str, Any]:
    """The agent runs until its decision file knows `known` and the mesh namespace, then stops
    (SIGTERM: the file stays, that is when it is read); the file as it left it."""
    agent = await cluster.start_agent("--pod-name", AGENT_POD, "--pod-namespace", AGENT_NS, *flags)

    def holds() -> bool:
        content = decided(cluster)
        return MESH_NS in content.get("enrolled_namespaces", ()) and all(
            p.uid in content.get("pods", {}) for p in known
        )

    await agent.wait_until(holds, what="the decision file knows the pods")
    assert await agent.stop() == 0
    assert decision_file(cluster).exists()
    st = decision_file(cluster).stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
    return decided(cluster)


def assert_passes(outcome: Any, pod: NodePod, why: str | None) -> None:
    """`why`: the row that applied, in the runtime's log (None: decided before asking the
    agent, by the entry's excluded namespaces, so nothing to say)."""
    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert outcome.json == prev_result(pod)
    if why is not None:
        assert why in outcome.stderr


def assert_fails_closed(outcome: Any, cluster: Cluster, why: str) -> None:
    assert outcome.rc != 0
    error = outcome.json
    assert error["code"] == CODE_TRY_AGAIN_LATER
    assert cluster.runtime.event_socket in error["msg"]
    assert "DaemonSet" in error["msg"]
    assert why in error["msg"]


async def test_agent_down_excluded_namespace_passes(cluster: Cluster) -> None:
    # kube-system is in the conflist entry too (known without the file); monitoring only in the
    # agent's settings, so only in its file.
    flags = ("--exclude-namespaces", "kube-system,monitoring")
    content = await run_then_stop_agent(cluster, flags=flags)
    assert content["exclude_namespaces"] == ["kube-system", "monitoring"]
    system = await cluster.new_pod("coredns-1", "kube-system")
    monitoring = await cluster.new_pod("prometheus-0", "monitoring")

    assert_passes(await cluster.runtime.add(system), system, None)
    outcome = await cluster.runtime.add(monitoring)
    assert_passes(outcome, monitoring, "namespace monitoring is excluded")


async def test_agent_down_host_network_passes(cluster: Cluster) -> None:
    await run_then_stop_agent(cluster)
    pod = await cluster.new_pod("node-exporter-1")  # in the mesh namespace, yet host network

    outcome = await cluster.runtime.run("ADD", pod, netns=f"/proc/{os.getpid()}/ns/net")

    assert_passes(outcome, pod, "host network")


async def test_agent_down_the_agents_own_pod_passes(cluster: Cluster) -> None:
    # The agent's namespace enrolled as a whole: only the agent_pods row lets its new pod start.
    cluster.node.namespace(AGENT_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})
    content = await run_then_stop_agent(cluster)
    assert content["agent_pods"] == [{"namespace": AGENT_NS, "name_prefix": "ztunnel-redirect-"}]
    assert AGENT_NS in content["enrolled_namespaces"]
    pod = await cluster.new_pod("ztunnel-redirect-x9y8z", AGENT_NS)  # the rollout's next pod

    assert_passes(await cluster.runtime.add(pod), pod, "the agent's own pod")


async def test_agent_down_pod_known_in_mesh_fails_closed(cluster: Cluster) -> None:
    pod = await cluster.running_pod("web-0", MESH_NS)
    content = await run_then_stop_agent(cluster, pod)
    assert content["pods"][pod.uid] == {"namespace": MESH_NS, "name": "web-0", "in_mesh": True}

    outcome = await cluster.runtime.add(pod)  # its sandbox is recreated while the agent is down

    assert_fails_closed(outcome, cluster, f"pod {MESH_NS}/web-0 is in the ambient mesh")


async def test_agent_down_pod_waiting_for_its_ip_counts_as_in_the_mesh(cluster: Cluster) -> None:
    pod = await cluster.new_pod("web-0", MESH_NS)  # in the API, no IP yet
    content = await run_then_stop_agent(cluster, pod)
    assert content["pods"][pod.uid]["in_mesh"] is True

    assert_fails_closed(await cluster.runtime.add(pod), cluster, "is in the ambient mesh")


async def test_agent_down_pod_known_not_in_mesh_passes(cluster: Cluster) -> None:
    # In an enrolled namespace but opted out: known, so the namespace's row never applies.
    pod = await cluster.running_pod("batch-0", MESH_NS, labels={c.ENROLL_LABEL: "none"})
    content = await run_then_stop_agent(cluster, pod)
    assert content["pods"][pod.uid]["in_mesh"] is False

    assert_passes(await cluster.runtime.add(pod), pod, "the agent decided it is not in the mesh")


async def test_agent_down_unknown_pod_in_an_enrolled_namespace_fails_closed(
    cluster: Cluster,
) -> None:
    await run_then_stop_agent(cluster)
    pod = await cluster.new_pod("web-1", MESH_NS)  # created while the agent is down

    outcome = await cluster.runtime.add(pod)

    assert_fails_closed(outcome, cluster, "not known to the agent yet and its namespace")


async def test_agent_down_unknown_pod_in_a_namespace_not_enrolled_passes(
    cluster: Cluster,
) -> None:
    # It may opt in by its own label, which the plugin cannot see: it runs unredirected until the
    # agent is back and enrolls it from its informer (README: why this row passes).
    await run_then_stop_agent(cluster)
    pod = await cluster.new_pod("opts-in", PLAIN_NS, labels={c.ENROLL_LABEL: c.ENROLL_VALUE})

    assert_passes(await cluster.runtime.add(pod), pod, f"namespace {PLAIN_NS} is not enrolled")

    await asyncio.to_thread(cluster.node.report_ips, pod)  # the kubelet, meanwhile
    await cluster.start_agent()
    zt = await cluster.ztunnel()
    async with asyncio.timeout(EVENT_TIMEOUT):
        await zt.wait_request(RequestKind.ADD, pod.uid)


@pytest.mark.parametrize("damage", ["missing", "group_writable", "not_json"])
async def test_agent_down_without_a_usable_decision_file_only_excluded_namespaces_pass(
    cluster: Cluster, damage: str
) -> None:
    await run_then_stop_agent(cluster)
    path = decision_file(cluster)
    if damage == "missing":
        path.unlink()
    elif damage == "group_writable":
        path.chmod(0o620)
    else:
        path.write_text("{not json")
    plain = await cluster.new_pod("batch-0", PLAIN_NS)
    system = await cluster.new_pod("coredns-1", "kube-system")

    assert_fails_closed(await cluster.runtime.add(plain), cluster, "cannot tell whether pod")
    assert_passes(await cluster.runtime.add(system), system, None)


async def test_decision_file_follows_a_namespace_relabel(cluster: Cluster) -> None:
    pod = await cluster.running_pod("web-0", PLAIN_NS)
    agent = await cluster.start_agent()
    await agent.wait_until(
        lambda: decided(cluster).get("pods", {}).get(pod.uid, {}).get("in_mesh") is False,
        what="the pod decided out of the mesh",
    )

    cluster.node.namespace(PLAIN_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})

    await agent.wait_until(
        lambda: (
            decided(cluster)["pods"][pod.uid]["in_mesh"] is True
            and PLAIN_NS in decided(cluster)["enrolled_namespaces"]
        ),
        what="the relabel in the decision file",
    )


# --- installing: never chain a plugin that cannot run ------------------------------------------


async def test_an_executable_that_cannot_run_keeps_the_agent_not_ready_with_the_reason(
    cluster: Cluster,
) -> None:
    """The agent installs the plugin itself here (the other tests run it with --no-install-cni):
    an executable whose interpreter this host lacks is never chained, and /readyz says why."""
    bin_dir, conf_dir = cluster.work / "cni-bin", cluster.work / "net.d"
    conf_dir.mkdir()
    primary = conf_dir / "10-calico.conflist"
    primary.write_text(json.dumps({"cniVersion": "0.3.1", "name": "k8s-pod-network",
                                   "plugins": [{"type": "calico"}]}))  # fmt: skip
    before = primary.read_bytes()
    broken = cluster.work / "broken-plugin"
    broken.write_bytes(b"#!/nonexistent/python3\n")
    agent = AgentProcess.for_node(
        cluster.node, "--install-cni", "--cni-bin-dir", str(bin_dir),
        "--cni-conf-dir", str(conf_dir), "--cni-plugin-binary", str(broken),
        log_path=cluster.work / "agent-install.log",
    )  # fmt: skip
    cluster.agents.append(agent)
    await agent.start(ready=False)

    await agent.wait_event("cni_config_update_failed", reason="PluginUnusableError")
    status, text = await agent.readyz()
    assert status == 503
    assert "cni: CNI plugin" in text
    assert "cannot run on this host" in text
    assert primary.read_bytes() == before  # the primary conflist untouched

    # The right executable arrives; any change in the conf dir makes the agent look again.
    shutil.copyfile(cluster.runtime.source, broken)
    primary.chmod(0o640)
    await agent.wait_ready()
    assert await agent.readyz() == (200, "ready\n")
    assert json.loads(primary.read_text())["plugins"][-1]["type"] == "ztunnel-redirect-cni"
    assert primary.stat().st_mode & 0o777 == 0o640  # the primary's mode kept
    assert (bin_dir / "ztunnel-redirect-cni").read_bytes() == cluster.runtime.source.read_bytes()


# --- the plugin needs nothing on the node ------------------------------------------------------


async def test_the_plugin_in_a_chroot_holding_only_itself_and_the_socket_adds_a_pod(
    cluster: Cluster,
) -> None:
    """No interpreter, library, /proc or /etc: the executable and the agent's socket are all it
    has, and a mesh pod's ADD goes through the running agent to ztunnel."""
    if shutil.which("chroot") is None or shutil.which("mount") is None:
        pytest.skip("needs chroot(8) and mount(8)")
    await cluster.start_agent()
    zt = await cluster.ztunnel()
    pod = await cluster.new_pod("web-0")
    root = cluster.work / "root"
    root.mkdir()
    shutil.copy(cluster.runtime.source, root / "ztunnel-redirect-cni")
    socket_in_root = root / c.PLUGIN_EVENT_SOCKET
    socket_in_root.touch()
    await asyncio.to_thread(
        subprocess.run,
        ["mount", "--bind", cluster.runtime.event_socket, str(socket_in_root)],
        check=True,
        timeout=30,
    )
    try:
        assert sorted(p.name for p in root.iterdir()) == [
            c.PLUGIN_EVENT_SOCKET,
            "ztunnel-redirect-cni",
        ]
        conf = {**cluster.runtime.conf(pod), "plugin_event_socket": f"/{c.PLUGIN_EVENT_SOCKET}"}
        outcome = await cluster.runtime.run(
            "ADD",
            pod,
            stdin=json.dumps(conf).encode(),
            argv=("chroot", str(root), "/ztunnel-redirect-cni"),
        )
    finally:
        await asyncio.to_thread(
            subprocess.run, ["umount", str(socket_in_root)], check=True, timeout=30
        )

    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert outcome.json == prev_result(pod)
    async with asyncio.timeout(EVENT_TIMEOUT):
        added = await zt.wait_request(RequestKind.ADD, pod.uid)
    assert added.netns_inode == inode(pod.path)


# --- ztunnel restarts and upgrades ----------------------------------------------------------


async def test_ztunnel_restart_replays_the_snapshot_and_traffic_is_caught_again(
    cluster: Cluster, server: NodePod
) -> None:
    await cluster.start_agent()
    old = await cluster.ztunnel()
    pod = await enroll(cluster, "web-0")
    await caught(cluster, old, pod, server)

    mark = cluster.agent.mark
    await old.close()  # ztunnel died: its connection and its listeners in the pod are gone
    await cluster.agent.wait_event("ztunnel_disconnected", since=mark)
    # Fail closed: with no ztunnel, the pod's traffic is still redirected, to nothing.
    with pytest.raises(ConnectionRefusedError):
        await connect(pod, server)

    new = await cluster.ztunnel()

    snapshot = [r for r in new.requests if r.kind is not RequestKind.SNAPSHOT_SENT]
    assert [(r.kind, r.uid, r.fds) for r in snapshot] == [(RequestKind.ADD, pod.uid, 1)]
    assert snapshot[0].netns_inode == inode(pod.path)
    await caught(cluster, new, pod, server)
    assert old.violations == new.violations == []


async def test_two_ztunnels_during_an_upgrade_adds_go_to_the_newest_dels_to_both(
    cluster: Cluster,
) -> None:
    await cluster.start_agent()
    old = await cluster.ztunnel(serve=False)
    first = await enroll(cluster, "web-0")

    new = await cluster.ztunnel(serve=False)  # the upgraded ztunnel, while the old one runs
    assert [(r.kind, r.uid) for r in new.requests] == [
        (RequestKind.ADD, first.uid),
        (RequestKind.SNAPSHOT_SENT, ""),
    ]
    second = await enroll(cluster, "web-1")

    assert RequestKind.ADD in requests_for(new, second)
    assert RequestKind.ADD not in requests_for(old, second)

    dels = {zt: requests_for(zt, second).count(RequestKind.DEL) for zt in (old, new)}
    await asyncio.to_thread(cluster.api.delete_pod, MESH_NS, "web-1")
    async with asyncio.timeout(EVENT_TIMEOUT):
        for zt, count in dels.items():

            def one_more_del(seen: Sequence[ReceivedRequest], count: int = count) -> bool:
                return [r.kind for r in seen if r.uid == second.uid].count(RequestKind.DEL) > count

            await zt.wait_for(one_more_del)
    # The old ztunnel keeps what it has until it goes: nothing of the first pod was deleted.
    assert requests_for(old, first)[-1] is RequestKind.ADD
    assert first.uid in old.workloads
    assert old.violations == new.violations == []


async def test_pod_deleted_while_ztunnel_is_away_is_not_in_its_next_snapshot(
    cluster: Cluster,
) -> None:
    await cluster.start_agent()
    old = await cluster.ztunnel(serve=False)
    staying = await enroll(cluster, "web-0")
    going = await enroll(cluster, "web-1")

    mark = cluster.agent.mark
    await old.close()
    await cluster.agent.wait_event("ztunnel_disconnected", since=mark)
    await asyncio.to_thread(cluster.api.delete_pod, MESH_NS, "web-1")
    # No ztunnel to send a Del to: the agent forgets the pod anyway.
    await cluster.agent.wait_event("pod_removed", pod_uid=going.uid, since=mark)
    await asyncio.to_thread(cluster.node.lab.delete, going.lab.netns)

    new = await cluster.ztunnel(serve=False)

    # How the returning ztunnel learns: the snapshot has every pod still enrolled, and not it.
    assert [(r.kind, r.uid) for r in new.requests] == [
        (RequestKind.ADD, staying.uid),
        (RequestKind.SNAPSHOT_SENT, ""),
    ]


# --- garbage on both sockets ----------------------------------------------------------------


async def http_on_unix(path: str, method: str, url: str, body: bytes = b"") -> tuple[int, str]:
    connector = aiohttp.UnixConnector(path=path)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.request(method, f"http://localhost{url}", data=body) as response,
    ):
        return response.status, await response.text()


def raw_exchange(path: str, kind: socket.SocketKind, data: bytes) -> bytes:
    """Connect, send `data`, read until the agent closes (bounded by a socket timeout)."""
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.settimeout(TRAFFIC_TIMEOUT)
        sock.connect(path)
        sock.send(data)
        chunks = []
        for _ in range(64):
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


async def test_garbage_on_both_sockets_is_refused_and_enrolled_pods_keep_working(
    cluster: Cluster, server: NodePod
) -> None:
    agent = await cluster.start_agent()
    zt = await cluster.ztunnel()
    pod = await enroll(cluster, "web-0")
    events = cluster.runtime.event_socket
    good = json.dumps(
        {"Netns": pod.path, "PodName": "web-0", "PodNamespace": MESH_NS, "IPs": []}
    ).encode()

    before = requests_for(zt, pod)
    # The plugin event socket: wrong paths and methods, bad JSON, a netns outside the allowed
    # directories, a body over the limit, and bytes that are not HTTP.
    assert (await http_on_unix(events, "GET", "/"))[0] == 404
    assert (await http_on_unix(events, "GET", "/cmdadd"))[0] == 405
    status, text = await http_on_unix(events, "POST", "/cmdadd", b"{not json")
    assert (status, text.startswith("body is not JSON")) == (400, True)
    outside = good.replace(pod.path.encode(), b"/etc/passwd")
    status, text = await http_on_unix(events, "POST", "/cmdadd", outside)
    assert status == 400
    assert "outside the allowed directories" in text
    assert (await http_on_unix(events, "POST", "/cmdadd", b"x" * (1 << 20)))[0] == 413
    answer = await asyncio.to_thread(
        raw_exchange, events, socket.SOCK_STREAM, b"\x00\x01\x02 garbage\r\n\r\n"
    )
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    # The plugin's own input: not JSON is error 7 and nothing reaches the agent.
    bad = await cluster.runtime.run("ADD", pod, stdin=b"\xff garbage")
    assert (bad.rc, bad.json["code"]) == (1, CODE_INVALID_CONFIG)

    # The ZDS socket: a peer whose hello is garbage, and one that sends bytes after its hello,
    # each lose their own connection.
    mark = agent.mark
    assert await asyncio.to_thread(raw_exchange, cluster.node.ztunnel_socket,
                                   socket.SOCK_SEQPACKET, GARBAGE) == b""  # fmt: skip
    await agent.wait_event("ztunnel_rejected", reason="undecodable", since=mark)
    rogue = FakeZtunnel(cluster.node.ztunnel_socket)
    await rogue.start()
    cluster.ztunnels.append(rogue)
    async with asyncio.timeout(EVENT_TIMEOUT):
        await rogue.snapshot_done.wait()
    await rogue.send_raw(GARBAGE)
    async with asyncio.timeout(EVENT_TIMEOUT):
        await rogue.closed.wait()
    await agent.wait_event("ztunnel_disconnected", reason="unexpected_message", since=mark)

    # The enrolled pod and the real ztunnel are untouched; a new pod still gets in.
    assert not zt.closed.is_set()
    assert requests_for(zt, pod) == before
    await caught(cluster, zt, pod, server)
    newcomer = await cluster.new_pod("web-1")
    outcome = await cluster.runtime.add(newcomer)
    assert outcome.rc == 0, outcome.stdout + outcome.stderr
    assert agent.find("cni_add_crashed") == []
    assert zt.violations == []
