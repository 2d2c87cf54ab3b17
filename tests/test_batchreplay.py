"""Creating pod tables by replaying a recorded netlink batch, against the real kernel.

Each test works in lab namespaces (removed by the `lab` fixture) or in anonymous scratch
namespaces that vanish when the worker leaves them.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

import pytest

from tests.matrix import POD_MATRIX, pod_name
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift, DriftKind
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.core.render import Ruleset, pod_ruleset
from ztunnel_redirect.kernel.batchreplay import (
    BatchRejectedError,
    Recordings,
    record_here,
    send_batch,
)
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.nft import generation
from ztunnel_redirect.kernel.podrules import (
    KernelForms,
    PodRules,
    PodState,
    sync_routing_here,
    sync_tables_here,
)
from ztunnel_redirect.testing.netnslab import Lab, Netns

pytestmark = pytest.mark.kernel

FULL = PodOptions(ipv6=True, dns_capture=True)


class SpyRecordings(Recordings):
    """The real recordings, noting which tables each replay asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[frozenset[str]] = []

    def batch(self, ruleset: Ruleset, names: Iterable[str]) -> bytes:
        wanted = frozenset(names)
        self.asked.append(wanted)
        return super().batch(ruleset, wanted)


class WholeRulesetRecordings(SpyRecordings):
    """Always replays every table of the ruleset, whatever was missing: stands for a table
    that someone else created between our read and our replay."""

    def batch(self, ruleset: Ruleset, names: Iterable[str]) -> bytes:
        self.asked.append(frozenset(names))
        return Recordings.batch(self, ruleset, [t.name for t in ruleset.tables])


def listing(ns: Netns, *, handles: bool = False) -> str:
    return ns.exec("nft", "-a" if handles else "-s", "list", "ruleset")


def all_missing(ruleset: Ruleset, names: Iterable[str] | None = None) -> list[Drift]:
    wanted = set(names) if names is not None else {t.name for t in ruleset.tables}
    return [Drift(DriftKind.MISSING_TABLE, t.name) for t in ruleset.tables if t.name in wanted]


@pytest.mark.parametrize("options", POD_MATRIX, ids=[pod_name(o) for o in POD_MATRIX])
async def test_replayed_install_is_the_libnftables_one(
    runner: NetnsRunner, lab: Lab, options: PodOptions
) -> None:
    replayed, reference = lab.add_netns("replayed"), lab.add_netns("reference")
    state = PodState.for_options(options)
    spy = SpyRecordings()

    outcome = await runner.run(
        replayed.path, sync_tables_here, state, KernelForms(), None, write=True, recordings=spy
    )
    reference.nft(state.ruleset.script())

    assert outcome.drifts == all_missing(state.ruleset)
    assert outcome.replay_refused is None
    assert spy.asked == [frozenset(t.name for t in state.ruleset.tables)]
    assert listing(replayed) == listing(reference)
    replayed.ip("link", "set", "lo", "up")  # the local route of table 100 needs it
    await runner.run(replayed.path, sync_routing_here, state, write=True)
    assert await PodRules(runner).check(replayed.path, options) == []


async def test_replay_of_some_tables_creates_only_those(runner: NetnsRunner, lab: Lab) -> None:
    ruleset = pod_ruleset(FULL)
    replayed, reference = lab.add_netns("replayed"), lab.add_netns("reference")
    recording = await runner.run(None, record_here, ruleset)

    await runner.run(replayed.path, send_batch, recording.batch([c.MANGLE_TABLE]))
    reference.nft(ruleset.table(c.MANGLE_TABLE).script())

    assert listing(replayed) == listing(reference)
    with pytest.raises(KeyError):
        recording.batch(["not-recorded"])


@pytest.mark.parametrize("existing", [c.NAT_TABLE, c.MANGLE_TABLE, c.RAW_TABLE])
async def test_replay_over_an_existing_table_changes_nothing(
    runner: NetnsRunner, lab: Lab, existing: str
) -> None:
    ruleset = pod_ruleset(FULL)
    ns = lab.add_netns("pod")
    ns.nft(ruleset.table(existing).script())
    before = listing(ns, handles=True)
    generation_before = await runner.run(ns.path, generation)
    batch = await runner.run(None, Recordings().batch, ruleset, [t.name for t in ruleset.tables])

    with pytest.raises(BatchRejectedError) as refused:
        await runner.run(ns.path, send_batch, batch)

    assert refused.value.errno == errno.EEXIST
    assert listing(ns, handles=True) == before
    assert await runner.run(ns.path, generation) == generation_before


async def test_refused_replay_falls_back_to_libnftables(runner: NetnsRunner, lab: Lab) -> None:
    state = PodState.for_options(FULL)
    ns = lab.add_netns("pod")
    ns.nft(state.ruleset.table(c.MANGLE_TABLE).script())
    racing = WholeRulesetRecordings()
    forms = KernelForms()

    outcome = await runner.run(
        ns.path, sync_tables_here, state, forms, None, write=True, recordings=racing
    )

    assert racing.asked == [frozenset({c.NAT_TABLE, c.RAW_TABLE})]
    assert outcome.drifts == all_missing(state.ruleset, [c.NAT_TABLE, c.RAW_TABLE])
    assert outcome.replay_refused is not None
    assert "File exists" in outcome.replay_refused, outcome.replay_refused
    check = await runner.run(ns.path, sync_tables_here, state, forms, None, write=False)
    assert check.drifts == []


async def test_drift_of_an_existing_table_is_repaired_by_libnftables(
    runner: NetnsRunner, lab: Lab
) -> None:
    state = PodState.for_options(FULL)
    ns = lab.add_netns("pod")
    ns.nft(state.ruleset.table(c.NAT_TABLE).script())
    ns.exec(
        "nft", "add", "rule", "inet", c.NAT_TABLE, "istio-output", "tcp", "dport", "9", "accept"
    )
    spy = SpyRecordings()
    forms = KernelForms()

    outcome = await runner.run(
        ns.path, sync_tables_here, state, forms, None, write=True, recordings=spy
    )

    assert spy.asked == []
    assert {d.kind for d in outcome.drifts} == {DriftKind.EXTRA_RULE, DriftKind.MISSING_TABLE}
    check = await runner.run(ns.path, sync_tables_here, state, forms, None, write=False)
    assert check.drifts == []
