"""What this agent did for each enrolled pod: the reconciler's memory (the kernel has the
details, the API the desired state).

Each record has an explicit `Phase`: how far the order of an add (docs/design.md: rules →
ztunnel → host set → annotation) has come for the pod, and what is left when it goes back.
Besides the reconciler, the ztunnel snapshot (every enrolled pod, at once) and the /proc scan
(which pods still look for their netns) read the records.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.model import Pod, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id

__all__ = ["ENABLED", "PENDING", "Phase", "PodRecord", "PodRecords"]

ENABLED = "enabled"
PENDING = "pending"
"""The values of the pod's status annotation."""


class Phase(enum.Enum):
    """Where a pod stands between ztunnel and the host probe sets.

    PENDING → ACCEPTED (ztunnel acked) → ENROLLED (its IPs written to the host sets). A snapshot
    that could not hand its netns over, or its netns going, makes an ENROLLED pod WITHDRAWING
    until its elements are removed, then PENDING. A nack inside a snapshot changes nothing (as
    in Istio: ztunnel retries the workload itself, and istiod reads `enabled` as captured).
    Only ACCEPTED and ENROLLED pods are in the desired host set: a pending pod's probes must not
    pass while its traffic goes nowhere.
    """

    PENDING = "pending"
    """ztunnel has not accepted the pod; its IPs are not in the host sets."""
    ACCEPTED = "accepted"
    """ztunnel accepted it (an acked Add, or a snapshot); its IPs are not written yet."""
    ENROLLED = "enrolled"
    """Accepted, and its IPs were written to the host sets by this run."""
    WITHDRAWING = "withdrawing"
    """Not accepted any more while its IPs are still in the host sets: they go next."""

    @property
    def accepted(self) -> bool:
        return self in (Phase.ACCEPTED, Phase.ENROLLED)

    @property
    def in_host_set(self) -> bool:
        return self in (Phase.ENROLLED, Phase.WITHDRAWING)


@dataclass
class PodRecord:
    """What this agent did for an enrolled pod."""

    pod: Pod
    netns: str | None = None
    netns_id: NetnsId | None = None
    """The identity of the netns `netns` named when it was found: checked before each use."""
    phase: Phase = Phase.PENDING
    options: PodOptions | None = None
    """The options its rules were last applied with by this run (None: not yet)."""
    status: str | None = None
    adopted: bool = False
    """Enrolled by a previous run of the agent (its rules are verified, never assumed fresh)."""
    istio_rules_gone: bool = False
    """Istio's iptables rules are known to be absent from its netns (removed by the migration,
    or never there: a new sandbox from a CNI ADD)."""
    del_owed: bool = False
    """ztunnel may still hold the workload: a Del failed (nacked, or its connection was lost
    before the ack) or is under way. Snapshots leave the pod out, and its next reconcile sends
    the Del again first."""

    def netns_current(self) -> bool:
        """Whether `netns` still names the netns it named when it was found."""
        return (
            self.netns is not None
            and self.netns_id is not None
            and (netns_id(self.netns) == self.netns_id)
        )

    def accept(self) -> None:
        """ztunnel accepted the pod."""
        self.phase = Phase.ENROLLED if self.phase.in_host_set else Phase.ACCEPTED

    def withdraw(self) -> None:
        """ztunnel does not accept it (any more), or it is going: out of the desired host set
        at once (before anything is awaited, so that a host pass cannot put it back)."""
        self.phase = Phase.WITHDRAWING if self.phase.in_host_set else Phase.PENDING

    def entered_host_set(self) -> None:
        self.phase = Phase.ENROLLED if self.phase.accepted else Phase.WITHDRAWING

    def left_host_set(self) -> None:
        self.phase = Phase.ACCEPTED if self.phase.accepted else Phase.PENDING


class PodRecords(dict[PodUid, PodRecord]):
    """Every enrolled pod's record, by UID. Written by the reconciler (one run per pod at a
    time) and by `adopt` before the workers start."""

    def __init__(self, *, store: ClusterStore, policy: EnrollmentPolicy) -> None:
        super().__init__()
        self._store = store
        self._policy = policy

    def accepted(self, uid: PodUid) -> bool:
        """Whether ztunnel has accepted the pod (its rules are in place)."""
        record = self.get(uid)
        return record is not None and record.phase.accepted

    def adopt(self, pod: Pod, netns: str | None) -> None:
        """After a restart: a pod the API says we enrolled (annotation), its netns from the scan.
        Its rules are then verified (and only repaired where they drifted) by the reconciler."""
        status = pod.annotations.get(c.STATUS_ANNOTATION)
        identity = None if netns is None else netns_id(netns)
        self[pod.uid] = PodRecord(
            pod=pod,
            netns=netns if identity is not None else None,
            netns_id=identity,
            phase=Phase.ACCEPTED if status == ENABLED else Phase.PENDING,
            status=status,
            adopted=True,
        )

    def host_elements(self) -> dict[str, PodUid]:
        """The desired host set: every IP of every pod that ztunnel accepted."""
        return {ip: r.pod.uid for r in self.values() if r.phase.accepted for ip in r.pod.ips}

    def snapshot(self) -> list[tuple[Pod, str | None, NetnsId | None]]:
        """Every enrolled pod with its netns path and identity, for the ztunnel snapshot (netns
        None: sent as Keep). A ztunnel just connected: pods it had not accepted yet would wait
        out a retry backoff of up to 30 s, pending and without their host set entry (probes),
        so they are retried now (their Add is queued behind this snapshot on the connection).
        A pod that owes a Del is left out (the new ztunnel must not get it back) and retried now
        too: its Del to the new connection is then a no-op.

        A path that no longer names the pod's netns is never sent: the pod goes as Keep and is
        reconciled at once (which finds out where its netns went)."""
        out: list[tuple[Pod, str | None, NetnsId | None]] = []
        for record in self.values():
            netns = record.netns
            if record.del_owed:
                self._store.touch(record.pod.uid)
                continue
            if not record.phase.accepted or (netns is not None and not record.netns_current()):
                self._store.touch(record.pod.uid)
            if netns is not None and not record.netns_current():
                netns = None
            out.append((record.pod, netns, record.netns_id if netns is not None else None))
        return out

    def snapshot_unsent(self, uid: PodUid) -> None:
        """A snapshot could not open the pod's netns (it went as Keep): not accepted any more,
        retried at once."""
        record = self.get(uid)
        if record is not None:
            record.withdraw()
            self._store.touch(uid)

    def unlocated(self) -> Mapping[PodUid, Collection[str]]:
        """Pods to enroll whose netns is not known yet, with their IPs (one /proc scan looks
        for all of them)."""
        return {
            uid: pod.ips
            for uid, pod in self._store.pods.items()
            if pod.ips
            and (uid not in self or self[uid].netns is None)
            and self._policy.decide(pod, self._store.namespace_of(pod)).enrolled
        }
