"""The reconciler: one level-triggered function that brings a pod (or the host) to what the API
says, whatever brought it here (watch event, CNI ADD, kernel notification, periodic drift pass,
agent restart).

Event handlers only record what changed (`store.ClusterStore`), which enqueues the pod's key;
a worker of the keyed queue runs `reconcile(key)`, which reads the current desired state, reads
the kernel, and writes only what differs. Add and remove follow docs/design.md §6:

add:    netns → pod rules + routing → ztunnel Add (ack) → host set → annotation `enabled`
        (no ztunnel or a nack: annotation `pending`, retried with backoff); the annotation is
        written behind the run (`statuswrites`), so a CNI ADD does not wait for the API
remove: host set → pod rules + routing (if the pod still runs) → ztunnel Del → annotation removed
        (a Del nacked or not acked fails the run: retried with backoff, see `_ztunnel_del`)

A pod's netns is named by a path, and a path found by the /proc scan (`/proc/<pid>/ns/net`) names
whatever netns that pid is in now: the pid may exit and be reused, even by a host process. So the
netns identity (st_dev, st_ino) is recorded when the path is found, and every use passes it
along: the worker that opens the path compares it with the opened fd before entering or sending
it, so a path that no longer names the pod's netns is never written to, even when the pid is
reused between a check and the use. When the netns of an enrolled pod
is gone, its host set elements and ztunnel workload go too, and the pod is looked for again.

Every collaborator is an interface, wired in `agent.py`; tests use fakes or the real thing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, TypeVar

import structlog

from ztunnel_redirect.control.ports import (
    HostElements,
    HostRuleWriter,
    Migration,
    NetnsLocator,
    Observer,
    PodRuleWriter,
    StatusWriter,
    Ztunnel,
)
from ztunnel_redirect.control.records import ENABLED, PENDING, Phase, PodRecord, PodRecords
from ztunnel_redirect.control.store import ClusterStore, Sandbox
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import NetnsNotFoundError, RedirectError, RetryableError
from ztunnel_redirect.core.model import HostOptions, Pod, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id

log = structlog.get_logger(__name__)

HOST_KEY: Final = "host"
"""The work-queue key of the host rules (pod keys are pod UIDs)."""

T = TypeVar("T")


class NetnsPendingError(RetryableError):
    """The pod's network namespace was not found yet (retried with backoff)."""


def _why_gone(path: str | None) -> str:
    """`netns_gone` when nothing is at `path` any more; `replaced` when it names another netns
    (a reused pid): the reason logged with `netns_vanished`."""
    return "netns_gone" if path is None or netns_id(path) is None else "replaced"


class Reconciler:
    def __init__(
        self,
        *,
        store: ClusterStore,
        records: PodRecords,
        policy: EnrollmentPolicy,
        pod_rules: PodRuleWriter,
        host_rules: HostRuleWriter,
        host_options: HostOptions,
        ztunnel: Ztunnel,
        status: StatusWriter,
        locator: NetnsLocator,
        observer: Observer,
        migration: Migration | None = None,
        repair_on_startup: bool = True,
    ) -> None:
        """`repair_on_startup=False` (AMBIENT_RECONCILE_POD_RULES_ON_STARTUP=false): the first
        look at a pod enrolled by a previous run only reports drift; the next periodic pass
        repairs it."""
        self._store = store
        self._policy = policy
        self._pod_rules = pod_rules
        self._host_rules = host_rules
        self._host_options = host_options
        self._ztunnel = ztunnel
        self._status = status
        self._locator = locator
        self._observer = observer
        self._migration = migration
        self._repair_on_startup = repair_on_startup
        self.records = records
        self._host_writes = asyncio.Lock()
        """Host set writes one at a time: a host pass writes the set it computed, and a pod's
        element added or removed meanwhile (on another netns worker) would be undone."""

    # --- entry points ---

    async def reconcile(self, key: str) -> None:
        """Bring one pod (or the host, for HOST_KEY) to its desired state. The keyed queue is
        the only caller once it runs: one run per key at a time."""
        if key == HOST_KEY:
            await self._timed("host", self._reconcile_host())
        else:
            await self._reconcile_pod(PodUid(key))

    async def write_host(self, write: Callable[[HostElements], Awaitable[T]]) -> T:
        """Run `write` with the desired host set, taken under the host-write lock and held
        until it returns: no pod's element is added or removed meanwhile, so what `write` puts
        in the host table cannot undo one (the Istio host migration writes the table too)."""
        async with self._host_writes:
            return await write(self.records.host_elements())

    # --- pods ---

    async def _reconcile_pod(self, uid: PodUid) -> None:
        pod = self._store.pods.get(uid)
        if pod is None:
            gone = self._store.take_deleted(uid)
            record = self.records.get(uid)
            last = record.pod if record is not None else gone
            if last is not None and (
                record is not None or last.annotations.get(c.STATUS_ANNOTATION)
            ):
                with structlog.contextvars.bound_contextvars(pod=last.key, pod_uid=uid):
                    await self._timed(
                        "remove", self._remove(uid, last, running=False, reason="deleted")
                    )
            return
        sandbox = self._store.take_sandbox(uid)
        if sandbox is not None:
            self._use_sandbox(pod, sandbox)
        decision = self._policy.decide(pod, self._store.namespace_of(pod))
        if decision.enrolled:
            record = self.records.get(uid)
            # "check": the periodic verification of a pod that is set up; "add": an install.
            set_up = (
                record is not None
                and record.phase.accepted
                and (record.options is not None or record.adopted)
            )
            with structlog.contextvars.bound_contextvars(pod=pod.key, pod_uid=uid):
                await self._timed("check" if set_up else "add", self._enroll(pod))
        elif uid in self.records or pod.annotations.get(c.STATUS_ANNOTATION):
            reason = decision.reason.value
            with structlog.contextvars.bound_contextvars(pod=pod.key, pod_uid=uid):
                log.info("pod_leaving_mesh", reason=reason)
                await self._timed("remove", self._remove(uid, pod, running=True, reason=reason))

    def _use_sandbox(self, pod: Pod, sandbox: Sandbox) -> None:
        """A new sandbox the runtime reported (CNI ADD): its netns is the pod's from now on."""
        record = self.records.get(pod.uid)
        if record is not None and record.netns == sandbox.netns:
            return
        if record is not None and record.netns is not None:
            self._pod_rules.forget(record.netns)  # the pod's previous sandbox
        self.records[pod.uid] = PodRecord(
            pod=pod, netns=sandbox.netns, netns_id=sandbox.identity, istio_rules_gone=True
        )

    async def _netns_of(self, record: PodRecord, pod: Pod) -> str:
        """The path of the pod's netns, checked to still name the netns it named when found.

        A path that names another netns now (a reused pid), or nothing, is never used again: the
        pod's netns is looked for again (the scan verifies it by the pod's IPs). When that finds
        the same netns under another path, nothing else changes; otherwise the pod's netns is
        gone, and so go its host set elements and ztunnel workload (`_netns_gone`).
        """
        if record.netns is not None and record.netns_current():
            return record.netns
        stale = record.netns
        if stale is not None:
            self._pod_rules.forget(stale)
        found = await self._locator.locate(pod)
        identity = None if found is None else netns_id(found)
        if record.netns_id is not None and identity != record.netns_id:
            await self._netns_gone(record, stale, reason=_why_gone(stale))
        if found is None or identity is None:
            record.netns = None
            raise NetnsPendingError(f"network namespace of pod {pod.key} not found yet")
        record.netns, record.netns_id = found, identity
        log.info("netns_found", netns=found)
        return found

    async def _netns_gone(self, record: PodRecord, netns: str | None, *, reason: str) -> None:
        """The pod's netns is gone (its pod object is not): what pointed at it goes, and the pod
        looks for its netns again (a new sandbox is found by CNI ADD or the scan)."""
        listed = record.phase is not Phase.PENDING
        # Out of the desired host set before anything is awaited: a host pass running meanwhile
        # must not put back the element being removed.
        record.withdraw()
        removed: list[str] = []
        if listed:
            removed = await self._host_remove(record.pod.ips, record.pod.uid)
            record.left_host_set()
            record.del_owed = True
        if netns is not None:
            self._pod_rules.forget(netns)
        record.netns = record.netns_id = record.options = None
        record.phase = Phase.PENDING
        record.adopted = record.istio_rules_gone = False
        log.info("netns_vanished", netns=netns, reason=reason, host_elements=len(removed))
        if record.del_owed:
            await self._ztunnel_del(record.pod.uid, record)

    async def _ztunnel_del(self, uid: PodUid, record: PodRecord | None) -> None:
        """Del the pod from every ztunnel. A nack, or a connection lost before its ack, raises
        (retryable): the pod's run fails and the queue retries it with backoff, sending the Del
        again, until every connection acks it or none has the pod (a ztunnel that reconnected
        got a snapshot without it: `PodRecords.snapshot` leaves out a pod that owes a Del)."""
        if record is not None:
            record.del_owed = True
        await self._ztunnel.del_workload(uid)
        if record is not None:
            record.del_owed = False

    async def _enroll(self, pod: Pod) -> None:
        record = self.records.get(pod.uid)
        if record is None:
            record = self.records[pod.uid] = PodRecord(pod=pod)
        if record.del_owed:  # ztunnel may hold a workload of the pod that should be gone
            await self._ztunnel_del(pod.uid, record)
        options, warnings = self._policy.pod_options(pod)
        for warning in warnings:
            log.warning("pod_annotation_ignored", reason=warning)
        netns = await self._netns_of(record, pod)
        ips_changed = record.pod.ips != pod.ips
        record.pod = pod
        started = time.perf_counter()
        fresh = record.options is None and not record.adopted
        try:
            if record.options is None and record.adopted and not self._repair_on_startup:
                drifts = await self._pod_rules.check(netns, options, identity=record.netns_id)
                if drifts:
                    log.warning(
                        "startup_drift_found",
                        netns=netns,
                        reason=",".join(sorted({d.kind.value for d in drifts})),
                        changes=len(drifts),
                    )
                    drifts = []
            else:
                drifts = await self._pod_rules.apply(
                    netns, options, fresh=fresh, identity=record.netns_id
                )
            if not record.istio_rules_gone:
                record.istio_rules_gone = await self._migrate(netns, options, record.netns_id)
        except NetnsNotFoundError:
            # The sandbox was replaced (or the pod is going): find its netns again.
            await self._netns_gone(record, netns, reason=_why_gone(netns))
            raise
        self._report(drifts, fresh=fresh, netns=netns, started=started)
        record.options = options
        if not record.phase.accepted:
            try:
                await self._add_to_ztunnel(record, netns)
            except NetnsNotFoundError:
                await self._netns_gone(record, netns, reason=_why_gone(netns))
                raise
        if not record.phase.in_host_set or ips_changed:
            # Once per pod: the host pass keeps the set right afterwards (a check writes nothing).
            await self._host_add(pod)
            record.entered_host_set()
        if ips_changed:
            self._enqueue_host_check()
        await self._set_status(record, ENABLED)
        self._observer.set_pods_enrolled(len(self.records))

    async def _migrate(self, netns: str, options: PodOptions, identity: NetnsId | None) -> bool:
        """A pod running before we saw it may carry Istio's iptables-backend rules: ours are in
        place now, theirs go. Returns whether Istio's rules are gone (or were never there).

        A failure leaves both in place (the pod stays redirected), is reported, and is tried
        again by the pod's next reconcile (detection only reads: a pod without Istio's rules
        costs a read). Also used when a pod leaves the mesh, before our rules go: the migration
        puts ours in place (they are) and removes Istio's, which would otherwise keep
        redirecting the pod to ztunnel's ports.
        """
        if self._migration is None:
            return True
        try:
            await self._migration.migrate_pod(netns, options, identity=identity)
        except NetnsNotFoundError:
            raise
        except RedirectError as exc:
            self._observer.count_failure("migration")
            log.warning("istio_migration_failed", netns=netns, reason=str(exc))
            return False
        return True

    def _report(self, drifts: list[Drift], *, fresh: bool, netns: str, started: float) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        if fresh:
            log.info("pod_rules_applied", netns=netns, changes=len(drifts), duration_ms=duration_ms)
            return
        if not drifts:
            return
        for drift in drifts:
            self._observer.count_repair(drift.kind.value)
        log.info(
            "drift_repaired",
            netns=netns,
            reason=",".join(sorted({d.kind.value for d in drifts})),
            changes=len(drifts),
            detail=[str(d) for d in drifts[:5]],
            duration_ms=duration_ms,
        )

    async def _add_to_ztunnel(self, record: PodRecord, netns: str) -> None:
        started = time.perf_counter()
        try:
            await self._ztunnel.add_workload(record.pod, netns, identity=record.netns_id)
        except RetryableError as exc:
            log.warning("ztunnel_add_failed", reason=str(exc))
            if record.phase.in_host_set:
                # Accepted before (e.g. refused in a snapshot since): pending pods are not in
                # the host set (docs/design.md §6).
                await self._host_remove(record.pod.ips, record.pod.uid)
                record.left_host_set()
            await self._set_status(record, PENDING)
            raise
        record.accept()
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        log.info("ztunnel_accepted_pod", netns=netns, duration_ms=duration_ms)

    async def _set_status(self, record: PodRecord, value: str | None) -> None:
        if record.status == value and record.pod.annotations.get(c.STATUS_ANNOTATION) == value:
            return
        await self._status.set_redirection_status(record.pod, value)
        record.status = value
        log.info("pod_status_set", status=value, netns=record.netns)

    async def _remove(self, uid: PodUid, pod: Pod, *, running: bool, reason: str) -> None:
        started = time.perf_counter()
        record = self.records.get(uid)
        if record is not None:
            record.withdraw()  # out of the desired host set (see `_netns_gone`)
            record.del_owed = True  # and out of any snapshot from now on
        ips = record.pod.ips if record else pod.ips
        removed = await self._host_remove(ips, uid)
        netns = record.netns if record is not None else None
        identity = record.netns_id if record is not None else None
        if running:
            if record is None or not record.netns_current():
                netns = await self._locator.locate(pod)  # never a path naming another netns
                identity = None if netns is None else netns_id(netns)
            if netns is not None:
                try:
                    await self._remove_rules(netns, identity, pod, record)
                except NetnsNotFoundError:
                    log.info("netns_vanished", netns=netns, reason="netns_gone")
        try:
            await self._ztunnel_del(uid, record)
        except RetryableError:
            if record is None:  # what the retry needs: a deleted pod's object is gone by then
                self.records[uid] = PodRecord(pod=pod, del_owed=True)
            raise
        if running:
            await self._status.set_redirection_status(pod, None)
        if record is not None and record.netns is not None:
            self._pod_rules.forget(record.netns)  # what we remembered of a netns that is going
        self.records.pop(uid, None)
        self._observer.set_pods_enrolled(len(self.records))
        log.info(
            "pod_removed",
            netns=netns,
            reason=reason,
            host_elements=len(removed),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    async def _remove_rules(
        self, netns: str, identity: NetnsId | None, pod: Pod, record: PodRecord | None
    ) -> None:
        """Ours go, and Istio's iptables rules if it had enrolled the pod (or our migration of
        them failed): left alone, they would keep redirecting the pod to ztunnel's ports."""
        if record is None or not record.istio_rules_gone:
            options = record.options if record is not None else None
            if options is None:
                options, _ = self._policy.pod_options(pod)
            await self._migrate(netns, options, identity)
        await self._pod_rules.remove(netns, identity=identity)

    # --- host ---

    async def _host_add(self, pod: Pod) -> None:
        async with self._host_writes:
            await self._host_rules.add_pod(
                pod.ips,
                pod.uid,
                ipv6=self._host_options.ipv6,
                branch_eni_probe=self._host_options.aws_branch_eni_probe,
            )

    async def _host_remove(self, ips: Sequence[str], uid: PodUid) -> list[str]:
        async with self._host_writes:
            return await self._host_rules.remove_pod(
                ips, uid, branch_eni_probe=self._host_options.aws_branch_eni_probe
            )

    def _enqueue_host_check(self) -> None:
        self._store.touch(HOST_KEY)

    async def _reconcile_host(self) -> None:
        started = time.perf_counter()
        async with self._host_writes:
            drifts = await self._host_rules.apply(self._host_options, self.records.host_elements())
        for drift in drifts:
            self._observer.count_repair(drift.kind.value)
        if drifts:
            log.info(
                "host_drift_repaired",
                reason=",".join(sorted({d.kind.value for d in drifts})),
                changes=len(drifts),
                detail=[str(d) for d in drifts[:5]],
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )

    async def _timed(self, kind: str, work: Awaitable[None]) -> None:
        started = time.perf_counter()
        try:
            await work
        finally:
            self._observer.observe_reconcile(kind, time.perf_counter() - started)


def enrolled_by_annotation(pods: Iterable[Pod]) -> list[Pod]:
    """Pods that a previous run of the agent enrolled (restart: rebuild state from the API)."""
    return [p for p in pods if p.annotations.get(c.STATUS_ANNOTATION) in (ENABLED, PENDING)]
