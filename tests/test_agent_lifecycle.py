"""The agent as a process, over a pod's life beyond add and remove: its netns vanishes while the
pod object stays, the pid through which the /proc scan found it is reused, Istio's iptables
rules are left in a pod that leaves the mesh.

Fixtures and helpers are those of tests/test_agent.py (same node, agent and fake ztunnel).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.agentrig import (
    NS,
    OPTIONS,
    POD_TABLES,
    WAIT,
    Agents,
    annotated,
    enroll,
    rules_drift,
    tables,
    wait_request,
)
from tests.istio import all_saves, install_istio_pod, need
from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.kernel.migration import Flavour
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.podrules import PodRules
from ztunnel_redirect.testing.agentprocess import AgentProcess, host_set_elements, status_annotation
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.node import NodePod, TestNode

pytestmark = pytest.mark.kernel


def pause_process(node: TestNode, pod: NodePod) -> Path:
    """The pod's process in the node's fake /proc (the one the agent's scan finds)."""
    wanted = pod.uid.replace("-", "_")
    for base in sorted(node.proc.iterdir()):
        cgroup = base / "cgroup"
        if not base.is_symlink() and cgroup.is_file() and wanted in cgroup.read_text():
            return base
    raise AssertionError(f"no process of pod {pod.name} in {node.proc}")


def repoint(process: Path, netns_path: str) -> None:
    """The process's pid now names a process in another netns (it exited, the pid was reused)."""
    link = process / "ns" / "net"
    link.unlink()
    link.symlink_to(netns_path)


async def adds_of(fake: FakeZtunnel, uid: str, count: int) -> None:
    def enough(seen: object) -> bool:
        return sum(r.kind is RequestKind.ADD and r.uid == uid for r in fake.requests) >= count

    async with asyncio.timeout(WAIT):
        await fake.wait_for(enough)


async def passes(agent: AgentProcess, count: int) -> None:
    """Until `count` more periodic passes ended (slow ones too: a pod looking for its netns keeps
    the queue busy)."""
    since = agent.mark

    def ended() -> int:
        return sum(len(agent.find(e, since=since)) for e in ("drift_pass_done", "drift_pass_slow"))

    await agent.wait_until(lambda: ended() >= count, what=f"{count} passes", timeout=WAIT)


async def test_a_vanished_netns_is_cleaned_up_and_a_new_sandbox_enrolled(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    process = pause_process(node, a)
    mark = agent.mark

    node.lab.delete(a.lab.netns)  # the sandbox is gone; the pod object stays

    vanished = await agent.wait_event("netns_vanished", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert vanished["netns"] == str(process / "ns" / "net")
    assert vanished["pod"] == f"{NS}/{a.name}"
    await wait_request(ztunnel, RequestKind.DEL, a.uid)
    assert host_set_elements(node) == {b.ips[0]: b.uid}
    # Every other pod is served as before.
    assert status_annotation(node.api, b) == "enabled"
    assert await rules_drift(netns_runner, b) == []

    # A new sandbox of the same pod: a new netns and IP, reported by the kubelet.
    sandbox = node.lab.add_pod("a-again")
    repoint(process, sandbox.path)
    node.api.patch_pod(
        NS, a.name, {"status": {"podIP": sandbox.ipv4, "podIPs": [{"ip": sandbox.ipv4}]}}
    )

    await adds_of(ztunnel, a.uid, 2)
    await agent.wait_event("ztunnel_accepted_pod", pod_uid=a.uid, since=mark, timeout=WAIT)
    # Then its host element (no event of its own; re-checked on every line the agent logs).
    await agent.wait_until(
        lambda: host_set_elements(node).get(sandbox.ipv4) == a.uid,
        what="the new sandbox's IP in the host set",
        timeout=WAIT,
    )
    assert [str(d) for d in await PodRules(netns_runner).check(sandbox.path, OPTIONS)] == []
    assert host_set_elements(node) == {b.ips[0]: b.uid, sandbox.ipv4: a.uid}
    await annotated(node.api, a, "enabled")  # written behind the run
    assert agent.find("work_failed", key=b.uid) == []


async def test_a_reused_pid_never_sends_pod_rules_into_another_netns(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    mark = agent.mark

    # Pod a's process exits and a host process gets its pid.
    repoint(pause_process(node, a), node.lab.node.path)

    vanished = await agent.wait_event("netns_vanished", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert vanished["reason"] == "replaced"
    await wait_request(ztunnel, RequestKind.DEL, a.uid)
    assert host_set_elements(node) == {b.ips[0]: b.uid}
    # From then on the path is never written to, and the host rules are not fought over (the
    # identity is checked on the netns the worker opened, before it enters it).
    await passes(agent, 1)
    settled = agent.mark
    await passes(agent, 3)
    for event in ("drift_repaired", "pod_rules_applied", "host_drift_repaired"):
        assert agent.find(event, since=settled) == [], event
    host = node.lab.node.exec("nft", "list", "table", "inet", c.HOST_TABLE)
    assert "redirect" not in host
    assert f"snat ip to {c.PROBE_SNAT_V4}" in host
    assert host_set_elements(node) == {b.ips[0]: b.uid}


async def test_a_pod_leaving_the_mesh_loses_istios_iptables_rules(
    node: TestNode,
    agents: Agents,
    netns_runner: NetnsRunner,
) -> None:
    need(Flavour.NFT)
    # Istio's iptables backend had enrolled the pod; its namespace is not ambient any more.
    a = node.add_pod("a", NS, annotations={c.STATUS_ANNOTATION: "enabled"})
    install_istio_pod(a.lab, Flavour.NFT)
    assert "ISTIO_OUTPUT" in all_saves(a.path)

    agent = await agents.start()

    await annotated(node.api, a, None)
    await agent.wait_event("pod_removed", pod_uid=a.uid, timeout=WAIT)
    assert "ISTIO_" not in all_saves(a.path)
    assert tables(a.lab.netns) & POD_TABLES == set()
    assert await rules_drift(netns_runner, a) != []
    assert agent.find("istio_migration_failed") == []
