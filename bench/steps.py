"""Where the time of `podrules.apply_here` / `check_here` goes: the core's named steps, timed
by the `podrules.StepTimer` the core takes (its default times nothing).

Steps do not overlap; `other` is the rest of `total` (the core's own glue: opening and closing
sockets, building the outcome).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from ztunnel_redirect.kernel import podrules
from ztunnel_redirect.kernel.nft import Verified
from ztunnel_redirect.kernel.podrules import KernelForms, Outcome, PodState


class StepClock:
    """A `podrules.StepTimer` that sums milliseconds per step name, over calls."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._name = ""
        self._t0 = 0.0

    def step(self, name: str) -> StepClock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ms = (time.perf_counter() - self._t0) * 1000
        self.ms[self._name] = self.ms.get(self._name, 0.0) + ms


def _steps(call: Callable[[StepClock], Outcome]) -> tuple[dict[str, float], Outcome]:
    clock = StepClock()
    t0 = time.perf_counter()
    outcome = call(clock)
    total = (time.perf_counter() - t0) * 1000
    clock.ms["other"] = max(0.0, total - sum(clock.ms.values()))
    clock.ms["total"] = total
    return clock.ms, outcome


def apply_steps_here(
    state: PodState, forms: KernelForms, verified: Verified | None, *, fresh: bool
) -> tuple[dict[str, float], Outcome]:
    """`podrules.apply_here`, by step."""
    return _steps(
        lambda clock: podrules.apply_here(state, forms, verified, fresh=fresh, steps=clock)
    )


def check_steps_here(
    state: PodState, forms: KernelForms, verified: Verified | None
) -> tuple[dict[str, float], Outcome]:
    """`podrules.check_here`, by step."""
    return _steps(lambda clock: podrules.check_here(state, forms, verified, steps=clock))
