"""Migration from Istio's iptables backend, in place, with real rules in lab network namespaces.

Istio's rules are recreated as its CNI agent writes them: `iptables-restore --noflush` payloads
(tests/data/iptables, modelled on istio/istio cni/pkg/iptables) in both flavours, the same ip rule
and table-100 route as ours, and real ipsets in the lab's node netns. The ztunnel stand-in proves
with real connections that both rule sets redirect, and that none bypassed it while migrating.
"""

from __future__ import annotations

import difflib
import functools
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect import constants as c
from ztunnel_redirect import hostrules
from ztunnel_redirect.drift import Drift
from ztunnel_redirect.errors import NetnsNotFoundError
from ztunnel_redirect.migration import (
    Flavour,
    IptablesMigration,
    IstioIptables,
    MigrationError,
    detect_here,
    migrate_host_here,
    migrate_pod_here,
    parse_save,
    remove_host_iptables_here,
    remove_pod_iptables_here,
)
from ztunnel_redirect.model import HostOptions, PodOptions, PodUid
from ztunnel_redirect.netns import NetnsRunner, netns_id
from ztunnel_redirect.podrules import KernelForms, PodState
from ztunnel_redirect.routing import Family
from ztunnel_redirect.testing.netnslab import Lab, LabPod, Netns
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin
from ztunnel_redirect.testing.traffic import App, request

DATA = Path(__file__).parent / "data" / "iptables"
APP_PORT = 8080
KUBELET_UID = 65534  # nobody plays kubelet for our host rule's skuid match
UID_B = "uid-of-pod-b"

MIN_BEFORE = 20
"""Connections made before the migration starts (so it runs under load)."""
MIN_AFTER = 20
"""Connections made after the migration ended."""
MAX_CONNECTIONS = 3000
LOOP_DEADLINE = 60.0

STATE = PodState.for_options(PodOptions(ipv6=True))


# -- helpers -------------------------------------------------------------------------------------


def sh(path: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    """Run a tool in a lab netns (nsenter: /proc/net then shows that netns)."""
    result = subprocess.run(
        ["nsenter", f"--net={path}", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {path}: {result.stderr.strip()}")
    return result.stdout


def restore(path: str, flavour: Flavour, family: Family, payload: str) -> None:
    base = "ip6tables" if family is Family.V6 else "iptables"
    sh(path, f"{base}-{flavour.value}-restore", "--noflush", "-w", "5", stdin=payload)


def save(path: str, flavour: Flavour, family: Family) -> str:
    base = "ip6tables" if family is Family.V6 else "iptables"
    if flavour is Flavour.LEGACY:
        names = "ip6_tables_names" if family is Family.V6 else "ip_tables_names"
        if not sh(path, "cat", f"/proc/net/{names}").split():
            return ""
    text = sh(path, f"{base}-{flavour.value}-save")
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def all_saves(path: str) -> str:
    return "".join(save(path, flavour, family) for flavour in Flavour for family in Family)


def routes_of_table_100(path: str) -> str:
    """(`ip route show table 100` fails while the table does not exist.)"""
    routes = sh(path, "ip", "-4", "route", "show", "table", "all")
    routes += sh(path, "ip", "-6", "route", "show", "table", "all")
    return "".join(line + "\n" for line in routes.splitlines() if "table 100 " in line)


def snapshot(path: str) -> str:
    """Every netfilter object a detection could disturb, with handles, without counters."""
    text = "\n".join(
        [
            all_saves(path),
            sh(path, "cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"),
            sh(path, "nft", "-a", "list", "ruleset"),
            sh(path, "ipset", "list"),
            sh(path, "ip", "rule"),
            routes_of_table_100(path),
        ]
    )
    text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def assert_same(before: str, after: str) -> None:
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True)))
    assert not diff, f"netfilter state changed:\n{diff}"


def install_istio_pod(pod: LabPod, flavour: Flavour) -> None:
    """Istio's in-pod rules for both families, its ip rule and its local route."""
    restore(pod.path, flavour, Family.V4, (DATA / "pod-v4.rules").read_text())
    restore(pod.path, flavour, Family.V6, (DATA / "pod-v6.rules").read_text())
    for v in ("-4", "-6"):
        pod.netns.ip(v, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "100", "pref", "32764")
    pod.netns.ip("-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    pod.netns.ip("-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")


def install_istio_host(node: Netns, flavour: Flavour, members: dict[str, str]) -> None:
    """Istio's probe ipsets (hash:ip with comments) and its ISTIO_POSTRT SNAT chain."""
    for name, family in ((c.HOST_SET_V4, "inet"), (c.HOST_SET_V6, "inet6")):
        sh(node.path, "ipset", "create", name, "hash:ip", "family", family, "comment")
    for ip, uid in members.items():
        name = c.HOST_SET_V6 if ":" in ip else c.HOST_SET_V4
        sh(node.path, "ipset", "add", name, ip, "comment", uid)
    restore(node.path, flavour, Family.V4, (DATA / "host-v4.rules").read_text())
    restore(node.path, flavour, Family.V6, (DATA / "host-v6.rules").read_text())


def our_host_table(members: dict[str, str]) -> Callable[[], list[Drift]]:
    """The agent's install step for the host: the host rules' apply with the pods' IPs."""
    elements = {ip: PodUid(uid) for ip, uid in members.items()}
    options = HostOptions(kubelet_uid=KUBELET_UID)
    return functools.partial(hostrules.apply_here, options, elements, KernelForms())


@functools.cache
def legacy_unavailable() -> str | None:
    """Why iptables-legacy cannot be used here, or None (tried in a throwaway lab netns)."""
    if shutil.which("iptables-legacy-restore") is None:
        return "iptables-legacy is not installed"
    if not Path("/proc/net/ip_tables_names").exists():
        return "the kernel has no legacy x_tables (no /proc/net/ip_tables_names)"
    with Lab() as lab:
        probe = lab.add_netns("legacy-probe")
        try:
            restore(probe.path, Flavour.LEGACY, Family.V4, "*nat\nCOMMIT\n")
            restore(probe.path, Flavour.LEGACY, Family.V6, "*nat\nCOMMIT\n")
        except RuntimeError as exc:
            return f"legacy iptables tables cannot be loaded on this kernel: {exc}"
    return None


def need(flavour: Flavour) -> None:
    if shutil.which("iptables-nft-restore") is None or shutil.which("ipset") is None:
        pytest.skip("iptables/ipset are not installed (make setup installs them)")
    if flavour is Flavour.LEGACY and (reason := legacy_unavailable()):
        pytest.skip(reason)


FLAVOURS = pytest.mark.parametrize("flavour", list(Flavour), ids=[f.value for f in Flavour])


@pytest.fixture
def runner() -> Iterator[NetnsRunner]:
    with NetnsRunner(workers=2) as the_runner:
        yield the_runner


# -- parsing iptables-save (pure) ----------------------------------------------------------------

SAVED_NAT = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
:KUBE-FOO - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A PREROUTING -p udp -m udp --dport 9999 -j KUBE-FOO
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -m comment --comment "to istio -j ISTIO_OUTPUT" -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
"""


def test_parse_save_finds_chains_and_every_jump_into_them() -> None:
    (table,) = parse_save(SAVED_NAT, Flavour.NFT, Family.V4, chains=("ISTIO_PRERT", "ISTIO_OUTPUT"))
    assert (table.flavour, table.family, table.table) == (Flavour.NFT, Family.V4, "nat")
    assert table.chains == ("ISTIO_OUTPUT", "ISTIO_PRERT")
    assert table.jumps == (
        "-A PREROUTING -j ISTIO_PRERT",
        "-A PREROUTING -j ISTIO_PRERT",
        '-A OUTPUT -m comment --comment "to istio -j ISTIO_OUTPUT" -j ISTIO_OUTPUT',
    )
    assert table.sidecar_chains == ()


def test_removal_deletes_jumps_then_flushes_then_deletes_chains() -> None:
    (table,) = parse_save(SAVED_NAT, Flavour.NFT, Family.V4, chains=("ISTIO_PRERT", "ISTIO_OUTPUT"))
    assert table.removal() == (
        "*nat\n"
        "-D PREROUTING -j ISTIO_PRERT\n"
        "-D PREROUTING -j ISTIO_PRERT\n"
        '-D OUTPUT -m comment --comment "to istio -j ISTIO_OUTPUT" -j ISTIO_OUTPUT\n'
        "-F ISTIO_OUTPUT\n-F ISTIO_PRERT\n"
        "-X ISTIO_OUTPUT\n-X ISTIO_PRERT\n"
        "COMMIT\n"
    )


def test_parse_save_ignores_tables_without_istio_chains() -> None:
    assert parse_save(SAVED_NAT, Flavour.LEGACY, Family.V6, chains=("ISTIO_POSTRT",)) == ()


def test_sidecar_chains_make_removal_refuse_before_touching_anything() -> None:
    saved = (
        "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_INBOUND - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    found = IstioIptables(parse_save(saved, Flavour.NFT, Family.V4, chains=("ISTIO_OUTPUT",)))
    assert found.tables[0].sidecar_chains == ("ISTIO_INBOUND",)
    with pytest.raises(MigrationError, match="sidecar"):
        remove_pod_iptables_here(found)


# -- detection -----------------------------------------------------------------------------------


@pytest.mark.kernel
def test_detection_in_a_clean_pod_finds_nothing_and_creates_nothing(
    runner: NetnsRunner, lab: Lab
) -> None:
    need(Flavour.NFT)
    pod = lab.add_pod("clean")
    before = snapshot(pod.path)
    assert runner.call(pod.path, detect_here) == IstioIptables()
    assert runner.call(pod.path, detect_here, host=True) == IstioIptables()
    assert snapshot(pod.path) == before
    assert sh(pod.path, "cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names") == ""


@pytest.mark.kernel
@FLAVOURS
def test_detection_finds_istios_pod_chains_and_changes_nothing(
    runner: NetnsRunner, lab: Lab, flavour: Flavour
) -> None:
    need(flavour)
    pod = lab.add_pod("istio")
    install_istio_pod(pod, flavour)
    before = snapshot(pod.path)

    found = runner.call(pod.path, detect_here)

    assert snapshot(pod.path) == before
    assert found.flavours == {flavour}
    assert found.families == {Family.V4, Family.V6}
    for family in Family:
        assert sorted(found.table_names(flavour, family)) == ["mangle", "nat", "raw"]
    assert all(sorted(t.chains) == ["ISTIO_OUTPUT", "ISTIO_PRERT"] for t in found.tables)
    assert found.ipsets == ()
    assert not found.postrouting


@pytest.mark.kernel
@FLAVOURS
def test_detection_finds_istios_host_chain_and_ipsets_and_changes_nothing(
    runner: NetnsRunner, lab: Lab, flavour: Flavour
) -> None:
    need(flavour)
    install_istio_host(lab.node, flavour, {"10.244.0.9": UID_B, "fd00:244::9:2": UID_B})
    before = snapshot(lab.node.path)

    found = runner.call(lab.node.path, detect_here, host=True)

    assert snapshot(lab.node.path) == before
    assert found.postrouting
    assert found.ipsets == (c.HOST_SET_V4, c.HOST_SET_V6)
    assert {(t.family, t.table) for t in found.tables} == {(Family.V4, "nat"), (Family.V6, "nat")}
    assert all(t.jumps == ("-A POSTROUTING -j ISTIO_POSTRT",) for t in found.tables)


# -- removal -------------------------------------------------------------------------------------

FOREIGN_V4 = """\
*nat
-N KUBE-FOO
-A PREROUTING -p udp -m udp --dport 9999 -j KUBE-FOO
-A PREROUTING -j ISTIO_PRERT
-A KUBE-FOO -j ACCEPT
-A OUTPUT -p tcp -m tcp --dport 9 -j ACCEPT
COMMIT
*mangle
-A OUTPUT -p tcp -m tcp --dport 9 -j MARK --set-mark 0x7
COMMIT
"""


@pytest.mark.kernel
@FLAVOURS
def test_removal_takes_exactly_istios_chains_and_jumps(
    runner: NetnsRunner, lab: Lab, flavour: Flavour
) -> None:
    need(flavour)
    pod = lab.add_pod("istio")
    install_istio_pod(pod, flavour)
    # Someone else's rules, and a jump Istio wrote twice (its flipping detection, SPEC §11.2).
    restore(pod.path, flavour, Family.V4, FOREIGN_V4)
    routing_before = pod.netns.ip("rule") + pod.netns.ip("route", "show", "table", "100")

    found = runner.call(pod.path, detect_here)
    nat_v4 = next(t for t in found.tables if (t.family, t.table) == (Family.V4, "nat"))
    assert nat_v4.jumps.count("-A PREROUTING -j ISTIO_PRERT") == 2
    removed = runner.call(pod.path, remove_pod_iptables_here, found)

    assert len(removed) == 6
    saved = all_saves(pod.path)
    assert "ISTIO_" not in saved
    assert "-A PREROUTING -p udp -m udp --dport 9999 -j KUBE-FOO" in saved
    assert "-A KUBE-FOO -j ACCEPT" in saved
    assert "-A OUTPUT -p tcp -m tcp --dport 9 -j ACCEPT" in saved
    assert "-A OUTPUT -p tcp -m tcp --dport 9 -j MARK --set-xmark 0x7/0xffffffff" in saved
    assert pod.netns.ip("rule") + pod.netns.ip("route", "show", "table", "100") == routing_before
    assert runner.call(pod.path, detect_here) == IstioIptables()


@pytest.mark.kernel
def test_host_migration_keeps_istios_rules_when_ours_are_not_in_place(
    runner: NetnsRunner, lab: Lab
) -> None:
    need(Flavour.NFT)
    install_istio_host(lab.node, Flavour.NFT, {"10.244.0.9": UID_B})
    before = snapshot(lab.node.path)

    with pytest.raises(MigrationError, match="not in place"):
        runner.call(lab.node.path, migrate_host_here, list)

    assert snapshot(lab.node.path) == before


@pytest.mark.kernel
def test_host_migration_reports_ips_that_our_sets_do_not_cover(
    runner: NetnsRunner, lab: Lab
) -> None:
    need(Flavour.NFT)
    install_istio_host(lab.node, Flavour.NFT, {"10.244.0.9": UID_B, "10.244.0.77": "gone"})

    report = runner.call(lab.node.path, migrate_host_here, our_host_table({"10.244.0.9": UID_B}))

    assert report.uncovered == ("10.244.0.77",)
    assert report.removed[-2:] == (f"ipset {c.HOST_SET_V4}", f"ipset {c.HOST_SET_V6}")
    assert sh(lab.node.path, "ipset", "list", "-n") == ""
    assert runner.call(lab.node.path, detect_here, host=True) == IstioIptables()
    assert runner.call(lab.node.path, remove_host_iptables_here, IstioIptables()) == []


@pytest.mark.kernel
def test_host_migration_waits_until_our_sets_hold_this_nodes_pods(
    runner: NetnsRunner, lab: Lab
) -> None:
    need(Flavour.NFT)
    pending = "10.244.0.50"  # a pod of this node not enrolled yet (no netns, no ztunnel)
    members = {"10.244.0.9": UID_B, pending: "uid-of-pod-c", "10.244.0.77": "gone"}
    install_istio_host(lab.node, Flavour.NFT, members)
    on_node = ["10.244.0.9", pending]
    before = all_saves(lab.node.path) + sh(lab.node.path, "ipset", "list")

    report = runner.call(
        lab.node.path,
        migrate_host_here,
        our_host_table({"10.244.0.9": UID_B}),
        node_ips=on_node,
    )

    assert report.postponed == (pending,)
    assert report.removed == ()
    assert all_saves(lab.node.path) + sh(lab.node.path, "ipset", "list") == before
    assert runner.call(lab.node.path, detect_here, host=True).postrouting

    # A later pass, once the pod is enrolled: Istio's part goes, the long-gone IP does not block.
    ours = {"10.244.0.9": UID_B, pending: "uid-of-pod-c"}
    report = runner.call(lab.node.path, migrate_host_here, our_host_table(ours), node_ips=on_node)

    assert report.postponed == ()
    assert report.uncovered == ("10.244.0.77",)
    assert report.removed[-2:] == (f"ipset {c.HOST_SET_V4}", f"ipset {c.HOST_SET_V6}")
    assert runner.call(lab.node.path, detect_here, host=True) == IstioIptables()


# -- migration under traffic ---------------------------------------------------------------------


@dataclass
class ClientLoop:
    """Connections from pod A to the app in pod B, one after another, v4 and v6 alternating."""

    a: LabPod
    b: LabPod
    made: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        deadline = time.monotonic() + LOOP_DEADLINE
        for n in range(MAX_CONNECTIONS):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            dst, src = (self.b.ipv4, self.a.ipv4) if n % 2 == 0 else (self.b.ipv6, self.a.ipv6)
            assert dst is not None
            try:
                reply = request(self.a.path, dst, APP_PORT, timeout=5.0)
                if reply != f"app b saw {src}\n".encode():
                    self.failures.append(f"{dst}: {reply!r}")
            except OSError as exc:
                self.failures.append(f"{dst}: {exc!r}")
            with self.cond:
                self.made += 1
                self.cond.notify_all()
        self.stop.set()
        with self.cond:
            self.cond.notify_all()

    def wait_until(self, count: int, *, timeout: float = 30.0) -> None:
        with self.cond:
            reached = self.cond.wait_for(lambda: self.made >= count or self.stop.is_set(), timeout)
        assert reached, f"client loop made {self.made} connections, wanted {count}"
        assert self.made >= count, f"client loop stopped at {self.made} connections"


def to_app(hop: Hop, b: LabPod) -> bool:
    return hop.original_dst[1] == APP_PORT and hop.original_dst[0] in b.ips


def our_tables(path: str) -> str:
    return sh(path, "nft", "list", "tables")


@pytest.mark.kernel
@FLAVOURS
def test_migration_under_traffic_never_lets_a_connection_bypass_ztunnel(
    runner: NetnsRunner, lab6: Lab, flavour: Flavour
) -> None:
    need(flavour)
    lab = lab6
    a, b = lab.add_pod("a"), lab.add_pod("b")
    assert a.ipv6 is not None and b.ipv6 is not None
    members = {ip: f"uid-{pod.netns.name}" for pod in (a, b) for ip in pod.ips}
    for pod in (a, b):
        install_istio_pod(pod, flavour)
    install_istio_host(lab.node, flavour, members)
    forms = KernelForms()

    with (
        Standin(a.path, ipv6=True) as zt_a,
        Standin(b.path, ipv6=True) as zt_b,
        App(b.path, APP_PORT, name="b", ipv6=True) as app,
    ):
        # Before: Istio's iptables rules redirect through both stand-ins, and SNAT host probes.
        assert request(a.path, b.ipv4, APP_PORT) == f"app b saw {a.ipv4}\n".encode()
        zt_a.wait_for(lambda h: h.kind is HopKind.OUTBOUND and to_app(h, b))
        zt_b.wait_for(lambda h: h.kind is HopKind.INBOUND and to_app(h, b))
        probe = request(lab.node.path, b.ipv4, APP_PORT)
        assert probe == f"app b saw {c.PROBE_SNAT_V4}\n".encode()
        zt_a.clear()
        zt_b.clear()
        app.clear()

        # During: a client loop keeps connecting while pods and host are migrated.
        loop = ClientLoop(a, b)
        client = threading.Thread(target=loop.run, name="client-loop", daemon=True)
        client.start()
        try:
            loop.wait_until(MIN_BEFORE)
            with loop.cond:
                at_start = loop.made
            reports = [runner.call(pod.path, migrate_pod_here, STATE, forms) for pod in (a, b)]
            host_report = runner.call(lab.node.path, migrate_host_here, our_host_table(members))
            with loop.cond:
                at_end = loop.made
            loop.wait_until(at_end + MIN_AFTER)
        finally:
            loop.stop.set()
            client.join(LOOP_DEADLINE)
        assert not client.is_alive()
        assert at_end > at_start, "no connection was made while the migration ran"

        # Every connection made went through A's stand-in out and B's stand-in in.
        assert loop.failures == []
        outbound = [h for h in zt_a.hops if h.kind is HopKind.OUTBOUND and to_app(h, b)]
        inbound = [h for h in zt_b.hops if h.kind is HopKind.INBOUND and to_app(h, b)]
        assert len(outbound) == loop.made
        assert len(inbound) == loop.made
        assert sorted(p[0] for p in app.peers) == sorted(h.client[0] for h in inbound)
        assert {p[0] for p in app.peers} == {a.ipv4, a.ipv6}

        # After: only our nftables tables; Istio's chains and ipsets are gone; routing stays.
        for report in reports:
            assert report.found.flavours == {flavour}
            assert len(report.removed) == 6
            assert report.installed
        assert host_report.found.postrouting
        assert host_report.uncovered == ()
        for path in (a.path, b.path, lab.node.path):
            assert "ISTIO_" not in all_saves(path)
        assert sh(lab.node.path, "ipset", "list", "-n") == ""
        for pod in (a, b):
            tables = our_tables(pod.path)
            assert all(f"table inet {name}" in tables for name in c.POD_TABLES)
            assert "fwmark 0x111/0xfff lookup 100" in pod.netns.ip("rule")
        assert f"table inet {c.HOST_TABLE}" in our_tables(lab.node.path)

        # Our rules carry traffic and kubelet's probes on their own.
        zt_b.clear()
        assert request(a.path, b.ipv6, APP_PORT) == f"app b saw {a.ipv6}\n".encode()
        zt_b.wait_for(lambda h: h.kind is HopKind.INBOUND and h.client[0] == a.ipv6)
        probe = request(lab.node.path, b.ipv4, APP_PORT, uid=KUBELET_UID)
        assert probe == f"app b saw {c.PROBE_SNAT_V4}\n".encode()

        # Twice is harmless: nothing found, nothing written.
        before = {path: snapshot(path) for path in (a.path, b.path, lab.node.path)}
        for pod in (a, b):
            again = runner.call(pod.path, migrate_pod_here, STATE, forms)
            assert not again.changed
            assert not again.found.found
        again_host = runner.call(lab.node.path, migrate_host_here, list)
        assert not again_host.changed
        for path, text in before.items():
            assert_same(text, snapshot(path))


@pytest.mark.kernel
async def test_the_agents_face_logs_what_it_changed_once(lab: Lab) -> None:
    need(Flavour.NFT)
    pod = lab.add_pod("istio")
    install_istio_pod(pod, Flavour.NFT)
    with NetnsRunner(workers=1) as runner:
        migration = IptablesMigration(runner)
        assert (await migration.detect(pod.path)).flavours == {Flavour.NFT}
        with capture_logs() as logs:
            first = await migration.migrate_pod(pod.path, PodOptions(ipv6=True))
            second = await migration.migrate_pod(pod.path, PodOptions(ipv6=True))
    assert first.changed
    assert not second.changed
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("pod_migrated", "info"), ("pod_migrated", "debug")]
    assert logs[0]["removed"] == list(first.removed)
    assert "ISTIO_" not in all_saves(pod.path)


@pytest.mark.kernel
async def test_a_netns_that_is_no_longer_the_pods_is_not_migrated(lab: Lab) -> None:
    need(Flavour.NFT)
    pod = lab.add_pod("istio")
    install_istio_pod(pod, Flavour.NFT)
    before = all_saves(pod.path)
    key = netns_id(pod.path)
    assert key is not None
    with NetnsRunner(workers=1) as runner:
        migration = IptablesMigration(runner)
        with pytest.raises(NetnsNotFoundError):
            await migration.migrate_pod(
                pod.path, PodOptions(ipv6=True), identity=(key[0], key[1] + 1)
            )
    assert all_saves(pod.path) == before
    assert c.NAT_TABLE not in pod.netns.exec("nft", "list", "tables")
