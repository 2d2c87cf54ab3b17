"""`podrules.apply_here` and `check_here`, step by step with a clock, to see where time goes.

Same calls in the same order as the core (read tables, compare with the kernel forms, one
transaction; then the routing check and add), each step timed on the worker. Kept apart from the
install methods: the core is measured as it is, this only explains its numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from bench.methods import table_names
from ztunnel_redirect import routing
from ztunnel_redirect.drift import TableListing
from ztunnel_redirect.nft import Nft
from ztunnel_redirect.podrules import KernelForms, PodState, repair_script, table_drift

T = TypeVar("T")


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def time(self, step: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.ms[step] = self.ms.get(step, 0.0) + (time.perf_counter() - t0) * 1000


def _read(clock: _Clock, nft: Nft, state: PodState) -> dict[str, TableListing | None]:
    actual: dict[str, TableListing | None] = {}
    for name in table_names(state.ruleset):
        text = clock.time("nft_list_tables", lambda n=name: nft.list_table(n))  # type: ignore[misc]
        actual[name] = (
            None
            if text is None
            else clock.time("parse_listing", lambda t=text: TableListing.parse(t))  # type: ignore[misc]
        )
    return actual


def _steps(state: PodState, forms: KernelForms, *, write: bool) -> dict[str, float]:
    clock = _Clock()
    t0 = time.perf_counter()
    nft = clock.time("nft_context_new", Nft)
    try:
        actual = _read(clock, nft, state)
        expected = clock.time("kernel_forms_lookup", lambda: forms.of(state.ruleset))
        drifts = clock.time("diff", lambda: table_drift(state.ruleset, expected, actual))
        if write and drifts:
            script = clock.time("repair_script", lambda: repair_script(state.ruleset, drifts))
            clock.time("nft_commit", lambda: nft.run(script))
    finally:
        clock.time("nft_context_free", nft.close)
    rtnl = clock.time("rtnl_open", routing.Rtnl)
    try:
        missing = clock.time("routing_check", lambda: routing.check(rtnl, ipv6=state.ipv6))
        if write:
            clock.time("routing_add", lambda: routing.add(rtnl, missing))
    finally:
        clock.time("rtnl_close", rtnl.close)
    clock.ms["total"] = (time.perf_counter() - t0) * 1000
    return clock.ms


def apply_steps_here(state: PodState, forms: KernelForms) -> dict[str, float]:
    return _steps(state, forms, write=True)


def check_steps_here(state: PodState, forms: KernelForms) -> dict[str, float]:
    return _steps(state, forms, write=False)
