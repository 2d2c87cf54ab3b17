"""The CNI plugin's log socket: each line of a batch in the agent's log with the pod, bad input
refused with a 4xx that names the problem, the socket root-only and gone after close."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from ztunnel_redirect.adapters.cnilogs import MAX_MESSAGE, PluginLogServer


@pytest.fixture
async def server(run_dir: Path) -> AsyncIterator[PluginLogServer]:
    async with PluginLogServer(socket_path=str(run_dir / "log.sock"), max_body=4096) as srv:
        yield srv


def line(msg: str | None = "pod shop/web-0 handed to the agent", **fields: Any) -> str:
    entry = {
        "level": "info",
        "time": "2026-12-04T04:00:00.000001Z",
        "msg": msg,
        "pod_name": "web-0",
        "pod_namespace": "shop",
    }
    return json.dumps({**entry, **fields})


async def post(session: aiohttp.ClientSession, body: bytes | list[Any]) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post("http://agent/log", data=data) as resp:
        return resp.status, await resp.text()


def plugin_lines(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "cni_plugin_log"]


async def test_each_line_is_logged_at_its_level_with_the_pod(
    client: aiohttp.ClientSession,
) -> None:
    batch = [line(), line("agent unreachable", level="warn"), line("debugging", level="debug")]
    with capture_logs() as logs:
        status, _ = await post(client, batch)
    assert status == 200
    assert [(e["log_level"], e["message"]) for e in plugin_lines(logs)] == [
        ("info", "pod shop/web-0 handed to the agent"),
        ("warning", "agent unreachable"),
        ("debug", "debugging"),
    ]
    first = plugin_lines(logs)[0]
    assert first["source"] == "cni-plugin"
    assert first["pod"] == "shop/web-0"
    assert first["plugin_time"] == "2026-12-04T04:00:00.000001Z"


async def test_a_line_without_a_pod_is_logged_without_one(client: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        status, _ = await post(client, [line("not a Kubernetes pod", pod_name=None)])
    assert status == 200
    assert plugin_lines(logs)[0]["pod"] is None


async def test_istios_lines_without_pod_fields_are_accepted(client: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        status, _ = await post(client, [json.dumps({"level": "error", "msg": "  failed \n"})])
    assert status == 200
    assert [(e["log_level"], e["message"]) for e in plugin_lines(logs)] == [("error", "failed")]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b'{"level": "info", "msg": "x"}', "must be a JSON array"),
        (b"[1]", "line 0: each entry must be a string"),
        (json.dumps(["nope"]).encode(), "line 0: log line is not JSON"),
        (json.dumps(["[]"]).encode(), "line 0: log line must be a JSON object"),
        (json.dumps([line(level="fatal")]).encode(), "line 0: level must be one of"),
        (json.dumps([line(level=["info"])]).encode(), "line 0: level must be one of"),
        (json.dumps([line(msg=None)]).encode(), "line 0: msg must be a string"),
        (json.dumps([line(pod_name=7)]).encode(), "line 0: pod_name must be a string"),
        (json.dumps([line(pod_namespace="n" * 254)]).encode(), "pod_namespace must be a string"),
    ],
)
async def test_unusable_input_is_refused_with_400_naming_the_problem(
    client: aiohttp.ClientSession, body: bytes, reason: str
) -> None:
    with capture_logs() as logs:
        status, text = await post(client, body)
    assert status == 400
    assert reason in text
    assert plugin_lines(logs) == []
    assert any(e["event"] == "cni_plugin_log_rejected" for e in logs)


async def test_the_usable_lines_of_a_partly_bad_batch_are_still_logged(
    client: aiohttp.ClientSession,
) -> None:
    with capture_logs() as logs:
        status, text = await post(client, [line("first"), "garbage", line("third")])
    assert status == 400
    assert text.startswith("1 of 3: line 1:")
    assert [e["message"] for e in plugin_lines(logs)] == ["first", "third"]


async def test_an_oversized_body_is_refused_with_413(client: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        status, _ = await post(client, [line("x" * 5000)])
    assert status == 413
    assert plugin_lines(logs) == []


async def test_a_long_message_is_cut(run_dir: Path) -> None:
    async with (
        PluginLogServer(socket_path=str(run_dir / "big.sock"), max_body=64 * 1024) as srv,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=srv.socket_path)) as session,
    ):
        with capture_logs() as logs:
            status, _ = await post(session, [line("y" * (MAX_MESSAGE + 100))])
    assert status == 200
    assert plugin_lines(logs)[0]["message"] == "y" * MAX_MESSAGE + "…"


async def test_other_paths_and_methods_are_refused(client: aiohttp.ClientSession) -> None:
    async with client.post("http://agent/cmdadd", data=b"[]") as resp:
        assert resp.status == 404
    async with client.get("http://agent/log") as resp:
        assert resp.status == 405


async def test_socket_is_root_only_and_removed_on_close(run_dir: Path) -> None:
    path = run_dir / "log.sock"
    async with PluginLogServer(socket_path=str(path)):
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert not path.exists()
