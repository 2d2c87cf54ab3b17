"""The CNI plugin's log lines in the agent's log: HTTP on `<run dir>/log.sock` taking `POST /log`
(docs/design.md §8.3).

The runtime keeps the plugin's stderr in its own log, on the node, where an operator rarely looks;
so, as Istio's plugin does, ours also posts its lines here once it is done, and they appear in the
agent's structured log next to what the agent did for the same pod. The format is Istio's: a JSON
array of strings, each string one JSON log line `{"level", "time", "msg"}`; ours adds the pod's
`pod_name`/`pod_namespace` (from `CNI_ARGS`).

Each usable line is logged as `cni_plugin_log` at its level, with `source="cni-plugin"`, the
`message`, the plugin's `plugin_time` and `pod="<namespace>/<name>"`. The answers:

- 200: every line was logged.
- 400: the body, or some line, is unusable (the first reason is the body); the usable lines were
  logged all the same.
- 413: the body is larger than `max_body`.

The plugin waits at most 200 ms and only logs a failure to its stderr at debug level: logs never
delay or fail a pod.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from ztunnel_redirect.adapters import unixsocket
from ztunnel_redirect.core import constants
from ztunnel_redirect.core.errors import RedirectError

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "InvalidPluginLogError",
    "PluginLine",
    "PluginLogServer",
    "parse_plugin_logs",
]

log = structlog.get_logger(__name__)

DEFAULT_SOCKET_PATH: Final = posixpath.join(
    constants.CNI_AGENT_RUN_DIR, constants.PLUGIN_LOG_SOCKET
)
DEFAULT_MAX_BODY: Final = 64 * 1024
MAX_MESSAGE: Final = 4096
"""Characters of a message kept; the rest is cut (marked by `…`)."""
_MAX_NAME: Final = 253
"""A Kubernetes name or namespace is at most this long."""
_LEVELS: Final = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
"""The plugin's level names (Istio's) to structlog's methods."""


class InvalidPluginLogError(RedirectError):
    """A log line or batch from the plugin we cannot use; the message says what."""


@dataclass(frozen=True)
class PluginLine:
    level: str
    """structlog's name of the level: debug, info, warning, error."""
    message: str
    time: str | None
    pod: str | None
    """`<namespace>/<name>`, when the plugin ran for a Kubernetes pod."""


def _optional_str(entry: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidPluginLogError(f"{key} must be a string of at most {limit} characters")
    return value


def _parse_line(text: Any) -> PluginLine:
    if not isinstance(text, str):
        raise InvalidPluginLogError("each entry must be a string holding one JSON log line")
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise InvalidPluginLogError(f"log line is not JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise InvalidPluginLogError("log line must be a JSON object")
    level = entry.get("level")
    level = _LEVELS.get(level) if isinstance(level, str) else None
    if level is None:
        raise InvalidPluginLogError(f"level must be one of {', '.join(_LEVELS)}")
    message = entry.get("msg")
    if not isinstance(message, str):
        raise InvalidPluginLogError("msg must be a string")
    message = message.strip()
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "…"
    name = _optional_str(entry, "pod_name", _MAX_NAME)
    namespace = _optional_str(entry, "pod_namespace", _MAX_NAME)
    return PluginLine(
        level=level,
        message=message,
        time=_optional_str(entry, "time", 64),
        pod=f"{namespace}/{name}" if name and namespace else None,
    )


def parse_plugin_logs(body: bytes) -> tuple[list[PluginLine], list[str]]:
    """The usable lines of a batch, and the reason each unusable one was refused. Raises
    InvalidPluginLogError when the batch itself is unusable."""
    try:
        batch = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPluginLogError(f"body is not JSON: {exc}") from None
    if not isinstance(batch, list):
        raise InvalidPluginLogError("body must be a JSON array of log lines")
    lines: list[PluginLine] = []
    refused: list[str] = []
    for i, text in enumerate(batch):
        try:
            lines.append(_parse_line(text))
        except InvalidPluginLogError as exc:
            refused.append(f"line {i}: {exc}")
    return lines, refused


class PluginLogServer(unixsocket.HttpOnUnixSocket):
    """Serves `POST /log` on a Unix socket (mode 0600) and logs each line as `cni_plugin_log`."""

    def __init__(
        self, *, socket_path: str = DEFAULT_SOCKET_PATH, max_body: int = DEFAULT_MAX_BODY
    ) -> None:
        app = web.Application(client_max_size=max_body)
        app.router.add_post("/log", self._handle_log)
        super().__init__(socket_path, app)

    async def start(self) -> None:
        await super().start()
        log.info("cni_log_server_started", socket=self.socket_path)

    async def _handle_log(self, request: web.Request) -> web.Response:
        body = await request.read()  # raises 413 above client_max_size
        try:
            lines, refused = parse_plugin_logs(body)
        except InvalidPluginLogError as exc:
            log.warning("cni_plugin_log_rejected", reason=str(exc))
            return web.Response(status=400, text=str(exc))
        for line in lines:
            emit = getattr(log, line.level)
            emit(
                "cni_plugin_log",
                source="cni-plugin",
                message=line.message,
                plugin_time=line.time,
                pod=line.pod,
            )
        if refused:
            log.warning("cni_plugin_log_rejected", reason=refused[0], lines=len(refused))
            return web.Response(
                status=400, text=f"{len(refused)} of {len(refused) + len(lines)}: {refused[0]}"
            )
        return web.Response(status=200, text="ok")
