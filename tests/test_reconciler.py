"""The reconciler with fakes at every seam: the order of docs/design.md §6, and what it keeps in
memory.

A pod's "netns" is a file in a temporary directory (the reconciler compares the identity of what
a path names, st_dev and st_ino, before each use), reached through a symlink as through
`/proc/<pid>/ns/net`: re-pointing the link is a pid reused by another process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect.control.reconciler import HOST_KEY, NetnsPendingError, Reconciler
from ztunnel_redirect.control.records import ENABLED, PENDING, Phase, PodRecords
from ztunnel_redirect.control.store import ClusterStore, Sandbox
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import NetnsNotFoundError, RedirectError, RetryableError
from ztunnel_redirect.core.model import HostOptions, Namespace, Pod, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id
from ztunnel_redirect.testing.fakekernel import FakeKernel

UID = PodUid("uid-a")
WAIT = 5.0


class Calls:
    def __init__(self, netns: str) -> None:
        self.log: list[str] = []
        """The order of what every fake was asked (the fake kernel appends to it too)."""
        self.nack = False
        self.del_failures = 0
        """How many Dels ztunnel fails (nacks, or loses the connection before the ack)."""
        self.located: str | None = netns
        """What the locator (the /proc scan) finds for the pod."""
        self.enqueued: list[str] = []
        self.kinds: list[str] = []
        """The `kind` of every reconcile the observer saw."""
        self.before_add: Callable[[], None] | None = None
        """Run by ztunnel just before it opens the path: a pid reused after the reconciler's
        own check."""


class FakeZtunnel:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def add_workload(
        self, pod: Pod, netns_path: str, *, identity: NetnsId | None = None
    ) -> None:
        hook, self.calls.before_add = self.calls.before_add, None
        if hook is not None:
            hook()
        if identity is not None and netns_id(netns_path) != identity:
            raise NetnsNotFoundError(f"{netns_path} no longer names {identity}")
        if self.calls.nack:
            self.calls.log.append("ztunnel_nack")
            raise RetryableError("nack")
        self.calls.log.append("ztunnel_add")

    async def del_workload(self, uid: PodUid) -> None:
        if self.calls.del_failures:
            self.calls.del_failures -= 1
            self.calls.log.append("ztunnel_del_failed")
            raise RetryableError("ztunnel refused to delete it")
        self.calls.log.append("ztunnel_del")


class FakeStatus:
    """Patches the annotation and, as the watch would, shows the pod with it."""

    def __init__(self, calls: Calls, store: ClusterStore) -> None:
        self.calls = calls
        self.store = store

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        self.calls.log.append(f"status={value}")
        annotations = {k: v for k, v in pod.annotations.items() if k != c.STATUS_ANNOTATION}
        if value is not None:
            annotations[c.STATUS_ANNOTATION] = value
        if pod.uid in self.store.pods:
            self.store.upsert_pod(dataclasses.replace(pod, annotations=annotations))


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


@dataclass
class World:
    """The reconciler with the store and records it reads, on a fake kernel."""

    store: ClusterStore
    records: PodRecords
    kernel: FakeKernel
    reconciler: Reconciler

    async def reconcile(self, key: str) -> None:
        await self.reconciler.reconcile(key)


HOST_OPTIONS = HostOptions(kubelet_uid=1)


def build(
    calls: Calls,
    *,
    migration: FakeMigration | None = None,
    host_options: HostOptions = HOST_OPTIONS,
) -> World:
    store = ClusterStore()
    store.subscribe(calls.enqueued.append)
    store.upsert_namespace(Namespace("demo", {c.ENROLL_LABEL: c.ENROLL_VALUE}))
    policy = EnrollmentPolicy(node_name="n")
    records = PodRecords(store=store, policy=policy)
    kernel = FakeKernel(log=calls.log)
    reconciler = Reconciler(
        store=store,
        records=records,
        policy=policy,
        pod_rules=kernel.pod_rules,
        host_rules=kernel.host_rules,
        host_options=host_options,
        ztunnel=FakeZtunnel(calls),
        status=FakeStatus(calls, store),
        locator=FakeLocator(calls),
        observer=Quiet(calls),
        migration=migration,
    )
    return World(store, records, kernel, reconciler)


@pytest.fixture
def w(calls: Calls) -> World:
    return build(calls)


async def enrolled(w: World, calls: Calls) -> None:
    """The pod, enrolled and accepted by ztunnel; the call log cleared."""
    w.store.upsert_pod(pod())
    await w.reconcile(UID)
    assert w.records.accepted(UID)
    calls.log.clear()
    w.kernel.written.clear()


async def test_add_follows_spec_order(w: World, calls: Calls) -> None:
    w.store.upsert_pod(pod())
    await w.reconcile("uid-a")
    assert calls.log == ["locate", "rules", "ztunnel_add", "host_add", f"status={ENABLED}"]


async def test_a_check_of_an_enrolled_pod_writes_only_rules_it_needs(
    w: World, calls: Calls
) -> None:
    w.store.upsert_pod(pod())
    await w.reconcile("uid-a")
    calls.log.clear()
    await w.reconcile("uid-a")  # the periodic pass
    assert calls.log == ["rules"]  # no ztunnel Add, host set or annotation again


async def test_nack_leaves_rules_in_place_and_marks_pending(w: World, calls: Calls) -> None:
    calls.nack = True
    w.store.upsert_pod(pod())
    with pytest.raises(RetryableError):
        await w.reconcile("uid-a")
    assert calls.log == ["locate", "rules", "ztunnel_nack", f"status={PENDING}"]


async def test_leaving_the_mesh_follows_spec_order(w: World, calls: Calls) -> None:
    w.store.upsert_pod(pod())
    await w.reconcile("uid-a")
    calls.log.clear()
    w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    await w.reconcile("uid-a")
    assert calls.log == ["host_remove", "remove_rules", "ztunnel_del", "status=None"]
    assert w.records == {}


@pytest.mark.parametrize("on", [True, False])
async def test_the_branch_eni_probe_setting_reaches_the_host_writes(calls: Calls, on: bool) -> None:
    w = build(calls, host_options=HostOptions(kubelet_uid=1, aws_branch_eni_probe=on))
    w.store.upsert_pod(pod())
    await w.reconcile("uid-a")
    w.store.delete_pod(pod())
    await w.reconcile("uid-a")
    assert w.kernel.branch_eni_probe == [("add", on), ("remove", on)]


async def test_a_deleted_pod_is_forgotten_everywhere(w: World, calls: Calls, netns: str) -> None:
    w.store.upsert_pod(pod())
    await w.reconcile("uid-a")
    calls.log.clear()
    w.store.delete_pod(pod())
    await w.reconcile("uid-a")
    assert calls.log == ["host_remove", "ztunnel_del"]  # the netns and the pod are gone
    assert w.records == {}
    assert w.store.deleted == {}
    assert w.kernel.forgotten == [netns]


async def test_the_cni_ips_survive_a_pod_update_without_ips(
    w: World, calls: Calls, netns: str
) -> None:
    w.store.add_sandbox(pod(), Sandbox(netns, netns_id(netns)))
    await w.reconcile(UID)
    w.store.upsert_pod(Pod(uid=PodUid("uid-a"), name="a", namespace="demo", node_name="n"))
    calls.log.clear()
    await w.reconcile("uid-a")
    assert "host_remove" not in calls.log
    assert w.records[PodUid("uid-a")].pod.ips == ("10.0.0.2",)


# --- A: a /proc path whose pid was reused names another netns ----------------------------------


async def test_a_path_naming_another_netns_now_is_never_written_to(
    w: World, calls: Calls, node: Node
) -> None:
    await enrolled(w, calls)
    node.reuse_pid(node.host)  # the pod's process exited; a host process got its pid
    calls.located = None  # the scan (which skips the host's netns) finds the pod nowhere

    with pytest.raises(NetnsPendingError):
        await w.reconcile(UID)

    assert w.kernel.written == []
    assert calls.log == ["locate", "host_remove", "ztunnel_del"]
    assert w.records.host_elements() == {}
    assert w.records.snapshot() == [(pod(), None, None)]


async def test_the_same_netns_under_another_path_is_kept_without_a_blip(
    w: World, calls: Calls, node: Node
) -> None:
    await enrolled(w, calls)
    other = node.root / "proc" / "2000" / "ns" / "net"  # another process of the pod's sandbox
    other.parent.mkdir(parents=True)
    other.symlink_to(node.pod_netns)
    node.reuse_pid(node.host)
    calls.located = str(other)

    await w.reconcile(UID)

    assert calls.log == ["locate", "rules"]  # no ztunnel Del/Add, no host set change
    assert w.kernel.written == [str(other)]
    assert w.records.accepted(UID)


async def test_the_snapshot_never_sends_a_path_naming_another_netns(
    w: World, calls: Calls, node: Node
) -> None:
    await enrolled(w, calls)
    calls.enqueued.clear()
    node.reuse_pid(node.host)

    assert w.records.snapshot() == [(pod(), None, None)]  # sent as Keep
    assert calls.enqueued == [UID]  # and reconciled at once


@pytest.mark.parametrize("who", ["rules", "ztunnel"])
async def test_a_pid_reused_after_the_check_is_caught_where_the_path_is_opened(
    w: World, calls: Calls, node: Node, netns: str, who: str
) -> None:
    """The reconciler's check passes; the pid is reused before the path is opened. The
    identity recorded when the netns was found goes with the path, so the opener refuses."""
    w.store.upsert_pod(pod())
    reuse = functools.partial(node.reuse_pid, node.host)
    if who == "rules":
        w.kernel.before("pod_apply", reuse)
    else:
        calls.before_add = reuse

    with capture_logs() as logs, pytest.raises(NetnsNotFoundError):
        await w.reconcile(UID)

    assert w.kernel.written == ([] if who == "rules" else [netns])  # the rules went in before
    assert "ztunnel_add" not in calls.log
    assert [e["reason"] for e in logs if e["event"] == "netns_vanished"] == ["replaced"]
    assert w.records.host_elements() == {}
    assert w.records[UID].netns is None


async def test_a_leaving_pods_rules_are_removed_only_from_its_own_netns(
    w: World, calls: Calls, node: Node
) -> None:
    await enrolled(w, calls)
    w.kernel.before("pod_remove", functools.partial(node.reuse_pid, node.host))

    w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    with capture_logs() as logs:
        await w.reconcile(UID)

    assert w.kernel.written == []
    assert [e["reason"] for e in logs if e["event"] == "netns_vanished"] == ["netns_gone"]
    assert w.records == {}


# --- D: the netns of an enrolled pod vanished, the pod object stays -------------------------------


async def test_a_vanished_netns_is_cleaned_up_and_a_new_sandbox_enrolled(
    w: World, calls: Calls, node: Node, netns: str
) -> None:
    await enrolled(w, calls)
    node.pod_netns.unlink()  # the sandbox is gone
    calls.located = None

    with capture_logs() as logs, pytest.raises(NetnsPendingError):
        await w.reconcile(UID)

    assert calls.log == ["locate", "host_remove", "ztunnel_del"]
    assert netns in w.kernel.forgotten
    vanished = [e for e in logs if e["event"] == "netns_vanished"]
    assert len(vanished) == 1 and vanished[0]["netns"] == netns
    assert w.records.host_elements() == {}
    calls.log.clear()

    # A new sandbox of the same pod, with a new IP.
    calls.located = str(node.netns("pod-a-2"))
    known = w.store.pods[UID]  # as the API shows it: annotated enabled
    w.store.upsert_pod(dataclasses.replace(known, ips=("10.0.0.9",)))
    await w.reconcile(UID)

    assert calls.log == ["locate", "rules", "ztunnel_add", "host_add"]
    assert w.kernel.written == [calls.located]
    assert w.records.host_elements() == {"10.0.0.9": UID}


async def test_a_netns_found_gone_while_writing_is_cleaned_up(
    w: World, calls: Calls, netns: str
) -> None:
    await enrolled(w, calls)
    w.kernel.fail("pod_apply", NetnsNotFoundError(netns))

    with pytest.raises(NetnsNotFoundError):
        await w.reconcile(UID)

    assert calls.log == ["rules", "host_remove", "ztunnel_del"]
    record = w.records[UID]
    assert (record.netns, record.phase) == (None, Phase.PENDING)
    assert netns in w.kernel.forgotten


@pytest.mark.parametrize("leaves", ["netns_vanished", "opted_out"])
async def test_a_host_pass_meanwhile_never_puts_back_an_element_being_removed(
    w: World, calls: Calls, node: Node, leaves: str
) -> None:
    await enrolled(w, calls)
    desired_while_removing: list[dict[str, PodUid]] = []
    # What a host pass running at that moment would write.
    w.kernel.before("host_remove", lambda: desired_while_removing.append(w.records.host_elements()))
    if leaves == "netns_vanished":
        node.pod_netns.unlink()
        calls.located = None
        with pytest.raises(NetnsPendingError):
            await w.reconcile(UID)
    else:
        w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        await w.reconcile(UID)
    assert desired_while_removing == [{}]


# --- B: host probe set only for pods ztunnel accepted ---------------------------------------------


async def test_a_pending_pod_is_not_in_the_host_set(w: World, calls: Calls) -> None:
    calls.nack = True
    w.store.upsert_pod(pod())
    with pytest.raises(RetryableError):
        await w.reconcile(UID)

    assert w.records.host_elements() == {}
    adopted = dataclasses.replace(
        pod(), uid=PodUid("uid-b"), annotations={c.STATUS_ANNOTATION: PENDING}
    )
    w.records.adopt(adopted, None)
    assert w.records.host_elements() == {}

    calls.nack = False
    await w.reconcile(UID)
    assert w.records.host_elements() == {"10.0.0.2": UID}


# --- E: reconcile kinds ---------------------------------------------------------------------------


async def test_a_periodic_check_is_recorded_as_check(w: World, calls: Calls) -> None:
    w.store.upsert_pod(pod())
    await w.reconcile(UID)
    await w.reconcile(UID)
    await w.reconcile(UID)
    assert calls.kinds == ["add", "check", "check"]


# --- F: log fields of state changes ---------------------------------------------------------------


async def test_removal_and_status_events_carry_netns_reason_and_duration(
    w: World, calls: Calls, netns: str
) -> None:
    with capture_logs() as logs:
        w.store.upsert_pod(pod())
        await w.reconcile(UID)
        w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        await w.reconcile(UID)

    status = [e for e in logs if e["event"] == "pod_status_set"]
    assert status and all(e["netns"] == netns for e in status)
    (removed,) = [e for e in logs if e["event"] == "pod_removed"]
    assert removed["netns"] == netns
    assert removed["reason"] == "opted_out"
    assert removed["duration_ms"] >= 0

    w.store.upsert_pod(pod())
    await w.reconcile(UID)
    with capture_logs() as logs:
        w.store.delete_pod(pod())
        await w.reconcile(UID)
    (removed,) = [e for e in logs if e["event"] == "pod_removed"]
    assert removed["reason"] == "deleted"
    assert removed["netns"] == netns
    assert "duration_ms" in removed


# --- I: a snapshot could not hand the pod's netns over --------------------------------------------


async def test_a_pod_whose_netns_a_snapshot_could_not_send_is_retried_at_once(
    w: World, calls: Calls
) -> None:
    await enrolled(w, calls)
    calls.enqueued.clear()

    w.records.snapshot_unsent(UID)

    assert calls.enqueued == [UID]
    assert not w.records.accepted(UID)
    assert w.records.host_elements() == {}
    calls.nack = True  # refused again: pending, out of the host set
    with pytest.raises(RetryableError):
        await w.reconcile(UID)
    assert calls.log == ["rules", "ztunnel_nack", "host_remove", f"status={PENDING}"]
    calls.nack = False
    calls.log.clear()
    await w.reconcile(UID)
    assert calls.log == ["rules", "ztunnel_add", "host_add", f"status={ENABLED}"]


# --- J: Istio's iptables rules --------------------------------------------------------------------


async def test_a_failed_migration_is_retried_until_it_succeeds(calls: Calls) -> None:
    w = build(calls, migration=FakeMigration(calls, failures=1))
    w.store.upsert_pod(pod())
    await w.reconcile(UID)
    await w.reconcile(UID)
    await w.reconcile(UID)
    assert calls.log.count("migrate") == 2


async def test_leaving_the_mesh_removes_istios_rules_before_ours(calls: Calls) -> None:
    w = build(calls, migration=FakeMigration(calls, failures=1))
    await enrolled(w, calls)  # the migration failed: Istio's rules are still there

    w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    await w.reconcile(UID)

    assert calls.log == ["host_remove", "migrate", "remove_rules", "ztunnel_del", "status=None"]


async def test_a_pod_istio_enrolled_and_we_never_did_loses_istios_rules(calls: Calls) -> None:
    w = build(calls, migration=FakeMigration(calls))
    # Annotated by Istio's agent; its namespace is not ambient any more.
    w.store.delete_namespace(Namespace("demo"))
    w.store.upsert_pod(dataclasses.replace(pod(), annotations={c.STATUS_ANNOTATION: ENABLED}))
    await w.reconcile(UID)
    assert calls.log == [
        "host_remove", "locate", "migrate", "remove_rules", "ztunnel_del", "status=None",
    ]  # fmt: skip


async def test_a_pods_host_element_is_never_written_during_a_host_pass(
    w: World, calls: Calls
) -> None:
    await enrolled(w, calls)
    held = w.kernel.hold("host_apply")
    async with asyncio.timeout(WAIT):
        host_pass = asyncio.create_task(w.reconcile(HOST_KEY))
        await held.entered.wait()  # about to write the set it computed, with the pod in it
        w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        leaving = asyncio.create_task(w.reconcile(UID))
        held.release()
        await asyncio.gather(host_pass, leaving)
    # The removal waited for the pass: the pass did not put the element back afterwards.
    assert w.kernel.host_elements == {}
    assert w.records == {}


# --- K: a Del that ztunnel did not ack ------------------------------------------------------------


@pytest.mark.parametrize("leaves", ["deleted", "opted_out"])
async def test_a_failed_del_is_retried_and_the_pod_stays_out_of_snapshots(
    w: World, calls: Calls, leaves: str
) -> None:
    await enrolled(w, calls)
    calls.del_failures = 2
    if leaves == "deleted":
        w.store.delete_pod(pod())
    else:
        w.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))

    for _ in range(2):
        with pytest.raises(RetryableError, match="refused to delete"):
            await w.reconcile(UID)
        assert UID in w.records  # kept until ztunnel acks the Del
        assert w.records.host_elements() == {}
        calls.enqueued.clear()
        assert w.records.snapshot() == []  # a ztunnel that connects now does not get it back
        assert calls.enqueued == [UID]  # and the Del is retried at once on the new connection
    await w.reconcile(UID)

    assert calls.log.count("ztunnel_del_failed") == 2
    assert calls.log[-1] == ("ztunnel_del" if leaves == "deleted" else "status=None")
    assert w.records == {}


async def test_a_failed_del_of_a_vanished_netns_is_sent_again_first(
    w: World, calls: Calls, node: Node
) -> None:
    await enrolled(w, calls)
    node.reuse_pid(node.host)
    calls.located = None
    calls.del_failures = 1

    with pytest.raises(RetryableError, match="refused to delete"):
        await w.reconcile(UID)
    assert w.records.snapshot() == []
    calls.log.clear()
    with pytest.raises(NetnsPendingError):  # the Del went; the pod's netns is still unknown
        await w.reconcile(UID)

    assert calls.log == ["ztunnel_del", "locate"]
    assert w.records.snapshot() == [(pod(), None, None)]


async def test_a_failed_del_of_a_pod_without_a_record_is_retried(w: World, calls: Calls) -> None:
    # Enrolled by an earlier run, and deleted before this one adopted it.
    gone = dataclasses.replace(pod(), annotations={c.STATUS_ANNOTATION: ENABLED})
    w.store.upsert_pod(gone)
    w.store.delete_pod(gone)
    calls.del_failures = 1

    with pytest.raises(RetryableError, match="refused to delete"):
        await w.reconcile(UID)
    assert w.records.snapshot() == []
    await w.reconcile(UID)

    assert calls.log == ["host_remove", "ztunnel_del_failed", "host_remove", "ztunnel_del"]
    assert w.records == {}
