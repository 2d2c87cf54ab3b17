"""Cheap pods for the benchmark and the soak: named network namespaces made in-process, and a
`TestNode` whose pods are such namespaces (`CheapNode`).

Installing a pod's rules needs only a netns (no veth, no address). `ip netns add` plus
`ip -n X link set lo up` costs two processes per pod, and `ip -n` slows down as namespaces are
added (docs/design.md §12.8); thousands of pods per run are made here instead, the way `ip netns
add` does it: a `NetnsRunner` worker enters a new netns (`entered_scratch`), bind-mounts it on
`/run/netns/<name>` so it outlives the visit, and sets `lo` up with one rtnetlink message.

Names start with the lab prefix (`zr-`), so `netnslab.leftovers()` and `ip netns list` show them.
Every name is recorded *before* its mount exists, so `close()` removes partial creations too.

A pod the agent enrolls needs a little more (`plumb_here`, `CheapLab`): a veth pair whose both
ends stay in the pod (`eth0` carries the pod IP, for the /proc scan's IP check, and the default
route), and an unreachable route for ztunnel-marked sockets so that a stand-in's relay of a test
connection fails at once instead of waiting for ARP.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import socket
from pathlib import Path
from typing import Any, Final

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.kernel.netlink import NLM_F_CREATE, NLM_F_EXCL, pyroute2_bytes
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.routing import Rtnl
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.netnslab import PREFIX, Lab, LabPod, Netns
from ztunnel_redirect.testing.node import TestNode

__all__ = [
    "BENCH_PREFIX",
    "NETNS_DIR",
    "CheapLab",
    "CheapNode",
    "CheapPodsError",
    "PodFactory",
    "plumb_here",
    "remove_leftovers",
    "unpin",
]

NETNS_DIR: Final = Path("/run/netns")
BENCH_PREFIX: Final = f"{PREFIX}bench-"
"""Every namespace a benchmark run creates starts with this (the default of `PodFactory`)."""

_MS_BIND: Final = 0x1000
_UNREACHABLE_TABLE: Final = 101
_RTN_UNICAST, _RTN_UNREACHABLE = 1, 7
_RT_SCOPE_LINK: Final = 253
_RTPROT_BOOT: Final = 3
_MAIN_TABLE: Final = 254
_ETH0, _PEER = 2, 3
"""Interface indexes in a new netns (lo is 1): fixed in the create request."""
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


class CheapPodsError(RedirectError):
    """A cheap pod could not be handed out (none prepared)."""


class PodFactory:
    """Makes and removes pod namespaces named `<prefix><run>-<group>-<i>` (`zr-bench-` by
    default; the soak uses its own prefix, so that it counts only its own)."""

    def __init__(self, runner: NetnsRunner, *, run_id: str, prefix: str = BENCH_PREFIX) -> None:
        if not prefix.startswith(PREFIX):
            raise ValueError(f"pod netns prefix {prefix!r} must start with the lab's {PREFIX!r}")
        self._runner = runner
        self._prefix = f"{prefix}{run_id}-"
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


def remove_leftovers(prefix: str = BENCH_PREFIX) -> list[str]:
    """Remove the namespaces a crashed or killed run left behind (any run id)."""
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for path in sorted(NETNS_DIR.glob(f"{prefix}*")):
        unpin(str(path))
        removed.append(path.name)
    return removed


# --- pods the agent enrolls ----------------------------------------------------------------


def _encode(msg: Any, kind: int, *, create: bool = True) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if create else 0)
    return pyroute2_bytes(msg, kind, flags)


def _veth_message() -> bytes:
    link = ifinfmsg()
    link["index"] = _ETH0
    peer = {"index": _PEER, "attrs": [("IFLA_IFNAME", "eth0p")]}
    link["attrs"] = [
        ("IFLA_IFNAME", "eth0"),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                ]
            },
        ),
    ]
    return _encode(link, RTM_NEWLINK)


def _up_message(index: int) -> bytes:
    link = ifinfmsg()
    link["index"] = index
    link["flags"] = _IFF_UP
    link["change"] = _IFF_UP
    return _encode(link, RTM_NEWLINK, create=False)


def _static_messages() -> list[bytes]:
    """Default route via eth0; ztunnel-marked sockets get an unreachable route instead."""
    default = rtmsg()
    default["family"] = socket.AF_INET
    default["table"] = _MAIN_TABLE
    default["proto"] = _RTPROT_BOOT
    default["scope"] = _RT_SCOPE_LINK
    default["type"] = _RTN_UNICAST
    default["attrs"] = [("RTA_OIF", _ETH0)]
    rule = fibmsg()
    rule["family"] = socket.AF_INET
    rule["action"] = FR_ACT_TO_TBL
    rule["table"] = _UNREACHABLE_TABLE
    rule["attrs"] = [
        ("FRA_PRIORITY", 1000),
        ("FRA_FWMARK", c.ZTUNNEL_MARK),
        ("FRA_FWMASK", c.CONNMARK_MASK),  # 0xfff, the mask of both marks
        ("FRA_TABLE", _UNREACHABLE_TABLE),
    ]
    unreachable = rtmsg()
    unreachable["family"] = socket.AF_INET
    unreachable["table"] = _UNREACHABLE_TABLE
    unreachable["proto"] = _RTPROT_BOOT
    unreachable["type"] = _RTN_UNREACHABLE
    return [
        _encode(default, RTM_NEWROUTE),
        _encode(rule, RTM_NEWRULE),
        _encode(unreachable, RTM_NEWROUTE),
    ]


_VETH: Final = _veth_message()
_UPS: Final = [_up_message(_ETH0), _up_message(_PEER)]
_STATIC: Final = _static_messages()


def _address_message(ipv4: str) -> bytes:
    addr = ifaddrmsg()
    addr["family"] = socket.AF_INET
    addr["prefixlen"] = 32
    addr["index"] = _ETH0
    addr["attrs"] = [("IFA_LOCAL", ipv4), ("IFA_ADDRESS", ipv4)]
    return _encode(addr, RTM_NEWADDR)


def plumb_here(ipv4: str) -> None:
    """On a worker in a new pod netns (lo up): eth0 with the pod IP, the routes above."""
    with Rtnl() as rtnl:
        rtnl.request([_VETH])
        rtnl.request(_UPS)
        rtnl.request([_address_message(ipv4), *_STATIC])


class CheapLab(Lab):
    """The lab of a `TestNode` (its node netns), whose pods are made in-process: `prepare(k)`
    makes k pod namespaces ahead (async), `add_pod` hands out the next one."""

    def __init__(self, base: Lab, runner: NetnsRunner, factory: PodFactory) -> None:
        # Takes over the base lab (its node netns and the names it created); not a new lab.
        vars(self).update(vars(base))
        self._runner = runner
        self._factory = factory
        self._ready: collections.deque[LabPod] = collections.deque()
        self._count = 0

    async def prepare(self, count: int) -> None:
        for _ in range(count):
            self._count += 1
            n = self._count + 1
            ns = await self._factory.create("agent", n)
            ipv4 = f"10.244.{n // 250}.{n % 250 + 2}"
            await self._runner.run(ns.path, plumb_here, ipv4)
            self._ready.append(LabPod(netns=ns, ipv4=ipv4, ipv6=None, node_side=""))

    def add_pod(self, name: str) -> LabPod:
        if not self._ready:
            raise CheapPodsError(f"no prepared pod netns left for {name}")
        return self._ready.popleft()

    def delete(self, ns: Netns) -> None:
        self._factory.remove([ns])


class CheapNode(TestNode):
    """A `TestNode` whose pods come from a `CheapLab`."""

    __test__ = False

    def __init__(
        self, api: ApiServer, runner: NetnsRunner, factory: PodFactory, *, ipv6: bool
    ) -> None:
        super().__init__(api, ipv6=ipv6)
        self.cheap = CheapLab(self.lab, runner, factory)
        self.lab = self.cheap
