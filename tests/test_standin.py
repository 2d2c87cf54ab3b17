"""The ztunnel stand-in and the traffic tools, with real sockets in lab network namespaces.

Most tests use no nftables rules at all. The last few load a minimal literal redirect ruleset
(a subset of docs/design.md §2 and §3, written here by hand, not the project's renderer) into lab
pods,
only to prove that the stand-in relays redirected traffic the way ztunnel does and fails the way
tests expect; the project's own rules are proven elsewhere with these same tools.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect.core.constants import DNS_PORT, HBONE_PORT, ZTUNNEL_MARK
from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.testing.netnslab import Lab, LabPod
from ztunnel_redirect.testing.standin import (
    HBONE_REPLY,
    Hop,
    HopKind,
    Standin,
    StandinError,
    original_dst,
    parse_original_dst,
)
from ztunnel_redirect.testing.traffic import App, request, run_in_netns, udp_request

APP_PORT = 8080
NOBODY = 65534


def fd_count() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab(ipv6=True)
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def pods(lab: Lab) -> tuple[LabPod, LabPod]:
    """Two dual-stack pods, `a` (client side) and `b` (server side)."""
    return lab.add_pod("a"), lab.add_pod("b")


# -- original destination ----------------------------------------------------------------------


def sockaddr_in(ip: str, port: int) -> bytes:
    family = socket.AF_INET.to_bytes(2, sys.byteorder)
    return family + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    family = socket.AF_INET6.to_bytes(2, sys.byteorder)
    flowinfo, scope = bytes(4), bytes(4)
    return (
        family + struct.pack("!H", port) + flowinfo + socket.inet_pton(socket.AF_INET6, ip) + scope
    )


def test_parse_original_dst_reads_sockaddr_in() -> None:
    assert parse_original_dst(sockaddr_in("10.96.0.10", 8080)) == ("10.96.0.10", 8080)


def test_parse_original_dst_reads_sockaddr_in6_past_flowinfo() -> None:
    raw = sockaddr_in6("fd00:244::3:2", 443)
    assert len(raw) == 28
    assert parse_original_dst(raw) == ("fd00:244::3:2", 443)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x02\x00", b"\x01\x00" + bytes(14), sockaddr_in6("::1", 1)[:20]],
    ids=["empty", "family-only", "unix-family", "truncated-v6"],
)
def test_parse_original_dst_rejects_what_is_not_an_ip_sockaddr(raw: bytes) -> None:
    with pytest.raises(ValueError, match="sockaddr"):
        parse_original_dst(raw)


@pytest.mark.kernel
def test_original_dst_is_none_for_a_connection_nothing_translated(
    pods: tuple[LabPod, LabPod],
) -> None:
    _, b = pods

    def accept_one() -> tuple[str, int] | None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(5)
            with socket.create_connection(server.getsockname(), timeout=5):
                conn, _ = server.accept()
                with conn:
                    return original_dst(conn)

    assert run_in_netns(b.path, accept_one, timeout=10) is None


# -- the stand-in without any rules ---------------------------------------------------------------


@pytest.mark.kernel
def test_listeners_are_wildcard_or_loopback_and_carry_ztunnels_mark(
    pods: tuple[LabPod, LabPod],
) -> None:
    _, b = pods
    with Standin(b.path, ipv6=True):
        listing = b.netns.exec("ss", "-Htulne")
    sockets = {
        (line.split()[0], line.split()[4]): line for line in listing.splitlines() if line.strip()
    }
    expected = {
        ("tcp", "0.0.0.0:15001"),
        ("tcp", "[::]:15001"),
        ("tcp", "0.0.0.0:15006"),
        ("tcp", "[::]:15006"),
        ("tcp", "0.0.0.0:15008"),
        ("tcp", "[::]:15008"),
        ("tcp", "127.0.0.1:15053"),
        ("tcp", "[::1]:15053"),
        ("udp", "127.0.0.1:15053"),
        ("udp", "[::1]:15053"),
    }
    assert set(sockets) == expected
    for key, line in sockets.items():
        assert f"fwmark:{ZTUNNEL_MARK:#x}" in line, key
        if "[" in key[1]:
            assert "v6only:1" in line, key


@pytest.mark.kernel
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_hbone_connection_from_another_pod_is_answered_and_recorded(
    pods: tuple[LabPod, LabPod], family: str
) -> None:
    a, b = pods
    a_ip, b_ip = (a.ipv4, b.ipv4) if family == "v4" else (a.ipv6, b.ipv6)
    assert a_ip is not None
    assert b_ip is not None
    with Standin(b.path, ipv6=True) as standin:
        assert request(a.path, b_ip, HBONE_PORT) == HBONE_REPLY
        hop = standin.wait_for(lambda h: h.kind is HopKind.HBONE)
    assert hop.client[0] == a_ip
    assert hop.original_dst == (b_ip, HBONE_PORT)


@pytest.mark.kernel
def test_dns_listeners_answer_udp_and_tcp_on_loopback_inside_the_pod(
    pods: tuple[LabPod, LabPod],
) -> None:
    _, b = pods
    with Standin(b.path, ipv6=True) as standin:
        assert udp_request(b.path, "127.0.0.1", DNS_PORT, b"q4") == (
            b"dns:q4",
            ("127.0.0.1", DNS_PORT),
        )
        assert udp_request(b.path, "::1", DNS_PORT, b"q6") == (b"dns:q6", ("::1", DNS_PORT))
        assert request(b.path, "127.0.0.1", DNS_PORT, payload=b"tcp") == b"dns:tcp"
        # Each hop is recorded before its answer is sent, so all three are there now.
        hops = standin.hops
    assert [(h.kind, h.client[0], h.original_dst) for h in hops] == [
        (HopKind.DNS, "127.0.0.1", ("127.0.0.1", DNS_PORT)),
        (HopKind.DNS, "::1", ("::1", DNS_PORT)),
        (HopKind.DNS, "127.0.0.1", ("127.0.0.1", DNS_PORT)),
    ]


@pytest.mark.kernel
def test_without_dns_nothing_listens_on_15053(pods: tuple[LabPod, LabPod]) -> None:
    _, b = pods
    with Standin(b.path, dns=False):
        with pytest.raises(ConnectionRefusedError):
            request(b.path, "127.0.0.1", DNS_PORT)
        with pytest.raises(TimeoutError):
            udp_request(b.path, "127.0.0.1", DNS_PORT, b"q", timeout=0.3)


@pytest.mark.kernel
def test_a_connection_that_was_not_redirected_is_recorded_and_not_relayed(
    pods: tuple[LabPod, LabPod],
) -> None:
    a, b = pods
    with Standin(b.path) as standin:
        assert request(a.path, b.ipv4, 15001) == b""
        hop = standin.wait_for()
    assert hop == Hop(HopKind.OUTBOUND, hop.client, (b.ipv4, 15001))


@pytest.mark.kernel
def test_wait_for_times_out_and_clear_forgets(pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    with Standin(b.path) as standin:
        request(a.path, b.ipv4, HBONE_PORT)
        standin.wait_for()
        standin.clear()
        assert standin.hops == []
        with pytest.raises(TimeoutError):
            standin.wait_for(timeout=0.05)


@pytest.mark.kernel
def test_start_fails_clearly_when_a_port_is_taken_and_leaks_nothing(
    pods: tuple[LabPod, LabPod],
) -> None:
    _, b = pods
    fds, threads = fd_count(), threading.active_count()
    squatter = run_in_netns(
        b.path, lambda: socket.create_server(("127.0.0.1", DNS_PORT)), timeout=5
    )
    try:
        with pytest.raises(StandinError, match=r"127\.0\.0\.1:15053/tcp"):
            Standin(b.path).start()
    finally:
        squatter.close()
    assert (fd_count(), threading.active_count()) == (fds, threads)


def test_start_fails_clearly_when_the_netns_is_gone() -> None:
    with pytest.raises(NetnsNotFoundError):
        Standin("/run/netns/zr-does-not-exist").start()


@pytest.mark.kernel
def test_close_ends_open_connections_and_leaks_no_fd_or_thread(
    pods: tuple[LabPod, LabPod],
) -> None:
    a, b = pods
    fds, threads = fd_count(), threading.active_count()
    standin = Standin(b.path, ipv6=True)
    standin.start()
    try:
        # A client that never half-closes keeps the stand-in's side of the connection open.
        client = run_in_netns(
            a.path, lambda: socket.create_connection((b.ipv4, HBONE_PORT), timeout=5), timeout=10
        )
        try:
            standin.wait_for(lambda h: h.kind is HopKind.HBONE)
            assert fd_count() > fds
        finally:
            with capture_logs() as logs:
                standin.close()
        # Ended by closing its socket, not by running out the handler's grace period.
        assert [e for e in logs if e["event"] == "connections_outlived_grace"] == []
        with client:
            client.settimeout(5)
            received = b""
            for _ in range(10):
                chunk = client.recv(1024)
                if not chunk:
                    break
                received += chunk
        assert received == HBONE_REPLY, "the stand-in's side must be closed, the client sees EOF"
    finally:
        standin.close()
    assert (fd_count(), threading.active_count()) == (fds, threads)


# -- the traffic tools -------------------------------------------------------------------------


@pytest.mark.kernel
def test_app_answers_with_the_peer_it_saw_on_both_families(pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    assert a.ipv6 is not None
    assert b.ipv6 is not None
    fds, threads = fd_count(), threading.active_count()
    with App(b.path, APP_PORT, name="b", ipv6=True) as app:
        assert request(a.path, b.ipv4, APP_PORT) == f"app b saw {a.ipv4}\n".encode()
        assert request(a.path, b.ipv6, APP_PORT) == f"app b saw {a.ipv6}\n".encode()
        assert app.wait_for_peer(lambda p: p[0] == a.ipv6)[0] == a.ipv6
        assert [p[0] for p in app.peers] == [a.ipv4, a.ipv6]
        app.clear()
        with pytest.raises(TimeoutError):
            app.wait_for_peer(timeout=0.05)
    assert (fd_count(), threading.active_count()) == (fds, threads)


@pytest.mark.kernel
def test_request_reports_refusal_and_timeout(lab: Lab, pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    with pytest.raises(ConnectionRefusedError):
        request(a.path, b.ipv4, APP_PORT)
    # A packet that is dropped on the way never gets an answer.
    lab.node.exec("ip", "route", "add", "blackhole", "10.99.0.0/16")
    with pytest.raises(TimeoutError):
        request(a.path, "10.99.0.1", APP_PORT, timeout=0.3)
    with pytest.raises(TimeoutError):
        request(a.path, "10.99.0.1", APP_PORT, timeout=0.3, uid=NOBODY)


@pytest.mark.kernel
def test_request_as_uid_owns_its_socket(pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    # `meta skuid` matches the socket's owner: only a client owned by NOBODY is refused.
    a.netns.nft(
        "table inet zr-test {\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    meta skuid {NOBODY} tcp dport {APP_PORT} reject with tcp reset\n"
        "  }\n"
        "}\n",
    )
    with App(b.path, APP_PORT, name="b"):
        assert request(a.path, b.ipv4, APP_PORT, uid=1000) == f"app b saw {a.ipv4}\n".encode()
        assert request(a.path, b.ipv4, APP_PORT) == f"app b saw {a.ipv4}\n".encode()
        with pytest.raises(ConnectionRefusedError):
            request(a.path, b.ipv4, APP_PORT, uid=NOBODY)


# -- with a minimal literal redirect ruleset: the stand-in behaves like ztunnel -------------------

MINIMAL_POD_RULES = """
table inet zr-standin-nat {
  chain redirect-in {
    type nat hook prerouting priority -100; policy accept;
    meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 meta mark & 0xfff != 0x539 \
redirect to :15006
    meta l4proto tcp ip6 daddr != ::1/128 tcp dport != 15008 meta mark & 0xfff != 0x539 \
redirect to :15006
  }
  chain redirect-out {
    type nat hook output priority -100; policy accept;
    meta l4proto udp udp dport 53 oifname != "lo" meta mark & 0xfff != 0x539 redirect to :15053
    meta l4proto tcp ct mark & 0xfff == 0x111 accept
    oifname "lo" ip daddr != 127.0.0.1/32 accept
    oifname "lo" ip6 daddr != ::1/128 accept
    meta l4proto tcp ip daddr != 127.0.0.1/32 meta mark & 0xfff != 0x539 redirect to :15001
    meta l4proto tcp ip6 daddr != ::1/128 meta mark & 0xfff != 0x539 redirect to :15001
  }
}
table inet zr-standin-mangle {
  chain mark-in {
    type filter hook prerouting priority -150; policy accept;
    meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111
  }
  chain restore-out {
    type route hook output priority -150; policy accept;
    ct mark & 0xfff == 0x111 meta mark set ct mark
  }
}
"""


def redirect_like_ztunnel(pod: LabPod, *, policy_routing: bool = True) -> None:
    pod.netns.nft(MINIMAL_POD_RULES)
    if not policy_routing:
        return
    for family, local in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        pod.netns.ip(family, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "100")
        pod.netns.ip(family, "route", "add", "local", local, "dev", "lo", "table", "100")


@pytest.mark.kernel
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_redirected_traffic_is_relayed_out_and_in_with_the_clients_address(
    pods: tuple[LabPod, LabPod], family: str
) -> None:
    a, b = pods
    a_ip, b_ip = (a.ipv4, b.ipv4) if family == "v4" else (a.ipv6, b.ipv6)
    assert a_ip is not None
    assert b_ip is not None
    redirect_like_ztunnel(a)
    redirect_like_ztunnel(b)
    with (
        Standin(a.path, ipv6=True) as out,
        Standin(b.path, ipv6=True) as into,
        App(b.path, APP_PORT, name="b", ipv6=True) as app,
    ):
        # The app sees pod a's own address: the inbound hop spoofed it transparently, and the
        # reply found its way back to that socket (otherwise this times out).
        assert request(a.path, b_ip, APP_PORT) == f"app b saw {a_ip}\n".encode()
        outbound = out.wait_for(lambda h: h.kind is HopKind.OUTBOUND)
        inbound = into.wait_for(lambda h: h.kind is HopKind.INBOUND)
        assert app.wait_for_peer()[0] == a_ip
        # DNS leaving the pod is answered by the stand-in, as if from the server asked.
        server = "10.96.0.10" if family == "v4" else "fd00:96::a"
        assert udp_request(a.path, server, 53, b"q") == (b"dns:q", (server, 53))
    assert outbound.client[0] == a_ip
    assert outbound.original_dst == (b_ip, APP_PORT)
    assert inbound.client[0] == a_ip
    assert inbound.original_dst == (b_ip, APP_PORT)


@pytest.mark.kernel
def test_without_policy_routing_the_reply_never_comes_back(pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    redirect_like_ztunnel(a)
    redirect_like_ztunnel(b, policy_routing=False)
    with (
        Standin(a.path),
        Standin(b.path) as into,
        App(b.path, APP_PORT, name="b") as app,
    ):
        # The app's SYN-ACK to pod a's (spoofed) address leaves through eth0 instead of
        # returning to the stand-in's transparent socket.
        with pytest.raises(TimeoutError):
            request(a.path, b.ipv4, APP_PORT, timeout=1.0)
        assert into.wait_for(lambda h: h.kind is HopKind.INBOUND).client[0] == a.ipv4
        assert app.peers == []


@pytest.mark.kernel
def test_an_unreachable_destination_resets_the_client(pods: tuple[LabPod, LabPod]) -> None:
    a, b = pods
    redirect_like_ztunnel(a)
    redirect_like_ztunnel(b)
    with Standin(a.path), Standin(b.path) as into:
        with pytest.raises(ConnectionResetError):
            request(a.path, b.ipv4, APP_PORT)
        assert into.wait_for().original_dst == (b.ipv4, APP_PORT)
