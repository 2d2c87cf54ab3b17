"""What the kernel lists back for our tables, and how it differs from the desired state (pure).

Comparisons are kernel listing against kernel listing: the expected listing comes from loading
the desired ruleset into a scratch netns, because nft rewrites expressions when it lists them
(docs/design.md §12.6). Counters and handles are not part of a stateless listing.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

_ELEMENT = re.compile(r'([0-9A-Fa-f:.]+)(?:\s+comment\s+"([^"]*)")?')


@dataclass(frozen=True)
class TableListing:
    """A table as the kernel lists it: each chain's and set's lines, set elements apart.

    Counters and handles are not in it (stateless listing), so two listings of the same
    ruleset compare equal whatever traffic went through.
    """

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)
    """set name -> {ip: comment}"""
    attributes: tuple[str, ...] = ()
    """Table-level lines, e.g. `flags dormant` (a dormant table redirects nothing)."""
    others: tuple[str, ...] = ()
    """Objects we never create (maps, flowtables, named counters...), by their header line."""

    @classmethod
    def parse(cls, text: str) -> TableListing:
        listing = cls()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        i = 1  # skip "table inet <name> {"
        attributes: list[str] = []
        others: list[str] = []
        while i < len(lines) - 1:
            if not lines[i].endswith("{"):
                attributes.append(lines[i])
                i += 1
                continue
            header = lines[i]
            kind, name, _ = [*header.split(" ", 2), "", ""][:3]
            i += 1
            body: list[str] = []
            while i < len(lines) and lines[i] != "}":
                if lines[i].startswith("elements = {"):
                    chunk = lines[i]
                    while not chunk.rstrip().endswith("}") and i + 1 < len(lines):
                        i += 1
                        chunk += " " + lines[i]
                    inner = chunk[len("elements = {") : chunk.rindex("}")]
                    listing.elements[name] = {
                        m.group(1): m.group(2) or "" for m in _ELEMENT.finditer(inner)
                    }
                else:
                    body.append(lines[i])
                i += 1
            i += 1  # the closing brace
            if kind == "chain":
                listing.chains[name] = tuple(body)
            elif kind == "set":
                listing.sets[name] = tuple(body)
                listing.elements.setdefault(name, {})
            else:
                others.append(header)
        return dataclasses.replace(listing, attributes=tuple(attributes), others=tuple(others))


class DriftKind(Enum):
    MISSING_TABLE = "missing_table"
    STALE_TABLE = "stale_table"
    MISSING_CHAIN = "missing_chain"
    EXTRA_CHAIN = "extra_chain"
    CHANGED_CHAIN = "changed_chain"
    MISSING_RULE = "missing_rule"
    EXTRA_RULE = "extra_rule"
    CHANGED_SET = "changed_set"
    CHANGED_TABLE = "changed_table"
    MISSING_ELEMENT = "missing_element"
    EXTRA_ELEMENT = "extra_element"
    MISSING_IP_RULE = "missing_ip_rule"
    MISSING_ROUTE = "missing_route"
    STALE_IP_RULE = "stale_ip_rule"
    STALE_ROUTE = "stale_route"


@dataclass(frozen=True)
class Drift:
    """One difference between the kernel and the desired state."""

    kind: DriftKind
    table: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.table}: " if self.table else ""
        return f"{self.kind.value}: {where}{self.detail}".rstrip(": ")


def _is_header(line: str) -> bool:
    return line.startswith("type ")


def diff_table(name: str, expected: TableListing, actual: TableListing | None) -> list[Drift]:
    """Precise differences of chains, rules and set definitions (not set elements)."""
    if actual is None:
        return [Drift(DriftKind.MISSING_TABLE, name)]
    drifts = [
        Drift(DriftKind.MISSING_CHAIN, name, chain)
        for chain in expected.chains
        if chain not in actual.chains
    ]
    drifts += [
        Drift(DriftKind.EXTRA_CHAIN, name, chain)
        for chain in actual.chains
        if chain not in expected.chains
    ]
    for chain, want in expected.chains.items():
        have = actual.chains.get(chain)
        if have is None or have == want:
            continue
        want_head = [line for line in want if _is_header(line)]
        have_head = [line for line in have if _is_header(line)]
        if want_head != have_head:
            drifts.append(Drift(DriftKind.CHANGED_CHAIN, name, f"{chain}: {' '.join(have_head)}"))
        want_rules = Counter(line for line in want if not _is_header(line))
        have_rules = Counter(line for line in have if not _is_header(line))
        drifts += [
            Drift(DriftKind.MISSING_RULE, name, f"{chain}: {rule}")
            for rule in (want_rules - have_rules).elements()
        ]
        drifts += [
            Drift(DriftKind.EXTRA_RULE, name, f"{chain}: {rule}")
            for rule in (have_rules - want_rules).elements()
        ]
        if want_head == have_head and want_rules == have_rules:
            drifts.append(Drift(DriftKind.CHANGED_CHAIN, name, f"{chain}: rule order"))
    drifts += [
        Drift(DriftKind.CHANGED_SET, name, set_name)
        for set_name, want_set in expected.sets.items()
        if actual.sets.get(set_name) != want_set
    ]
    if actual.attributes != expected.attributes:
        drifts.append(Drift(DriftKind.CHANGED_TABLE, name, " ".join(actual.attributes)))
    extra = [f"set {s}" for s in actual.sets if s not in expected.sets] + list(actual.others)
    drifts += [Drift(DriftKind.CHANGED_TABLE, name, f"extra {what}") for what in extra]
    return drifts
