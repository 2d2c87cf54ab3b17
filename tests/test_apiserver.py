"""The fake API server speaks the real list/watch protocol: checked with plain HTTP requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ztunnel_redirect.testing.apiserver import ApiServer, merge_patch

TIMEOUT = 5.0
MERGE = {"Content-Type": "application/merge-patch+json"}


def pod(
    name: str, *, namespace: str = "default", node: str = "n1", **labels: str
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer(bookmark_interval=0.05) as srv:
        srv.create_namespace("default")
        srv.create_namespace("other")
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while len(events) < count:
            line = await response.content.readline()
            assert line, f"stream ended after {len(events)} of {count} events"
            events.append(json.loads(line))
    return events


async def read_to_end(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    async with asyncio.timeout(TIMEOUT):
        body = await response.read()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


async def list_names(http: aiohttp.ClientSession, url: str, **params: str) -> list[str]:
    async with http.get(url, params=params) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return sorted(item["metadata"]["name"] for item in body["items"])


async def test_one_global_resource_version_across_resources(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    first = server.create_pod(pod("a"))
    ns = server.create_namespace("third")
    second = server.patch_pod("default", "a", {"metadata": {"labels": {"x": "y"}}})
    versions = [int(o["metadata"]["resourceVersion"]) for o in (first, ns, second)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    async with http.get(f"{server.url}/api/v1/pods") as response:
        body = await response.json()
    assert body["kind"] == "PodList"
    assert body["metadata"]["resourceVersion"] == str(versions[-1])
    assert body["items"][0]["metadata"]["resourceVersion"] == str(versions[-1])


async def test_watch_replays_only_newer_events_then_streams_live_ones(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a"))
    since = server.resource_version
    server.create_pod(pod("b"))
    server.set_pod_labels("default", "a", {"x": "1"})
    params = {"watch": "true", "resourceVersion": since}
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        replayed = await read_events(response, 2)
        server.delete_pod("default", "b")
        (live,) = await read_events(response, 1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in replayed] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
    ]
    assert (live["type"], live["object"]["metadata"]["name"]) == ("DELETED", "b")
    assert live["object"]["metadata"]["resourceVersion"] == server.resource_version


async def test_watch_without_version_starts_with_the_current_state(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a"))
    server.create_pod(pod("b"))
    server.delete_pod("default", "b")
    async with http.get(f"{server.url}/api/v1/pods", params={"watch": "1"}) as response:
        (event,) = await read_events(response, 1)
        server.create_pod(pod("c"))
        (live,) = await read_events(response, 1)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "a")
    assert (live["type"], live["object"]["metadata"]["name"]) == ("ADDED", "c")


async def test_watch_from_a_compacted_version_gets_a_single_410(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    old = server.resource_version
    server.create_pod(pod("a"))
    server.compact()
    params = {"watch": "true", "resourceVersion": old}
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        assert response.status == 200
        events = await read_to_end(response)
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    # From the current version the watch works again.
    params["resourceVersion"] = server.resource_version
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        server.create_pod(pod("b"))
        (event,) = await read_events(response, 1)
    assert event["type"] == "ADDED"


async def test_bounded_history_expires_old_versions() -> None:
    async with (
        ApiServer(history_limit=3) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http,
    ):
        server.create_namespace("default")
        start = server.resource_version
        for name in "abcd":
            server.create_pod(pod(name))
        url = f"{server.url}/api/v1/pods"
        params = {"watch": "true", "resourceVersion": start, "timeoutSeconds": "1"}
        async with http.get(url, params=params) as response:
            events = await read_to_end(response)
        assert [e["type"] for e in events] == ["ERROR"]
        params["resourceVersion"] = str(int(server.resource_version) - 3)
        async with http.get(url, params=params) as response:
            replayed = await read_events(response, 3)
        assert [e["object"]["metadata"]["name"] for e in replayed] == ["b", "c", "d"]


async def test_bookmarks_only_when_allowed_and_carry_only_the_version(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a"))
    server.create_namespace("moves-the-version")
    params = {
        "watch": "true",
        "resourceVersion": server.resource_version,
        "allowWatchBookmarks": "true",
    }
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        (event,) = await read_events(response, 1)
    assert event["type"] == "BOOKMARK"
    assert event["object"]["metadata"] == {"resourceVersion": server.resource_version}
    assert "spec" not in event["object"]

    params["allowWatchBookmarks"] = "false"
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        await server.wait_for(lambda: server.open_watches == 1, timeout=TIMEOUT)
        assert server.send_bookmarks() == 0
        server.create_pod(pod("b"))
        (event,) = await read_events(response, 1)
    assert event["type"] == "ADDED"


async def test_timeout_seconds_ends_the_stream(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    params = {"watch": "true", "resourceVersion": server.resource_version, "timeoutSeconds": "1"}
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        events = await read_to_end(response)
    assert events == []
    assert server.open_watches == 0


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["a", "b"]),
        ("app==web", ["a", "b"]),
        ("app!=web", ["c", "d"]),
        ("tier", ["b", "c"]),
        ("!tier", ["a", "d"]),
        ("app=web,tier", ["b"]),
        ("app=web,!tier", ["a"]),
        ("app in (web,db)", ["a", "b", "c"]),
        ("app notin (web),tier", ["c"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
async def test_label_selectors(
    server: ApiServer, http: aiohttp.ClientSession, selector: str, expected: list[str]
) -> None:
    server.create_pod(pod("a", app="web"))
    server.create_pod(pod("b", app="web", tier="front"))
    server.create_pod(pod("c", app="db", tier="back"))
    server.create_pod(pod("d"))
    names = await list_names(http, f"{server.url}/api/v1/pods", labelSelector=selector)
    assert names == expected


async def test_field_selectors(server: ApiServer, http: aiohttp.ClientSession) -> None:
    server.create_pod(pod("a", node="n1"))
    server.create_pod(pod("b", node="n2"))
    server.create_pod(pod("c", node="n1", namespace="other"))
    url = f"{server.url}/api/v1/pods"
    assert await list_names(http, url, fieldSelector="spec.nodeName=n1") == ["a", "c"]
    assert await list_names(http, url, fieldSelector="spec.nodeName!=n1") == ["b"]
    assert await list_names(http, url, fieldSelector="metadata.name=b") == ["b"]
    assert await list_names(http, url, fieldSelector="metadata.namespace=other") == ["c"]
    both = "spec.nodeName=n1,metadata.namespace=default"
    assert await list_names(http, url, fieldSelector=both) == ["a"]
    assert await list_names(http, f"{server.url}/api/v1/namespaces/other/pods") == ["c"]
    async with http.get(url, params={"fieldSelector": "spec.bogus=1"}) as response:
        assert response.status == 400
        assert (await response.json())["reason"] == "BadRequest"


async def test_watch_turns_a_change_across_the_selector_into_added_and_deleted(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a"))
    params = {
        "watch": "true",
        "resourceVersion": server.resource_version,
        "labelSelector": "mesh=yes",
    }
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        server.set_pod_labels("default", "a", {"mesh": "yes"})
        server.set_pod_labels("default", "a", {"other": "1"})
        server.set_pod_labels("default", "a", {"mesh": None})
        events = await read_events(response, 3)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]


async def test_status_merge_patch_sets_and_removes_an_annotation(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    created = server.create_pod(pod("a"))
    server.patch_pod("default", "a", {"metadata": {"annotations": {"keep": "me"}}})
    url = f"{server.url}/api/v1/namespaces/default/pods/a/status"
    patch: dict[str, Any] = {
        "metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}
    }
    async with http.patch(url, json=patch, headers=MERGE) as response:
        assert response.status == 200
        body = await response.json()
    assert body["metadata"]["annotations"] == {
        "keep": "me",
        "ambient.istio.io/redirection": "enabled",
    }
    assert body["metadata"]["uid"] == created["metadata"]["uid"]
    patch["metadata"]["annotations"]["ambient.istio.io/redirection"] = None
    async with http.patch(url, data=json.dumps(patch), headers=MERGE) as response:
        assert response.status == 200
    stored = server.get_pod("default", "a")
    assert stored is not None
    assert stored["metadata"]["annotations"] == {"keep": "me"}


async def test_status_subresource_keeps_spec_and_main_resource_keeps_status(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a", node="n1"))
    base = f"{server.url}/api/v1/namespaces/default/pods/a"
    patch = {"spec": {"nodeName": "n9"}, "status": {"phase": "Failed"}}
    async with http.patch(f"{base}/status", json=patch, headers=MERGE) as response:
        body = await response.json()
    assert (body["spec"]["nodeName"], body["status"]["phase"]) == ("n1", "Failed")
    patch = {"spec": {"nodeName": "n9"}, "status": {"phase": "Running"}}
    async with http.patch(base, json=patch, headers=MERGE) as response:
        body = await response.json()
    assert (body["spec"]["nodeName"], body["status"]["phase"]) == ("n9", "Failed")


async def test_patch_preconditions_and_content_types(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.create_pod(pod("a"))
    url = f"{server.url}/api/v1/namespaces/default/pods/a/status"
    wrong_uid = {"metadata": {"uid": "not-the-uid", "annotations": {"k": "v"}}}
    async with http.patch(url, json=wrong_uid, headers=MERGE) as response:
        assert response.status == 422
        causes = (await response.json())["details"]["causes"]
    assert causes[0]["field"] == "metadata.uid"
    stale = {"metadata": {"resourceVersion": "1", "annotations": {"k": "v"}}}
    async with http.patch(url, json=stale, headers=MERGE) as response:
        assert response.status == 409
    json_patch = {"Content-Type": "application/json-patch+json"}
    async with http.patch(url, json=[{"op": "add"}], headers=json_patch) as response:
        assert response.status == 415
    stored = server.get_pod("default", "a")
    assert stored is not None
    assert "annotations" not in stored["metadata"]


async def test_create_get_replace_delete_over_http(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    base = f"{server.url}/api/v1/namespaces/default/pods"
    async with http.post(base, json=pod("a")) as response:
        assert response.status == 201
        created = await response.json()
    assert created["metadata"]["uid"]
    async with http.post(base, json=pod("a")) as response:
        assert response.status == 409
        assert (await response.json())["reason"] == "AlreadyExists"
    async with http.post(
        f"{server.url}/api/v1/namespaces/nope/pods", json=pod("x", namespace="nope")
    ) as response:
        assert response.status == 404
    no_containers = pod("b")
    del no_containers["spec"]["containers"]
    async with http.post(base, json=no_containers) as response:
        assert response.status == 422

    created["metadata"]["labels"] = {"replaced": "yes"}
    async with http.put(f"{base}/a", json=created) as response:
        assert response.status == 200
    async with http.put(f"{base}/a", json=created) as response:
        assert response.status == 409, "a stale resourceVersion must conflict"
    async with http.get(f"{base}/a") as response:
        fetched = await response.json()
    assert fetched["metadata"]["labels"] == {"replaced": "yes"}

    async with http.get(base, params={"watch": "true", "resourceVersion": "0"}) as watch:
        await read_events(watch, 1)  # the synthetic ADDED
        async with http.delete(f"{base}/a") as response:
            assert response.status == 200
        (deleted,) = await read_events(watch, 1)
    assert deleted["type"] == "DELETED"
    async with http.get(f"{base}/a") as response:
        assert response.status == 404
        status = await response.json()
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "NotFound", 404)


async def test_namespaces_list_watch_and_labels(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    since = server.resource_version
    server.set_namespace_labels("other", {"istio.io/dataplane-mode": "ambient"})
    url = f"{server.url}/api/v1/namespaces"
    assert await list_names(http, url, labelSelector="istio.io/dataplane-mode=ambient") == ["other"]
    assert await list_names(http, url, fieldSelector="metadata.name=default") == ["default"]
    async with http.get(url, params={"watch": "true", "resourceVersion": since}) as response:
        (event,) = await read_events(response, 1)
    assert event["type"] == "MODIFIED"
    assert event["object"]["kind"] == "Namespace"
    async with http.get(f"{url}/other") as response:
        body = await response.json()
    assert body["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"


async def test_fail_next_answers_matching_requests_with_500(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    server.fail_next(2, path="/pods", method="GET")
    url = f"{server.url}/api/v1/pods"
    ns_url = f"{server.url}/api/v1/namespaces"
    async with http.get(ns_url) as response:
        assert response.status == 200, "a request that does not match is answered normally"
    for _ in range(2):
        async with http.get(url) as response:
            assert response.status == 500
            assert (await response.json())["kind"] == "Status"
    async with http.get(url) as response:
        assert response.status == 200


async def test_fault_endpoints_over_http(server: ApiServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/_fault/fail-next", json={"count": 1, "status": 503}):
        pass
    async with http.get(f"{server.url}/api/v1/pods") as response:
        assert response.status == 503
    async with http.post(f"{server.url}/_fault/latency", json={"seconds": 0.2}):
        pass
    assert server.latency == 0.2
    async with http.post(f"{server.url}/_fault/latency", json={"seconds": 0}):
        pass
    old = server.resource_version
    server.create_pod(pod("a"))
    async with http.post(f"{server.url}/_fault/compact") as response:
        assert (await response.json())["resourceVersion"] == server.resource_version
    params = {"watch": "true", "resourceVersion": old}
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        (event,) = await read_to_end(response)
    assert event["object"]["code"] == 410


async def test_drop_watches_breaks_open_streams(
    server: ApiServer, http: aiohttp.ClientSession
) -> None:
    params = {"watch": "true", "resourceVersion": server.resource_version}
    async with http.get(f"{server.url}/api/v1/pods", params=params) as response:
        await server.wait_for(lambda: server.open_watches == 1, timeout=TIMEOUT)
        assert server.drop_watches() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_to_end(response)
    assert server.open_watches == 0


async def test_wait_for_annotation_wakes_on_change_and_times_out(server: ApiServer) -> None:
    server.create_pod(pod("a"))
    # The change comes after the wait began: a callback runs only once this task awaits, and
    # the wait checks the pod and registers before its first await.
    patch = {"metadata": {"annotations": {"k": "v"}}}
    asyncio.get_running_loop().call_soon(server.patch_pod, "default", "a", patch)
    result = await server.wait_for_annotation("default", "a", "k", "v", timeout=TIMEOUT)
    assert result is not None
    assert result["metadata"]["annotations"]["k"] == "v"
    with pytest.raises(TimeoutError):
        await server.wait_for_annotation("default", "a", "k", "other", timeout=0.05)


def test_merge_patch_follows_rfc_7386() -> None:
    # Examples from RFC 7386 appendix A.
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": "b", "b": "c"}, {"a": None}) == {"b": "c"}
    assert merge_patch({"a": ["b"]}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch([1, 2], {"a": "b", "c": None}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


async def test_standalone_process_writes_a_kubeconfig_and_serves(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztunnel_redirect.testing.apiserver",
        "--port",
        "0",
        "--kubeconfig-out",
        str(kubeconfig),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        config = json.loads(kubeconfig.read_text())
        assert config["clusters"][0]["cluster"]["server"] == url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
            async with http.post(f"{url}/api/v1/namespaces/default/pods", json=pod("a")) as resp:
                assert resp.status == 201
            assert await list_names(http, f"{url}/api/v1/pods") == ["a"]
            async with http.post(f"{url}/_fault/compact") as resp:
                assert resp.status == 200
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
