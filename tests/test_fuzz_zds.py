"""Fuzzing ZDS from the peer's side: whatever ztunnel (or anything on its socket) sends as its
hello or as an answer, the agent drops or serves that connection only, raises only its typed
errors to the caller, and goes on serving the other connections."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import deeply_nested
from ztunnel_redirect.adapters import zds_pb2
from ztunnel_redirect.adapters.zds import RequestKind, ZtunnelServer
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.core.model import Pod, PodUid
from ztunnel_redirect.testing.fakeztunnel import Behaviour, FakeZtunnel

pytestmark = pytest.mark.fuzz

SELF_NETNS = "/proc/self/ns/net"
WAIT = 5.0


def _pod(name: str) -> Pod:
    return Pod(uid=PodUid(f"uid-{name}"), name=name, namespace="apps")


def _messages() -> st.SearchStrategy[bytes]:
    """Bytes near ZDS messages: valid hellos and answers with fields changed, truncated or
    extended, unknown fields, deep nesting, and plain garbage."""
    valid = [
        zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString(),
        zds_pb2.WorkloadResponse(ack=zds_pb2.Ack()).SerializeToString(),
        zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error="no")).SerializeToString(),
    ]
    return st.one_of(
        st.sampled_from(valid),
        st.tuples(st.sampled_from(valid), st.binary(max_size=40)).map(lambda t: t[0] + t[1]),
        st.builds(
            lambda message, cut: message[:cut], st.sampled_from(valid), st.integers(0, 8)
        ).filter(bool),
        st.builds(
            lambda v: zds_pb2.ZdsHello(version=v).SerializeToString(), st.integers(0, 2**31 - 1)
        ).filter(bool),
        deeply_nested().map(lambda nested: b"\x0a" + nested[:200]),
        st.binary(min_size=1, max_size=1200),
    )


async def _until_served_or_closed(fake: FakeZtunnel) -> None:
    waits = [
        asyncio.ensure_future(fake.closed.wait()),
        asyncio.ensure_future(fake.snapshot_done.wait()),
    ]
    try:
        await asyncio.wait(waits, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    assert fake.closed.is_set() or fake.snapshot_done.is_set()


async def _served(server: ZtunnelServer, good: FakeZtunnel, name: str) -> None:
    """The server still hands pods over, and the good connection is still up."""
    async with asyncio.timeout(WAIT):
        await server.add_workload(_pod(name), SELF_NETNS)
    assert not good.closed.is_set()


@contextlib.asynccontextmanager
async def _server_and_peers(
    bad_hello: bytes | None = None,
) -> AsyncIterator[tuple[ZtunnelServer, FakeZtunnel, FakeZtunnel]]:
    """A server with a good peer connected and snapshotted, and a bad peer not yet started."""
    with tempfile.TemporaryDirectory(prefix="zr-fuzz-") as tmp:
        path = str(Path(tmp) / "ztunnel.sock")
        server = ZtunnelServer(path=path, snapshot=lambda: (), timeout=1.0)
        await server.start()
        good = FakeZtunnel(path)
        bad = FakeZtunnel(path, hello=bad_hello)
        try:
            await good.start()
            async with asyncio.timeout(WAIT):
                await good.snapshot_done.wait()
            yield server, good, bad
        finally:
            await bad.close()
            await good.close()
            await server.close()


async def _hello_scenario(hello: bytes) -> None:
    async with _server_and_peers(hello) as (server, good, bad):
        await bad.start()
        await _until_served_or_closed(bad)
        await _served(server, good, "after")


@given(_messages())
def test_any_hello_drops_or_serves_only_that_connection(hello: bytes) -> None:
    asyncio.run(_hello_scenario(hello))


async def _answer_scenario(answer: bytes) -> None:
    async with _server_and_peers() as (server, good, bad):
        await bad.start()
        async with asyncio.timeout(WAIT):
            await bad.snapshot_done.wait()
        bad.behaviour = Behaviour(reply=answer)
        try:
            async with asyncio.timeout(WAIT):
                await server.add_workload(_pod("p"), SELF_NETNS)  # to the newest: bad
        except RedirectError:
            pass  # a nack, or the connection dropped: both typed
        assert [r.kind for r in bad.requests][-1] is RequestKind.ADD
        # Whether the bad peer's connection survived (its answer was an ack or a nack) or
        # not, the next pod is handed over: to it, now well-behaved, or to the good one.
        bad.behaviour = Behaviour()
        await _served(server, good, "after")


@given(_messages())
def test_any_answer_is_an_ack_a_nack_or_a_dropped_connection(answer: bytes) -> None:
    asyncio.run(_answer_scenario(answer))
