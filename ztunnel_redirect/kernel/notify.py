"""Kernel notifications of changes in a netns: what `nft monitor` and `ip monitor rule route`
listen to, read on non-blocking netlink sockets that the event loop serves (docs/design.md §2.5).

- nftables announces every committed change on the `NFNLGRP_NFTABLES` group of the netns where it
  happens: one message per object, then `NFT_MSG_NEWGEN` with the committing task's id. Every
  object message names its table in attribute 1 (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
  `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, ...), so one attribute tells ours from others.
- rtnetlink announces ip rules and routes on its rule and route groups (IPv4 and IPv6); ours are
  in table 100, at priority 32764, on the connmark. In the host netns the AWS branch-ENI probe
  rules (docs/design.md §4.5) are ours too, and what they must be depends on the VPC CNI's own
  rules: there every ip rule change is a reason to check.

A feed answers one question per readable event: is a check of this netns due? It drains the
socket (a burst is read at once and kept as one bit, never queued), and says yes for a change to
one of our objects made by someone else, and for an overrun (`ENOBUFS`: notifications were lost,
so anything may have changed). A commit by one of this process's own threads (the agent's own
repair) is not a reason: the kernel names the committing thread in `NFT_MSG_NEWGEN`. rtnetlink
names no one; a check after our own routing write finds nothing to do and writes nothing.

A socket belongs to the netns it was created in, so it is created inside it, on a thread that
shares the process's fd table (`FeedOpener`; the netns workers' fds are private). It also holds a
reference to that netns, which outlives its mounts while the socket is open: whoever opens one
closes it when the pod goes.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import resource
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netns import NetnsId, entered

__all__ = [
    "FDS_PER_POD",
    "NFT_MSG_NEWGEN",
    "FdLimit",
    "Feed",
    "FeedOpener",
    "HostRuleFeed",
    "NftFeed",
    "RouteFeed",
    "Watched",
    "committer",
    "groups_mask",
    "open_feeds",
    "own_thread",
    "raise_fd_limit",
    "subscribe",
]

# linux/netfilter/nfnetlink.h, linux/rtnetlink.h
NFNLGRP_NFTABLES: Final = 7
RTNLGRP_IPV4_ROUTE: Final = 7
RTNLGRP_IPV4_RULE: Final = 8
RTNLGRP_IPV6_ROUTE: Final = 11
RTNLGRP_IPV6_RULE: Final = 19
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
NFT_MSG_NEWGEN: Final = netlink.nft_type(15)
_NFTA_TABLE: Final = 1
"""The table name attribute of every nftables object message."""
_NFTA_GEN_PROC_PID: Final = 2
_RTA_TABLE = _FRA_TABLE = 15
_FRA_PRIORITY: Final = 6
_FRA_FWMARK: Final = 10
_RTMSG_SIZE: Final = 12
"""`struct rtmsg` and `struct fib_rule_hdr` are both 12 bytes, with the table in byte 4."""
_HEADER_TABLE: Final = 4
_U32: Final = struct.Struct("=I")
_BE32: Final = struct.Struct("!I")
_BUFSIZE: Final = 1 << 16

OUR_TABLES: Final = frozenset(t.encode() + b"\0" for t in (*c.POD_TABLES, c.HOST_TABLE))
FDS_PER_POD: Final = 2
"""Notification sockets per watched pod netns: nftables, and rtnetlink rules/routes."""


def groups_mask(*numbers: int) -> int:
    """The bind() bitmask of multicast groups (group n is bit n - 1; all ours are below 32)."""
    mask = 0
    for n in numbers:
        mask |= 1 << (n - 1)
    return mask


def own_thread(tid: int) -> bool:
    """Whether `tid` is a thread of this process (one of its netns workers committed)."""
    return Path(f"/proc/self/task/{tid}").exists()


class Feed:
    """One subscribed netlink socket; `read()` drains it and says whether a check is due."""

    kind = "netlink"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bool:
        """Drain every queued notification; whether one of them (or an overrun) calls for a
        check. Raises OSError when the socket fails (the caller checks, and opens a new one)."""
        due = False
        while True:
            try:
                data = self.sock.recv(_BUFSIZE)
            except BlockingIOError:
                return due
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._lost()
                due = True  # notifications were dropped: anything may have changed
                continue
            for kind, _flags, _seq, start, end in netlink.messages(data):
                due = self._consume(kind, data, start, end) or due

    def _consume(self, kind: int, data: bytes, start: int, end: int) -> bool:
        raise NotImplementedError

    def _lost(self) -> None:
        """Notifications were dropped: forget what was half read."""

    def close(self) -> None:
        self.sock.close()


class NftFeed(Feed):
    """nftables notifications: due when a commit by another process touched one of our tables."""

    kind = "nft"

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._touched = False
        """An object message of the commit being read named one of our tables."""

    def _consume(self, kind: int, data: bytes, start: int, end: int) -> bool:
        body = start + netlink.NFGENMSG.size
        if kind == NFT_MSG_NEWGEN:
            touched, self._touched = self._touched, False
            return touched and not own_thread(committer(data, body, end))
        if not self._touched:
            for attr, at, attr_end in netlink.attributes(data, body, end):
                if attr & netlink.NLA_TYPE_MASK == _NFTA_TABLE:
                    self._touched = data[at:attr_end] in OUR_TABLES
                    break
        return False

    def _lost(self) -> None:
        self._touched = False


def committer(data: bytes, start: int, end: int) -> int:
    """The task id in an NFT_MSG_NEWGEN whose attributes are data[start:end] (0, never ours,
    when it is missing)."""
    for attr, at, _end in netlink.attributes(data, start, end):
        if attr & netlink.NLA_TYPE_MASK == _NFTA_GEN_PROC_PID:
            tid: int = _BE32.unpack_from(data, at)[0]
            return tid
    return 0


class RouteFeed(Feed):
    """rtnetlink rule and route notifications: due when one names our table, priority or mark."""

    kind = "route"

    def _consume(self, kind: int, data: bytes, start: int, end: int) -> bool:
        if kind not in (RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE):
            return False
        if end - start < _RTMSG_SIZE or data[start + _HEADER_TABLE] == c.ROUTE_TABLE:
            return True  # ours (or not understood: a check decides)
        ours = _OUR_RULE_ATTRS if kind in (RTM_NEWRULE, RTM_DELRULE) else _OUR_ROUTE_ATTRS
        for attr, at, _end in netlink.attributes(data, start + _RTMSG_SIZE, end):
            value = ours.get(attr & netlink.NLA_TYPE_MASK)
            if value is not None and _U32.unpack_from(data, at)[0] == value:
                return True
        return False


_OUR_ROUTE_ATTRS: Final = {_RTA_TABLE: c.ROUTE_TABLE}
_OUR_RULE_ATTRS: Final = {
    _FRA_TABLE: c.ROUTE_TABLE,
    _FRA_PRIORITY: c.RULE_PRIORITY,
    _FRA_FWMARK: c.CONNMARK,
}
"""Attributes (u32) whose value makes a rule or route notification one of ours."""


class HostRuleFeed(Feed):
    """rtnetlink rule notifications of the host: due for every rule added or deleted (the probe
    rules of branch-ENI pods follow the VPC CNI's rules, which are not ours)."""

    kind = "rule"

    def _consume(self, kind: int, data: bytes, start: int, end: int) -> bool:
        return kind in (RTM_NEWRULE, RTM_DELRULE)


class Watched(enum.Enum):
    """What is watched in a netns."""

    POD = "pod"
    """Our tables; our rules and routes."""
    HOST = "host"
    """Our table (the host has no routing of ours)."""
    HOST_WITH_RULES = "host_with_rules"
    """Our table, and every ip rule: the branch-ENI probe rules are on (§4.5)."""


def subscribe(protocol: int, groups: int) -> socket.socket:
    """A non-blocking netlink socket of the calling thread's current netns, in `groups`."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol
    )
    try:
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def open_feeds(watched: Watched) -> list[Feed]:
    """Feeds of the calling thread's current netns: nftables, and rtnetlink as `watched` says
    (IPv4 and IPv6: a v6 rule of ours may be deleted on a v4-only pod too)."""
    feeds: list[Feed] = [
        NftFeed(subscribe(netlink.NETLINK_NETFILTER, groups_mask(NFNLGRP_NFTABLES)))
    ]
    try:
        if watched is Watched.POD:
            groups = groups_mask(
                RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE
            )
            feeds.append(RouteFeed(subscribe(netlink.NETLINK_ROUTE, groups)))
        elif watched is Watched.HOST_WITH_RULES:
            groups = groups_mask(RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE)
            feeds.append(HostRuleFeed(subscribe(netlink.NETLINK_ROUTE, groups)))
    except BaseException:
        feeds[0].close()
        raise
    return feeds


def _open_in(path: str, expect: NetnsId | None, watched: Watched) -> list[Feed]:
    with entered(path, expect=expect, shared_fds=True):
        return open_feeds(watched)


class FeedOpener:
    """Opens feeds inside a netns, on its own thread: one that shares the process's fd table
    (the event loop serves the sockets) and is not the event loop's (which never enters a
    netns). Opening costs a few microseconds; one thread is plenty."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-watch")

    async def open(self, path: str, expect: NetnsId | None, watched: Watched) -> list[Feed]:
        """Feeds of the netns at `path` (NetnsNotFoundError when it no longer names `expect`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _open_in, path, expect, watched)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class FdLimit:
    """RLIMIT_NOFILE after `raise_fd_limit` (-1: unlimited)."""

    was: int
    soft: int
    hard: int
    enough: bool
    """The soft limit is at least what was wanted."""


def raise_fd_limit(wanted: int) -> FdLimit:
    """Raise this process's soft RLIMIT_NOFILE to `wanted`, capped by the hard limit, never
    lowered.

    Safe here, unlike in most C programs: libnftables, the one `select()` user, only ever runs
    on netns workers whose private fd tables keep its socket's number low (§12.2)."""
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == unlimited or soft >= wanted:
        return FdLimit(soft, soft, hard, enough=True)
    target = wanted if hard == unlimited else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    new = max(target, soft)
    return FdLimit(soft, new, hard, enough=new >= wanted)
