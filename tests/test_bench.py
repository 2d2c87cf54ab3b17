"""The benchmark harness: quick mode end to end, its outputs, its cleanup, and its arithmetic."""

from __future__ import annotations

import json
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import runtime
from bench.repair import notification_markdown
from bench.report import (
    add_targets,
    fast_paths_markdown,
    growth_markdown,
    runtime_markdown,
    targets,
)
from bench.run import config_of, parse_args
from bench.summary import Latency, percentile
from ztunnel_redirect.testing import containerd as ctd
from ztunnel_redirect.testing.cheappods import BENCH_PREFIX, NETNS_DIR, unpin

ROOT = Path(__file__).resolve().parent.parent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_namespaces() -> set[str]:
    return {p.name for p in NETNS_DIR.glob(f"{BENCH_PREFIX}*")} if NETNS_DIR.is_dir() else set()


@pytest.fixture
def no_leftovers() -> Iterator[set[str]]:
    """Fails the test if the benchmark leaves namespaces behind, and removes them anyway."""
    before = bench_namespaces()
    yield before
    left = bench_namespaces() - before
    for name in left:
        unpin(str(NETNS_DIR / name))
    assert not left, f"benchmark left namespaces behind: {sorted(left)}"


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


# -- quick mode end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    before = bench_namespaces()
    proc = start("--quick", "--out", str(out))
    try:
        log, _ = proc.communicate(timeout=90)
    finally:
        stop(proc)
        for name in bench_namespaces() - before:
            unpin(str(NETNS_DIR / name))
    assert proc.returncode == 0, log
    return out, log


def positive_numbers(tree: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from positive_numbers(value, f"{path}.{key}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.kernel
def test_quick_run_writes_well_formed_json(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    assert {"machine", "config", "sizes", "targets", "samples"} <= set(data)
    for key in ("kernel", "nft_version", "cpu_count", "cpu_model", "python", "libnftables_package"):
        assert data["machine"][key], key
    assert data["config"]["quick"] is True
    assert set(data["sizes"]) == {"1", "20"}
    for n, at in data["sizes"].items():
        for method in ("ours_rules", "baseline_rules", "ours_full", "baseline_full"):
            phase = at["install"][method]
            lat = phase["latency"]
            assert lat["count"] >= 10, (n, method)
            assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
            assert lat["p99_ms"] <= lat["max_ms"]
            assert phase["throughput_pods_per_s"] > 0
            assert phase["cpu_ms_per_pod"] > 0
            assert len(data["samples"][n][method]) == lat["count"]
        healthy = at["healthy"]
        assert healthy["pods"] == int(n)
        assert healthy["drift_reported"] == 0
        assert healthy["handles_changed"] == 0
        assert healthy["genid_changed"] == 0
        assert healthy["wall_s_median"] > 0
        assert healthy["cpu_s_median"] > 0
        assert at["drifted"]["detected_pods"] == at["drifted"]["drifted_pods"] >= 1
        assert at["repair"]["latency"]["p50_ms"] > 0
        assert at["memory"]["netns_fds_held"] == int(n)
        assert at["memory"]["open_fds_holding"] >= at["memory"]["open_fds_before"] + int(n)
    for where, value in positive_numbers(data["sizes"]):
        if where.endswith(("_changed", "drift_reported", "min_ms")) or "memory" in where:
            continue
        assert value > 0, where
    names = [t["name"] for t in data["targets"]["results"]]
    assert len(names) == 23, names
    assert any(name.startswith("agent RSS at its defaults") for name in names)
    assert any(name.startswith("agent CPU while idle, 3 healthy pods") for name in names)
    assert any(name.startswith("open fds per pod, 3 pods") for name in names)
    assert any(name.startswith("whole CNI ADD of a pod not in the mesh") for name in names)
    assert any(name.startswith("restart catch-up of") for name in names)
    assert any(name.startswith("agent RSS") for name in names)
    assert any(name.startswith("agent repair after a manual flush of a pod") for name in names)
    assert any(name.startswith("agent repair after a manual flush of the host") for name in names)
    for t in data["targets"]["results"]:
        assert isinstance(t["met"], bool)
    assert set(data["growth"]["p50_ms"]) >= {"ours_full with N enrolled", "ours_routing"}
    fast, k = data["fast_paths"], data["config"]["min_samples"]
    assert fast["pods"] == 2 * k
    # Each install method into its own half of the pods; both checks on every pod.
    ordered(fast["tables_install_replay"], k)
    ordered(fast["tables_install_libnftables"], k)
    ordered(fast["tables_first_check_dump"], 2 * k)
    ordered(fast["tables_first_check_listing"], 2 * k)


def ordered(lat: dict[str, Any], count: int) -> None:
    assert lat["count"] == count
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]


@pytest.mark.kernel
def test_quick_run_measures_the_agent_process(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    agent = json.loads((out / "latest.json").read_text())["agent"]
    samples = agent["config"]["samples"]
    assert set(agent["sizes"]) == {"3"} == set(agent["samples"])
    at = agent["sizes"]["3"]
    assert at["first_start_to_ready_s"] > 0
    assert at["enrollment_by_label"]["pods_added"] == 3
    assert at["enrollment_by_label"]["label_to_all_enabled_s"] > 0
    add = at["cni_add"]
    for series in ("agent_add", "plugin", "first_connection"):
        ordered(add[series], samples)
        assert len(agent["samples"]["3"][series]) == samples
    # The plugin process includes the agent's part of the ADD.
    assert add["plugin"]["p50_ms"] > add["agent_add"]["p50_ms"]
    ordered(add["plugin_not_in_mesh"], samples)
    assert len(agent["samples"]["3"]["plugin_not_in_mesh"]) == samples
    ordered(add["at_once"], add["at_once_count"])
    ordered(add["at_once_not_in_mesh"], add["at_once_count"])
    assert add["at_once_count"] == 30
    assert add["plugin_binary_bytes"] > 100_000
    assert add["enrolled"] == 3
    res = at["resources"]
    assert res["pods"] == 3
    for when in ("after_enrollment", "after_drift_pass"):
        assert res[when]["rss_kib"] > 10_000
        assert res[when]["open_fds"] >= 3  # at least a netns fd per pod
    drift = res["drift_pass"]
    assert drift["passes"] >= 1
    assert drift["cpu_s_median"] >= 0
    assert drift["wall_ms_median"] > 0
    assert drift["pod_reconciles_per_pass"] == [3.0] * drift["passes"]
    assert drift["write_events"] == 0
    restart = at["restart"]
    assert restart["readyz_status"] == 200
    assert restart["start_to_ready_s"] > 0
    assert restart["pods_adopted"] == restart["netns_found"] == 3
    assert restart["pod_generations_checked"] == 3
    assert restart["rules_rewritten"] == restart["pod_generations_moved"] == 0
    assert set(restart["write_events"]) >= {"pod_rules_applied", "drift_repaired"}
    repair = at["repair"]
    period_ms = repair["period_s"] * 1000
    pod = repair["pod_nat_flush"]
    ordered(pod["latency"], agent["config"]["repair_samples"])
    assert len(pod["samples_ms"]) == pod["samples"] == 3
    assert pod["phases_periods"][-1] == 0.0  # the last pod is flushed right after a pass
    # A repair comes from a pass, which comes within a period (plus the pass itself, short here).
    assert 0 < pod["latency"]["max_ms"] < 2 * period_ms
    assert pod["max_periods"] == pytest.approx(pod["latency"]["max_ms"] / period_ms, abs=1e-3)
    assert pod["repair_apply_ms_p50"] > 0
    host = repair["host_postrouting_flush"]
    assert 0 < host["latency_ms"] < 2 * period_ms
    assert host["repair_apply_ms"] > 0
    restore = json.loads((out / "latest.json").read_text())["cni_entry_restore"]
    assert restore["rounds"] == 10
    assert 0 < restore["p50_ms"] <= restore["p99_ms"] <= restore["max_ms"]
    floor = agent["baseline"]
    assert 0 < floor["python_bare_rss_kib"] < floor["imports_rss_kib"]
    assert "ztunnel_redirect.adapters.kube" in floor["by_import_kib"]


@pytest.mark.kernel
def test_quick_run_measures_the_footprint(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    fp = json.loads((out / "latest.json").read_text())["footprint"]
    at = fp["sizes"]["3"]
    assert at["pods"] == 3
    for when in ("enrolled", "after_idle"):
        assert at[when]["rss_kib"] > 10_000
        assert at[when]["open_fds"] >= 2 * 3  # two notification sockets per pod
    assert at["idle"]["window_s"] > 0 and at["idle"]["cpu_s"] >= 0
    # Nothing changed: no write, no repair; at most the one re-check a pod gets after its netns
    # is first watched (docs/design.md §2.5), if the window began before it ran.
    reconciles = at["idle"]["reconciles"]
    assert set(reconciles) <= {"check"} and reconciles.get("check", 0) <= at["pods"], reconciles
    assert fp["baseline"]["imports_rss_kib"] > fp["baseline"]["python_bare_rss_kib"]


@pytest.mark.kernel
def test_quick_run_times_pod_sandboxes_in_a_real_runtime_or_says_why_not(
    quick_run: tuple[Path, str],
) -> None:
    out, _ = quick_run
    section = json.loads((out / "latest.json").read_text())["runtime"]
    md = (out / "latest.md").read_text()
    assert "## A real container runtime: what our plugin adds to a pod sandbox\n" in md
    reason = ctd.unavailable()
    if reason is not None:
        assert section == {"skipped": reason}
        assert f"Not measured: {reason}." in md
        return
    assert section["sandboxes"] == runtime.QUICK_SANDBOXES
    assert section["runtime"]  # containerd's version, from CRI
    for phase in ("run_pod_sandbox", "stop_remove"):
        assert set(section[phase]) == set(runtime.SERIES)
        for lat in section[phase].values():
            ordered(lat, runtime.QUICK_SANDBOXES)
        for series in (runtime.MESH, runtime.NOT_IN_MESH):
            assert section["overhead"][phase][series]["p50_ratio"] > 0
    for series, by_phase in section["samples"].items():
        assert [len(v) for v in by_phase.values()] == [runtime.QUICK_SANDBOXES] * 2, series
    assert "| our plugin, a mesh pod | " in md


def test_runtime_part_is_on_by_default_and_can_be_switched_off() -> None:
    assert config_of(parse_args([])).runtime_sandboxes == runtime.DEFAULT_SANDBOXES >= 20
    assert config_of(parse_args(["--quick"])).runtime_sandboxes == runtime.QUICK_SANDBOXES
    assert config_of(parse_args(["--runtime-sandboxes", "40"])).runtime_sandboxes == 40
    assert config_of(parse_args(["--no-runtime"])).runtime_sandboxes == 0
    with pytest.raises(SystemExit):
        config_of(parse_args(["--runtime-sandboxes", "0"]))


def test_runtime_overhead_is_against_the_chain_without_our_plugin() -> None:
    def series(base: float) -> dict[str, list[float]]:
        return {"run_ms": [base - 10.0, base, base + 10.0], "stop_remove_ms": [base / 2] * 3}

    samples = {
        runtime.NO_PLUGIN: series(50.0),
        runtime.MESH: series(60.0),
        runtime.NOT_IN_MESH: series(52.5),
    }
    section = runtime.summarise(samples, sandboxes=3, runtime_version="1.6.20")
    run = section["overhead"]["run_pod_sandbox"]
    assert set(run) == {runtime.MESH, runtime.NOT_IN_MESH}  # no row against itself
    assert run[runtime.MESH]["p50_added_ms"] == 10.0
    assert run[runtime.MESH]["p50_ratio"] == 1.2
    assert run[runtime.NOT_IN_MESH]["p50_ratio"] == 1.05
    assert run[runtime.MESH]["p99_added_ms"] == pytest.approx(10.0)
    assert section["overhead"]["stop_remove"][runtime.MESH]["p50_ratio"] == 1.2
    md = "\n".join(runtime_markdown(section))
    assert "containerd 1.6.20 (CRI)" in md
    assert "| our plugin, a mesh pod | 60.0 / 69.8 | +10.0 / +10.0 | x1.20 / x1.17 |" in md
    assert "| primary alone (no plugin in the chain) | 50.0 / 59.8 | |  |" in md
    skipped = "\n".join(runtime_markdown({"skipped": "containerd end-to-end needs root"}))
    assert "Not measured: containerd end-to-end needs root." in skipped
    assert runtime_markdown(None) == []


@pytest.mark.kernel
def test_quick_run_measures_repair_on_notification(quick_run: tuple[Path, str]) -> None:
    out, log = quick_run
    data = json.loads((out / "latest.json").read_text())
    repair = data["repair"]
    assert set(repair["sizes"]) == {"3"}
    at = repair["sizes"]["3"]
    assert at["passes_seen"] == 0  # every repair came from a notification
    for kind in ("pod_nat_flush", "pod_ip_rule_del", "host_postrouting_flush"):
        ordered(
            {k: v for k, v in at[kind].items() if k != "samples_ms"}, len(at[kind]["samples_ms"])
        )
        assert at[kind]["event"]["p50_ms"] > 0
    assert at["pod_nat_flush"]["count"] == at["pod_ip_rule_del"]["count"] == 3
    storm = at["storm"]
    assert storm["pods"] == storm["pods_repaired"] == storm["repairs"] == 3
    assert storm["first_flush_to_last_repair_ms"] > 0
    assert storm["fds_after"] <= storm["fds_before"]
    assert at["fds"]["per_pod"] >= 2  # a notification socket for nftables and rtnetlink each
    md = (out / "latest.md").read_text()
    assert "## Repair on kernel notification\n" in md
    assert "agent: N=3: storm: 3 pods repaired" in log


@pytest.mark.kernel
def test_quick_run_writes_markdown_and_png(quick_run: tuple[Path, str]) -> None:
    out, log = quick_run
    md = (out / "latest.md").read_text()
    for heading in ("## N = 1\n", "## N = 20\n", "## The agent as a process\n", "## Targets"):
        assert heading in md
    assert "| healthy, steady state" in md
    assert "| first pass after the installs" in md
    assert "| 3 | " in md  # the agent's row for N=3
    assert "## Install cost with N\n" in md
    assert "## Fast paths against their fallbacks\n" in md
    assert "| pod repair after a flush p50 / max ms" in md
    assert "| ours_rules |" in md
    assert "ours_rules / baseline_rules: p50" in md
    png = (out / "latest.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 10_000
    assert "install ours_full into 20 fresh pods" in log  # progress per phase
    assert "agent: N=3: restart with 3 pods enrolled" in log
    assert "agent: N=3: pod repair after a flush p50" in log


def test_make_bench_quick_runs_the_quick_mode_this_test_runs() -> None:
    """CI runs the quick mode through these tests, not through make: the target must be the
    same command (`make -n` prints it without running anything)."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    result = subprocess.run(
        ["make", "-n", "bench-quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "-m bench.run" in line]
    assert len(lines) == 1, result.stdout
    argv = shlex.split(lines[0])
    assert argv[0].endswith("python")
    args = parse_args(argv[argv.index("bench.run") + 1 :])
    assert args.quick
    assert args.out != Path("bench/results")  # never over the committed results


# -- cleanup on SIGTERM ----------------------------------------------------------------------


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} within {timeout} s; output: {''.join(seen)}")


@pytest.mark.kernel
def test_sigterm_mid_run_removes_every_namespace(tmp_path: Path, no_leftovers: set[str]) -> None:
    proc = start("--sizes", "300", "--profile-pods", "0", "--out", str(tmp_path))
    try:
        wait_for_line(proc, "install ours_rules", timeout=60)
        assert bench_namespaces() - no_leftovers, "pods should exist mid-run"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        stop(proc)
    assert rc == 130
    assert not (tmp_path / "latest.json").exists()


def test_remove_leftovers_flag_removes_a_stale_namespace(no_leftovers: set[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    stale = NETNS_DIR / f"{BENCH_PREFIX}dead00-ours_full-0"
    stale.touch()  # a crashed run's file, its mount already gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.run", "--remove-leftovers"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        unpin(str(stale))
    assert result.returncode == 0, result.stderr
    assert stale.name in result.stdout


# -- arithmetic ------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([0.0, 10.0], 0.9) == 9.0


def test_latency_summary_orders_its_percentiles() -> None:
    lat = Latency.of([float(x) for x in range(100, 0, -1)])
    assert (lat.count, lat.min_ms, lat.max_ms) == (100, 1.0, 100.0)
    assert lat.p50_ms == 50.5
    assert lat.p99_ms == pytest.approx(99.01)
    assert lat.mean_ms == 50.5


def synthetic(ours_rules_p99: float, cpu_s: float) -> dict[str, Any]:
    def phase(p50: float, p99: float) -> dict[str, Any]:
        return {"latency": {"p50_ms": p50, "p99_ms": p99}, "cpu_ms_per_pod": p50}

    return {
        "sizes": {
            "1000": {
                "install": {
                    "ours_rules": phase(0.4, ours_rules_p99),
                    "baseline_rules": phase(2.4, 3.0),
                    "ours_full": phase(0.6, 1.5),
                },
                "healthy": {
                    "cpu_s_median": cpu_s,
                    "wall_s_median": cpu_s,
                    "passes": 5,
                    "handles_changed": 0,
                    "drift_reported": 0,
                    "genid_changed": 0,
                    "genid_checked_pods": 1000,
                    "handles_sampled_pods": 10,
                },
            }
        }
    }


def test_targets_say_met_or_missed_and_by_how_much() -> None:
    n, found = targets(synthetic(ours_rules_p99=0.8, cpu_s=0.5))
    assert n == 1000
    assert [t.met for t in found] == [True, True, True, True, True]

    _, found = targets(synthetic(ours_rules_p99=1.5, cpu_s=1.2))
    by_name = {t.name.split(":")[0]: t for t in found}
    assert not by_name["rules-only install p99"].met
    assert "missed by 0.5 ms" in by_name["rules-only install p99"].margin
    assert not by_name["core drift pass over 1000 healthy pods, steady state"].met
    assert "no profile" in by_name["rules-only install p99"].why
    assert not any(t.why for t in found if t.met)


def synthetic_repair(pod_max_ms: float, host_ms: float) -> dict[str, Any]:
    return {
        "pods": 1000,
        "period_s": 3.0,
        "pod_nat_flush": {
            "samples": 5,
            "latency": {"p50_ms": pod_max_ms / 2, "max_ms": pod_max_ms},
            "p50_periods": pod_max_ms / 6000,
            "max_periods": pod_max_ms / 3000,
            "repair_apply_ms_p50": 15.0,
        },
        "host_postrouting_flush": {
            "latency_ms": host_ms,
            "periods": host_ms / 3000,
            "repair_apply_ms": 8.0,
        },
    }


def synthetic_agent(
    rewritten: int, rss_kib: int, cpu_s: float, repair: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "baseline": {
            "python_bare_rss_kib": 10_000,
            "imports_rss_kib": 90_000,
            "by_import_kib": {"aiohttp": 14_000, "kubernetes_asyncio": 40_000},
        },
        "sizes": {
            "1000": {
                "resources": {
                    "pods": 1000,
                    "after_enrollment": {"rss_kib": rss_kib, "open_fds": 1010},
                    "after_drift_pass": {"rss_kib": rss_kib, "open_fds": 1010},
                    "drift_pass": {
                        "passes": 3,
                        "cpu_s_median": cpu_s,
                        "cpu_s_max": cpu_s,
                        "wall_ms_median": 500.0,
                        "write_events": 0,
                        "clock_tick_s": 0.01,
                    },
                },
                "restart": {
                    "pods": 1000,
                    "rules_rewritten": rewritten,
                    "pod_generations_moved": rewritten,
                    "pod_generations_checked": 1000,
                    "write_events": {"pod_rules_applied": 0, "drift_repaired": 0},
                    "start_to_ready_s": 2.0,
                },
            }
            | ({"repair": repair} if repair else {})
        },
    }


def test_agent_targets_say_met_or_missed_and_why() -> None:
    data = synthetic(ours_rules_p99=0.8, cpu_s=0.5)
    n, found = targets(data | {"agent": synthetic_agent(0, 80 * 1024, 0.4)})
    assert n == 1000
    agent = {t.name: t for t in found[5:]}
    assert list(agent) == [
        "restart catch-up of 1000 healthy pods rewrites zero rules",
        "agent RSS with 1000 pods enrolled",
        "agent drift pass over 1000 healthy pods: CPU",
        "agent drift passes over healthy pods: writes",
    ]
    assert all(t.met for t in agent.values())

    _, found = targets(data | {"agent": synthetic_agent(3, 100 * 1024, 1.5)})
    agent = {t.name.split(" with")[0].split(" of")[0]: t for t in found[5:]}
    assert not agent["restart catch-up"].met
    assert agent["restart catch-up"].margin == "missed by 3"
    rss = agent["agent RSS"]
    assert not rss.met
    assert "missed by 20 MiB" in rss.margin
    assert "kubernetes_asyncio +39.1 MiB" in rss.why  # the largest import is named
    assert not agent["agent drift pass over 1000 healthy pods: CPU"].met


def test_repair_targets_are_one_drift_period() -> None:
    data = synthetic(ours_rules_p99=0.8, cpu_s=0.5)
    agent = synthetic_agent(0, 80 * 1024, 0.4, synthetic_repair(2900.0, 2950.0))
    _, found = targets(data | {"agent": agent})
    repair = [t for t in found if t.name.startswith("agent repair after a manual flush")]
    assert [t.met for t in repair] == [True, True]
    assert repair[0].limit == "<= one drift period (3000 ms)"
    assert "max 2900 ms = 0.97 periods" in repair[0].measured

    agent = synthetic_agent(0, 80 * 1024, 0.4, synthetic_repair(3400.0, 3100.0))
    _, found = targets(data | {"agent": agent})
    pod, host = [t for t in found if t.name.startswith("agent repair after a manual flush")]
    assert not pod.met
    assert "missed by 400 ms" in pod.margin
    assert not host.met
    assert "a pass takes 500.0 ms here" in pod.why


def sizes_with(loaded: list[float], routing: list[float], check: list[float]) -> dict[str, Any]:
    def phase(p50: float) -> dict[str, Any]:
        return {"latency": {"p50_ms": p50}}

    return {
        str(n): {
            "install": {"ours_routing": phase(r), "ours_rules": phase(0.5)},
            "install_loaded": {"ours_full": phase(lo)},
            "ipv6_check_fresh_pod": {"enrolled": n, "latency": {"p50_ms": c}},
        }
        for n, lo, r, c in zip((1, 100, 1000), loaded, routing, check, strict=True)
    }


def test_growth_with_n_is_reported_with_its_cause() -> None:
    md = "\n".join(
        growth_markdown(sizes_with([0.61, 0.65, 0.94], [0.28, 0.3, 1.04], [0.04, 0.1, 0.8]))
    )
    assert "| ours_full with N enrolled | 0.610 | 0.650 | 0.940 | x1.54 |" in md
    assert "Install cost grows with N: ours_full with N enrolled, ours_routing" in md
    assert "The IPv6 check grows (0.040 -> 0.800 ms p50)." in md

    md = "\n".join(growth_markdown(sizes_with([0.61, 0.6, 0.62], [0.28, 0.28, 0.29], [0.04] * 3)))
    assert "No series grows by more than x1.2 from N = 1 to 1000." in md
    assert "grows with N" not in md


def test_fast_paths_say_whether_each_is_faster_than_its_fallback() -> None:
    def lat(p50: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": 2 * p50}

    fast = {
        "pods": 20,
        "tables_install_replay": lat(0.3),
        "tables_install_libnftables": lat(0.6),
        "tables_first_check_dump": lat(0.1),
        "tables_first_check_listing": lat(0.5),
    }
    md = "\n".join(fast_paths_markdown(fast))
    assert (
        "| a new pod's tables | batch replay | 0.300 / 0.600 | libnftables | 0.600 / 1.200 | 0.50 |"
        in md
    )
    assert "Each fast path is faster than its fallback in this run." in md

    md = "\n".join(fast_paths_markdown(fast | {"tables_first_check_dump": lat(0.7)}))
    assert "**Not faster than its fallback in this run: dump proof.**" in md
    assert fast_paths_markdown(None) == []


def test_add_targets_compare_the_whole_add_with_issue_10s_limits() -> None:
    def lat(p50: float, p99: float) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p99, "max_ms": p99, "count": 30}

    add = {
        "plugin": lat(4.0, 40.0),
        "plugin_not_in_mesh": lat(2.0, 5.0),
        "at_once": lat(150.0, 200.0),
        "at_once_count": 30,
        "plugin_binary_bytes": 2_000_000,
    }
    found = add_targets(add, 1000, mesh=True)
    assert [(t.limit, t.met) for t in found] == [
        ("<= 10 ms", True),
        ("<= 30 ms", False),
        ("<= 3 ms", True),
        ("<= 100 ms", False),
    ]
    assert all("plugin binary 2000000 bytes" in t.measured for t in found)
    # A burst over its limit says how much of it the node spends without the agent.
    burst = add_targets(add | {"at_once_not_in_mesh": lat(30.0, 50.0)}, 1000, mesh=True)[-1]
    assert "as many pods not in the mesh at once: p50 30.00 ms" in burst.measured
    assert burst.why.startswith("30.0 ms of the p50 is there for pods not in the mesh too")
    assert "the agent's work for mesh pods adds 120.0 ms" in burst.why
    assert found[-1].why == ""  # measured without that series: no explanation made up
    assert add_targets({"plugin": lat(1.0, 1.0)}, 1000, mesh=True) == []
    # At another N only the targets that hold at any N: a pod not in the mesh, a burst.
    assert [t.limit for t in add_targets(add, 100, mesh=False)] == ["<= 3 ms", "<= 100 ms"]


def synthetic_notification(nat_p99_ms: float) -> dict[str, Any]:
    def lat(p50: float, p99: float) -> dict[str, Any]:
        return {"p50_ms": p50, "p99_ms": p99, "count": 20, "event": {"p50_ms": p50 + 5}}

    storm = {
        "pods": 1000,
        "pods_repaired": 1000,
        "repairs": 1000,
        "first_flush_to_last_repair_ms": 4000.0,
        "fds_before": 2030,
        "fds_after": 2030,
        "rss_kib_before": 80000,
        "rss_kib_after": 80100,
    }
    return {
        "sizes": {
            "1000": {
                "pod_nat_flush": lat(12.0, nat_p99_ms),
                "pod_ip_rule_del": lat(1.0, 2.0),
                "host_postrouting_flush": lat(15.0, 20.0),
                "storm": storm,
                "fds": {"open": 2030, "without_pods": 30, "per_pod": 2.0},
            }
        },
        "config": {"backstop_period_s": 3600.0, "samples": 20, "host_samples": 5},
        "duration_s": 700.0,
    }


def test_notification_targets_are_issue_13s_limits() -> None:
    data = synthetic(ours_rules_p99=0.8, cpu_s=0.5)
    _, found = targets(data | {"repair": synthetic_notification(80.0)})
    ours = {t.name: t for t in found if "1000 pods" in t.name}
    assert len(ours) == 5
    assert ours["open fds per pod, 1000 pods"].measured == "2.0 (2030 open, 30 with no pod)"
    assert all(t.met for t in ours.values())

    _, found = targets(data | {"repair": synthetic_notification(120.0)})
    missed = sorted(t.name for t in found if not t.met and "1000" in t.name)
    assert missed == [
        "repair after `nft flush table` of a pod's nat table, 1000 pods, p50 / p99",
    ]
    md = "\n".join(notification_markdown(synthetic_notification(120.0)))
    assert "| 1000 | 12.0 / 120.0 (17.0) | 1.0 / 2.0 (6.0) | 15.0 / 20.0 (20.0) | 4000 |" in md
