"""The Kubernetes adapter with the real kubernetes_asyncio client against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import watch as k8s_watch

from ztunnel_redirect.adapters.kube import (
    KubeApiError,
    KubeClient,
    KubeRequestError,
    Watcher,
    load_client,
    namespace_from_api,
    pod_from_api,
)
from ztunnel_redirect.control.workqueue import Backoff
from ztunnel_redirect.core import constants
from ztunnel_redirect.core.errors import ConfigError, RetryableError
from ztunnel_redirect.core.model import Namespace, Pod
from ztunnel_redirect.testing.apiserver import ApiServer, kubeconfig

TIMEOUT = 5.0
NODE = "node-1"


def pod(
    name: str, *, node: str = NODE, namespace: str = "default", **labels: str
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"nodeName": node, "serviceAccountName": "sa-" + name},
        "status": {"phase": "Running", "podIP": "10.0.0.9"},
    }


@dataclass
class RecordingStore:
    """A Store that records every call in order and lets a test wait for a condition on them."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    _waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = field(default_factory=list)

    def _record(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    def replace_pods(self, pods: Sequence[Pod]) -> None:
        self._record("replace_pods", sorted(p.name for p in pods))

    def upsert_pod(self, pod: Pod) -> None:
        self._record("upsert_pod", pod)

    def delete_pod(self, pod: Pod) -> None:
        self._record("delete_pod", pod)

    def replace_namespaces(self, namespaces: Sequence[Namespace]) -> None:
        self._record("replace_namespaces", sorted(n.name for n in namespaces))

    def upsert_namespace(self, ns: Namespace) -> None:
        self._record("upsert_namespace", ns)

    def delete_namespace(self, ns: Namespace) -> None:
        self._record("delete_namespace", ns)

    def names(self, kind: str) -> list[Any]:
        return [
            arg if isinstance(arg, list) else arg.name for name, arg in self.calls if name == kind
        ]

    def pod_calls(self) -> list[tuple[str, str]]:
        return [
            (name, arg if isinstance(arg, str) else getattr(arg, "name", str(arg)))
            for name, arg in self.calls
            if name in ("upsert_pod", "delete_pod")
        ]

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = TIMEOUT,  # noqa: ASYNC109 - a helper that fails with its own timeout
    ) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(entry)


@dataclass
class Harness:
    server: ApiServer
    api: Any
    store: RecordingStore
    watcher: Watcher
    sleeps: list[float]
    restarts: list[tuple[str, str]]
    events: list[tuple[str, str]]

    def list_requests(self, path: str = "/api/v1/pods") -> int:
        return sum(1 for r in self.server.requests if r.path == path and not r.watch)


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(bookmark_interval=60.0) as srv:
        srv.create_namespace("default")
        srv.create_namespace("kube-system")
        yield srv


@pytest.fixture
async def api(server: ApiServer, tmp_path: Path) -> AsyncIterator[Any]:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig(server.url)))
    client = await load_client(kubeconfig=str(path))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def running(server: ApiServer, api: Any) -> AsyncIterator[Harness]:
    store = RecordingStore()
    sleeps: list[float] = []
    restarts: list[tuple[str, str]] = []
    events: list[tuple[str, str]] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0)  # a fake clock: record the backoff, yield, do not wait

    watcher = Watcher(
        api=api,
        node_name=NODE,
        store=store,
        backoff=Backoff(initial=0.2, maximum=1.0),
        rng=random.Random(7),  # noqa: S311 - reproducible jitter, not cryptography
        sleep=sleep,
        on_restart=lambda resource, reason: restarts.append((resource, reason)),
        on_event=lambda resource, event_type: events.append((resource, event_type)),
        min_watch_duration=0.0,
    )
    task = asyncio.create_task(watcher.run(), name="test-kube-watcher")
    try:
        yield Harness(server, api, store, watcher, sleeps, restarts, events)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), "the watcher must let CancelledError through"


@pytest.fixture
async def harness(server: ApiServer, api: Any) -> AsyncIterator[Harness]:
    server.create_pod(pod("mine"))
    server.create_pod(pod("elsewhere", node="node-2"))
    async with running(server, api) as h:
        await asyncio.wait_for(h.watcher.synced.wait(), TIMEOUT)
        # Listed is not yet watching: faults below must hit open streams.
        await server.wait_for(lambda: server.open_watches == 2, timeout=TIMEOUT)
        yield h


async def test_initial_lists_fill_the_store_then_synced(harness: Harness) -> None:
    assert harness.watcher.synced.is_set()
    assert harness.store.names("replace_pods") == [["mine"]]
    assert harness.store.names("replace_namespaces") == [["default", "kube-system"]]
    pod_lists = [r for r in harness.server.requests if r.path == "/api/v1/pods" and not r.watch]
    assert pod_lists[0].query["fieldSelector"] == f"spec.nodeName={NODE}"


async def test_synced_waits_for_both_lists(server: ApiServer, api: Any) -> None:
    fault = server.fail_next(1000, path="/api/v1/namespaces", watch=False)

    def namespace_lists() -> int:
        return sum(1 for r in server.requests if r.path == "/api/v1/namespaces" and not r.watch)

    async with running(server, api) as h:
        await h.store.wait_for(lambda: bool(h.store.names("replace_pods")))
        await server.wait_for(lambda: namespace_lists() >= 3, timeout=TIMEOUT)
        assert not h.watcher.synced.is_set(), "pods alone are not a synced cache"
        fault.count = 0
        await asyncio.wait_for(h.watcher.synced.wait(), TIMEOUT)
        assert h.store.names("replace_namespaces") == [["default", "kube-system"]]
        assert ("namespaces", "api_error") in h.restarts


async def test_the_generated_client_works_unchanged_against_the_fake(
    server: ApiServer, api: Any
) -> None:
    core: Any = k8s_client.CoreV1Api(api)  # typed for V1Pod bodies; plain dicts work too
    created = await core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "typed"},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "i"}]},
        },
    )
    listed = await core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert [p.metadata.name for p in listed.items] == ["typed"]
    assert listed.metadata.resource_version == created.metadata.resource_version
    stream = k8s_watch.Watch()
    events = []
    async with stream:
        async for event in stream.stream(
            core.list_namespaced_pod, "default", resource_version="0", timeout_seconds=1
        ):
            events.append((event["type"], event["object"].metadata.name))
            if len(events) == 1:
                server.delete_pod("default", "typed")
            else:
                stream.stop()
    assert events == [("ADDED", "typed"), ("DELETED", "typed")]


async def test_events_are_delivered_in_order(harness: Harness) -> None:
    server, store = harness.server, harness.store
    server.create_pod(pod("a"))
    server.create_pod(pod("not-mine", node="node-2"))
    server.set_pod_labels("default", "a", {"istio.io/dataplane-mode": "ambient"})
    server.create_pod(pod("b"))
    server.delete_pod("default", "a")
    await store.wait_for(lambda: len(store.pod_calls()) == 4)
    assert store.pod_calls() == [
        ("upsert_pod", "a"),
        ("upsert_pod", "a"),
        ("upsert_pod", "b"),
        ("delete_pod", "a"),
    ]
    upserts = [arg for name, arg in store.calls if name == "upsert_pod"]
    assert upserts[1].labels == {"istio.io/dataplane-mode": "ambient"}
    deleted = next(arg for name, arg in store.calls if name == "delete_pod")
    assert deleted.deleted is True


async def test_events_are_counted_with_istios_informer_types(harness: Harness) -> None:
    """What `nodeagent_reconcile_events_total{type}` counts: listed objects are adds (updates
    when re-listed), watch events by their type, bookmarks not at all."""
    server, store = harness.server, harness.store
    assert sorted(harness.events) == [("namespaces", "add")] * 2 + [("pods", "add")]
    harness.events.clear()
    server.create_pod(pod("a"))
    server.set_pod_labels("default", "a", {"team": "web"})
    server.set_namespace_labels("default", {"team": "web"})
    server.delete_pod("default", "a")
    await store.wait_for(lambda: ("delete_pod", "a") in store.pod_calls())
    await store.wait_for(lambda: bool(store.names("upsert_namespace")))
    assert sorted(harness.events) == [
        ("namespaces", "update"),
        ("pods", "add"),
        ("pods", "delete"),
        ("pods", "update"),
    ]
    harness.events.clear()
    server.drop_watches()
    server.create_pod(pod("b"))
    server.compact()
    await store.wait_for(lambda: len(store.names("replace_pods")) == 2)
    assert [e for e in harness.events if e[0] == "pods"] == [("pods", "update")] * 2


async def test_namespace_events_reach_the_store(harness: Harness) -> None:
    server, store = harness.server, harness.store
    server.set_namespace_labels("default", {"istio.io/dataplane-mode": "ambient"})
    server.create_namespace("new")
    server.delete_namespace("new")
    await store.wait_for(lambda: len(store.names("delete_namespace")) == 1)
    upserts = [arg for name, arg in store.calls if name == "upsert_namespace"]
    assert [ns.name for ns in upserts] == ["default", "new"]
    assert upserts[0].labels["istio.io/dataplane-mode"] == "ambient"


async def test_a_dropped_stream_loses_no_event_and_does_not_relist(harness: Harness) -> None:
    server, store = harness.server, harness.store
    lists_before = harness.list_requests()
    assert server.drop_watches() == 2
    # Changes while no watch is open: the resume from our resourceVersion must replay them.
    server.create_pod(pod("during-gap"))
    server.delete_pod("default", "mine")
    await store.wait_for(lambda: len(store.pod_calls()) == 2)
    assert store.pod_calls() == [("upsert_pod", "during-gap"), ("delete_pod", "mine")]
    assert harness.list_requests() == lists_before
    assert ("pods", "connection_error") in harness.restarts


async def test_410_relists_and_replaces(harness: Harness) -> None:
    server, store = harness.server, harness.store
    server.drop_watches()
    server.delete_pod("default", "mine")
    server.create_pod(pod("new"))
    server.compact()
    await store.wait_for(lambda: len(store.names("replace_pods")) == 2)
    assert store.names("replace_pods") == [["mine"], ["new"]]
    assert store.pod_calls() == [], "the re-list replaces; the lost events are not replayed"
    assert ("pods", "expired") in harness.restarts
    # And watching continues from the new list.
    server.create_pod(pod("after"))
    await store.wait_for(lambda: store.pod_calls() == [("upsert_pod", "after")])


async def test_server_errors_back_off_then_recover(harness: Harness) -> None:
    server, store = harness.server, harness.store
    server.fail_next(4, path="/api/v1/pods", watch=True)
    server.drop_watches()
    server.create_pod(pod("after-errors"))
    await store.wait_for(lambda: store.pod_calls() == [("upsert_pod", "after-errors")])
    pod_restarts = [reason for resource, reason in harness.restarts if resource == "pods"]
    assert pod_restarts == ["connection_error", "api_error", "api_error", "api_error", "api_error"]
    # One wait per failure (five for pods, one for the dropped namespaces watch), growing from
    # about the initial delay to about the cap; never above the cap.
    assert len(harness.sleeps) == 6
    assert all(0 < d <= 1.0 for d in harness.sleeps)
    assert min(harness.sleeps) <= 0.2
    assert max(harness.sleeps) >= 0.5


async def test_initial_list_errors_back_off_then_sync(server: ApiServer, api: Any) -> None:
    server.fail_next(3, path="/api/v1/pods", watch=False, status=503)
    async with running(server, api) as h:
        await asyncio.wait_for(h.watcher.synced.wait(), TIMEOUT)
        assert [r for r in h.restarts if r[0] == "pods"] == [("pods", "api_error")] * 3
        assert len(h.sleeps) == 3


async def test_a_bookmark_is_skipped_but_its_version_is_kept(harness: Harness) -> None:
    server, store = harness.server, harness.store
    server.set_namespace_labels("kube-system", {"x": "y"})  # moves the global version
    bookmark_version = server.resource_version
    assert server.send_bookmarks() == 2
    server.end_watches()
    await server.wait_for(
        lambda: any(
            r.watch
            and r.path == "/api/v1/pods"
            and r.query.get("resourceVersion") == bookmark_version
            for r in server.requests
        ),
        timeout=TIMEOUT,
    )
    assert store.pod_calls() == []
    assert ("pods", "stream_ended") in harness.restarts
    assert harness.watcher.resource_version("pods") == bookmark_version


async def test_status_patch_sets_and_removes_the_annotation(harness: Harness) -> None:
    server = harness.server
    server.patch_pod("default", "mine", {"metadata": {"annotations": {"other": "kept"}}})
    raw = server.get_pod("default", "mine")
    assert raw is not None
    target = pod_from_api(raw)
    kube = KubeClient(harness.api)
    await kube.set_redirection_status(target, "enabled")
    stored = server.get_pod("default", "mine")
    assert stored is not None
    assert stored["metadata"]["annotations"] == {
        "other": "kept",
        constants.STATUS_ANNOTATION: "enabled",
    }
    await kube.set_redirection_status(target, None)
    await server.wait_for_annotation(
        "default", "mine", constants.STATUS_ANNOTATION, None, timeout=TIMEOUT
    )
    stored = server.get_pod("default", "mine")
    assert stored is not None
    assert stored["metadata"]["annotations"] == {"other": "kept"}
    patches = [r for r in server.requests if r.method == "PATCH"]
    assert all(r.path.endswith("/pods/mine/status") for r in patches)


async def test_status_patch_on_a_gone_or_replaced_pod_is_not_an_error(
    server: ApiServer, api: Any
) -> None:
    old = pod_from_api(server.create_pod(pod("a")))
    kube = KubeClient(api)
    server.delete_pod("default", "a")
    await kube.set_redirection_status(old, "enabled")  # 404: nothing to do
    server.create_pod(pod("a"))  # same name, new uid
    await kube.set_redirection_status(old, "enabled")
    replaced = server.get_pod("default", "a")
    assert replaced is not None
    assert constants.STATUS_ANNOTATION not in (replaced["metadata"].get("annotations") or {})


async def test_status_patch_errors_are_translated(server: ApiServer, api: Any) -> None:
    target = pod_from_api(server.create_pod(pod("a")))
    kube = KubeClient(api)
    server.fail_next(1, path="/status", status=500)
    with pytest.raises(KubeApiError) as retryable:
        await kube.set_redirection_status(target, "enabled")
    assert isinstance(retryable.value, RetryableError)
    assert retryable.value.status == 500
    server.fail_next(1, path="/status", status=403)
    with pytest.raises(KubeRequestError) as refused:
        await kube.set_redirection_status(target, "enabled")
    assert not isinstance(refused.value, RetryableError)


async def test_get_pod_and_namespace(server: ApiServer, api: Any) -> None:
    server.create_pod(pod("a"))
    kube = KubeClient(api)
    got = await kube.get_pod("default", "a")
    assert got is not None
    assert (got.name, got.namespace, got.node_name, got.ips) == (
        "a",
        "default",
        NODE,
        ("10.0.0.9",),
    )
    assert await kube.get_pod("default", "missing") is None
    ns = await kube.get_namespace("default")
    assert ns is not None
    assert ns.name == "default"
    assert await kube.get_namespace("missing") is None
    server.latency = 0.5
    slow = KubeClient(api, request_timeout=0.05)
    with pytest.raises(KubeApiError):
        await slow.get_pod("default", "a")


def test_pod_from_api_translates_the_wire_shape() -> None:
    obj = {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u-1",
            "labels": {"a": "b"},
            "annotations": {"c": "d"},
            "deletionTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "n", "hostNetwork": True, "serviceAccountName": "sa"},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
        },
    }
    got = pod_from_api(obj)
    assert got == Pod(
        uid=got.uid,
        name="p",
        namespace="ns",
        node_name="n",
        ips=("10.0.0.1", "fd00::1"),
        labels={"a": "b"},
        annotations={"c": "d"},
        host_network=True,
        phase="Running",
        service_account="sa",
        deleted=False,
    )
    assert got.uid == "u-1"
    fallback = pod_from_api({"metadata": {"name": "q"}, "status": {"podIP": "10.0.0.2"}})
    assert fallback.ips == ("10.0.0.2",)
    assert (fallback.deleted, fallback.phase, fallback.service_account) == (
        False,
        "Pending",
        "default",
    )
    assert pod_from_api({"metadata": {"name": "r"}}).ips == ()
    assert namespace_from_api({"metadata": {"name": "n", "labels": {"x": "1"}}}) == Namespace(
        "n", {"x": "1"}
    )


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, factor=2.0, jitter=0.5)
    rng = random.Random(1)  # noqa: S311 - reproducible jitter, not cryptography
    delays = [backoff.delay(n, rng) for n in range(10)]
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert delays[0] <= 0.2
    assert all(2.5 <= d <= 5.0 for d in delays[6:])
    assert backoff.delay(10_000, rng) <= 5.0


async def test_load_client_with_a_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        await load_client(kubeconfig=str(tmp_path / "missing"))


async def test_a_malformed_pod_is_skipped_and_the_others_kept(server: ApiServer, api: Any) -> None:
    bad_listed = pod("bad-listed")
    bad_listed["metadata"]["labels"] = {"app": 7}
    server.create_pod(bad_listed)
    server.create_pod(pod("good-listed"))
    async with running(server, api) as h:
        await asyncio.wait_for(h.watcher.synced.wait(), TIMEOUT)
        await server.wait_for(lambda: server.open_watches == 2, timeout=TIMEOUT)
        bad_watched = pod("bad-watched")
        bad_watched["status"]["podIPs"] = [{"ip": "not-an-ip"}]
        server.create_pod(bad_watched)
        server.create_pod(pod("good-watched"))

        await h.store.wait_for(lambda: ("upsert_pod", "good-watched") in h.store.pod_calls())

        assert h.store.names("replace_pods") == [["good-listed"]]
        assert h.store.pod_calls() == [("upsert_pod", "good-watched")]
        assert h.restarts == [], "a malformed object must not break the watch"
