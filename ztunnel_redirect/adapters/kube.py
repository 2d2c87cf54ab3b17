"""The Kubernetes adapter: list/watch of this node's pods and of namespaces, and pod status patches.

The only module that imports `kubernetes_asyncio`. Everything above it sees `model.Pod`,
`model.Namespace`, the `Store` protocol and errors from our hierarchy.

List-then-watch is implemented here rather than with `kubernetes_asyncio.watch.Watch`: that class
silently re-watches on 410 and on stream end when no timeout is given, which would hide the re-list
that a 410 requires. Our loop decides: resume from the last resourceVersion (bookmarks included)
after a dropped stream, re-list and `replace_*` after 410 Gone, back off with jitter on errors.
Requests use `_preload_content=False` and the wire JSON is translated once, by `pod_from_api` /
`namespace_from_api`, the same way for lists and watch events.

Of kubernetes_asyncio the agent uses the connection machinery (`ApiClient`, its `Configuration`,
the kubeconfig and in-cluster loaders) and nothing generated: the five requests it sends are
written below as `ApiCall`s, with the method and path its `CoreV1Api` would send (a test checks
them against the library). The library's package `__init__`s import every generated API and model
class (about 39 MiB of RSS, a third of the agent's); they are deferred (`core.packageinit`), so
the agent loads only what it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import structlog

from ztunnel_redirect.control.workqueue import Backoff
from ztunnel_redirect.core import constants, untrusted
from ztunnel_redirect.core.errors import ConfigError, RedirectError, RetryableError
from ztunnel_redirect.core.model import Namespace, Pod, PodUid
from ztunnel_redirect.core.packageinit import defer_package_init

# Before the first import of kubernetes_asyncio: its package __init__s stay unrun (see above).
# `kubernetes_asyncio.config` imports `ApiClient` and `Configuration` from the client package.
defer_package_init(
    "kubernetes_asyncio.client",
    reexports={
        "ApiClient": "kubernetes_asyncio.client.api_client",
        "Configuration": "kubernetes_asyncio.client.configuration",
    },
)
defer_package_init("kubernetes_asyncio.client.models")  # api_client imports it, for typed bodies

from kubernetes_asyncio import config as k8s_config  # noqa: E402 - after the deferral above
from kubernetes_asyncio.client.api_client import ApiClient as _ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402

__all__ = [
    "API_CALLS",
    "WATCH_BACKOFF",
    "ApiCall",
    "KubeApiError",
    "KubeClient",
    "KubeRequestError",
    "RestartReason",
    "Store",
    "Watcher",
    "load_client",
    "namespace_from_api",
    "pod_from_api",
]

log = structlog.get_logger(__name__)

ApiClient = Any
"""`kubernetes_asyncio.client.ApiClient` (the library ships no type information)."""
JSON = Mapping[str, Any]
_T = TypeVar("_T")

MERGE_PATCH: Final = "application/merge-patch+json"


@dataclass(frozen=True)
class ApiCall:
    """One request of the core API: its HTTP method and path template (`{name}` parameters)."""

    method: str
    path: str


LIST_PODS: Final = ApiCall("GET", "/api/v1/pods")
LIST_NAMESPACES: Final = ApiCall("GET", "/api/v1/namespaces")
READ_POD: Final = ApiCall("GET", "/api/v1/namespaces/{namespace}/pods/{name}")
READ_NAMESPACE: Final = ApiCall("GET", "/api/v1/namespaces/{name}")
PATCH_POD_STATUS: Final = ApiCall("PATCH", "/api/v1/namespaces/{namespace}/pods/{name}/status")

API_CALLS: Final = {
    "list_pod_for_all_namespaces": LIST_PODS,
    "list_namespace": LIST_NAMESPACES,
    "read_namespaced_pod": READ_POD,
    "read_namespace": READ_NAMESPACE,
    "patch_namespaced_pod_status": PATCH_POD_STATUS,
}
"""Every request the agent sends, by the name of the `CoreV1Api` method that sends the same (the
cluster role grants exactly these; lists are also watched)."""


async def _send(
    api: ApiClient,
    call: ApiCall,
    *,
    request_timeout: float | aiohttp.ClientTimeout,
    path: Mapping[str, str] | None = None,
    query: Mapping[str, object] | None = None,
    body: object = None,
    content_type: str | None = None,
) -> Any:
    """Send `call` as `CoreV1Api` would (same headers, auth and parameter encoding); the raw
    aiohttp response, whatever its status."""
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await api.call_api(
        call.path,
        call.method,
        path_params=dict(path or {}),
        query_params=[(key, value) for key, value in (query or {}).items() if value is not None],
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=request_timeout,
    )


class KubeApiError(RetryableError):
    """The API server failed or could not be reached (5xx, 429, 409, timeouts, broken streams)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeRequestError(RedirectError):
    """The API server refused the request itself (4xx): retrying the same request cannot help."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class _ExpiredError(Exception):
    """410 Gone: the resourceVersion we resume from is no longer in the server's history."""


class _NotFoundError(Exception):
    pass


async def load_client(*, kubeconfig: str | None = None) -> ApiClient:
    """An API client from the pod's service account, or from `kubeconfig` when given."""
    configuration = Configuration()
    try:
        if kubeconfig:
            await k8s_config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        else:
            load_incluster: Callable[..., None] = k8s_config.load_incluster_config
            load_incluster(client_configuration=configuration)
    except (k8s_config.ConfigException, OSError, ValueError) as exc:
        source = kubeconfig or "in-cluster service account"
        raise ConfigError(f"cannot load Kubernetes client config from {source}: {exc}") from exc
    return _ApiClient(configuration=configuration)


# --- translation ---------------------------------------------------------------------------------


class MalformedObjectError(KubeApiError):
    """An object from the API without the shape of its kind (a field of the wrong type, an
    address that is not one). A watch skips it with a warning and goes on; a single read fails
    retryably."""


def _object(value: Any, what: str) -> JSON:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedObjectError(f"{what} is not an object")
    return value


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedObjectError(f"{what} is not a string")
    return value


def _string_map(value: Any, what: str) -> Mapping[str, str]:
    mapping = _object(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise MalformedObjectError(f"{what} does not map strings to strings")
    return mapping


def _address(value: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(_text(value, what)))
    except ValueError:
        raise MalformedObjectError(f"{what} {value!r} is not an IP address") from None


def _pod_ips(status: JSON) -> tuple[str, ...]:
    entries = status.get("podIPs")
    if entries is not None and not isinstance(entries, list):
        raise MalformedObjectError("status.podIPs is not a list")
    ips = tuple(
        _address(ip, "status.podIPs[].ip")
        for entry in entries or ()
        if (ip := _object(entry, "status.podIPs[]").get("ip"))
    )
    if not ips and status.get("podIP"):
        ips = (_address(status["podIP"], "status.podIP"),)
    return ips


def pod_from_api(obj: Any) -> Pod:
    """A pod in the API's wire shape (`metadata`, `spec`, `status` dicts) as our model; raises
    `MalformedObjectError` naming the first field that does not have its type."""
    pod = _object(obj, "pod")
    metadata = _object(pod.get("metadata"), "metadata")
    spec = _object(pod.get("spec"), "spec")
    status = _object(pod.get("status"), "status")
    host_network = spec.get("hostNetwork")
    if host_network is not None and not isinstance(host_network, bool):
        raise MalformedObjectError("spec.hostNetwork is not a boolean")
    return Pod(
        uid=PodUid(_text(metadata.get("uid"), "metadata.uid")),
        name=_text(metadata.get("name"), "metadata.name"),
        namespace=_text(metadata.get("namespace"), "metadata.namespace"),
        node_name=_text(spec.get("nodeName"), "spec.nodeName"),
        ips=_pod_ips(status),
        labels=_string_map(metadata.get("labels"), "metadata.labels"),
        annotations=_string_map(metadata.get("annotations"), "metadata.annotations"),
        host_network=bool(host_network),
        phase=_text(status.get("phase"), "status.phase") or "Pending",
        service_account=_text(spec.get("serviceAccountName"), "spec.serviceAccountName")
        or "default",
        # A terminating pod (deletionTimestamp set) stays enrolled while it drains, as in
        # Istio; only the DELETED event marks it deleted.
        deleted=False,
    )


def namespace_from_api(obj: Any) -> Namespace:
    metadata = _object(_object(obj, "namespace").get("metadata"), "metadata")
    return Namespace(
        name=_text(metadata.get("name"), "metadata.name"),
        labels=_string_map(metadata.get("labels"), "metadata.labels"),
    )


def _well_formed(resource: str, translate: Callable[[Any], _T], items: Sequence[Any]) -> list[_T]:
    """The items of a list that have their kind's shape; the others are skipped with a
    warning, so that one bad object never keeps the node's pods from being listed."""
    out = []
    for item in items:
        try:
            out.append(translate(item))
        except MalformedObjectError as exc:
            log.warning("list_object_malformed", resource=resource, error=str(exc))
    return out


# --- errors at the boundary ----------------------------------------------------------------------


def _error_from_response(status: int, body: bytes, what: str) -> Exception:
    try:
        parsed = untrusted.load_json(body)
        message = parsed.get("message") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:200]
    text = f"{what}: HTTP {status}: {message}"
    if status == 404:
        return _NotFoundError(text)
    if status == 410:
        return _ExpiredError(text)
    if status in (409, 429) or status >= 500:
        return KubeApiError(text, status=status)
    return KubeRequestError(text, status=status)


def _uid_changed(status: int, body: bytes) -> bool:
    """A 422 whose cause is `metadata.uid`: our uid precondition failed, the pod was replaced."""
    if status != 422:
        return False
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        causes = untrusted.load_json(body).get("details", {}).get("causes") or []
        return any(cause.get("field") == "metadata.uid" for cause in causes)
    return False


@contextlib.asynccontextmanager
async def _request(what: str) -> AsyncIterator[None]:
    """Translate transport failures into `KubeApiError`, once, here."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise KubeApiError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except untrusted.MalformedDocumentError as exc:  # a malformed line or body
        raise KubeApiError(f"{what}: malformed response: {exc}") from exc


async def _read(response: Any, what: str) -> Any:
    """The JSON body of a complete (non-streaming) response; non-2xx raise."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status < 300:
        raise _error_from_response(response.status, body, what)
    return untrusted.load_json(body)


# --- the store the watcher feeds -----------------------------------------------------------------


class Store(Protocol):
    """What the watcher feeds. Implementations only record the change (kube-proxy style)."""

    def replace_pods(self, pods: Sequence[Pod]) -> None:
        """After every (re)list of pods: the full set of this node's pods."""

    def upsert_pod(self, pod: Pod) -> None: ...

    def delete_pod(self, pod: Pod) -> None:
        """The pod is gone from the API; `pod.deleted` is True."""

    def replace_namespaces(self, namespaces: Sequence[Namespace]) -> None: ...

    def upsert_namespace(self, ns: Namespace) -> None: ...

    def delete_namespace(self, ns: Namespace) -> None: ...


# --- the watcher ---------------------------------------------------------------------------------


WATCH_BACKOFF: Final = Backoff(initial=0.2, maximum=5.0, factor=2.0, jitter=0.5)
"""Reconnect pacing for list/watch: quick first retries, capped low (the API server is usually
back in seconds), jittered so agents on many nodes do not retry in step."""


class RestartReason(Enum):
    """Why a list/watch loop started over; the `reason` given to `on_restart`."""

    EXPIRED = "expired"
    """410 Gone: re-list and replace."""
    STREAM_ENDED = "stream_ended"
    """The server ended the watch (its timeout, or a clean close): resume from our version."""
    API_ERROR = "api_error"
    """An HTTP error or an ERROR event: back off, then resume."""
    CONNECTION_ERROR = "connection_error"
    """The connection broke or timed out: back off, then resume."""


_EVENT_TYPES: Final = {"ADDED": "add", "MODIFIED": "update", "DELETED": "delete"}
"""Watch event types as Istio's informer names them (`on_event`)."""


@dataclass(frozen=True)
class _Kind:
    name: str
    call: ApiCall
    field_selector: str | None
    replace: Callable[[Sequence[JSON]], None]
    upsert: Callable[[JSON], None]
    delete: Callable[[JSON], None]


@dataclass
class _Cursor:
    resource_version: str | None = None
    events: int = 0


class Watcher:
    """List-then-watch of this node's pods and of all namespaces, feeding a `Store`.

    `synced` is set once both initial lists have been delivered to the store; until then the
    store's content is partial and must not drive any change to live rules.
    """

    def __init__(
        self,
        *,
        api: ApiClient,
        node_name: str,
        store: Store,
        backoff: Backoff = WATCH_BACKOFF,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_restart: Callable[[str, str], None] | None = None,
        on_event: Callable[[str, str], None] | None = None,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        min_watch_duration: float = 1.0,
    ) -> None:
        if not node_name:
            raise ConfigError("node name is required to watch this node's pods")
        self._api = api
        self._node_name = node_name
        self._store = store
        self._backoff = backoff
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._sleep = sleep
        self._clock = clock
        self._on_restart = on_restart
        self._on_event = on_event
        """`(resource, type)` for each object delivered, with the types of Istio's informer:
        "add" (ADDED, or in the first list), "update" (MODIFIED, or in a re-list), "delete"."""
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._min_watch_duration = min_watch_duration
        """A stream that ends sooner than this without any event counts as a failure."""
        self._listed: set[str] = set()
        self.synced = asyncio.Event()
        self._cursors: dict[str, _Cursor] = {}

    def resource_version(self, resource: str) -> str | None:
        """The version `resource` ("pods" or "namespaces") would resume from; None: re-list."""
        cursor = self._cursors.get(resource)
        return cursor.resource_version if cursor is not None else None

    async def run(self) -> None:
        """Watch until cancelled. API failures are retried here; an unexpected error (e.g. from
        the store) ends both loops and leaves as an ExceptionGroup (the root task fails)."""
        kinds = (
            _Kind(
                name="pods",
                call=LIST_PODS,
                field_selector=f"spec.nodeName={self._node_name}",
                replace=lambda items: self._store.replace_pods(
                    _well_formed("pods", pod_from_api, items)
                ),
                upsert=lambda obj: self._store.upsert_pod(pod_from_api(obj)),
                delete=lambda obj: self._store.delete_pod(
                    dataclasses.replace(pod_from_api(obj), deleted=True)
                ),
            ),
            _Kind(
                name="namespaces",
                call=LIST_NAMESPACES,
                field_selector=None,
                replace=lambda items: self._store.replace_namespaces(
                    _well_formed("namespaces", namespace_from_api, items)
                ),
                upsert=lambda obj: self._store.upsert_namespace(namespace_from_api(obj)),
                delete=lambda obj: self._store.delete_namespace(namespace_from_api(obj)),
            ),
        )
        async with asyncio.TaskGroup() as group:
            for kind in kinds:
                group.create_task(self._run_kind(kind), name=f"kube-watch-{kind.name}")

    async def _run_kind(self, kind: _Kind) -> None:
        cursor = self._cursors.setdefault(kind.name, _Cursor())
        failures = 0
        # Runs until cancelled: every pass is one list or one watch, and failures wait longer.
        while True:
            started = self._clock()
            cursor.events = 0
            refused = False
            try:
                if cursor.resource_version is None:
                    await self._list(kind, cursor)
                await self._watch(kind, cursor)
            except _ExpiredError:
                cursor.resource_version = None
                reason = RestartReason.EXPIRED
            except KubeApiError as exc:
                reason = (
                    RestartReason.API_ERROR
                    if exc.status is not None
                    else RestartReason.CONNECTION_ERROR
                )
                log.warning("watch_failed", resource=kind.name, reason=reason.value, error=str(exc))
            except KubeRequestError as exc:
                # Forbidden, a bad selector, ...: not transient, but an agent must not stop
                # watching; it retries at the slowest pace.
                reason, refused = RestartReason.API_ERROR, True
                log.error(  # noqa: TRY400 - the message says it all; no traceback wanted
                    "watch_refused", resource=kind.name, error=str(exc)
                )
            else:
                reason = RestartReason.STREAM_ENDED
            elapsed = self._clock() - started
            productive = cursor.events > 0 or (
                reason is RestartReason.STREAM_ENDED and elapsed >= self._min_watch_duration
            )
            if productive:
                failures = 0
            if refused:
                delay = self._backoff.maximum
            elif productive or reason is RestartReason.EXPIRED:
                # Resume (or re-list after 410) at once; only a repeat in a row backs off.
                delay = 0.0 if failures == 0 else self._backoff.delay(failures - 1, self._rng)
            else:
                delay = self._backoff.delay(failures, self._rng)
            failures += 1
            log.debug(
                "watch_restarted",
                resource=kind.name,
                reason=reason.value,
                resource_version=cursor.resource_version,
                delay_s=round(delay, 3),
            )
            if self._on_restart is not None:
                self._on_restart(kind.name, reason.value)
            if delay > 0:
                await self._sleep(delay)

    async def _list(self, kind: _Kind, cursor: _Cursor) -> None:
        what = f"list {kind.name}"
        async with _request(what):
            response = await _send(
                self._api,
                kind.call,
                query={"fieldSelector": kind.field_selector},
                request_timeout=self._request_timeout,
            )
            body = _object(await _read(response, what), what)
        items = body.get("items") or []
        if not isinstance(items, list):
            raise MalformedObjectError(f"{what}: items is not a list")
        kind.replace(items)
        if self._on_event is not None:
            event_type = "update" if kind.name in self._listed else "add"
            for _item in items:
                self._on_event(kind.name, event_type)
        metadata = _object(body.get("metadata"), f"{what}: metadata")
        cursor.resource_version = str(metadata.get("resourceVersion") or "0")
        log.info(
            "resource_listed",
            resource=kind.name,
            count=len(items),
            resource_version=cursor.resource_version,
        )
        if kind.name not in self._listed:
            self._listed.add(kind.name)
            if len(self._listed) == 2:
                self.synced.set()
                log.info("kube_synced", node=self._node_name)

    async def _watch(self, kind: _Kind, cursor: _Cursor) -> None:
        what = f"watch {kind.name}"
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._request_timeout,
            sock_connect=self._request_timeout,
            sock_read=self._watch_timeout + self._request_timeout,
        )
        async with _request(what):
            response = await _send(
                self._api,
                kind.call,
                query={
                    "allowWatchBookmarks": True,
                    "fieldSelector": kind.field_selector,
                    "resourceVersion": cursor.resource_version,
                    "timeoutSeconds": self._watch_timeout,
                    "watch": True,
                },
                request_timeout=timeout,
            )
            try:
                if response.status != 200:
                    raise _error_from_response(response.status, await response.read(), what)
                # Bounded by the server's timeoutSeconds and our sock_read timeout.
                while line := await response.content.readline():
                    if line.strip():
                        self._apply(kind, cursor, untrusted.load_json(line))
            finally:
                response.close()

    def _apply(self, kind: _Kind, cursor: _Cursor, event: Any) -> None:
        """One line of a watch stream. A line without an event's shape breaks the stream (the
        watch resumes from our version); an object in it without its kind's shape is skipped
        with a warning, so that one bad object never stops the node's watch."""
        try:
            event = _object(event, "event")
            obj = _object(event.get("object"), "object")
            resource_version = _object(obj.get("metadata"), "object.metadata").get(
                "resourceVersion"
            )
        except MalformedObjectError as exc:
            raise MalformedObjectError(f"watch {kind.name}: {exc}") from None
        event_type = event.get("type")
        if event_type == "ERROR":
            code = obj.get("code")
            text = f"watch {kind.name}: {obj.get('reason')}: {obj.get('message')}"
            if code == 410:
                raise _ExpiredError(text)
            raise KubeApiError(text, status=code if isinstance(code, int) else 500)
        cursor.events += 1
        try:
            if event_type in ("ADDED", "MODIFIED"):
                kind.upsert(obj)
            elif event_type == "DELETED":
                kind.delete(obj)
            elif event_type != "BOOKMARK":
                log.warning("watch_event_unknown", resource=kind.name, type=str(event_type))
                return
        except MalformedObjectError as exc:
            log.warning(
                "watch_object_malformed", resource=kind.name, type=event_type, error=str(exc)
            )
        counted = _EVENT_TYPES.get(str(event_type))
        if counted is not None and self._on_event is not None:
            self._on_event(kind.name, counted)
        if resource_version:
            cursor.resource_version = str(resource_version)


# --- reads and the status patch ------------------------------------------------------------------


class KubeClient:
    """Single reads and the redirection status patch, on an `ApiClient` from `load_client`."""

    def __init__(self, api: ApiClient, *, request_timeout: float = 10.0) -> None:
        self._api = api
        self._request_timeout = request_timeout

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        """The pod, or None when it does not exist."""
        what = f"get pod {namespace}/{name}"
        try:
            async with _request(what):
                response = await _send(
                    self._api,
                    READ_POD,
                    path={"namespace": namespace, "name": name},
                    request_timeout=self._request_timeout,
                )
                return pod_from_api(await _read(response, what))
        except _NotFoundError:
            return None

    async def get_namespace(self, name: str) -> Namespace | None:
        what = f"get namespace {name}"
        try:
            async with _request(what):
                response = await _send(
                    self._api,
                    READ_NAMESPACE,
                    path={"name": name},
                    request_timeout=self._request_timeout,
                )
                return namespace_from_api(await _read(response, what))
        except _NotFoundError:
            return None

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        """Set (or with None remove) `ambient.istio.io/redirection` on the pod's status.

        A JSON merge patch on `pods/{name}/status`, with the pod's uid as a precondition so that
        a new pod of the same name never gets our annotation. A pod that is gone is not an error.
        """
        what = f"patch pod {pod.key} status"
        body = {"metadata": {"uid": pod.uid, "annotations": {constants.STATUS_ANNOTATION: value}}}
        async with _request(what):
            response = await _send(
                self._api,
                PATCH_POD_STATUS,
                path={"namespace": pod.namespace, "name": pod.name},
                body=body,
                content_type=MERGE_PATCH,
                request_timeout=self._request_timeout,
            )
            try:
                payload = await response.read()
            finally:
                response.release()
        status = response.status
        if status == 404 or _uid_changed(status, payload):
            log.debug(
                "redirection_status_skipped",
                pod=pod.key,
                pod_uid=pod.uid,
                reason="pod_gone",
            )
            return
        if not 200 <= status < 300:
            raise _error_from_response(status, payload, what)
        # At debug: the run that decided the value logged it (`pod_status_set`); a failed write
        # is a warning.
        log.debug("redirection_status_patched", pod=pod.key, pod_uid=pod.uid, value=value)
