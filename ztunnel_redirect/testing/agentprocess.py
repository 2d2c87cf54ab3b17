"""The real node agent as a child process, and the CNI plugin file run as a container runtime
runs it: what the agent and CNI end-to-end tests, the demo and the benchmark drive.

`AgentProcess.for_node(node, *flags, log_path=...)` runs `ztunnel-redirect agent` against a
`TestNode` (lab netns, fake /proc, in-process fake API server) with JSON logs and ops ports 0 (free
ports picked by the agent, learnt from its `ops_server_started` line). A reader task copies every
stderr line to `log_path` and parses the JSON ones into `events`; callers wait for an event on a
condition under a timeout, never by sleeping, and a wait fails at once, with the log's tail, when
the agent exits. `stop()` sends SIGTERM (the agent leaves its rules in place) and kills after a
timeout; it is idempotent.

`CniRuntime` installs the plugin executable (built by `make cni-plugin`: `built_plugin()`) into a
CNI bin dir and runs it as a container runtime does: directly, with the `CNI_*` environment and a
network config carrying `prevResult` (`prev_result`) on stdin.

The small helpers below them are what every driver of the agent observes it through: the status
annotation in the API, the ztunnel stand-in of a pod, a connected fake ztunnel, /metrics samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import Behaviour, DataPlaneFactory, FakeZtunnel
from ztunnel_redirect.testing.node import NodePod, TestNode
from ztunnel_redirect.testing.standin import Standin

__all__ = [
    "AgentExitedError",
    "AgentProcess",
    "AgentWaitError",
    "CniRuntime",
    "Event",
    "PluginInvocation",
    "PluginRun",
    "Samples",
    "built_plugin",
    "connect_ztunnel",
    "host_set_elements",
    "metric",
    "prev_result",
    "standin_of",
    "status_annotation",
    "wait_pod_settled",
]

Event = dict[str, Any]
"""One JSON log line of the agent."""
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of /metrics: (name, sorted labels) → value."""

START_TIMEOUT: Final = 30.0
EVENT_TIMEOUT: Final = 15.0
"""Bound on one change taking effect (normally well under a second)."""
STOP_TIMEOUT: Final = 10.0
HTTP_TIMEOUT: Final = 5.0
PLUGIN_TIMEOUT: Final = 15.0
"""The plugin's own agent timeout is 5 s; this only bounds a wedged child."""
MAX_LINE: Final = 1 << 20
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")

PLUGIN_NAME: Final = "ztunnel-redirect-cni"
REPO: Final = Path(__file__).resolve().parents[2]
BUILT_PLUGIN: Final = REPO / "build" / "cni" / PLUGIN_NAME
"""Where `make cni-plugin` puts the executable."""
BUILD_TIMEOUT: Final = 300.0


class AgentWaitError(RedirectError):
    """What a caller waited for from the agent did not happen in time (the log's tail says why)."""


class AgentExitedError(AgentWaitError):
    """The agent process ended while a caller waited for something from it."""


# --- the agent as a process ---------------------------------------------------------------------


class AgentProcess:
    """One run of the agent: `start()`, then `wait_event`/`readyz`/`metrics`; always `stop()`
    (or use it as `async with`)."""

    def __init__(self, argv: Sequence[str], *, log_path: Path) -> None:
        """`argv` must make the agent log JSON to stderr; `for_node` builds one that does."""
        self.argv = list(argv)
        self.log_path = log_path
        self.events: list[Event] = []
        """Every JSON log line so far, in order."""
        self.lines: list[str] = []
        """Every stderr line so far, as text (JSON or not)."""
        self.readiness_port = 0
        self.metrics_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    @classmethod
    def for_node(cls, node: TestNode, *flags: str, log_path: Path) -> AgentProcess:
        """The agent against `node`, with JSON logs and ops ports picked by the agent; `flags`
        come last and so override (e.g. `--log-level debug`, `--reconcile-period 2`)."""
        argv = node.agent_argv("--log-format", "json", *flags, readiness_port=0, metrics_port=0)
        return cls(argv, log_path=log_path)

    # --- lifecycle ---

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("agent not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.returncode

    @property
    def mark(self) -> int:
        """The number of events so far: `wait_event(..., since=mark)` waits for a newer one."""
        return len(self.events)

    async def start(
        self,
        *,
        ready: bool = True,
        timeout: float = START_TIMEOUT,  # noqa: ASYNC109 - fails with the log's tail
    ) -> None:
        """Start the process; return once its ops server listens (ports learnt) and, with
        `ready`, once it is ready (`agent_ready`)."""
        if self._proc is not None:
            raise RuntimeError("agent already started")
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            limit=MAX_LINE,
        )
        self._reader = asyncio.create_task(self._read(self._proc), name="agent-log-reader")
        started = await self.wait_event("ops_server_started", timeout=timeout)
        self.readiness_port = int(started["readiness_port"])
        self.metrics_port = int(started["metrics_port"])
        if ready:
            await self.wait_ready(timeout=timeout)

    async def wait_ready(
        self,
        *,
        timeout: float = START_TIMEOUT,  # noqa: ASYNC109 - as wait_event
    ) -> Event:
        """Until `agent_ready` (logged with the pod count once every readiness condition is
        done); returns that event."""
        return await self.wait_event("agent_ready", timeout=timeout, has="pods_enrolled")

    async def stop(
        self,
        *,
        timeout: float = STOP_TIMEOUT,  # noqa: ASYNC109 - then SIGKILL
    ) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None: never started)."""
        proc = self._proc
        if proc is None:
            return None
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
        return proc.returncode

    async def __aenter__(self) -> AgentProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        stream = proc.stderr
        if stream is None:  # pragma: no cover - start() always pipes stderr
            return
        try:
            with self.log_path.open("a", encoding="utf-8") as out:
                while line := await stream.readline():
                    text = line.decode(errors="replace").rstrip("\n")
                    out.write(text + "\n")
                    out.flush()
                    async with self._changed:
                        self.lines.append(text)
                        with contextlib.suppress(ValueError):
                            event = json.loads(text)
                            if isinstance(event, dict):
                                self.events.append(event)
                        self._changed.notify_all()
        finally:
            # A wait must see the exit: the returncode is set only once the child is reaped.
            await proc.wait()
            async with self._changed:
                self._changed.notify_all()

    # --- what it said ---

    def find(
        self, name: str, *, since: int = 0, has: str | None = None, **fields: Any
    ) -> list[Event]:
        """Events named `name` from index `since` on whose fields equal `fields` (and that carry
        the key `has`, whatever its value)."""
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
        what: str,
        timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - fails with the log's tail
    ) -> None:
        """Until `predicate()` holds (checked after every log line); fails at once when the
        agent exits."""

        def done() -> bool:
            return predicate() or self.returncode is not None

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            raise AgentWaitError(f"{what}: not within {timeout}s\n{self.tail()}") from None
        if not predicate():
            raise AgentExitedError(f"{what}: agent exited ({self.returncode})\n{self.tail()}")

    async def wait_event(
        self,
        name: str,
        *,
        timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - as wait_until
        since: int = 0,
        has: str | None = None,
        **fields: Any,
    ) -> Event:
        """The first event named `name` (with `fields`, and key `has`) from index `since` on."""
        await self.wait_until(
            lambda: bool(self.find(name, since=since, has=has, **fields)),
            timeout=timeout,
            what=f"log event {name} {fields}",
        )
        return self.find(name, since=since, has=has, **fields)[0]

    async def wait_count(
        self,
        name: str,
        count: int,
        *,
        timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - as wait_until
        since: int = 0,
        **fields: Any,
    ) -> None:
        """Until `count` events named `name` (with `fields`) arrived from index `since` on;
        scans each event once (hundreds of pods log thousands of lines)."""
        seen = [since, 0]  # next index to scan, matches so far

        def enough() -> bool:
            matches = len(self.find(name, since=seen[0], **fields))
            seen[0], seen[1] = len(self.events), seen[1] + matches
            return seen[1] >= count

        await self.wait_until(enough, timeout=timeout, what=f"{count} x {name} {fields}")

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

    async def metrics(self) -> Samples:
        """Every sample of /metrics (histograms as their `_sum`, `_count`, `_bucket` samples)."""
        status, text = await self.get(self.metrics_port, "/metrics")
        if status != 200:
            raise AgentWaitError(f"/metrics answered {status}: {text}")
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
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def fds(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())


def metric(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


# --- what the agent did, seen from outside -------------------------------------------------------


def status_annotation(api: ApiServer, pod: NodePod) -> str | None:
    """The agent's status annotation on the pod in the API (None: absent, or no such pod)."""
    found = api.get_pod(pod.namespace, pod.name) or {}
    value = (found.get("metadata", {}).get("annotations") or {}).get(c.STATUS_ANNOTATION)
    return None if value is None else str(value)


def host_set_elements(node: TestNode, name: str = c.HOST_SET_V4) -> dict[str, str]:
    """A host probe set (v4 by default): pod IP → pod UID (its comment); empty when there is no
    table."""
    try:
        out = node.lab.node.exec("nft", "-j", "list", "set", "inet", c.HOST_TABLE, name)
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


async def wait_pod_settled(
    api: ApiServer,
    agent: AgentProcess,
    pod: NodePod,
    *,
    timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - the periodic passes have their own bound
) -> None:
    """Until the agent has handled every event of the pod: it is `enabled` with its IPs in the
    API, and two periodic passes (each waits until the agent's queue is idle) completed since."""

    def holds(obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        annotations = obj["metadata"].get("annotations") or {}
        return (
            bool(obj["status"].get("podIP")) and annotations.get(c.STATUS_ANNOTATION) == "enabled"
        )

    await api.wait_for_pod(pod.namespace, pod.name, holds, timeout=timeout)
    await agent.wait_count("drift_pass_done", 2, since=agent.mark, timeout=timeout)


async def connect_ztunnel(
    socket_path: str,
    *,
    serve: bool = True,
    ipv6: bool = False,
    behaviour: Behaviour | None = None,
    data_plane: DataPlaneFactory | None = None,
    timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - closes the fake on failure
) -> FakeZtunnel:
    """A fake ztunnel (with stand-ins when `serve`, or `data_plane`'s) connected to the agent,
    once its snapshot has arrived; the caller closes it."""
    fake = FakeZtunnel(
        socket_path, serve=serve, ipv6=ipv6, behaviour=behaviour, data_plane=data_plane
    )
    try:
        await fake.start()
        async with asyncio.timeout(timeout):
            await fake.snapshot_done.wait()
    except BaseException:
        await fake.close()
        raise
    return fake


def standin_of(fake: FakeZtunnel, pod: NodePod) -> Standin:
    """The ztunnel stand-in the fake runs in the pod's netns (it got the pod's Add)."""
    workload = fake.workloads.get(PodUid(pod.uid))
    if workload is None or not isinstance(workload.data_plane, Standin):
        raise AgentWaitError(f"the fake ztunnel runs no stand-in for pod {pod.name}")
    return workload.data_plane


# --- the plugin, as the container runtime runs it -----------------------------------------------


@dataclass(frozen=True)
class PluginRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    """From process start to exit."""

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass(frozen=True)
class PluginInvocation:
    """One run of the plugin as the runtime starts it."""

    argv: tuple[str, ...]
    env: dict[str, str]
    stdin: bytes


def prev_result(pod: NodePod) -> dict[str, Any]:
    """What the primary CNI hands on for a lab pod (ptp-like: /32 and /128 addresses)."""
    return {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.path}],
        "ips": [{"address": f"{ip}/{128 if ':' in ip else 32}", "interface": 0} for ip in pod.ips],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def built_plugin() -> Path:
    """The plugin executable, (re)built by `make cni-plugin` (Go's cache makes a rebuild of
    unchanged sources quick); fails when Go is missing."""
    if shutil.which("go") is None:
        raise RuntimeError("go is not installed: run `make system-packages`")
    subprocess.run(
        ["make", "-s", "--no-print-directory", "cni-plugin", f"CNI_PLUGIN={BUILT_PLUGIN}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT,
    )
    return BUILT_PLUGIN


@dataclass
class CniRuntime:
    """Runs the installed plugin (`bin_dir/ztunnel-redirect-cni`) as a container runtime."""

    bin_dir: Path
    event_socket: str
    source: Path = BUILT_PLUGIN
    runs: list[PluginRun] = field(default_factory=list)

    @classmethod
    def for_node(cls, node: TestNode, bin_dir: Path, source: Path = BUILT_PLUGIN) -> CniRuntime:
        """The runtime of `node`: the agent's event socket in the node's run dir."""
        return cls(bin_dir, str(Path(node.run_dir) / c.PLUGIN_EVENT_SOCKET), source)

    @property
    def plugin(self) -> Path:
        return self.bin_dir / PLUGIN_NAME

    def install(self) -> None:
        """As the installer does: the executable copied into the CNI bin dir, mode 0755."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.source, self.plugin)
        self.plugin.chmod(0o755)

    def conf(self, pod: NodePod) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": PLUGIN_NAME,
            "plugin_event_socket": self.event_socket,
            "prevResult": prev_result(pod),
        }

    def invocation(
        self,
        command: str,
        pod: NodePod,
        *,
        stdin: bytes | None = None,
        netns: str | None = None,
        argv: Sequence[str] = (),
    ) -> PluginInvocation:
        """How the runtime runs the plugin for `pod` (`stdin`: these bytes instead of its network
        config; `netns`: this `CNI_NETNS` instead of the pod's; `argv`: run this instead of the
        plugin, e.g. the plugin in a chroot)."""
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.uid.replace("-", "") + "0" * 32,
            "CNI_NETNS": netns or pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={pod.uid[:8]};K8S_POD_UID={pod.uid}"
            ),
            "CNI_PATH": str(self.bin_dir),
        }
        data = json.dumps(self.conf(pod)).encode() if stdin is None else stdin
        return PluginInvocation(tuple(argv or (str(self.plugin),)), env, data)

    async def run(
        self,
        command: str,
        pod: NodePod,
        *,
        stdin: bytes | None = None,
        netns: str | None = None,
        argv: Sequence[str] = (),
    ) -> PluginRun:
        """One run of the plugin for `pod` (the arguments: `invocation`'s)."""
        run = self.invocation(command, pod, stdin=stdin, netns=netns, argv=argv)
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *run.argv,
            env=run.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(PLUGIN_TIMEOUT):
                out, err = await proc.communicate(run.stdin)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        seconds = time.perf_counter() - started
        rc = proc.returncode if proc.returncode is not None else -1
        outcome = PluginRun(rc, out.decode(), err.decode(), seconds)
        self.runs.append(outcome)
        return outcome

    async def add(self, pod: NodePod) -> PluginRun:
        return await self.run("ADD", pod)
