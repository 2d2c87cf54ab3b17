"""Logging set-up: structured lines with context, levels, exceptions, and stdlib routing."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ztunnel_redirect.adapters import logs
from ztunnel_redirect.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        logs.reset()
        root.setLevel(level)


def fail(exc: Exception) -> None:
    raise exc


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_timestamp_level_event_and_fields() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    structlog.get_logger("t").info("ruleset_applied", table="istio-ambient-nat", duration_ms=0.3)
    [line] = lines(out)
    assert line["event"] == "ruleset_applied"
    assert line["level"] == "info"
    assert line["table"] == "istio-ambient-nat"
    assert line["duration_ms"] == 0.3
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


async def test_bound_context_tags_every_line_of_a_task_only() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    log = structlog.get_logger("t")
    both_enrolled = asyncio.Barrier(2)

    async def worker(pod: str, uid: str) -> None:
        with structlog.contextvars.bound_contextvars(pod=pod, pod_uid=uid):
            log.info("pod_enrolled")
            await both_enrolled.wait()  # the other worker logs in between
            log.info("annotation_patched")

    await asyncio.gather(worker("shop/web-0", "u-1"), worker("shop/web-1", "u-2"))
    log.info("pass_finished")
    got = lines(out)
    assert sorted((x["pod"], x["pod_uid"], x["event"]) for x in got[:4]) == [
        ("shop/web-0", "u-1", "annotation_patched"),
        ("shop/web-0", "u-1", "pod_enrolled"),
        ("shop/web-1", "u-2", "annotation_patched"),
        ("shop/web-1", "u-2", "pod_enrolled"),
    ]
    assert "pod" not in got[4]
    assert "pod_uid" not in got[4]


def test_exceptions_are_rendered() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    try:
        fail(ValueError("bad netns"))
    except ValueError:
        structlog.get_logger("t").exception("pod_failed", pod_uid="u-1")
    [line] = lines(out)
    assert line["level"] == "error"
    assert "ValueError: bad netns" in line["exception"]
    assert "Traceback" in line["exception"]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["d", "i", "w", "e"]),
        ("info", ["i", "w", "e"]),
        ("WARNING", ["w", "e"]),
        ("error", ["e"]),
    ],
)
def test_level_filters_our_events(level: str, expected: list[str]) -> None:
    out = io.StringIO()
    logs.configure(level=level, stream=out)
    log = structlog.get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [x["event"] for x in lines(out)] == expected


def test_stdlib_logging_goes_to_the_same_stream_at_warning() -> None:
    out = io.StringIO()
    logs.configure(level="debug", stream=out)
    with structlog.contextvars.bound_contextvars(pod_uid="u-9"):
        logging.getLogger("aiohttp.access").info("GET /readyz 200")
        logging.getLogger("kubernetes_asyncio.client").debug("request")
        logging.getLogger("aiohttp.server").warning("closing %s", "conn")
    structlog.get_logger("t").debug("ours")
    got = lines(out)
    assert [x["event"] for x in got] == ["closing conn", "ours"]
    assert got[0]["logger"] == "aiohttp.server"
    assert got[0]["level"] == "warning"
    assert got[0]["pod_uid"] == "u-9"
    datetime.fromisoformat(got[0]["timestamp"])


def test_stdlib_follows_a_stricter_level() -> None:
    out = io.StringIO()
    logs.configure(level="error", stream=out)
    logging.getLogger("aiohttp.server").warning("dropped")
    logging.getLogger("aiohttp.server").error("kept")
    assert [x["event"] for x in lines(out)] == ["kept"]


def test_stdlib_exceptions_are_rendered() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    try:
        fail(OSError("reset by peer"))
    except OSError:
        logging.getLogger("aiohttp.client").exception("request failed")
    [line] = lines(out)
    assert "OSError: reset by peer" in line["exception"]


def test_console_format_is_text_with_the_fields() -> None:
    out = io.StringIO()
    logs.configure(fmt="console", stream=out)
    structlog.get_logger("t").info("drift_repaired", reason="missing_rule")
    logging.getLogger("aiohttp.server").warning("slow client")
    text = out.getvalue()
    first, second = text.splitlines()
    assert "drift_repaired" in first
    assert "reason=missing_rule" in first
    assert "info" in first
    assert "slow client" in second
    assert "aiohttp.server" in second
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_reconfiguring_does_not_duplicate_stdlib_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure(stream=first)
    logs.configure(stream=second)
    logging.getLogger("aiohttp.server").warning("once")
    assert first.getvalue() == ""
    assert [x["event"] for x in lines(second)] == ["once"]


def test_foreign_root_handlers_are_left_alone() -> None:
    other = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(other)
    try:
        logs.configure(stream=io.StringIO())
        logs.reset()
        assert other in root.handlers
    finally:
        root.removeHandler(other)


def test_capture_logs_still_works_after_configure() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    log = structlog.get_logger("t")
    log.info("before")
    with capture_logs() as captured:
        log.info("host_rules_applied", table="istio-ambient-nat")
    assert captured == [
        {"event": "host_rules_applied", "table": "istio-ambient-nat", "log_level": "info"}
    ]


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure()
    structlog.get_logger("t").warning("to_stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err.strip())["event"] == "to_stderr"


@pytest.mark.parametrize(
    ("kwargs", "mentions"), [({"fmt": "xml"}, "format"), ({"level": "x"}, "level")]
)
def test_unknown_format_or_level_is_a_config_error(kwargs: dict[str, str], mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        logs.configure(stream=io.StringIO(), **kwargs)
