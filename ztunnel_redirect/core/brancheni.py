"""Kubelet probes to AWS branch-ENI pods (EKS Security Groups for Pods): which two ip rules the
host needs for each enrolled pod, decided from the host's ip rules and routes (docs/design.md §4.5).

The VPC CNI gives a branch-ENI pod its own route table N (a host route to the pod through its
host-side veth, a default route through the pod's VLAN) and `iif <veth> lookup N` rules, and moves
the host's `lookup local` rule after them. A probe from the host to such a pod finds no route in
main (it would leave for the VPC fabric, which drops the probe's link-local SNAT source), and the
pod's reply, arriving on the veth, is sent to the VLAN instead of being delivered locally. As
Istio does, for each such pod the host gets

- `to <pod IP>/32 lookup N priority 512`: the probe reaches the pod through the veth;
- `iif <veth> lookup local priority <P-1>`, P the priority of the VPC CNI's `iif <veth> lookup N`
  rule: the reply is delivered to the host before that rule sends it away.

Only where `net.ipv4.tcp_early_demux` is 0 (AWS requires it for Security Groups for Pods; the
kernel default is 1), so the detection is inert on every other node. Pure: the kernel side
(`kernel/brancheni.py`) reads the rules and routes and writes what is decided here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FORWARD_PRIORITY",
    "TABLE_LOCAL",
    "TABLE_MAIN",
    "HostRoute",
    "IpRule",
    "ProbeRule",
    "as_probe_rule",
    "is_ours",
    "probe_rules",
    "wanted",
]

TABLE_DEFAULT: Final = 253
TABLE_MAIN: Final = 254
TABLE_LOCAL: Final = 255
_RESERVED: Final = frozenset({0, TABLE_MAIN, TABLE_LOCAL})
"""Tables that are never a pod's own (Istio's detection skips exactly these)."""

FORWARD_PRIORITY: Final = 512
"""Istio's priority for `to <pod IP> lookup N`, the VPC CNI's for its own to-pod rules."""


@dataclass(frozen=True)
class IpRule:
    """An ip rule as read from the host. `plain`: no selector other than `iif` and `to`, and the
    action is a table lookup (a rule with more selectors is never one of ours)."""

    priority: int
    table: int
    iif: str | None = None
    dst: str | None = None
    """`ip/len`, normalised"""
    plain: bool = True
    ipv6: bool = False


@dataclass(frozen=True)
class HostRoute:
    """A route to a single address (/32 or /128) in a table other than main and local."""

    table: int
    dst: str
    dev: str


@dataclass(frozen=True, order=True)
class ProbeRule:
    """One of the two rules added for a branch-ENI pod: `dst` set (forward) or `iif` set
    (return)."""

    priority: int
    table: int
    dst: str | None = None
    iif: str | None = None
    ipv6: bool = False

    def __str__(self) -> str:
        v = "-6 " if self.ipv6 else ""
        match = f"to {self.dst}" if self.dst is not None else f"iif {self.iif}"
        table = "local" if self.table == TABLE_LOCAL else str(self.table)
        return f"ip {v}rule {match} lookup {table} priority {self.priority}"


def _host_prefix(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    return f"{address}/{address.max_prefixlen}"


def probe_rules(
    ip: str, rules: Iterable[IpRule], routes: Iterable[HostRoute]
) -> tuple[ProbeRule, ProbeRule] | None:
    """The two rules for the pod at `ip`, or None when it is not a branch-ENI pod.

    As Istio detects it: some table N (not main or local) has a host route to `ip` through a
    device D, and an ip rule `iif D lookup N` exists. Rules of the other address family are
    compared too (harmless: their tables hold no route to `ip`). The lowest table wins when
    several match, so the answer does not depend on listing order.
    """
    address = ipaddress.ip_address(ip)
    iif_rules: dict[tuple[int, str], int] = {}
    for rule in rules:
        if rule.iif is not None and rule.table not in _RESERVED:
            iif_rules.setdefault((rule.table, rule.iif), rule.priority)
    for route in sorted(routes, key=lambda r: (r.table, r.dev)):
        if ipaddress.ip_address(route.dst) != address:
            continue
        priority = iif_rules.get((route.table, route.dev))
        if priority is None:
            continue
        v6 = address.version == 6
        forward = ProbeRule(FORWARD_PRIORITY, route.table, dst=_host_prefix(ip), ipv6=v6)
        back = ProbeRule(max(priority - 1, 0), TABLE_LOCAL, iif=route.dev, ipv6=v6)
        return forward, back
    return None


def wanted(
    ips: Iterable[str], rules: Iterable[IpRule], routes: Iterable[HostRoute]
) -> set[ProbeRule]:
    """Every rule the enrolled pods at `ips` need."""
    rule_list, route_list = list(rules), list(routes)
    found: set[ProbeRule] = set()
    for ip in ips:
        pair = probe_rules(ip, rule_list, route_list)
        if pair is not None:
            found.update(pair)
    return found


def is_ours(rule: IpRule) -> bool:
    """A rule of one of the two shapes we add: `to <host address> lookup N priority 512` (N not
    main, local or default: the VPC CNI's own to-pod rules look up main) or `iif D lookup local`.
    The shapes are Istio's exactly, so a rule Istio added is recognised as well."""
    if not rule.plain:
        return False
    if rule.iif is None and rule.dst is not None:
        host = ipaddress.ip_network(rule.dst).prefixlen in (32, 128)
        return (
            host
            and rule.priority == FORWARD_PRIORITY
            and rule.table not in (*_RESERVED, TABLE_DEFAULT)
        )
    return rule.iif is not None and rule.dst is None and rule.table == TABLE_LOCAL


def as_probe_rule(rule: IpRule) -> ProbeRule:
    """A rule of ours (`is_ours`) as the ProbeRule it is."""
    return ProbeRule(rule.priority, rule.table, dst=rule.dst, iif=rule.iif, ipv6=rule.ipv6)
