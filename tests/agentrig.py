"""The rig of the agent-process tests (tests/test_agent.py, tests/test_agent_lifecycle.py): the
fake API server, a node of network namespaces, the agent processes, the ztunnel stand-ins, and
what the agent did seen from outside. Fixtures are imported by name where they are used."""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.podrules import PodRules
from ztunnel_redirect.testing.agentprocess import (
    AgentProcess,
    Event,
    connect_ztunnel,
    host_set_elements,
    standin_of,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import Netns
from ztunnel_redirect.testing.node import NODE_NAME, NodePod, TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin
from ztunnel_redirect.testing.traffic import App, request

NS = "demo"
PERIOD = 1.0
"""--reconcile-period of the agent under test: drift is repaired within one period."""
WAIT = 15.0
"""Bound on waiting for one change to take effect (normally well under a second)."""
CNI_DATA = Path(__file__).parent / "data" / "cni"
APP_PORT = 8080
OPTIONS = PodOptions(ipv6=False, dns_capture=True)
"""The pod options the agent uses with TestNode's flags (IPv4 only, DNS capture by default)."""
POD_TABLES = {f"inet {t}" for t in c.POD_TABLES}
PREFIX = "ztunnel_redirect"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server:
        yield server


@pytest.fixture
def node(api: ApiServer, request: pytest.FixtureRequest) -> Iterator[TestNode]:
    """IPv4 only; dual-stack where a test parametrizes it indirectly with True."""
    with TestNode(api, ipv6=getattr(request, "param", False)) as the_node:
        yield the_node


@pytest.fixture
async def pods(node: TestNode) -> tuple[NodePod, NodePod]:
    """Two running pods in namespace `demo` (not enrolled yet)."""
    return node.add_pod("a", NS), node.add_pod("b", NS)


class Agents:
    """Starts agents against the node; stops every one at teardown and prints their log tails."""

    def __init__(self, node: TestNode, log_dir: Path) -> None:
        self.node = node
        self.log_dir = log_dir
        self.started: list[AgentProcess] = []

    def create(self, *extra: str) -> AgentProcess:
        agent = AgentProcess.for_node(
            self.node,
            "--reconcile-period",
            str(PERIOD),
            *extra,
            log_path=self.log_dir / f"agent-{len(self.started)}.log",
        )
        self.started.append(agent)
        return agent

    async def start(self, *extra: str) -> AgentProcess:
        agent = self.create(*extra)
        await agent.start()
        return agent

    async def close(self) -> None:
        for agent in self.started:
            await agent.stop()
            print(f"agent log {agent.log_path} (rc {agent.returncode})")
            print(agent.tail())


@pytest.fixture
async def agents(node: TestNode, tmp_path: Path) -> AsyncIterator[Agents]:
    the_agents = Agents(node, tmp_path)
    try:
        yield the_agents
    finally:
        await the_agents.close()


@pytest.fixture
async def agent(agents: Agents, pods: tuple[NodePod, NodePod]) -> AgentProcess:
    """A ready agent, with the two pods running (not enrolled)."""
    return await agents.start()


class Ztunnels:
    def __init__(self, node: TestNode) -> None:
        self.node = node
        self.connected: list[FakeZtunnel] = []

    async def connect(self, *, serve: bool = True) -> FakeZtunnel:
        fake = await connect_ztunnel(
            self.node.ztunnel_socket, serve=serve, ipv6=self.node.ipv6, timeout=WAIT
        )
        self.connected.append(fake)
        return fake

    async def close(self) -> None:
        for fake in self.connected:
            await fake.close()
        violations = [v for fake in self.connected for v in fake.violations]
        assert violations == [], violations


@pytest.fixture
async def ztunnels(node: TestNode) -> AsyncIterator[Ztunnels]:
    the_ztunnels = Ztunnels(node)
    try:
        yield the_ztunnels
    finally:
        await the_ztunnels.close()


@pytest.fixture
async def ztunnel(agent: AgentProcess, ztunnels: Ztunnels) -> FakeZtunnel:
    """A fake ztunnel with stand-ins, connected to the ready agent."""
    return await ztunnels.connect()


@pytest.fixture
async def netns_runner() -> AsyncIterator[NetnsRunner]:
    with NetnsRunner(workers=2) as the_runner:
        yield the_runner


# --- helpers --------------------------------------------------------------------------------------


async def annotated(api: ApiServer, pod: NodePod, value: str | None) -> None:
    await api.wait_for_annotation(pod.namespace, pod.name, c.STATUS_ANNOTATION, value, timeout=WAIT)


async def enroll(node: TestNode, *enrolled: NodePod) -> None:
    node.enroll_namespace(NS)
    for pod in enrolled:
        await annotated(node.api, pod, "enabled")


async def enroll_then_stop(
    node: TestNode, agents: Agents, ztunnels: Ztunnels, *pods: NodePod, flags: tuple[str, ...] = ()
) -> None:
    """An agent enrolls the pods with a ztunnel connected, then stops on SIGTERM (exit 0)."""
    agent = await agents.start(*flags)
    await ztunnels.connect()
    await enroll(node, *pods)
    assert await agent.stop() == 0


async def rules_drift(
    runner: NetnsRunner, pod: NodePod, options: PodOptions = OPTIONS
) -> list[str]:
    return [str(d) for d in await PodRules(runner).check(pod.path, options)]


async def wait_request(fake: FakeZtunnel, kind: RequestKind, uid: str) -> None:
    async with asyncio.timeout(WAIT):
        await fake.wait_request(kind, uid)


async def wait_hop(standin: Standin, kind: HopKind, **expect: object) -> Hop:
    def matches(hop: Hop) -> bool:
        return hop.kind is kind and all(getattr(hop, k) == v for k, v in expect.items())

    return await asyncio.to_thread(standin.wait_for, matches, timeout=5.0)


async def assert_redirected(
    fake: FakeZtunnel, client: NodePod, server: NodePod, *, ipv6: bool = False
) -> None:
    """Traffic from `client` to an app in `server` (over IPv6 with `ipv6`) goes through both
    stand-ins and the app sees the client's own address."""
    source, target_ip = (
        (client.lab.ipv6, server.lab.ipv6) if ipv6 else (client.ips[0], server.ips[0])
    )
    assert source is not None and target_ip is not None
    with App(server.path, APP_PORT, name=server.name, ipv6=ipv6) as app:
        reply = await asyncio.to_thread(request, client.path, target_ip, APP_PORT)
        assert reply == f"app {server.name} saw {source}\n".encode()
        target = (target_ip, APP_PORT)
        outbound = await wait_hop(standin_of(fake, client), HopKind.OUTBOUND, original_dst=target)
        assert outbound.client[0] == source
        inbound = await wait_hop(standin_of(fake, server), HopKind.INBOUND, original_dst=target)
        assert inbound.client[0] == source
        assert app.peers and app.peers[-1][0] == source


async def assert_removed(
    node: TestNode, fake: FakeZtunnel, runner: NetnsRunner, pod: NodePod
) -> None:
    await annotated(node.api, pod, None)
    await wait_request(fake, RequestKind.DEL, pod.uid)
    assert tables(pod.lab.netns) & POD_TABLES == set()
    assert pod.ips[0] not in host_set_elements(node)
    assert await rules_drift(runner, pod) != []


# --- kernel views -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelView:
    """What the kernel holds in one netns that the agent may have written."""

    ruleset: str
    """`nft -a list ruleset`: with handles and counters."""
    rules: str
    routes: str
    """IPv4 routes of every table, IPv6 routes of our table."""


def kernel_view(ns: Netns) -> KernelView:
    return KernelView(
        ruleset=ns.exec("nft", "-a", "list", "ruleset"),
        rules=ns.ip("rule", "show"),
        routes=ns.ip("-4", "route", "show", "table", "all") + _v6_table(ns),
    )


def _v6_table(ns: Netns) -> str:
    # Only our table: the kernel adds IPv6 link-local and multicast routes on its own, late.
    try:
        return ns.ip("-6", "route", "show", "table", str(c.ROUTE_TABLE))
    except RuntimeError:  # no such table
        return ""


def tables(ns: Netns) -> set[str]:
    """Names of the nftables tables in a netns (`inet istio-ambient-nat`, ...)."""
    out = ns.exec("nft", "list", "tables")
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.strip()}


async def assert_repaired_by_the_next_pass(
    agent: AgentProcess, repaired: Event, *, since: int
) -> None:
    """`repaired`, the agent's report of a repair of a change made after event index `since`,
    came before the second drift pass from `since` on ended: the pass running at the change may
    have looked before it, the next one repairs it (an order of events, not a duration; the bench
    measures the latency)."""
    await agent.wait_count("drift_pass_done", 2, since=since, timeout=WAIT)
    second = agent.find("drift_pass_done", since=since)[1]
    assert agent.events.index(repaired) < agent.events.index(second), "not repaired by that pass"


def ghost_pod(node: TestNode, name: str) -> str:
    """A running pod of this node in the API whose sandbox is nowhere (its netns is never
    found: it fails for ever); returns its UID."""
    created = node.api.create_pod(
        {
            "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.99.0.9",
                "podIPs": [{"ip": "10.99.0.9"}],
            },
        }
    )
    return str(created["metadata"]["uid"])


def view_diff(before: Mapping[str, KernelView], after: Mapping[str, KernelView]) -> str:
    """A unified diff of two sets of kernel views ("" when they are equal)."""
    out: list[str] = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        for part in ("ruleset", "rules", "routes"):
            a = getattr(old, part, "").splitlines()
            b = getattr(new, part, "").splitlines()
            out.extend(difflib.unified_diff(a, b, f"{name} {part} before", "after", lineterm=""))
    return "\n".join(out)
