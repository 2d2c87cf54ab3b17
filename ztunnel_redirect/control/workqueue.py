"""The control layer's runners: a keyed work queue and a periodic ticker (pure asyncio).

Reconciliation is level-triggered: event handlers record what changed in a store and `enqueue` the
object's key; a worker calls `handler(key)`, which reads the *current* desired state and brings the
kernel to it. So a key only needs to be handled once more after it changed, never once per event:

- `KeyedQueue` coalesces: a key is queued at most once and never handled by two workers at once.
  A key enqueued while it is being handled is marked dirty and handled once more afterwards, so
  the latest state is always reconciled and the runs for one key happen in order. Different keys
  run in parallel, up to `concurrency` (one worker task per slot, as kopf does per object).
- A failed key is retried after a per-key exponential backoff (capped, jittered); its attempt
  count resets on success. Retry vs drop is decided by one injected predicate, next to the queue
  settings (istio-cni). A failure for one key never stops the others or kills a worker.
- `handle_once(keys)` is a pass over some keys: it returns once each was handled once more, or
  waits out a backoff (counted as failed, not waited for), so one failing key never holds up a
  periodic pass or start-up.
- `handle_now(key)` is one key someone waits for (a CNI ADD): it goes ahead of every key nobody
  waits for and behind those asked for before it (a burst of ADDs is served in the order it
  came, so none waits for all those that came after it), cuts a backoff short, runs under the
  same one-run-per-key rule as every other run, and its outcome
  (return or exception) goes back to the caller. So there is one way into the handler.
- `Periodic` calls `tick()` every jittered period (the drift check / full resync), and at once on
  `trigger()`.

Time comes from an injected `Clock` (`now()` and `sleep()`), so tests drive both runners with
`FakeClock` instead of sleeping (kube-proxy's runner, kopf's looptime). `FakeClock` lives here, next
to the protocol it fakes, like knftables ships its fake next to the real implementation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

import structlog

from ztunnel_redirect.core.errors import ConfigError

__all__ = [
    "MONOTONIC",
    "Backoff",
    "Clock",
    "FakeClock",
    "KeyedQueue",
    "MonotonicClock",
    "Periodic",
    "wait_at_most",
]

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)


# --- time ----------------------------------------------------------------------------------------


class Clock(Protocol):
    """Where the runners get time from: monotonic seconds and a cancellable sleep."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: `time.monotonic` and `asyncio.sleep`."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


MONOTONIC = MonotonicClock()


async def wait_at_most(
    wait: Callable[[], Awaitable[None]], limit: float, *, clock: Clock = MONOTONIC
) -> None:
    """Until `wait()` returns or `limit` seconds pass on `clock`, whichever comes first (work
    that yields to pod starts, bounded: `cniadd.PodStarts.quiet`)."""
    waits = {asyncio.ensure_future(wait()), asyncio.ensure_future(clock.sleep(limit))}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waits:
            pending.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


@dataclass(order=True)
class _Sleeper:
    deadline: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class FakeClock:
    """Virtual time for tests: `sleep()` blocks until the test `advance()`s past its deadline.

    A test waits until the code under test is asleep (`wait_sleeping`), looks at what it asked for
    (`sleeping`), and moves time on; nothing waits on real time. `sleep(0)` (or less) only yields.
    """

    def __init__(self, *, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._waiters: list[tuple[Callable[[int], bool], asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    @property
    def sleeping(self) -> list[float]:
        """The time left for each pending sleep, soonest first."""
        return [s.deadline - self._now for s in sorted(self._sleepers)]

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        sleeper = _Sleeper(
            self._now + seconds, next(self._seq), asyncio.get_running_loop().create_future()
        )
        heapq.heappush(self._sleepers, sleeper)
        self._notify()
        try:
            await sleeper.future
        except asyncio.CancelledError:
            if sleeper in self._sleepers:  # cancelled before its deadline
                self._sleepers.remove(sleeper)
                heapq.heapify(self._sleepers)
                self._notify()
            raise

    async def wait_sleeping(self, count: int = 1) -> None:
        """Return once at least `count` sleeps are pending (wrap it in a timeout)."""
        await self._wait_for(lambda n: n >= count)

    async def wait_awake(self) -> None:
        """Return once no sleep is pending, e.g. a cancelled timer is gone (wrap it in a
        timeout)."""
        await self._wait_for(lambda n: n == 0)

    async def _wait_for(self, pending: Callable[[int], bool]) -> None:
        if pending(len(self._sleepers)):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((pending, future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time on by `seconds` and wake every sleep whose deadline has come, in order."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0].deadline <= self._now:
            sleeper = heapq.heappop(self._sleepers)
            if not sleeper.future.done():
                sleeper.future.set_result(None)
        self._notify()

    def _notify(self) -> None:
        pending = []
        for wanted, future in self._waiters:
            if future.done():
                continue
            if wanted(len(self._sleepers)):
                future.set_result(None)
            else:
                pending.append((wanted, future))
        self._waiters = pending


# --- backoff -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n (0-based) waits `min(maximum, initial *
    factor**n)`, reduced by up to `jitter` (a fraction) at random, so that retries of many keys
    (and agents on many nodes) do not run in step. Jitter only shortens: `maximum` is a hard cap.

    Also paces the Kubernetes watch's reconnects (`kube.WATCH_BACKOFF`).
    """

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ConfigError(f"backoff needs 0 < initial <= maximum, got {self}")
        if self.factor < 1:
            raise ConfigError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"backoff jitter must be within [0, 1], got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * rng.random())


def _always(_exc: Exception) -> bool:
    return True


# --- the keyed queue -----------------------------------------------------------------------------


class KeyedQueue(Generic[K]):
    """Coalescing work queue: `handler(key)` runs for each enqueued key, one run per key at a time,
    up to `concurrency` keys at once, with per-key backoff on failure.

    Every key is in at most one of these states: queued (waiting for a worker), running (maybe
    dirty: enqueued again meanwhile), or retrying (a retry is scheduled after its backoff).

    `enqueue(key)` while a retry is scheduled does not bypass the backoff: a level-triggered
    handler reads current state when the retry runs, so a periodic resync or a repeated event must
    not hammer a failing key. `enqueue(key, now=True)` does bypass it, for a real change (a pod
    update, a CNI ADD): new input may be what the failing run was missing, and it should be acted
    on promptly. This is client-go's `AddRateLimited` (the default) vs `Add` (`now=True`). The
    attempt count keeps growing across such runs until one succeeds (or `forget`).

    A handler exception is logged (`work_failed`), counted, passed to `on_failure(key, exc,
    attempts)` (for metrics), and the key is retried if `retryable(exc)`, else dropped until it is
    enqueued again. `CancelledError` is never caught: it ends `run()`.
    """

    def __init__(
        self,
        *,
        handler: Callable[[K], Awaitable[None]],
        concurrency: int,
        backoff: Backoff = Backoff(),
        retryable: Callable[[Exception], bool] = _always,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        on_failure: Callable[[K, BaseException, int], None] | None = None,
        name: str = "workqueue",
        log_key: str = "key",
    ) -> None:
        """`log_key` is the structlog context variable the key is bound to while it is handled
        (e.g. "pod_uid"), so every log line of the handler carries it."""
        if concurrency < 1:
            raise ConfigError(f"{name}: concurrency must be at least 1, got {concurrency}")
        self._handler = handler
        self._concurrency = concurrency
        self._backoff = backoff
        self._retryable = retryable
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._on_failure = on_failure
        self._name = name
        self._log_key = log_key

        self._queue: deque[K] = deque()
        self._first: deque[K] = deque()
        """Keys someone waits for (`handle_now`), in the order asked: all run before `_queue`'s."""
        self._queued: set[K] = set()
        """The keys of both."""
        self._running: set[K] = set()
        self._dirty: dict[K, bool] = {}
        """Running keys enqueued again meanwhile; True if one of those enqueues had `now=True`."""
        self._retries: dict[K, asyncio.Task[None]] = {}
        self._attempts: dict[K, int] = {}
        self._waiting: dict[K, list[asyncio.Future[Exception | None]]] = {}
        """`handle_once` and `handle_now` callers waiting for the next run of a key that starts;
        the result is what that run raised (None: it succeeded)."""
        self._urgent: set[K] = set()
        """Keys someone waits for (`handle_now`) that are not queued yet: their next push goes
        to `_first`."""
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False

    # --- introspection (metrics, tests) ---

    def __len__(self) -> int:
        """Keys waiting for a worker (not running, not waiting for a retry)."""
        return len(self._queued)

    @property
    def running(self) -> frozenset[K]:
        return frozenset(self._running)

    @property
    def retrying(self) -> frozenset[K]:
        """Keys that failed and wait for their backoff to pass."""
        return frozenset(self._retries)

    @property
    def keys_held(self) -> int:
        """Keys the queue holds any state for: flat while work comes and goes (a leak shows
        here)."""
        maps = (self._running, self._dirty, self._retries, self._attempts, self._waiting)
        return len(self._queued.union(self._urgent, *maps))

    def attempts(self, key: K) -> int:
        """Consecutive failures of `key` (0 after a success or `forget`)."""
        return self._attempts.get(key, 0)

    # --- producers ---

    def enqueue(self, key: K, *, now: bool = False) -> None:
        """Have `key` handled (again). Coalesces with a queued or running key; `now=True` also
        cuts a scheduled retry short (see the class docstring)."""
        if key in self._queued:
            return
        if key in self._running:
            self._dirty[key] = self._dirty.get(key, False) or now
            return
        if key in self._retries:
            if not now:
                return
            self._retries.pop(key).cancel()
        self._push(key)

    def forget(self, key: K) -> None:
        """Drop a scheduled retry of `key` and its attempt count (e.g. the pod was deleted and
        cleaned up). A queued or running key is left alone: its run sees the current state."""
        self._attempts.pop(key, None)
        task = self._retries.pop(key, None)
        if task is not None:
            task.cancel()
        self._update_idle()

    @property
    def idle(self) -> bool:
        """Nothing is queued, running or waiting for a retry (what `wait_idle` waits for)."""
        return self._idle.is_set()

    async def wait_idle(self) -> None:
        """Return once nothing is queued, running or waiting for a retry."""
        await self._idle.wait()

    async def handle_once(self, keys: Iterable[K]) -> frozenset[K]:
        """Have each of `keys` handled once more; return once that is done, with the keys that
        failed.

        Each key is enqueued as by `enqueue(key)`. It is done once a run of it that started after
        this call has ended, or as soon as it waits for a retry: a key already in its backoff is
        not run early and counts as failed at once (its last run failed), and so does a key whose
        run fails now. So a pass takes one run of each key, however long a failing key's backoff
        is (up to `backoff.maximum`). Bound the wait with a timeout: nothing is handled while
        `run()` is not running.
        """
        futures: dict[K, asyncio.Future[Exception | None]] = {}
        failed: set[K] = set()
        for key in keys:
            if key in futures or key in failed:
                continue
            self.enqueue(key)
            if key in self._retries:
                failed.add(key)
                continue
            futures[key] = self._wait_for_run(key)
        try:
            for key, future in futures.items():
                if await future is not None:
                    failed.add(key)
        finally:
            for key, future in futures.items():
                self._stop_waiting(key, future)
        return frozenset(failed)

    async def handle_now(self, key: K) -> None:
        """Have `key` handled once more, ahead of the keys nobody waits for and behind those
        asked for before, and return when that run ends; raise what it raised.

        The run is an ordinary one: never at the same time as another run of `key`, and its
        failure is counted and retried as any other (a key waiting out a backoff is run at once,
        as by `enqueue(key, now=True)`). A key running now is handled again after that run.
        Bound the wait with a timeout: nothing is handled while `run()` is not running.
        """
        self._urgent.add(key)
        self.enqueue(key, now=True)
        if key in self._queued and key in self._urgent:  # it was queued before
            self._urgent.discard(key)
            if key in self._queue:
                self._queue.remove(key)
                self._first.append(key)
        future = self._wait_for_run(key)
        try:
            outcome = await future
        finally:
            self._stop_waiting(key, future)
            self._urgent.discard(key)  # its run started (or nobody waits for it any more)
        if outcome is not None:
            raise outcome

    def _wait_for_run(self, key: K) -> asyncio.Future[Exception | None]:
        """A future for the outcome of the next run of `key` that starts."""
        future: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        return future

    # --- the workers ---

    async def run(self) -> None:
        """Run the workers until cancelled. A worker only ends on a bug of ours or on a
        `CancelledError` raised by a handler; then all stop and that is raised from here."""
        if self._started:
            raise RuntimeError(f"{self._name}: run() is already running")
        self._started = True
        workers = [
            asyncio.create_task(self._work(), name=f"{self._name}-worker-{i}")
            for i in range(self._concurrency)
        ]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the worker (CancelledError included)
            raise RuntimeError(f"{self._name}: a worker returned")  # pragma: no cover
        finally:
            retries = list(self._retries.values())
            for task in (*workers, *retries):
                task.cancel()
            await asyncio.gather(*workers, *retries, return_exceptions=True)
            # A retry that was scheduled becomes queued: a later run() handles it at once.
            for key in list(self._retries):
                del self._retries[key]
                self._push(key)
            self._started = False

    async def _work(self) -> None:
        while True:
            while not self._queued:
                self._wakeup.clear()
                await self._wakeup.wait()
            key = (self._first or self._queue).popleft()
            self._queued.discard(key)
            self._running.add(key)
            await self._handle(key)

    async def _handle(self, key: K) -> None:
        started = self._clock.now()
        covered = self._waiting.pop(key, [])  # waiting for a run that starts now: this one
        retry: bool | None = None  # None: success; else whether the failure is retried
        failure: Exception | None = None
        try:
            with structlog.contextvars.bound_contextvars(**{self._log_key: key}):
                try:
                    await self._handler(key)
                except Exception as exc:  # one key's failure never stops the others
                    failure = exc
                    retry = self._fail(key, exc, duration=self._clock.now() - started)
        except BaseException:
            # Cancelled mid-run: put the key back first in line for a later run().
            self._running.discard(key)
            self._dirty.pop(key, None)
            if key not in self._queued:
                self._queued.add(key)
                self._queue.appendleft(key)
            if covered:  # their run did not happen: the next one counts
                self._waiting[key] = covered + self._waiting.get(key, [])
            raise
        self._running.discard(key)
        dirty = key in self._dirty
        dirty_now = self._dirty.pop(key, False)
        if retry is None:
            self._attempts.pop(key, None)
            log.debug(
                "work_done",
                queue=self._name,
                key=key,
                duration_ms=round((self._clock.now() - started) * 1000, 3),
            )
            if dirty:
                self._push(key)
        elif retry:
            # A plain re-enqueue during the failed run waits for the backoff like any other; a
            # real change (`now=True`) is acted on at once.
            if dirty_now:
                self._push(key)
            else:
                self._schedule_retry(key)
        else:
            # Not retryable: dropped, unless it was enqueued again meanwhile.
            self._attempts.pop(key, None)
            if dirty:
                self._push(key)
        self._settle(key, covered, failure)
        self._update_idle()

    def _settle(
        self, key: K, covered: list[asyncio.Future[Exception | None]], failure: Exception | None
    ) -> None:
        """A run of `key` ended: tell the callers waiting for it how it went."""
        if key not in self._queued:
            # Waiting for a retry (or dropped): no run comes for those who waited for the next.
            covered += self._waiting.pop(key, [])
        for future in covered:
            if not future.done():
                future.set_result(failure)

    def _stop_waiting(self, key: K, future: asyncio.Future[Exception | None]) -> None:
        """The caller stopped waiting (its run ended, or it was cancelled or timed out)."""
        if future.done():
            return
        future.cancel()
        waiting = self._waiting.get(key, [])
        if future in waiting:
            waiting.remove(future)
        if not waiting:
            self._waiting.pop(key, None)

    def _fail(self, key: K, exc: Exception, *, duration: float) -> bool:
        """Count, log and report a failure; return whether it is retried."""
        attempts = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempts
        retry = self._retryable(exc)
        log.warning(
            "work_failed",
            queue=self._name,
            key=key,
            attempt=attempts,
            retry=retry,
            reason=type(exc).__name__,
            error=str(exc),
            duration_ms=round(duration * 1000, 3),
        )
        if self._on_failure is not None:
            try:
                self._on_failure(key, exc, attempts)
            except Exception:  # a metrics/logging hook never kills a worker
                log.exception("failure_hook_failed", queue=self._name, key=key)
        return retry

    def _schedule_retry(self, key: K) -> None:
        delay = self._backoff.delay(self._attempts.get(key, 1) - 1, self._rng)
        log.debug("retry_scheduled", queue=self._name, key=key, retry_in_s=round(delay, 3))
        self._retries[key] = asyncio.create_task(
            self._retry_after(key, delay), name=f"{self._name}-retry-{key}"
        )

    async def _retry_after(self, key: K, delay: float) -> None:
        await self._clock.sleep(delay)
        if self._retries.get(key) is asyncio.current_task():
            del self._retries[key]
            log.debug("retry_due", queue=self._name, key=key)
            self._push(key)

    def _push(self, key: K) -> None:
        self._queued.add(key)
        if key in self._urgent:
            self._urgent.discard(key)
            self._first.append(key)
        else:
            self._queue.append(key)
        self._idle.clear()
        self._wakeup.set()

    def _update_idle(self) -> None:
        if not (self._queued or self._running or self._retries):
            self._idle.set()


# --- the periodic runner -------------------------------------------------------------------------


MIN_REST: Final = 0.1
"""The least wait between two ticks, as a fraction of the period."""


class Periodic:
    """Call `tick()` every `period` seconds, each shortened by up to `jitter` (a fraction), from
    the start of one tick to the start of the next: a drift that appears just after a pass has
    checked it is seen by the next pass within one period, however long the pass takes. Ticks
    never overlap: a tick that outlasts its period is followed after a short rest
    (`MIN_REST` of a period) that keeps an overloaded agent from passing back to back. The first
    tick comes after one period, or at once if `immediate`.

    `trigger()` runs a tick now (tests); triggers while a tick runs coalesce into one more
    tick right after it, since that tick may have read state before the trigger. A failing tick is
    logged (`periodic_tick_failed`), passed to `on_failure`, and the runner goes on.
    """

    def __init__(
        self,
        *,
        tick: Callable[[], Awaitable[None]],
        period: float,
        jitter: float = 0.1,
        immediate: bool = False,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        name: str = "periodic",
    ) -> None:
        if period <= 0:
            raise ConfigError(f"{name}: period must be positive, got {period}")
        if not 0 <= jitter < 1:
            raise ConfigError(f"{name}: jitter must be within [0, 1), got {jitter}")
        self._tick = tick
        self._period = period
        self._jitter = jitter
        self._immediate = immediate
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._on_failure = on_failure
        self._name = name
        self._triggered = asyncio.Event()
        self.ticks = 0
        """Ticks run so far, failed ones included."""
        self.failures = 0
        self.last_success: float | None = None
        """`clock.now()` at the end of the last successful tick (how stale the state may be)."""

    def trigger(self) -> None:
        self._triggered.set()

    def next_delay(self) -> float:
        """A jittered period: uniform within `period * (1 - jitter)` and `period`. Jitter only
        shortens, so the period is a bound (a drift is repaired within one period)."""
        return self._period * (1.0 - self._jitter * self._rng.random())

    async def run(self) -> None:
        """Tick until cancelled."""
        if not self._immediate:
            await self._wait(self.next_delay())
        while True:
            started = self._clock.now()
            await self._run_tick()
            took = self._clock.now() - started
            await self._wait(max(self.next_delay() - took, self._period * MIN_REST))

    async def _wait(self, delay: float) -> None:
        if self._triggered.is_set():
            return
        sleep = asyncio.create_task(self._clock.sleep(delay), name=f"{self._name}-sleep")
        triggered = asyncio.create_task(self._triggered.wait(), name=f"{self._name}-trigger")
        try:
            await asyncio.wait((sleep, triggered), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleep, triggered):
                task.cancel()
            # gather, not a suppressed await: a cancel of run() itself must still propagate.
            await asyncio.gather(sleep, triggered, return_exceptions=True)

    async def _run_tick(self) -> None:
        self._triggered.clear()
        started = self._clock.now()
        self.ticks += 1
        try:
            await self._tick()
        except Exception as exc:  # a failed tick is retried at the next one
            self.failures += 1
            log.warning(
                "periodic_tick_failed",
                runner=self._name,
                reason=type(exc).__name__,
                error=str(exc),
                duration_ms=round((self._clock.now() - started) * 1000, 3),
            )
            if self._on_failure is not None:
                try:
                    self._on_failure(exc)
                except Exception:  # a metrics/logging hook never stops the runner
                    log.exception("failure_hook_failed", runner=self._name)
            return
        self.last_success = self._clock.now()
        log.debug(
            "periodic_tick_done",
            runner=self._name,
            duration_ms=round((self.last_success - started) * 1000, 3),
        )
