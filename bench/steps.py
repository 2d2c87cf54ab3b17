"""Where the time of `podrules.apply_here` / `check_here` goes: the core's own functions, each
timed where the core calls it.

Nothing of the core is re-implemented here: for the duration of one call, the names that
`ztunnel_redirect.podrules` looks up (`generation`, `Nft`, `TableListing`, `table_drift`,
`repair_script`, `routing`, `_replay`), and the dump proof's `identical` on its cache object, are
swapped for timed wrappers around the very same objects, then restored. Run it on a `NetnsRunner`
worker with nothing else running in the process (the swap is process-wide), as `measure_profile`
does. Steps do not overlap; `other` is the rest of `total` (the core's own glue).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from ztunnel_redirect import podrules, routing
from ztunnel_redirect.drift import TableListing
from ztunnel_redirect.nft import Nft, Verified, generation
from ztunnel_redirect.podrules import KernelForms, Outcome, PodState

T = TypeVar("T")
P = ParamSpec("P")


class Clock:
    """Milliseconds per step name, summed over calls."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, step: str, seconds: float) -> None:
        self.ms[step] = self.ms.get(step, 0.0) + seconds * 1000

    def timed(self, step: str, fn: Callable[P, T]) -> Callable[P, T]:
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(step, time.perf_counter() - t0)

        return call


def _timed_nft(clock: Clock) -> type[Nft]:
    class TimedNft(Nft):
        def __init__(self) -> None:
            t0 = time.perf_counter()
            super().__init__()
            clock.add("nft_context_new", time.perf_counter() - t0)
            self._listing = False

        def run(self, script: str) -> str:
            if self._listing:
                return super().run(script)
            return clock.timed("nft_commit", super().run)(script)

        def list_table(self, name: str) -> str | None:
            self._listing = True
            try:
                return clock.timed("nft_list_tables", super().list_table)(name)
            finally:
                self._listing = False

        def close(self) -> None:
            clock.timed("nft_context_free", super().close)()

    return TimedNft


def _timed_listing(clock: Clock) -> type[TableListing]:
    class TimedListing(TableListing):
        @classmethod
        def parse(cls, text: str) -> TableListing:
            return clock.timed("parse_listing", TableListing.parse)(text)

    return TimedListing


def _timed_routing(clock: Clock) -> types.SimpleNamespace:
    class TimedRtnl(routing.Rtnl):
        def __init__(self) -> None:
            clock.timed("rtnl_open", super().__init__)()

        def close(self) -> None:
            clock.timed("rtnl_close", super().close)()

    # Everything else of the module as it is (podrules also uses its kinds).
    return types.SimpleNamespace(
        **(
            vars(routing)
            | {
                "Rtnl": TimedRtnl,
                "check": clock.timed("routing_check", routing.check),
                "add": clock.timed("routing_add", routing.add),
                "everything": clock.timed("routing_everything", routing.everything),
            }
        )
    )


class TimedForms(KernelForms):
    """`KernelForms` whose lookups are timed by the clock of the current call."""

    clock: Clock | None = None

    def of(self, ruleset: Any) -> dict[str, TableListing]:
        if self.clock is None:
            return super().of(ruleset)
        return self.clock.timed("kernel_forms_lookup", super().of)(ruleset)


@contextlib.contextmanager
def instrumented(clock: Clock, forms: TimedForms) -> Iterator[None]:
    """Swap the names `podrules` calls for timed wrappers; restored on exit."""
    swaps: dict[str, Any] = {
        "generation": clock.timed("nft_generation", generation),
        "Nft": _timed_nft(clock),
        "TableListing": _timed_listing(clock),
        "table_drift": clock.timed("diff", podrules.table_drift),
        "repair_script": clock.timed("repair_script", podrules.repair_script),
        "routing": _timed_routing(clock),
        "_replay": clock.timed("batch_replay", podrules._replay),
    }
    saved = {name: getattr(podrules, name) for name in swaps}
    for name, value in swaps.items():
        setattr(podrules, name, value)
    # The dump proof's cache is bound as a default argument: time its method on that object.
    dumps = podrules._EXPECTED_DUMPS
    dumps.identical = clock.timed("dump_proof", dumps.identical)  # type: ignore[method-assign]
    forms.clock = clock
    try:
        yield
    finally:
        forms.clock = None
        del dumps.identical  # the class's method again
        for name, value in saved.items():
            setattr(podrules, name, value)


def _steps(call: Callable[[], Outcome], forms: TimedForms) -> tuple[dict[str, float], Outcome]:
    clock = Clock()
    with instrumented(clock, forms):
        t0 = time.perf_counter()
        outcome = call()
        total = (time.perf_counter() - t0) * 1000
    clock.ms["other"] = max(0.0, total - sum(clock.ms.values()))
    clock.ms["total"] = total
    return clock.ms, outcome


def apply_steps_here(
    state: PodState, forms: TimedForms, verified: Verified | None, *, fresh: bool
) -> tuple[dict[str, float], Outcome]:
    """`podrules.apply_here`, by step."""
    return _steps(lambda: podrules.apply_here(state, forms, verified, fresh=fresh), forms)


def check_steps_here(
    state: PodState, forms: TimedForms, verified: Verified | None
) -> tuple[dict[str, float], Outcome]:
    """`podrules.check_here`, by step."""
    return _steps(lambda: podrules.check_here(state, forms, verified), forms)
