"""The reconciler with fakes at every seam: the order of SPEC §6, and what it keeps in memory."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ztunnel_redirect import constants as c
from ztunnel_redirect.enrollment import EnrollmentPolicy
from ztunnel_redirect.errors import RetryableError
from ztunnel_redirect.model import HostOptions, Namespace, Pod, PodOptions, PodUid
from ztunnel_redirect.reconciler import ENABLED, PENDING, ClusterState, Reconciler

NETNS = "/run/netns/pod-a"


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.forgotten: list[str] = []
        self.nack = False


class FakePodRules:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def apply(self, netns: str, options: PodOptions, *, fresh: bool = False) -> list[Any]:
        self.calls.log.append("rules")
        return []

    async def check(self, netns: str, options: PodOptions) -> list[Any]:
        return []

    async def remove(self, netns: str) -> list[str]:
        self.calls.log.append("remove_rules")
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
        return list(ips)

    async def apply(self, options: HostOptions, elements: Any = None) -> list[Any]:
        return []


class FakeZtunnel:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def add_workload(self, pod: Pod, netns_path: str) -> None:
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
    async def locate(self, pod: Pod) -> str | None:
        return NETNS


class Quiet:
    def observe_reconcile(self, kind: str, seconds: float) -> None: ...
    def count_repair(self, reason: str) -> None: ...
    def count_failure(self, reason: str) -> None: ...
    def set_pods_enrolled(self, count: int) -> None: ...


def pod(**labels: str) -> Pod:
    return Pod(
        uid=PodUid("uid-a"),
        name="a",
        namespace="demo",
        node_name="n",
        ips=("10.0.0.2",),
        labels=labels,
    )


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def reconciler(calls: Calls) -> Reconciler:
    state = ClusterState(lambda key: None)
    state.namespaces["demo"] = Namespace("demo", {c.ENROLL_LABEL: c.ENROLL_VALUE})
    return Reconciler(
        state=state,
        policy=EnrollmentPolicy(node_name="n"),
        pod_rules=FakePodRules(calls),  # type: ignore[arg-type]
        host_rules=FakeHostRules(calls),  # type: ignore[arg-type]
        host_options=HostOptions(kubelet_uid=1),
        ztunnel=FakeZtunnel(calls),
        status=FakeStatus(calls, state),
        locator=FakeLocator(),
        observer=Quiet(),
    )


async def test_add_follows_spec_order(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    assert calls.log == ["rules", "ztunnel_add", "host_add", f"status={ENABLED}"]


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
    assert calls.log == ["rules", "ztunnel_nack", f"status={PENDING}"]


async def test_leaving_the_mesh_follows_spec_order(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    calls.log.clear()
    reconciler.state.upsert_pod(pod(**{c.ENROLL_LABEL: c.OPT_OUT_VALUE}))
    await reconciler.reconcile("uid-a")
    assert calls.log == ["host_remove", "remove_rules", "ztunnel_del", "status=None"]
    assert reconciler.records == {}


async def test_a_deleted_pod_is_forgotten_everywhere(reconciler: Reconciler, calls: Calls) -> None:
    reconciler.state.upsert_pod(pod())
    await reconciler.reconcile("uid-a")
    calls.log.clear()
    reconciler.state.delete_pod(pod())
    await reconciler.reconcile("uid-a")
    assert calls.log == ["host_remove", "ztunnel_del"]  # the netns and the pod are gone
    assert reconciler.records == {}
    assert reconciler.state.deleted == {}
    assert calls.forgotten == [NETNS]


async def test_the_cni_ips_survive_a_pod_update_without_ips(
    reconciler: Reconciler, calls: Calls
) -> None:
    assert await reconciler.add_from_cni(pod(), NETNS)
    reconciler.state.upsert_pod(Pod(uid=PodUid("uid-a"), name="a", namespace="demo", node_name="n"))
    calls.log.clear()
    await reconciler.reconcile("uid-a")
    assert "host_remove" not in calls.log
    assert reconciler.records[PodUid("uid-a")].pod.ips == ("10.0.0.2",)
