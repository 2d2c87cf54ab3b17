"""In-place migration from Istio's iptables backend to our nftables rules (docs/design.md §11.12,
§13.1; beyond Istio).

On a node where Istio's ambient agent ran with its iptables backend, every enrolled pod netns
holds Istio's chains `ISTIO_PRERT` and `ISTIO_OUTPUT` in the `mangle`, `nat` (and, with DNS
capture, `raw`) tables, jumped to from the built-in PREROUTING/OUTPUT chains, written with
`iptables-restore` in one of two flavours: iptables-nft (nftables tables `ip mangle`, `ip nat`,
`ip raw` and their `ip6` twins) or iptables-legacy (x_tables in the kernel). The host netns holds
the `ISTIO_POSTRT` chain in nat POSTROUTING, which SNATs kubelet's probes with
`--match-set istio-inpod-probes-v4|v6`, and those two ipsets. The ip rule
`fwmark 0x111/0xfff lookup 100` and the local route in table 100 are identical to ours and stay.

Order, per pod: our nftables tables are installed first (`podrules.apply_here`), then Istio's
chains are removed, one `iptables-restore --noflush` transaction per flavour and family, in which
every table changes atomically. There is no moment without redirection: before the removal
both rule sets are live, afterwards ours alone. Both redirect to the same ztunnel ports with the
same exemptions (mark 0x539, connmark 0x111, probe address), so it does not matter which one
handles a connection.

Why a connection cannot be redirected twice while both are live: nat chains see only the first
packet of a connection. The kernel's NAT core runs the nat base chains of a hook (ours, inet
priority -100, and iptables' nat PREROUTING/OUTPUT at the same priority, nft or legacy alike) in
turn for that first packet and stops at the first one that sets up a mapping; the mapping lives in
the conntrack entry and every later packet is translated from it without evaluating any nat rule.
So the first redirect wins, and the second rule set never sees the connection. The mangle and raw
rules of both sets write the same values (connmark 0x111, mark from connmark, ct zone 1; a ct
zone is only set on an untracked packet), so running both is the same as running one.
Connections that Istio's rules redirected before the removal keep their conntrack mapping.

The host part is the same: our host table (`render.host_ruleset`, with every enrolled pod's IP in
its sets) is written first, then `ISTIO_POSTRT` and its jump go, then the ipsets (a set cannot be
destroyed while a rule references it). Only once our sets hold every IP of Istio's ipsets that
belongs to a pod of this node to be enrolled: a pod still pending (no netns yet, ztunnel not
connected) would lose the SNAT of its kubelet probes. Until then the host part is postponed and
tried again (by the agent, on its next drift pass).

Detection has no side effects (docs/design.md §11.2): it reads with `iptables-*-save`, and only for
tables
that exist. `nft list tables` (names only) tells whether iptables-nft tables exist; for legacy,
`/proc/thread-self/net/ip_tables_names` does (this thread's netns; `/proc/net` would be the main
thread's), so no legacy tool ever runs in a netns without legacy tables (the x_tables of a netns
are instantiated on first use).

Every function named `*_here` runs on a `NetnsRunner` worker inside the target netns; subprocesses
are started from that thread, so they inherit its netns (docs/design.md §12.5). They do not log (see
`IptablesMigration`, the async face the agent uses).
"""

from __future__ import annotations

import ipaddress
import itertools
import shlex
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final

import structlog

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import TableListing
from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.kernel.netns import NetnsId, NetnsRunner
from ztunnel_redirect.kernel.nft import Nft
from ztunnel_redirect.kernel.podrules import KernelForms, PodState, apply_here
from ztunnel_redirect.kernel.routing import Family

__all__ = [
    "HOST_CHAINS",
    "POD_CHAINS",
    "SIDECAR_CHAINS",
    "Flavour",
    "IptablesMigration",
    "IstioIptables",
    "IstioTable",
    "MigrationError",
    "MigrationReport",
    "detect_here",
    "migrate_host_here",
    "migrate_pod_here",
    "parse_save",
    "remove_host_iptables_here",
    "remove_pod_iptables_here",
]

log = structlog.get_logger(__name__)

POD_CHAINS: Final = ("ISTIO_PRERT", "ISTIO_OUTPUT")
"""Istio's ambient chains in a pod netns (mangle, nat, raw)."""
HOST_CHAINS: Final = ("ISTIO_POSTRT",)
"""Istio's ambient chain in the host netns (nat)."""
SIDECAR_CHAINS: Final = ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_DIVERT")
"""Chains of Istio's sidecar mode, which also has an ISTIO_OUTPUT: never ours to touch."""
HOST_SETS: Final = (c.HOST_SET_V4, c.HOST_SET_V6)

TOOL_TIMEOUT: Final = 30.0
"""Bound on one iptables/ipset process (the xtables lock is waited for 5 s of it)."""
_SBIN: Final = "/usr/sbin:/sbin:/usr/bin:/bin"


class MigrationError(KernelError):
    """Istio's iptables state could not be read or removed, or removing it is not safe."""


class Flavour(Enum):
    """Which iptables implementation wrote the rules."""

    NFT = "nft"
    LEGACY = "legacy"


def _tool(flavour: Flavour, family: Family, action: str) -> str:
    """`iptables-nft-save`, `ip6tables-legacy-restore`, ..."""
    base = "ip6tables" if family is Family.V6 else "iptables"
    return f"{base}-{flavour.value}-{action}"


@dataclass(frozen=True)
class IstioTable:
    """Istio's chains in one iptables table of one flavour and family, and the jumps into them."""

    flavour: Flavour
    family: Family
    table: str
    chains: tuple[str, ...]
    """Istio's chains that exist in this table, in iptables-save order."""
    jumps: tuple[str, ...]
    """Rules of other chains that jump to them, as iptables-save prints them (`-A CHAIN ...`)."""
    sidecar_chains: tuple[str, ...] = ()
    """Chains of Istio's sidecar mode in this table: their presence makes removal refuse."""

    def removal(self) -> str:
        """The `iptables-restore --noflush` block that removes exactly Istio's part of the table."""
        lines = [f"*{self.table}"]
        lines += ["-D" + jump.removeprefix("-A") for jump in self.jumps]
        lines += [f"-F {chain}" for chain in self.chains]
        lines += [f"-X {chain}" for chain in self.chains]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        family = "ip6" if self.family is Family.V6 else "ip"
        return f"{self.flavour.value} {family} {self.table}: {' '.join(self.chains)}"


@dataclass(frozen=True)
class IstioIptables:
    """What detection found of Istio's iptables backend in one netns."""

    tables: tuple[IstioTable, ...] = ()
    ipsets: tuple[str, ...] = ()
    """Istio's probe ipsets (host netns only)."""

    @property
    def found(self) -> bool:
        return bool(self.tables or self.ipsets)

    @property
    def flavours(self) -> frozenset[Flavour]:
        return frozenset(t.flavour for t in self.tables)

    @property
    def families(self) -> frozenset[Family]:
        return frozenset(t.family for t in self.tables)

    @property
    def postrouting(self) -> bool:
        """The host's ISTIO_POSTRT chain exists (in some flavour and family)."""
        return any("ISTIO_POSTRT" in t.chains for t in self.tables)

    def table_names(self, flavour: Flavour, family: Family) -> tuple[str, ...]:
        return tuple(t.table for t in self.tables if (t.flavour, t.family) == (flavour, family))


@dataclass(frozen=True)
class MigrationReport:
    """What one migration step did, in the order it did it."""

    installed: tuple[str, ...]
    """What of ours was written first (empty: it was already in place)."""
    found: IstioIptables
    removed: tuple[str, ...]
    """Istio's objects removed afterwards."""
    uncovered: tuple[str, ...] = ()
    """Host only: IPs in Istio's ipsets that are not in our sets (probes to them lose the SNAT)."""
    postponed: tuple[str, ...] = ()
    """Host only: those of `uncovered` that belong to this node's pods. Istio's host rules were
    kept for them (nothing removed): migrate again once our sets hold them."""

    @property
    def changed(self) -> bool:
        return bool(self.installed or self.removed)


# -- reading (pure) ------------------------------------------------------------------------------


def _target(words: list[str]) -> str | None:
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return None


def parse_save(
    text: str, flavour: Flavour, family: Family, *, chains: Iterable[str]
) -> tuple[IstioTable, ...]:
    """The tables of an `iptables-save` output that hold any of `chains`."""
    wanted = tuple(chains)
    found: list[IstioTable] = []
    table = ""
    present: list[str] = []
    sidecar: list[str] = []
    jumps: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table, present, sidecar, jumps = line[1:].strip(), [], [], []
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in wanted:
                present.append(name)
            elif name in SIDECAR_CHAINS:
                sidecar.append(name)
        elif line.startswith("-A "):
            try:
                words = shlex.split(line)
            except ValueError:  # an unbalanced quote in someone's comment
                words = line.split()
            if len(words) > 1 and words[1] not in wanted and _target(words) in wanted:
                jumps.append(line)
        elif line == "COMMIT" and (present or jumps):
            found.append(
                IstioTable(flavour, family, table, tuple(present), tuple(jumps), tuple(sidecar))
            )
    return tuple(found)


# -- running tools from the worker thread ----------------------------------------------------------


def _run(argv: list[str], *, stdin: str | None = None) -> str:
    """Run a tool in the calling thread's netns; raise MigrationError when it fails."""
    path = shutil.which(argv[0], path=_SBIN)
    if path is None:
        raise MigrationError(f"{argv[0]} is not installed")
    try:
        result = subprocess.run(
            [path, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=TOOL_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise MigrationError(f"{' '.join(argv)} did not finish in {TOOL_TIMEOUT}s") from exc
    if result.returncode != 0:
        raise MigrationError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def _nft_families() -> set[Family]:
    """Families that have any iptables-nft table here (names only; no rule is decoded)."""
    with Nft() as nft:
        listing = nft.run("list tables")
    families = set()
    for line in listing.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table" and words[2] in ("mangle", "nat", "raw"):
            if words[1] == "ip":
                families.add(Family.V4)
            elif words[1] == "ip6":
                families.add(Family.V6)
    return families


def _legacy_families() -> set[Family]:
    """Families that have any x_tables table in this thread's netns."""
    families = set()
    for family, name in ((Family.V4, "ip_tables_names"), (Family.V6, "ip6_tables_names")):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                if f.read().split():
                    families.add(family)
        except FileNotFoundError:
            continue  # kernel without legacy iptables for this family
    return families


def _ipsets() -> tuple[str, ...]:
    if shutil.which("ipset", path=_SBIN) is None:
        return ()  # without the tool nobody can have created them either
    names = _run(["ipset", "list", "-n"]).split()
    return tuple(name for name in HOST_SETS if name in names)


def _normal(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _ipset_members(name: str) -> list[str]:
    members = []
    for line in _run(["ipset", "save", name]).splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "add" and words[1] == name:
            members.append(_normal(words[2]))
    return members


def detect_here(*, host: bool = False) -> IstioIptables:
    """Istio's iptables objects in the current netns. Reads only.

    In a pod netns (`host=False`): ISTIO_PRERT / ISTIO_OUTPUT. In the host netns: ISTIO_POSTRT and
    the probe ipsets.
    """
    chains = HOST_CHAINS if host else POD_CHAINS
    tables: list[IstioTable] = []
    for flavour, families in (
        (Flavour.NFT, _nft_families()),
        (Flavour.LEGACY, _legacy_families()),
    ):
        for family in sorted(families, key=lambda f: f.value):
            text = _run([_tool(flavour, family, "save")])
            tables += parse_save(text, flavour, family, chains=chains)
    return IstioIptables(tuple(tables), _ipsets() if host else ())


# -- removing ------------------------------------------------------------------------------------


def _remove_tables(found: IstioIptables) -> list[str]:
    refused = [t for t in found.tables if t.sidecar_chains]
    if refused:
        raise MigrationError(
            "sidecar-mode chains next to Istio's ambient chains, not touching them: "
            + "; ".join(f"{t}: {' '.join(t.sidecar_chains)}" for t in refused)
        )
    removed: list[str] = []
    for flavour in Flavour:
        for family in Family:
            tables = [t for t in found.tables if (t.flavour, t.family) == (flavour, family)]
            if not tables:
                continue
            payload = "".join(t.removal() for t in tables)
            _run([_tool(flavour, family, "restore"), "--noflush", "-w", "5"], stdin=payload)
            removed += [str(t) for t in tables]
    return removed


def remove_pod_iptables_here(found: IstioIptables) -> list[str]:
    """Remove Istio's pod chains and the jumps to them, as found; everything else stays.

    The ip rule and the table-100 route are left: they are the same objects as ours.
    """
    return _remove_tables(found)


def remove_host_iptables_here(found: IstioIptables) -> list[str]:
    """Remove ISTIO_POSTRT and its jump, then the probe ipsets that it referenced."""
    removed = _remove_tables(found)
    for name in found.ipsets:
        _run(["ipset", "destroy", name])
        removed.append(f"ipset {name}")
    return removed


# -- migrating -----------------------------------------------------------------------------------


def migrate_pod_here(state: PodState, forms: KernelForms) -> MigrationReport:
    """When Istio's iptables rules are in the pod's netns: install ours, then remove theirs.

    Detection only reads, so a pod without Istio's rules is left exactly as it is (what our
    own rules need is the reconciler's business, e.g. report-only at start-up). Idempotent: on a
    migrated pod it finds nothing and writes nothing.
    """
    found = detect_here()
    if not found.found:
        return MigrationReport((), found, ())
    # No remembered verification: migration always reads our tables back before trusting them.
    installed = apply_here(state, forms).drifts
    removed = remove_pod_iptables_here(found)
    return MigrationReport(tuple(str(d) for d in installed), found, tuple(removed))


def _our_elements() -> dict[str, dict[str, str]] | None:
    with Nft() as nft:
        text = nft.list_table(c.HOST_TABLE)
    return None if text is None else TableListing.parse(text).elements


def migrate_host_here(
    install: Callable[[], Iterable[object]], *, node_ips: Collection[str] = ()
) -> MigrationReport:
    """Install our host table with `install`, then remove Istio's host rules and ipsets.

    `install` runs first, on this worker in the host netns, and must leave our table in place with
    every enrolled pod's IP in its sets (e.g. the host rules' apply); it returns what it changed.
    Istio's rules stay when our table is missing afterwards (MigrationError). IPs that are in
    Istio's ipsets but not in ours are reported (`uncovered`). Those that are in `node_ips` (the
    IPs of this node's pods to be enrolled) keep Istio's rules in place (`postponed`): their pods
    would lose the SNAT of their probes until they are enrolled. The others do not, because
    Istio's sets can hold pods long gone.
    """
    installed = tuple(str(item) for item in install())
    elements = _our_elements()
    if elements is None:
        raise MigrationError(
            f"our host table inet {c.HOST_TABLE} is not in place: keeping Istio's host rules"
        )
    found = detect_here(host=True)
    ours = {_normal(ip) for members in elements.values() for ip in members}
    uncovered = tuple(ip for name in found.ipsets for ip in _ipset_members(name) if ip not in ours)
    on_node = {_normal(ip) for ip in node_ips}
    postponed = tuple(ip for ip in uncovered if ip in on_node)
    if postponed:
        return MigrationReport(installed, found, (), uncovered, postponed)
    removed = remove_host_iptables_here(found) if found.found else []
    return MigrationReport(installed, found, tuple(removed), uncovered)


class IptablesMigration:
    """The migration for the agent: each call runs on a `NetnsRunner` worker in the given netns.

    Logging happens here, on the event loop, not in the workers: a worker's private fd table
    holds only stdio, which need not be where the process logs to.
    """

    def __init__(self, runner: NetnsRunner, *, forms: KernelForms | None = None) -> None:
        self._runner = runner
        self._forms = forms or KernelForms()
        self._postponed: tuple[str, ...] = ()

    async def detect(self, netns: str, *, host: bool = False) -> IstioIptables:
        return await self._runner.run(netns, detect_here, host=host)

    async def migrate_pod(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> MigrationReport:
        """`identity`: the netns the path must still name (a reused pid must not be migrated)."""
        state = PodState.for_options(options)
        report = await self._runner.run_expecting(
            netns, identity, migrate_pod_here, state, self._forms
        )
        _log_report("pod_migrated", netns, report)
        return report

    async def migrate_host(
        self,
        netns: str,
        install: Callable[[], Iterable[object]],
        *,
        node_ips: Collection[str] = (),
    ) -> MigrationReport:
        """`install` runs first, on the worker in `netns` (see `migrate_host_here`). When the
        report says `postponed`, Istio's host rules are still there: call again later."""
        report = await self._runner.run(netns, migrate_host_here, install, node_ips=node_ips)
        if report.postponed:
            # Tried again every drift pass: said again only when the IPs it waits for change.
            if report.postponed != self._postponed:
                log.info(
                    "istio_host_migration_postponed",
                    netns=netns,
                    reason="pods of this node in Istio's probe ipsets are not in our host sets yet",
                    ips=list(report.postponed),
                )
            self._postponed = report.postponed
            return report
        if report.uncovered:
            log.warning("probe_ips_uncovered", netns=netns, ips=list(report.uncovered))
        _log_report("host_migrated", netns, report)
        return report


def _log_report(event: str, netns: str, report: MigrationReport) -> None:
    if not report.changed:
        log.debug(event, netns=netns, changed=False)
        return
    log.info(
        event,
        netns=netns,
        installed=list(report.installed),
        istio_tables=[str(t) for t in report.found.tables],
        removed=list(report.removed),
    )
