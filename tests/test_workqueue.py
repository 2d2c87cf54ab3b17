"""The keyed work queue and the periodic runner, driven by a fake clock: nothing here sleeps.

Tests wait on events under a timeout; virtual time only moves when a test calls `advance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import pytest
import structlog

from ztunnel_redirect.control.workqueue import Backoff, FakeClock, KeyedQueue, Periodic
from ztunnel_redirect.core.errors import ConfigError, RetryableError

TIMEOUT = 5.0
NO_JITTER = Backoff(initial=1.0, maximum=4.0, factor=2.0, jitter=0.0)


class Runner(Protocol):
    async def run(self) -> None: ...


@contextlib.asynccontextmanager
async def running(runner: Runner) -> AsyncIterator[asyncio.Task[None]]:
    """Run `runner.run()` as a task for the body; cancel and reap it afterwards, also on failure.
    An unexpected exception from the runner fails the test."""
    task = asyncio.create_task(runner.run(), name="test-runner")
    try:
        yield task
    finally:
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(outcome, asyncio.CancelledError | None):
            raise outcome


async def within(awaitable: Awaitable[object]) -> None:
    async with asyncio.timeout(TIMEOUT):
        await awaitable


class FixedRandom(random.Random):
    """An rng whose `random()` returns the given values in turn (the last one forever)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self._values = list(values)

    def random(self) -> float:
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


@dataclass
class Watched:
    """A condition variable for tests: `changed()` after each update, `until(predicate)` waits."""

    _waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = field(default_factory=list)

    def changed(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]

    async def until(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        await within(future)


class Boom(RetryableError):
    pass


@dataclass
class Handler(Watched):
    """Records calls; keys in `gates` wait for their gate; keys in `failing` raise Boom (as many
    times as the count says, or forever for None). Records overlapping runs of one key."""

    calls: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failing: dict[str, int | None] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    cancelled: list[str] = field(default_factory=list)
    contexts: list[dict[str, object]] = field(default_factory=list)

    async def __call__(self, key: str) -> None:
        if key in self.in_flight:
            self.overlaps.append(key)
        self.in_flight.add(key)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.calls.append(key)
        self.contexts.append(structlog.contextvars.get_contextvars())
        self.changed()
        try:
            gate = self.gates.get(key)
            if gate is not None:
                await gate.wait()
            if key in self.failing:
                left = self.failing[key]
                if left is not None:
                    if left <= 1:
                        del self.failing[key]
                    else:
                        self.failing[key] = left - 1
                raise Boom(f"{key} failed")
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.in_flight.discard(key)
            self.active -= 1
            self.finished.append(key)
            self.changed()

    def count(self, key: str) -> int:
        return self.calls.count(key)


@dataclass
class Failures(Watched):
    seen: list[tuple[str, BaseException, int]] = field(default_factory=list)

    def __call__(self, key: str, exc: BaseException, attempts: int) -> None:
        self.seen.append((key, exc, attempts))
        self.changed()


def make_queue(
    handler: Handler,
    *,
    clock: FakeClock | None = None,
    failures: Failures | None = None,
    concurrency: int = 1,
    backoff: Backoff = NO_JITTER,
    **kwargs: object,
) -> KeyedQueue[str]:
    return KeyedQueue[str](
        handler=handler,
        concurrency=concurrency,
        backoff=backoff,
        clock=clock or FakeClock(),
        on_failure=failures,
        name="test",
        **kwargs,  # type: ignore[arg-type]
    )


def gated(handler: Handler, keys: Iterable[str]) -> dict[str, asyncio.Event]:
    for key in keys:
        handler.gates[key] = asyncio.Event()
    return handler.gates


# --- Backoff -------------------------------------------------------------------------------------


def test_backoff_grows_by_factor_up_to_the_cap() -> None:
    rng = random.Random(1)  # noqa: S311 - seeded jitter samples
    assert [NO_JITTER.delay(n, rng) for n in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert NO_JITTER.delay(10_000, rng) == 4.0


def test_backoff_jitter_only_shortens_within_its_fraction() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.25)
    assert backoff.delay(3, FixedRandom(0.0)) == 8.0
    assert backoff.delay(3, FixedRandom(1.0)) == 6.0
    rng = random.Random(7)  # noqa: S311 - seeded jitter samples
    delays = [backoff.delay(1, rng) for _ in range(500)]
    assert all(1.5 <= d <= 2.0 for d in delays)
    assert min(delays) < 1.6 and max(delays) > 1.9  # jitter is actually applied


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0.0}, {"initial": 2.0, "maximum": 1.0}, {"factor": 0.5}, {"jitter": 1.5}],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Backoff(**kwargs)


def test_queue_needs_a_worker() -> None:
    with pytest.raises(ConfigError):
        make_queue(Handler(), concurrency=0)


# --- FakeClock -----------------------------------------------------------------------------------


async def test_fake_clock_wakes_sleepers_in_deadline_order_and_forgets_cancelled_ones() -> None:
    clock = FakeClock(start=100.0)
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(clock.now())

    tasks = [asyncio.create_task(sleeper(s)) for s in (3.0, 1.0, 2.0)]
    try:
        await within(clock.wait_sleeping(3))
        assert clock.sleeping == [1.0, 2.0, 3.0]
        clock.advance(2.0)
        await within(asyncio.gather(*tasks[1:]))
        assert woke == [102.0, 102.0]
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        assert clock.sleeping == []
        with pytest.raises(ValueError, match="backwards"):
            clock.advance(-1.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- KeyedQueue: coalescing, order, parallelism ---------------------------------------------------


async def test_queued_key_is_coalesced() -> None:
    handler = Handler()
    queue = make_queue(handler)
    for key in ("a", "a", "b", "a", "b"):
        queue.enqueue(key)
    assert len(queue) == 2
    async with running(queue):
        await within(queue.wait_idle())
    assert handler.calls == ["a", "b"]
    assert len(queue) == 0


async def test_key_enqueued_while_running_is_handled_once_more_with_the_latest_state() -> None:
    state = {"a": 1}
    seen: list[int] = []
    handler = Handler()
    gate = gated(handler, ["a"])["a"]

    async def reconcile(key: str) -> None:
        seen.append(state[key])
        await handler(key)

    queue = KeyedQueue[str](handler=reconcile, concurrency=4, clock=FakeClock())
    queue.enqueue("a")
    async with running(queue):
        await handler.until(lambda: handler.count("a") == 1)
        for version in (2, 3, 4):
            state["a"] = version
            queue.enqueue("a")
        assert queue.running == {"a"}
        assert len(queue) == 0  # marked dirty, not queued next to itself
        gate.set()
        await within(queue.wait_idle())
    assert seen == [1, 4]
    assert handler.overlaps == []


async def test_runs_of_one_key_never_overlap_and_see_versions_in_order() -> None:
    state: Counter[str] = Counter()
    seen: dict[str, list[int]] = {"a": [], "b": []}
    handler = Handler()

    async def reconcile(key: str) -> None:
        seen[key].append(state[key])
        await handler(key)
        for _ in range(3):  # stay "running" across a few enqueues (interleaving, not proof)
            await asyncio.sleep(0)

    queue = KeyedQueue[str](handler=reconcile, concurrency=4, clock=FakeClock())
    async with running(queue):
        for i in range(60):
            key = "ab"[i % 2]
            state[key] += 1
            queue.enqueue(key)
            await asyncio.sleep(0)
        await within(queue.wait_idle())
    assert handler.overlaps == []
    for key in ("a", "b"):
        assert seen[key] == sorted(set(seen[key]))  # strictly increasing: in order, no repeats
        assert seen[key][-1] == state[key]  # the latest state was reconciled
        assert len(seen[key]) < state[key]  # and events were coalesced


async def test_different_keys_run_in_parallel_up_to_concurrency() -> None:
    handler = Handler()
    keys = [f"k{i}" for i in range(10)]
    gates = gated(handler, keys)
    queue = make_queue(handler, concurrency=3)
    for key in keys:
        queue.enqueue(key)
    async with running(queue):
        await handler.until(lambda: handler.active == 3)
        assert queue.running == set(keys[:3])
        assert len(queue) == 7
        for key in keys:  # release one at a time; the next key takes the free slot
            gates[key].set()
            await handler.until(lambda key=key: key in handler.finished)  # type: ignore[misc]
        await within(queue.wait_idle())
    assert sorted(handler.calls) == sorted(keys)
    assert handler.max_active == 3


# --- KeyedQueue: failures and backoff -------------------------------------------------------------


async def test_failing_key_is_retried_with_growing_capped_backoff() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    failures = Failures()
    queue = make_queue(handler, clock=clock, failures=failures)
    queue.enqueue("a")
    async with running(queue):
        for attempt, delay in enumerate([1.0, 2.0, 4.0, 4.0], start=1):
            await failures.until(lambda n=attempt: len(failures.seen) == n)  # type: ignore[misc]
            key, exc, attempts = failures.seen[-1]
            assert (key, attempts) == ("a", attempt)
            assert isinstance(exc, Boom)
            assert queue.attempts("a") == attempt
            assert queue.retrying == {"a"}
            await within(clock.wait_sleeping())
            assert clock.sleeping == [delay]
            clock.advance(delay / 2)  # not yet
            assert clock.sleeping == [delay / 2]
            assert handler.count("a") == attempt
            clock.advance(delay / 2)
            await handler.until(lambda n=attempt: handler.count("a") == n + 1)  # type: ignore[misc]


async def test_retry_delay_is_jittered_from_the_injected_rng() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    backoff = Backoff(initial=2.0, maximum=10.0, factor=2.0, jitter=0.5)
    queue = make_queue(handler, clock=clock, backoff=backoff, rng=FixedRandom(1.0))
    queue.enqueue("a")
    async with running(queue):
        await within(clock.wait_sleeping())
        assert clock.sleeping == [1.0]


async def test_success_resets_the_attempt_count() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": 2})
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    async with running(queue):
        for delay in (1.0, 2.0):
            await within(clock.wait_sleeping())
            assert clock.sleeping == [delay]
            clock.advance(delay)
        await within(queue.wait_idle())
        assert handler.count("a") == 3
        assert queue.attempts("a") == 0
        assert queue.retrying == frozenset()

        handler.failing["a"] = 1
        queue.enqueue("a")
        await within(clock.wait_sleeping())
        assert clock.sleeping == [1.0]  # starts over from the initial delay
        assert queue.attempts("a") == 1


async def test_a_failing_key_does_not_stop_other_keys_or_the_worker() -> None:
    clock = FakeClock()
    handler = Handler(failing={"bad": None})
    queue = make_queue(handler, clock=clock, concurrency=1)
    for key in ("bad", "b", "c"):
        queue.enqueue(key)
    async with running(queue) as task:
        await handler.until(lambda: {"b", "c"} <= set(handler.finished))
        queue.enqueue("d")  # the single worker is still alive
        await handler.until(lambda: "d" in handler.finished)
        assert queue.retrying == {"bad"}
        assert not task.done()
    assert handler.calls == ["bad", "b", "c", "d"]


async def test_a_failing_failure_hook_does_not_kill_the_worker() -> None:
    def hook(key: str, exc: BaseException, attempts: int) -> None:
        raise RuntimeError("metrics broke")

    handler = Handler(failing={"a": 1})
    queue = KeyedQueue[str](handler=handler, concurrency=1, clock=FakeClock(), on_failure=hook)
    queue.enqueue("a")
    queue.enqueue("b")
    async with running(queue):
        await handler.until(lambda: "b" in handler.finished)
        assert queue.retrying == {"a"}
        assert queue.attempts("a") == 1


async def test_plain_enqueue_does_not_bypass_the_backoff_but_now_does() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    async with running(queue):
        await within(clock.wait_sleeping())
        queue.enqueue("a")  # e.g. the periodic resync
        assert queue.retrying == {"a"}
        assert len(queue) == 0
        queue.enqueue("b")  # one worker: an "a" queued by mistake would run before b
        await handler.until(lambda: "b" in handler.finished)
        assert handler.count("a") == 1

        queue.enqueue("a", now=True)  # a real change
        await handler.until(lambda: handler.count("a") == 2)
        await within(clock.wait_sleeping())
        assert queue.attempts("a") == 2  # still failing: the count goes on
        assert clock.sleeping == [2.0]  # and the backoff grows; the cut retry is gone


async def test_change_during_a_failing_run_is_handled_at_once_a_plain_enqueue_waits() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None, "b": None})
    gates = gated(handler, ["a", "b"])
    queue = make_queue(handler, clock=clock, concurrency=2)
    queue.enqueue("a")
    queue.enqueue("b")
    async with running(queue):
        await handler.until(lambda: handler.active == 2)
        queue.enqueue("a", now=True)
        queue.enqueue("b")
        gates["b"].set()
        await within(clock.wait_sleeping())
        assert queue.retrying == {"b"}
        handler.gates.pop("a").set()  # the second run of a must not wait
        await handler.until(lambda: handler.count("a") == 2)  # no time has passed
        assert clock.now() == 0.0
        assert handler.count("b") == 1


async def test_not_retryable_failure_drops_the_key() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    failures = Failures()
    queue = make_queue(
        handler,
        clock=clock,
        failures=failures,
        retryable=lambda exc: not isinstance(exc, Boom),
    )
    queue.enqueue("a")
    async with running(queue):
        await within(queue.wait_idle())
    assert [(k, n) for k, _, n in failures.seen] == [("a", 1)]
    assert queue.retrying == frozenset()
    assert queue.attempts("a") == 0
    assert clock.sleeping == []


# --- KeyedQueue: wait_idle, forget ----------------------------------------------------------------


async def test_wait_idle_waits_for_running_and_retrying_keys() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": 1})
    gate = gated(handler, ["a"])["a"]
    queue = make_queue(handler, clock=clock)
    await within(queue.wait_idle())  # nothing to do yet
    queue.enqueue("a")
    async with running(queue):
        idle = asyncio.create_task(queue.wait_idle(), name="test-wait-idle")
        try:
            await handler.until(lambda: handler.count("a") == 1)
            assert not queue.idle  # running: what wait_idle waits on is not there
            assert not idle.done()
            gate.set()
            await within(clock.wait_sleeping())  # the run has ended and its retry is asleep
            assert not queue.idle  # waiting for its retry
            assert not idle.done()
            clock.advance(1.0)
            await within(idle)
            assert handler.count("a") == 2
        finally:
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)


async def test_forget_drops_the_retry_and_the_attempt_count() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    async with running(queue):
        await within(clock.wait_sleeping())
        assert queue.attempts("a") == 1
        queue.forget("a")
        assert queue.retrying == frozenset()
        assert queue.attempts("a") == 0
        await within(queue.wait_idle())
        await within(clock.wait_awake())  # the retry's timer is gone, not just ignored
        clock.advance(100.0)  # a retry that was not really dropped would fire now...
        queue.enqueue("b")  # ...and be handled before b, with one worker
        await handler.until(lambda: "b" in handler.finished)
        await within(queue.wait_idle())
    assert handler.calls == ["a", "b"]
    assert clock.sleeping == []


async def test_keys_held_return_to_zero_once_work_succeeds_or_is_forgotten() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None, "b": 1})
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    queue.enqueue("b")
    assert queue.keys_held == 2
    async with running(queue):
        await handler.until(lambda: handler.count("b") == 1)
        await within(clock.wait_sleeping(2))  # both failed once, both wait for a retry
        assert queue.keys_held == 2
        clock.advance(1.0)  # b succeeds on its retry; a fails again
        await handler.until(lambda: "b" in handler.finished)
        await within(clock.wait_sleeping(1))
        assert queue.keys_held == 1  # a: its retry and its attempt count
        queue.forget("a")
        await within(queue.wait_idle())
    assert queue.keys_held == 0


# --- KeyedQueue: handle_once (a pass) -------------------------------------------------------------


async def test_a_pass_ends_after_one_run_of_each_key_and_reports_the_failed_ones() -> None:
    clock = FakeClock()
    handler = Handler(failing={"b": None})
    queue = make_queue(handler, clock=clock, concurrency=2)
    async with running(queue):
        failed = await asyncio.wait_for(queue.handle_once(["a", "b", "a"]), TIMEOUT)
        assert failed == {"b"}
        assert sorted(handler.calls) == ["a", "b"]
        assert queue.retrying == {"b"}  # its backoff goes on after the pass

        # b is in its backoff: the next pass does not wait for it, nor run it early.
        failed = await asyncio.wait_for(queue.handle_once(["a", "b"]), TIMEOUT)
        assert failed == {"b"}
        assert handler.count("b") == 1
        assert handler.count("a") == 2
    assert clock.now() == 0.0  # no backoff was waited out


async def test_a_pass_over_a_running_key_waits_for_a_run_that_starts_after_it() -> None:
    handler = Handler()
    gate = gated(handler, ["a"])["a"]
    queue = make_queue(handler)
    queue.enqueue("a")
    async with running(queue):
        await handler.until(lambda: handler.count("a") == 1)
        done = asyncio.create_task(queue.handle_once(["a"]), name="test-pass")
        try:
            gate.set()  # the run that started before the pass ends...
            await handler.until(lambda: handler.count("a") == 2)
            assert await asyncio.wait_for(done, TIMEOUT) == frozenset()
        finally:
            done.cancel()
            await asyncio.gather(done, return_exceptions=True)
    assert handler.finished == ["a", "a"]  # ...and the pass ended only after the second one


async def test_a_pass_over_a_running_key_that_fails_ends_when_its_retry_is_scheduled() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    gate = gated(handler, ["a"])["a"]
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    async with running(queue):
        await handler.until(lambda: handler.count("a") == 1)
        done = asyncio.create_task(queue.handle_once(["a"]), name="test-pass")
        try:
            gate.set()  # fails; the pass's plain enqueue waits for the backoff like any other
            assert await asyncio.wait_for(done, TIMEOUT) == {"a"}
        finally:
            done.cancel()
            await asyncio.gather(done, return_exceptions=True)
        assert queue.retrying == {"a"}
        assert handler.count("a") == 1


async def test_a_cancelled_pass_leaves_the_queue_working() -> None:
    handler = Handler()
    queue = make_queue(handler)
    waiting = asyncio.create_task(queue.handle_once(["a"]), name="test-pass")
    await asyncio.sleep(0)  # interleaving: the pass starts, enqueues its key and waits for it
    assert len(queue) == 1  # the workers are not running: nothing is handled
    assert not waiting.done()
    waiting.cancel()  # as a timeout does
    await asyncio.gather(waiting, return_exceptions=True)
    async with running(queue):  # the key is still queued, and a new pass works
        assert await asyncio.wait_for(queue.handle_once(["a"]), TIMEOUT) == frozenset()
    assert handler.calls == ["a"]


# --- KeyedQueue: handle_now (someone waits for one key) -----------------------------------------


async def test_handle_now_returns_the_outcome_of_the_run_and_the_failure_is_retried() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": 1})
    failures = Failures()
    queue = make_queue(handler, clock=clock, failures=failures)
    async with running(queue):
        with pytest.raises(Boom, match="a failed"):
            await within(queue.handle_now("a"))
        assert queue.retrying == {"a"}  # an ordinary run: counted, and retried with backoff
        assert [k for k, _, _ in failures.seen] == ["a"]
        await within(queue.handle_now("a"))  # cuts the backoff short, and succeeds
    assert handler.calls == ["a", "a"]
    assert clock.now() == 0.0


async def test_handle_now_goes_first_in_line() -> None:
    handler = Handler()
    gate = gated(handler, ["busy"])["busy"]
    queue = make_queue(handler)
    queue.enqueue("busy")
    async with running(queue):
        await handler.until(lambda: handler.count("busy") == 1)
        for key in ("b", "c"):
            queue.enqueue(key)
        # The task's first step (it moves "c" to the front) runs before the worker wakes up
        # from the gate: the event loop runs callbacks in the order they were scheduled.
        now = asyncio.create_task(queue.handle_now("c"), name="test-now")
        gate.set()
        await within(now)
        await within(queue.wait_idle())
    assert handler.calls == ["busy", "c", "b"]


async def test_keys_waited_for_run_in_the_order_asked_ahead_of_the_others() -> None:
    # A burst of CNI ADDs: each is served in its turn, none behind all those that came after it.
    handler = Handler()
    gate = gated(handler, ["busy"])["busy"]
    queue = make_queue(handler)
    queue.enqueue("busy")
    async with running(queue):
        await handler.until(lambda: handler.count("busy") == 1)
        for key in ("b", "c"):
            queue.enqueue(key)
        asked = [
            asyncio.create_task(queue.handle_now(key), name=f"test-now-{key}")
            for key in ("x", "c", "y", "x")  # c was queued; x is asked for twice
        ]
        gate.set()
        await within(asyncio.gather(*asked))
        await within(queue.wait_idle())
    assert handler.calls == ["busy", "x", "c", "y", "b"]


async def test_handle_now_on_a_running_key_waits_for_a_run_that_starts_after_it() -> None:
    state = {"a": 1}
    seen: list[int] = []
    handler = Handler()
    gate = gated(handler, ["a"])["a"]

    async def reconcile(key: str) -> None:
        seen.append(state[key])
        await handler(key)

    queue = KeyedQueue[str](handler=reconcile, concurrency=2, clock=FakeClock())
    queue.enqueue("a")
    async with running(queue):
        await handler.until(lambda: handler.count("a") == 1)
        state["a"] = 2  # e.g. a CNI ADD recorded a new sandbox
        now = asyncio.create_task(queue.handle_now("a"), name="test-now")
        gate.set()
        await within(now)
    assert seen == [1, 2]  # the caller's run saw its change
    assert handler.overlaps == []


# --- KeyedQueue: cancellation and context ---------------------------------------------------------


async def test_cancelling_run_cancels_the_handler_and_requeues_its_key() -> None:
    handler = Handler()
    gate = gated(handler, ["a"])["a"]
    queue = make_queue(handler, clock=FakeClock())
    queue.enqueue("a")
    queue.enqueue("b")
    task = asyncio.create_task(queue.run(), name="test-run")
    try:
        await handler.until(lambda: handler.count("a") == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        assert task.cancelled()
        assert handler.cancelled == ["a"]
        assert len(queue) == 2  # a goes back first in line, b still waits
        assert queue.running == frozenset()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    gate.set()
    async with running(queue):  # a later run picks up where the last one stopped
        await within(queue.wait_idle())
    assert handler.calls == ["a", "a", "b"]


async def test_cancelling_run_cancels_scheduled_retries() -> None:
    clock = FakeClock()
    handler = Handler(failing={"a": None})
    queue = make_queue(handler, clock=clock)
    queue.enqueue("a")
    async with running(queue):
        await within(clock.wait_sleeping())
    assert clock.sleeping == []  # no retry task left behind
    assert queue.retrying == frozenset()
    assert len(queue) == 1


async def test_cancelled_error_from_a_handler_is_not_swallowed() -> None:
    async def handler(key: str) -> None:
        raise asyncio.CancelledError

    queue = KeyedQueue[str](handler=handler, concurrency=2, clock=FakeClock())
    queue.enqueue("a")
    task = asyncio.create_task(queue.run(), name="test-run")
    try:
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        assert queue.retrying == frozenset()
        assert queue.attempts("a") == 0  # not counted as an ordinary failure
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_run_twice_at_once_is_refused() -> None:
    queue = make_queue(Handler())
    async with running(queue):
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already running"):
            await queue.run()


async def test_handler_logs_carry_the_key() -> None:
    handler = Handler(failing={"a": 1})
    queue = make_queue(handler, log_key="pod_uid", clock=FakeClock())
    queue.enqueue("a")
    with structlog.testing.capture_logs() as logs:
        async with running(queue):
            await handler.until(lambda: "a" in handler.finished)
    assert handler.contexts == [{"pod_uid": "a"}]
    assert structlog.contextvars.get_contextvars() == {}
    (failed,) = [e for e in logs if e["event"] == "work_failed"]
    assert failed["key"] == "a"
    assert failed["attempt"] == 1
    assert failed["reason"] == "Boom"
    assert failed["log_level"] == "warning"


# --- Periodic ------------------------------------------------------------------------------------


@dataclass
class Ticks(Watched):
    count: int = 0
    fail: bool = False
    gate: asyncio.Event | None = None
    started: int = 0
    cancelled: bool = False

    async def __call__(self) -> None:
        self.started += 1
        self.changed()
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.count += 1
        self.changed()
        if self.fail:
            raise Boom("tick failed")


def make_periodic(ticks: Ticks, clock: FakeClock, *values: float, **kwargs: object) -> Periodic:
    return Periodic(
        tick=ticks,
        period=10.0,
        jitter=0.1,
        clock=clock,
        rng=FixedRandom(*(values or (0.0,))),
        name="test-periodic",
        **kwargs,  # type: ignore[arg-type]
    )


async def test_periodic_first_tick_comes_after_one_period_then_every_period() -> None:
    clock = FakeClock()
    ticks = Ticks()
    periodic = make_periodic(ticks, clock)
    async with running(periodic):
        for n in (1, 2, 3):
            await within(clock.wait_sleeping())
            assert clock.sleeping == [10.0]
            clock.advance(5.0)
            assert clock.sleeping == [5.0]  # still asleep: the tick cannot have come
            assert ticks.count == n - 1
            clock.advance(5.0)
            await ticks.until(lambda n=n: ticks.count == n)  # type: ignore[misc]
    assert periodic.ticks == 3
    assert periodic.last_success == 30.0


async def test_periodic_counts_the_period_from_the_start_of_a_tick() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    ticks = Ticks(gate=gate)
    async with running(make_periodic(ticks, clock, immediate=True)):
        for took, rest in ((3.0, 7.0), (12.0, 1.0)):  # the second outlasts its period
            await ticks.until(lambda: ticks.started == ticks.count + 1)
            clock.advance(took)
            gate.set()
            await within(clock.wait_sleeping())
            assert clock.sleeping == [pytest.approx(rest)]
            gate.clear()
            clock.advance(rest)


async def test_periodic_can_tick_immediately() -> None:
    clock = FakeClock()
    ticks = Ticks()
    async with running(make_periodic(ticks, clock, immediate=True)):
        await ticks.until(lambda: ticks.count == 1)
        await within(clock.wait_sleeping())
        assert clock.now() == 0.0
        assert clock.sleeping == [10.0]


async def test_periodic_period_is_jittered_within_bounds() -> None:
    clock = FakeClock()
    ticks = Ticks()
    async with running(make_periodic(ticks, clock, 0.0, 1.0, 0.25)):
        for n, delay in enumerate((10.0, 9.0, 9.75), start=1):
            await within(clock.wait_sleeping())
            assert clock.sleeping == [pytest.approx(delay)]
            clock.advance(clock.sleeping[0])
            await ticks.until(lambda n=n: ticks.count == n)  # type: ignore[misc]

    rng = random.Random(3)  # noqa: S311 - seeded jitter samples
    periodic = Periodic(tick=ticks, period=10.0, jitter=0.1, rng=rng)
    delays = [periodic.next_delay() for _ in range(1000)]
    assert all(9.0 <= d <= 10.0 for d in delays)
    assert min(delays) < 9.2 and max(delays) > 9.8


async def test_periodic_failing_tick_is_reported_and_the_runner_goes_on() -> None:
    clock = FakeClock()
    ticks = Ticks(fail=True)
    seen: list[BaseException] = []
    periodic = make_periodic(ticks, clock, on_failure=seen.append)
    with structlog.testing.capture_logs() as logs:
        async with running(periodic) as task:
            for n in (1, 2):
                await within(clock.wait_sleeping())
                clock.advance(10.0)
                await ticks.until(lambda n=n: ticks.count == n)  # type: ignore[misc]
            await within(clock.wait_sleeping())
            assert not task.done()
            ticks.fail = False
            clock.advance(10.0)
            await ticks.until(lambda: ticks.count == 3)
            await within(clock.wait_sleeping())
    assert [str(e) for e in seen] == ["tick failed", "tick failed"]
    assert periodic.failures == 2
    assert periodic.last_success == 30.0
    assert [e["event"] for e in logs].count("periodic_tick_failed") == 2


async def test_periodic_trigger_ticks_now_and_coalesces_during_a_tick() -> None:
    clock = FakeClock()
    ticks = Ticks()
    periodic = make_periodic(ticks, clock)
    async with running(periodic):
        await within(clock.wait_sleeping())
        periodic.trigger()
        await ticks.until(lambda: ticks.count == 1)
        assert clock.now() == 0.0

        ticks.gate = asyncio.Event()
        periodic.trigger()
        await ticks.until(lambda: ticks.started == 2)
        periodic.trigger()  # during the tick: one more tick right after it...
        periodic.trigger()  # ...not two
        ticks.gate.set()
        await ticks.until(lambda: ticks.count == 3)
        await within(clock.wait_sleeping())
        assert ticks.started == 3
        assert clock.sleeping == [10.0]  # and then a full period again
        assert clock.now() == 0.0


async def test_periodic_trigger_before_run_ticks_at_start() -> None:
    clock = FakeClock()
    ticks = Ticks()
    periodic = make_periodic(ticks, clock)
    periodic.trigger()
    async with running(periodic):
        await ticks.until(lambda: ticks.count == 1)
        assert clock.now() == 0.0


async def test_periodic_cancel_propagates_from_a_tick_and_from_the_wait() -> None:
    clock = FakeClock()
    ticks = Ticks(gate=asyncio.Event())
    periodic = make_periodic(ticks, clock, immediate=True)
    task = asyncio.create_task(periodic.run(), name="test-periodic")
    try:
        await ticks.until(lambda: ticks.started == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        assert ticks.cancelled
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    ticks = Ticks()
    task = asyncio.create_task(make_periodic(ticks, clock).run(), name="test-periodic")
    try:
        await within(clock.wait_sleeping())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        assert clock.sleeping == []
        assert ticks.started == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("period", "jitter"), [(0.0, 0.1), (-1.0, 0.1), (1.0, 1.0), (1.0, -0.1)])
def test_periodic_rejects_nonsense(period: float, jitter: float) -> None:
    with pytest.raises(ConfigError):
        Periodic(tick=Ticks(), period=period, jitter=jitter)
