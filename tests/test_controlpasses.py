"""Start-up and the periodic drift pass on the fake kernel: adoption of what a previous run
enrolled, one verification of every pod, and a repair of what drifted, without root."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes import AcceptingZtunnel, Annotations, Unobserved
from ztunnel_redirect.control.driftpass import DriftPass
from ztunnel_redirect.control.hosthandover import HostHandover
from ztunnel_redirect.control.reconciler import HOST_KEY, Reconciler
from ztunnel_redirect.control.records import ENABLED, Phase, PodRecords
from ztunnel_redirect.control.startup import Startup
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.control.workqueue import FakeClock, KeyedQueue
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.model import HostOptions, Namespace, Pod, PodUid
from ztunnel_redirect.testing.fakekernel import FakeKernel

UID = PodUid("u-1")
IP = "10.0.0.7"
OPTIONS = HostOptions(kubelet_uid=1)
WAIT = 5.0


class Scan:
    """`ports.NetnsLocator` and `ports.NetnsSurvey`: every pod's netns is `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def locate(self, pod: Pod) -> str | None:
        return self.path

    async def find_all(self, pods: Collection[Pod]) -> dict[PodUid, str]:
        return {pod.uid: self.path for pod in pods}


@dataclass(frozen=True)
class Report:
    postponed: tuple[str, ...] = ()


class NoIstio:
    """`ports.HostMigration` on a node without Istio's host rules: installs ours, nothing else."""

    async def migrate_host(
        self, netns: str, install: Callable[[], Iterable[object]], *, node_ips: Collection[str] = ()
    ) -> Report:
        install()
        return Report()


@dataclass
class Passes:
    """Records what the drift pass reports."""

    connections: list[int] = dataclasses.field(default_factory=list)
    passes: int = 0
    live_connections: int = 1

    def set_ztunnel_connections(self, count: int) -> None:
        self.connections.append(count)

    def mark_pass(self, at: float | None = None) -> None:
        self.passes += 1


@dataclass
class Node:
    store: ClusterStore
    records: PodRecords
    kernel: FakeKernel
    queue: KeyedQueue[str]
    startup: Startup
    drift_pass: DriftPass
    passes: Passes
    netns: str


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    netns = tmp_path / "pod"
    netns.touch()
    scan = Scan(str(netns))
    policy = EnrollmentPolicy(node_name="n")
    store = ClusterStore()
    records = PodRecords(store=store, policy=policy)
    kernel = FakeKernel()
    observer = Unobserved()
    reconciler = Reconciler(
        store=store,
        records=records,
        policy=policy,
        pod_rules=kernel.pod_rules,
        host_rules=kernel.host_rules,
        host_options=OPTIONS,
        ztunnel=AcceptingZtunnel(),
        status=Annotations(),
        locator=scan,
        observer=observer,
    )
    queue = KeyedQueue[str](handler=reconciler.reconcile, concurrency=2, clock=FakeClock())
    store.subscribe(queue.enqueue)
    passes = Passes()
    handover = HostHandover(
        reconciler=reconciler,
        store=store,
        policy=policy,
        host_rules=kernel.host_rules,
        migration=NoIstio(),
        host_options=OPTIONS,
        netns="/proc/1/ns/net",
        observer=observer,
    )
    the_node = Node(
        store=store,
        records=records,
        kernel=kernel,
        queue=queue,
        startup=Startup(store=store, records=records, locator=scan, queue=queue),
        drift_pass=DriftPass(
            queue=queue,
            records=records,
            handover=handover,
            observer=passes,
            ztunnel=passes,
            period=WAIT,
        ),
        passes=passes,
        netns=str(netns),
    )
    store.replace_namespaces([Namespace("demo", {c.ENROLL_LABEL: c.ENROLL_VALUE})])
    task = asyncio.create_task(queue.run())
    try:
        yield the_node
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def pod(**annotations: str) -> Pod:
    return Pod(
        uid=UID, name="web", namespace="demo", node_name="n", ips=(IP,), annotations=annotations
    )


async def test_a_pod_a_previous_run_enrolled_is_adopted_and_verified(node: Node) -> None:
    options, _ = EnrollmentPolicy(node_name="n").pod_options(pod())
    node.kernel.pods[node.netns] = options  # what the previous run installed
    node.store.replace_pods([pod(**{c.STATUS_ANNOTATION: ENABLED})])

    await node.startup.adopt()
    assert node.records[UID].adopted
    assert node.records[UID].phase is Phase.ACCEPTED  # ztunnel gets it in the snapshot
    async with asyncio.timeout(WAIT):
        await node.startup.verify()

    assert node.records[UID].phase is Phase.ENROLLED
    assert node.kernel.pods == {node.netns: options}
    assert node.kernel.host_elements == {IP: UID}


async def test_the_drift_pass_repairs_a_flushed_pod_and_a_lost_host_element(node: Node) -> None:
    node.store.replace_pods([pod()])
    async with asyncio.timeout(WAIT):
        await node.startup.verify()
        await node.queue.handle_now(HOST_KEY)
    node.kernel.flush_pod(node.netns)
    node.kernel.drop_host_element(IP)

    async with asyncio.timeout(WAIT):
        await node.drift_pass.run_once()

    assert node.kernel.pods.keys() == {node.netns}
    assert node.kernel.host_elements == {IP: UID}
    assert (node.passes.passes, node.passes.connections) == (1, [1])
