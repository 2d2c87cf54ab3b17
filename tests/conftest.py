"""Shared fixtures: lab namespaces and a netns runner, always cleaned up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

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
