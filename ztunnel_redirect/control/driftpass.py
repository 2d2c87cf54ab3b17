"""The periodic drift pass: every enrolled pod and the host checked once, only what drifted
written (the tick of a `workqueue.Periodic`).

A backstop (docs/design.md §6.4): drift is found at once through kernel notifications
(`watchers`); the pass catches what they cannot show, every `RECONCILE_PERIOD`."""

from __future__ import annotations

import asyncio
import time

import structlog

from ztunnel_redirect.control.hosthandover import HostHandover
from ztunnel_redirect.control.ports import PassObserver, ZtunnelLinks
from ztunnel_redirect.control.reconciler import HOST_KEY
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.workqueue import KeyedQueue

__all__ = ["DriftPass"]

log = structlog.get_logger(__name__)


class DriftPass:
    def __init__(
        self,
        *,
        queue: KeyedQueue[str],
        records: PodRecords,
        handover: HostHandover,
        observer: PassObserver,
        ztunnel: ZtunnelLinks,
        period: float,
    ) -> None:
        self._queue = queue
        self._records = records
        self._handover = handover
        self._observer = observer
        self._ztunnel = ztunnel
        self._period = period

    async def run_once(self) -> None:
        """Check every enrolled pod and the host once; only what drifted gets written.

        The pass waits for one run of each, not for pods waiting out a retry backoff (they count
        as failed): one failing pod must not hold every other pod's repair beyond a period.
        """
        started = time.monotonic()
        keys = [*self._records, HOST_KEY]
        try:
            async with asyncio.timeout(self._period):
                failed = await self._queue.handle_once(keys)
        except TimeoutError:
            log.warning("drift_pass_slow", pods=len(keys) - 1, period_s=self._period)
            return
        self._observer.set_ztunnel_connections(self._ztunnel.live_connections)
        self._observer.mark_pass(time.time())
        await self._handover.run()
        # One line per period: the heartbeat that shows every enrolled pod is being verified.
        log.info(
            "drift_pass_done",
            pods=len(self._records),
            failed=len(failed),
            duration_ms=round((time.monotonic() - started) * 1e3, 3),
        )
