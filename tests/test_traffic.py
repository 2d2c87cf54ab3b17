"""The redirection core proven with real traffic (issue "Redirection core", point 8).

A lab node with pods A (client) and B (server). Both pods get the project's own pod rules
(`PodRules`, the code the agent runs), the node netns gets the host rules with both pods' IPs,
each pod runs a ztunnel stand-in and B runs an app. Every check counts what reached each hop:
the stand-ins record every connection (`Hop`), the app records every peer address it saw.

Each test runs IPv4-only and dual-stack; in the dual-stack case every check is made for both
families. Nothing waits by sleeping: hops and peers are waited for under a timeout, and a
request that must fail is bounded by its own timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from ztunnel_redirect.core.constants import (
    HBONE_PORT,
    NAT_TABLE,
    PROBE_SNAT_V4,
    PROBE_SNAT_V6,
    RULE_PRIORITY,
)
from ztunnel_redirect.core.model import HostOptions, PodOptions, PodUid
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.podrules import PodRules
from ztunnel_redirect.testing.netnslab import Lab, LabPod
from ztunnel_redirect.testing.standin import HBONE_REPLY, Hop, HopKind, Standin, dns_reply
from ztunnel_redirect.testing.traffic import App, request, udp_request

pytestmark = pytest.mark.kernel

APP_PORT = 8080
KUBELET_UID = 4242
OTHER_UID = 65534
RESOLVER = {4: "10.96.0.10", 6: "fd00:96::a"}
SNAT = {4: PROBE_SNAT_V4, 6: PROBE_SNAT_V6}
NODE = {4: Lab.NODE_V4, 6: Lab.NODE_V6}

OK_TIMEOUT = 8.0
"""For traffic that must get through (a fresh dual-stack lab's first IPv6 connection is slow)."""
FAIL_TIMEOUT = 3.0
"""For traffic that must not get through; always preceded by a success in the same family."""
HOP_TIMEOUT = 5.0
CLI_TIMEOUT = 60.0


def version(ip: str) -> int:
    return 6 if ":" in ip else 4


@dataclass
class Mesh:
    """Everything one test drives; built and torn down by the `mesh` fixture."""

    lab: Lab
    a: LabPod
    b: LabPod
    ipv6: bool
    runner: NetnsRunner
    pod_rules: PodRules
    standin_a: Standin
    standin_b: Standin
    app: App

    def options(self, *, dns_capture: bool = True) -> PodOptions:
        return PodOptions(ipv6=self.ipv6, dns_capture=dns_capture)

    def apply_pod(self, pod: LabPod, options: PodOptions | None = None) -> None:
        asyncio.run(self.pod_rules.apply(pod.path, options or self.options()))

    def pairs(self) -> list[tuple[str, str]]:
        """(A's address, B's address) for every family under test."""
        return list(zip(self.a.ips, self.b.ips, strict=True))

    def reply(self, seen: str) -> bytes:
        return f"app {self.app.name} saw {seen}\n".encode()

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        family = "--ipv6" if self.ipv6 else "--no-ipv6"
        return subprocess.run(
            [sys.executable, "-m", "ztunnel_redirect.app.cli", *argv, family],
            capture_output=True,
            text=True,
            check=False,
            timeout=CLI_TIMEOUT,
        )


@pytest.fixture(params=[False, True], ids=["ipv4", "dual-stack"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    ipv6: bool = request.param
    with ExitStack() as stack:
        lab = stack.enter_context(Lab(ipv6=ipv6))
        a, b = lab.add_pod("a"), lab.add_pod("b")
        runner = stack.enter_context(NetnsRunner(workers=2))
        pod_rules = PodRules(runner)
        for pod in (a, b):
            asyncio.run(pod_rules.apply(pod.path, PodOptions(ipv6=ipv6)))
        elements = {ip: PodUid(f"uid-{pod.netns.name}") for pod in (a, b) for ip in pod.ips}
        host = HostRules(runner, netns=lab.node.path)
        asyncio.run(host.apply(HostOptions(kubelet_uid=KUBELET_UID, ipv6=ipv6), elements))
        standin_a = stack.enter_context(Standin(a.path, ipv6=ipv6))
        standin_b = stack.enter_context(Standin(b.path, ipv6=ipv6))
        app = stack.enter_context(App(b.path, APP_PORT, name="b", ipv6=ipv6))
        yield Mesh(lab, a, b, ipv6, runner, pod_rules, standin_a, standin_b, app)


def kinds(hops: list[Hop]) -> list[HopKind]:
    return [hop.kind for hop in hops]


def hop(
    kind: HopKind, *, to: tuple[str, int] | None = None, client: str | None = None
) -> Callable[[Hop], bool]:
    """A predicate for `Standin.wait_for`: a hop of `kind`, going `to`, from `client`'s address."""

    def matches(h: Hop) -> bool:
        return (
            h.kind is kind
            and (to is None or h.original_dst == to)
            and (client is None or h.client[0] == client)
        )

    return matches


def peer(ip: str) -> Callable[[tuple[str, int]], bool]:
    """A predicate for `App.wait_for_peer`: a connection from `ip`."""
    return lambda p: p[0] == ip


# -- 1, 2: outbound and inbound capture ---------------------------------------------------------


def test_outbound_is_caught_by_the_clients_standin_and_inbound_by_the_servers(mesh: Mesh) -> None:
    for a_ip, b_ip in mesh.pairs():
        assert request(mesh.a.path, b_ip, APP_PORT, timeout=OK_TIMEOUT) == mesh.reply(a_ip)

        out = mesh.standin_a.wait_for(
            hop(HopKind.OUTBOUND, to=(b_ip, APP_PORT)), timeout=HOP_TIMEOUT
        )
        assert out.client[0] == a_ip
        inbound = mesh.standin_b.wait_for(
            hop(HopKind.INBOUND, to=(b_ip, APP_PORT)), timeout=HOP_TIMEOUT
        )
        # B's stand-in sees A's address (the relay kept it), and so does B's app.
        assert inbound.client[0] == a_ip
        assert mesh.app.wait_for_peer(peer(a_ip), timeout=HOP_TIMEOUT)

    n = len(mesh.pairs())
    # Exactly one hop per request at each stand-in: nothing was caught twice, nothing else.
    assert kinds(mesh.standin_a.hops) == [HopKind.OUTBOUND] * n
    assert kinds(mesh.standin_b.hops) == [HopKind.INBOUND] * n
    assert [ip for ip, _ in mesh.app.peers] == [a_ip for a_ip, _ in mesh.pairs()]


# -- 3: the reply needs the mark-based routing ------------------------------------------------


def test_reply_to_the_spoofed_source_needs_the_ip_rule(mesh: Mesh) -> None:
    for a_ip, b_ip in mesh.pairs():
        assert request(mesh.a.path, b_ip, APP_PORT, timeout=OK_TIMEOUT) == mesh.reply(a_ip)

    for _, b_ip in mesh.pairs():
        family = "-6" if version(b_ip) == 6 else "-4"
        mesh.b.netns.ip(family, "rule", "del", "priority", str(RULE_PRIORITY))
    mesh.app.clear()
    mesh.standin_b.clear()

    for _, b_ip in mesh.pairs():
        with pytest.raises(OSError):  # TimeoutError or a reset passed on by the stand-ins
            request(mesh.a.path, b_ip, APP_PORT, timeout=FAIL_TIMEOUT)
        # The connection was caught by B's stand-in, but its handshake with the app never
        # completed: the app's SYN-ACK to A's (non-local) address left the pod through eth0.
        mesh.standin_b.wait_for(hop(HopKind.INBOUND, to=(b_ip, APP_PORT)), timeout=HOP_TIMEOUT)
    assert mesh.app.peers == []

    repaired = mesh.cli("pod", "apply", "--netns", mesh.b.path)
    assert repaired.returncode == 0, repaired.stderr
    assert "ip rule" in repaired.stdout
    if mesh.ipv6:
        assert "ip -6 rule" in repaired.stdout

    for a_ip, b_ip in mesh.pairs():
        assert request(mesh.a.path, b_ip, APP_PORT, timeout=OK_TIMEOUT) == mesh.reply(a_ip)


# -- 4: HBONE is never redirected -------------------------------------------------------------


def test_hbone_reaches_the_hbone_listener_without_an_inbound_redirect(mesh: Mesh) -> None:
    for a_ip, b_ip in mesh.pairs():
        # From A's app, as ztunnel would send it: A's stand-in catches it outbound and relays it
        # with ztunnel's mark; B's rules leave port 15008 alone.
        assert request(mesh.a.path, b_ip, HBONE_PORT, timeout=OK_TIMEOUT) == HBONE_REPLY
        mesh.standin_a.wait_for(hop(HopKind.OUTBOUND, to=(b_ip, HBONE_PORT)), timeout=HOP_TIMEOUT)
        hbone = mesh.standin_b.wait_for(hop(HopKind.HBONE, client=a_ip), timeout=HOP_TIMEOUT)
        assert hbone.original_dst == (b_ip, HBONE_PORT)
        # From the node (no rules on the way): straight to the HBONE listener too.
        node_ip = NODE[version(b_ip)]
        assert request(mesh.lab.node.path, b_ip, HBONE_PORT, timeout=OK_TIMEOUT) == HBONE_REPLY
        mesh.standin_b.wait_for(hop(HopKind.HBONE, client=node_ip), timeout=HOP_TIMEOUT)

    assert kinds(mesh.standin_b.hops) == [HopKind.HBONE] * (2 * len(mesh.pairs()))
    assert mesh.app.peers == []


# -- 5: kubelet probes are SNATed on the node and accepted in the pod ---------------------------


def test_kubelet_probe_is_snated_and_reaches_the_app_directly(mesh: Mesh) -> None:
    for _, b_ip in mesh.pairs():
        snat = SNAT[version(b_ip)]
        got = request(mesh.lab.node.path, b_ip, APP_PORT, uid=KUBELET_UID, timeout=OK_TIMEOUT)
        assert got == mesh.reply(snat)
        assert mesh.app.wait_for_peer(peer(snat), timeout=HOP_TIMEOUT)
    assert mesh.standin_b.hops == []

    for _, b_ip in mesh.pairs():
        node_ip = NODE[version(b_ip)]
        got = request(mesh.lab.node.path, b_ip, APP_PORT, uid=OTHER_UID, timeout=OK_TIMEOUT)
        assert got == mesh.reply(node_ip)
        inbound = mesh.standin_b.wait_for(hop(HopKind.INBOUND, client=node_ip), timeout=HOP_TIMEOUT)
        assert inbound.original_dst == (b_ip, APP_PORT)

    n = len(mesh.pairs())
    assert kinds(mesh.standin_b.hops) == [HopKind.INBOUND] * n
    expected = [SNAT[version(b)] for _, b in mesh.pairs()] + [
        NODE[version(b)] for _, b in mesh.pairs()
    ]
    assert [ip for ip, _ in mesh.app.peers] == expected


# -- 6: DNS capture ---------------------------------------------------------------------------


def test_dns_goes_to_the_standins_dns_proxy_only_with_dns_capture(mesh: Mesh) -> None:
    resolvers = [RESOLVER[version(a_ip)] for a_ip, _ in mesh.pairs()]
    for resolver in resolvers:
        query = f"query {resolver}".encode()
        data, source = udp_request(mesh.a.path, resolver, 53, query, timeout=OK_TIMEOUT)
        assert data == dns_reply(query)
        # The reverse NAT makes the answer come from where the query went.
        assert source == (resolver, 53)
    assert kinds(mesh.standin_a.hops) == [HopKind.DNS] * len(resolvers)

    mesh.apply_pod(mesh.a, mesh.options(dns_capture=False))
    mesh.standin_a.clear()
    for resolver in resolvers:
        with pytest.raises(TimeoutError):
            udp_request(mesh.a.path, resolver, 53, b"uncaptured", timeout=FAIL_TIMEOUT)
    assert mesh.standin_a.hops == []


# -- 7: drift found by `pod check`, repaired by `pod apply` --------------------------------------


def test_flushed_nat_table_is_reported_bypassed_and_repaired_by_the_cli(mesh: Mesh) -> None:
    clean = mesh.cli("pod", "check", "--netns", mesh.a.path)
    assert (clean.returncode, clean.stdout) == (0, ""), clean.stderr

    mesh.a.netns.exec("nft", "flush", "table", "inet", NAT_TABLE)

    drift = mesh.cli("pod", "check", "--netns", mesh.a.path)
    assert drift.returncode == 1, drift.stderr
    lines = drift.stdout.splitlines()
    assert lines
    assert all(line.startswith("drift: ") and NAT_TABLE in line for line in lines), lines
    # `nft flush table` keeps the chains and deletes every rule: each missing rule is named.
    for chain in ("prerouting", "output"):
        assert f"drift: missing_rule: {NAT_TABLE}: {chain}: jump istio-{chain}" in lines
    assert any(
        line.startswith(f"drift: missing_rule: {NAT_TABLE}: istio-output: ")
        and line.endswith("redirect to :15001")
        for line in lines
    ), lines

    # Bypassed: A's stand-in sees nothing, yet the app gets the connection (B still redirects).
    for a_ip, b_ip in mesh.pairs():
        assert request(mesh.a.path, b_ip, APP_PORT, timeout=OK_TIMEOUT) == mesh.reply(a_ip)
        mesh.standin_b.wait_for(hop(HopKind.INBOUND, client=a_ip), timeout=HOP_TIMEOUT)
    assert mesh.standin_a.hops == []

    repaired = mesh.cli("pod", "apply", "--netns", mesh.a.path)
    assert repaired.returncode == 0, repaired.stderr
    assert (
        f"repaired: missing_rule: {NAT_TABLE}: output: jump istio-output"
        in repaired.stdout.splitlines()
    )
    again = mesh.cli("pod", "check", "--netns", mesh.a.path)
    assert (again.returncode, again.stdout) == (0, ""), again.stderr

    for a_ip, b_ip in mesh.pairs():
        assert request(mesh.a.path, b_ip, APP_PORT, timeout=OK_TIMEOUT) == mesh.reply(a_ip)
        mesh.standin_a.wait_for(hop(HopKind.OUTBOUND, to=(b_ip, APP_PORT)), timeout=HOP_TIMEOUT)
    assert kinds(mesh.standin_a.hops) == [HopKind.OUTBOUND] * len(mesh.pairs())
