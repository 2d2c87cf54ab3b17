"""Shared fixtures: lab namespaces and a netns runner, always cleaned up; a short run
directory and a stand-in for the reconciler behind the CNI event server."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.agentrig import (  # noqa: F401 - the agent-process fixtures (tests/test_agent*.py)
    agent,
    agents,
    api,
    netns_runner,
    node,
    pods,
    ztunnel,
    ztunnels,
)
from tests.fakes import FakeReconciler
from ztunnel_redirect.adapters.unixsocket import HttpOnUnixSocket
from ztunnel_redirect.kernel.netns import NetnsRunner
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


@pytest.fixture
async def client(server: HttpOnUnixSocket) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client of the module's `server` fixture (a server on a Unix socket)."""
    connector = aiohttp.UnixConnector(path=server.socket_path)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


@pytest.fixture
def fake() -> FakeReconciler:
    return FakeReconciler()
