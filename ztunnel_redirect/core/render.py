"""Rendering the desired nftables state (pure: no I/O).

The pod ruleset is docs/design.md §2 and the host ruleset docs/design.md §4, with table and chain
names, hooks, priorities and rule semantics exactly as Istio's nftables backend, so that
`nft list ruleset` in a pod looks the same as with Istio and its debugging guidance applies.

A `Table` renders to exactly the text `nft -f` reads (the same add/flush/add transaction that
Istio's knftables code sends), so a golden test is a plain text diff and a logged script can be
pasted into `nft -f`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.model import HostOptions, PodOptions, valid_interface_name

FAMILY = "inet"
PROBE_SET_COMMENT = "UUID of the pods that are part of ambient mesh"

_MARK_IS_ZTUNNEL = f"meta mark & {c.ZTUNNEL_MASK:#x} == {c.ZTUNNEL_MARK:#x}"
_MARK_NOT_ZTUNNEL = f"meta mark & {c.ZTUNNEL_MASK:#x} != {c.ZTUNNEL_MARK:#x}"


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str | None = None
    """`type <t> hook <h> priority <p>` for a base chain; None for a regular chain."""


@dataclass(frozen=True)
class NftSet:
    name: str
    type: str
    comment: str


@dataclass(frozen=True)
class Rule:
    chain: str
    text: str


@dataclass(frozen=True)
class Table:
    """One nftables table of family inet that we own, with everything in it."""

    name: str
    chains: tuple[Chain, ...]
    rules: tuple[Rule, ...]
    sets: tuple[NftSet, ...] = ()

    @property
    def ref(self) -> str:
        return f"{FAMILY} {self.name}"

    def script(self) -> str:
        """Istio's transaction for this table: add, flush, then every object again."""
        lines = [f"add table {self.ref}", f"flush table {self.ref}"]
        lines += [
            f'add set {self.ref} {s.name} {{ type {s.type} ; comment "{s.comment}" ; }}'
            for s in self.sets
        ]
        for chain in self.chains:
            body = f" {{ {chain.hook} ; }}" if chain.hook else ""
            lines.append(f"add chain {self.ref} {chain.name}{body}")
        lines += [f"add rule {self.ref} {rule.chain} {rule.text}" for rule in self.rules]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Ruleset:
    """The tables that must exist, and the ones of ours that must not (stale ones get removed)."""

    tables: tuple[Table, ...]
    absent: tuple[str, ...] = ()

    def script(self) -> str:
        return "".join(table.script() for table in self.tables)

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)


def _hooked_table(name: str, *, kind: str, priority: int, rules: list[Rule]) -> Table:
    """A pod table: base chains prerouting/output jumping to istio-prerouting/istio-output."""
    output_kind = "route" if name == c.MANGLE_TABLE else kind
    chains = (
        Chain("prerouting", f"type {kind} hook prerouting priority {priority}"),
        Chain("output", f"type {output_kind} hook output priority {priority}"),
        Chain("istio-prerouting"),
        Chain("istio-output"),
    )
    jumps = [Rule("prerouting", "jump istio-prerouting"), Rule("output", "jump istio-output")]
    return Table(name, chains, tuple(jumps + rules))


def _check_ifname(name: str) -> str:
    if not valid_interface_name(name):
        raise ConfigError(f"invalid interface name {name!r}")
    return name


def _nat_table(o: PodOptions) -> Table:
    def both(v4: str, v6: str) -> list[str]:
        return [v4, v6] if o.ipv6 else [v4]

    pre: list[str] = []
    for iface in o.virtual_interfaces:
        name = _check_ifname(iface)
        pre += [
            f'iifname "{name}" meta l4proto tcp counter redirect to :{c.OUTBOUND_PORT}',
            f'iifname "{name}" meta l4proto tcp counter return',
        ]
    if not o.bypass_inbound:
        pre += both(
            f"meta l4proto tcp ip saddr {o.probe_snat_v4} counter accept",
            f"meta l4proto tcp ip6 saddr {o.probe_snat_v6} counter accept",
        )
        inbound = (
            f"tcp dport != {c.HBONE_PORT} {_MARK_NOT_ZTUNNEL} "
            f"counter redirect to :{c.INBOUND_PLAINTEXT_PORT}"
        )
        pre += both(f"ip daddr != 127.0.0.1/32 {inbound}", f"ip6 daddr != ::1/128 {inbound}")

    out = both(
        f"meta l4proto tcp ip daddr {o.probe_snat_v4} counter accept",
        f"meta l4proto tcp ip6 daddr {o.probe_snat_v6} counter accept",
    )
    if o.dns_capture:
        dns = f"{_MARK_NOT_ZTUNNEL} counter redirect to :{c.DNS_PORT}"
        out.append(
            f'oifname != "lo" {_MARK_NOT_ZTUNNEL} udp dport 53 counter redirect to :{c.DNS_PORT}'
        )
        out += both(
            f"ip daddr != 127.0.0.1/32 tcp dport 53 {dns}",
            f"ip6 daddr != ::1/128 tcp dport 53 {dns}",
        )
    out.append(
        f"meta l4proto tcp meta mark & {c.CONNMARK_MASK:#x} == {c.CONNMARK:#x} counter accept"
    )
    out += both(
        'oifname "lo" ip daddr != 127.0.0.1/32 counter accept',
        'oifname "lo" ip6 daddr != ::1/128 counter accept',
    )
    outbound = f"{_MARK_NOT_ZTUNNEL} counter redirect to :{c.OUTBOUND_PORT}"
    out += both(
        f"meta l4proto tcp ip daddr != 127.0.0.1/32 {outbound}",
        f"meta l4proto tcp ip6 daddr != ::1/128 {outbound}",
    )
    rules = [Rule("istio-prerouting", r) for r in pre] + [Rule("istio-output", r) for r in out]
    return _hooked_table(c.NAT_TABLE, kind="nat", priority=-100, rules=rules)


def _mangle_table() -> Table:
    keep = 0xFFFFFFFF ^ c.CONNMARK_MASK
    rules = [
        Rule(
            "istio-prerouting",
            f"{_MARK_IS_ZTUNNEL} counter ct mark set ct mark & {keep:#010x} | {c.CONNMARK:#x}",
        ),
        Rule(
            "istio-output",
            f"ct mark & {c.CONNMARK_MASK:#x} == {c.CONNMARK:#x} counter meta mark set ct mark",
        ),
    ]
    return _hooked_table(c.MANGLE_TABLE, kind="filter", priority=-150, rules=rules)


def _raw_table() -> Table:
    rules = [
        Rule("istio-output", f"udp dport 53 {_MARK_IS_ZTUNNEL} counter ct zone set 1"),
        Rule("istio-prerouting", f"udp sport 53 {_MARK_NOT_ZTUNNEL} counter ct zone set 1"),
    ]
    return _hooked_table(c.RAW_TABLE, kind="filter", priority=-300, rules=rules)


@functools.cache
def pod_ruleset(options: PodOptions) -> Ruleset:
    """The in-pod redirection of docs/design.md §2 for one combination of options (cached: a drift
    pass asks for every pod's, and nodes have few distinct combinations)."""
    tables = [_nat_table(options), _mangle_table()]
    absent: tuple[str, ...] = ()
    if options.dns_capture:
        tables.append(_raw_table())
    else:
        absent = (c.RAW_TABLE,)
    return Ruleset(tuple(tables), absent)


@functools.cache
def host_ruleset(options: HostOptions) -> Ruleset:
    """The host's probe SNAT of docs/design.md §4: two sets of enrolled pod IPs and one postrouting
    chain."""
    sets = [NftSet(c.HOST_SET_V4, "ipv4_addr", PROBE_SET_COMMENT)]
    rules = [
        Rule(
            "postrouting",
            f"meta l4proto tcp meta skuid {options.kubelet_uid} "
            f"ip daddr @{c.HOST_SET_V4} counter snat ip to {options.probe_snat_v4}",
        )
    ]
    if options.ipv6:
        sets.append(NftSet(c.HOST_SET_V6, "ipv6_addr", PROBE_SET_COMMENT))
        rules.append(
            Rule(
                "postrouting",
                f"meta l4proto tcp meta skuid {options.kubelet_uid} "
                f"ip6 daddr @{c.HOST_SET_V6} counter snat ip6 to {options.probe_snat_v6}",
            )
        )
    table = Table(
        c.HOST_TABLE,
        chains=(Chain("postrouting", "type nat hook postrouting priority 100"),),
        rules=tuple(rules),
        sets=tuple(sets),
    )
    return Ruleset((table,))


def element_family_set(ip: str) -> str:
    """The host set that holds a pod IP."""
    return c.HOST_SET_V6 if ":" in ip else c.HOST_SET_V4
