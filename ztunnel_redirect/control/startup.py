"""Start-up: what a previous run enrolled is rebuilt, then every pod is verified once.

Nothing is written before the initial lists are complete (the caller waits for them). Pods that
a previous run enrolled (their status annotation) are adopted with their netns from one /proc
scan; then every pod the lists brought, every deleted one and every adopted one is handled once
by the keyed queue, which verifies (and repairs only what drifted). A pod that fails is retried
by the queue: it does not hold start-up beyond a budget.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from ztunnel_redirect.control.ports import NetnsSurvey
from ztunnel_redirect.control.reconciler import enrolled_by_annotation
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.control.workqueue import KeyedQueue

__all__ = ["STARTUP_VERIFICATION_BUDGET", "Startup"]

log = structlog.get_logger(__name__)

STARTUP_VERIFICATION_BUDGET: Final = 60.0
"""Readiness waits at most this long for the start-up pass (one run of each pod); pods still
failing are retried."""


class Startup:
    def __init__(
        self,
        *,
        store: ClusterStore,
        records: PodRecords,
        locator: NetnsSurvey,
        queue: KeyedQueue[str],
        budget: float = STARTUP_VERIFICATION_BUDGET,
    ) -> None:
        self._store = store
        self._records = records
        self._locator = locator
        self._queue = queue
        self._budget = budget

    async def adopt(self) -> None:
        """Rebuild what a previous run enrolled: annotated pods, netns by one /proc scan."""
        previous = enrolled_by_annotation(self._store.pods.values())
        if not previous:
            return
        found = await self._locator.find_all(previous)
        for pod in previous:
            self._records.adopt(pod, found.get(pod.uid))
        log.info("pods_adopted", pods=len(previous), netns_found=len(found))

    async def verify(self) -> None:
        """Every pod the initial lists brought and every adopted one, handled once (the keyed
        queue must run)."""
        keys = [*self._store.pods, *self._store.deleted, *self._records]
        try:
            async with asyncio.timeout(self._budget):
                failed = await self._queue.handle_once(keys)
        except TimeoutError:
            log.warning(
                "startup_verification_incomplete", reason="budget exceeded", budget_s=self._budget
            )
            return
        if failed:
            log.warning(
                "startup_verification_incomplete", reason="pods failed", retrying=len(failed)
            )
