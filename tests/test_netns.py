"""Entering a netns only when its path still names the netns the caller found (pid reuse)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.kernel.netns import NetnsId, NetnsRunner, netns_id, open_netns
from ztunnel_redirect.testing.netnslab import Lab

pytestmark = pytest.mark.kernel

SELF_NETNS = "/proc/self/ns/net"


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def test_open_netns_refuses_a_path_naming_another_netns_and_keeps_no_fd(lab: Lab) -> None:
    other = lab.add_pod("other")
    before = open_fds()

    with pytest.raises(NetnsNotFoundError):
        open_netns(SELF_NETNS, expect=netns_id(other.path))
    assert open_fds() == before

    fd = open_netns(other.path, expect=netns_id(other.path))
    try:
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == netns_id(other.path)
    finally:
        os.close(fd)


async def test_run_expecting_never_runs_the_function_in_another_netns(
    runner: NetnsRunner, lab: Lab
) -> None:
    pod, other = lab.add_pod("p"), lab.add_pod("other")
    ran: list[NetnsId | None] = []

    def here() -> None:
        ran.append(netns_id("/proc/thread-self/ns/net"))

    with pytest.raises(NetnsNotFoundError):
        await runner.run_expecting(pod.path, netns_id(other.path), here)
    assert ran == []

    await runner.run_expecting(pod.path, netns_id(pod.path), here)
    assert ran == [netns_id(pod.path)]


async def test_workers_carry_their_pool_name_in_proc() -> None:
    """`top -H` and the soak's leak check tell the pools apart by the thread's comm."""

    def comm_here() -> str:
        return Path("/proc/thread-self/comm").read_text().strip()

    with NetnsRunner(workers=1) as runner:
        assert await runner.run(None, comm_here) == "zr-netns_0"
