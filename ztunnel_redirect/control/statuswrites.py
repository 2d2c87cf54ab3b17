"""The pods' redirection status (`ambient.istio.io/redirection`), written to the API behind the run
that decided it.

A pod's run decides its status (`enabled`, `pending`, or none) and goes on: the write is queued
here, one key per pod. So a CNI ADD is answered as soon as the pod is redirected and accepted by
ztunnel, without waiting for an API server round trip (Istio's agent waits for it, so a slow API
server slows every pod start on the node). Writes of one pod never overlap and the last value
asked for is the one written, once: asked again while it is queued or being written, it is not
written again. A failed write is retried with the queue's backoff, unless a later value
replaced it meanwhile. The annotation is informational for other components: nothing on the
node waits for it. So a write also waits for pod starts to pause (`yield_to`: no CNI ADD answered
for a moment), up to `YIELD_LIMIT_S`: each write is an API round trip, and the pod update it
brings back a check of the pod, which a burst of pod starts would otherwise wait behind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from ztunnel_redirect.control.ports import StatusWriter
from ztunnel_redirect.control.workqueue import MONOTONIC, Clock, KeyedQueue, wait_at_most
from ztunnel_redirect.core.model import Pod, PodUid

__all__ = ["QueuedStatusWriter"]

CONCURRENCY: Final = 4
"""Writes in flight at once (each is one PATCH)."""
YIELD_LIMIT_S: Final = 2.0
"""The longest a write waits for pod starts to pause: a node that starts pods without a pause
still gets its annotations written."""


class QueuedStatusWriter:
    """A `StatusWriter` that returns at once and writes through `writer` in the background
    (`run()`), pod by pod, the latest value first asked for winning."""

    def __init__(
        self,
        writer: StatusWriter,
        *,
        on_failure: Callable[[PodUid, BaseException, int], None] | None = None,
        clock: Clock = MONOTONIC,
        yield_to: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`yield_to()`: returns when the work the writes yield to has paused
        (`cniadd.PodStarts.quiet`)."""
        self._writer = writer
        self._clock = clock
        self._yield_to = yield_to
        self._wanted: dict[PodUid, tuple[Pod, str | None]] = {}
        self._queue = KeyedQueue[PodUid](
            handler=self._write,
            concurrency=CONCURRENCY,
            on_failure=on_failure,
            clock=clock,
            name="status",
            log_key="pod_uid",
        )

    @property
    def pending(self) -> int:
        """Pods whose status is not written yet."""
        return len(self._wanted)

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        asked = self._wanted.get(pod.uid)
        if asked is not None and asked[1] == value:
            # That very value is queued or being written: a run that checks the pod before the
            # informer shows our write asks for it again, and that is no reason to write twice.
            return
        self._wanted[pod.uid] = (pod, value)
        self._queue.enqueue(pod.uid, now=True)

    async def _write(self, uid: PodUid) -> None:
        if self._yield_to is not None:
            await wait_at_most(self._yield_to, YIELD_LIMIT_S, clock=self._clock)
        wanted = self._wanted.get(uid)
        if wanted is None:
            return
        pod, value = wanted
        await self._writer.set_redirection_status(pod, value)
        if self._wanted.get(uid) is wanted:  # not replaced while it was being written
            del self._wanted[uid]

    async def run(self) -> None:
        """Write until cancelled."""
        await self._queue.run()
