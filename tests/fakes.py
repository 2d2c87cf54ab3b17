"""Test doubles shared by several test modules."""

from __future__ import annotations

import asyncio

from ztunnel_redirect.cnievents import CniAddEvent


class FakeReconciler:
    """Takes CNI ADD events in place of the reconciler: records them, and can be told to fail
    or to wait for `release`."""

    def __init__(self) -> None:
        self.events: list[CniAddEvent] = []
        self.fail_with: BaseException | None = None
        self.release: asyncio.Event | None = None
        self.finished = asyncio.Event()

    async def on_add(self, event: CniAddEvent) -> None:
        self.events.append(event)
        if self.release is not None:
            await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.finished.set()
