"""Agent-level measurements: the real agent as a process, against the in-process fake API server,
pods as network namespaces with a fake /proc (`TestNode`), and a fake ztunnel (real ZDS client).

For each N of the sweep, one agent (started once, pods added as N grows):

1. enrollment by namespace label of the pods that bring the node to N (label to all `enabled`),
   then until the agent has served what the enrollment queued (`settle`);
2. enrollment latency end to end, on `samples` new sandboxes through the CNI plugin file (each
   deleted again, so the node stays at N): the agent's ADD (`cni_add_duration_seconds`, received to
   answered), the plugin process (start to exit, timed by a process of its own as a runtime is:
   `bench.pluginruns`), and the first redirected connection (after the plugin exits, a connection
   from the pod until the ztunnel stand-in's OUTBOUND hop); then pods not in the mesh, and a burst
   of ADDs started at once;
3. the agent's RSS and open fds after enrollment and after a drift pass, and its CPU time (from
   /proc/<pid>/stat) per drift pass over N healthy pods (a pass ends with `drift_pass_done`);
4. repair latency after a manual flush: `repair_samples` enrolled pods, one at a time, get their
   nat table flushed by hand (`nft flush table inet istio-ambient-nat` in the pod's netns), and
   the host its postrouting chain once; the latency is from the flush (this process's clock when
   the flush returned) to the agent's `drift_repaired` / `host_drift_repaired` event for it (the
   event's own timestamp: the rules are back when it is logged). Where a flush falls in the drift
   period decides its latency, so the flushes are placed on purpose: each at a fixed offset after
   a `drift_pass_done` (a delay that places the flush, not a wait for a condition), the offsets
   spread over one period; the pod latest in the pass gets offset 0 (the worst case: a whole
   period, then the pass up to that pod), as does the host (whose check comes after the pods');
5. restart catch-up: SIGTERM, start again, time to ready (and /readyz 200), and what it rewrote:
   the nftables generation of every pod netns and of the host before and after (through the first
   drift pass after the restart), and the write events it logged.

Pods are cheap (creating 1000 lab pods with `ip` takes minutes): a netns made in-process
(`testing.cheappods`: a veth pair inside the pod, the pod IP on eth0, an unreachable route for
ztunnel-marked sockets so that the stand-in's relay of a test connection fails at once).
The agent runs at its default log level, info, as on a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pstats
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from bench.methods import flush_host_here, flush_nat_here, nft_genid_here
from bench.pluginruns import PluginRuns
from bench.summary import Latency, evenly
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.agentprocess import (
    AgentProcess,
    CniRuntime,
    Event,
    built_plugin,
    connect_ztunnel,
    metric,
    standin_of,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.cheappods import CheapNode, PodFactory
from ztunnel_redirect.testing.fakeztunnel import DataPlane, FakeZtunnel
from ztunnel_redirect.testing.netnslab import PREFIX as LAB_PREFIX
from ztunnel_redirect.testing.node import NodePod
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin

PREFIX: Final = "ztunnel_redirect"
SAMPLE_NS: Final = "cni"
"""Labelled for the mesh; the CNI samples' namespace."""
OUTSIDE_NS: Final = "cni-outside"
"""Not labelled: the namespace of the pods that are not in the mesh."""
AT_ONCE: Final = 30
"""CNI ADDs started together on one node (issue 10: a node starting a burst of pods)."""
TARGET: Final = ("10.96.0.10", 80)
"""Where a sample pod's first connection goes (redirected to its stand-in before it leaves)."""
CONNECT_TIMEOUT: Final = 3.0
HOP_TIMEOUT: Final = 5.0
WRITE_EVENTS: Final = ("pod_rules_applied", "drift_repaired", "host_drift_repaired")
"""Agent events that mean it wrote rules (restart catch-up must log none)."""


class AgentBenchError(RedirectError):
    """The agent did not do what the measurement needs (the numbers would be meaningless)."""


@dataclass(frozen=True)
class AgentConfig:
    sizes: tuple[int, ...]
    samples: int
    """CNI ADDs measured per N."""
    bursts: int
    """Bursts of `AT_ONCE` ADDs per N, their samples pooled (one burst is one moment of the
    node: its p50 moves by tens of ms from one burst to the next)."""
    drift_passes: int
    """Passes whose CPU is measured per N."""
    repair_samples: int
    """Pods whose nat table is flushed by hand per N (repair latency)."""
    options: PodOptions
    reconcile_period: float
    """Seconds; at least the longest pass (a longer pass is cut off as `drift_pass_slow`)."""

    def period_for(self, pods: int) -> float:
        return max(self.reconcile_period, 1.0 + pods / 500)


# --- the fake ztunnel: stand-ins only in the sample pods ------------------------------------


class _NoDataPlane:
    """Coroutines: the fake awaits them in place (a plain method would be a thread hop, each a
    wait for the GIL while the benchmark's loop is busy, on every ZDS add of a burst)."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class SampledDataPlanes:
    """A `FakeZtunnel` data-plane factory: a `Standin` for the netns whose inode was `watch`ed,
    nothing for the others (a thread per pod for 1000 pods would measure the fake)."""

    def __init__(self, *, ipv6: bool) -> None:
        self.ipv6 = ipv6
        self._watched: set[int] = set()

    def watch(self, path: str) -> None:
        self._watched.add(Path(path).stat().st_ino)

    def __call__(self, netns_path: str) -> DataPlane:
        if Path(netns_path).stat().st_ino in self._watched:
            return Standin(netns_path, ipv6=self.ipv6)
        return _NoDataPlane()


def connect_here(target: tuple[str, int], timeout: float) -> None:
    """From the pod: one TCP connection (redirected, it lands on the stand-in), then close.

    The stand-in's relay to `target` fails at once (unreachable for marked sockets) and it resets
    the client, sometimes before the connect returns: a reset is fine, its hop says it arrived.
    """
    with (
        contextlib.suppress(ConnectionResetError),
        socket.create_connection(target, timeout=timeout),
    ):
        pass


def stamped_here(flush: Callable[[], None]) -> float:
    """On a worker in a lab netns: `flush()`, then the wall clock (what the agent's log
    timestamps use) at the moment the rules are surely gone."""
    flush()
    return time.time()


def event_time(event: Event) -> float:
    """The wall-clock time of an agent log event (ISO-8601 UTC, microseconds)."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# --- the run --------------------------------------------------------------------------------


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of a live process: the event loop against
    the netns workers and other threads (threads that exited are not counted)."""
    main = other = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            if int(task.name) == pid:
                main += seconds
            else:
                other += seconds
    return main, other


def _lat(samples: list[float]) -> dict[str, Any]:
    return Latency.of(samples).as_dict() if samples else {"count": 0}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] agent: {msg}", flush=True)


class AgentBench:
    """One node, one agent at a time, the fake ztunnel; `close()` removes all of it."""

    def __init__(
        self,
        api: ApiServer,
        runner: NetnsRunner,
        factory: PodFactory,
        config: AgentConfig,
        work: Path,
        *,
        plugins: PluginRuns,
    ) -> None:
        self.api = api
        self.plugins = plugins
        self.runner = runner
        self.config = config
        self.work = work
        self.node = CheapNode(api, runner, factory, ipv6=config.options.ipv6)
        self.runtime = CniRuntime.for_node(self.node, work / "bin", built_plugin())
        self.planes = SampledDataPlanes(ipv6=config.options.ipv6)
        self.agent: AgentProcess | None = None
        self.fake: FakeZtunnel | None = None
        self.runs = 0
        self.bulk: list[NodePod] = []
        self.period = config.reconcile_period

    # --- lifecycle

    def running_agent(self) -> AgentProcess:
        if self.agent is None:
            raise AgentBenchError("no agent running")
        return self.agent

    async def start_agent(self, *, profile: Path | None = None) -> float:
        """Start an agent; seconds from spawn to `agent_ready`. With `profile`, the agent runs
        under cProfile (its event loop thread), which writes its stats there at exit."""
        o = self.config.options
        self.runs += 1
        argv = self.node.agent_argv(
            "--log-format", "json",
            "--reconcile-period", str(self.period),
            "--dns-capture" if o.dns_capture else "--no-dns-capture",
            readiness_port=0,
            metrics_port=0,
        )  # fmt: skip
        if profile is not None:
            argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
        agent = AgentProcess(argv, log_path=self.work / f"agent-{self.runs}.log")
        self.agent = agent
        started = time.perf_counter()
        await agent.start(ready=False, timeout=120)
        await agent.wait_ready(timeout=300)
        return time.perf_counter() - started

    async def connect_ztunnel(self) -> float:
        started = time.perf_counter()
        self.fake = await connect_ztunnel(
            self.node.ztunnel_socket, serve=False, data_plane=self.planes, timeout=300
        )
        return time.perf_counter() - started

    async def close(self) -> None:
        try:
            if self.fake is not None:
                await self.fake.close()
            if self.agent is not None:
                await self.agent.stop()
                if self.agent.find("work_failed"):
                    say(f"work_failed events in {self.agent.log_path}")
        finally:
            self.node.close()

    # --- 1. grow the node to N by a namespace label

    async def grow(self, n: int) -> dict[str, Any]:
        agent = self.running_agent()
        k = n - len(self.bulk)
        if k <= 0:
            return {"pods_added": 0}
        say(f"N={n}: making {k} pods")
        t0 = time.perf_counter()
        await self.node.cheap.prepare(k)
        namespace = f"bulk-{n}"
        self.node.namespace(namespace)
        self.bulk += [self.node.add_pod(f"p{n}-{i}", namespace) for i in range(k)]
        created = time.perf_counter() - t0
        mark = agent.mark
        t0 = time.perf_counter()
        self.node.enroll_namespace(namespace)
        await agent.wait_count(
            "pod_status_set", k, since=mark, status="enabled", timeout=60 + k * 0.2
        )
        enrolled = time.perf_counter() - t0
        say(f"N={n}: {k} pods enabled {enrolled:.2f} s after the namespace label")
        await self.settle()
        return {
            "pods_added": k,
            "create_s": round(created, 3),
            "label_to_all_enabled_s": round(enrolled, 3),
            "proc_scans": len(agent.find("proc_scanned", since=mark)),
        }

    async def settle(self) -> None:
        """Until the agent has served what it had queued: the measurements that follow see a
        node at rest. Each pod just enrolled has one more check queued (once its netns is first
        watched); a nat table flushed by hand now is repaired from the back of the queue."""
        agent, pod = self.running_agent(), self.bulk[-1]
        mark = agent.mark
        await self.runner.run(pod.path, flush_nat_here)
        await agent.wait_event("drift_repaired", pod_uid=pod.uid, since=mark, timeout=60)

    # --- 2. CNI ADD end to end

    async def sample(self, n: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
        agent, fake = self.running_agent(), self.fake
        if fake is None:
            raise AgentBenchError("no ztunnel connected")
        k = self.config.samples
        say(f"N={n}: {k} CNI ADDs through the plugin, each with a first connection")
        await self.node.cheap.prepare(k)
        raw: dict[str, list[float]] = {"agent_add": [], "plugin": [], "first_connection": []}
        rules: list[float] = []
        name = f"{PREFIX}_cni_add_duration_seconds"
        for i in range(k):
            pod = self.node.add_pod(f"web-{n}-{i}", SAMPLE_NS, ips=False)
            self.planes.watch(pod.path)
            before = await agent.metrics()
            outcome = await self.plugins.one(self.runtime.invocation("ADD", pod))
            exited = time.perf_counter()
            if outcome.rc != 0:
                raise AgentBenchError(f"CNI ADD of {pod.name} failed: {outcome.stdout}")
            await self.runner.run(pod.path, connect_here, TARGET, CONNECT_TIMEOUT)
            standin = standin_of(fake, pod)
            await asyncio.to_thread(standin.wait_for, _outbound_to_target, timeout=HOP_TIMEOUT)
            first = time.perf_counter() - exited
            after = await agent.metrics()
            if metric(after, f"{name}_count") != metric(before, f"{name}_count") + 1:
                raise AgentBenchError("the agent's ADD histogram did not count one ADD")
            raw["agent_add"].append(
                (metric(after, f"{name}_sum") - metric(before, f"{name}_sum")) * 1e3
            )
            raw["plugin"].append(outcome.seconds * 1e3)
            raw["first_connection"].append(first * 1e3)
            rules += [e["duration_ms"] for e in agent.find("pod_rules_applied", netns=pod.path)]
            await self._delete(pod)
        raw["plugin_not_in_mesh"] = await self._outside_adds(n, k)
        raw["at_once"] = await self._adds_at_once(n, in_mesh=True)
        raw["at_once_not_in_mesh"] = await self._adds_at_once(n, in_mesh=False)
        out = {name: _lat(v) for name, v in raw.items()} | {
            "agent_rules_install": _lat(rules),
            "at_once_count": AT_ONCE,
            "at_once_bursts": self.config.bursts,
            "plugin_binary_bytes": self.runtime.plugin.stat().st_size,
            "samples": k,
            "enrolled": len(self.bulk),
        }
        return out, raw

    async def _outside_adds(self, n: int, k: int) -> list[float]:
        """Milliseconds of `k` ADDs, plugin start to exit, of pods not in the mesh, one after
        the other. They start as a drift pass ends, as the bursts do (`_adds_at_once`): the
        series, a few hundred ms, fits between two passes here, where a pass running through
        it would add its half second of the agent's time at N = 1000 to every sample."""
        await self.node.cheap.prepare(k)
        agent = self.running_agent()
        await agent.wait_event("drift_pass_done", since=agent.mark, timeout=self.period * 3 + 60)
        samples = []
        for i in range(k):
            pod = self.node.add_pod(f"out-{n}-{i}", OUTSIDE_NS, ips=False)
            outcome = await self.plugins.one(self.runtime.invocation("ADD", pod))
            if outcome.rc != 0:
                raise AgentBenchError(f"CNI ADD of {pod.name} failed: {outcome.stdout}")
            samples.append(outcome.seconds * 1e3)
            self._remove_outside(pod)
        return samples

    async def _adds_at_once(self, n: int, *, in_mesh: bool) -> list[float]:
        """Milliseconds of each ADD of `bursts` bursts of `AT_ONCE` started together: of mesh
        pods, or of pods not in the mesh (the node's own share: the runtime starting that many
        plugin processes, each told "not in the mesh" by the agent).

        Each burst starts as a drift pass ends: the pass's period here is seconds, so that
        passes can be measured, and one running would hold a third of the bursts at N = 1000;
        at the agent's default (300 s) a pass, under half a second at that N, meets one burst in
        hundreds. (The sequential mesh ADDs take their chances with the passes.)"""
        agent = self.running_agent()
        namespace, group = (SAMPLE_NS, "burst") if in_mesh else (OUTSIDE_NS, "burst-out")
        samples: list[float] = []
        for burst in range(self.config.bursts):
            await self.node.cheap.prepare(AT_ONCE)
            pods = [
                self.node.add_pod(f"{group}-{n}-{burst}-{i}", namespace, ips=False)
                for i in range(AT_ONCE)
            ]
            await agent.wait_event(
                "drift_pass_done", since=agent.mark, timeout=self.period * 3 + 60
            )
            outcomes = await self.plugins.run([self.runtime.invocation("ADD", p) for p in pods])
            failed = [pod.name for pod, o in zip(pods, outcomes, strict=True) if o.rc != 0]
            if failed:
                raise AgentBenchError(f"CNI ADDs at once failed: {failed}")
            for pod in pods:
                if in_mesh:
                    await self._delete(pod)
                else:
                    self._remove_outside(pod)
            samples += [o.seconds * 1e3 for o in outcomes]
        return samples

    def _remove_outside(self, pod: NodePod) -> None:
        """A pod not in the mesh goes: the agent holds nothing for it, so nothing to wait for."""
        self.api.delete_pod(pod.namespace, pod.name)
        self.node.remove_sandbox(pod)

    async def _delete(self, pod: NodePod) -> None:
        agent = self.running_agent()
        mark = agent.mark
        self.api.delete_pod(pod.namespace, pod.name)
        await agent.wait_event("pod_removed", pod_uid=pod.uid, since=mark, timeout=30)
        self.node.remove_sandbox(pod)

    # --- 3. memory, fds, CPU per drift pass

    async def resources(self, n: int) -> dict[str, Any]:
        agent = self.running_agent()
        after_enrollment = {"rss_kib": agent.rss_kib(), "open_fds": agent.fds()}
        passes = self.config.drift_passes
        say(f"N={n}: CPU of {passes} drift passes over {len(self.bulk)} healthy pods")
        mark = agent.mark
        # Passes end with drift_pass_done; the window between two ends is one pass (and idle).
        await agent.wait_count("drift_pass_done", 1, since=mark, timeout=3 * self.period + 30)
        cpu: list[float] = []
        walls: list[float] = []
        reconciles: list[float] = []
        samples = await agent.metrics()
        threads0 = thread_cpu(agent.pid)
        for _ in range(passes):
            mark, cpu0 = agent.mark, agent.cpu_seconds()
            count0 = metric(samples, f"{PREFIX}_reconcile_duration_seconds_count", kind="check")
            await agent.wait_count("drift_pass_done", 1, since=mark, timeout=3 * self.period + 30)
            cpu.append(agent.cpu_seconds() - cpu0)
            samples = await agent.metrics()
            count1 = metric(samples, f"{PREFIX}_reconcile_duration_seconds_count", kind="check")
            reconciles.append(count1 - count0)
            walls += [e["duration_ms"] for e in agent.find("drift_pass_done", since=mark)]
        threads1 = thread_cpu(agent.pid)
        writes = sum(len(agent.find(name, since=mark)) for name in WRITE_EVENTS)
        ordered = sorted(cpu)
        return {
            "pods": len(self.bulk),
            "after_enrollment": after_enrollment,
            "after_drift_pass": {"rss_kib": agent.rss_kib(), "open_fds": agent.fds()},
            "drift_pass": {
                "passes": passes,
                "cpu_s_median": round(ordered[len(ordered) // 2], 4),
                "cpu_s_max": round(ordered[-1], 4),
                "wall_ms_median": round(sorted(walls)[len(walls) // 2], 3) if walls else None,
                "pod_reconciles_per_pass": reconciles,
                "cpu_s_per_pass_event_loop_thread": round((threads1[0] - threads0[0]) / passes, 4),
                "cpu_s_per_pass_other_threads": round((threads1[1] - threads0[1]) / passes, 4),
                "write_events": writes,
                "period_s": self.period,
                "clock_tick_s": round(1 / os.sysconf("SC_CLK_TCK"), 4),
            },
        }

    # --- 4. repair latency after a manual flush

    async def _flush_and_wait(
        self,
        path: str,
        flush: Callable[[], None],
        *,
        phase: float,
        event: str,
        **fields: Any,
    ) -> tuple[float, Event]:
        """Flush by hand in the lab netns at `path`, `phase` periods after a pass ended; (ms from
        the flush to the agent's `event` with `fields`, that event)."""
        if not Path(path).name.startswith(LAB_PREFIX):
            raise AgentBenchError(f"refusing to flush outside a lab netns: {path}")
        agent = self.running_agent()
        await agent.wait_event("drift_pass_done", since=agent.mark, timeout=3 * self.period + 30)
        # Places the flush in the period (see the module docstring); not a wait for a condition.
        await asyncio.sleep(phase * self.period)
        mark = agent.mark
        flushed = await self.runner.run(path, stamped_here, flush)
        repaired = await agent.wait_event(event, since=mark, timeout=3 * self.period + 30, **fields)
        return (event_time(repaired) - flushed) * 1e3, repaired

    async def repair(self, n: int) -> dict[str, Any]:
        """Flush to repaired, as the agent runs: pods' nat tables, then the host's postrouting."""
        k = self.config.repair_samples
        pods = evenly(self.bulk, k)
        say(f"N={n}: repair latency: {len(pods)} pod nat tables and the host chain flushed")
        latencies: list[float] = []
        applies: list[float] = []
        phases: list[float] = []
        # The pod latest in the pass gets the earliest offset: together the worst case.
        for i, pod in enumerate(pods):
            phase = round((len(pods) - 1 - i) / len(pods), 3)
            ms, event = await self._flush_and_wait(
                pod.path, flush_nat_here, phase=phase, event="drift_repaired", pod_uid=pod.uid
            )
            latencies.append(ms)
            applies.append(float(event["duration_ms"]))
            phases.append(phase)
        host_ms, host = await self._flush_and_wait(
            self.node.lab.node.path, flush_host_here, phase=0.0, event="host_drift_repaired"
        )
        period_ms = self.period * 1e3
        lat = Latency.of(latencies)
        say(
            f"N={n}: pod repair after a flush p50 {lat.p50_ms:.0f} ms, max {lat.max_ms:.0f} ms; "
            f"host {host_ms:.0f} ms (period {period_ms:.0f} ms)"
        )
        return {
            "pods": len(self.bulk),
            "period_s": self.period,
            "pod_nat_flush": {
                "samples": len(latencies),
                "latency": lat.as_dict(),
                "p50_periods": round(lat.p50_ms / period_ms, 3),
                "max_periods": round(lat.max_ms / period_ms, 3),
                "samples_ms": [round(x, 3) for x in latencies],
                "phases_periods": phases,
                "repair_apply_ms_p50": round(Latency.of(applies).p50_ms, 3),
            },
            "host_postrouting_flush": {
                "latency_ms": round(host_ms, 3),
                "periods": round(host_ms / period_ms, 3),
                "phase_periods": 0.0,
                "repair_apply_ms": float(host["duration_ms"]),
            },
        }

    # --- 5. restart catch-up

    async def _generations(self) -> tuple[list[int], int]:
        pods = [await self.runner.run(p.path, nft_genid_here) for p in self.bulk]
        host = await self.runner.run(self.node.lab.node.path, nft_genid_here)
        return pods, host

    async def restart(self, n: int) -> dict[str, Any]:
        old = self.running_agent()
        say(f"N={n}: restart with {len(self.bulk)} pods enrolled")
        pods_before, host_before = await self._generations()
        if await old.stop() != 0:
            raise AgentBenchError(f"the agent exited {old.returncode} on SIGTERM")
        if self.fake is not None:
            await self.fake.close()
            self.fake = None
        ready_s = await self.start_agent()
        agent = self.running_agent()
        status, _ = await agent.readyz()
        if status != 200:
            raise AgentBenchError(f"/readyz answered {status} after agent_ready")
        adopted = agent.find("pods_adopted")
        snapshot_s = await self.connect_ztunnel()
        mark = agent.mark
        await agent.wait_count("drift_pass_done", 1, since=mark, timeout=3 * self.period + 60)
        pods_after, host_after = await self._generations()
        moved = sum(1 for a, b in zip(pods_before, pods_after, strict=True) if a != b)
        events = {name: len(agent.find(name)) for name in (*WRITE_EVENTS, "pod_status_set")}
        say(f"N={n}: ready {ready_s:.2f} s after start; {moved} pod generations moved")
        return {
            "pods": len(self.bulk),
            "start_to_ready_s": round(ready_s, 3),
            "readyz_status": status,
            "pods_adopted": adopted[0].get("pods") if adopted else 0,
            "netns_found": adopted[0].get("netns_found") if adopted else 0,
            "ztunnel_snapshot_s": round(snapshot_s, 3),
            "pod_generations_checked": len(pods_after),
            "pod_generations_moved": moved,
            "host_generation_moved": host_before != host_after,
            "write_events": events,
            "rules_rewritten": moved + sum(events[name] for name in WRITE_EVENTS[:2]),
        }

    async def profile(self, out: Path, passes: int) -> dict[str, Any]:
        """One more restart under cProfile, `passes` drift passes, stop: where the event loop
        thread's time goes (start-up included, its share is small next to the passes)."""
        old = self.running_agent()
        await old.stop()
        if self.fake is not None:
            await self.fake.close()
            self.fake = None
        stats = self.work / "agent.prof"
        say(f"cProfile of the agent over {passes} drift passes with {len(self.bulk)} pods")
        await self.start_agent(profile=stats)
        await self.connect_ztunnel()
        agent = self.running_agent()
        mark = agent.mark
        await agent.wait_count(
            "drift_pass_done", passes, since=mark, timeout=passes * 3 * self.period + 60
        )
        await agent.stop()
        text = io.StringIO()
        for order, count in (("tottime", 30), ("cumulative", 40)):
            text.write(f"==== agent event loop thread, {len(self.bulk)} pods, by {order} ====\n")
            pstats.Stats(str(stats), stream=text).sort_stats(order).print_stats(count)
        (out / "agent_profile.txt").write_text(text.getvalue())
        return {"pods": len(self.bulk), "drift_passes": passes, "file": "agent_profile.txt"}


def _outbound_to_target(hop: Hop) -> bool:
    return hop.kind is HopKind.OUTBOUND and hop.original_dst == TARGET


@contextlib.asynccontextmanager
async def agent_bench(
    runner: NetnsRunner, factory: PodFactory, config: AgentConfig
) -> AsyncIterator[AgentBench]:
    work = Path(tempfile.mkdtemp(prefix="zr-bench-agent-"))
    try:
        async with ApiServer() as api, PluginRuns() as plugins:
            bench = AgentBench(api, runner, factory, config, work, plugins=plugins)
            try:
                bench.runtime.install()
                bench.node.namespace(SAMPLE_NS, {c.ENROLL_LABEL: c.ENROLL_VALUE})
                bench.node.namespace(OUTSIDE_NS)
                yield bench
            finally:
                await bench.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


IMPORT_ORDER: Final = (
    "asyncio",
    "aiohttp",
    "structlog",
    "prometheus_client",
    "google.protobuf",
    "ztunnel_redirect.kernel.routing",  # pyroute2's netlink messages, as the agent imports them
    "ztunnel_redirect.adapters.kube",  # kubernetes_asyncio's client, as the agent imports it
    "ztunnel_redirect.app.agent",
    "ztunnel_redirect.app.cli",
)
_RSS_OF_IMPORTS: Final = """
import importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
steps = [("python", rss())]
for name in sys.argv[1:]:
    importlib.import_module(name)
    steps.append((name, rss()))
print(json.dumps(steps))
"""


async def memory_floor() -> dict[str, Any]:
    """Where the agent's RSS floor comes from: a bare interpreter, then the RSS after each
    import, in the agent's order (no pod, no connection)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RSS_OF_IMPORTS, *IMPORT_ORDER, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, _ = await proc.communicate()
    steps = json.loads(stdout)
    return {
        "python_bare_rss_kib": steps[0][1],
        "imports_rss_kib": steps[-1][1],
        "by_import_kib": {
            name: rss - before for (name, rss), (_, before) in zip(steps[1:], steps, strict=False)
        },
    }


async def measure_agent(
    runner: NetnsRunner, factory: PodFactory, config: AgentConfig, *, profile_out: Path | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every agent measurement for every N; (results by N, raw samples by N)."""
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    async with agent_bench(runner, factory, config) as bench:
        bench.period = config.period_for(max(config.sizes))
        start_s = await bench.start_agent()
        await bench.connect_ztunnel()
        for n in config.sizes:
            t0 = time.perf_counter()
            at: dict[str, Any] = (
                {"first_start_to_ready_s": round(start_s, 3)} if not results else {}
            )
            at["enrollment_by_label"] = await bench.grow(n)
            at["cni_add"], raw[str(n)] = await bench.sample(n)
            at["resources"] = await bench.resources(n)
            at["repair"] = await bench.repair(n)
            at["restart"] = await bench.restart(n)
            results[str(n)] = at
            say(f"N={n}: done in {time.perf_counter() - t0:.1f} s")
        if profile_out is not None:
            results["profile"] = await bench.profile(profile_out, config.drift_passes + 2)
    return results, raw
