"""The "no drift" proof by a normalised raw netlink dump, against the real kernel.

It may only ever say "identical": every pod of the option matrix passes it after an install
(whatever its counters say), and every kind of drift fails it and still gets its precise report
from the libnftables listing it falls back to. Each test works in lab namespaces (removed by the
`lab` fixture) or in anonymous scratch namespaces that vanish when the worker leaves them.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.matrix import POD_MATRIX, pod_name
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import DriftKind, TableListing
from ztunnel_redirect.core.model import HostOptions, PodOptions
from ztunnel_redirect.core.render import host_ruleset, pod_ruleset
from ztunnel_redirect.kernel import podrules
from ztunnel_redirect.kernel.dumpproof import (
    DumpInconsistentError,
    ExpectedDumps,
    dump_here,
    provable,
)
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.nft import Nft, generation
from ztunnel_redirect.kernel.podrules import KernelForms, PodRules, PodState, sync_tables_here
from ztunnel_redirect.testing.netnslab import Lab, Netns

pytestmark = pytest.mark.kernel

FULL = PodOptions(ipv6=True, dns_capture=True)
NO_DNS = PodOptions(ipv6=True, dns_capture=False)
NAT = c.NAT_TABLE


class Listings:
    """Counts the libnftables listings of `podrules` (patched in for one test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = podrules.read_tables

        def counting(nft: Nft, names: tuple[str, ...]) -> dict[str, TableListing | None]:
            self.calls += 1
            return real(nft, names)

        monkeypatch.setattr(podrules, "read_tables", counting)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> Listings:
    return Listings(monkeypatch)


def handle_of(ns: Netns, table: str, chain: str, text: str) -> str:
    """The handle of the first rule of a chain whose listing contains `text`."""
    listing = ns.exec("nft", "-a", "list", "chain", "inet", table, chain)
    for line in listing.splitlines():
        if text in line and "# handle " in line:
            return line.rsplit("# handle ", 1)[1].strip()
    raise AssertionError(f"no rule with {text!r} in {listing}")


async def installed(runner: NetnsRunner, lab: Lab, options: PodOptions) -> Netns:
    ns = lab.add_netns("pod")
    ns.ip("link", "set", "lo", "up")  # the local route of table 100 needs it
    assert await PodRules(runner).apply(ns.path, options, fresh=True) != []
    return ns


@pytest.mark.parametrize("options", POD_MATRIX, ids=[pod_name(o) for o in POD_MATRIX])
async def test_installed_pod_is_identical_without_listing(
    runner: NetnsRunner, lab: Lab, listings: Listings, options: PodOptions
) -> None:
    ns = await installed(runner, lab, options)
    ruleset = pod_ruleset(options)
    dumps = ExpectedDumps()

    assert await runner.run(ns.path, dump_here, ruleset) == await runner.run(
        None, dumps.of, ruleset
    )
    # A restarted agent: nothing remembered, the first check proves it by the dump alone.
    assert await PodRules(runner).check(ns.path, options) == []
    assert listings.calls == 0


def _traffic_here(count: int) -> None:
    """New UDP flows over lo: each one's first packet goes through the nat output chain
    (`oifname "lo" ip daddr != 127.0.0.1/32 counter accept`) and, marked as ztunnel's DNS
    traffic, through the raw output chain (`udp dport 53 meta mark ... == 0x539 counter`)."""
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("127.0.0.2", 9))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, c.ZTUNNEL_MARK)
            sock.sendto(b"x", ("127.0.0.1", 53))


async def test_counters_do_not_matter(runner: NetnsRunner, lab: Lab, listings: Listings) -> None:
    ns = await installed(runner, lab, FULL)
    ruleset = pod_ruleset(FULL)
    dumps = ExpectedDumps()
    counted = re.compile(r"counter packets [1-9]")
    assert not counted.search(ns.exec("nft", "list", "table", "inet", NAT))

    await runner.run(ns.path, _traffic_here, 5)

    assert counted.search(ns.exec("nft", "list", "table", "inet", NAT))
    assert counted.search(ns.exec("nft", "list", "table", "inet", c.RAW_TABLE))
    seen = await runner.run(ns.path, generation)
    assert await runner.run(ns.path, dumps.identical, ruleset, generation=seen)
    outcome = await runner.run(
        ns.path, sync_tables_here, PodState.for_options(FULL), KernelForms(), None, write=False
    )
    assert outcome.drifts == []
    assert outcome.verified is not None
    assert listings.calls == 0


def _rule_replaced(ns: Netns) -> None:
    text = "ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter"
    handle = handle_of(ns, NAT, "istio-output", text)
    ns.nft(
        f"replace rule inet {NAT} istio-output handle {handle} meta l4proto tcp "
        "ip daddr != 127.0.0.1/32 meta mark & 0xfff != 0x539 counter redirect to :15002\n",
    )


def _rule_deleted(ns: Netns) -> None:
    handle = handle_of(ns, NAT, "istio-output", "redirect to :15001")
    ns.nft(f"delete rule inet {NAT} istio-output handle {handle}\n")


def _chain_priority_changed(ns: Netns) -> None:
    ns.nft(
        f"flush chain inet {NAT} prerouting\n"
        f"delete chain inet {NAT} prerouting\n"
        f"add chain inet {NAT} prerouting {{ type nat hook prerouting priority -99 ; }}\n"
        f"add rule inet {NAT} prerouting jump istio-prerouting\n",
    )


def _rule_added(ns: Netns) -> None:
    ns.nft(f"add rule inet {NAT} istio-output tcp dport 9 accept\n")


def _chain_added(ns: Netns) -> None:
    ns.nft(f"add chain inet {NAT} extra\n")


def _counter_removed(ns: Netns) -> None:
    """The same rule without its counter: a counter's data is ignored, the counter is not."""
    handle = handle_of(ns, c.MANGLE_TABLE, "istio-output", "meta mark set ct mark")
    ns.nft(
        f"replace rule inet {c.MANGLE_TABLE} istio-output handle {handle} "
        "ct mark & 0xfff == 0x111 meta mark set ct mark\n",
    )


def _set_added(ns: Netns) -> None:
    """Something we never create in our table: drift for the listing too."""
    ns.nft(f"add set inet {NAT} extra {{ type ipv4_addr ; }}\n")


def _table_flushed(ns: Netns) -> None:
    ns.nft(f"flush table inet {NAT}\n")


def _table_deleted(ns: Netns) -> None:
    ns.nft(f"delete table inet {c.MANGLE_TABLE}\n")


def _stale_raw_table(ns: Netns) -> None:
    """A raw table left from when DNS capture was on."""
    ns.nft(pod_ruleset(FULL).table(c.RAW_TABLE).script())


def _table_dormant(ns: Netns) -> None:
    ns.nft(f"add table inet {NAT} {{ flags dormant ; }}\n")


@dataclass(frozen=True)
class DriftCase:
    name: str
    options: PodOptions
    make: Callable[[Netns], None]
    kinds: frozenset[DriftKind]
    """What the listing reports: empty for drift it does not see (the dump still does)."""


def _case(
    name: str, make: Callable[[Netns], None], *kinds: DriftKind, options: PodOptions = FULL
) -> DriftCase:
    return DriftCase(name, options, make, frozenset(kinds))


DRIFTS = [
    _case("rule_deleted", _rule_deleted, DriftKind.MISSING_RULE),
    _case("rule_added", _rule_added, DriftKind.EXTRA_RULE),
    _case("rule_replaced", _rule_replaced, DriftKind.MISSING_RULE, DriftKind.EXTRA_RULE),
    _case("counter_removed", _counter_removed, DriftKind.MISSING_RULE, DriftKind.EXTRA_RULE),
    _case("chain_added", _chain_added, DriftKind.EXTRA_CHAIN),
    _case("chain_priority", _chain_priority_changed, DriftKind.CHANGED_CHAIN),
    _case("table_flushed", _table_flushed, DriftKind.MISSING_RULE),
    _case("table_deleted", _table_deleted, DriftKind.MISSING_TABLE),
    _case("stale_raw_table", _stale_raw_table, DriftKind.STALE_TABLE, options=NO_DNS),
    # The listing parser reads "flags dormant" as an object and swallows the chain after it:
    # reported, but as a missing chain (drift.TableListing does not know table flags).
    _case("table_dormant", _table_dormant, DriftKind.CHANGED_TABLE),
    _case("set_added", _set_added, DriftKind.CHANGED_TABLE),
]


@pytest.mark.parametrize("case", DRIFTS, ids=[d.name for d in DRIFTS])
async def test_drift_is_never_identical(
    runner: NetnsRunner, lab: Lab, listings: Listings, case: DriftCase
) -> None:
    options, kinds = case.options, case.kinds
    ns = await installed(runner, lab, options)
    ruleset = pod_ruleset(options)
    case.make(ns)
    dumps = ExpectedDumps()

    seen = await runner.run(ns.path, generation)
    assert not await runner.run(ns.path, dumps.identical, ruleset, generation=seen)
    outcome = await runner.run(
        ns.path, sync_tables_here, PodState.for_options(options), KernelForms(), None, write=False
    )

    assert listings.calls == 1
    assert {d.kind for d in outcome.drifts} == kinds, outcome.drifts
    # With write, the listing decides the repair and the next check is identical again.
    await runner.run(
        ns.path, sync_tables_here, PodState.for_options(options), KernelForms(), None, write=True
    )
    seen = await runner.run(ns.path, generation)
    # What the listing does not report, it does not repair either.
    assert await runner.run(ns.path, dumps.identical, ruleset, generation=seen) is bool(kinds)


async def test_dump_of_another_generation_proves_nothing(runner: NetnsRunner, lab: Lab) -> None:
    ns = await installed(runner, lab, FULL)
    seen = await runner.run(ns.path, generation)

    await runner.run(ns.path, dump_here, pod_ruleset(FULL), generation=seen)
    with pytest.raises(DumpInconsistentError):
        await runner.run(ns.path, dump_here, pod_ruleset(FULL), generation=seen + 1)
    assert not await runner.run(
        ns.path, ExpectedDumps().identical, pod_ruleset(FULL), generation=seen - 1
    )


async def test_tables_with_sets_are_never_proven(runner: NetnsRunner, lab: Lab) -> None:
    host = host_ruleset(HostOptions(kubelet_uid=1000))
    ns = lab.add_netns("host")
    ns.nft(host.script())
    dumps = ExpectedDumps()
    seen = await runner.run(ns.path, generation)

    assert await runner.run(ns.path, dump_here, host) == await runner.run(None, dumps.of, host)
    assert not provable(await runner.run(None, dumps.of, host))
    assert not await runner.run(ns.path, dumps.identical, host, generation=seen)
    assert provable(await runner.run(None, dumps.of, pod_ruleset(FULL)))


class ReceivedBytes:
    """Every datagram that netlink sockets of this process receive (patched in for one test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data: list[bytes] = []
        received = self.data

        class Spy(socket.socket):
            def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
                data = super().recv(bufsize, flags)
                received.append(data)
                return data

        monkeypatch.setattr(socket, "socket", Spy)  # the module netlink opens sockets with


async def test_the_dump_never_reads_another_table(
    runner: NetnsRunner, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = await installed(runner, lab, FULL)
    chains = "".join(
        f"chain foreign-chain-{i} {{ tcp dport {i + 1} counter accept; }}\n" for i in range(300)
    )
    ns.nft(f"table inet zz-foreign {{\n{chains}}}\ntable ip zz-foreign-ip {{ chain c {{ }}; }}\n")
    ruleset = pod_ruleset(FULL)
    dumps = ExpectedDumps()
    await runner.run(None, dumps.of, ruleset)
    seen = await runner.run(ns.path, generation)
    spy = ReceivedBytes(monkeypatch)

    assert await runner.run(ns.path, dumps.identical, ruleset, generation=seen)
    assert spy.data
    assert not [data for data in spy.data if b"foreign" in data]
