"""The agent as a process repairs drift on the kernel's notification, not on its periodic pass:
the pass is set far beyond every wait here (`BACKSTOP`), and each test asserts that none ran.

Fixtures and helpers are those of tests/test_agent.py (same node, agent and fake ztunnel).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import pytest

from tests.agentrig import (
    PREFIX,
    WAIT,
    Agents,
    Ztunnels,
    enroll,
    rules_drift,
)
from ztunnel_redirect.app.agent import FD_LIMIT_WANTED
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.kernel import nft
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.agentprocess import AgentProcess, host_set_elements, metric
from ztunnel_redirect.testing.node import NodePod, TestNode

pytestmark = pytest.mark.kernel

BACKSTOP = "3600"
"""--reconcile-period: no pass comes during a test."""
OUR_RULE = ("fwmark", f"{c.CONNMARK:#x}/{c.CONNMARK_MASK:#x}", "lookup", str(c.ROUTE_TABLE))


async def watching(agents: Agents, ztunnels: Ztunnels, *pods: NodePod) -> AgentProcess:
    """An agent with the backstop pass out of reach, logging its debug events, with `pods`
    enrolled and their netns (and the host's) watched."""
    agent = await agents.start("--reconcile-period", BACKSTOP, "--log-level", "debug")
    await ztunnels.connect()
    await enroll(agents.node, *pods)
    for key in ("host", *(pod.uid for pod in pods)):
        await watched(agent, key)
    return agent


async def watched(agent: AgentProcess, key: str) -> None:
    """Until `key`'s netns is watched and the check that follows the opening has run (the
    host's is opened before its check at start): a change made later is seen by the watch
    alone."""
    opened = await agent.wait_event("netns_watch_opened", key=key, timeout=WAIT)
    if key != "host":
        since = agent.events.index(opened)
        await agent.wait_event("work_done", key=key, since=since, timeout=WAIT)


def no_pass_ran(agent: AgentProcess) -> None:
    assert agent.find("drift_pass_done") == [], "a periodic pass ran: the test proves nothing"


async def test_a_flushed_pod_table_is_repaired_on_notification(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    agent = await watching(agents, ztunnels, a, b)
    mark = agent.mark

    a.lab.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)

    repaired = await agent.wait_event("drift_repaired", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert repaired["reason"] == "missing_rule"
    assert agent.find("netns_changed", key=a.uid, source="nft", since=mark) != []
    assert await rules_drift(netns_runner, a) == []
    assert agent.find("drift_repaired", pod_uid=b.uid) == []
    no_pass_ran(agent)


async def test_our_deleted_ip_rule_is_repaired_on_notification(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    agent = await watching(agents, ztunnels, a, b)
    mark = agent.mark

    a.lab.netns.ip("rule", "del", *OUR_RULE, "priority", str(c.RULE_PRIORITY))

    repaired = await agent.wait_event("drift_repaired", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert repaired["reason"] == "missing_ip_rule"
    assert agent.find("netns_changed", key=a.uid, source="route", since=mark) != []
    assert await rules_drift(netns_runner, a) == []
    no_pass_ran(agent)


async def test_a_flushed_host_chain_is_repaired_on_notification(
    node: TestNode, pods: tuple[NodePod, NodePod], agents: Agents, ztunnels: Ztunnels
) -> None:
    a, b = pods
    agent = await watching(agents, ztunnels, a, b)
    mark = agent.mark

    node.lab.node.exec("nft", "flush", "chain", "inet", c.HOST_TABLE, "postrouting")

    repaired = await agent.wait_event("host_drift_repaired", since=mark, timeout=WAIT)
    assert any("postrouting" in line for line in repaired["detail"])
    host = node.lab.node.exec("nft", "list", "table", "inet", c.HOST_TABLE)
    assert f"snat ip to {c.PROBE_SNAT_V4}" in host
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    no_pass_ran(agent)


async def test_own_repairs_cause_no_rewrite(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    """After a repair settles, the agent commits nothing more: its own commit is not taken for
    a change, a foreign change to another table is not ours, and a check that a harmless
    change of our routing table brings writes nothing (the generation does not move)."""
    a, b = pods
    agent = await watching(agents, ztunnels, a, b)
    a.lab.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
    await agent.wait_event("drift_repaired", pod_uid=a.uid, timeout=WAIT)
    repairs = metric(await agent.metrics(), f"{PREFIX}_drift_repairs_total")

    a.lab.netns.nft("table inet someone-else {\n}\n")  # not ours: no check
    settled = await netns_runner.run(a.path, nft.generation)
    mark = agent.mark
    # Ours, and harmless: a route our check does not own. The check it brings is the last.
    a.lab.netns.ip("route", "add", "10.78.0.1", "dev", "lo", "table", str(c.ROUTE_TABLE))
    await agent.wait_event("netns_changed", key=a.uid, source="route", since=mark, timeout=WAIT)
    await agent.wait_event("work_done", key=a.uid, since=mark, timeout=WAIT)

    assert await netns_runner.run(a.path, nft.generation) == settled, "the agent wrote again"
    assert agent.find("netns_changed", key=a.uid, source="nft", since=mark) == []
    assert metric(await agent.metrics(), f"{PREFIX}_drift_repairs_total") == repairs
    assert len(agent.find("drift_repaired")) == 1
    assert await rules_drift(netns_runner, a) == []
    no_pass_ran(agent)


async def test_a_vanished_netns_closes_its_sockets(
    node: TestNode, pods: tuple[NodePod, NodePod], agents: Agents, ztunnels: Ztunnels
) -> None:
    """The sockets hold their netns alive: they go as soon as the agent sees the netns gone
    (here by its pass, every `PERIOD`; on a node, by the pod's deletion or new sandbox)."""
    a, b = pods
    agent = await agents.start("--log-level", "debug")
    await ztunnels.connect()
    await enroll(node, a, b)
    for pod in (a, b):
        await watched(agent, pod.uid)
    before = open_fds(agent)
    mark = agent.mark

    node.lab.delete(a.lab.netns)

    await agent.wait_event("netns_vanished", pod_uid=a.uid, since=mark, timeout=WAIT)
    closed = await agent.wait_event("netns_watch_closed", key=a.uid, since=mark, timeout=WAIT)
    assert closed["sockets"] == 2
    # Two sockets of the agent are closed (others may open meanwhile: an API connection).
    gone = before - open_fds(agent)
    assert len([target for _fd, target in gone if target.startswith("socket:")]) >= 2, gone
    assert agent.find("netns_watch_closed", key=b.uid) == []


def open_fds(agent: AgentProcess) -> set[tuple[str, str]]:
    """(fd, what it links to) of each open fd of the agent: a socket is `socket:[inode]`."""
    fds = Path(f"/proc/{agent.pid}/fd")
    out = set()
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            out.add((fd.name, str(fd.readlink())))
    return out


def soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


async def test_the_agent_raises_its_fd_limit_for_the_sockets_and_says_so(agents: Agents) -> None:
    """Started with the usual soft limit of 1024 (what a container runtime often gives), the agent
    raises it to room for `PODS_PLANNED` pods' sockets, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= FD_LIMIT_WANTED, "the hard limit here is too low to show the raise"
    agent = agents.create()
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        await agent.start()  # inherits the soft limit of 1024
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    said = await agent.wait_event("fd_limit", timeout=WAIT)
    assert (said["was"], said["soft"], said["hard"]) == (1024, FD_LIMIT_WANTED, hard)
    assert soft_fd_limit(agent.pid) == FD_LIMIT_WANTED
