"""The churn soak in its short mode (`SoakConfig.short`: 300 pods, every event of the scenario at
least once): the real agent leaves the node as it found it, and says nothing unexpected. The
timing ratios (RSS, ADD p99) are only reported here; `make soak` holds them over 10,000 pods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ztunnel_redirect.testing.soak import (
    LEAK_KEYS,
    PROVOKED,
    SoakConfig,
    config_of,
    parse_args,
    run_soak,
    warning_counts,
)

pytestmark = pytest.mark.kernel


@pytest.mark.timeout(240)
async def test_a_short_soak_leaves_nothing_of_its_pods_and_logs_only_what_it_provokes(
    tmp_path: Path,
) -> None:
    config = SoakConfig.short()
    report = await run_soak(config, tmp_path, report_to=print, with_plot=False)

    assert report.pods == config.pods and not report.stopped_early
    # Every event of the scenario happened (else a target would hold for want of a test).
    assert report.restarts >= 1
    for event in ("enroll", "unenroll", "sandbox_vanished", "watch_drop", "ztunnel_reconnect"):
        assert report.events[event] >= 1, event
    assert report.final["watch_restarts"] >= 1
    exact = {t["target"]: t for t in report.targets if t["exact"]}
    assert {f"{key} left (final - baseline)" for key in LEAK_KEYS} <= exact.keys()
    missed = [t for t in exact.values() if not t["met"]]
    assert missed == []
    # The node is empty: no pod, no record, no element, no netns of this run.
    assert report.final["live_pods"] == report.final["held_pod_records"] == 0
    assert report.final["host_set"] == report.final["ztunnel_workloads"] == 0
    assert report.final["netns"] == 0
    written = json.loads((tmp_path / "soak.json").read_text())
    assert written["pods"] == config.pods
    assert "| target |" in (tmp_path / "soak.md").read_text()


def test_warning_lines_are_counted_by_event_and_reason() -> None:
    events = [
        {"event": "work_failed", "level": "warning", "reason": "NetnsPendingError"},
        {"event": "work_failed", "level": "warning", "reason": "NetnsPendingError"},
        {"event": "pod_removed", "level": "info", "reason": "deleted"},
        {"event": "connection_handler_crashed", "level": "error"},
    ]
    assert warning_counts(events) == {
        "warning:work_failed/NetnsPendingError": 2,
        "error:connection_handler_crashed": 1,
    }
    assert "work_failed/NetnsPendingError" in PROVOKED
    assert "connection_handler_crashed" not in PROVOKED


def test_the_command_line_overrides_the_chosen_mode() -> None:
    assert config_of(parse_args([])) == SoakConfig()
    short = config_of(parse_args(["--short", "--pods", "120", "--restart-every", "60"]))
    assert (short.pods, short.restart_every) == (120, 60)
    assert short.checkpoint_every == SoakConfig.short().checkpoint_every
    with pytest.raises(ValueError, match="restart_every"):
        config_of(parse_args(["--restart-every", "10"]))
