"""Weeks on a node in minutes: a churn soak of the real agent, with leak accounting (`make soak`).

A node agent lives for weeks and sees tens of thousands of pods come and go; a leak (fds, netns
references, threads, host-set elements, records of pods long gone, memory) shows only after many
of them. This runs the real agent process (`AgentProcess`) against a `CheapNode` (pods are
network namespaces made in-process, a fake /proc, the in-process `ApiServer`), a fake ztunnel
(`FakeZtunnel`, no data plane), the CNI plugin executable (`make cni-plugin`, installed by the
agent itself with our entry chained into a primary conflist), and drives pods as a kubelet does:

- waves of up to `wave` pods at once: the pod in the API (no IPs yet), its netns, the CNI ADD
  through the plugin, the IPs reported (running); a mesh pod is then waited for until the agent
  annotates it `enabled`. The wave then goes: API delete, CNI DEL, netns removed (and its pause
  process leaves /proc), and each mesh pod is waited for until the agent logs `pod_removed`;
- one pod in three is not in the mesh (its namespace has no label);
- every `vanish_every`-th pod's sandbox vanishes without an API delete (netns and /proc entry
  gone, no DEL): its API object is deleted `LINGER_WAVES` waves later;
- a namespace holding `RELABEL_PODS` running pods is enrolled and unenrolled in turn every
  `relabel_every` pods (each pod is waited for until its annotation follows);
- every `fault_every` pods, in turn, an API watch drop (every open watch cut) and a ztunnel
  reconnect (the fake disconnects, a new one connects and gets the snapshot);
- every `restart_every` pods the agent is stopped (SIGTERM to its pid) and started again, with
  the relabel namespace's pods and the lingering pods on the node.

Every `checkpoint_every` pods, once the agent is quiet (two drift passes ended, each waits until
the work queue is idle), a checkpoint records from outside: the agent's RSS, open fds and threads
(/proc/<pid>), what it holds in memory (`ztunnel_redirect_held_objects`, from /metrics), the
host set's elements (in the lab's node netns, where the agent's "host" is), this run's pod netns,
the workloads the fake ztunnel holds, the conflist (ours chained, the primary's plugins as
written), the ADD latency of the pods since the last checkpoint, warning/error log lines per
event (parsed from the agent's JSON log), and the drift repairs of the running agent (nobody
touches the kernel here: each one is a race inside the agent, reported, not a target). The
baseline is taken the same way after the first wave is gone, the final checkpoint after every pod
is deleted.

Fds are those of the main table less connections to the API server (a keep-alive pool that grows
and shrinks with load, reported as `api_connections`), plus the netns workers' private tables
(not in /proc/<pid>/fd); threads are counted outside the agent's named pools (`POOLED_THREADS`),
which grow up to their size as work comes.

Targets (`targets()`): no fd, thread, netns, record, held object, set element or ztunnel workload
left of a deleted pod (final vs baseline); RSS after the last checkpoint within 5 MiB of the
first's; CNI ADD p99 of the last window within 1.2x of the first's; no warning or error line but
the ones the scenario provokes (`PROVOKED`, each with the reason); no failed ADD. The short mode
(`SoakConfig.short`, a few hundred pods) runs in the tests, where the leak and log targets are
asserted exactly and the ratios only reported.

Everything is stopped by pid and removed in `finally`, also on failure: the agent, the fake
ztunnel, the API server, every netns (all named `zr-soak-<run>-...`; the root netns is never
touched) and the work directory (kept, with the agent logs, when the run failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from ztunnel_redirect.adapters.ops import Held
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.agentprocess import (
    PLUGIN_NAME,
    AgentProcess,
    CniRuntime,
    built_plugin,
    connect_ztunnel,
    host_set_elements,
    metric,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.cheappods import NETNS_DIR, CheapNode, PodFactory
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import PREFIX
from ztunnel_redirect.testing.node import NodePod

__all__ = ["PROVOKED", "SoakConfig", "SoakError", "SoakReport", "main", "run_soak"]

SOAK_PREFIX: Final = f"{PREFIX}soak-"
"""Every pod netns of a soak run is named `zr-soak-<run>-...`."""
MESH_NS: Final = "soak-mesh"
PLAIN_NS: Final = "soak-plain"
RELABEL_NS: Final = "soak-relabel"
RELABEL_PODS: Final = 6
LINGER_WAVES: Final = 2
"""A pod whose sandbox vanished is deleted from the API this many waves later."""
METRIC: Final = "ztunnel_redirect"
WAIT: Final = 60.0
"""Bound on one wave's pods being handled (normally well under a second)."""
QUIET_PASSES: Final = 2
START_TIMEOUT: Final = 120.0
RSS_SLACK_KIB: Final = 5 * 1024
P99_RATIO: Final = 1.2
PRIMARY_CONFLIST: Final = "10-lab.conflist"
PRIMARY: Final = {
    "cniVersion": "1.0.0",
    "name": "lab",
    "plugins": [{"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.244.0.0/16"}}],
}
LEAK_KEYS: Final = (
    "fds",
    "worker_fds",
    "threads_unpooled",
    "netns",
    "host_set",
    "ztunnel_workloads",
    *(f"held_{kind}" for kind in ("pod_records", "pods", "deleted_pods", "sandboxes")),
    "held_queue_keys",
    "held_status_writes",
    "held_asyncio_tasks",
)
"""What must be back at the baseline once every pod is gone."""
PROVOKED: Final = {
    "watch_failed/connection_error": "the API watch drop cuts every open watch (resumed)",
    "startup_verification_incomplete/pods failed": "the agent restarts while pods whose "
    "sandbox vanished are in the API: their netns cannot be verified (retried)",
    "work_failed/NetnsNotFoundError": "a sandbox that vanishes while the agent works on its pod: "
    "the run that finds the netns gone fails once (then as NetnsPendingError)",
    "work_failed/NetnsPendingError": "a pod whose sandbox vanished without an API delete: its "
    "netns is not found, retried with backoff until the pod is deleted",
}
"""Warning and error events the scenario provokes, and why; any other is a finding."""
WARNING_LEVELS: Final = frozenset({"warning", "error", "critical"})


class SoakError(RedirectError):
    """The agent did not do what the scenario needs (the run stops; the log says why)."""


@dataclass(frozen=True)
class SoakConfig:
    pods: int = 10_000
    max_minutes: float = 30.0
    wave: int = 30
    restart_every: int = 3000
    fault_every: int = 1000
    checkpoint_every: int = 1000
    relabel_every: int = 700
    """Not a divisor of `checkpoint_every`: checkpoints see the namespace both ways."""
    vanish_every: int = 25
    reconcile_period: float = 2.0
    """Seconds: a checkpoint waits for two passes."""

    @classmethod
    def short(cls) -> SoakConfig:
        """A few hundred pods with every event of the scenario at least once (under 2 min)."""
        return cls(
            pods=300,
            max_minutes=2.0,
            restart_every=150,
            fault_every=90,
            checkpoint_every=100,
            relabel_every=60,
            vanish_every=20,
            reconcile_period=1.0,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.wave <= self.pods:
            raise ValueError(f"wave must be in 1..pods, got {self.wave}")
        for name in ("restart_every", "fault_every", "checkpoint_every", "relabel_every"):
            if getattr(self, name) < self.wave:
                raise ValueError(f"{name} must be at least one wave ({self.wave})")


@dataclass
class SoakReport:
    config: dict[str, Any]
    started: str
    pods: int = 0
    """Pods created (and deleted) by the run."""
    seconds: float = 0.0
    stopped_early: bool = False
    """The time limit came before the pod count."""
    restarts: int = 0
    events: Counter[str] = field(default_factory=Counter)
    """How often each scenario event happened (relabel, vanish, watch_drop, ...)."""
    baseline: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    failed_adds: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    """Protocol violations the fake ztunnels saw."""
    targets: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"events": dict(self.events)}


# --- what is measured from outside -------------------------------------------------------------


POOLED_THREADS: Final = ("zr-io", "zr-netns")
"""The agent's thread pools (`name_this_thread` names their threads `<pool>_<n>` in /proc): each
is bounded by its size, and grows to it as work comes in (not a leak)."""


def threads(pid: int) -> dict[str, int]:
    """Threads by name (comm), a pool's threads under the pool's name: a leaked thread shows
    under its own."""
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            name = (task / "comm").read_text().strip()
            names[name.rsplit("_", 1)[0] if name.startswith(POOLED_THREADS) else name] += 1
    return dict(names)


def _fd_table(path: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    for fd in path.iterdir():
        with contextlib.suppress(FileNotFoundError):
            table[fd.name] = str(fd.readlink())
    return table


def worker_fds(pid: int) -> int:
    """Fds in the private fd tables of the agent's netns workers (`unshare(CLONE_FILES)`: not in
    /proc/<pid>/fd); a thread whose table is the main one's is counted there."""
    main = _fd_table(Path(f"/proc/{pid}/fd"))
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            table = _fd_table(task / "fd")
            if table != main:
                count += len(table)
    return count


def _tcp_peers(pid: int) -> dict[str, int]:
    """Socket inode → remote port of the TCP sockets in the agent's netns (0: listening)."""
    peers: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                peers[fields[9]] = int(fields[2].rsplit(":", 1)[1], 16)
    return peers


def fd_kinds(pid: int, api_port: int) -> dict[str, int]:
    """What the open fds are (`pipe`, `socket:api`: a connection to the API server, `socket:tcp`,
    `socket:other`, `anon_inode:[eventpoll]`, a path): a leaked fd shows with its kind."""
    peers = _tcp_peers(pid)
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            target = str(fd.readlink())
        if target.startswith("socket:["):
            port = peers.get(target[len("socket:[") : -1])
            kind = (
                "socket:other"
                if port is None
                else "socket:api"
                if port == api_port
                else "socket:tcp"
            )
        elif target.startswith("pipe:["):
            kind = "pipe"
        else:
            kind = target
        kinds[kind] += 1
    return dict(kinds)


def netns_count(prefix: str) -> int:
    return sum(1 for _ in NETNS_DIR.glob(f"{prefix}*")) if NETNS_DIR.is_dir() else 0


def conflist_state(conf_dir: Path) -> dict[str, Any]:
    """Whether our entry is chained last and the primary's plugins are as written."""
    path = conf_dir / PRIMARY_CONFLIST
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"ours": False, "primary_intact": False, "error": str(exc)}
    plugins = conf.get("plugins") or []
    return {
        "ours": bool(plugins) and plugins[-1].get("type") == PLUGIN_NAME,
        "primary_intact": plugins[:-1] == PRIMARY["plugins"],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12],
    }


def p99(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0] if samples else math.nan
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def warning_key(event: dict[str, Any]) -> str:
    """`event` or `event/reason` (when the line has a reason): what `PROVOKED` names."""
    name = str(event.get("event"))
    return f"{name}/{event['reason']}" if "reason" in event else name


def warning_counts(events: Iterable[dict[str, Any]]) -> Counter[str]:
    """`level:event[/reason]` → lines, for warning and worse."""
    return Counter(
        f"{e.get('level')}:{warning_key(e)}" for e in events if e.get("level") in WARNING_LEVELS
    )


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Pod:
    node_pod: NodePod
    ordinal: int
    mesh: bool
    vanishes: bool


class Soak:
    """One node, one agent at a time, one fake ztunnel at a time; `close()` stops all of it."""

    def __init__(
        self,
        config: SoakConfig,
        *,
        api: ApiServer,
        runner: NetnsRunner,
        factory: PodFactory,
        work: Path,
        prefix: str,
        say: Callable[[str], None],
    ) -> None:
        self.config = config
        self.api = api
        self.work = work
        self.prefix = prefix
        self.say = say
        self.node = CheapNode(api, runner, factory, ipv6=False)
        self.conf_dir = work / "net.d"
        self.bin_dir = work / "bin"
        self.runtime = CniRuntime.for_node(self.node, self.bin_dir, built_plugin())
        self.agent: AgentProcess | None = None
        self.fake: FakeZtunnel | None = None
        self.report = SoakReport(
            config=asdict(config), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        self.runs = 0
        self.created = 0
        self.waves = 0
        self.relabel_pods: list[NodePod] = []
        self.relabel_enrolled = False
        self.lingering: list[tuple[int, NodePod]] = []
        """(wave at which to delete from the API, pod) of sandboxes that vanished."""
        self.add_ms: list[tuple[int, float]] = []
        """(pod ordinal, ms from plugin start to exit) of every ADD."""
        self.warnings: Counter[str] = Counter()
        self.unparsed = 0
        """Agent stderr lines that are not JSON (a traceback, say)."""
        self._counted = 0
        self._lines_counted = 0
        self._scanned = 0
        self.removed: set[str] = set()
        self.started = time.monotonic()
        self.api_port = int(api.url.rsplit(":", 1)[1])

    # --- agent and ztunnel

    def _agent(self) -> AgentProcess:
        if self.agent is None:
            raise SoakError("no agent running")
        return self.agent

    async def start_agent(self) -> None:
        self.runs += 1
        agent = AgentProcess.for_node(
            self.node,
            "--reconcile-period", str(self.config.reconcile_period),
            "--install-cni",
            "--cni-bin-dir", str(self.bin_dir),
            "--cni-conf-dir", str(self.conf_dir),
            "--cni-plugin-binary", str(self.runtime.source),
            log_path=self.work / f"agent-{self.runs}.log",
        )  # fmt: skip
        self.agent = agent
        self._counted = self._lines_counted = self._scanned = 0
        await agent.start(timeout=START_TIMEOUT)
        self.fake = await connect_ztunnel(self.node.ztunnel_socket, serve=False, timeout=WAIT)

    async def stop_agent(self) -> None:
        if self.fake is not None:
            self.report.violations += self.fake.violations
            await self.fake.close()
            self.fake = None
        if self.agent is not None:
            rc = await self.agent.stop()
            self._count_logs()
            if rc != 0:
                raise SoakError(f"the agent exited {rc} on SIGTERM\n{self.agent.tail()}")
            self.agent = None

    async def restart_agent(self) -> None:
        self.say(f"{self.created} pods: agent restart (pid {self._agent().pid})")
        await self.stop_agent()
        await self.start_agent()
        self.report.restarts += 1

    async def reconnect_ztunnel(self) -> None:
        self.say(f"{self.created} pods: ztunnel reconnect")
        if self.fake is not None:
            self.report.violations += self.fake.violations
            await self.fake.close()
        self.fake = await connect_ztunnel(self.node.ztunnel_socket, serve=False, timeout=WAIT)
        self.report.events["ztunnel_reconnect"] += 1

    def drop_watches(self) -> None:
        dropped = self.api.drop_watches()
        self.say(f"{self.created} pods: {dropped} API watches dropped")
        self.report.events["watch_drop"] += 1

    def _count_logs(self) -> None:
        agent = self._agent()
        self.warnings += warning_counts(agent.events[self._counted :])
        self._counted = len(agent.events)
        lines = agent.lines[self._lines_counted :]
        self.unparsed += sum(1 for line in lines if not line.startswith("{"))
        self._lines_counted = len(agent.lines)

    # --- pods

    async def _add(self, pod: NodePod) -> float:
        """As the runtime, then the kubelet: the CNI ADD, then the sandbox's IPs reported."""
        outcome = await self.runtime.add(pod)
        if outcome.rc != 0:
            self.report.failed_adds.append(f"{pod.name}: rc {outcome.rc} {outcome.stdout.strip()}")
        self.node.report_ips(pod)
        return outcome.seconds * 1e3

    async def _annotated(self, pods: Iterable[NodePod], value: str | None = "enabled") -> None:
        await asyncio.gather(
            *(
                self.api.wait_for_annotation(
                    p.namespace, p.name, c.STATUS_ANNOTATION, value, timeout=WAIT
                )
                for p in pods
            )
        )

    async def _delete(self, pod: NodePod) -> None:
        """As the kubelet: API delete, CNI DEL, sandbox gone."""
        self.api.delete_pod(pod.namespace, pod.name)
        outcome = await self.runtime.run("DEL", pod)
        if outcome.rc != 0:
            raise SoakError(f"CNI DEL of {pod.name} failed: {outcome.stdout} {outcome.stderr}")
        self.node.remove_sandbox(pod)

    async def _wait_removed(self, uids: set[str]) -> None:
        """Until the agent logged `pod_removed` for each of `uids` (scans each event once)."""
        agent = self._agent()

        def done() -> bool:
            for event in agent.events[self._scanned :]:
                if event.get("event") == "pod_removed":
                    self.removed.add(str(event.get("pod_uid")))
            self._scanned = len(agent.events)
            return uids <= self.removed

        await agent.wait_until(done, what=f"pod_removed of {len(uids)} pods", timeout=WAIT)
        self.removed -= uids

    def _kind(self, ordinal: int) -> tuple[bool, bool]:
        """(in the mesh, its sandbox vanishes) of the pod with this ordinal (1-based); none in
        the first wave vanishes, which the baseline follows."""
        mesh = ordinal % 3 != 0
        vanishes = mesh and ordinal > self.config.wave and ordinal % self.config.vanish_every == 0
        return mesh, vanishes

    async def wave(self, count: int) -> None:
        """`count` pods come at once, are handled, and go at once."""
        self.waves += 1
        await self.node.cheap.prepare(count)
        pods: list[tuple[NodePod, int, bool, bool]] = []
        for _ in range(count):
            self.created += 1
            mesh, vanishes = self._kind(self.created)
            namespace = MESH_NS if mesh else PLAIN_NS
            pod = self.node.add_pod(f"p{self.created}", namespace, ips=False)
            pods.append((pod, self.created, mesh, vanishes))
        times = await asyncio.gather(*(self._add(pod) for pod, *_ in pods))
        self.add_ms += [(ordinal, ms) for (_, ordinal, *_), ms in zip(pods, times, strict=True)]
        await self._annotated(pod for pod, _, mesh, _ in pods if mesh)

        removed: set[str] = set()
        deletes = []
        for pod, _, mesh, vanishes in pods:
            if vanishes:
                self.node.remove_sandbox(pod)
                self.lingering.append((self.waves + LINGER_WAVES, pod))
                self.report.events["sandbox_vanished"] += 1
            else:
                deletes.append(self._delete(pod))
                if mesh:
                    removed.add(pod.uid)
        for pod in [pod for at, pod in self.lingering if at <= self.waves]:
            self.api.delete_pod(pod.namespace, pod.name)
            self.report.events["vanished_pod_deleted"] += 1
        self.lingering = [(at, pod) for at, pod in self.lingering if at > self.waves]
        await asyncio.gather(*deletes)
        await self._wait_removed(removed)

    async def relabel(self) -> None:
        """The relabel namespace, with its running pods, enrolls or leaves the mesh."""
        self.relabel_enrolled = not self.relabel_enrolled
        value = c.ENROLL_VALUE if self.relabel_enrolled else None
        self.api.set_namespace_labels(RELABEL_NS, {c.ENROLL_LABEL: value})
        await self._annotated(self.relabel_pods, "enabled" if self.relabel_enrolled else None)
        self.report.events["enroll" if self.relabel_enrolled else "unenroll"] += 1

    async def add_relabel_pods(self) -> None:
        await self.node.cheap.prepare(RELABEL_PODS)
        self.relabel_pods = [
            self.node.add_pod(f"r{i}", RELABEL_NS, ips=False) for i in range(RELABEL_PODS)
        ]
        await asyncio.gather(*(self._add(pod) for pod in self.relabel_pods))

    async def remove_everything(self) -> None:
        """Every pod still on the node goes (kubelet order), and the lingering ones' API objects."""
        enrolled = {pod.uid for pod in self.relabel_pods} if self.relabel_enrolled else set()
        await asyncio.gather(*(self._delete(pod) for pod in self.relabel_pods))
        self.relabel_pods = []
        for _, pod in self.lingering:
            self.api.delete_pod(pod.namespace, pod.name)
            self.report.events["vanished_pod_deleted"] += 1
        self.lingering = []
        await self._wait_removed(enrolled)

    # --- accounting

    async def measure(self) -> dict[str, Any]:
        """A checkpoint, once the agent is quiet: two drift passes ended since now."""
        agent = self._agent()
        await agent.wait_count(
            "drift_pass_done",
            QUIET_PASSES,
            since=agent.mark,
            timeout=QUIET_PASSES * 3 * self.config.reconcile_period + WAIT,
        )
        samples = await agent.metrics()
        self._count_logs()
        names = threads(agent.pid)
        kinds = fd_kinds(agent.pid, self.api_port)
        since = self.report.checkpoints[-1]["pods"] if self.report.checkpoints else 0
        window = [ms for ordinal, ms in self.add_ms if ordinal > since]
        held = {
            f"held_{kind.value}": int(metric(samples, f"{METRIC}_held_objects", kind=kind.value))
            for kind in Held
        }
        return {
            "pods": self.created,
            "minutes": round((time.monotonic() - self.started) / 60, 2),
            "agent_run": self.runs,
            "rss_kib": agent.rss_kib(),
            "fds": agent.fds() - kinds.get("socket:api", 0),
            "threads": sum(names.values()),
            "threads_unpooled": sum(n for name, n in names.items() if name not in POOLED_THREADS),
            "worker_fds": worker_fds(agent.pid),
            "thread_names": names,
            "fd_kinds": kinds,
            "api_connections": kinds.get("socket:api", 0),
            **held,
            "pods_enrolled": int(metric(samples, f"{METRIC}_pods_enrolled")),
            "host_set": len(host_set_elements(self.node)),
            "netns": netns_count(self.prefix),
            "live_pods": len(self.node.pods),
            "ztunnel_workloads": len(self.fake.workloads) if self.fake is not None else 0,
            "conflist": conflist_state(self.conf_dir),
            "adds": len(window),
            "add_p50_ms": round(statistics.median(window), 2) if window else None,
            "add_p99_ms": round(p99(window), 2) if window else None,
            "watch_restarts": int(metric(samples, f"{METRIC}_api_watch_restarts_total")),
            "failures": int(metric(samples, f"{METRIC}_failures_total")),
            "drift_repairs": int(metric(samples, f"{METRIC}_drift_repairs_total")),
            "warnings": dict(self.warnings),
            "unparsed_lines": self.unparsed,
        }

    async def checkpoint(self) -> None:
        point = await self.measure()
        self.report.checkpoints.append(point)
        self.say(
            f"{point['pods']} pods: RSS {point['rss_kib'] / 1024:.1f} MiB, {point['fds']} fds, "
            f"{point['threads']} threads, {point['held_asyncio_tasks']} tasks, "
            f"{point['held_pod_records']} records, ADD p99 {point['add_p99_ms']} ms"
        )

    # --- the scenario

    async def run(self) -> None:
        cfg = self.config
        self.conf_dir.mkdir(parents=True)
        (self.conf_dir / PRIMARY_CONFLIST).write_text(json.dumps(PRIMARY, indent=2))
        self.node.namespace(MESH_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})
        self.node.namespace(PLAIN_NS)
        self.node.namespace(RELABEL_NS)
        await self.start_agent()
        deadline = self.started + cfg.max_minutes * 60
        # The first wave comes and goes: the baseline is a node that has seen pods, with none.
        await self.wave(cfg.wave)
        self.report.baseline = await self.measure()
        self.say(f"baseline: {json.dumps(self.report.baseline)}")
        await self.add_relabel_pods()
        due = {
            "checkpoint": cfg.checkpoint_every,
            "restart": cfg.restart_every,
            "fault": cfg.fault_every,
            "relabel": cfg.relabel_every,
        }
        faults = 0
        while self.created < cfg.pods:
            if time.monotonic() > deadline:
                self.report.stopped_early = True
                self.say(f"time limit ({cfg.max_minutes} min) reached at {self.created} pods")
                break
            await self.wave(min(cfg.wave, cfg.pods - self.created))
            if self.created >= due["relabel"]:
                due["relabel"] += cfg.relabel_every
                await self.relabel()
            if self.created >= due["fault"]:
                due["fault"] += cfg.fault_every
                if faults % 2 == 0:
                    self.drop_watches()
                else:
                    await self.reconnect_ztunnel()
                faults += 1
            if self.created >= due["checkpoint"]:
                due["checkpoint"] += cfg.checkpoint_every
                await self.checkpoint()
            if self.created >= due["restart"] and self.created < cfg.pods:
                due["restart"] += cfg.restart_every
                await self.restart_agent()
        if not self.report.checkpoints or self.report.checkpoints[-1]["pods"] != self.created:
            await self.checkpoint()
        await self.remove_everything()
        self.report.final = await self.measure()
        self.report.pods = self.created
        self.report.seconds = round(time.monotonic() - self.started, 1)
        self.report.targets = targets(self.report, self.add_ms, cfg.checkpoint_every)

    async def close(self) -> None:
        try:
            await self.stop_agent()
        finally:
            self.node.close()


# --- targets and the report --------------------------------------------------------------------


def _target(name: str, value: Any, limit: str, met: bool, *, exact: bool) -> dict[str, Any]:
    """`exact`: held in the short mode as well (a ratio of timings is only reported there)."""
    return {"target": name, "value": value, "limit": limit, "met": met, "exact": exact}


def targets(
    report: SoakReport, add_ms: list[tuple[int, float]], window: int
) -> list[dict[str, Any]]:
    base, final = report.baseline, report.final
    out = [
        _target(
            f"{key} left (final - baseline)",
            final[key] - base[key],
            "0",
            final[key] <= base[key],
            exact=True,
        )
        for key in LEAK_KEYS
    ]
    hashes = {p["conflist"].get("sha256") for p in [base, *report.checkpoints, final]}
    conflist_ok = all(
        p["conflist"]["ours"] and p["conflist"]["primary_intact"]
        for p in [base, *report.checkpoints, final]
    )
    out.append(
        _target(
            "conflist: ours chained, primary unchanged",
            f"{len(hashes)} version(s)",
            "1",
            conflist_ok and len(hashes) == 1,
            exact=True,
        )
    )
    out.append(
        _target("failed CNI ADDs", len(report.failed_adds), "0", not report.failed_adds, exact=True)
    )
    unexpected = {
        key: n for key, n in final["warnings"].items() if key.split(":", 1)[1] not in PROVOKED
    }
    out.append(
        _target("warning/error lines not provoked", unexpected, "none", not unexpected, exact=True)
    )
    out.append(
        _target(
            "agent stderr lines not JSON",
            final["unparsed_lines"],
            "0",
            final["unparsed_lines"] == 0,
            exact=True,
        )
    )
    out.append(
        _target(
            "ZDS protocol violations",
            len(report.violations),
            "0",
            not report.violations,
            exact=True,
        )
    )
    first, last = report.checkpoints[0], report.checkpoints[-1]
    rss_delta = last["rss_kib"] - first["rss_kib"]
    out.append(
        _target(
            f"RSS after {last['pods']} pods - after {first['pods']} (KiB)",
            rss_delta,
            f"<= {RSS_SLACK_KIB}",
            rss_delta <= RSS_SLACK_KIB,
            exact=False,
        )
    )
    total = max((n for n, _ in add_ms), default=0)
    head = [ms for n, ms in add_ms if n <= window]
    tail = [ms for n, ms in add_ms if n > total - window]
    ratio = round(p99(tail) / p99(head), 3) if head and tail else math.nan
    out.append(
        _target(
            f"CNI ADD p99, last {len(tail)} / first {len(head)}",
            {"ratio": ratio, "first_ms": round(p99(head), 2), "last_ms": round(p99(tail), 2)},
            f"<= {P99_RATIO}",
            ratio <= P99_RATIO,
            exact=False,
        )
    )
    return out


COLUMNS: Final = (
    ("pods", "pods"),
    ("minutes", "min"),
    ("agent_run", "run"),
    ("rss_kib", "RSS KiB"),
    ("fds", "fds"),
    ("api_connections", "API conns"),
    ("threads", "threads"),
    ("held_asyncio_tasks", "tasks"),
    ("held_pod_records", "records"),
    ("held_pods", "pods known"),
    ("held_deleted_pods", "deleted"),
    ("held_queue_keys", "queue keys"),
    ("host_set", "host set"),
    ("netns", "netns"),
    ("live_pods", "live pods"),
    ("ztunnel_workloads", "ztunnel wl"),
    ("add_p50_ms", "ADD p50 ms"),
    ("add_p99_ms", "ADD p99 ms"),
    ("watch_restarts", "watch restarts"),
    ("drift_repairs", "drift repairs"),
)


def _row(label: str, point: dict[str, Any]) -> str:
    cells = [label, *(str(point.get(key)).replace("None", "-") for key, _ in COLUMNS[1:])]
    conf = point["conflist"]
    cells.append("ok" if conf["ours"] and conf["primary_intact"] else "BROKEN")
    cells.append(str(sum(point["warnings"].values())))
    return "| " + " | ".join(cells) + " |"


def markdown(report: SoakReport) -> str:
    cfg = report.config
    lines = [
        "# Churn soak",
        "",
        f"{report.pods} pods in {report.seconds / 60:.1f} min (waves of {cfg['wave']}, agent "
        f"restarted {report.restarts} times, events: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.events.items()))
        + ")"
        + (" - stopped early by the time limit" if report.stopped_early else "")
        + f"; started {report.started}. Made by `make soak` (`python -m ztunnel_redirect.testing"
        ".soak`). Timings come from a shared machine: compare them within the run.",
        "",
        "| " + " | ".join([*(name for _, name in COLUMNS), "conflist", "warn+err"]) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
        _row("baseline", report.baseline),
        *(_row(str(p["pods"]), p) for p in report.checkpoints),
        _row("final", report.final),
        "",
        "| target | value | limit | met |",
        "|---|---|---|---|",
        *(
            f"| {t['target']} | {t['value']} | {t['limit']} | {'yes' if t['met'] else '**no**'} |"
            for t in report.targets
        ),
        "",
        "Warning and error lines by event (all runs of the agent):",
        "",
        "| level:event | lines | provoked by |",
        "|---|---|---|",
        *(
            f"| {key} | {n} | {PROVOKED.get(key.split(':', 1)[1], '**not provoked**')} |"
            for key, n in sorted(report.final.get("warnings", {}).items())
        ),
        "",
    ]
    return "\n".join(lines)


def plot(report: SoakReport, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only where a plot is made (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    points = report.checkpoints
    pods = [p["pods"] for p in points]
    restarts = [
        a["pods"] for a, b in itertools.pairwise(points) if b["agent_run"] != a["agent_run"]
    ]
    panels: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
        ("Agent RSS (MiB)", (("rss_kib", "RSS"),)),
        ("Open fds and threads", (("fds", "fds"), ("threads", "threads"))),
        (
            "Held in memory / on the node",
            (
                ("held_asyncio_tasks", "asyncio tasks"),
                ("held_pod_records", "pod records"),
                ("held_queue_keys", "queue keys"),
                ("host_set", "host set elements"),
                ("netns", "pod netns"),
            ),
        ),
        ("CNI ADD, plugin start to exit (ms)", (("add_p50_ms", "p50"), ("add_p99_ms", "p99"))),
    )
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        for key, label in series:
            values = [p[key] / 1024 if key == "rss_kib" else p[key] for p in points]
            ax.plot(pods, values, marker="o", markersize=3, label=label)
        for at in restarts:
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("pods created (dotted: agent restart)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: SoakReport, out: Path, *, with_plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "soak.json", out / "soak.md"]
    paths[0].write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    paths[1].write_text(markdown(report))
    if with_plot and report.checkpoints:
        paths.append(out / "soak.png")
        plot(report, paths[2])
    return paths


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] soak: {msg}", flush=True)


async def run_soak(
    config: SoakConfig,
    out: Path | None = None,
    *,
    report_to: Callable[[str], None] = say,
    with_plot: bool = True,
    keep_logs: bool = False,
) -> SoakReport:
    """The whole soak; writes `soak.{json,md,png}` into `out` when given. The agent logs are
    kept (and their directory named) with `keep_logs` or when the run fails."""
    run_id = secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix="zr-soak-"))
    soak: Soak | None = None
    ok = False
    try:
        with NetnsRunner(workers=2) as runner:
            factory = PodFactory(runner, run_id=run_id, prefix=SOAK_PREFIX)
            try:
                async with ApiServer() as api:
                    soak = Soak(
                        config,
                        api=api,
                        runner=runner,
                        factory=factory,
                        work=work,
                        prefix=f"{SOAK_PREFIX}{run_id}-",
                        say=report_to,
                    )
                    try:
                        await soak.run()
                    finally:
                        await soak.close()
            finally:
                factory.close()
        ok = True
    finally:
        if ok and not keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report_to(f"{'done' if ok else 'failed'}: the agent logs are kept in {work}")
    if out is not None:
        for path in write(soak.report, out, with_plot=with_plot):
            report_to(f"wrote {path}")
    return soak.report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ztunnel_redirect.testing.soak")
    defaults = SoakConfig()
    parser.add_argument("--short", action="store_true", help="the short mode of the tests")
    parser.add_argument("--pods", type=int, default=None, help=f"default {defaults.pods}")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--wave", type=int, default=None, help="pods at once")
    parser.add_argument("--restart-every", type=int, default=None, help="pods between restarts")
    parser.add_argument("--fault-every", type=int, default=None, help="watch drop / ztunnel")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    parser.add_argument("--keep-logs", action="store_true", help="keep the agent logs")
    return parser.parse_args(argv)


def config_of(args: argparse.Namespace) -> SoakConfig:
    base = SoakConfig.short() if args.short else SoakConfig()
    given = {
        name: getattr(args, name)
        for name in (
            "pods",
            "max_minutes",
            "wave",
            "restart_every",
            "fault_every",
            "checkpoint_every",
        )
        if getattr(args, name) is not None
    }
    return replace(base, **given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run_soak(config_of(args), args.out, keep_logs=args.keep_logs))
    for t in report.targets:
        say(
            f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']} (limit {t['limit']})"
        )
    return 0 if all(t["met"] for t in report.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
