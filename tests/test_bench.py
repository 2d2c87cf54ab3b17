"""The benchmark harness: quick mode end to end, its outputs, its cleanup, and its arithmetic."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.pods import BENCH_PREFIX, NETNS_DIR, unpin
from bench.report import targets
from bench.summary import Latency, percentile

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
    assert len(data["targets"]["results"]) == 5
    assert all(isinstance(t["met"], bool) for t in data["targets"]["results"])


@pytest.mark.kernel
def test_quick_run_writes_markdown_and_png(quick_run: tuple[Path, str]) -> None:
    out, log = quick_run
    md = (out / "latest.md").read_text()
    for heading in ("## N = 1\n", "## N = 20\n", "## Targets"):
        assert heading in md
    assert "| ours_rules |" in md
    assert "ours_rules / baseline_rules: p50" in md
    png = (out / "latest.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 10_000
    assert "install ours_full into 20 fresh pods" in log  # progress per phase


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
        return {"latency": {"p50_ms": p50, "p99_ms": p99}}

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
    assert not by_name["drift pass over 1000 healthy pods"].met
    assert "no profile" in by_name["rules-only install p99"].why
