"""The probe rules for AWS branch-ENI pods in the host netns (docs/design.md §4.5): read the
host's ip rules and routes, write the two rules per pod that `core.brancheni` decides.

Every function runs on a `NetnsRunner` worker that entered the host netns: the rtnetlink socket
and the `tcp_early_demux` sysctl read are both that netns's (a lab netns in tests, never the
test machine's own). Only rules of our two shapes (`core.brancheni.is_ours`) are ever removed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Collection, Iterable
from typing import Final

from pyroute2.netlink.rtnl import RTM_DELRULE, RTM_GETROUTE, RTM_GETRULE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ztunnel_redirect.core.brancheni import (
    TABLE_LOCAL,
    TABLE_MAIN,
    HostRoute,
    IpRule,
    ProbeRule,
    as_probe_rule,
    is_ours,
    wanted,
)
from ztunnel_redirect.core.drift import Drift, DriftKind
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from ztunnel_redirect.kernel.routing import Rtnl, dump_request

__all__ = ["add_pod_here", "early_demux_off", "remove_here", "remove_pod_here", "sync_here"]

EARLY_DEMUX: Final = "/proc/sys/net/ipv4/tcp_early_demux"
_RT_TABLE_COMPAT: Final = 252
"""The header's table byte when the table number does not fit (FRA_TABLE/RTA_TABLE carry it)."""
_RTN_UNICAST: Final = 1
_FIB_RULE_INVERT: Final = 0x2
_UNSET: Final = 0xFFFFFFFF
_OTHER_SELECTORS: Final = (
    "FRA_SRC",
    "FRA_OIFNAME",
    "FRA_GOTO",
    "FRA_UID_RANGE",
    "FRA_SPORT_RANGE",
    "FRA_DPORT_RANGE",
)


def early_demux_off() -> bool:
    """`net.ipv4.tcp_early_demux` is 0 in the current netns (unreadable counts as the kernel's
    default, 1, as Istio reads it)."""
    try:
        with open(EARLY_DEMUX, "rb") as f:
            return f.read(1) == b"0"
    except OSError:
        return False


def _plain(msg: fibmsg) -> bool:
    return (
        msg["src_len"] == 0
        and msg["tos"] == 0
        and msg["action"] == FR_ACT_TO_TBL
        and not msg["flags"] & _FIB_RULE_INVERT
        and not msg.get_attr("FRA_FWMARK")
        and not msg.get_attr("FRA_IP_PROTO")
        and not msg.get_attr("FRA_L3MDEV")
        and msg.get_attr("FRA_SUPPRESS_PREFIXLEN") in (None, _UNSET)
        and msg.get_attr("FRA_SUPPRESS_IFGROUP") in (None, _UNSET)
        and all(msg.get_attr(name) is None for name in _OTHER_SELECTORS)
    )


def _rules(rtnl: Rtnl) -> list[IpRule]:
    found = []
    for raw in rtnl.dump(dump_request(fibmsg, RTM_GETRULE)):
        msg = fibmsg(raw)
        msg.decode()
        dst = msg.get_attr("FRA_DST")
        found.append(
            IpRule(
                priority=msg.get_attr("FRA_PRIORITY") or 0,
                table=msg.get_attr("FRA_TABLE") or msg["table"],
                iif=msg.get_attr("FRA_IIFNAME"),
                dst=None if dst is None else str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")),
                plain=_plain(msg),
                ipv6=msg["family"] == socket.AF_INET6,
            )
        )
    return found


def _host_routes(rtnl: Rtnl) -> list[HostRoute]:
    """Routes to one address in tables other than main and local, with their device's name."""
    found = []
    for raw in rtnl.dump(dump_request(rtmsg, RTM_GETROUTE)):
        msg = rtmsg(raw)
        msg.decode()
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        full = 128 if msg["family"] == socket.AF_INET6 else 32
        oif = msg.get_attr("RTA_OIF")
        dst = msg.get_attr("RTA_DST")
        if (
            table in (TABLE_MAIN, TABLE_LOCAL)
            or msg["type"] != _RTN_UNICAST
            or msg["dst_len"] != full
            or oif is None
            or dst is None
        ):
            continue
        try:
            dev = socket.if_indextoname(oif)
        except OSError:
            continue  # the device went meanwhile
        found.append(HostRoute(table=table, dst=dst, dev=dev))
    return found


def _ours(rules: Iterable[IpRule]) -> set[ProbeRule]:
    return {as_probe_rule(r) for r in rules if is_ours(r)}


def _rule_msg(rule: ProbeRule, kind: int, flags: int) -> bytes:
    msg = fibmsg()
    msg["family"] = socket.AF_INET6 if rule.ipv6 else socket.AF_INET
    msg["action"] = FR_ACT_TO_TBL
    msg["table"] = rule.table if rule.table < 256 else _RT_TABLE_COMPAT
    attrs: list[tuple[str, object]] = [("FRA_PRIORITY", rule.priority), ("FRA_TABLE", rule.table)]
    if rule.dst is not None:
        address, length = rule.dst.split("/")
        msg["dst_len"] = int(length)
        attrs.append(("FRA_DST", address))
    else:
        attrs.append(("FRA_IIFNAME", rule.iif))
    msg["attrs"] = attrs
    return netlink.pyroute2_bytes(msg, kind, flags)


def _add(rtnl: Rtnl, rules: Collection[ProbeRule]) -> None:
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    if rules:
        rtnl.request(
            [_rule_msg(r, RTM_NEWRULE, flags) for r in sorted(rules)],
            ok=frozenset({errno.EEXIST}),
        )


def _delete(rtnl: Rtnl, rules: Collection[ProbeRule]) -> None:
    if rules:
        rtnl.request(
            [_rule_msg(r, RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK) for r in sorted(rules)],
            ok=frozenset({errno.ENOENT, errno.ESRCH}),
        )


def sync_here(ips: Iterable[str], *, enabled: bool, repair: bool) -> list[Drift]:
    """Bring our rules to what the enrolled pods at `ips` need (nothing when `enabled` is off
    or tcp_early_demux is on: then any of ours left over goes). Writes only with `repair`."""
    active = enabled and early_demux_off()
    with Rtnl() as rtnl:
        rules = _rules(rtnl)
        want = wanted(ips, rules, _host_routes(rtnl)) if active else set()
        have = _ours(rules)
        missing, stale = want - have, have - want
        if repair:
            _delete(rtnl, stale)
            _add(rtnl, missing)
    return [Drift(DriftKind.MISSING_IP_RULE, "", str(r)) for r in sorted(missing)] + [
        Drift(DriftKind.STALE_IP_RULE, "", str(r)) for r in sorted(stale)
    ]


def add_pod_here(ips: Iterable[str], *, enabled: bool) -> list[str]:
    """Add the rules one newly enrolled pod needs, if it is a branch-ENI pod (so its probes
    pass from the start, not from the next host pass)."""
    if not (enabled and early_demux_off()):
        return []
    with Rtnl() as rtnl:
        rules = _rules(rtnl)
        missing = wanted(ips, rules, _host_routes(rtnl)) - _ours(rules)
        _add(rtnl, missing)
    return [str(r) for r in sorted(missing)]


def remove_pod_here(ips: Iterable[str], *, enabled: bool) -> list[str]:
    """Remove the rules of pods leaving at `ips`: their forward rules, and every rule of ours
    that the pods still behind a forward rule do not need (the leaving pod's return rule: its
    veth may be gone already, so it cannot be named from the pod's routes)."""
    if not (enabled and early_demux_off()):
        return []  # the host pass removes leftovers
    leaving = {ipaddress.ip_address(ip) for ip in ips}
    with Rtnl() as rtnl:
        rules = _rules(rtnl)
        have = _ours(rules)
        staying = {
            r.dst.split("/")[0]
            for r in have
            if r.dst is not None and ipaddress.ip_address(r.dst.split("/")[0]) not in leaving
        }
        stale = have - wanted(staying, rules, _host_routes(rtnl))
        _delete(rtnl, stale)
    return [str(r) for r in sorted(stale)]


def remove_here() -> list[str]:
    """Remove every rule of ours (`cleanup`)."""
    with Rtnl() as rtnl:
        have = _ours(_rules(rtnl))
        _delete(rtnl, have)
    return [str(r) for r in sorted(have)]
