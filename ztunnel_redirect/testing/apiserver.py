"""A small in-memory Kubernetes API server (core/v1 pods and namespaces) speaking the real protocol.

The real `kubernetes_asyncio` client works against it unchanged: list with a list
`resourceVersion`, watch as chunked newline-delimited JSON with resume from a resourceVersion,
`410 Expired` once the history no longer holds the asked-for version, bookmarks, field and label
selectors, create/replace/delete and JSON merge patch (also on `pods/{name}/status`).

Deliberate simplifications, each where a node agent cannot tell the difference:
- Deletion is immediate (no graceful deletion, no namespace finalizers or cascading).
- The creator plays kubelet and scheduler: `status` given on create is kept (phase defaults to
  `Pending`). After that, as on the real server, a write to the pod keeps its status and a write
  to `pods/{name}/status` keeps its spec; metadata (labels, annotations) goes through both.
- A strategic merge patch is applied as a JSON merge patch (identical for maps, which is all the
  agent patches).
- Lists ignore `limit`/`continue` and always serve the latest state.

Use it in-process (`async with ApiServer() as srv: srv.url`), mutate state directly from tests
(`srv.create_pod(...)`, `await srv.wait_for_pod(...)`) or run it as a process:
`python -m ztunnel_redirect.testing.apiserver --port N --kubeconfig-out PATH`. Fault injection is
both a Python API and HTTP under `/_fault/` (see `_FAULT_ROUTES`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import re
import secrets
import signal
import socket
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

from aiohttp import web

__all__ = ["ApiServer", "Fault", "RequestRecord", "SelectorError", "kubeconfig", "merge_patch"]

JSON = dict[str, Any]

POD_FIELDS: Final = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
    "spec.serviceAccountName": ("spec", "serviceAccountName"),
    "spec.hostNetwork": ("spec", "hostNetwork"),
    "status.phase": ("status", "phase"),
    "status.podIP": ("status", "podIP"),
}
NAMESPACE_FIELDS: Final = {
    "metadata.name": ("metadata", "name"),
    "status.phase": ("status", "phase"),
}
DEFAULT_WATCH_TIMEOUT: Final = 1800.0
"""The real server's --min-request-timeout: a watch without timeoutSeconds still ends."""
WATCH_QUEUE_LIMIT: Final = 10_000
"""A watcher this far behind is closed, as the real server closes too-slow consumers."""


class Resource(Enum):
    PODS = "pods"
    NAMESPACES = "namespaces"

    @property
    def kind(self) -> str:
        return "Pod" if self is Resource.PODS else "Namespace"

    @property
    def fields(self) -> Mapping[str, tuple[str, str]]:
        return POD_FIELDS if self is Resource.PODS else NAMESPACE_FIELDS


class EventType(Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


class SelectorError(ValueError):
    """An unparsable or unsupported label or field selector (HTTP 400)."""


class ApiError(Exception):
    """A request the server refuses, carried to the client as a `Status` object."""

    def __init__(self, code: int, reason: str, message: str, *, details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body = status_object(self.code, self.reason, self.message)
        if self.details is not None:
            body["details"] = self.details
        return body


def status_object(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- selectors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists", "in", "notin"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "in":
            return present and value in self.values
        return not present or value not in self.values  # notin


_SET_RE: Final = re.compile(r"^\s*(\S+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses (`a in (x,y),b` is two terms)."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [term.strip() for term in terms if term.strip()]


def parse_label_selector(selector: str) -> tuple[_Requirement, ...]:
    requirements = []
    for term in _split_terms(selector):
        if match := _SET_RE.match(term):
            values = tuple(v.strip() for v in match.group(3).split(",") if v.strip())
            requirements.append(_Requirement(match.group(1), match.group(2), values))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            requirements.append(_Requirement(key.strip(), "!=", (value.strip(),)))
        elif "=" in term:
            key, value = term.replace("==", "=", 1).split("=", 1)
            requirements.append(_Requirement(key.strip(), "=", (value.strip(),)))
        elif term.startswith("!"):
            requirements.append(_Requirement(term[1:].strip(), "!exists"))
        else:
            requirements.append(_Requirement(term, "exists"))
    for requirement in requirements:
        if not requirement.key or any(c in requirement.key for c in " ()!="):
            raise SelectorError(f"unable to parse requirement: {selector!r}")
    return tuple(requirements)


def parse_field_selector(selector: str, resource: Resource) -> tuple[_Requirement, ...]:
    requirements = []
    for term in _split_terms(selector):
        if "!=" in term:
            key, value = term.split("!=", 1)
            op = "!="
        elif "=" in term:
            key, value = term.replace("==", "=", 1).split("=", 1)
            op = "="
        else:
            raise SelectorError(f"invalid field selector term: {term!r}")
        if key.strip() not in resource.fields:
            raise SelectorError(f'field label not supported: "{key.strip()}" for {resource.kind}')
        requirements.append(_Requirement(key.strip(), op, (value.strip(),)))
    return tuple(requirements)


def _field_values(obj: JSON, resource: Resource) -> dict[str, str]:
    values = {}
    for name, (section, key) in resource.fields.items():
        value = obj.get(section, {}).get(key)
        if isinstance(value, bool):
            values[name] = "true" if value else "false"
        else:
            values[name] = "" if value is None else str(value)
    return values


@dataclass(frozen=True)
class _Filter:
    resource: Resource
    namespace: str | None = None
    labels: tuple[_Requirement, ...] = ()
    fields: tuple[_Requirement, ...] = ()

    def matches(self, obj: JSON) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        labels = metadata.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        if self.fields:
            values = _field_values(obj, self.resource)
            return all(r.matches(values) for r in self.fields)
        return True


# --- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    rv: int
    resource: Resource
    type: EventType
    old: JSON | None
    new: JSON


class _WatchStream:
    """One open watch: the events waiting to be written, and why it ended."""

    def __init__(self, event_filter: _Filter, *, bookmarks: bool) -> None:
        self.filter = event_filter
        self.bookmarks = bookmarks
        self.pending: deque[JSON] = deque()
        self.wakeup = asyncio.Event()
        self.end: str | None = None  # "closed" | "dropped" | "overflow"

    def offer(self, event: _Event) -> None:
        matched_old = event.old is not None and self.filter.matches(event.old)
        matched_new = self.filter.matches(event.new)
        if event.type is EventType.MODIFIED and matched_old != matched_new:
            # The real watch cache turns a change across the selector boundary into ADDED/DELETED.
            kind = EventType.ADDED if matched_new else EventType.DELETED
        elif matched_new or (event.type is EventType.DELETED and matched_old):
            kind = event.type
        else:
            return
        self.push({"type": kind.value, "object": copy.deepcopy(event.new)})

    def push(self, item: JSON) -> None:
        if self.end is not None:
            return
        if len(self.pending) >= WATCH_QUEUE_LIMIT:
            self.finish("overflow")
            return
        self.pending.append(item)
        self.wakeup.set()

    def finish(self, reason: str) -> None:
        if self.end is None:
            self.end = reason
        self.wakeup.set()


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered, for tests that assert on what the client did."""

    method: str
    path: str
    query: Mapping[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


@dataclass
class Fault:
    """Answer the next `count` matching requests with `status` and a `Status` body."""

    count: int
    status: int = 500
    path: str | None = None
    """Substring of the request path, e.g. `/pods` or `/status`."""
    method: str | None = None
    watch: bool | None = None
    """Only watch requests (True), only non-watch requests (False), or both (None)."""

    def matches(self, request: web.Request) -> bool:
        if self.path is not None and self.path not in request.path:
            return False
        if self.method is not None and self.method.upper() != request.method:
            return False
        is_watch = request.query.get("watch", "").lower() in ("true", "1")
        return self.watch is None or self.watch == is_watch


@dataclass
class _Waiter:
    predicate: Callable[[], bool]
    future: asyncio.Future[None] = field(repr=False)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiServer:
    """In-memory core/v1 pods and namespaces with a global resourceVersion and an event history.

    State-changing methods are synchronous and must run on the server's event loop; each one emits
    exactly one watch event, like one etcd write.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_limit: int = 1000,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = DEFAULT_WATCH_TIMEOUT,
        request_log_limit: int = 10_000,
    ) -> None:
        self._host = host
        self._port = port
        self._bookmark_interval = bookmark_interval
        self._default_watch_timeout = default_watch_timeout
        self._objects: dict[Resource, dict[tuple[str, str], JSON]] = {r: {} for r in Resource}
        self._rv = 0
        self._history: deque[_Event] = deque(maxlen=history_limit)
        self._compacted_rv = 0
        """Events at or below this version may be missing from the history."""
        self._streams: set[_WatchStream] = set()
        self._waiters: list[_Waiter] = []
        self._faults: list[Fault] = []
        self.latency = 0.0
        """Seconds added before answering every Kubernetes request."""
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_limit)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._routes())
        # handler_cancellation: a client that goes away ends its watch handler at once.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self._port = port
        self.url = f"http://{self._host}:{port}"

    async def serve_on(self, sock: socket.socket) -> str:
        """Serve on one more listening socket, e.g. one bound inside another network namespace
        (a node's, where a CNI plugin runs); returns its URL."""
        if self._runner is None:
            raise RuntimeError("API server not started")
        await web.SockSite(self._runner, sock).start()
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        for stream in list(self._streams):
            stream.finish("closed")
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- state, for tests (no HTTP) ---

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        obj = self._objects[Resource.PODS].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def get_namespace(self, name: str) -> JSON | None:
        obj = self._objects[Resource.NAMESPACES].get(("", name))
        return copy.deepcopy(obj) if obj is not None else None

    def pods(self) -> list[JSON]:
        return [copy.deepcopy(o) for o in self._objects[Resource.PODS].values()]

    def create_pod(self, obj: JSON) -> JSON:
        """Store a new pod (a dict in the wire shape); uid, resourceVersion, timestamps are set.

        Unlike a POST, a missing `spec.containers` is filled in with one placeholder container.
        """
        obj = copy.deepcopy(obj)
        obj.setdefault("spec", {}).setdefault("containers", [{"name": "app", "image": "app"}])
        namespace = obj.get("metadata", {}).get("namespace", "default")
        return self._create(Resource.PODS, namespace, obj)

    def create_namespace(self, obj_or_name: JSON | str) -> JSON:
        obj = {"metadata": {"name": obj_or_name}} if isinstance(obj_or_name, str) else obj_or_name
        return self._create(Resource.NAMESPACES, "", obj)

    def update_pod(self, obj: JSON) -> JSON:
        """Replace a pod wholesale (spec, status and metadata: the test is every controller)."""
        metadata = obj.get("metadata", {})
        key = (metadata.get("namespace", "default"), metadata.get("name", ""))
        return self._replace(Resource.PODS, key, obj, keep=())

    def update_namespace(self, obj: JSON) -> JSON:
        key = ("", obj.get("metadata", {}).get("name", ""))
        return self._replace(Resource.NAMESPACES, key, obj, keep=())

    def patch_pod(self, namespace: str, name: str, patch: JSON) -> JSON:
        return self._patch(Resource.PODS, (namespace, name), patch, keep=())

    def patch_namespace(self, name: str, patch: JSON) -> JSON:
        return self._patch(Resource.NAMESPACES, ("", name), patch, keep=())

    def set_pod_labels(self, namespace: str, name: str, labels: Mapping[str, str | None]) -> JSON:
        """Merge labels into a pod; a None value removes that label."""
        return self.patch_pod(namespace, name, {"metadata": {"labels": dict(labels)}})

    def set_namespace_labels(self, name: str, labels: Mapping[str, str | None]) -> JSON:
        return self.patch_namespace(name, {"metadata": {"labels": dict(labels)}})

    def delete_pod(self, namespace: str, name: str) -> JSON:
        return self._delete(Resource.PODS, (namespace, name))

    def delete_namespace(self, name: str) -> JSON:
        return self._delete(Resource.NAMESPACES, ("", name))

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,  # noqa: ASYNC109 - a test helper that fails with its own message
    ) -> None:
        """Return once `predicate()` holds; checked now, after every change and every request."""
        if predicate():
            return
        waiter = _Waiter(predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            raise TimeoutError(f"condition not reached within {timeout}s") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def wait_for_pod(
        self,
        namespace: str,
        name: str,
        predicate: Callable[[JSON | None], bool],
        *,
        timeout: float,  # noqa: ASYNC109 - as wait_for
    ) -> JSON | None:
        """Wait until `predicate(pod dict or None)` holds; return the pod at that moment."""
        await self.wait_for(lambda: predicate(self.get_pod(namespace, name)), timeout=timeout)
        return self.get_pod(namespace, name)

    async def wait_for_annotation(
        self,
        namespace: str,
        name: str,
        key: str,
        value: str | None,
        *,
        timeout: float,  # noqa: ASYNC109 - as wait_for
    ) -> JSON | None:
        """Wait until the pod's annotation `key` equals `value` (None: absent, or no pod)."""

        def holds(pod: JSON | None) -> bool:
            annotations = (pod or {}).get("metadata", {}).get("annotations") or {}
            return annotations.get(key) == value

        return await self.wait_for_pod(namespace, name, holds, timeout=timeout)

    # --- faults ---

    def drop_watches(self) -> int:
        """Cut every open watch connection now (the client sees the connection break)."""
        streams = list(self._streams)
        for stream in streams:
            stream.finish("dropped")
        return len(streams)

    def end_watches(self) -> int:
        """End every open watch cleanly, as when its timeout expires (the client sees EOF)."""
        streams = list(self._streams)
        for stream in streams:
            stream.finish("closed")
        return len(streams)

    def fail_next(
        self,
        count: int,
        *,
        status: int = 500,
        path: str | None = None,
        method: str | None = None,
        watch: bool | None = None,
    ) -> Fault:
        fault = Fault(count, status=status, path=path, method=method, watch=watch)
        self._faults.append(fault)
        return fault

    def compact(self) -> str:
        """Forget the event history: a watch from any older resourceVersion now gets 410."""
        self._history.clear()
        self._compacted_rv = self._rv
        return str(self._rv)

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK now to every watch that allowed bookmarks."""
        streams = [s for s in self._streams if s.bookmarks]
        for stream in streams:
            stream.push(self._bookmark(stream.filter.resource))
        return len(streams)

    @property
    def open_watches(self) -> int:
        return len(self._streams)

    # --- store internals ---

    def _create(self, resource: Resource, namespace: str, obj: JSON) -> JSON:
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        name = metadata.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value: name is required")
        if resource is Resource.PODS:
            if not obj.get("spec", {}).get("containers"):
                raise ApiError(
                    422, "Invalid", f'Pod "{name}" is invalid: spec.containers: Required value'
                )
            metadata["namespace"] = namespace
            obj.setdefault("spec", {})
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        key = (namespace, name)
        if key in self._objects[resource]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.value} "{name}" already exists',
                details={"name": name, "kind": resource.value},
            )
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        metadata.pop("resourceVersion", None)
        metadata.pop("deletionTimestamp", None)
        if resource is Resource.NAMESPACES:
            obj.setdefault("status", {}).setdefault("phase", "Active")
            metadata.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        obj["kind"] = resource.kind
        obj["apiVersion"] = "v1"
        return self._commit(resource, EventType.ADDED, None, obj)

    def _current(self, resource: Resource, key: tuple[str, str]) -> JSON:
        current = self._objects[resource].get(key)
        if current is None:
            raise ApiError(
                404,
                "NotFound",
                f'{resource.value} "{key[1]}" not found',
                details={"name": key[1], "kind": resource.value},
            )
        return current

    def _replace(
        self, resource: Resource, key: tuple[str, str], obj: JSON, *, keep: Iterable[str]
    ) -> JSON:
        """Validate and store `obj` as the new state of `key`; `keep` top-level parts stay."""
        old = self._current(resource, key)
        new = copy.deepcopy(obj)
        metadata = new.setdefault("metadata", {})
        old_metadata = old["metadata"]
        wanted_rv = metadata.get("resourceVersion")
        if wanted_rv and wanted_rv != old_metadata["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.value} "{key[1]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                details={"name": key[1], "kind": resource.value},
            )
        for immutable in ("uid", "name", "namespace"):
            value = metadata.get(immutable)
            if value is not None and value != old_metadata.get(immutable):
                field_name = f"metadata.{immutable}"
                raise ApiError(
                    422,
                    "Invalid",
                    f'{resource.kind} "{key[1]}" is invalid: {field_name}: Invalid value: '
                    f'"{value}": field is immutable',
                    details={
                        "name": key[1],
                        "kind": resource.kind,
                        "causes": [
                            {
                                "reason": "FieldValueInvalid",
                                "message": "field is immutable",
                                "field": field_name,
                            }
                        ],
                    },
                )
        for preserved in ("uid", "name", "namespace", "creationTimestamp"):
            if preserved in old_metadata:
                metadata[preserved] = old_metadata[preserved]
        if "deletionTimestamp" in old_metadata:
            metadata.setdefault("deletionTimestamp", old_metadata["deletionTimestamp"])
        for part in keep:
            if part in old:
                new[part] = copy.deepcopy(old[part])
            else:
                new.pop(part, None)
        new["kind"] = resource.kind
        new["apiVersion"] = "v1"
        return self._commit(resource, EventType.MODIFIED, old, new)

    def _patch(
        self, resource: Resource, key: tuple[str, str], patch: Any, *, keep: Iterable[str]
    ) -> JSON:
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        old = self._current(resource, key)
        patched = merge_patch(old, patch)
        # A resourceVersion only in the patch is a precondition; absent, the patch always applies.
        patched.setdefault("metadata", {})["resourceVersion"] = (
            patch.get("metadata", {}).get("resourceVersion") or old["metadata"]["resourceVersion"]
        )
        return self._replace(resource, key, patched, keep=keep)

    def _delete(self, resource: Resource, key: tuple[str, str]) -> JSON:
        old = self._current(resource, key)
        return self._commit(resource, EventType.DELETED, old, copy.deepcopy(old))

    def _commit(self, resource: Resource, kind: EventType, old: JSON | None, new: JSON) -> JSON:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
        if kind is EventType.DELETED:
            del self._objects[resource][key]
        else:
            self._objects[resource][key] = new
        if len(self._history) == self._history.maxlen:
            self._compacted_rv = self._history[0].rv
        event = _Event(self._rv, resource, kind, old, new)
        self._history.append(event)
        for stream in list(self._streams):
            if stream.filter.resource is resource:
                stream.offer(event)
        self._notify()
        return copy.deepcopy(new)

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            try:
                if waiter.predicate():
                    waiter.future.set_result(None)
            except Exception as exc:  # a broken predicate fails its own waiter, not the writer
                waiter.future.set_exception(exc)

    def _bookmark(self, resource: Resource) -> JSON:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": resource.kind,
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
            },
        }

    # --- HTTP ---

    def _routes(self) -> list[web.RouteDef]:
        ns_pods = "/api/v1/namespaces/{namespace}/pods"
        return [
            web.get("/version", self._version),
            web.get("/healthz", self._healthz),
            web.get("/api/v1/pods", self._list_pods),
            web.get(ns_pods, self._list_pods),
            web.post(ns_pods, self._create_pod),
            web.get(ns_pods + "/{name}", self._get_pod),
            web.get(ns_pods + "/{name}/status", self._get_pod),
            web.put(ns_pods + "/{name}", self._put_pod),
            web.put(ns_pods + "/{name}/status", self._put_pod),
            web.patch(ns_pods + "/{name}", self._patch_pod),
            web.patch(ns_pods + "/{name}/status", self._patch_pod),
            web.delete(ns_pods + "/{name}", self._delete_pod),
            web.get("/api/v1/namespaces", self._list_namespaces),
            web.post("/api/v1/namespaces", self._create_namespace),
            web.get("/api/v1/namespaces/{name}", self._get_namespace),
            web.put("/api/v1/namespaces/{name}", self._put_namespace),
            web.patch("/api/v1/namespaces/{name}", self._patch_namespace),
            web.delete("/api/v1/namespaces/{name}", self._delete_namespace),
            *(web.post(f"/_fault/{name}", self._fault_handler(name)) for name in _FAULT_ROUTES),
        ]

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        if request.path.startswith("/_fault/"):
            response: web.StreamResponse = await handler(request)
            return response
        self.requests.append(RequestRecord(request.method, request.path, dict(request.query)))
        self._notify()  # `wait_for` may wait for a request, e.g. the client's next watch
        if self.latency > 0:
            await asyncio.sleep(self.latency)  # injected delay, not a wait for a condition
        for fault in self._faults:
            if fault.count > 0 and fault.matches(request):
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                return _status_response(
                    ApiError(fault.status, "InternalError", "injected fault").status()
                )
        try:
            response = await handler(request)
        except ApiError as exc:
            return _status_response(exc.status())
        except SelectorError as exc:
            return _status_response(status_object(400, "BadRequest", str(exc)))
        return response

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json(loads=json.loads)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {exc}") from exc

    async def _list_pods(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, Resource.PODS, request.match_info.get("namespace"))

    async def _list_namespaces(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, Resource.NAMESPACES, None)

    async def _list(
        self, request: web.Request, resource: Resource, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        event_filter = _Filter(
            resource,
            namespace,
            parse_label_selector(query.get("labelSelector", "")),
            parse_field_selector(query.get("fieldSelector", ""), resource),
        )
        if query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, event_filter)
        items = []
        for obj in self._objects[resource].values():
            if event_filter.matches(obj):
                item = copy.deepcopy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
        return web.json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    def _open_stream(
        self, event_filter: _Filter, resource_version: str, *, bookmarks: bool
    ) -> _WatchStream:
        """Register a watch and queue what it must see first; no await in here (atomic)."""
        stream = _WatchStream(event_filter, bookmarks=bookmarks)
        if resource_version in ("", "0"):
            # No version (or "any"): the current state as synthetic ADDED events, then changes.
            for obj in self._objects[event_filter.resource].values():
                if event_filter.matches(obj):
                    stream.push({"type": EventType.ADDED.value, "object": copy.deepcopy(obj)})
        else:
            try:
                since = int(resource_version)
            except ValueError:
                raise ApiError(
                    400, "BadRequest", f"invalid resource version: {resource_version!r}"
                ) from None
            if since < self._compacted_rv:
                stream.push(
                    {
                        "type": "ERROR",
                        "object": status_object(
                            410,
                            "Expired",
                            f"too old resource version: {since} ({self._compacted_rv + 1})",
                        ),
                    }
                )
                stream.finish("closed")
                return stream
            for event in self._history:
                if event.rv > since and event.resource is event_filter.resource:
                    stream.offer(event)
        self._streams.add(stream)
        self._notify()
        return stream

    async def _watch(self, request: web.Request, event_filter: _Filter) -> web.StreamResponse:
        query = request.query
        timeout = float(query.get("timeoutSeconds") or self._default_watch_timeout)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        stream = self._open_stream(
            event_filter, query.get("resourceVersion", ""), bookmarks=bookmarks
        )
        deadline = asyncio.get_running_loop().time() + timeout
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await self._stream(stream, response, deadline, bookmarks=bookmarks)
            if stream.end == "dropped":
                if request.transport is not None:
                    request.transport.abort()
            else:
                await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away: nothing more to send
        finally:
            self._streams.discard(stream)
            self._notify()
        return response

    async def _stream(
        self,
        stream: _WatchStream,
        response: web.StreamResponse,
        deadline: float,
        *,
        bookmarks: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_bookmark = loop.time() + self._bookmark_interval
        # Bounded by the watch timeout: every pass writes, waits, or reaches the deadline.
        while True:
            while stream.pending:
                item = stream.pending.popleft()
                await response.write(json.dumps(item).encode() + b"\n")
            if stream.end is not None:
                return
            now = loop.time()
            if now >= deadline:
                return
            if bookmarks and now >= next_bookmark:
                stream.push(self._bookmark(stream.filter.resource))
                next_bookmark = now + self._bookmark_interval
                continue
            stream.wakeup.clear()
            wake_at = min(deadline, next_bookmark) if bookmarks else deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.wakeup.wait(), max(0.0, wake_at - now))

    async def _get_pod(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        return web.json_response(self._current(Resource.PODS, key))

    async def _get_namespace(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._current(Resource.NAMESPACES, ("", request.match_info["name"]))
        )

    async def _create_pod(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        namespace = request.match_info["namespace"]
        body_ns = body.get("metadata", {}).get("namespace")
        if body_ns not in (None, namespace):
            raise ApiError(400, "BadRequest", "the namespace of the object does not match")
        if namespace not in {k[1] for k in self._objects[Resource.NAMESPACES]}:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )
        return web.json_response(self._create(Resource.PODS, namespace, body), status=201)

    async def _create_namespace(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response(self._create(Resource.NAMESPACES, "", body), status=201)

    @staticmethod
    def _pod_keep(request: web.Request) -> tuple[str, ...]:
        # The status subresource writes metadata and status; the main resource metadata and spec.
        return ("spec",) if request.path.endswith("/status") else ("status",)

    async def _put_pod(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        body = await self._body(request)
        return web.json_response(
            self._replace(Resource.PODS, key, body, keep=self._pod_keep(request))
        )

    async def _patch_pod(self, request: web.Request) -> web.Response:
        _check_patch_type(request)
        key = (request.match_info["namespace"], request.match_info["name"])
        body = await self._body(request)
        return web.json_response(
            self._patch(Resource.PODS, key, body, keep=self._pod_keep(request))
        )

    async def _delete_pod(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        return web.json_response(self._delete(Resource.PODS, key))

    async def _put_namespace(self, request: web.Request) -> web.Response:
        key = ("", request.match_info["name"])
        body = await self._body(request)
        return web.json_response(self._replace(Resource.NAMESPACES, key, body, keep=()))

    async def _patch_namespace(self, request: web.Request) -> web.Response:
        _check_patch_type(request)
        key = ("", request.match_info["name"])
        body = await self._body(request)
        return web.json_response(self._patch(Resource.NAMESPACES, key, body, keep=()))

    async def _delete_namespace(self, request: web.Request) -> web.Response:
        return web.json_response(
            self._delete(Resource.NAMESPACES, ("", request.match_info["name"]))
        )

    def _fault_handler(self, name: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.json() if request.can_read_body else {}
            result = _FAULT_ROUTES[name](self, body)
            return web.json_response({"result": result, "resourceVersion": str(self._rv)})

        return handle


def _check_patch_type(request: web.Request) -> None:
    if request.content_type not in (
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
    ):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format: {request.content_type}",
        )


def _status_response(status: JSON) -> web.Response:
    return web.json_response(status, status=int(status["code"]))


def _set_latency(server: ApiServer, body: JSON) -> float:
    server.latency = float(body.get("seconds", 0.0))
    return server.latency


def _fail_next(server: ApiServer, body: JSON) -> int:
    fault = server.fail_next(
        int(body.get("count", 1)),
        status=int(body.get("status", 500)),
        path=body.get("path"),
        method=body.get("method"),
        watch=body.get("watch"),
    )
    return fault.count


_FAULT_ROUTES: Final[dict[str, Callable[[ApiServer, JSON], Any]]] = {
    "drop-watches": lambda server, _: server.drop_watches(),
    "end-watches": lambda server, _: server.end_watches(),
    "compact": lambda server, _: server.compact(),
    "bookmark": lambda server, _: server.send_bookmarks(),
    "latency": _set_latency,
    "fail-next": _fail_next,
}
"""POST /_fault/<name> with an optional JSON body: `latency` {"seconds"}, `fail-next` {"count",
"status", "path", "method", "watch"}; the others take no body."""


def kubeconfig(url: str) -> JSON:
    """A kubeconfig for plain http without auth (JSON is YAML, so any client reads it)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "current-context": "fake",
    }


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with ApiServer(
        host=args.host,
        port=args.port,
        history_limit=args.history_limit,
        bookmark_interval=args.bookmark_interval,
    ) as server:
        for name in args.namespace:
            server.create_namespace(name)
        if args.kubeconfig_out:
            path = Path(args.kubeconfig_out)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(kubeconfig(server.url), indent=2) + "\n")
            tmp.replace(path)  # readers never see a half-written file
        sys.stdout.write(f"{server.url}\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig-out", help="write a kubeconfig pointing here")
    parser.add_argument("--history-limit", type=int, default=1000)
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    parser.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="namespace to create at start (repeatable; default: default kube-system istio-system)",
    )
    args = parser.parse_args(argv)
    if args.namespace is None:
        args.namespace = ["default", "kube-system", "istio-system"]
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
