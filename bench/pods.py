"""Cheap benchmark pods: named network namespaces with `lo` up, made in-process.

Installing a pod's rules needs only a netns (no veth, no address). `ip netns add` plus
`ip -n X link set lo up` costs two processes per pod, and `ip -n` slows down as namespaces are
added (docs/design.md §12.8); thousands of pods per run are made here instead, the way `ip netns
add` does it: a `NetnsRunner` worker enters a new netns (`entered_scratch`), bind-mounts it on
`/run/netns/<name>` so it outlives the visit, and sets `lo` up with one rtnetlink message.

Names start with the lab prefix (`zr-`), so `netnslab.leftovers()` and `ip netns list` show them.
Every name is recorded *before* its mount exists, so `close()` removes partial creations too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path
from typing import Final, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.routing import Rtnl
from ztunnel_redirect.testing.netnslab import PREFIX, Netns

T = TypeVar("T")

NETNS_DIR: Final = Path("/run/netns")
BENCH_PREFIX: Final = f"{PREFIX}bench-"
"""Every namespace a benchmark run creates starts with this."""

_MS_BIND: Final = 0x1000
_MNT_DETACH: Final = 2
_IFF_UP: Final = 1
_LO_INDEX: Final = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _lo_up_message() -> bytes:
    msg = ifinfmsg()
    msg["index"] = _LO_INDEX
    msg["flags"] = _IFF_UP
    msg["change"] = _IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg.encode()
    data: bytes = msg.data
    return data


_LO_UP: Final = _lo_up_message()


def _pin_here(path: str) -> None:
    """On a worker inside a fresh netns: bind-mount it on `path` and bring `lo` up."""
    src = b"/proc/thread-self/ns/net"
    if _libc.mount(src, path.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount of a new netns on {path}: {os.strerror(err)}")
    with Rtnl() as rtnl:
        rtnl.request([_LO_UP])


def unpin(path: str) -> None:
    """Undo `_pin_here` (what `ip netns del` does); what is already gone is fine."""
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()


class PodFactory:
    """Makes and removes benchmark pod namespaces named `zr-bench-<run>-<group>-<i>`."""

    def __init__(self, runner: NetnsRunner, *, run_id: str) -> None:
        self._runner = runner
        self._prefix = f"{BENCH_PREFIX}{run_id}-"
        self._live: dict[str, Netns] = {}
        NETNS_DIR.mkdir(parents=True, exist_ok=True)

    @property
    def live(self) -> int:
        return len(self._live)

    async def create(self, group: str, index: int) -> Netns:
        ns = Netns(f"{self._prefix}{group}-{index}")
        # Record first: from here on close() removes it, whatever happens next.
        self._live[ns.name] = ns
        fd = os.open(ns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        os.close(fd)
        await self._runner.run(None, _pin_here, ns.path)
        return ns

    async def create_many(self, group: str, count: int) -> list[Netns]:
        return [await self.create(group, i) for i in range(count)]

    def remove(self, pods: list[Netns]) -> None:
        for ns in pods:
            unpin(ns.path)
            self._live.pop(ns.name, None)

    def close(self) -> None:
        """Remove every namespace this factory made; raises the first failure after trying all."""
        first: OSError | None = None
        for ns in list(self._live.values()):
            try:
                unpin(ns.path)
            except OSError as exc:
                first = first or exc
            else:
                del self._live[ns.name]
        if first is not None:
            raise first


def evenly(items: list[T], k: int) -> list[T]:
    """k items spread over the list (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def remove_leftovers() -> list[str]:
    """Remove benchmark namespaces a crashed or killed run left behind (any run id)."""
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for path in sorted(NETNS_DIR.glob(f"{BENCH_PREFIX}*")):
        unpin(str(path))
        removed.append(path.name)
    return removed
