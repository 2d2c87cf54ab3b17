"""Handing the host over from Istio's iptables backend: its probe SNAT rules and ipsets go once
our host sets cover its pods of this node (`migration.migrate_host_here` says why and how).

Tried after the start-up verification and after every drift pass while it is postponed; given
up for good after a failure (reported: Istio's rules stay, and so does the SNAT they do).
"""

from __future__ import annotations

import structlog

from ztunnel_redirect.control.ports import (
    HostElements,
    HostMigration,
    HostReport,
    HostRuleWriter,
    Observer,
)
from ztunnel_redirect.control.reconciler import Reconciler
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.core.model import HostOptions

__all__ = ["HostHandover"]

log = structlog.get_logger(__name__)


class HostHandover:
    def __init__(
        self,
        *,
        reconciler: Reconciler,
        store: ClusterStore,
        policy: EnrollmentPolicy,
        host_rules: HostRuleWriter,
        migration: HostMigration,
        host_options: HostOptions,
        netns: str,
        observer: Observer,
    ) -> None:
        self._reconciler = reconciler
        self._store = store
        self._policy = policy
        self._host_rules = host_rules
        self._migration = migration
        self._host_options = host_options
        self._netns = netns
        self._observer = observer
        self.due = True
        """Istio's host rules may still be there (the handover was not done nor given up)."""

    async def run(self) -> None:
        """Hand over if it is due; postponed (stays due) while this node's pods to be enrolled
        are in Istio's probe sets and not in ours yet."""
        if not self.due:
            return
        try:
            # Under the host-write lock, with the host set taken there: a pod added or removed
            # meanwhile would otherwise be undone by the table this writes.
            report = await self._reconciler.write_host(self._migrate)
        except RedirectError as exc:
            self._observer.count_failure("migration")
            log.warning("istio_host_migration_failed", reason=str(exc))
            self.due = False
            return
        self.due = bool(report.postponed)

    async def _migrate(self, elements: HostElements) -> HostReport:
        install = self._host_rules.installer(self._host_options, elements)
        return await self._migration.migrate_host(
            self._netns, install, node_ips=self._ips_to_enroll()
        )

    def _ips_to_enroll(self) -> set[str]:
        """The IPs of this node's pods that are to be enrolled (whether they are yet or not)."""
        return {
            ip
            for pod in self._store.pods.values()
            if self._policy.decide(pod, self._store.namespace_of(pod)).enrolled
            for ip in pod.ips
        }
