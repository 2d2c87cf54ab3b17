"""`make demo`: the real agent on this machine, no cluster needed, told step by step.

A small node is built out of network namespaces (`testing.node.TestNode`) with the fake API
server in this process; the real agent runs as its own process against it, and a fake ztunnel (a
real ZDS client) starts a ztunnel stand-in in each pod it is given. Two pods are labelled into
the mesh through their namespace, a third arrives the way a container runtime creates it (the CNI
plugin file, run with the `CNI_*` environment and `prevResult` on stdin). Then a few requests show
which stand-in caught which connection and the address the app saw; a table flushed by hand shows
the periodic pass repairing it. Everything this run created is removed at the end, also on
Ctrl-C or failure, and the run checks that none of its `zr-` namespaces is left.

`AgentProcess` and `CniRuntime` are also what the end-to-end tests drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ztunnel_redirect import cni_plugin, logs
from ztunnel_redirect import constants as c
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import PREFIX, leftovers
from ztunnel_redirect.testing.node import NodePod, TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin
from ztunnel_redirect.testing.traffic import App, request
from ztunnel_redirect.zds import RequestKind

__all__ = ["AgentProcess", "CniRuntime", "DemoError", "PluginRun", "main", "prev_result"]

PLUGIN: Final = Path(cni_plugin.__file__)
PLUGIN_NAME: Final = "ztunnel-redirect-cni"
AGENT_READY_TIMEOUT: Final = 30.0
EVENT_TIMEOUT: Final = 15.0
PLUGIN_TIMEOUT: Final = 15.0
"""The plugin's own agent timeout is 5 s; this only bounds a wedged child."""
STOP_TIMEOUT: Final = 10.0
TRAFFIC_TIMEOUT: Final = 5.0
PERIOD: Final = 2.0
"""The agent's periodic pass in the demo (seconds)."""
APP_PORT: Final = 8080
NAMESPACE: Final = "demo"


class DemoError(Exception):
    """Something the demo expected did not happen; the message says what."""


# --- the agent as a process -------------------------------------------------------------------


class AgentProcess:
    """The real agent process with JSON logs on stderr, followed line by line.

    A reader task copies every stderr line to `log_path` and keeps the parsed lines, so that a
    caller waits for an event (`wait_event`) instead of sleeping. When the process exits early,
    a wait fails at once with the log's tail.
    """

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._exited = False

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._read(self._proc), name="agent-log-reader")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        stream = proc.stderr
        if stream is None:  # pragma: no cover - start() always pipes stderr
            return
        try:
            with self.log_path.open("a") as out:
                while line := await stream.readline():
                    text = line.decode(errors="replace")
                    out.write(text)
                    out.flush()
                    async with self._changed:
                        self.lines.append(_parse_line(text))
                        self._changed.notify_all()
        finally:
            async with self._changed:
                self._exited = True
                self._changed.notify_all()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def mark(self) -> int:
        """The number of log lines so far (`wait_event(after=mark)` waits for a newer one)."""
        return len(self.lines)

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines if _matches(line, event, fields)]

    def tail(self, n: int = 30) -> str:
        return "".join(json.dumps(line) + "\n" for line in self.lines[-n:])

    async def wait_event(
        self,
        event: str,
        *,
        timeout: float = EVENT_TIMEOUT,  # noqa: ASYNC109 - fails with the agent's log tail
        after: int = 0,
        **fields: Any,
    ) -> dict[str, Any]:
        """The first log line with this event (and these fields) from line `after` on."""

        def find() -> dict[str, Any] | None:
            return next((x for x in self.lines[after:] if _matches(x, event, fields)), None)

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: find() is not None or self._exited)
        except TimeoutError:
            raise DemoError(
                f"agent logged no {event} {fields} within {timeout}s; its last lines:\n"
                f"{self.tail()}"
            ) from None
        found = find()
        if found is None:
            raise DemoError(f"agent exited before logging {event} {fields}:\n{self.tail()}")
        return found

    async def wait_ready(self) -> tuple[int, int]:
        """Until `agent_ready`; returns the (readiness, metrics) ports it bound."""
        ops = await self.wait_event("ops_server_started", timeout=AGENT_READY_TIMEOUT)
        await self.wait_event("agent_ready", timeout=AGENT_READY_TIMEOUT)
        return int(ops["readiness_port"]), int(ops["metrics_port"])

    async def stop(self) -> int | None:
        """SIGTERM (the agent leaves rules in place), SIGKILL after STOP_TIMEOUT; the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._reader
        self._proc = None
        return proc.returncode


def _parse_line(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"event": "unparsed", "text": text}
    return parsed if isinstance(parsed, dict) else {"event": "unparsed", "text": text}


def _matches(line: Mapping[str, Any], event: str, fields: Mapping[str, Any]) -> bool:
    return line.get("event") == event and all(line.get(k) == v for k, v in fields.items())


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


def prev_result(pod: NodePod) -> dict[str, Any]:
    """What the primary CNI hands on for a lab pod (ptp-like: /32 and /128 addresses)."""
    return {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.path}],
        "ips": [{"address": f"{ip}/{128 if ':' in ip else 32}", "interface": 0} for ip in pod.ips],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


@dataclass
class CniRuntime:
    """Runs the installed plugin file (`bin_dir/ztunnel-redirect-cni`) as a container runtime."""

    bin_dir: Path
    event_socket: str
    kubeconfig: Path
    runs: list[PluginRun] = field(default_factory=list)

    @property
    def plugin(self) -> Path:
        return self.bin_dir / PLUGIN_NAME

    def install(self) -> None:
        """As the installer does: the plugin file copied into the CNI bin dir, executable."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(PLUGIN, self.plugin)
        self.plugin.chmod(0o755)

    def conf(self, pod: NodePod) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": PLUGIN_NAME,
            "plugin_event_socket": self.event_socket,
            "kubeconfig": str(self.kubeconfig),
            "prevResult": prev_result(pod),
        }

    async def run(self, command: str, pod: NodePod, *, stdin: bytes | None = None) -> PluginRun:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.uid.replace("-", "") + "0" * 32,
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={pod.uid[:8]}"
            ),
            "CNI_PATH": str(self.bin_dir),
        }
        data = json.dumps(self.conf(pod)).encode() if stdin is None else stdin
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(self.plugin),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(PLUGIN_TIMEOUT):
                out, err = await proc.communicate(data)
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


# --- the story ------------------------------------------------------------------------------------


class _Narrator:
    def __init__(self) -> None:
        self._started = time.monotonic()
        self._step = 0

    def step(self, title: str) -> None:
        self._step += 1
        print(
            f"\n[{time.monotonic() - self._started:5.1f}s] Step {self._step}: {title}", flush=True
        )

    def say(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"    {line}", flush=True)


def _standin(zt: FakeZtunnel, pod: NodePod) -> Standin:
    workload = zt.workloads.get(pod.uid)  # type: ignore[call-overload]
    if workload is None or not isinstance(workload.data_plane, Standin):
        raise DemoError(f"the fake ztunnel holds no workload for pod {pod.name}")
    return workload.data_plane


def _annotation(api: ApiServer, pod: NodePod) -> str | None:
    obj = api.get_pod(pod.namespace, pod.name) or {}
    value = (obj.get("metadata", {}).get("annotations") or {}).get(c.STATUS_ANNOTATION)
    return None if value is None else str(value)


def _short_ruleset(pod: NodePod) -> str:
    """The pod's nat table, comments and counters stripped, and its policy-routing rule."""
    table = pod.lab.netns.exec("nft", "list", "table", "inet", c.NAT_TABLE)
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    lines = [line.replace(" counter packets 0 bytes 0", "") for line in lines]
    rule = next(
        (r for r in pod.lab.netns.ip("rule").splitlines() if r.startswith(f"{c.RULE_PRIORITY}:")),
        "(no rule)",
    )
    return "\n".join([*lines, f"ip rule  {rule.strip()}"])


async def _settled(api: ApiServer, agent: AgentProcess, pod: NodePod) -> None:
    """Until the pod is `enabled` with its IPs in the API and a periodic pass has completed since
    (each pass waits until the agent's queue is idle, so every event of the pod was handled)."""

    def holds(obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        annotations = obj["metadata"].get("annotations") or {}
        return (
            bool(obj["status"].get("podIP")) and annotations.get(c.STATUS_ANNOTATION) == "enabled"
        )

    await api.wait_for_pod(pod.namespace, pod.name, holds, timeout=EVENT_TIMEOUT)
    first = await agent.wait_event("drift_pass_done", after=agent.mark)
    await agent.wait_event("drift_pass_done", after=agent.lines.index(first) + 1)


async def _connect(
    say: _Narrator, zt: FakeZtunnel, client: NodePod, server: NodePod
) -> tuple[Hop, Hop]:
    """One request client → server's app; says which stand-in caught it and what the app saw."""
    out_standin, in_standin = _standin(zt, client), _standin(zt, server)
    out_standin.clear()
    in_standin.clear()
    reply = await asyncio.to_thread(
        request, client.path, server.ips[0], APP_PORT, timeout=TRAFFIC_TIMEOUT
    )
    dst = (server.ips[0], APP_PORT)
    outbound = await asyncio.to_thread(
        out_standin.wait_for,
        lambda h: h.kind is HopKind.OUTBOUND and h.original_dst == dst,
        timeout=TRAFFIC_TIMEOUT,
    )
    inbound = await asyncio.to_thread(
        in_standin.wait_for,
        lambda h: h.kind is HopKind.INBOUND and h.original_dst == dst,
        timeout=TRAFFIC_TIMEOUT,
    )
    say.say(
        f"{client.name} ({client.ips[0]}) -> {server.name} ({dst[0]}:{dst[1]})\n"
        f"  hop 1: {client.name}'s ztunnel caught it outbound on :{c.OUTBOUND_PORT} "
        f"(client {outbound.client[0]}, original destination {outbound.original_dst[0]}:"
        f"{outbound.original_dst[1]})\n"
        f"  hop 2: {server.name}'s ztunnel caught it inbound on :{c.INBOUND_PLAINTEXT_PORT} "
        f"(client {inbound.client[0]})\n"
        f"  the app answered: {reply.decode().strip()!r}"
    )
    expected = f"app {server.name} saw {client.ips[0]}\n".encode()
    if reply != expected:
        raise DemoError(f"the app answered {reply!r}, expected {expected!r}")
    return outbound, inbound


async def _story(say: _Narrator, api: ApiServer, node: TestNode, work: Path) -> None:
    say.step("a node on this machine")
    say.say(
        f"Network namespaces {PREFIX}{node.lab.run_id}-* play the node and its pods; the fake "
        f"API server listens on {api.url};\nthe node's /proc is faked in {node.proc}."
    )
    a = await asyncio.to_thread(node.add_pod, "a", NAMESPACE)
    b = await asyncio.to_thread(node.add_pod, "b", NAMESPACE)
    say.say(f"pods: a {a.ips[0]} and b {b.ips[0]} in namespace {NAMESPACE!r}, not in the mesh")

    say.step("start the agent (a real process) and a fake ztunnel")
    argv = node.agent_argv(
        "--log-format", "json", "--log-level", "debug", "--reconcile-period", str(PERIOD),
        readiness_port=0, metrics_port=0,
    )  # fmt: skip
    agent = AgentProcess(argv, work / "agent.log")
    zt: FakeZtunnel | None = None
    apps: list[App] = []
    try:
        await agent.start()
        await agent.wait_ready()
        say.say(f"agent pid {agent.pid} is ready; its log: {agent.log_path}")
        zt = FakeZtunnel(node.ztunnel_socket, serve=True)
        await zt.start()
        async with asyncio.timeout(EVENT_TIMEOUT):
            await zt.snapshot_done.wait()
        say.say(f"ztunnel connected on {node.ztunnel_socket} and got its (empty) snapshot")
        scene = _Scene(say, api, node, agent, zt, work, apps)
        await _enrolled_story(scene, a, b)
    finally:
        for app in apps:
            await asyncio.to_thread(app.close)
        if zt is not None:
            await zt.close()
        rc = await agent.stop()
        say.say(f"agent stopped (exit code {rc}); it leaves the rules in place on SIGTERM")


@dataclass
class _Scene:
    say: _Narrator
    api: ApiServer
    node: TestNode
    agent: AgentProcess
    zt: FakeZtunnel
    work: Path
    apps: list[App] = field(default_factory=list)


async def _enrolled_story(scene: _Scene, a: NodePod, b: NodePod) -> None:
    say, api, node, agent, zt, work = (
        scene.say, scene.api, scene.node, scene.agent, scene.zt, scene.work
    )  # fmt: skip
    say.step(f"label namespace {NAMESPACE!r} {c.ENROLL_LABEL}={c.ENROLL_VALUE}")
    await asyncio.to_thread(node.enroll_namespace, NAMESPACE)
    for pod in (a, b):
        await api.wait_for_annotation(
            NAMESPACE, pod.name, c.STATUS_ANNOTATION, "enabled", timeout=EVENT_TIMEOUT
        )
    say.say("the agent installed the rules in a and b and handed both to ztunnel:")
    for pod in (a, b):
        added = await zt.wait_request(RequestKind.ADD, pod.uid)
        say.say(f"  ztunnel Add {pod.name} ({added.fds} netns fd)")

    say.step("pod c is created the way a container runtime does it: the CNI plugin")
    c_pod = await asyncio.to_thread(node.add_pod, "c", NAMESPACE, ips=False)
    runtime = CniRuntime(
        work / "bin", str(Path(node.run_dir) / c.PLUGIN_EVENT_SOCKET), node.kubeconfig
    )
    runtime.install()
    outcome = await runtime.add(c_pod)
    if outcome.rc != 0:
        raise DemoError(f"CNI ADD for c failed: {outcome.stdout}{outcome.stderr}")
    say.say(
        f"{runtime.plugin} ADD for {NAMESPACE}/c (netns {c_pod.path}) exited {outcome.rc} in "
        f"{outcome.seconds * 1e3:.0f} ms\nand printed prevResult back unchanged: "
        f"{outcome.json == prev_result(c_pod)}"
    )
    await asyncio.to_thread(node.report_ips, c_pod)
    await _settled(api, agent, c_pod)
    seen = ", ".join(r.kind.value for r in zt.requests if r.uid == c_pod.uid)
    say.say(
        f"the kubelet reported c's IP {c_pod.ips[0]}; c is enrolled "
        f"(what ztunnel got for c: {seen})"
    )

    say.step("the rules in pod a (nftables, short)")
    say.say(await asyncio.to_thread(_short_ruleset, a))

    say.step("a few requests")
    for server in (b, c_pod):
        app = App(server.path, APP_PORT, name=server.name)
        await asyncio.to_thread(app.start)
        scene.apps.append(app)
    await _connect(say, zt, a, b)
    await _connect(say, zt, c_pod, b)
    await _connect(say, zt, b, c_pod)

    say.step("the annotation on each pod")
    for pod in (a, b, c_pod):
        say.say(f"{pod.name}: {c.STATUS_ANNOTATION}={_annotation(api, pod)}")

    say.step(f"drift: flush table inet {c.NAT_TABLE} in pod a by hand")
    mark = agent.mark
    flushed_at = time.monotonic()
    await asyncio.to_thread(a.lab.netns.exec, "nft", "flush", "table", "inet", c.NAT_TABLE)
    rules = await asyncio.to_thread(a.lab.netns.exec, "nft", "list", "table", "inet", c.NAT_TABLE)
    say.say(f"after the flush the table holds {rules.count('redirect')} redirect rules")
    repaired = await agent.wait_event(
        "drift_repaired", pod_uid=a.uid, after=mark, timeout=2 * PERIOD + EVENT_TIMEOUT
    )
    took = time.monotonic() - flushed_at
    rules = await asyncio.to_thread(a.lab.netns.exec, "nft", "list", "table", "inet", c.NAT_TABLE)
    say.say(
        f"the agent's periodic pass repaired it {took:.1f}s later (period {PERIOD:.0f}s): "
        f"reason {repaired.get('reason')}, {repaired.get('changes')} change(s), "
        f"{repaired.get('duration_ms')} ms; the table holds {rules.count('redirect')} redirect "
        "rules again"
    )
    if took > PERIOD + 1.0:
        raise DemoError(f"repair took {took:.1f}s, more than one period ({PERIOD}s)")
    await _connect(say, zt, a, b)


async def _run() -> None:
    say = _Narrator()
    work = Path(tempfile.mkdtemp(prefix="zr-demo-"))
    run_id = ""
    try:
        async with ApiServer() as api:
            node = await asyncio.to_thread(TestNode, api)
            run_id = node.lab.run_id
            print(f"demo run {run_id}", flush=True)
            try:
                await _story(say, api, node, work)
            finally:
                say.step("clean up")
                await asyncio.to_thread(node.close)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if run_id:
            left = [n for n in leftovers() if n.startswith(f"{PREFIX}{run_id}-")]
            if left:
                raise DemoError(f"namespaces left behind: {', '.join(left)}")
            say.say(f"no {PREFIX}{run_id}-* namespace is left; the temporary files are removed")


async def _guarded() -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        # SIGTERM ends the demo as Ctrl-C does: the main task is cancelled and cleanup runs.
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await _run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main() -> int:
    # The in-process helpers (fake API server, stand-ins) only speak up when something is wrong;
    # the agent's own log goes to its file.
    logs.configure(fmt="console", level="warning", stream=sys.stderr)
    try:
        asyncio.run(_guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; what the demo created was removed", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    print("\ndemo finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
