"""Benchmark: pod rule install, drift check and repair, ours against Istio's method, in one run.

    .venv/bin/python -m bench.run [--sizes 1,100,1000] [--quick] [--out bench/results]

For each N it makes fresh sets of N pod namespaces (one set per install method, so every install
goes into an empty netns) and measures, on this machine and in this run:

1. install latency per pod for each `Method` (ours and the baseline, rules only and with routing),
   and ours again with N pods already enrolled;
2. a full drift-check pass over the N enrolled pods: wall and CPU time when healthy (and proof
   that it wrote nothing: rule handles before and after), with 5% drifted, and the core's apply
   that repairs the drifted pods (the time from a flush to repaired is the agent's, below);
3. memory that does not depend on the agent: this process's RSS and fds holding N netns fds;
4. once, the core's fast paths (batch replay, dump proof) against the fallbacks they replace;
5. the real agent as a process (`bench.agent`; `--no-agent` skips it), for each N of
   `--agent-sizes`: enrollment by a namespace label, CNI ADD end to end, its RSS, fds and CPU per
   drift pass, repair latency from a manual flush to repaired, and restart catch-up;
6. what our plugin adds to a pod sandbox's start and removal in a real container runtime
   (`bench.runtime`: containerd over CRI, `--runtime-sandboxes` per series; `--no-runtime` skips
   it, and it is reported as skipped, with the reason, where containerd cannot run);
7. the agent's footprint at its default settings (`bench.footprint`; `--no-footprint` skips it),
   for each N of `--agent-sizes`: RSS, open fds and CPU over an idle window (`--idle-window`
   seconds at the largest N, at most 60 at the others);
8. repair on kernel notification (`bench.repair`; `--no-repair` skips it), for each N of
   `--repair-sizes`: a flush or `ip rule del` by hand to the rules back, a storm, fds per pod.

Small N is repeated in rounds (fresh pods each round) until every method has `--min-samples`.
Writes `latest.json`, `latest.md` and `latest.png` to `--out`. Every namespace it made is removed
on exit, also on Ctrl-C, SIGTERM and errors; `--remove-leftovers` cleans up after a killed run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import logging
import math
import os
import platform
import pstats
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeVar

import structlog

from bench import report
from bench.agent import AgentConfig, measure_agent, memory_floor
from bench.cniwatch import measure_entry_restore
from bench.footprint import (
    DEFAULT_IDLE_WINDOW_S,
    QUICK_IDLE_WINDOW_S,
    FootprintConfig,
    measure_footprint,
)
from bench.methods import (
    Method,
    baseline_full_here,
    baseline_rules_here,
    child_shares_netns_here,
    flush_nat_here,
    handles_here,
    ipv6_check_here,
    nft_genid_here,
    noop_here,
    ours_rules_here,
    routing_here,
    routing_missing_here,
    table_drift_here,
    table_names,
    tables_first_check_here,
    tables_install_here,
)
from bench.repair import RepairConfig, measure_repair
from bench.runtime import DEFAULT_SANDBOXES, QUICK_SANDBOXES, measure_runtime
from bench.steps import apply_steps_here, check_steps_here
from bench.summary import Latency, Phase, evenly, merge
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.podrules import (
    KernelForms,
    Outcome,
    PodRules,
    PodState,
    apply_here,
    check_here,
)
from ztunnel_redirect.testing.cheappods import (
    BENCH_PREFIX,
    NETNS_DIR,
    PodFactory,
    remove_leftovers,
)
from ztunnel_redirect.testing.netnslab import Netns

T = TypeVar("T")

DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"
MAX_ROUNDS: Final = 500
"""Bound on repeated rounds for small N."""
PROFILE_KINDS: Final = ("apply_fresh", "check_first", "check_steady")
VERIFY_SAMPLE: Final = 5
"""Pods per method whose installed state is checked after the install phase."""


class BenchError(RuntimeError):
    """A measured operation did not do what it must (the numbers would be meaningless)."""


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    min_samples: int
    drift_passes: int
    loaded_pods: int
    concurrency: int
    drift_fraction: float
    handle_sample: int
    profile_pods: int
    restore_rounds: int = 50
    """Rewrites of the primary conflist timed to our entry restored."""
    options: PodOptions = field(default_factory=PodOptions)
    agent: AgentConfig | None = None
    """The agent-level measurements (None: not run)."""
    runtime_sandboxes: int = 0
    """Sandboxes per series in a real container runtime (0: not run)."""
    footprint: FootprintConfig | None = None
    """The agent's footprint at its defaults (None: not run)."""
    repair: RepairConfig | None = None
    """Repair on kernel notification (None: not run)."""


def netns_of_this_thread() -> str:
    return str(Path("/proc/thread-self/ns/net").readlink())


def cpu_now() -> float:
    """CPU seconds of this process (all threads) plus its waited-for children (nft)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    """What every measurement uses: the runner, our rules, a pod factory and the desired state."""

    def __init__(self, runner: NetnsRunner, factory: PodFactory, config: Config) -> None:
        self.runner = runner
        self.factory = factory
        self.config = config
        self.rules = PodRules(runner)
        self.forms = KernelForms()
        self.state = PodState.for_options(config.options)
        self.script = self.state.ruleset.script()
        self.names = table_names(self.state.ruleset)

    async def install(self, method: Method, ns: Netns) -> None:
        o = self.config.options
        if method is Method.OURS_FULL:
            # As the agent installs a new sandbox (CNI ADD): `fresh`, routing not read.
            if not await self.rules.apply(ns.path, o, fresh=True):
                raise BenchError(f"apply on fresh {ns.name} reported nothing to do")
        elif method is Method.OURS_RULES:
            await self.runner.run(ns.path, ours_rules_here, self.state, self.forms)
        elif method is Method.OURS_ROUTING:
            await self.runner.run(ns.path, routing_here, self.state)
        elif method is Method.BASE_RULES:
            await self.runner.run(ns.path, baseline_rules_here, self.script)
        else:
            await self.runner.run(ns.path, baseline_full_here, self.script, self.state)

    async def verify(self, method: Method, ns: Netns) -> None:
        """The method installed what it must (drift reads are the kernel's word for it)."""
        problems: list[object] = []
        if method in (Method.OURS_FULL, Method.BASE_FULL):
            # Not through `self.rules`: it would remember the generation, and the first drift
            # pass would skip these pods' listing.
            problems += (await self.runner.run(ns.path, check_here, self.state, self.forms)).drifts
        if method in (Method.OURS_RULES, Method.BASE_RULES):
            problems += await self.runner.run(ns.path, table_drift_here, self.state, self.forms)
        if method is Method.OURS_ROUTING:
            problems += await self.runner.run(ns.path, routing_missing_here, self.state)
        if problems:
            raise BenchError(f"{method.value} left {ns.name} wrong: {problems[:3]}")


async def timed_pass(
    pods: list[Netns],
    call: Callable[[Netns], Awaitable[T]],
    *,
    concurrency: int,
    what: str,
) -> tuple[list[float], list[T | None], float, float]:
    """Run `call` on every pod in `concurrency` lanes; (latencies ms, results, wall s, cpu s)."""
    samples = [0.0] * len(pods)
    results: list[T | None] = [None] * len(pods)
    todo = iter(range(len(pods)))
    marks = {len(pods) * q // 4 for q in (1, 2, 3)} if len(pods) >= 100 else set()

    async def lane() -> None:
        for i in todo:
            t0 = time.perf_counter()
            results[i] = await call(pods[i])
            samples[i] = (time.perf_counter() - t0) * 1000
            if i in marks:
                say(f"  {what}: {i}/{len(pods)}")

    cpu0, wall0 = cpu_now(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for k in range(min(concurrency, len(pods))):
            group.create_task(lane(), name=f"lane-{k}")
    wall, cpu = time.perf_counter() - wall0, cpu_now() - cpu0
    return samples, results, wall, cpu


async def preflight(bench: Bench) -> None:
    """The baseline's child must run in the pod's netns, never in ours (machine safety)."""
    mine, child = await bench.runner.run(None, child_shares_netns_here)
    main = netns_of_this_thread()
    if mine != child or child == main:
        raise BenchError(f"a child of a worker is not in the worker's netns ({mine} {child})")


async def warm_up(bench: Bench) -> None:
    """Load libnftables, learn the kernel forms, fork once: none of that is per-pod cost."""
    for method in Method:
        ns = await bench.factory.create("warm", list(Method).index(method))
        await bench.install(method, ns)
        await bench.verify(method, ns)
        bench.factory.remove([ns])


async def measure_installs(
    bench: Bench, n: int
) -> tuple[dict[str, Phase], dict[Method, list[float]], list[Netns]]:
    """Every method over fresh pods, in rounds until each has `min_samples` samples.

    Returns the phases, the raw samples, and the last round's OURS_FULL pods, still enrolled.
    """
    cfg = bench.config
    rounds = min(MAX_ROUNDS, max(1, math.ceil(cfg.min_samples / n)))
    samples: dict[Method, list[float]] = {m: [] for m in Method}
    phases: dict[Method, list[Phase]] = {m: [] for m in Method}
    enrolled: list[Netns] = []
    samples_noop: list[float] = []
    phases_noop: list[Phase] = []
    for r in range(rounds):
        if rounds == 1 or r == 0:
            say(f"N={n}: creating {n} pods per method x {len(Method)} (round 1/{rounds})")
        sets = {m: await bench.factory.create_many(f"{m.value}-{r}", n) for m in Method}
        for method in Method:
            if rounds == 1:
                say(f"N={n}: install {method.value} into {n} fresh pods")
            lat, _, wall, cpu = await timed_pass(
                sets[method],
                lambda ns, m=method: bench.install(m, ns),  # type: ignore[misc]
                concurrency=cfg.concurrency,
                what=method.value,
            )
            samples[method] += lat
            phases[method].append(Phase(Latency.of(lat), wall, cpu))
            for ns in evenly(sets[method], VERIFY_SAMPLE):
                await bench.verify(method, ns)
        noop, _, wall, cpu = await timed_pass(
            sets[Method.OURS_FULL],
            lambda ns: bench.runner.run(ns.path, noop_here),
            concurrency=cfg.concurrency,
            what="runner round trip",
        )
        samples_noop += noop
        phases_noop.append(Phase(Latency.of(noop), wall, cpu))
        last = r == rounds - 1
        for method, pods in sets.items():
            if last and method is Method.OURS_FULL:
                enrolled = pods
            else:
                bench.factory.remove(pods)
    if rounds > 1:
        say(f"N={n}: {rounds} rounds of {n} pods done")
    merged = {m.value: merge(phases[m], samples[m]) for m in Method}
    merged["runner_noop"] = merge(phases_noop, samples_noop)
    return merged, samples, enrolled


def _growth(samples: list[float]) -> dict[str, Any]:
    """p50 of the first and last tenth in install order: does cost grow with pods enrolled?"""
    if len(samples) < 20:
        return {}
    tenth = len(samples) // 10
    first, last = Latency.of(samples[:tenth]), Latency.of(samples[-tenth:])
    return {
        "first_tenth_p50_ms": round(first.p50_ms, 4),
        "last_tenth_p50_ms": round(last.p50_ms, 4),
        "ratio": round(last.p50_ms / first.p50_ms, 3),
    }


@contextlib.contextmanager
def holding(pods: list[Netns]) -> Iterator[dict[str, int]]:
    """Hold an fd on every pod's netns, as the agent does; yields RSS and fd counts."""
    facts = {"rss_kib_before": rss_kib(), "open_fds_before": open_fds()}
    fds = [os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC) for ns in pods]
    try:
        facts |= {
            "netns_fds_held": len(fds),
            "rss_kib_holding": rss_kib(),
            "open_fds_holding": open_fds(),
            "highest_fd": max(fds, default=-1),
        }
        yield facts
    finally:
        for fd in fds:
            os.close(fd)


async def check_pass(
    bench: Bench, pods: list[Netns], what: str
) -> tuple[Phase, list[list[Drift] | None]]:
    o = bench.config.options
    lat, results, wall, cpu = await timed_pass(
        pods,
        lambda ns: bench.rules.check(ns.path, o),
        concurrency=bench.config.concurrency,
        what=what,
    )
    return Phase(Latency.of(lat), wall, cpu), results


async def measure_drift(bench: Bench, enrolled: list[Netns]) -> dict[str, Any]:
    """Drift check over N enrolled pods: healthy, then 5% flushed by hand, then repair."""
    cfg, n = bench.config, len(enrolled)
    out: dict[str, Any] = {}
    with holding(enrolled) as memory:
        sample = evenly(enrolled, cfg.handle_sample)
        before = [await bench.runner.run(ns.path, handles_here, bench.names) for ns in sample]
        gen_lat, gen_before, gen_wall, gen_cpu = await timed_pass(
            enrolled,
            lambda ns: bench.runner.run(ns.path, nft_genid_here),
            concurrency=cfg.concurrency,
            what="genid pass",
        )
        # PodRules.check as the agent's pass calls it: the first pass after the installs lists
        # every pod's tables (an apply that wrote trusts no generation); from the second pass on
        # (the steady state) a pod whose nftables generation has not moved is not listed.
        say(f"N={n}: first drift-check pass and {cfg.drift_passes} more over {n} healthy pods")
        first, results = await check_pass(bench, enrolled, "check pass 1 (first)")
        if drifted := sum(1 for r in results if r):
            raise BenchError(f"first healthy pass reported drift in {drifted} pods")
        passes = []
        for p in range(cfg.drift_passes):
            phase, results = await check_pass(bench, enrolled, f"check pass {p + 2}")
            drifted = sum(1 for r in results if r)
            if drifted:
                raise BenchError(f"healthy pass reported drift in {drifted} pods")
            passes.append(phase)
        after = [await bench.runner.run(ns.path, handles_here, bench.names) for ns in sample]
        changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
        if changed:
            raise BenchError(f"a check rewrote rules: handles changed in {changed} sampled pods")
        gen_after = [await bench.runner.run(ns.path, nft_genid_here) for ns in enrolled]
        gen_changed = sum(1 for a, b in zip(gen_before, gen_after, strict=True) if a != b)
        if gen_changed:
            raise BenchError(f"a check wrote nftables: generation id moved in {gen_changed} pods")
        out["first_pass"] = first.as_dict() | {"pods": n, "drift_reported": 0}
        walls = sorted(p.wall_s for p in passes)
        cpus = sorted(p.cpu_s for p in passes)
        out["healthy"] = {
            "passes": len(passes),
            "pods": n,
            "wall_s_median": round(walls[len(walls) // 2], 4),
            "wall_s_max": round(walls[-1], 4),
            "cpu_s_median": round(cpus[len(cpus) // 2], 4),
            "cpu_s_max": round(cpus[-1], 4),
            "per_pod": passes[len(passes) // 2].latency.as_dict(),
            "drift_reported": 0,
            "handles_sampled_pods": len(sample),
            "handles_changed": changed,
            "genid_checked_pods": n,
            "genid_changed": gen_changed,
        }
        out["genid_read"] = Phase(Latency.of(gen_lat), gen_wall, gen_cpu).as_dict()

        k = max(1, round(n * cfg.drift_fraction))
        victims = evenly(enrolled, k)
        say(f"N={n}: flushing inet {c.NAT_TABLE} in {k} pods, then a check pass and repair")
        for ns in victims:
            await bench.runner.run(ns.path, flush_nat_here)
        phase, results = await check_pass(bench, enrolled, "check pass (drifted)")
        found = {enrolled[i].name for i, r in enumerate(results) if r}
        if found != {ns.name for ns in victims}:
            raise BenchError(f"drift check found {len(found)} drifted pods, {k} were flushed")
        out["drifted"] = {
            "pods": n,
            "drifted_pods": k,
            "detected_pods": len(found),
            "wall_s": round(phase.wall_s, 4),
            "cpu_s": round(phase.cpu_s, 4),
        }
        o = cfg.options
        lat, repaired, wall, cpu = await timed_pass(
            victims,
            lambda ns: bench.rules.apply(ns.path, o),
            concurrency=cfg.concurrency,
            what="repair",
        )
        if not all(repaired):
            raise BenchError("a repair of a flushed pod reported nothing to repair")
        for ns in victims:
            if await bench.rules.check(ns.path, o):
                raise BenchError(f"{ns.name} still drifted after repair")
        out["repair"] = Phase(Latency.of(lat), wall, cpu).as_dict()
    out["memory"] = memory | {
        "rss_bytes_per_netns_fd": round(
            (memory["rss_kib_holding"] - memory["rss_kib_before"]) * 1024 / max(1, n), 1
        )
    }
    return out


async def measure_loaded(bench: Bench, n: int) -> tuple[Phase, list[float]]:
    """Ours on fresh pods while N pods are enrolled (the other methods' sets are removed)."""
    k = bench.config.loaded_pods
    say(f"N={n}: install ours_full into {k} more pods with {n} enrolled")
    pods = await bench.factory.create_many("loaded", k)
    try:
        lat, _, wall, cpu = await timed_pass(
            pods,
            lambda ns: bench.install(Method.OURS_FULL, ns),
            concurrency=bench.config.concurrency,
            what="loaded",
        )
    finally:
        bench.factory.remove(pods)
    return Phase(Latency.of(lat), wall, cpu), lat


async def measure_proc_sys(bench: Bench, n: int) -> dict[str, Any]:
    """The IPv6 check of every routing install (`ipv6_check_here`), in fresh pods while the N
    enrolled pods exist: it grew with N while it read /proc/sys, and must stay flat now."""
    k = bench.config.loaded_pods
    pods = await bench.factory.create_many("procsys", k)
    try:
        ms = [await bench.runner.run(ns.path, ipv6_check_here) for ns in pods]
    finally:
        bench.factory.remove(pods)
    return {"enrolled": n, "latency": Latency.of(ms).as_dict()}


async def measure_size(bench: Bench, n: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    phases, samples, enrolled = await measure_installs(bench, n)
    try:
        result: dict[str, Any] = {
            "install": {name: phase.as_dict() for name, phase in phases.items()},
            "growth_ours_full": _growth(samples[Method.OURS_FULL]) if n >= 100 else {},
        }
        result |= await measure_drift(bench, enrolled)
        loaded, loaded_samples = await measure_loaded(bench, n)
        result["install_loaded"] = {"enrolled": n, Method.OURS_FULL.value: loaded.as_dict()}
        result["ipv6_check_fresh_pod"] = await measure_proc_sys(bench, n)
    finally:
        bench.factory.remove(enrolled)
    raw = {m.value: [round(s, 4) for s in samples[m]] for m in Method}
    raw["ours_full_loaded"] = [round(s, 4) for s in loaded_samples]
    return result, raw


async def measure_fast_paths(bench: Bench) -> dict[str, Any]:
    """The core's two fast paths against the fallbacks they replace, timed on the worker: a new
    pod's tables by the recorded netlink batch or by libnftables (each into its own fresh pods,
    alternating), and the first check of those healthy pods proven by the netlink dump or
    decided by listing the tables (both on every pod, alternating; a check reads only)."""
    k = bench.config.min_samples
    say(f"fast paths: batch replay and dump proof against libnftables, on {2 * k} fresh pods")
    ms: dict[str, list[float]] = {}
    pods = await bench.factory.create_many("fastpath", 2 * k)
    try:
        for i, ns in enumerate(pods):
            replay = i % 2 == 0
            name = "tables_install_replay" if replay else "tables_install_libnftables"
            ms.setdefault(name, []).append(
                await bench.runner.run(
                    ns.path, tables_install_here, bench.state, bench.forms, replay=replay
                )
            )
        for i, ns in enumerate(pods):
            for dump in (i % 2 == 0, i % 2 != 0):
                name = "tables_first_check_dump" if dump else "tables_first_check_listing"
                ms.setdefault(name, []).append(
                    await bench.runner.run(
                        ns.path, tables_first_check_here, bench.state, bench.forms, dump=dump
                    )
                )
    finally:
        bench.factory.remove(pods)
    return {name: Latency.of(values).as_dict() for name, values in ms.items()} | {"pods": 2 * k}


def _profiled_here(prof: cProfile.Profile, fn: Callable[..., T], *args: Any) -> T:
    prof.enable()
    try:
        return fn(*args)
    finally:
        prof.disable()


async def measure_profile(bench: Bench, out: Path) -> dict[str, Any]:
    """Where the time of apply and check goes, as the agent calls them: a fresh install, the
    first check after it (lists the tables), a steady-state check (generation unchanged). Timed
    by step on the worker, then cProfile of the same calls on fresh pods."""
    k = bench.config.profile_pods
    say(f"profile: fresh apply, first and steady check, by step, on {k} fresh pods")
    forms = KernelForms()
    steps: dict[str, dict[str, list[float]]] = {kind: {} for kind in PROFILE_KINDS}

    def record(kind: str, timings: dict[str, float]) -> None:
        for step, ms in timings.items():
            steps[kind].setdefault(step, []).append(ms)

    pods = await bench.factory.create_many("profile", k)
    try:
        await bench.runner.run(None, forms.of, bench.state.ruleset)  # learnt once, not per pod
        for ns in pods:
            timings, _ = await bench.runner.run(
                ns.path, apply_steps_here, bench.state, forms, None, fresh=True
            )
            record("apply_fresh", timings)
            timings, first = await bench.runner.run(
                ns.path, check_steps_here, bench.state, forms, None
            )
            record("check_first", timings)
            timings, _ = await bench.runner.run(
                ns.path, check_steps_here, bench.state, forms, first.verified
            )
            record("check_steady", timings)
    finally:
        bench.factory.remove(pods)
    pods = await bench.factory.create_many("cprofile", k)
    try:
        prof = {kind: cProfile.Profile() for kind in PROFILE_KINDS}
        for ns in pods:
            await bench.runner.run(
                ns.path, _profiled_here, prof["apply_fresh"], _apply_fresh, bench.state, forms
            )
            first = await bench.runner.run(
                ns.path, _profiled_here, prof["check_first"], check_here, bench.state, forms
            )
            await bench.runner.run(
                ns.path,
                _profiled_here,
                prof["check_steady"],
                check_here,
                bench.state,
                forms,
                first.verified,
            )
        text = io.StringIO()
        for kind, p in prof.items():
            text.write(f"==== {kind} over {k} pods, by own time ====\n")
            pstats.Stats(p, stream=text).sort_stats("tottime").print_stats(20)
            text.write(f"==== {kind} over {k} pods, cumulative ====\n")
            pstats.Stats(p, stream=text).sort_stats("cumulative").print_stats(25)
        (out / "profile.txt").write_text(text.getvalue())
    finally:
        bench.factory.remove(pods)
    return {
        kind: {step: round(Latency.of(v).p50_ms, 4) for step, v in by_step.items()}
        for kind, by_step in steps.items()
    } | {"pods": k, "note": "p50 ms per step, timed on the worker; cProfile in profile.txt"}


def _apply_fresh(state: PodState, forms: KernelForms) -> Outcome:
    return apply_here(state, forms, None, fresh=True)


def _command(*argv: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return result.stdout.strip() or result.stderr.strip()


def mapped_library(stem: str) -> str:
    """The file of the shared library `stem` (e.g. "libnftables") that this process has loaded,
    from /proc/self/maps: the one the run used, on any architecture; "" if not loaded."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and Path(fields[5].strip()).name.startswith(f"{stem}.so"):
                return str(Path(fields[5].strip()).resolve())
    return ""


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": os.uname().release,
        "nft_version": _command("nft", "--version"),
        "libnftables_package": _command("dpkg-query", "-W", "-f", "${Version}", "libnftables1"),
        "libnftables_file": mapped_library("libnftables"),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "mem_total_kib": _meminfo_total(),
        "git_commit": _command("git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def _meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


async def bench_all(
    bench: Bench, out: Path, *, profile: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    await preflight(bench)
    await warm_up(bench)
    sizes: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for n in bench.config.sizes:
        t0 = time.perf_counter()
        sizes[str(n)], raw[str(n)] = await measure_size(bench, n)
        say(f"N={n}: done in {time.perf_counter() - t0:.1f} s")
    data: dict[str, Any] = {"sizes": sizes, "fast_paths": await measure_fast_paths(bench)}
    say(f"CNI entry restore: {bench.config.restore_rounds} rewrites of the primary conflist")
    data["cni_entry_restore"] = await measure_entry_restore(bench.config.restore_rounds)
    if profile:
        data["profile"] = await measure_profile(bench, out)
    agent = bench.config.agent
    if agent is not None:
        t0 = time.perf_counter()
        say(f"agent: sizes {list(agent.sizes)}, {agent.samples} CNI ADDs per size")
        by_size, samples = await measure_agent(
            bench.runner, bench.factory, agent, profile_out=out if profile else None
        )
        agent_profile = by_size.pop("profile", None)
        data["agent"] = {
            "sizes": by_size,
            "profile": agent_profile,
            "baseline": await memory_floor(),
            "samples": samples,
            "config": {
                "sizes": list(agent.sizes),
                "samples": agent.samples,
                "bursts": agent.bursts,
                "drift_passes": agent.drift_passes,
                "repair_samples": agent.repair_samples,
                "reconcile_period_s": agent.period_for(max(agent.sizes)),
                "log_level": "info",
            },
            "duration_s": round(time.perf_counter() - t0, 1),
        }
    if bench.config.runtime_sandboxes:
        k = bench.config.runtime_sandboxes
        say(f"real runtime: {k} pod sandboxes each without our plugin, mesh, not in the mesh")
        data["runtime"] = await measure_runtime(k)
        if "skipped" in data["runtime"]:
            say(f"real runtime: skipped: {data['runtime']['skipped']}")
    if bench.config.footprint is not None:
        fp = bench.config.footprint
        say(f"footprint: sizes {list(fp.sizes)}, idle window {fp.idle_window_s:g} s")
        data["footprint"] = await measure_footprint(bench.runner, bench.factory, fp)
    if bench.config.repair is not None:
        say(f"repair on notification: sizes {list(bench.config.repair.sizes)}")
        data["repair"] = await measure_repair(bench.runner, bench.config.repair)
    return data, raw


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,100,1000", help="pod counts N, comma separated")
    p.add_argument("--quick", action="store_true", help="N=1,20 and few samples (~30 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for latest.*")
    p.add_argument("--concurrency", type=int, default=1, help="pods in flight (= worker threads)")
    p.add_argument("--min-samples", type=int, default=200, help="samples per method for small N")
    p.add_argument("--drift-passes", type=int, default=5)
    p.add_argument("--drift-fraction", type=float, default=0.05)
    p.add_argument("--loaded-pods", type=int, default=50, help="pods installed with N enrolled")
    p.add_argument("--handle-sample", type=int, default=10, help="pods whose handles are compared")
    p.add_argument("--profile-pods", type=int, default=200, help="0: no profile")
    p.add_argument("--agent-sizes", help="pods N for the agent part (default: --sizes)")
    p.add_argument("--agent-samples", type=int, default=30, help="CNI ADDs measured per N")
    p.add_argument("--agent-bursts", type=int, default=5, help="bursts of 30 ADDs per N")
    p.add_argument("--agent-drift-passes", type=int, default=3)
    p.add_argument("--agent-repair-samples", type=int, default=5, help="pods flushed by hand per N")
    p.add_argument("--restore-rounds", type=int, default=50, help="conflist rewrites timed")
    p.add_argument("--no-agent", action="store_true", help="skip the agent-level measurements")
    p.add_argument(
        "--runtime-sandboxes",
        type=int,
        default=DEFAULT_SANDBOXES,
        help="pod sandboxes per series in the real container runtime",
    )
    p.add_argument("--no-runtime", action="store_true", help="skip the real container runtime")
    p.add_argument("--no-footprint", action="store_true", help="skip the agent's idle footprint")
    p.add_argument(
        "--idle-window",
        type=float,
        default=DEFAULT_IDLE_WINDOW_S,
        help="seconds of idle CPU at the largest N (the issue's figure: 600)",
    )
    p.add_argument("--repair-sizes", help="pods N for repair on notification (default: --sizes)")
    p.add_argument("--repair-samples", type=int, default=20, help="pods changed by hand per N")
    p.add_argument("--no-repair", action="store_true", help="skip repair on notification")
    p.add_argument("--no-ipv6", action="store_true", help="IPv4-only pod ruleset")
    p.add_argument("--no-dns-capture", action="store_true", help="no raw table")
    p.add_argument(
        "--remove-leftovers", action="store_true", help=f"remove {BENCH_PREFIX}* netns and exit"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "1,20"
        args.min_samples = 10
        args.drift_passes = 2
        args.loaded_pods = 5
        args.handle_sample = 3
        args.profile_pods = 0
        args.agent_sizes = "3"
        args.agent_samples = 3
        args.agent_bursts = 1
        args.agent_drift_passes = 1
        args.agent_repair_samples = 3
        args.repair_sizes = "3"
        args.repair_samples = 3
        args.restore_rounds = 10
        args.runtime_sandboxes = QUICK_SANDBOXES
        args.idle_window = QUICK_IDLE_WINDOW_S
    return args


def config_of(args: argparse.Namespace) -> Config:
    sizes = tuple(int(s) for s in str(args.sizes).split(",") if s.strip())
    if not sizes or min(sizes) < 1 or args.concurrency < 1:
        raise SystemExit("--sizes needs positive counts, --concurrency at least 1")
    options = PodOptions(ipv6=not args.no_ipv6, dns_capture=not args.no_dns_capture)
    agent_sizes = tuple(int(x) for x in str(args.agent_sizes or args.sizes).split(",") if x.strip())
    if args.runtime_sandboxes < 1:
        raise SystemExit("--runtime-sandboxes needs at least 1 (--no-runtime skips the part)")
    if not agent_sizes or min(agent_sizes) < 1 or args.agent_samples < 1:
        raise SystemExit("--agent-sizes needs positive counts, --agent-samples at least 1")
    agent = AgentConfig(
        sizes=agent_sizes,
        samples=args.agent_samples,
        bursts=max(1, args.agent_bursts),
        drift_passes=max(1, args.agent_drift_passes),
        repair_samples=max(1, args.agent_repair_samples),
        options=options,
        reconcile_period=1.0,
    )
    return Config(
        sizes=sizes,
        min_samples=args.min_samples,
        drift_passes=max(1, args.drift_passes),
        loaded_pods=max(1, args.loaded_pods),
        concurrency=args.concurrency,
        drift_fraction=args.drift_fraction,
        handle_sample=max(1, args.handle_sample),
        profile_pods=args.profile_pods,
        restore_rounds=max(1, args.restore_rounds),
        options=options,
        agent=None if args.no_agent else agent,
        runtime_sandboxes=0 if args.no_runtime else args.runtime_sandboxes,
        footprint=None
        if args.no_footprint
        else FootprintConfig(agent_sizes, max(1.0, args.idle_window), options),
        repair=None
        if args.no_repair
        else RepairConfig(
            sizes=tuple(int(x) for x in str(args.repair_sizes or args.sizes).split(",") if x),
            samples=max(1, args.repair_samples),
            host_samples=max(1, min(5, args.repair_samples)),
            options=options,
        ),
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.remove_leftovers:
        print("removed:", " ".join(remove_leftovers()) or "nothing")
        return 0
    if os.geteuid() != 0:
        print("the benchmark creates network namespaces: run it as root", file=sys.stderr)
        return 2
    config = config_of(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    # The stand-ins log every hop at debug level on this process's stdout: keep only warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    run_id = secrets.token_hex(3)
    runner = NetnsRunner(workers=config.concurrency)
    factory = PodFactory(runner, run_id=run_id)
    started = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        data, raw = asyncio.run(
            bench_all(Bench(runner, factory, config), out, profile=config.profile_pods > 0)
        )
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        runner.close()
        factory.close()
        left = sorted(p.name for p in NETNS_DIR.glob(f"{BENCH_PREFIX}{run_id}-*"))
        if left:
            print(f"namespaces left behind: {left}", file=sys.stderr)
    data = {
        "machine": machine_facts() | {"loadavg_at_start": load_at_start},
        "config": {
            "sizes": list(config.sizes),
            "quick": bool(args.quick),
            "concurrency": config.concurrency,
            "min_samples": config.min_samples,
            "drift_passes": config.drift_passes,
            "drift_fraction": config.drift_fraction,
            "loaded_pods": config.loaded_pods,
            "options": {
                "ipv6": config.options.ipv6,
                "dns_capture": config.options.dns_capture,
                "tables": list(table_names(PodState.for_options(config.options).ruleset)),
            },
            "duration_s": round(time.perf_counter() - started, 1),
        },
    } | data
    paths = report.write(out, data, raw)
    say("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
