"""The real node agent as a child process, observed through its JSON log lines and HTTP endpoints.

`AgentProcess(node, log_path=...)` runs `ztunnel-redirect agent` against a `TestNode` (lab netns,
fake /proc, in-process fake API server). Its stderr is read line by line: every line is appended
to `log_path` and, when it is JSON, parsed into `events`; tests wait for an event on a condition
(never by sleeping). The ops ports are 0 (free ports picked by the agent) and learnt from its
`ops_server_started` event. `stop()` sends SIGTERM and kills after a timeout; it is idempotent.

Also: kernel snapshots of a netns (`nft -a list ruleset`, `ip rule`, routes) and the host probe
sets, for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_redirect import constants as c
from ztunnel_redirect.testing.netnslab import Netns
from ztunnel_redirect.testing.node import TestNode

Event = dict[str, Any]

START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
MAX_LINE: Final = 1 << 20
HTTP_TIMEOUT: Final = 5.0
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")


class AgentExitedError(AssertionError):
    """The agent process ended while a test waited for something from it."""


class AgentProcess:
    """One run of the agent. `start()`, then `wait_event`/`readyz`/`metrics`; always `stop()`."""

    def __init__(self, node: TestNode, *extra: str, log_path: Path) -> None:
        self.argv = node.agent_argv(*extra, readiness_port=0, metrics_port=0)
        self.log_path = log_path
        self.events: list[Event] = []
        self.lines: list[str] = []
        self.returncode: int | None = None
        self.readiness_port = 0
        self.metrics_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    # --- lifecycle ---

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("agent not started")
        return self._proc.pid

    async def start(self, *, ready: bool = True, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109
        """Start the process; return once its ops server listens (and, with `ready`, once it is
        ready: `agent_ready`)."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            limit=MAX_LINE,
        )
        self._reader = asyncio.create_task(self._read(), name="agent-log-reader")
        started = await self.wait_event("ops_server_started", timeout=timeout)
        self.readiness_port = int(started["readiness_port"])
        self.metrics_port = int(started["metrics_port"])
        if ready:
            await self.wait_ready(timeout=timeout)

    async def wait_ready(self, *, timeout: float = START_TIMEOUT) -> Event:  # noqa: ASYNC109
        # agent.py logs `agent_ready` with the pod count once every condition is done.
        return await self.wait_event("agent_ready", timeout=timeout, has="pods_enrolled")

    async def stop(self, *, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (negative: a signal)."""
        proc = self._proc
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._reader
            self._reader = None
        self.returncode = proc.returncode
        assert self.returncode is not None
        return self.returncode

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        stream = self._proc.stderr
        with self.log_path.open("a", encoding="utf-8") as out:
            try:
                while line := await stream.readline():
                    text = line.decode(errors="replace").rstrip("\n")
                    out.write(text + "\n")
                    out.flush()
                    self.lines.append(text)
                    with contextlib.suppress(ValueError):
                        event = json.loads(text)
                        if isinstance(event, dict):
                            self.events.append(event)
                    async with self._changed:
                        self._changed.notify_all()
            finally:
                await self._proc.wait()
                async with self._changed:
                    self._changed.notify_all()

    # --- what it said ---

    def find(self, name: str, *, since: int = 0, **fields: Any) -> list[Event]:
        """Events named `name` (from index `since`) whose fields equal `fields`; `has=key`
        only requires that key to be present."""
        has = fields.pop("has", None)
        return [
            e
            for e in self.events[since:]
            if e.get("event") == name
            and (has is None or has in e)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,  # noqa: ASYNC109
        what: str,
    ) -> None:
        """Until `predicate()` holds (checked after every log line); fails when the agent exits."""

        def done() -> bool:
            return predicate() or self._exited()

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s\n{self.tail()}") from None
        if not predicate():
            raise AgentExitedError(f"{what}: agent exited ({self._proc_rc()})\n{self.tail()}")

    async def wait_event(
        self,
        name: str,
        *,
        timeout: float,  # noqa: ASYNC109
        since: int = 0,
        **fields: Any,
    ) -> Event:
        await self.wait_until(
            lambda: bool(self.find(name, since=since, **fields)),
            timeout=timeout,
            what=f"log event {name} {fields}",
        )
        return self.find(name, since=since, **fields)[0]

    async def wait_count(
        self,
        name: str,
        count: int,
        *,
        timeout: float,  # noqa: ASYNC109
        since: int = 0,
        **fields: Any,
    ) -> None:
        """Until `count` events named `name` (with `fields`) arrived after index `since`; scans
        each event once (hundreds of pods log thousands of lines)."""
        seen = [since, 0]  # next index to scan, matches so far

        def enough() -> bool:
            matches = len(self.find(name, since=seen[0], **fields))
            seen[0], seen[1] = len(self.events), seen[1] + matches
            return seen[1] >= count

        await self.wait_until(enough, timeout=timeout, what=f"{count} x {name} {fields}")

    def _exited(self) -> bool:
        return self._proc is not None and self._proc.returncode is not None

    def _proc_rc(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def tail(self, lines: int = 40) -> str:
        return "\n".join(["--- agent log tail ---", *self.lines[-lines:], "---"])

    # --- HTTP ---

    async def get(self, port: int, path: str) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()

    async def readyz(self) -> tuple[int, str]:
        return await self.get(self.readiness_port, "/readyz")

    async def healthz(self) -> tuple[int, str]:
        return await self.get(self.readiness_port, "/healthz")

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) → value."""
        status, text = await self.get(self.metrics_port, "/metrics")
        assert status == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    # --- resources ---

    def cpu_seconds(self) -> float:
        """User + system CPU time of the agent so far (/proc/<pid>/stat fields 14 and 15)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def fds(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())


def metric(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


# --- kernel views -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelView:
    """What the kernel holds in one netns that the agent may have written."""

    ruleset: str
    """`nft -a list ruleset`: with handles and counters."""
    rules: str
    routes: str
    """IPv4 routes of every table, IPv6 routes of our table."""


def kernel_view(ns: Netns) -> KernelView:
    return KernelView(
        ruleset=ns.exec("nft", "-a", "list", "ruleset"),
        rules=ns.ip("rule", "show"),
        routes=ns.ip("-4", "route", "show", "table", "all") + _v6_table(ns),
    )


def _v6_table(ns: Netns) -> str:
    # Only our table: the kernel adds IPv6 link-local and multicast routes on its own, late.
    try:
        return ns.ip("-6", "route", "show", "table", str(c.ROUTE_TABLE))
    except RuntimeError:  # no such table
        return ""


def tables(ns: Netns) -> set[str]:
    """Names of the nftables tables in a netns (`inet istio-ambient-nat`, ...)."""
    out = ns.exec("nft", "list", "tables")
    return {line.removeprefix("table ").strip() for line in out.splitlines() if line.strip()}


def host_set_elements(node: TestNode) -> dict[str, str]:
    """The host's v4 probe set: pod IP → pod UID (its comment); empty when there is no table."""
    try:
        out = node.lab.node.exec("nft", "-j", "list", "set", "inet", c.HOST_TABLE, c.HOST_SET_V4)
    except RuntimeError:
        return {}
    elements: dict[str, str] = {}
    for item in json.loads(out)["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            if isinstance(element, dict) and "elem" in element:
                elements[str(element["elem"]["val"])] = str(element["elem"].get("comment", ""))
            else:
                elements[str(element)] = ""
    return elements


def view_diff(before: Mapping[str, KernelView], after: Mapping[str, KernelView]) -> str:
    """A unified diff of two sets of kernel views ("" when they are equal)."""
    out: list[str] = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        for part in ("ruleset", "rules", "routes"):
            a = getattr(old, part, "").splitlines()
            b = getattr(new, part, "").splitlines()
            out.extend(difflib.unified_diff(a, b, f"{name} {part} before", "after", lineterm=""))
    return "\n".join(out)
