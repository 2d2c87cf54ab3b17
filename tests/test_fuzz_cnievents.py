"""Fuzzing the CNI event socket: whatever a peer sends, the parser raises only its typed error,
the server answers every malformed request with a 4xx and a reason, and goes on serving."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import DEEP, documents_around
from ztunnel_redirect.adapters.cnievents import (
    CniAddEvent,
    CniEventServer,
    InvalidCniEventError,
    parse_add_event,
)

pytestmark = pytest.mark.fuzz

GOOD: dict[str, Any] = {
    "Netns": "/var/run/netns/cni-1234",
    "PodName": "web-0",
    "PodNamespace": "shop",
    "PodUID": "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80",
    "IPs": [{"Address": {"IP": "10.244.1.7"}}, {"Address": {"IP": "fd00::7"}}],
}
ALLOWED = ("/var/run/netns/", "/run/netns/", "/proc/")


@given(documents_around(GOOD))
def test_parser_answers_an_event_or_its_typed_error(body: bytes) -> None:
    try:
        event = parse_add_event(body)
    except InvalidCniEventError as exc:
        assert str(exc)  # a reason the plugin can show
        return
    assert event.netns.startswith(ALLOWED)
    assert event.pod_name and event.pod_namespace
    assert all(str(ipaddress.ip_address(ip)) == ip for ip in event.ips)


def test_deep_nesting_is_a_reason_not_a_crash() -> None:
    with pytest.raises(InvalidCniEventError, match="nested too deeply"):
        parse_add_event(b"[" * DEEP + b"]" * DEEP)


_METHODS = st.sampled_from(["POST", "GET", "PUT", "DELETE", "POST ", "P\x00ST", "FOO"])
_PATHS = st.sampled_from(["/cmdadd", "/", "/cmdadd/x", "//cmdadd", "/cmdadd?x=1", "*", "/%00"])
_HEADER_LINES = st.lists(
    st.sampled_from(
        [
            "Content-Type: application/json",
            "Content-Type: text/plain; charset=\x7f",
            "Content-Length: 99999999",
            "Content-Length: -1",
            "Content-Length: abc",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip",
            "Content-Encoding: gzip",
            "Expect: 100-continue",
            "Connection: keep-alive",
            "X-Long: " + "a" * 9000,
            "Bad Header Without Colon",
            ": empty-name",
        ]
    ),
    max_size=4,
)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An HTTP/1.1 request as bytes, from well-formed to garbage, and whether it is complete:
    its length is the one it declares and it asks to close, so the server must answer it."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=300)), False
    body = draw(documents_around(GOOD))
    headers = draw(_HEADER_LINES)
    lines = [f"{draw(_METHODS)} {draw(_PATHS)} HTTP/1.1", "Host: agent", *headers]
    complete = not headers
    if complete:
        lines += ["Connection: close", f"Content-Length: {len(body)}"]
    elif not any(line.startswith(("Content-Length", "Transfer-Encoding")) for line in lines):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body, complete


async def _exchange(path: str, request: bytes, *, half_close: bool) -> bytes:
    """Send `request`, then (with `half_close`) end our side, so that a request that wants more
    bytes than it has is answered instead of waited for; read until the server closes."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(request)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def _status(answer: bytes) -> int | None:
    """The status of an HTTP answer; None when the server closed without answering."""
    if not answer:
        return None
    first = answer.split(b"\r\n", 1)[0].split()
    assert first[0].startswith(b"HTTP/1."), answer[:100]
    return int(first[1])


async def _scenario(
    request: bytes, *, complete: bool = True
) -> tuple[int | None, bytes, list[CniAddEvent]]:
    events: list[CniAddEvent] = []

    async def on_add(event: CniAddEvent) -> None:
        events.append(event)

    with tempfile.TemporaryDirectory(prefix="zr-fuzz-") as tmp:
        path = str(Path(tmp) / "pluginevent.sock")
        async with CniEventServer(on_add, socket_path=path):
            answer = await _exchange(path, request, half_close=not complete)
            # The server goes on: a good event after the bad request is served.
            good = json.dumps(GOOD).encode()
            after = await _exchange(
                path,
                b"POST /cmdadd HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
                + f"Content-Length: {len(good)}\r\n\r\n".encode()
                + good,
                half_close=False,
            )
    assert _status(after) == 200, after[:200]
    return _status(answer), answer, events


@given(raw_requests())
def test_server_answers_every_request_with_a_4xx_and_a_reason_or_serves_it(
    request: tuple[bytes, bool],
) -> None:
    raw, complete = request
    status, answer, _ = asyncio.run(_scenario(raw, complete=complete))
    if status is None:
        # Only a request that is incomplete or not HTTP may be dropped without an answer
        # (we ended our side before it was whole).
        assert not complete
        return
    assert status == 200 or 400 <= status < 500, answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body.strip() or b"Content-Length: 0" not in head, answer[:300]


def test_server_answers_deep_nesting_with_400_and_the_reason() -> None:
    body = b"[" * DEEP + b"]" * DEEP
    request = (
        b"POST /cmdadd HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, answer, events = asyncio.run(_scenario(request))
    assert status == 400
    assert b"nested too deeply" in answer
    assert len(events) == 1  # only the good event that followed
