"""The status annotation written behind the run: the caller never waits for the API, the last
value decided is the one written, and a failed write is retried unless a later value replaced it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from ztunnel_redirect.control.cniadd import SETTLE_S, PodStarts
from ztunnel_redirect.control.statuswrites import YIELD_LIMIT_S, QueuedStatusWriter
from ztunnel_redirect.control.workqueue import FakeClock
from ztunnel_redirect.core.errors import RetryableError
from ztunnel_redirect.core.model import Pod, PodUid

TIMEOUT = 10.0
POD = Pod(uid=PodUid("u1"), name="web-0", namespace="shop")


class GatedApi:
    """A `StatusWriter` whose writes wait for the test to open the gate; it may fail the next."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: list[tuple[str, str | None]] = []
        self.started = asyncio.Event()
        self.fail_next = False
        self._wrote = asyncio.Event()

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        self.started.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RetryableError("the API server answered 503")
        self.written.append((pod.uid, value))
        self._wrote.set()

    async def wait_written(self, count: int) -> None:
        """Until `count` writes succeeded (the writer has taken note of the last one, too: it
        does so in the same step, before the test runs again)."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.written) < count:
                self._wrote.clear()
                await self._wrote.wait()


@contextlib.asynccontextmanager
async def running(writer: QueuedStatusWriter) -> AsyncIterator[None]:
    task = asyncio.create_task(writer.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_caller_does_not_wait_for_the_api_and_the_write_follows() -> None:
    api = GatedApi()
    writer = QueuedStatusWriter(api)
    async with running(writer):
        async with asyncio.timeout(TIMEOUT):
            await writer.set_redirection_status(POD, "enabled")  # the gate is closed
        assert writer.pending == 1
        async with asyncio.timeout(TIMEOUT):
            await api.started.wait()
        api.gate.set()
        await api.wait_written(1)
        assert writer.pending == 0
    assert api.written == [("u1", "enabled")]


async def test_the_last_value_decided_wins_and_a_value_asked_during_a_write_follows_it() -> None:
    api = GatedApi()
    writer = QueuedStatusWriter(api)
    async with running(writer):
        await writer.set_redirection_status(POD, "pending")
        async with asyncio.timeout(TIMEOUT):
            await api.started.wait()  # "pending" is being written
        await writer.set_redirection_status(POD, "enabled")
        await writer.set_redirection_status(POD, None)  # the pod left the mesh meanwhile
        api.gate.set()
        await api.wait_written(2)
        assert writer.pending == 0
    assert api.written == [("u1", "pending"), ("u1", None)]


async def test_a_value_asked_again_while_it_is_written_is_written_once() -> None:
    # A check that runs before the informer shows our write asks for the same value again.
    api = GatedApi()
    writer = QueuedStatusWriter(api)
    async with running(writer):
        await writer.set_redirection_status(POD, "enabled")
        async with asyncio.timeout(TIMEOUT):
            await api.started.wait()  # being written
        await writer.set_redirection_status(POD, "enabled")
        api.gate.set()
        await api.wait_written(1)
        assert writer.pending == 0
        await writer.set_redirection_status(POD, "enabled")  # written: asked again, written again
        await api.wait_written(2)
    assert api.written == [("u1", "enabled"), ("u1", "enabled")]


async def test_a_failed_write_is_retried_after_its_backoff() -> None:
    api, clock = GatedApi(), FakeClock()
    failures: list[BaseException] = []
    writer = QueuedStatusWriter(
        api, clock=clock, on_failure=lambda _uid, exc, _n: failures.append(exc)
    )
    api.fail_next = True
    api.gate.set()
    async with running(writer):
        await writer.set_redirection_status(POD, "enabled")
        async with asyncio.timeout(TIMEOUT):
            await clock.wait_sleeping()  # the retry's backoff
        assert [str(f) for f in failures] == ["the API server answered 503"]
        assert api.written == [] and writer.pending == 1
        clock.advance(clock.sleeping[0])
        await api.wait_written(1)
        assert writer.pending == 0
    assert api.written == [("u1", "enabled")]


async def test_a_write_waits_for_pod_starts_to_pause() -> None:
    clock = FakeClock()
    api, starts = GatedApi(), PodStarts(clock=clock)
    api.gate.set()
    writer = QueuedStatusWriter(api, clock=clock, yield_to=starts.quiet)
    async with running(writer):
        with starts.answering():
            await writer.set_redirection_status(POD, "enabled")
            async with asyncio.timeout(TIMEOUT):
                await clock.wait_sleeping()  # the write waits (its limit is the sleep)
            with starts.answering():  # another ADD comes and goes: one is still answered
                pass
        async with asyncio.timeout(TIMEOUT):
            await clock.wait_sleeping(2)  # none is answered: for how long?
        assert sorted(clock.sleeping) == [SETTLE_S, YIELD_LIMIT_S]
        half = SETTLE_S / 2
        clock.advance(half)
        with starts.answering():  # the next of the burst: the pause counts from its end
            pass
        clock.advance(half)
        async with asyncio.timeout(TIMEOUT):
            await clock.wait_sleeping(2)
        assert sorted(clock.sleeping) == pytest.approx([half, YIELD_LIMIT_S - SETTLE_S])
        assert not api.started.is_set()
        clock.advance(half)  # pod starts paused
        await api.wait_written(1)
    assert api.written == [("u1", "enabled")]


async def test_a_write_waits_for_pod_starts_no_longer_than_its_limit() -> None:
    clock = FakeClock()
    api, starts = GatedApi(), PodStarts(clock=clock)
    api.gate.set()
    writer = QueuedStatusWriter(api, clock=clock, yield_to=starts.quiet)
    async with running(writer):
        with starts.answering():  # a node that starts pods without a pause
            await writer.set_redirection_status(POD, "enabled")
            async with asyncio.timeout(TIMEOUT):
                await clock.wait_sleeping()
            assert clock.sleeping == [YIELD_LIMIT_S] and api.written == []
            clock.advance(YIELD_LIMIT_S)
            await api.wait_written(1)
    assert api.written == [("u1", "enabled")]
