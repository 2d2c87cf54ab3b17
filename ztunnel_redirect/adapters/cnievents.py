"""The agent's end of the CNI plugin: HTTP on a Unix socket taking `POST /cmdadd` (docs/design.md
§8).

The plugin (cniplugin/, a static executable) posts one event per new pod sandbox and waits at
most 5 s for the answer; the runtime fails the sandbox on anything but 200 and retries it later.
So:

- 200: `on_add` returned: the pod is redirected (or the reconciler decided it is not for the mesh).
- 400: the payload is wrong (the reason is the body); `on_add` is not called. This includes a
  netns that is the host's own (the configured host netns, or the agent's: `/proc/1/ns/net` and
  `/proc/self/ns/net` are inside the allowed `/proc/`): pod rules there would redirect the node.
- 413: the body is larger than `max_body`.
- 500: `on_add` raised; the body is its message.
- 503: `on_add` did not finish within `budget`. The work is **not** cancelled: it goes on in the
  background (cancelling half way through could leave a half-installed pod) and its outcome is
  logged as `cni_add_finished_late`. The plugin fails the ADD with "try again later", the runtime
  tears the sandbox down (DEL) and creates a new one, whose ADD comes back here; the reconciler's
  per-pod queue makes the second event cheap, and the pod informer removes what belonged to the
  old sandbox. The default budget (4.5 s) is below the plugin's 5 s socket timeout so that the
  plugin gets a 503 rather than a timeout.

`close()` stops accepting, removes the socket file unless a newer agent has replaced it
(`unixsocket`), and cancels work still running in the background (the reconciler redoes it from
the pod informer after a restart).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import posixpath
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from ztunnel_redirect.adapters import unixsocket
from ztunnel_redirect.core import constants, untrusted
from ztunnel_redirect.core.errors import ConfigError, RedirectError
from ztunnel_redirect.core.model import CniAddEvent, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "CniAddEvent",
    "CniEventServer",
    "InvalidCniEventError",
    "OnAdd",
    "parse_add_event",
]

log = structlog.get_logger(__name__)

DEFAULT_SOCKET_PATH: Final = posixpath.join(
    constants.CNI_AGENT_RUN_DIR, constants.PLUGIN_EVENT_SOCKET
)
DEFAULT_BUDGET_S: Final = 4.5
DEFAULT_MAX_BODY: Final = 64 * 1024
_CLOSE_GRACE_S: Final = 2.0
_POD_UID: Final = re.compile(r"[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*")
"""Hex groups joined by single dashes: a UUID (API pods), or the kubelet's 32-hex-digit hash
(static pods, whose mirror pod in the API has a UUID of its own)."""
_MAX_POD_UID_LEN: Final = 64
_OWN_NETNS: Final = "/proc/self/ns/net"


class InvalidCniEventError(RedirectError):
    """The plugin sent something we cannot act on; the message says what."""


OnAdd = Callable[[CniAddEvent], Coroutine[Any, Any, None]]


def _normalise_dirs(dirs: Iterable[str]) -> tuple[str, ...]:
    out = []
    for d in dirs:
        if not posixpath.isabs(d):
            raise ConfigError(f"allowed netns directory {d!r} is not an absolute path")
        out.append(posixpath.normpath(d).rstrip("/") + "/")
    return tuple(out)


def _non_empty_str(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidCniEventError(f"{key} must be a non-empty string")
    return value


def _check_netns(path: str, allowed_dirs: tuple[str, ...]) -> str:
    if "\x00" in path or not posixpath.isabs(path):
        raise InvalidCniEventError(f"Netns {path!r} is not an absolute path")
    # normpath resolves `..` textually: `/proc/../etc/x` becomes `/etc/x` and is refused below.
    # Symlinks are not followed: the path names a file in the host's mount namespace.
    normalised = posixpath.normpath(path)
    if normalised.startswith("//"):
        normalised = "/" + normalised.lstrip("/")
    if not any(normalised.startswith(d) and len(normalised) > len(d) for d in allowed_dirs):
        raise InvalidCniEventError(
            f"Netns {path!r} is outside the allowed directories ({', '.join(allowed_dirs)})"
        )
    return normalised


def _parse_pod_uid(payload: Mapping[str, Any]) -> PodUid | None:
    value = payload.get("PodUID")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_POD_UID_LEN or not _POD_UID.fullmatch(value):
        raise InvalidCniEventError(
            f"PodUID must be a UID (hex digits and dashes, at most {_MAX_POD_UID_LEN} characters)"
        )
    return PodUid(value)


def _refuse_host_netns(path: str, host_netns: frozenset[NetnsId]) -> None:
    """The host's netns is refused by identity, whatever path names it (`/proc/<pid>/ns/net` of
    any host process, a bind mount). A path that cannot be read passes: the work on it fails."""
    if netns_id(path) in host_netns:
        raise InvalidCniEventError(
            f"Netns {path!r} is the host's network namespace, not a pod's; refusing it"
        )


def _parse_ips(value: Any) -> tuple[str, ...]:
    """The event's IPs; none when absent or null (Istio's plugin sends `null` without a
    prevResult): the pod's IPs then come from the API, as for an empty list."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidCniEventError("IPs must be a list")
    ips: list[str] = []
    for i, entry in enumerate(value):
        address = entry.get("Address") if isinstance(entry, dict) else None
        ip = address.get("IP") if isinstance(address, dict) else None
        if not isinstance(ip, str):
            raise InvalidCniEventError(f'IPs[{i}] must be {{"Address": {{"IP": "<address>"}}}}')
        try:
            ips.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise InvalidCniEventError(f"IPs[{i}]: {ip!r} is not an IP address") from None
    return tuple(ips)


def parse_add_event(
    body: bytes, *, allowed_netns_dirs: Iterable[str] = constants.ALLOWED_NETNS_DIRS
) -> CniAddEvent:
    """Validate the plugin's JSON; raises InvalidCniEventError naming the first problem."""
    try:
        payload = untrusted.load_json(body)
    except ValueError as exc:
        raise InvalidCniEventError(f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidCniEventError("body must be a JSON object")
    netns = _check_netns(_non_empty_str(payload, "Netns"), _normalise_dirs(allowed_netns_dirs))
    return CniAddEvent(
        netns=netns,
        pod_name=_non_empty_str(payload, "PodName"),
        pod_namespace=_non_empty_str(payload, "PodNamespace"),
        ips=_parse_ips(payload.get("IPs")),
        pod_uid=_parse_pod_uid(payload),
    )


def _ignore_status(_status: int) -> None:
    """No one counts the answers."""


class CniEventServer(unixsocket.HttpOnUnixSocket):
    """Serves `POST /cmdadd` on a Unix socket (mode 0600) and hands each event to `on_add`."""

    def __init__(
        self,
        on_add: OnAdd,
        *,
        socket_path: str = DEFAULT_SOCKET_PATH,
        allowed_netns_dirs: Iterable[str] = constants.ALLOWED_NETNS_DIRS,
        host_netns: str | None = None,
        budget: float = DEFAULT_BUDGET_S,
        max_body: int = DEFAULT_MAX_BODY,
        on_response: Callable[[int], None] = _ignore_status,
    ) -> None:
        """`host_netns`: the host's network namespace (the agent's `host_netns` setting); it is
        refused as a pod's netns, and so is the agent's own netns. `on_response(status)`: each
        answer to a `/cmdadd` request (a metric)."""
        self._on_add = on_add
        self._on_response = on_response
        self._allowed = _normalise_dirs(allowed_netns_dirs)
        self._host_netns_paths = (_OWN_NETNS,) if host_netns is None else (_OWN_NETNS, host_netns)
        self._host_netns: frozenset[NetnsId] = frozenset()
        self._budget = budget
        app = web.Application(client_max_size=max_body)
        app.router.add_post("/cmdadd", self._handle_add)
        super().__init__(socket_path, app)
        self._work: set[asyncio.Task[None]] = set()
        self._late: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._host_netns = self._identify_host_netns()
        await super().start()
        log.info("cni_event_server_started", socket=self.socket_path)

    def _identify_host_netns(self) -> frozenset[NetnsId]:
        keys: set[NetnsId] = set()
        for path in self._host_netns_paths:
            key = netns_id(path)
            if key is None:
                log.warning("host_netns_unreadable", netns=path)
            else:
                keys.add(key)
        return frozenset(keys)

    async def close(self) -> None:
        await super().close()
        for task in list(self._work):
            task.cancel()
        if self._work:
            await asyncio.wait(list(self._work), timeout=_CLOSE_GRACE_S)

    async def _handle_add(self, request: web.Request) -> web.Response:
        try:
            response = await self._answer_add(request)
        except web.HTTPException as exc:
            self._on_response(exc.status)
            raise
        self._on_response(response.status)
        return response

    async def _answer_add(self, request: web.Request) -> web.Response:
        body = await request.read()  # raises 413 above client_max_size
        try:
            event = parse_add_event(body, allowed_netns_dirs=self._allowed)
            _refuse_host_netns(event.netns, self._host_netns)
        except InvalidCniEventError as exc:
            log.warning("cni_event_rejected", reason=str(exc))
            return web.Response(status=400, text=str(exc))
        pod = f"{event.pod_namespace}/{event.pod_name}"
        log.info(
            "cni_add_received",
            pod=pod,
            pod_uid=event.pod_uid,
            netns=event.netns,
            ips=list(event.ips),
        )
        task = asyncio.create_task(self._on_add(event), name=f"cni-add {pod}")
        self._work.add(task)
        task.add_done_callback(functools.partial(self._work_done, pod))
        try:
            async with asyncio.timeout(self._budget):
                await asyncio.shield(task)
        except TimeoutError:
            self._late.add(task)
            log.warning("cni_add_timed_out", pod=pod, budget_s=self._budget)
            return web.Response(
                status=503, text=f"still setting up pod {pod} after {self._budget}s; try again"
            )
        except RedirectError as exc:
            log.warning("cni_add_failed", pod=pod, reason=str(exc))
            return web.Response(status=500, text=str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("cni_add_crashed", pod=pod)
            return web.Response(status=500, text=f"internal error: {type(exc).__name__}: {exc}")
        return web.Response(status=200, text="ok")

    def _work_done(self, pod: str, task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        late = task in self._late
        self._late.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # always retrieved, so asyncio never warns about it
        if late:
            if exc is None:
                log.info("cni_add_finished_late", pod=pod)
            else:
                log.warning("cni_add_finished_late", pod=pod, reason=str(exc))
