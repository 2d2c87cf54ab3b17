"""A pod's redirection in its netns: install, check, repair and remove (docs/design.md §2, §3,
§11.14).

One rule for every path (CNI add, watch add, restart, periodic check): read first, then write only
what differs, as one atomic nftables transaction. A check writes nothing; an apply on a healthy
pod writes nothing either, so an agent restart leaves handles and counters untouched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift, DriftKind, TableListing, diff_table
from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.core.render import Ruleset, pod_ruleset
from ztunnel_redirect.kernel import routing
from ztunnel_redirect.kernel.batchreplay import Recordings, send_batch
from ztunnel_redirect.kernel.dumpproof import ExpectedDumps
from ztunnel_redirect.kernel.netns import NetnsId, NetnsRunner, entered_scratch
from ztunnel_redirect.kernel.nft import GenerationGate, Nft, Verified, generation

log = structlog.get_logger(__name__)


class StepTimer(Protocol):
    """Times the named steps of an apply or a check (the benchmark's profile records them).

    `step(name)` is entered around one step; steps never nest, and the time between them is
    the core's own glue.
    """

    def step(self, name: str) -> contextlib.AbstractContextManager[object]: ...


class _Untimed:
    """The default timer: times nothing, at the cost of one shared null context per step."""

    _NULL: Final = contextlib.nullcontext()

    def step(self, name: str) -> contextlib.AbstractContextManager[object]:
        return self._NULL


UNTIMED: Final[StepTimer] = _Untimed()


class KernelForms:
    """How the kernel lists a desired ruleset: learnt once per ruleset in a scratch netns.

    Call `of()` from a NetnsRunner worker (any netns: the scratch netns is nested).
    """

    def __init__(self) -> None:
        self._cache: dict[Ruleset, dict[str, TableListing]] = {}
        self._lock = threading.Lock()

    def of(self, ruleset: Ruleset) -> dict[str, TableListing]:
        with self._lock:
            known = self._cache.get(ruleset)
        if known is not None:
            return known
        with entered_scratch(), Nft() as nft:
            nft.run(ruleset.script())
            forms = {
                t.name: TableListing.parse(nft.list_table(t.name) or "") for t in ruleset.tables
            }
        with self._lock:
            self._cache[ruleset] = forms
        return forms


def read_tables(nft: Nft, names: tuple[str, ...]) -> dict[str, TableListing | None]:
    out: dict[str, TableListing | None] = {}
    for name in names:
        text = nft.list_table(name)
        out[name] = None if text is None else TableListing.parse(text)
    return out


def table_drift(
    ruleset: Ruleset, forms: dict[str, TableListing], actual: dict[str, TableListing | None]
) -> list[Drift]:
    drifts: list[Drift] = []
    for table in ruleset.tables:
        drifts += diff_table(table.name, forms[table.name], actual[table.name])
    drifts += [Drift(DriftKind.STALE_TABLE, name) for name in ruleset.absent if actual[name]]
    return drifts


def _routing_drift(diff: routing.RoutingDiff) -> list[Drift]:
    missing = {
        routing.RoutingKind.IP_RULE: DriftKind.MISSING_IP_RULE,
        routing.RoutingKind.ROUTE: DriftKind.MISSING_ROUTE,
    }
    stale = {
        routing.RoutingKind.IP_RULE: DriftKind.STALE_IP_RULE,
        routing.RoutingKind.ROUTE: DriftKind.STALE_ROUTE,
    }
    return [Drift(missing[item.what], "", str(item)) for item in diff.missing] + [
        Drift(stale[item.what], "", str(item)) for item in diff.stale
    ]


def repair_script(ruleset: Ruleset, drifts: list[Drift]) -> str:
    """One transaction that recreates every drifted table and deletes stale ones."""
    drifted = {d.table for d in drifts if d.table}
    parts = []
    for table in ruleset.tables:
        if table.name not in drifted:
            continue
        if any(d.table == table.name and d.kind is not DriftKind.MISSING_TABLE for d in drifts):
            # Recreate from scratch: also drops chains someone added.
            parts.append(f"add table {table.ref}\ndelete table {table.ref}\n")
        parts.append(table.script())
    parts += [f"delete table inet {name}\n" for name in ruleset.absent if name in drifted]
    return "".join(parts)


@dataclass(frozen=True)
class PodState:
    """What a pod's netns should hold."""

    ruleset: Ruleset
    ipv6: bool

    @classmethod
    def for_options(cls, options: PodOptions) -> PodState:
        return cls(pod_ruleset(options), options.ipv6)


def _names(ruleset: Ruleset) -> tuple[str, ...]:
    return tuple(t.name for t in ruleset.tables) + ruleset.absent


PRISTINE_GENERATION: Final = 1
"""The kernel starts every netns's nftables generation at 1 (nf_tables_init_net), and each commit
moves it on by exactly one (nf_tables_commit)."""


@dataclass(frozen=True)
class Outcome:
    drifts: list[Drift]
    """What differed (for apply: what was repaired). Empty: nothing was written."""
    verified: Verified | None
    replay_refused: str | None = None
    """Why the kernel refused the recorded batch (libnftables then did the work instead)."""


def _replay(ruleset: Ruleset, drifts: list[Drift], recordings: Recordings) -> str | None:
    """Create the missing tables (a new sandbox, or deleted tables) by replaying the netlink
    batch recorded for this ruleset: three tables into a fresh netns cost 0.33 ms p50 instead
    of 0.73 ms through libnftables here (the benchmark's "fast paths" measure both).

    None when the tables were created; otherwise why the kernel refused the batch (it then
    applied none of it). Nothing is logged here (a netns worker): `PodRules` logs the outcome.
    """
    try:
        send_batch(recordings.batch(ruleset, {d.table for d in drifts}))
    except (KernelError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


_RECORDINGS: Final = Recordings()
"""One per process, like `pod_ruleset`'s cache: a recording depends on the ruleset only."""

_EXPECTED_DUMPS: Final = ExpectedDumps()
"""Likewise: the normalised dump of a desired ruleset depends on the ruleset only."""


def sync_tables_here(
    state: PodState,
    forms: KernelForms,
    verified: Verified | None,
    *,
    write: bool,
    recordings: Recordings = _RECORDINGS,
    dumps: ExpectedDumps = _EXPECTED_DUMPS,
    steps: StepTimer = UNTIMED,
) -> Outcome:
    """The nftables half: compare our tables with the desired ones and, with `write`, repair
    what differs in one transaction.

    The generation gate (`nft.GenerationGate`): when the netns's nftables generation has not
    moved since the tables were last verified for this very ruleset, nothing can have changed
    them, and the listing (~0.6 ms for three tables) is skipped.

    Missing tables are created by a replayed netlink batch (`batchreplay`), so a new sandbox needs
    no libnftables context at all; listing and other repairs each open their own (~0.02 ms; the
    listing one commits nothing, so closing it never waits for RCU: docs/design.md §12.4).
    Replayed into a pristine netns, the batch is its first commit: at the next generation the
    tables are exactly the batch's, so that generation is verified at once, and the check that
    follows a new sandbox's install skips the dump as well.

    Before listing (the first check after a restart, or after anyone's commit), a raw netlink
    dump of our tables, normalised, is compared with the desired ruleset's (~0.1 ms instead of
    ~0.5 ms; `dumpproof.dump_here` says what it ignores). Only equality is trusted: anything else
    falls through to the listing, which reports precisely and decides the repair.

    `steps` times each named step (the benchmark's profile); the default times nothing.
    """
    with steps.step("nft_generation"):
        gate = GenerationGate(generation(), state.ruleset)
    if gate.unchanged(verified):
        return Outcome([], verified)
    names = _names(state.ruleset)
    if gate.generation == PRISTINE_GENERATION:
        # A netns starts at generation 1: still there, nothing was ever committed in it (a new
        # sandbox), so there is nothing to list.
        actual: dict[str, TableListing | None] = dict.fromkeys(names)
    else:
        with steps.step("dump_proof"):
            proven = dumps.identical(state.ruleset, generation=gate.generation)
        if proven:
            return Outcome([], gate.verified([]))
        with steps.step("list_tables"), Nft() as nft:
            actual = read_tables(nft, names)
    with steps.step("kernel_forms_lookup"):
        desired = forms.of(state.ruleset)
    with steps.step("diff"):
        drifts = table_drift(state.ruleset, desired, actual)
    refused = None
    if drifts and write:
        # Only missing tables: replay the recorded batch. Anything else drifted, or the kernel
        # refused the batch: libnftables repairs (delete and recreate the drifted tables).
        replayed = all(d.kind is DriftKind.MISSING_TABLE for d in drifts)
        if replayed:
            with steps.step("batch_replay"):
                refused = _replay(state.ruleset, drifts, recordings)
        if not replayed or refused is not None:
            with steps.step("nft_repair"), Nft() as nft:
                nft.run(repair_script(state.ruleset, drifts))
        elif gate.generation == PRISTINE_GENERATION:
            first_commit = Verified(PRISTINE_GENERATION + 1, state.ruleset)
            return Outcome(drifts, first_commit, refused)
    return Outcome(drifts, gate.verified(drifts), refused)


def sync_routing_here(
    state: PodState, *, write: bool, fresh: bool = False, steps: StepTimer = UNTIMED
) -> list[Drift]:
    """The routing half: ours missing, and ours not wanted (the v6 twins after IPv6 was turned
    off). A `fresh` pod (never set up by us) skips the read: the adds are idempotent (an
    existing rule is refused with EEXIST, routes are replaced)."""
    with routing.Rtnl() as rtnl:
        if fresh:
            with steps.step("routing_everything"):
                everything = tuple(routing.everything(rtnl, ipv6=state.ipv6))
            diff = routing.RoutingDiff(missing=everything)
        else:
            with steps.step("routing_check"):
                diff = routing.check(rtnl, ipv6=state.ipv6)
        if write:
            with steps.step("routing_write"):
                routing.add(rtnl, diff.missing)
                routing.delete(rtnl, diff.stale)
    return _routing_drift(diff)


def check_here(
    state: PodState,
    forms: KernelForms,
    verified: Verified | None = None,
    *,
    steps: StepTimer = UNTIMED,
) -> Outcome:
    """Compare the current netns with the desired state. Reads only."""
    tables = sync_tables_here(state, forms, verified, write=False, steps=steps)
    routes = sync_routing_here(state, write=False, steps=steps)
    return Outcome(tables.drifts + routes, tables.verified)


def apply_here(
    state: PodState,
    forms: KernelForms,
    verified: Verified | None = None,
    *,
    fresh: bool = False,
    steps: StepTimer = UNTIMED,
) -> Outcome:
    """Bring the current netns to the desired state; returns what was repaired.

    A failed nftables transaction changes nothing (the kernel applies all of it or none).
    """
    tables = sync_tables_here(state, forms, verified, write=True, steps=steps)
    routes = sync_routing_here(state, write=True, fresh=fresh, steps=steps)
    return Outcome(tables.drifts + routes, tables.verified, tables.replay_refused)


def remove_here() -> list[str]:
    """Remove every table and routing object of ours from the current netns."""
    removed = []
    with Nft() as nft:
        present = [name for name in c.POD_TABLES if nft.list_table(name) is not None]
        if present:
            nft.run("".join(f"delete table inet {name}\n" for name in present))
    removed += [f"table inet {name}" for name in present]
    with routing.Rtnl() as rtnl:
        removed += routing.remove(rtnl)
    return removed


class PodRules:
    """Install, check and remove pod redirection; every call runs in the pod's netns.

    Remembers, per netns, the nftables generation at which its tables were last verified, so
    that a periodic check of a healthy pod costs a generation read and a routing dump.
    """

    def __init__(
        self, runner: NetnsRunner, *, on_replay_refused: Callable[[], None] = lambda: None
    ) -> None:
        """`on_replay_refused`: called each time the kernel refused a recorded batch and
        libnftables installed the tables instead (the pod is fine, the install was slower)."""
        self._runner = runner
        self._forms = KernelForms()
        self._verified: dict[str, Verified] = {}
        self._on_replay_refused = on_replay_refused

    def _remember(self, netns: str, outcome: Outcome) -> list[Drift]:
        if outcome.replay_refused is not None:
            log.warning("batch_replay_refused", netns=netns, error=outcome.replay_refused)
            self._on_replay_refused()
        if outcome.verified is None:
            self._verified.pop(netns, None)
        else:
            self._verified[netns] = outcome.verified
        return outcome.drifts

    async def apply(
        self,
        netns: str,
        options: PodOptions,
        *,
        fresh: bool = False,
        identity: NetnsId | None = None,
    ) -> list[Drift]:
        """Install or repair. `fresh`: a pod we never set up (a new sandbox), routing unread.

        `identity` (here and in `check`, `remove`): the netns `netns` must name when it is
        opened; otherwise NetnsNotFoundError and nothing is read or written.
        """
        state = PodState.for_options(options)
        outcome = await self._runner.run_expecting(
            netns, identity, apply_here, state, self._forms, self._verified.get(netns), fresh=fresh
        )
        return self._remember(netns, outcome)

    async def check(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> list[Drift]:
        state = PodState.for_options(options)
        outcome = await self._runner.run_expecting(
            netns, identity, check_here, state, self._forms, self._verified.get(netns)
        )
        return self._remember(netns, outcome)

    async def remove(self, netns: str, *, identity: NetnsId | None = None) -> list[str]:
        self._verified.pop(netns, None)
        return await self._runner.run_expecting(netns, identity, remove_here)

    def forget(self, netns: str) -> None:
        """The netns is gone: drop what we remembered of it."""
        self._verified.pop(netns, None)
