"""The reconciler with fakes at every seam: the order of SPEC §6, and what it keeps in memory.

A pod's "netns" is a file in a temporary directory (the reconciler compares the identity of what
a path names, st_dev and st_ino, before each use), reached through a symlink as through
`/proc/<pid>/ns/net`: re-pointing the link is a pid reused by another process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect import constants as c
from ztunnel_redirect.enrollment import EnrollmentPolicy
from ztunnel_redirect.errors import NetnsNotFoundError, RedirectError, RetryableError
from ztunnel_redirect.model import HostOptions, Namespace, Pod, PodOptions, PodUid
from ztunnel_redirect.netns import NetnsId, netns_id
from ztunnel_redirect.reconciler import (
    ENABLED,
    HOST_KEY,
    PENDING,
    ClusterState,
    NetnsPendingError,
    Reconciler,
)

UID = PodUid("uid-a")
WAIT = 5.0


class Calls:
    def __init__(self, netns: str) -> None:
        self.log: list[str] = []
        self.forgotten: list[str] = []
        self.nack = False
        self.located: str | None = netns
        """What the locator (the /proc scan) finds for the pod."""
        self.vanish = False
        """The pod rules find the netns gone (NetnsNotFoundError)."""
        self.written: list[str] = []
        """Every netns path the pod rules wrote to or read."""
        self.enqueued: list[str] = []
        self.kinds: list[str] = []
        """The `kind` of every reconcile the observer saw."""
        self.desired: Callable[[], dict[str, PodUid]] | None = None
        self.desired_while_removing: list[dict[str, PodUid]] = []
        self.before_open: dict[str, Callable[[], None]] = {}
        """Run by the pod rules ("rules") or ztunnel ("ztunnel") just before they open the path:
        a pid reused after the reconciler's own check."""


def opened(calls: Calls, who: str, netns: str, identity: NetnsId | None) -> None:
    """What the real pod rules and ztunnel server do on opening the path: compare the identity
    of what they opened with the one they were given."""
    hook = calls.before_open.pop(who, None)
    if hook is not None:
        hook()
    if identity is not None and netns_id(netns) != identity:
        raise NetnsNotFoundError(f"{netns} no longer names {identity}")


class FakePodRules:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def apply(
        self,
        netns: str,
        options: PodOptions,
        *,
        fresh: bool = False,
        identity: NetnsId | None = None,
    ) -> list[Any]:
        self.calls.log.append("rules")
        opened(self.calls, "rules", netns, identity)
        self.calls.written.append(netns)
        if self.calls.vanish:
            raise NetnsNotFoundError(netns)
        return []

    async def check(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> list[Any]:
        opened(self.calls, "rules", netns, identity)
        return []

    async def remove(self, netns: str, *, identity: NetnsId | None = None) -> list[str]:
        self.calls.log.append("remove_rules")
        opened(self.calls, "rules", netns, identity)
        self.calls.written.append(netns)
        return []

    def forget(self, netns: str) -> None:
        self.calls.forgotten.append(netns)


class FakeHostRules:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def add_pod(self, ips: Any, uid: PodUid, *, ipv6: bool) -> None:
        self.calls.log.append("host_add")

    async def remove_pod(self, ips: Any, uid: PodUid) -> list[str]:
        self.calls.log.append("host_remove")
        if self.calls.desired is not None:
            # What a host pass running at this moment would write.
            self.calls.desired_while_removing.append(self.calls.desired())
        return list(ips)

    async def apply(self, options: HostOptions, elements: Any = None) -> list[Any]:
        return []


class FakeZtunnel:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def add_workload(
        self, pod: Pod, netns_path: str, *, identity: NetnsId | None = None
    ) -> None:
        opened(self.calls, "ztunnel", netns_path, identity)
        if self.calls.nack:
            self.calls.log.append("ztunnel_nack")
            raise RetryableError("nack")
        self.calls.log.append("ztunnel_add")

    async def del_workload(self, uid: PodUid) -> None:
        self.calls.log.append("ztunnel_del")


class FakeStatus:
    """Patches the annotation and, as the watch would, shows the pod with it."""

    def __init__(self, calls: Calls, state: ClusterState) -> None:
        self.calls = calls
        self.state = state

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        self.calls.log.append(f"status={value}")
        annotations = {k: v for k, v in pod.annotations.items() if k != c.STATUS_ANNOTATION}
        if value is not None:
            annotations[c.STATUS_ANNOTATION] = value
        if pod.uid in self.state.pods:
            self.state.upsert_pod(dataclasses.replace(pod, annotations=annotations))


class FakeLocator:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def locate(self, pod: Pod) -> str | None:
        self.calls.log.append("locate")
        return self.calls.located


class FakeMigration:
    """Fails `failures` times, then succeeds."""

    def __init__(self, calls: Calls, *, failures: int = 0) -> None:
        self.calls = calls
        self.failures = failures

    async def migrate_pod(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> object:
        self.calls.log.append("migrate")
        if self.failures:
            self.failures -= 1
            raise RedirectError("iptables-nft-restore failed")
        return None


class Quiet:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def observe_reconcile(self, kind: str, seconds: float) -> None:
        self.calls.kinds.append(kind)

    def count_repair(self, reason: str) -> None: ...
    def count_failure(self, reason: str) -> None: ...
    def set_pods_enrolled(self, count: int) -> None: ...


def pod(**labels: str) -> Pod:
    return Pod(uid=UID, name="a", namespace="demo", node_name="n", ips=("10.0.0.2",), labels=labels)


class Node:
    """Netns stand-ins: files, and a pod process's `ns/net` link to one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "netns").mkdir()
        self.host = self.netns("host")
        self.pod_netns = self.netns("pod-a")
        self.proc_link = root / "proc" / "1000" / "ns" / "net"
        self.proc_link.parent.mkdir(parents=True)
        self.proc_link.symlink_to(self.pod_netns)

    def netns(self, name: str) -> Path:
        path = self.root / "netns" / name
        path.touch()
        return path

    def reuse_pid(self, target: Path) -> None:
        """The pod's process exits and its pid is reused by a process in `target`."""
        self.proc_link.unlink()
        self.proc_link.symlink_to(target)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def netns(node: Node) -> str:
    """The pod's netns as the /proc scan finds it."""
    return str(node.proc_link)


@pytest.fixture
def calls(netns: str) -> Calls:
    return Calls(netns)


def build(calls: Calls, *, migration: FakeMigration | None = None) -> Reconciler:
    state = ClusterState(calls.enqueued.append)
    state.namespaces["demo"] = Namespace("demo", {c.ENROLL_LABEL: c.ENROLL_VALUE})
    return Reconciler(
        state=state,
        policy=EnrollmentPolicy(node_name="n"),
        pod_rules=FakePodRules(calls),  # type: ignore[arg-type]
        host_rules=FakeHostRules(calls),  # type: ignore[arg-type]
        host_options=HostOptions(kubelet_uid=1),
        ztunnel=FakeZtunnel(calls),
        status=FakeStatus(calls, state),
        locator=FakeLocator(calls),
        observer=Quiet(calls),
        migration=migration,
    )


@pytest.fixture
def reconciler(calls: Calls) -> Reconciler:
    return build(calls)


async def enrolled(reconciler: Reconciler, calls: Calls) -> None:
    """The pod, enrolled and accepted by ztunnel; the call log cleared."""
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile(UID)
    assert reconciler.records[UID].acked
    calls.log.clear()
    calls.written.clear()


async def test_add_follows_spec_order(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    assert calls.log == ["locate", "rules", "ztunnel_add", "host_add", f"status={ENABLED}"]


async def test_a_check_of_an_enrolled_pod_writes_only_rules_it_needs(
    reconciler: Reconciler, calls: Calls
) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    calls.log.clear()
    await reconciler.reconcile("uid-a")  # the periodic pass
    assert calls.log == ["rules"]  # no ztunnel Add, host set or annotation again


async def test_nack_leaves_rules_in_place_and_marks_pending(
    reconciler: Reconciler, calls: Calls
) -> None:
    calls.nack = True
    reconciler.state.upsert_pod(pod())
    with pytest.raises(RetryableError):
        await reconciler.reconcile("uid-a")
    assert calls.log == ["locate", "rules", "ztunnel_nack", f"status={PENDING}"]


async def test_leaving_the_mesh_follows_spec_order(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    calls.log.clear()
    reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    await reconciler.reconcile("uid-a")
    assert calls.log == ["host_remove", "remove_rules", "ztunnel_del", "status=None"]
    assert reconciler.records == {}


async def test_a_deleted_pod_is_forgotten_everywhere(
    reconciler: Reconciler, calls: Calls, netns: str
) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    calls.log.clear()
    reconciler.state.delete_pod(pod())
    await reconciler.reconcile("uid-a")
    assert calls.log == ["host_remove", "ztunnel_del"]  # the netns and the pod are gone
    assert reconciler.records == {}
    assert reconciler.state.deleted == {}
    assert calls.forgotten == [netns]


async def test_the_cni_ips_survive_a_pod_update_without_ips(
    reconciler: Reconciler, calls: Calls, netns: str
) -> None:
    assert await reconciler.add_from_cni(pod(), netns)
    reconciler.state.upsert_pod(Pod(uid=PodUid("uid-a"), name="a", namespace="demo", node_name="n"))
    calls.log.clear()
    await reconciler.reconcile("uid-a")
    assert "host_remove" not in calls.log
    assert reconciler.records[PodUid("uid-a")].pod.ips == ("10.0.0.2",)


# --- A: a /proc path whose pid was reused names another netns ----------------------------------


async def test_a_path_naming_another_netns_now_is_never_written_to(
    reconciler: Reconciler, calls: Calls, node: Node
) -> None:
    await enrolled(reconciler, calls)
    node.reuse_pid(node.host)  # the pod's process exited; a host process got its pid
    calls.located = None  # the scan (which skips the host's netns) finds the pod nowhere

    with pytest.raises(NetnsPendingError):
        await reconciler.reconcile(UID)

    assert calls.written == []
    assert calls.log == ["locate", "host_remove", "ztunnel_del"]
    assert reconciler.host_elements() == {}
    assert reconciler.workloads() == [(pod(), None, None)]


async def test_the_same_netns_under_another_path_is_kept_without_a_blip(
    reconciler: Reconciler, calls: Calls, node: Node
) -> None:
    await enrolled(reconciler, calls)
    other = node.root / "proc" / "2000" / "ns" / "net"  # another process of the pod's sandbox
    other.parent.mkdir(parents=True)
    other.symlink_to(node.pod_netns)
    node.reuse_pid(node.host)
    calls.located = str(other)

    await reconciler.reconcile(UID)

    assert calls.log == ["locate", "rules"]  # no ztunnel Del/Add, no host set change
    assert calls.written == [str(other)]
    assert reconciler.records[UID].acked


async def test_the_snapshot_never_sends_a_path_naming_another_netns(
    reconciler: Reconciler, calls: Calls, node: Node
) -> None:
    await enrolled(reconciler, calls)
    calls.enqueued.clear()
    node.reuse_pid(node.host)

    assert reconciler.workloads() == [(pod(), None, None)]  # sent as Keep
    assert calls.enqueued == [UID]  # and reconciled at once


@pytest.mark.parametrize("who", ["rules", "ztunnel"])
async def test_a_pid_reused_after_the_check_is_caught_where_the_path_is_opened(
    reconciler: Reconciler, calls: Calls, node: Node, netns: str, who: str
) -> None:
    """The reconciler's check passes; the pid is reused before the path is opened. The
    identity recorded when the netns was found goes with the path, so the opener refuses."""
    reconciler.state.upsert_pod(pod())
    calls.before_open[who] = lambda: node.reuse_pid(node.host)

    with capture_logs() as logs, pytest.raises(NetnsNotFoundError):
        await reconciler.reconcile(UID)

    assert calls.written == ([] if who == "rules" else [netns])  # the rules went in before
    assert "ztunnel_add" not in calls.log
    assert [e["reason"] for e in logs if e["event"] == "netns_vanished"] == ["replaced"]
    assert reconciler.host_elements() == {}
    assert reconciler.records[UID].netns is None


async def test_a_leaving_pods_rules_are_removed_only_from_its_own_netns(
    reconciler: Reconciler, calls: Calls, node: Node
) -> None:
    await enrolled(reconciler, calls)
    calls.before_open["rules"] = lambda: node.reuse_pid(node.host)

    reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    with capture_logs() as logs:
        await reconciler.reconcile(UID)

    assert calls.written == []
    assert [e["reason"] for e in logs if e["event"] == "netns_vanished"] == ["netns_gone"]
    assert reconciler.records == {}


# --- D: the netns of an enrolled pod vanished, the pod object stays -------------------------------


async def test_a_vanished_netns_is_cleaned_up_and_a_new_sandbox_enrolled(
    reconciler: Reconciler, calls: Calls, node: Node, netns: str
) -> None:
    await enrolled(reconciler, calls)
    node.pod_netns.unlink()  # the sandbox is gone
    calls.located = None

    with capture_logs() as logs, pytest.raises(NetnsPendingError):
        await reconciler.reconcile(UID)

    assert calls.log == ["locate", "host_remove", "ztunnel_del"]
    assert netns in calls.forgotten
    vanished = [e for e in logs if e["event"] == "netns_vanished"]
    assert len(vanished) == 1 and vanished[0]["netns"] == netns
    assert reconciler.host_elements() == {}
    calls.log.clear()

    # A new sandbox of the same pod, with a new IP.
    calls.located = str(node.netns("pod-a-2"))
    known = reconciler.state.pods[UID]  # as the API shows it: annotated enabled
    reconciler.state.upsert_pod(dataclasses.replace(known, ips=("10.0.0.9",)))
    await reconciler.reconcile(UID)

    assert calls.log == ["locate", "rules", "ztunnel_add", "host_add"]
    assert calls.written == [calls.located]
    assert reconciler.host_elements() == {"10.0.0.9": UID}


async def test_a_netns_found_gone_while_writing_is_cleaned_up(
    reconciler: Reconciler, calls: Calls, netns: str
) -> None:
    await enrolled(reconciler, calls)
    calls.vanish = True

    with pytest.raises(NetnsNotFoundError):
        await reconciler.reconcile(UID)

    assert calls.log == ["rules", "host_remove", "ztunnel_del"]
    record = reconciler.records[UID]
    assert (record.netns, record.acked, record.in_host_set) == (None, False, False)
    assert netns in calls.forgotten


@pytest.mark.parametrize("leaves", ["netns_vanished", "opted_out"])
async def test_a_host_pass_meanwhile_never_puts_back_an_element_being_removed(
    reconciler: Reconciler, calls: Calls, node: Node, leaves: str
) -> None:
    await enrolled(reconciler, calls)
    calls.desired = reconciler.host_elements
    if leaves == "netns_vanished":
        node.pod_netns.unlink()
        calls.located = None
        with pytest.raises(NetnsPendingError):
            await reconciler.reconcile(UID)
    else:
        reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        await reconciler.reconcile(UID)
    assert calls.desired_while_removing == [{}]


# --- B: host probe set only for pods ztunnel accepted ---------------------------------------------


async def test_a_pending_pod_is_not_in_the_host_set(reconciler: Reconciler, calls: Calls) -> None:
    calls.nack = True
    reconciler.state.upsert_pod(pod())
    with pytest.raises(RetryableError):
        await reconciler.reconcile(UID)

    assert reconciler.host_elements() == {}
    adopted = dataclasses.replace(
        pod(), uid=PodUid("uid-b"), annotations={c.STATUS_ANNOTATION: PENDING}
    )
    reconciler.adopt(adopted, None)
    assert reconciler.host_elements() == {}

    calls.nack = False
    await reconciler.reconcile(UID)
    assert reconciler.host_elements() == {"10.0.0.2": UID}


# --- E: reconcile kinds ---------------------------------------------------------------------------


async def test_a_periodic_check_is_recorded_as_check(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile(UID)
    await reconciler.reconcile(UID)
    await reconciler.reconcile(UID)
    assert calls.kinds == ["add", "check", "check"]


# --- F: log fields of state changes ---------------------------------------------------------------


async def test_removal_and_status_events_carry_netns_reason_and_duration(
    reconciler: Reconciler, calls: Calls, netns: str
) -> None:
    with capture_logs() as logs:
        reconciler.state.upsert_pod(pod())
        await reconciler.reconcile(UID)
        reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        await reconciler.reconcile(UID)

    status = [e for e in logs if e["event"] == "pod_status_set"]
    assert status and all(e["netns"] == netns for e in status)
    (removed,) = [e for e in logs if e["event"] == "pod_removed"]
    assert removed["netns"] == netns
    assert removed["reason"] == "opted_out"
    assert removed["duration_ms"] >= 0

    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile(UID)
    with capture_logs() as logs:
        reconciler.state.delete_pod(pod())
        await reconciler.reconcile(UID)
    (removed,) = [e for e in logs if e["event"] == "pod_removed"]
    assert removed["reason"] == "deleted"
    assert removed["netns"] == netns
    assert "duration_ms" in removed


# --- H: one run per key at a time -----------------------------------------------------------------


class GatedHostRules(FakeHostRules):
    """Each `apply` waits for its own gate; counts how many run at once."""

    def __init__(self, calls: Calls) -> None:
        super().__init__(calls)
        self.gates = [asyncio.Event() for _ in range(3)]
        self.entered = [asyncio.Event() for _ in range(3)]
        self.calls_made = 0
        self.active = 0
        self.most_active = 0

    async def apply(self, options: HostOptions, elements: Any = None) -> list[Any]:
        n = self.calls_made
        self.calls_made += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.entered[n].set()
        try:
            await self.gates[n].wait()
        finally:
            self.active -= 1
        return []


async def test_a_key_is_never_reconciled_twice_at_once(
    reconciler: Reconciler, calls: Calls
) -> None:
    host = GatedHostRules(calls)
    reconciler._host_rules = host  # type: ignore[assignment]
    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(reconciler.reconcile(HOST_KEY))
        await host.entered[0].wait()
        second = asyncio.create_task(reconciler.reconcile(HOST_KEY))  # waits for the first
        await asyncio.sleep(0)
        host.gates[0].set()
        await first  # the second is woken, not yet running: its lock must not be dropped
        await host.entered[1].wait()
        third = asyncio.create_task(reconciler.reconcile(HOST_KEY))
        await asyncio.sleep(0)
        for gate in host.gates:
            gate.set()
        await asyncio.gather(second, third)
    assert host.calls_made == 3
    assert host.most_active == 1


# --- I: ztunnel refuses a pod in its snapshot -----------------------------------------------------


async def test_a_pod_nacked_in_a_snapshot_is_retried_at_once(
    reconciler: Reconciler, calls: Calls
) -> None:
    await enrolled(reconciler, calls)
    calls.enqueued.clear()

    reconciler.snapshot_nacked(UID)

    assert calls.enqueued == [UID]
    assert not reconciler.records[UID].acked
    assert reconciler.host_elements() == {}
    calls.nack = True  # refused again: pending, out of the host set
    with pytest.raises(RetryableError):
        await reconciler.reconcile(UID)
    assert calls.log == ["rules", "ztunnel_nack", "host_remove", f"status={PENDING}"]
    calls.nack = False
    calls.log.clear()
    await reconciler.reconcile(UID)
    assert calls.log == ["rules", "ztunnel_add", "host_add", f"status={ENABLED}"]


# --- J: Istio's iptables rules --------------------------------------------------------------------


async def test_a_failed_migration_is_retried_until_it_succeeds(calls: Calls) -> None:
    reconciler = build(calls, migration=FakeMigration(calls, failures=1))
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile(UID)
    await reconciler.reconcile(UID)
    await reconciler.reconcile(UID)
    assert calls.log.count("migrate") == 2


async def test_leaving_the_mesh_removes_istios_rules_before_ours(calls: Calls) -> None:
    reconciler = build(calls, migration=FakeMigration(calls, failures=1))
    await enrolled(reconciler, calls)  # the migration failed: Istio's rules are still there

    reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    await reconciler.reconcile(UID)

    assert calls.log == ["host_remove", "migrate", "remove_rules", "ztunnel_del", "status=None"]


async def test_a_pod_istio_enrolled_and_we_never_did_loses_istios_rules(calls: Calls) -> None:
    reconciler = build(calls, migration=FakeMigration(calls))
    # Annotated by Istio's agent; its namespace is not ambient any more.
    reconciler.state.namespaces.clear()
    reconciler.state.upsert_pod(
        dataclasses.replace(pod(), annotations={c.STATUS_ANNOTATION: ENABLED})
    )
    await reconciler.reconcile(UID)
    assert calls.log == [
        "host_remove", "locate", "migrate", "remove_rules", "ztunnel_del", "status=None",
    ]  # fmt: skip


async def test_a_pods_host_element_is_never_written_during_a_host_pass(
    reconciler: Reconciler, calls: Calls
) -> None:
    await enrolled(reconciler, calls)
    host = GatedHostRules(calls)
    reconciler._host_rules = host  # type: ignore[assignment]
    async with asyncio.timeout(WAIT):
        host_pass = asyncio.create_task(reconciler.reconcile(HOST_KEY))
        await host.entered[0].wait()  # writing the set it computed, with the pod in it
        reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        leaving = asyncio.create_task(reconciler.reconcile(UID))
        for _ in range(5):
            await asyncio.sleep(0)
        assert "host_remove" not in calls.log  # waits for the pass, then removes
        host.gates[0].set()
        await asyncio.gather(host_pass, leaving)
    assert calls.log[0] == "host_remove"
