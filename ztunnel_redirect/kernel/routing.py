"""Policy routing in a pod netns (docs/design.md §3): `fwmark 0x111/0xfff lookup 100` and a local
default route in table 100, so replies on ztunnel→app connections go back to ztunnel.

Messages are built with pyroute2's netlink message classes and sent on a plain blocking
rtnetlink socket, from a `NetnsRunner` worker that entered the pod's netns. The messages are the
same for every pod, so they are encoded once. (pyroute2's socket classes run an event loop per
socket and cost ~2 ms per pod here; this costs ~0.05 ms: docs/design.md §12.8.)

Only objects that match ours exactly (priority, mark, mask, table) are read or removed.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any, Final

from pyroute2.netlink.rtnl import (
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)

_HEADER: Final = netlink.NLMSG
_RTPROT_BOOT: Final = 3
_RT_SCOPE_HOST: Final = 254
_RTN_LOCAL: Final = 2
_LO_INDEX: Final = 1  # loopback is always ifindex 1 in a network namespace


class Family(Enum):
    V4 = socket.AF_INET
    V6 = socket.AF_INET6


class RoutingKind(Enum):
    IP_RULE = "ip rule"
    ROUTE = "route"


@dataclass(frozen=True)
class RoutingItem:
    what: RoutingKind
    family: Family

    def __str__(self) -> str:
        v = "-6 " if self.family is Family.V6 else ""
        if self.what is RoutingKind.IP_RULE:
            return (
                f"ip {v}rule fwmark {c.CONNMARK:#x}/{c.CONNMARK_MASK:#x} "
                f"lookup {c.ROUTE_TABLE} priority {c.RULE_PRIORITY}"
            )
        dst = "::/0" if self.family is Family.V6 else "0.0.0.0/0"
        return f"ip {v}route local {dst} dev lo table {c.ROUTE_TABLE}"


@cache
def _rule_msg(family: Family, kind: int, flags: int) -> bytes:
    msg = fibmsg()
    msg["family"] = family.value
    msg["action"] = FR_ACT_TO_TBL
    msg["table"] = c.ROUTE_TABLE
    msg["attrs"] = [
        ("FRA_PRIORITY", c.RULE_PRIORITY),
        ("FRA_FWMARK", c.CONNMARK),
        ("FRA_FWMASK", c.CONNMARK_MASK),
        ("FRA_TABLE", c.ROUTE_TABLE),
    ]
    return netlink.pyroute2_bytes(msg, kind, flags)


@cache
def _route_msg(family: Family, kind: int, flags: int) -> bytes:
    msg = rtmsg()
    msg["family"] = family.value
    msg["dst_len"] = 0
    msg["table"] = c.ROUTE_TABLE
    msg["proto"] = _RTPROT_BOOT
    msg["scope"] = _RT_SCOPE_HOST
    msg["type"] = _RTN_LOCAL
    msg["attrs"] = [("RTA_TABLE", c.ROUTE_TABLE), ("RTA_OIF", _LO_INDEX)]
    return netlink.pyroute2_bytes(msg, kind, flags)


@cache
def dump_request(cls: Any, kind: int) -> bytes:
    """A dump of both families at once (family AF_UNSPEC): one round trip instead of two."""
    msg = cls()
    msg["family"] = socket.AF_UNSPEC
    return netlink.pyroute2_bytes(msg, kind, NLM_F_REQUEST | NLM_F_DUMP)


class Rtnl:
    """A blocking rtnetlink socket in the current netns (create it on a worker in the netns)."""

    def __init__(self) -> None:
        self._sock = netlink.open_socket(netlink.NETLINK_ROUTE)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, messages: list[bytes], *, ok: frozenset[int] = frozenset()) -> None:
        """Send requests in one write; each gets an ack. Errnos in `ok` count as success."""
        netlink.acks(self._sock, b"".join(messages), len(messages), ok=ok, what="rtnetlink")

    def get(self, request: bytes) -> bytes:
        """The one message answering a request that is not a dump."""
        _kind, data, start, end = netlink.get(self._sock, request, what="rtnetlink")
        return data[start - _HEADER.size : end]

    def dump(self, request: bytes) -> Iterator[bytes]:
        for _kind, _flags, data, start, end in netlink.dump(
            self._sock, request, what="rtnetlink dump"
        ):
            yield data[start - _HEADER.size : end]


# Loopback's IPv6 settings in an RTM_NEWLINK message (linux/if_link.h, linux/ipv6.h): after
# the 16-byte ifinfomsg, IFLA_AF_SPEC nests one attribute per address family; AF_INET6's nests
# IFLA_INET6_CONF, an array of s32 indexed by DEVCONF_*.
_IFINFOMSG_SIZE: Final = 16
_IFLA_EXT_MASK, _IFLA_AF_SPEC, _IFLA_INET6_CONF = 29, 26, 2
_RTEXT_FILTER_SKIP_STATS: Final = 1 << 3
_DEVCONF_DISABLE_IPV6: Final = 26
_S32 = struct.Struct("=i")


@cache
def _getlink_lo_msg() -> bytes:
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = _LO_INDEX
    msg["attrs"] = [("IFLA_EXT_MASK", _RTEXT_FILTER_SKIP_STATS)]  # no counters: a smaller answer
    return netlink.pyroute2_bytes(msg, RTM_GETLINK, NLM_F_REQUEST)


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """The attributes in data[start:end], (payload offset, payload end) by type."""
    return {
        kind & netlink.NLA_TYPE_MASK: (at, until)
        for kind, at, until in netlink.attributes(data, start, end)
    }


def ipv6_usable(*, rtnl: Rtnl | None = None) -> bool:
    """IPv6 on loopback in the current netns (a pod can disable it: then no v6 route).

    Asked over rtnetlink (`rtnl`, or a socket opened for the call), not by reading
    /proc/sys/net/ipv6/conf/lo/disable_ipv6: the kernel keeps a /proc/sys dentry per netns that
    opened that file, all with the same name, and each open compared them one by one (0.06 ms
    with 10 netns on the node, 0.74 ms with 2000). A kernel without IPv6 (or booted with
    ipv6.disable=1) lists no AF_INET6 settings: not usable, as that file did not exist there.
    """
    if rtnl is None:
        with Rtnl() as own:
            return ipv6_usable(rtnl=own)
    link = rtnl.get(_getlink_lo_msg())
    none = (0, 0)
    spec = _attrs(link, _HEADER.size + _IFINFOMSG_SIZE, len(link)).get(_IFLA_AF_SPEC, none)
    inet6 = _attrs(link, *spec).get(socket.AF_INET6, none)
    start, end = _attrs(link, *inet6).get(_IFLA_INET6_CONF, none)
    if end - start < _S32.size * (_DEVCONF_DISABLE_IPV6 + 1):
        return False
    disabled: int = _S32.unpack_from(link, start + _S32.size * _DEVCONF_DISABLE_IPV6)[0]
    return disabled != 1


def _families(ipv6: bool) -> list[Family]:
    return [Family.V4, Family.V6] if ipv6 else [Family.V4]


# Offsets in a dumped message: nlmsghdr (16 bytes), then fib_rule_hdr / rtmsg, whose bytes are
# family, dst_len, src_len, tos, table, ... and, for rtmsg, protocol, scope, type.
_FAMILY, _DST_LEN, _TABLE, _TYPE = (_HEADER.size + n for n in (0, 1, 4, 7))
_FAMILIES: dict[int, Family] = {int(f.value): f for f in Family}


# Attribute types read back (linux/fib_rules.h, linux/rtnetlink.h); all are u32.
_FRA_PRIORITY, _FRA_FWMARK, _FRA_FWMASK, _RTA_OIF = 6, 10, 16, 4
_U32 = struct.Struct("=I")
_FIXED_HEADER = 12  # fib_rule_hdr and rtmsg are both 12 bytes


def _u32_attrs(msg: bytes) -> dict[int, int]:
    """The 4-byte attributes of a dumped rule or route message, by type."""
    return {
        kind & netlink.NLA_TYPE_MASK: _U32.unpack_from(msg, at)[0]
        for kind, at, end in netlink.attributes(msg, _HEADER.size + _FIXED_HEADER, len(msg))
        if end - at == _U32.size
    }


def present(rtnl: Rtnl) -> set[RoutingItem]:
    """Our ip rules and routes in the current netns, both families, in two dumps. Reads only.

    Requests are encoded with pyroute2's message classes (once); reading back only needs four
    u32 attributes of the few messages whose fixed header could be ours, so those are read
    directly (decoding every message with pyroute2 dominated a check). Dumps are read to the end.
    """
    found: set[RoutingItem] = set()
    for raw in rtnl.dump(dump_request(fibmsg, RTM_GETRULE)):
        if raw[_TABLE] != c.ROUTE_TABLE or raw[_FAMILY] not in _FAMILIES:
            continue
        attrs = _u32_attrs(raw)
        if (
            attrs.get(_FRA_PRIORITY) == c.RULE_PRIORITY
            and attrs.get(_FRA_FWMARK) == c.CONNMARK
            and attrs.get(_FRA_FWMASK) == c.CONNMARK_MASK
        ):
            found.add(RoutingItem(RoutingKind.IP_RULE, _FAMILIES[raw[_FAMILY]]))
    for raw in rtnl.dump(dump_request(rtmsg, RTM_GETROUTE)):
        if (
            raw[_TABLE] != c.ROUTE_TABLE
            or raw[_TYPE] != _RTN_LOCAL
            or raw[_DST_LEN]
            or raw[_FAMILY] not in _FAMILIES
        ):
            continue
        if _u32_attrs(raw).get(_RTA_OIF) == _LO_INDEX:
            found.add(RoutingItem(RoutingKind.ROUTE, _FAMILIES[raw[_FAMILY]]))
    return found


@dataclass(frozen=True)
class RoutingDiff:
    missing: tuple[RoutingItem, ...] = ()
    stale: tuple[RoutingItem, ...] = ()
    """Ours, but not wanted with these options (IPv6 turned off for the pod)."""


def check(rtnl: Rtnl, *, ipv6: bool) -> RoutingDiff:
    """What of our routing is missing in the current netns, and what of ours is there but not
    wanted. Reads only."""
    have = present(rtnl)
    wanted = everything(rtnl, ipv6=ipv6)
    return RoutingDiff(
        tuple(item for item in wanted if item not in have),
        tuple(sorted((item for item in have if item not in wanted), key=str)),
    )


def add(rtnl: Rtnl, missing: Sequence[RoutingItem]) -> None:
    """Add the given objects (idempotent: an existing rule is fine, routes are replaced)."""
    messages = []
    for m in missing:
        if m.what is RoutingKind.IP_RULE:
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
            messages.append(_rule_msg(m.family, RTM_NEWRULE, flags))
        else:
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
            messages.append(_route_msg(m.family, RTM_NEWROUTE, flags))
    if messages:
        rtnl.request(messages, ok=frozenset({errno.EEXIST}))


def everything(rtnl: Rtnl, *, ipv6: bool) -> list[RoutingItem]:
    """All our routing objects for these options (what a fresh pod is missing)."""
    v6 = ipv6 and ipv6_usable(rtnl=rtnl)
    return [RoutingItem(RoutingKind.IP_RULE, f) for f in _families(ipv6)] + [
        RoutingItem(RoutingKind.ROUTE, f) for f in _families(v6)
    ]


def delete(rtnl: Rtnl, items: Sequence[RoutingItem]) -> list[str]:
    """Delete these objects of ours; what is not there is fine."""
    removed = []
    for item in items:
        if item.what is RoutingKind.IP_RULE:
            msg = _rule_msg(item.family, RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK)
        else:
            msg = _route_msg(item.family, RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK)
        rtnl.request([msg], ok=frozenset({errno.ENOENT, errno.ESRCH}))
        removed.append(str(item))
    return removed


def remove(rtnl: Rtnl) -> list[str]:
    """Remove our ip rules and routes, both families."""
    return delete(rtnl, sorted(present(rtnl), key=str))
