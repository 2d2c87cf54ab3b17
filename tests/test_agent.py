"""The node agent as a process: fake API server in-process, pods as real network namespaces, a
fake ztunnel (real ZDS client) with stand-ins serving real traffic.

Every wait is on a condition (a log event, the API server's state, a ZDS request) under a bounded
timeout; the agent is always stopped and every namespace removed, also on failure (the log tail is
printed at teardown, so pytest shows it with a failing test).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agentrig import (
    APP_PORT,
    CNI_DATA,
    NS,
    PERIOD,
    POD_TABLES,
    PREFIX,
    WAIT,
    Agents,
    Ztunnels,
    annotated,
    assert_redirected,
    assert_removed,
    assert_repaired_by_the_next_pass,
    enroll,
    enroll_then_stop,
    ghost_pod,
    kernel_view,
    rules_drift,
    tables,
    view_diff,
    wait_request,
)
from tests.istio import all_saves, install_istio_host, install_istio_pod, need, sh
from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.model import PodOptions, PodUid
from ztunnel_redirect.kernel.migration import Flavour
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.agentprocess import (
    PLUGIN_NAME,
    AgentProcess,
    built_plugin,
    host_set_elements,
    metric,
    status_annotation,
)
from ztunnel_redirect.testing.fakeztunnel import Behaviour, FakeZtunnel
from ztunnel_redirect.testing.node import KUBELET_UID, NodePod, TestNode
from ztunnel_redirect.testing.traffic import App, request

pytestmark = pytest.mark.kernel

# --- tests ----------------------------------------------------------------------------------------


async def test_labelling_namespace_enrolls_running_pods(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    assert status_annotation(node.api, a) is None
    assert host_set_elements(node) == {}

    await enroll(node, a, b)

    for pod in (a, b):
        assert await rules_drift(netns_runner, pod) == []
        assert tables(pod.lab.netns) == POD_TABLES
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    adds = [r for r in ztunnel.requests if r.kind is RequestKind.ADD]
    assert {r.uid for r in adds} == {a.uid, b.uid}
    assert all(r.fds == 1 and r.namespace == NS for r in adds)
    await assert_redirected(ztunnel, a, b)
    assert agent.find("work_failed") == []


async def test_pod_opting_out_is_removed(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)

    node.api.set_pod_labels(NS, a.name, {c.ENROLL_LABEL: c.OPT_OUT_VALUE})

    await assert_removed(node, ztunnel, netns_runner, a)
    assert PodUid(a.uid) not in ztunnel.workloads
    assert status_annotation(node.api, b) == "enabled"
    assert await rules_drift(netns_runner, b) == []
    assert host_set_elements(node) == {b.ips[0]: b.uid}


async def test_unlabelling_namespace_removes_all(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)

    node.api.set_namespace_labels(NS, {c.ENROLL_LABEL: None})

    for pod in (a, b):
        await assert_removed(node, ztunnel, netns_runner, pod)
    assert host_set_elements(node) == {}
    assert ztunnel.workloads == {}
    assert metric(await agent.metrics(), f"{PREFIX}_pods_enrolled") == 0


CUSTOM_SELECTORS = """\
- namespaceSelector:
    matchLabels: {team: web}
  podSelector:
    matchExpressions:
    - {key: legacy, operator: DoesNotExist}
"""


async def test_custom_enablement_selectors_decide_on_other_labels(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    """AMBIENT_ENABLEMENT_SELECTOR reaches the agent's policy, and a relabel of the namespace or a
    pod on labels other than istio.io/dataplane-mode enrolls or removes running pods."""
    a, b = pods
    agent = await agents.start("--enablement-selectors", CUSTOM_SELECTORS)
    ztunnel = await ztunnels.connect()
    # The test node runs without CNI install (installed by someone else): not reported missing.
    assert metric(await agent.metrics(), "istio_cni_install_ready") == 1

    node.api.set_namespace_labels(NS, {"team": "web"})
    for pod in (a, b):
        await annotated(node.api, pod, "enabled")
        assert await rules_drift(netns_runner, pod) == []

    node.api.set_pod_labels(NS, a.name, {"legacy": "yes"})
    await assert_removed(node, ztunnel, netns_runner, a)
    assert status_annotation(node.api, b) == "enabled"

    node.api.set_namespace_labels(NS, {"team": "db"})
    await assert_removed(node, ztunnel, netns_runner, b)
    assert ztunnel.workloads == {}


async def test_deleting_pod_cleans_host_set_and_sends_del(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
) -> None:
    a, b = pods
    await enroll(node, a, b)

    # The runtime tears the sandbox down, then the pod object goes.
    node.lab.delete(a.lab.netns)
    node.api.delete_pod(NS, a.name)

    await wait_request(ztunnel, RequestKind.DEL, a.uid)
    await agent.wait_event("pod_removed", pod_uid=a.uid, timeout=WAIT)
    assert host_set_elements(node) == {b.ips[0]: b.uid}
    assert PodUid(a.uid) not in ztunnel.workloads
    assert metric(await agent.metrics(), f"{PREFIX}_pods_enrolled") == 1


async def test_a_nack_in_a_snapshot_is_counted_and_leaves_the_pod_enabled(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    ztunnels: Ztunnels,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    probes = host_set_elements(node)

    # A new ztunnel (a rolling restart) refuses `a` in its snapshot: as in Istio, ztunnel retries
    # it itself, and istiod keeps reading `enabled` as captured.
    newer = await ztunnels.connect(  # no stand-ins: the first ztunnel's still serve the pods
        serve=False, behaviour=Behaviour(nack_uids=frozenset({a.uid}))
    )
    nacked = await agent.wait_event("snapshot_workload_nacked", pod_uid=a.uid, timeout=WAIT)
    mark = agent.events.index(nacked)
    await agent.wait_event("drift_pass_done", since=mark, timeout=3 * PERIOD + 1)

    assert metric(await agent.metrics(), f"{PREFIX}_ztunnel_snapshot_nacks_total") == 1
    assert host_set_elements(node) == probes
    assert status_annotation(node.api, a) == "enabled"
    assert [r.kind for r in newer.requests if r.uid == a.uid] == [RequestKind.ADD]  # no retry
    assert agent.find("pod_status_set", since=mark, status="pending") == []


async def test_a_del_ztunnel_refuses_is_retried_until_acked(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    ztunnel.behaviour = Behaviour(nack_uids=frozenset({a.uid}))

    node.api.delete_pod(NS, a.name)
    await agent.wait_event("work_failed", key=a.uid, reason="ZtunnelNackError", timeout=WAIT)
    assert agent.find("pod_removed", pod_uid=a.uid) == []
    ztunnel.behaviour = Behaviour()

    await agent.wait_event("pod_removed", pod_uid=a.uid, timeout=WAIT)
    dels = [r.answer for r in ztunnel.requests if r.kind is RequestKind.DEL and r.uid == a.uid]
    assert dels[0] != "" and dels[-1] == ""
    assert PodUid(a.uid) not in ztunnel.workloads
    assert host_set_elements(node) == {b.ips[0]: b.uid}


async def test_drift_is_repaired_by_a_pass(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    before = metric(await agent.metrics(), f"{PREFIX}_drift_repairs_total")
    mark = len(agent.events)

    # The agent may repair before the test could read the drift back, so the proof that it saw
    # the flush is its own report of what was missing.
    a.lab.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
    repaired = await agent.wait_event("drift_repaired", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert repaired["reason"] == "missing_rule"
    assert any(c.NAT_TABLE in line for line in repaired["detail"])
    await assert_repaired_by_the_next_pass(agent, repaired, since=mark)
    assert await rules_drift(netns_runner, a) == []

    mark = len(agent.events)
    node.lab.node.exec("nft", "flush", "chain", "inet", c.HOST_TABLE, "postrouting")
    repaired = await agent.wait_event("host_drift_repaired", since=mark, timeout=WAIT)
    assert any("postrouting" in line for line in repaired["detail"])
    await assert_repaired_by_the_next_pass(agent, repaired, since=mark)
    host = node.lab.node.exec("nft", "list", "table", "inet", c.HOST_TABLE)
    assert f"snat ip to {c.PROBE_SNAT_V4}" in host
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}

    after = metric(await agent.metrics(), f"{PREFIX}_drift_repairs_total")
    assert after >= before + 2
    await assert_redirected(ztunnel, a, b)


async def test_a_failing_pod_holds_up_neither_the_pass_nor_another_pods_repair(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    ghost = ghost_pod(node, "ghost")  # netns not found: retried with a growing backoff
    await agent.wait_event("work_failed", key=ghost, reason="NetnsPendingError", timeout=WAIT)
    mark = len(agent.events)

    a.lab.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
    flushed_at = time.time()  # a successful pass below must come after it

    repaired = await agent.wait_event("drift_repaired", pod_uid=a.uid, since=mark, timeout=WAIT)
    assert any(c.NAT_TABLE in line for line in repaired["detail"])
    await assert_repaired_by_the_next_pass(agent, repaired, since=mark)
    assert await rules_drift(netns_runner, a) == []
    # Every pass ends in time and says what failed; none waits out the ghost's backoff.
    await agent.wait_count("drift_pass_done", 2, since=mark, timeout=WAIT)
    assert agent.find("drift_pass_slow") == []
    passes = agent.find("drift_pass_done", since=mark)
    assert [p["failed"] for p in passes] == [1] * len(passes)
    samples = await agent.metrics()
    assert metric(samples, f"{PREFIX}_last_successful_pass_timestamp_seconds") > flushed_at
    assert metric(samples, f"{PREFIX}_failures_total", reason="retryable") >= 1


async def test_watch_drops_and_expiry_lose_no_event(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    restarts = f"{PREFIX}_api_watch_restarts_total"
    before = await agent.metrics()

    # A change made while the streams are down: the watch resumes from its version.
    assert node.api.drop_watches() >= 2
    node.api.set_pod_labels(NS, a.name, {c.ENROLL_LABEL: c.OPT_OUT_VALUE})
    await assert_removed(node, ztunnel, netns_runner, a)

    # The streams drop, a change is made and the history is compacted before the agent is back:
    # resuming gets 410 Gone, the agent lists again and must still see the change.
    await node.api.wait_for(lambda: node.api.open_watches >= 2, timeout=WAIT)
    assert node.api.drop_watches() >= 2
    node.api.set_pod_labels(NS, a.name, {c.ENROLL_LABEL: None})
    node.api.compact()
    await annotated(node.api, a, "enabled")
    assert await rules_drift(netns_runner, a) == []

    after = await agent.metrics()
    assert metric(after, restarts) >= metric(before, restarts) + 4
    assert metric(after, restarts, reason="expired") > metric(before, restarts, reason="expired")


async def test_restart_on_healthy_node_changes_nothing_in_the_kernel(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
) -> None:
    a, b = pods
    first = await agents.start()
    fake = await ztunnels.connect()
    await enroll(node, a, b)
    namespaces = {"node": node.lab.node, a.name: a.lab.netns, b.name: b.lab.netns}
    before = {name: kernel_view(ns) for name, ns in namespaces.items()}
    assert all(c.NAT_TABLE in view.ruleset for view in before.values())
    assert "lookup 100" in before[a.name].rules
    assert "local default dev lo" in before[a.name].routes

    assert await first.stop() == 0
    assert view_diff(before, {name: kernel_view(ns) for name, ns in namespaces.items()}) == ""
    await fake.close()  # this ztunnel's stand-ins go; the new agent's snapshot brings them back

    second = await agents.start("--log-level", "debug")
    fake = await ztunnels.connect()
    adds = {r.uid: r for r in fake.requests if r.kind is RequestKind.ADD}
    assert set(adds) == {a.uid, b.uid}
    assert all(r.fds == 1 for r in adds.values())
    await second.wait_event("drift_pass_done", timeout=3 * PERIOD + 1)

    assert view_diff(before, {name: kernel_view(ns) for name, ns in namespaces.items()}) == ""
    assert second.find("pods_adopted", pods=2, netns_found=2)
    for written in ("pod_rules_applied", "drift_repaired", "host_drift_repaired", "work_failed"):
        assert second.find(written) == [], written
    assert second.find("pod_status_set") == []
    assert status_annotation(node.api, a) == status_annotation(node.api, b) == "enabled"
    await assert_redirected(fake, a, b)


async def test_sigterm_leaves_every_rule_in_place(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    await enroll(node, a, b)
    elements = host_set_elements(node)
    assert len(elements) == 2

    assert await agent.stop() == 0

    assert agent.find("agent_stopping", reason="signal")
    for pod in (a, b):
        assert await rules_drift(netns_runner, pod) == []
        assert status_annotation(node.api, pod) == "enabled"
    assert host_set_elements(node) == elements
    assert ztunnel.requests[-1].kind is not RequestKind.DEL
    await asyncio.wait_for(ztunnel.closed.wait(), WAIT)


async def test_readiness_waits_for_initial_lists(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
) -> None:
    a, b = pods
    fault = node.api.fail_next(1_000_000, status=500, path="/pods", watch=False)
    agent = agents.create()
    await agent.start(ready=False)
    await agent.wait_event("watch_failed", resource="pods", timeout=WAIT)

    status, body = await agent.readyz()
    assert status == 503
    assert "initial_lists" in body.split()
    assert await agent.healthz() == (200, "ok\n")
    assert not agent.find("zds_server_listening")  # nothing starts before the lists

    fault.count = 0  # the API server recovers
    ready = await agent.wait_ready()
    assert ready["pods_enrolled"] == 0
    assert len(agent.find("agent_ready")) == 1
    assert await agent.readyz() == (200, "ready\n")

    await ztunnels.connect()
    await enroll(node, a, b)
    samples = await agent.metrics()
    assert metric(samples, f"{PREFIX}_pods_enrolled") == 2
    assert metric(samples, f"{PREFIX}_api_watch_restarts_total", resource="pods") >= 1


@pytest.mark.parametrize(
    ("lose", "reason"),
    [(("delete", "table"), "missing_table"), (("flush", "table"), "missing_rule")],
    ids=["table-deleted", "table-flushed"],
)
async def test_restart_repairs_rules_lost_while_down(  # noqa: PLR0917 - fixtures and parameters
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
    lose: tuple[str, str],
    reason: str,
) -> None:
    a, b = pods
    await enroll_then_stop(node, agents, ztunnels, a, b)
    a.lab.netns.exec("nft", *lose, "inet", c.NAT_TABLE)  # e.g. a reboot, a flush
    second = await agents.start()

    repaired = second.find("drift_repaired", pod_uid=a.uid)
    assert repaired, "the start-up pass did not repair the pod's rules before ready"
    assert second.events.index(repaired[0]) < second.events.index(second.find("agent_ready")[0])
    assert repaired[0]["reason"] == reason
    assert second.find("drift_repaired", pod_uid=b.uid) == []
    assert await rules_drift(netns_runner, a) == []
    samples = await second.metrics()
    assert metric(samples, f"{PREFIX}_drift_repairs_total", reason=reason) >= 1


MANY = 300


@pytest.mark.timeout(240)
async def test_300_pods_enroll_without_failure(
    node: TestNode, agents: Agents, ztunnels: Ztunnels, netns_runner: NetnsRunner
) -> None:
    started = time.monotonic()
    many = [node.add_pod(f"p{i}", NS) for i in range(MANY)]
    created_s = time.monotonic() - started
    # Debug level for the drift pass's own event (its per-pod lines are part of the cost).
    agent = await agents.start("--log-level", "debug")
    fake = await ztunnels.connect(serve=False)

    labelled = time.monotonic()
    node.enroll_namespace(NS)
    await agent.wait_count("pod_status_set", MANY, status="enabled", timeout=90)
    enroll_s = time.monotonic() - labelled

    # The annotations are written behind the runs (control/statuswrites.py).
    await node.api.wait_for(
        lambda: all(
            (p["metadata"].get("annotations") or {}).get(c.STATUS_ANNOTATION) == "enabled"
            for p in node.api.pods()
        ),
        timeout=30,
    )
    assert len(host_set_elements(node)) == MANY
    assert len({r.uid for r in fake.requests if r.kind is RequestKind.ADD}) == MANY
    assert agent.find("work_failed") == []
    # Each /proc scan reads every process: they must not grow with the pods (one per pod would
    # make enrolling a namespace O(pods x processes)).
    scans = len(agent.find("proc_scanned"))
    assert scans <= MANY // 10, f"{scans} /proc scans for {MANY} pods"
    for pod in (many[0], many[-1]):
        assert await rules_drift(netns_runner, pod) == []

    # Drift passes over 300 pods with nothing to repair: CPU and memory of the agent.
    mark = len(agent.events)
    await agent.wait_count("drift_pass_done", 1, since=mark, timeout=3 * PERIOD + 5)
    mark, cpu, wall = len(agent.events), agent.cpu_seconds(), time.monotonic()
    passes = 3
    await agent.wait_count("drift_pass_done", passes, since=mark, timeout=passes * 3 * PERIOD + 5)
    cpu_per_pass = (agent.cpu_seconds() - cpu) / passes
    window_s = time.monotonic() - wall
    durations = [e["duration_ms"] for e in agent.find("drift_pass_done", since=mark)]
    assert agent.find("drift_repaired") == []
    assert agent.find("work_failed") == []
    samples = await agent.metrics()
    assert metric(samples, f"{PREFIX}_pods_enrolled") == MANY
    print(
        f"MEASURE: pods={MANY} create_lab_s={created_s:.1f} label_to_all_enabled_s={enroll_s:.2f}"
        f" proc_scans={scans}"
        f" drift_pass_ms={durations} cpu_per_pass_ms={cpu_per_pass * 1e3:.1f}"
        f" cpu_share_over_{window_s:.1f}s={(cpu_per_pass * passes) / window_s:.1%}"
        f" rss_mib={agent.rss_kib() / 1024:.1f} fds={agent.fds()} period_s={PERIOD}"
        " (agent at --log-level debug)"
    )


async def assert_not_waited_for_the_retry(agent: AgentProcess, key: str, *, since: int) -> None:
    """The run of `key` that acted on a change made after event index `since` ended
    (`work_done`) before its pending retry fell due (`retry_due`): the change was acted on at
    once, not at the retry. An order of events, not a duration."""
    assert agent.find("retry_due", key=key), "earlier retries are reported as they fall due"
    done = await agent.wait_event("work_done", key=key, since=since, timeout=WAIT)
    done_at = agent.events.index(done)
    due = [agent.events.index(e) for e in agent.find("retry_due", key=key, since=since)]
    assert all(at > done_at for at in due), "the change waited for the retry"


async def test_pending_pods_are_enabled_as_soon_as_ztunnel_connects(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    agent = await agents.start("--log-level", "debug")
    node.enroll_namespace(NS)
    for pod in (a, b):
        await annotated(node.api, pod, "pending")
        # Rules first, then ztunnel (docs/design.md §6).
        assert await rules_drift(netns_runner, pod) == []
    assert host_set_elements(node) == {}
    # Let the retries back off (as while ztunnel restarts), then ztunnel comes.
    backoff = 2.0
    await agent.wait_until(
        lambda: any(e["retry_in_s"] >= backoff for e in agent.find("retry_scheduled", key=a.uid)),
        timeout=WAIT,
        what="a long retry backoff",
    )
    mark = len(agent.events)

    fake = await ztunnels.connect()
    for pod in (a, b):
        await annotated(node.api, pod, "enabled")
    await assert_not_waited_for_the_retry(agent, a.uid, since=mark)
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    await assert_redirected(fake, a, b)


async def test_label_change_acts_at_once_on_a_pod_in_retry_backoff(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    netns_runner: NetnsRunner,
) -> None:
    a, _ = pods
    agent = await agents.start("--log-level", "debug")
    node.enroll_namespace(NS)  # no ztunnel: the pods are pending and retried with backoff
    await annotated(node.api, a, "pending")
    backoff = 2.0
    await agent.wait_until(
        lambda: any(e["retry_in_s"] >= backoff for e in agent.find("retry_scheduled", key=a.uid)),
        timeout=WAIT,
        what="a long retry backoff",
    )
    mark = len(agent.events)

    node.api.set_pod_labels(NS, a.name, {c.ENROLL_LABEL: c.OPT_OUT_VALUE})

    await annotated(node.api, a, None)
    await assert_not_waited_for_the_retry(agent, a.uid, since=mark)
    assert tables(a.lab.netns) & POD_TABLES == set()
    assert await rules_drift(netns_runner, a) != []


async def test_without_repair_on_startup_drift_is_reported_and_left_until_a_pass(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    no_pass = ("--reconcile-period", "30")  # no periodic pass within this test
    await enroll_then_stop(node, agents, ztunnels, a, b, flags=no_pass)
    a.lab.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)  # lost while the agent is down
    flushed = await rules_drift(netns_runner, a)
    assert flushed != []

    # AMBIENT_RECONCILE_POD_RULES_ON_STARTUP=false: verified and reported, not repaired.
    second = await agents.start("--no-reconcile-on-startup", *no_pass)

    found = second.find("startup_drift_found", pod_uid=a.uid)
    assert len(found) == 1, second.find("startup_drift_found")
    assert found[0]["reason"] == "missing_rule"
    assert found[0]["changes"] == len(flushed)
    assert second.find("startup_drift_found", pod_uid=b.uid) == []
    assert second.find("drift_repaired") == []
    assert status_annotation(node.api, a) == "enabled"
    assert await rules_drift(netns_runner, a) == flushed, "repaired before ready"
    assert await second.stop() == 0

    # The default repairs it before the agent is ready.
    third = await agents.start(*no_pass)

    assert await rules_drift(netns_runner, a) == []
    repaired = third.find("drift_repaired", pod_uid=a.uid)
    assert len(repaired) == 1
    assert repaired[0]["reason"] == "missing_rule"
    assert third.find("startup_drift_found") == []
    assert third.find("drift_repaired", pod_uid=b.uid) == []


async def test_pods_and_host_left_by_istios_iptables_backend_are_migrated(
    node: TestNode,
    agents: Agents,
    ztunnels: Ztunnels,
    netns_runner: NetnsRunner,
) -> None:
    need(Flavour.NFT)
    # As istio-cni's iptables backend left the node: pods enrolled (namespace label, status
    # annotation) with its rules inside, its probe ipsets and ISTIO_POSTRT chain on the host.
    enabled = {c.STATUS_ANNOTATION: "enabled"}
    a, b = node.add_pod("a", NS, annotations=enabled), node.add_pod("b", NS, annotations=enabled)
    node.enroll_namespace(NS)
    for pod in (a, b):
        install_istio_pod(pod.lab, Flavour.NFT)
        assert "ISTIO_OUTPUT" in all_saves(pod.path)
    install_istio_host(node.lab.node, Flavour.NFT, {pod.ips[0]: pod.uid for pod in (a, b)})
    assert "ISTIO_POSTRT" in all_saves(node.lab.node.path)

    agent = await agents.start()

    for pod in (a, b):
        migrated = agent.find("pod_migrated", pod_uid=pod.uid, has="removed")
        assert len(migrated) == 1 and migrated[0]["removed"], agent.find("pod_migrated")
        assert await rules_drift(netns_runner, pod) == []
        assert tables(pod.lab.netns) >= POD_TABLES
        assert "ISTIO_" not in all_saves(pod.path)
        assert "fwmark 0x111/0xfff lookup 100" in pod.lab.netns.ip("rule")
    host = agent.find("host_migrated", has="removed")
    assert len(host) == 1 and host[0]["removed"]
    assert "ISTIO_" not in all_saves(node.lab.node.path)
    assert sh(node.lab.node.path, "ipset", "list", "-n") == ""
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    for failed in ("istio_migration_failed", "istio_host_migration_failed", "probe_ips_uncovered"):
        assert agent.find(failed) == [], failed
    assert agent.find("work_failed") == []

    # Our rules alone carry the pods' traffic through ztunnel and SNAT the kubelet's probes.
    fake = await ztunnels.connect()
    await assert_redirected(fake, a, b)
    with App(b.path, APP_PORT, name=b.name):
        probe = await asyncio.to_thread(
            request, node.lab.node.path, b.ips[0], APP_PORT, uid=KUBELET_UID
        )
    assert probe == f"app {b.name} saw {c.PROBE_SNAT_V4}\n".encode()


async def test_istios_host_rules_stay_until_our_sets_hold_this_nodes_pods(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
) -> None:
    need(Flavour.NFT)
    a, b = pods
    node.enroll_namespace(NS)
    install_istio_host(node.lab.node, Flavour.NFT, {pod.ips[0]: pod.uid for pod in (a, b)})

    # No ztunnel yet: the pods stay pending, out of our host set, after start-up.
    agent = await agents.start()
    postponed = await agent.wait_event("istio_host_migration_postponed", timeout=WAIT)

    assert sorted(postponed["ips"]) == sorted([a.ips[0], b.ips[0]])
    assert host_set_elements(node) == {}
    assert "ISTIO_POSTRT" in all_saves(node.lab.node.path)  # their probes keep Istio's SNAT
    assert sh(node.lab.node.path, "ipset", "list", "-n").split() == [
        c.HOST_SET_V4,
        c.HOST_SET_V6,
    ]
    assert agent.find("host_migrated") == []
    # Tried again by every pass, said once while the same pods are waited for.
    await agent.wait_count("drift_pass_done", 2, since=agent.events.index(postponed), timeout=WAIT)
    assert len(agent.find("istio_host_migration_postponed")) == 1

    await ztunnels.connect()
    for pod in (a, b):
        await annotated(node.api, pod, "enabled")

    # The next drift pass finds them covered.
    migrated = await agent.wait_event("host_migrated", has="removed", timeout=WAIT)
    assert migrated["removed"]
    assert "ISTIO_" not in all_saves(node.lab.node.path)
    assert sh(node.lab.node.path, "ipset", "list", "-n") == ""
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    assert agent.find("istio_host_migration_failed") == []


DUAL_STACK = pytest.mark.parametrize("node", [True], indirect=True, ids=["dual-stack"])
OPTIONS_V6 = PodOptions(ipv6=True, dns_capture=True)


@DUAL_STACK
async def test_dual_stack_pods_are_redirected_over_ipv6(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agent: AgentProcess,
    ztunnel: FakeZtunnel,
    netns_runner: NetnsRunner,
) -> None:
    a, b = pods
    assert "--ipv6" in agent.argv
    assert a.lab.ipv6 is not None and b.lab.ipv6 is not None

    await enroll(node, a, b)

    for pod in (a, b):
        assert await rules_drift(netns_runner, pod, OPTIONS_V6) == []
        assert await pod_check(pod) == (0, "")
        assert "fwmark 0x111/0xfff lookup 100" in pod.lab.netns.ip("-6", "rule")
    assert host_set_elements(node) == {a.ips[0]: a.uid, b.ips[0]: b.uid}
    assert host_set_elements(node, c.HOST_SET_V6) == {a.lab.ipv6: a.uid, b.lab.ipv6: b.uid}
    await assert_redirected(ztunnel, a, b, ipv6=True)
    await assert_redirected(ztunnel, a, b)
    assert agent.find("work_failed") == []


async def pod_check(pod: NodePod) -> tuple[int, str]:
    """`ztunnel-redirect pod check` as an operator runs it (IPv6 and DNS capture by default)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ztunnel_redirect.app.cli", "pod", "check", "--netns", pod.path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(WAIT):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cni_install_waits_for_the_primary_config_and_keeps_our_entry(
    node: TestNode,
    pods: tuple[NodePod, NodePod],
    agents: Agents,
    ztunnels: Ztunnels,
    tmp_path: Path,
) -> None:
    a, b = pods
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    # A long period: the entry must come back without waiting for a drift pass.
    plugin = await asyncio.to_thread(built_plugin)
    agent = agents.create(
        *("--install-cni", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)),
        *("--cni-plugin-binary", str(plugin), "--reconcile-period", "30"),
    )
    # Node boot: the primary CNI has not written its config yet.
    await agent.start(ready=False)
    await agent.wait_event("cni_primary_config_waiting", timeout=WAIT)
    await agent.wait_event("readiness_condition_done", condition="startup_verification")

    # Everything but the CNI entry goes on: not ready for that alone, pods are enrolled.
    assert await agent.readyz() == (503, "not ready, pending:\ncni\n")
    assert metric(await agent.metrics(), "istio_cni_install_ready") == 0
    await ztunnels.connect()
    await enroll(node, a, b)
    assert agent.returncode is None

    conflist = conf_dir / "10-calico.conflist"
    primary_writes(conflist)  # the primary CNI starts

    ready = await agent.wait_ready()
    assert ready["pods_enrolled"] == 2
    samples = await agent.metrics()
    assert metric(samples, "istio_cni_install_ready") == 1
    assert metric(samples, "istio_cni_installs_total", result="SUCCESS") == 1
    # Istio's informer event count: the listed pods and namespaces, then the relabels.
    assert metric(samples, "nodeagent_reconcile_events_total", type="add") >= 2
    assert metric(samples, "nodeagent_reconcile_events_total", type="update") >= 1
    assert plugin_types(conflist)[-1] == PLUGIN_NAME
    assert len(agent.find("cni_primary_config_waiting")) == 1
    assert len(agent.find("agent_ready")) == 1

    # The primary rewrites its config (calico-node restarts): our entry comes back at once.
    mark = agent.mark
    primary_writes(conflist)
    assert plugin_types(conflist)[-1] != PLUGIN_NAME
    await agent.wait_event("cni_config_updated", file=str(conflist), since=mark, timeout=WAIT)
    assert plugin_types(conflist)[-1] == PLUGIN_NAME
    assert agent.find("drift_pass_done", since=mark) == []
    assert agent.find("cni_config_update_failed") == []


def primary_writes(conflist: Path) -> None:
    """The primary CNI writes its config whole (a file rewritten in place is empty for a moment,
    and an agent that reads it then counts a failure until the write is closed)."""
    staged = conflist.with_name(f".{conflist.name}.tmp")
    shutil.copyfile(CNI_DATA / conflist.name, staged)
    staged.replace(conflist)


def plugin_types(conflist: Path) -> list[Any]:
    return [plugin.get("type") for plugin in json.loads(conflist.read_text())["plugins"]]
