"""Handing the host over from Istio's iptables backend, on the fake kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakes import AcceptingZtunnel, Annotations, Unobserved
from ztunnel_redirect.control.hosthandover import HostHandover
from ztunnel_redirect.control.reconciler import Reconciler
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.model import HostOptions, Namespace, Pod, PodUid
from ztunnel_redirect.testing.fakekernel import FakeKernel, Hold

UID = PodUid("u-1")
IP = "10.0.0.7"
OPTIONS = HostOptions(kubelet_uid=1)
WAIT = 5.0


@dataclass(frozen=True)
class Report:
    postponed: tuple[str, ...] = ()


@dataclass
class IstioHost:
    """`ports.HostMigration`: installs ours with `install`, then says what `outcome` says."""

    hold: Hold | None = None
    """Held after it was called, before it installs (what runs meanwhile)."""
    outcome: Report | Exception = field(default_factory=Report)
    calls: int = 0

    async def migrate_host(
        self, netns: str, install: Callable[[], Iterable[object]], *, node_ips: Collection[str] = ()
    ) -> Report:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if isinstance(self.outcome, Exception):
            raise self.outcome
        install()
        return self.outcome


class Located:
    def __init__(self, path: str) -> None:
        self.path = path

    async def locate(self, pod: Pod) -> str | None:
        return self.path


@dataclass
class Host:
    store: ClusterStore
    kernel: FakeKernel
    reconciler: Reconciler
    observer: Unobserved

    def handover(self, migration: IstioHost) -> HostHandover:
        return HostHandover(
            reconciler=self.reconciler,
            store=self.store,
            policy=EnrollmentPolicy(node_name="n"),
            host_rules=self.kernel.host_rules,
            migration=migration,
            host_options=OPTIONS,
            netns="/proc/1/ns/net",
            observer=self.observer,
        )


def pod(**labels: str) -> Pod:
    return Pod(uid=UID, name="web", namespace="demo", node_name="n", ips=(IP,), labels=labels)


@pytest.fixture
async def host(tmp_path: Path) -> Host:
    netns = tmp_path / "pod"
    netns.touch()
    policy = EnrollmentPolicy(node_name="n")
    store = ClusterStore()
    kernel = FakeKernel()
    observer = Unobserved()
    reconciler = Reconciler(
        store=store,
        records=PodRecords(store=store, policy=policy),
        policy=policy,
        pod_rules=kernel.pod_rules,
        host_rules=kernel.host_rules,
        host_options=OPTIONS,
        ztunnel=AcceptingZtunnel(),
        status=Annotations(),
        locator=Located(str(netns)),
        observer=observer,
    )
    store.upsert_namespace(Namespace("demo", {c.ENROLL_LABEL: c.ENROLL_VALUE}))
    store.upsert_pod(pod())
    await reconciler.reconcile(UID)
    assert kernel.host_elements == {IP: UID}
    return Host(store, kernel, reconciler, observer)


async def test_a_pod_removed_during_the_handover_stays_removed(host: Host) -> None:
    """The handover writes the whole host table; a pod leaving meanwhile must not come back."""
    migration = IstioHost(hold=Hold())
    assert migration.hold is not None
    async with asyncio.timeout(WAIT):
        handing_over = asyncio.create_task(host.handover(migration).run())
        await migration.hold.entered.wait()
        host.store.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
        leaving = asyncio.create_task(host.reconciler.reconcile(UID))
        migration.hold.release()
        await asyncio.gather(handing_over, leaving)
    assert host.kernel.host_elements == {}


async def test_a_postponed_handover_is_tried_again_and_a_failed_one_is_given_up(
    host: Host,
) -> None:
    migration = IstioHost(outcome=Report(postponed=("10.0.0.9",)))
    handover = host.handover(migration)
    await handover.run()
    assert handover.due
    migration.outcome = KernelError("iptables-nft-restore failed")
    await handover.run()
    assert not handover.due
    assert host.observer.failures == ["migration"]
    await handover.run()
    assert migration.calls == 2
