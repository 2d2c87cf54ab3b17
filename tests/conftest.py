"""Shared fixtures: lab namespaces and a netns runner, always cleaned up; a short run
directory and a stand-in for the reconciler behind the CNI event server."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ztunnel_redirect.cnievents import CniAddEvent
from ztunnel_redirect.netns import NetnsRunner
from ztunnel_redirect.testing.netnslab import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def lab6() -> Iterator[Lab]:
    with Lab(ipv6=True) as the_lab:
        yield the_lab


@pytest.fixture
async def runner() -> AsyncIterator[NetnsRunner]:
    with NetnsRunner(workers=4) as the_runner:
        yield the_runner


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short path: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="zr-run-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture
def fake() -> FakeReconciler:
    return FakeReconciler()
