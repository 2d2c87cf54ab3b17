"""The pod rules in the kernel: apply, check, repair, remove, inside lab network namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift, DriftKind, TableListing
from ztunnel_redirect.core.errors import KernelError, NetnsNotFoundError
from ztunnel_redirect.core.model import PodOptions
from ztunnel_redirect.core.render import Rule, Ruleset, Table, pod_ruleset
from ztunnel_redirect.kernel import podrules, routing
from ztunnel_redirect.kernel.netns import NetnsRunner, netns_id
from ztunnel_redirect.kernel.nft import Nft, Verified, generation
from ztunnel_redirect.kernel.podrules import PodRules, repair_script
from ztunnel_redirect.testing.netnslab import Lab, LabPod

pytestmark = pytest.mark.kernel

V4 = PodOptions(ipv6=False)


@pytest.fixture
def pod(lab: Lab) -> LabPod:
    return lab.add_pod("p")


def kernel_state(pod: LabPod) -> str:
    """Everything of ours with handles and counters, plus routing: changes on any write."""
    tables = [pod.netns.exec("nft", "-a", "list", "table", "inet", t) for t in c.POD_TABLES[:2]]
    return "".join(tables) + pod.netns.ip("rule") + pod.netns.ip("route", "show", "table", "100")


async def test_apply_installs_everything_then_check_is_clean(
    runner: NetnsRunner, pod: LabPod
) -> None:
    rules = PodRules(runner)
    repaired = await rules.apply(pod.path, V4)
    kinds = {d.kind for d in repaired}
    assert kinds == {DriftKind.MISSING_TABLE, DriftKind.MISSING_IP_RULE, DriftKind.MISSING_ROUTE}
    assert await rules.check(pod.path, V4) == []
    assert "fwmark 0x111/0xfff lookup 100" in pod.netns.ip("rule")
    assert "local default dev lo" in pod.netns.ip("route", "show", "table", "100")


async def test_a_path_naming_another_netns_than_expected_is_never_entered(
    runner: NetnsRunner, lab: Lab, pod: LabPod
) -> None:
    """As after a pid reuse between the caller's check and the worker's open: `pod.path` names
    another netns than the one the caller found."""
    other = lab.add_pod("other")
    rules = PodRules(runner)
    wrong = netns_id(other.path)

    with pytest.raises(NetnsNotFoundError):
        await rules.apply(pod.path, V4, identity=wrong)
    assert pod.netns.exec("nft", "list", "ruleset") == ""
    assert "lookup 100" not in pod.netns.ip("rule")

    assert await rules.apply(pod.path, V4, identity=netns_id(pod.path)) != []
    before = kernel_state(pod)
    with pytest.raises(NetnsNotFoundError):
        await rules.check(pod.path, V4, identity=wrong)
    with pytest.raises(NetnsNotFoundError):
        await rules.remove(pod.path, identity=wrong)
    assert kernel_state(pod) == before
    assert other.netns.exec("nft", "list", "ruleset") == ""


async def test_check_and_reapply_write_nothing(runner: NetnsRunner, pod: LabPod) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    before = kernel_state(pod)
    assert await rules.check(pod.path, V4) == []
    assert await rules.apply(pod.path, V4) == []
    assert kernel_state(pod) == before


async def test_drift_is_reported_precisely(runner: NetnsRunner, pod: LabPod) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    pod.netns.exec("nft", "flush", "chain", "inet", c.MANGLE_TABLE, "istio-output")
    pod.netns.exec(
        "nft", "add", "rule", "inet", c.NAT_TABLE, "istio-output", "tcp", "dport", "9", "accept"
    )
    pod.netns.exec("nft", "add", "chain", "inet", c.NAT_TABLE, "sneaky")
    pod.netns.exec("nft", "delete", "table", "inet", c.RAW_TABLE)
    pod.netns.ip("rule", "del", "priority", str(c.RULE_PRIORITY))
    pod.netns.ip("route", "flush", "table", "100")

    drifts = await rules.check(pod.path, V4)

    by_kind = {(d.kind, d.table) for d in drifts}
    assert (DriftKind.MISSING_RULE, c.MANGLE_TABLE) in by_kind
    assert [d.detail for d in drifts if d.kind is DriftKind.MISSING_RULE] == [
        "istio-output: ct mark & 0x00000fff == 0x00000111 counter meta mark set ct mark"
    ]
    assert [d.detail for d in drifts if d.kind is DriftKind.EXTRA_RULE] == [
        "istio-output: tcp dport 9 accept"
    ]
    assert [d.detail for d in drifts if d.kind is DriftKind.EXTRA_CHAIN] == ["sneaky"]
    assert (DriftKind.MISSING_TABLE, c.RAW_TABLE) in by_kind
    assert {d.kind for d in drifts} >= {DriftKind.MISSING_IP_RULE, DriftKind.MISSING_ROUTE}


async def test_repair_rewrites_only_drifted_tables(runner: NetnsRunner, pod: LabPod) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    mangle_before = pod.netns.exec("nft", "-a", "list", "table", "inet", c.MANGLE_TABLE)
    pod.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
    pod.netns.exec("nft", "add", "chain", "inet", c.NAT_TABLE, "sneaky")

    repaired = await rules.apply(pod.path, V4)

    assert {d.table for d in repaired} == {c.NAT_TABLE}
    assert await rules.check(pod.path, V4) == []
    assert "sneaky" not in pod.netns.exec("nft", "list", "table", "inet", c.NAT_TABLE)
    assert pod.netns.exec("nft", "-a", "list", "table", "inet", c.MANGLE_TABLE) == mangle_before


def lo_ipv6_sysctl_usable() -> bool:
    """What /proc/sys says in the current netns (what `routing.ipv6_usable` used to read)."""
    with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as f:
        return f.read().strip() != "1"


@pytest.mark.parametrize("fresh", [True, False])
async def test_no_v6_route_where_the_pod_disabled_ipv6_on_loopback(
    runner: NetnsRunner, lab6: Lab, *, fresh: bool
) -> None:
    pod = lab6.add_pod("p")
    pod.netns.ip("link", "set", "lo", "up")
    assert runner.call(pod.path, routing.ipv6_usable) is True
    assert runner.call(pod.path, lo_ipv6_sysctl_usable) is True
    pod.netns.exec("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    assert runner.call(pod.path, routing.ipv6_usable) is False
    assert runner.call(pod.path, lo_ipv6_sysctl_usable) is False
    rules = PodRules(runner)

    await rules.apply(pod.path, PodOptions(ipv6=True), fresh=fresh)

    assert "fwmark 0x111/0xfff lookup 100" in pod.netns.ip("-6", "rule")
    assert pod.netns.ip("-6", "route", "show", "table", "100") == ""
    assert await rules.check(pod.path, PodOptions(ipv6=True)) == []


async def test_stale_raw_table_is_removed_when_dns_capture_is_turned_off(
    runner: NetnsRunner, pod: LabPod
) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    no_dns = PodOptions(ipv6=False, dns_capture=False)
    drifts = await rules.check(pod.path, no_dns)
    assert (DriftKind.STALE_TABLE, c.RAW_TABLE) in {(d.kind, d.table) for d in drifts}
    await rules.apply(pod.path, no_dns)
    assert await rules.check(pod.path, no_dns) == []
    assert c.RAW_TABLE not in pod.netns.exec("nft", "list", "tables")


async def test_stale_v6_routing_is_removed_when_ipv6_is_turned_off(
    runner: NetnsRunner, lab6: Lab
) -> None:
    pod = lab6.add_pod("p")
    pod.netns.ip("link", "set", "lo", "up")
    rules = PodRules(runner)
    await rules.apply(pod.path, PodOptions(ipv6=True))
    assert "fwmark 0x111/0xfff lookup 100" in pod.netns.ip("-6", "rule")
    assert "local default dev lo" in pod.netns.ip("-6", "route", "show", "table", "100")

    routing_kinds = {k for k in DriftKind if k.value.endswith(("ip_rule", "route"))}
    drifts = await rules.check(pod.path, V4)
    assert {(d.kind, d.detail) for d in drifts if d.kind in routing_kinds} == {
        (DriftKind.STALE_IP_RULE, "ip -6 rule fwmark 0x111/0xfff lookup 100 priority 32764"),
        (DriftKind.STALE_ROUTE, "ip -6 route local ::/0 dev lo table 100"),
    }
    repaired = await rules.apply(pod.path, V4)
    assert {d.kind for d in repaired if d.kind in routing_kinds} == {
        DriftKind.STALE_IP_RULE,
        DriftKind.STALE_ROUTE,
    }
    assert await rules.check(pod.path, V4) == []
    assert "lookup 100" not in pod.netns.ip("-6", "rule")
    assert pod.netns.ip("-6", "route", "show", "table", "100").strip() == ""
    assert "fwmark 0x111/0xfff lookup 100" in pod.netns.ip("rule")  # v4 stays


async def test_failed_transaction_leaves_previous_state(runner: NetnsRunner, pod: LabPod) -> None:
    """A repair that recreates nat and fails later in the same transaction changes nothing."""
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    before = kernel_state(pod)
    nat = pod_ruleset(V4).tables[0]
    broken = Table("istio-ambient-broken", nat.chains, (Rule("output", "bogus statement"),))
    ruleset = Ruleset((nat, broken))
    drifts = [Drift(DriftKind.CHANGED_CHAIN, nat.name), Drift(DriftKind.MISSING_TABLE, broken.name)]

    def run_repair() -> None:
        with Nft() as nft:
            nft.run(repair_script(ruleset, drifts))

    with pytest.raises(KernelError):
        await runner.run(pod.path, run_repair)
    assert kernel_state(pod) == before


async def test_a_refused_replay_is_installed_by_libnftables_and_reported(
    runner: NetnsRunner, pod: LabPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(batch: bytes) -> None:
        raise KernelError("netlink batch refused: Operation not supported")

    monkeypatch.setattr(podrules, "send_batch", refuse)
    refused: list[None] = []
    rules = PodRules(runner, on_replay_refused=lambda: refused.append(None))

    with capture_logs() as logs:
        drifts = await rules.apply(pod.path, V4, fresh=True)

    assert DriftKind.MISSING_TABLE in {d.kind for d in drifts}
    assert await rules.check(pod.path, V4) == []
    assert refused == [None]
    [warning] = [e for e in logs if e["event"] == "batch_replay_refused"]
    assert warning["log_level"] == "warning"
    assert warning["netns"] == pod.path
    assert "Operation not supported" in warning["error"]


async def test_remove_takes_only_ours(runner: NetnsRunner, pod: LabPod) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    pod.netns.exec("nft", "add", "table", "inet", "other")
    pod.netns.exec(
        "nft", "add", "chain", "inet", "other", "c", "{ type filter hook input priority 0 ; }"
    )
    pod.netns.ip("rule", "add", "priority", "1000", "fwmark", "0x5", "lookup", "200")

    removed = await rules.remove(pod.path)

    assert "table inet istio-ambient-nat" in removed
    tables = pod.netns.exec("nft", "list", "tables")
    assert "inet other" in tables
    assert "istio-ambient" not in tables
    rules_text = pod.netns.ip("rule")
    assert "lookup 200" in rules_text
    assert "lookup 100" not in rules_text
    assert await rules.remove(pod.path) == []


async def test_vanished_netns_is_a_clear_error(runner: NetnsRunner, lab: Lab) -> None:
    gone = lab.add_pod("gone")
    path = gone.path
    lab.delete(gone.netns)
    with pytest.raises(NetnsNotFoundError):
        await PodRules(runner).apply(path, V4)


@pytest.fixture
def many_fds() -> Iterator[int]:
    """Hold over 1100 open fds, as an agent with hundreds of netns fds would."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        yield max(fds)
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_applying_works_while_the_process_holds_over_1100_fds(
    many_fds: int, lab: Lab
) -> None:
    """libnftables aborts the process when its socket's fd number is >= 1024 (docs/design.md
    §11.13)."""
    assert many_fds >= 1024
    pod = lab.add_pod("fds")
    with NetnsRunner(workers=2) as runner:
        rules = PodRules(runner)
        await rules.apply(pod.path, V4)
        assert await rules.check(pod.path, V4) == []


async def test_concurrent_pods_do_not_interfere(runner: NetnsRunner, lab: Lab) -> None:
    pods = [lab.add_pod(f"c{i}") for i in range(12)]
    rules = PodRules(runner)
    await asyncio.gather(*(rules.apply(p.path, PodOptions()) for p in pods))
    results = await asyncio.gather(*(rules.check(p.path, PodOptions()) for p in pods))
    assert results == [[] for _ in pods]


async def test_generation_gate_skips_listing_but_never_hides_drift(
    runner: NetnsRunner, pod: LabPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    assert await rules.check(pod.path, V4) == []  # lists, then remembers the generation
    listings = []
    real_read = podrules.read_tables

    def counting_read(nft: Nft, names: tuple[str, ...]) -> dict[str, TableListing | None]:
        listings.append(names)
        return real_read(nft, names)

    monkeypatch.setattr(podrules, "read_tables", counting_read)

    assert await rules.check(pod.path, V4) == []
    assert listings == []  # nothing committed since: no listing needed

    pod.netns.exec("nft", "flush", "chain", "inet", c.MANGLE_TABLE, "istio-output")
    drifts = await rules.check(pod.path, V4)
    assert [d.kind for d in drifts] == [DriftKind.MISSING_RULE]
    assert len(listings) == 1

    pod.netns.exec("nft", "add", "table", "inet", "unrelated")  # any commit moves the generation
    await rules.apply(pod.path, V4)
    assert await rules.check(pod.path, V4) == []
    assert await rules.check(pod.path, PodOptions(ipv6=False, dns_capture=False)) != []


class StepNames:
    """A `podrules.StepTimer` that notes the name of each step, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def step(self, name: str) -> contextlib.AbstractContextManager[object]:
        self.names.append(name)
        return contextlib.nullcontext()


async def test_a_step_timer_is_told_each_step_of_an_apply_and_a_check(
    runner: NetnsRunner, pod: LabPod
) -> None:
    state, forms = podrules.PodState.for_options(V4), podrules.KernelForms()
    fresh, installed, first, steady = StepNames(), StepNames(), StepNames(), StepNames()

    done = await runner.run(pod.path, podrules.apply_here, state, forms, fresh=True, steps=fresh)
    await runner.run(pod.path, podrules.check_here, state, forms, done.verified, steps=installed)
    proven = await runner.run(pod.path, podrules.check_here, state, forms, steps=first)
    await runner.run(pod.path, podrules.check_here, state, forms, proven.verified, steps=steady)

    assert fresh.names == [
        "nft_generation",
        "kernel_forms_lookup",
        "diff",
        "batch_replay",
        "routing_everything",
        "routing_write",
    ]
    assert installed.names == ["nft_generation", "routing_check"]  # verified at its own commit
    assert first.names == ["nft_generation", "dump_proof", "routing_check"]
    assert steady.names == ["nft_generation", "routing_check"]


async def test_a_new_sandboxs_install_is_verified_at_its_own_commit_and_no_later(
    runner: NetnsRunner, pod: LabPod
) -> None:
    state, forms = podrules.PodState.for_options(V4), podrules.KernelForms()
    done = await runner.run(pod.path, podrules.apply_here, state, forms, fresh=True)
    assert done.verified == Verified(podrules.PRISTINE_GENERATION + 1, state.ruleset)
    assert await runner.run(pod.path, generation) == podrules.PRISTINE_GENERATION + 1

    pod.netns.exec("nft", "flush", "chain", "inet", c.MANGLE_TABLE, "istio-output")  # after us
    checked = await runner.run(pod.path, podrules.check_here, state, forms, done.verified)
    assert [d.kind for d in checked.drifts] == [DriftKind.MISSING_RULE]


async def test_a_new_netns_is_at_the_pristine_generation(runner: NetnsRunner, pod: LabPod) -> None:
    """The fresh-pod shortcut relies on it: generation 1 means no table was ever committed."""
    assert await runner.run(pod.path, generation) == podrules.PRISTINE_GENERATION
    pod.netns.exec("nft", "add", "table", "inet", "t")
    assert await runner.run(pod.path, generation) > podrules.PRISTINE_GENERATION
    pod.netns.exec("nft", "delete", "table", "inet", "t")
    assert await runner.run(pod.path, generation) > podrules.PRISTINE_GENERATION


async def test_a_dormant_table_or_a_foreign_set_in_ours_is_drift(
    runner: NetnsRunner, pod: LabPod
) -> None:
    """A dormant table redirects nothing; what we never create must not hide in our tables."""
    rules = PodRules(runner)
    await rules.apply(pod.path, V4)
    pod.netns.exec("nft", "add", "table", "inet", c.NAT_TABLE, "{ flags dormant ; }")
    pod.netns.exec("nft", "add", "set", "inet", c.MANGLE_TABLE, "extra", "{ type ipv4_addr ; }")

    drifts = await rules.check(pod.path, V4)

    assert {(d.kind, d.table, d.detail) for d in drifts} == {
        (DriftKind.CHANGED_TABLE, c.NAT_TABLE, "flags dormant"),
        (DriftKind.CHANGED_TABLE, c.MANGLE_TABLE, "extra set extra"),
    }
    await rules.apply(pod.path, V4)
    assert await rules.check(pod.path, V4) == []
    assert "dormant" not in pod.netns.exec("nft", "list", "table", "inet", c.NAT_TABLE)
