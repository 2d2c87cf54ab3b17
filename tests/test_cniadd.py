"""A CNI ADD through the keyed queue, on the fake kernel: resolution of the event's pod, the one
way into the reconciler (`handle_now`), and the answer the plugin gets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes import AcceptingZtunnel, Annotations, NoNetns, Unobserved
from ztunnel_redirect.control.cniadd import SETTLE_S, CniAdd, PodStarts, same_pod
from ztunnel_redirect.control.reconciler import Reconciler
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.control.workqueue import FakeClock, KeyedQueue
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import ConfigError, RetryableError, retryable
from ztunnel_redirect.core.model import CniAddEvent, HostOptions, Namespace, Pod, PodUid
from ztunnel_redirect.testing.fakekernel import FakeKernel

NS = "demo"
UID = PodUid("u-1")
WAIT = 5.0


class Api:
    """`ports.PodReader`: the API server's pods and namespaces."""

    def __init__(self) -> None:
        self.pods: list[Pod] = []
        self.namespaces: list[Namespace] = []

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        return next((p for p in self.pods if (p.namespace, p.name) == (namespace, name)), None)

    async def get_namespace(self, name: str) -> Namespace | None:
        return next((n for n in self.namespaces if n.name == name), None)


@dataclass
class Node:
    store: ClusterStore
    records: PodRecords
    kernel: FakeKernel
    ztunnel: AcceptingZtunnel
    api: Api
    queue: KeyedQueue[str]
    cni_add: CniAdd
    netns: str
    starts: PodStarts
    clock: FakeClock


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    netns = tmp_path / "cni-1"
    netns.touch()
    policy = EnrollmentPolicy(node_name="n")
    store = ClusterStore()
    records = PodRecords(store=store, policy=policy)
    kernel = FakeKernel()
    ztunnel = AcceptingZtunnel()
    reconciler = Reconciler(
        store=store,
        records=records,
        policy=policy,
        pod_rules=kernel.pod_rules,
        host_rules=kernel.host_rules,
        host_options=HostOptions(kubelet_uid=1),
        ztunnel=ztunnel,
        status=Annotations(),
        locator=NoNetns(),
        observer=Unobserved(),
    )
    queue = KeyedQueue[str](
        handler=reconciler.reconcile, concurrency=2, retryable=retryable, clock=FakeClock()
    )
    store.subscribe(queue.enqueue)
    api = Api()
    clock = FakeClock()
    starts = PodStarts(clock=clock)
    cni_add = CniAdd(
        store=store,
        api=api,
        policy=policy,
        queue=queue,
        records=records,
        observe=lambda _s: None,
        starts=starts,
    )
    task = asyncio.create_task(queue.run())
    try:
        yield Node(store, records, kernel, ztunnel, api, queue, cni_add, str(netns), starts, clock)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def ambient(name: str = NS) -> Namespace:
    return Namespace(name, {c.ENROLL_LABEL: c.ENROLL_VALUE})


def web(uid: str = UID, **annotations: str) -> Pod:
    return Pod(uid=PodUid(uid), name="web-0", namespace=NS, node_name="n", annotations=annotations)


def event(node: Node, uid: str | None = UID) -> CniAddEvent:
    return CniAddEvent(
        netns=node.netns,
        pod_name="web-0",
        pod_namespace=NS,
        ips=("10.0.0.7",),
        pod_uid=None if uid is None else PodUid(uid),
    )


async def add(node: Node, uid: str | None = UID) -> None:
    async with asyncio.timeout(WAIT):
        await node.cni_add.handle(event(node, uid))


async def test_a_new_sandbox_is_redirected_before_the_answer(node: Node) -> None:
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(web())  # the watch has not seen the sandbox's IPs yet

    await add(node)

    assert node.kernel.pods.keys() == {node.netns}
    assert node.ztunnel.added == [UID]
    assert node.kernel.host_elements == {"10.0.0.7": UID}
    assert node.store.pods[UID].ips == ("10.0.0.7",)  # the runtime's IPs, kept
    assert node.records[UID].istio_rules_gone  # a new sandbox: no migration needed


async def test_pod_starts_pause_once_the_add_was_answered_a_moment_ago(node: Node) -> None:
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(web())
    await add(node)
    assert len(node.starts) == 0

    quiet = asyncio.create_task(node.starts.quiet())
    try:
        async with asyncio.timeout(WAIT):
            await node.clock.wait_sleeping()
        assert node.clock.sleeping == [SETTLE_S]  # the ADD was counted, and just ended
        node.clock.advance(SETTLE_S)
        async with asyncio.timeout(WAIT):
            await quiet
    finally:
        quiet.cancel()


async def test_an_event_without_ips_takes_the_pods_ips_from_the_api(node: Node) -> None:
    # Istio's plugin sends `"IPs": null` when it has no prevResult.
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(dataclasses.replace(web(), ips=("10.0.0.9",)))

    async with asyncio.timeout(WAIT):
        await node.cni_add.handle(dataclasses.replace(event(node), ips=()))

    assert node.ztunnel.added == [UID]
    assert node.kernel.host_elements == {"10.0.0.9": UID}


async def test_a_pod_and_namespace_the_cache_lacks_are_read_from_the_api(node: Node) -> None:
    node.api.pods.append(web())
    node.api.namespaces.append(ambient())

    await add(node)

    assert node.store.namespaces[NS] == ambient()  # through the store, which enqueued its pods
    assert node.records.accepted(UID)


async def test_a_pod_not_for_the_mesh_is_answered_at_once(node: Node) -> None:
    node.store.upsert_namespace(Namespace(NS))
    node.store.upsert_pod(web())

    await add(node)

    assert node.kernel.pods == {}
    assert node.kernel.log == []


async def test_a_refused_pod_fails_the_add_and_is_retried_by_the_queue(node: Node) -> None:
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(web())
    node.ztunnel.refuse = True

    with pytest.raises(RetryableError, match="nack"):
        await add(node)

    assert node.kernel.pods.keys() == {node.netns}  # rules first, then ztunnel
    assert node.kernel.host_elements == {}
    assert node.queue.retrying == {UID}
    node.ztunnel.refuse = False
    await add(node)  # the runtime's retry: a backoff does not hold it up
    assert node.records.accepted(UID)


async def test_a_namesake_in_the_cache_is_not_taken_for_the_new_pod(node: Node) -> None:
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(web("u-old"))  # deleted and recreated: the cache is behind
    node.api.pods.append(web())

    await add(node)

    assert node.records.accepted(UID)
    assert PodUid("u-old") not in node.records


async def test_a_pod_unknown_to_the_api_is_retried_by_the_runtime(node: Node) -> None:
    with pytest.raises(RetryableError, match="not found"):
        await add(node)


async def test_an_error_that_cannot_heal_is_not_retried(node: Node) -> None:
    node.store.upsert_namespace(ambient())
    node.store.upsert_pod(web())
    node.kernel.fail("host_add", ConfigError("invalid pod UID"))

    with pytest.raises(ConfigError):
        await add(node)

    assert node.queue.retrying == frozenset()


@pytest.mark.parametrize(
    ("annotations", "uid", "same"),
    [
        ({}, None, True),  # a runtime that passes no K8S_POD_UID: the name decides
        ({}, "u-1", True),
        ({}, "u-2", False),  # the cached namesake of a recreated pod
        ({c.MIRROR_ANNOTATION: "hash"}, "hash", True),  # a static pod's mirror
    ],
)
def test_a_cni_add_is_for_the_pod_its_runtime_uid_names(
    annotations: dict[str, str], uid: str | None, *, same: bool
) -> None:
    pod = Pod(name="web-0", namespace=NS, uid=PodUid("u-1"), annotations=annotations)
    assert same_pod(pod, uid) is same
