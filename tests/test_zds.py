"""ZDS over real SEQPACKET sockets with real fd passing, against a fake ztunnel peer."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from ztunnel_redirect.adapters import zds_pb2
from ztunnel_redirect.adapters.zds import (
    ACCEPT_BURST,
    ACCEPT_RATE,
    RequestKind,
    Workload,
    ZtunnelNackError,
    ZtunnelServer,
    ZtunnelUnavailableError,
)
from ztunnel_redirect.control.workqueue import FakeClock
from ztunnel_redirect.core.constants import HBONE_PORT
from ztunnel_redirect.core.errors import ConfigError, NetnsNotFoundError, RetryableError
from ztunnel_redirect.core.model import Pod, PodUid
from ztunnel_redirect.kernel.netns import netns_id
from ztunnel_redirect.testing.fakeztunnel import GARBAGE, Behaviour, FakeZtunnel
from ztunnel_redirect.testing.netnslab import Lab, LabPod
from ztunnel_redirect.testing.standin import HBONE_REPLY
from ztunnel_redirect.testing.traffic import request

SELF_NETNS = "/proc/self/ns/net"
WAIT = 5.0
"""Upper bound for anything a test waits for; the normal case takes milliseconds."""


def make_pod(name: str) -> Pod:
    return Pod(uid=PodUid(f"uid-{name}"), name=name, namespace="apps", service_account=f"sa-{name}")


def inode(path: str) -> int:
    return Path(path).stat().st_ino


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="zr-zds-") as tmp:
        # A parent that does not exist yet: the server creates it.
        yield str(Path(tmp) / "ztunnel" / "ztunnel.sock")


@pytest.fixture
def unopenable_netns() -> Iterator[str]:
    """A path that exists but that open() refuses with an error other than ENOENT (ELOOP), as it
    refuses any path when the agent is out of fds (EMFILE)."""
    with tempfile.TemporaryDirectory(prefix="zr-zds-") as tmp:
        loop = Path(tmp) / "loop"
        loop.symlink_to(loop)
        yield str(loop)


@pytest.fixture
def lab_pod() -> Iterator[LabPod]:
    lab = Lab()
    try:
        yield lab.add_pod("zds")
    finally:
        lab.close()


ServerFactory = Callable[..., Any]


@pytest.fixture
async def make_server(sock_path: str) -> AsyncIterator[ServerFactory]:
    servers: list[ZtunnelServer] = []

    async def make(snapshot: Sequence[Workload] = (), **kwargs: Any) -> ZtunnelServer:
        server = ZtunnelServer(path=sock_path, snapshot=lambda: snapshot, **kwargs)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def make_fake(sock_path: str) -> AsyncIterator[Callable[..., Any]]:
    fakes: list[FakeZtunnel] = []

    async def make(*, wait_snapshot: bool = True, **kwargs: Any) -> FakeZtunnel:
        fake = FakeZtunnel(sock_path, **kwargs)
        fakes.append(fake)
        await fake.start()
        if wait_snapshot:
            async with asyncio.timeout(WAIT):
                await fake.snapshot_done.wait()
        return fake

    try:
        yield make
    finally:
        for fake in fakes:
            await fake.close()


def kinds(fake: FakeZtunnel) -> list[tuple[RequestKind, str]]:
    return [(request.kind, request.uid) for request in fake.requests]


# --- snapshot -------------------------------------------------------------------------------------


async def test_snapshot_adds_with_the_netns_fd_keeps_unknown_then_snapshot_sent(
    make_server: ServerFactory, make_fake: Callable[..., Any], lab_pod: LabPod
) -> None:
    known, unknown = make_pod("known"), make_pod("unknown")
    server = await make_server([Workload(known, lab_pod.path), Workload(unknown, None)])

    fake = await make_fake()
    async with asyncio.timeout(WAIT):
        await server.wait_connected()

    assert kinds(fake) == [
        (RequestKind.ADD, "uid-known"),
        (RequestKind.KEEP, "uid-unknown"),
        (RequestKind.SNAPSHOT_SENT, ""),
    ]
    add, keep, sent = fake.requests
    # The fd that arrived is the pod's netns (not ours), and the fake still holds it.
    assert add.fds == 1
    assert add.netns_inode == inode(lab_pod.path) != inode(SELF_NETNS)
    assert inode(fake.workloads[known.uid].netns_path) == inode(lab_pod.path)
    assert (add.name, add.namespace, add.service_account) == ("known", "apps", "sa-known")
    assert (keep.fds, sent.fds) == (0, 0)
    assert [r.answer for r in fake.requests] == ["", "", ""]
    assert fake.violations == []
    assert server.connections == server.live_connections == 1


async def test_snapshot_netns_gone_is_sent_as_keep(
    make_server: ServerFactory, make_fake: Callable[..., Any], sock_path: str
) -> None:
    pod = make_pod("gone")
    await make_server([Workload(pod, str(Path(sock_path).parent / "no-such-netns"))])

    fake = await make_fake()

    assert kinds(fake) == [(RequestKind.KEEP, "uid-gone"), (RequestKind.SNAPSHOT_SENT, "")]


async def test_snapshot_netns_that_cannot_be_opened_is_sent_as_keep_and_retried(
    make_server: ServerFactory, make_fake: Callable[..., Any], unopenable_netns: str
) -> None:
    stuck, good = make_pod("stuck"), make_pod("good")
    retried: list[str] = []
    server = await make_server(
        [Workload(stuck, unopenable_netns), Workload(good, SELF_NETNS)],
        on_snapshot_unsent=lambda uid, _error: retried.append(uid),
        on_snapshot_nack=lambda uid, _error: pytest.fail(f"{uid} was not nacked"),
    )

    with structlog.testing.capture_logs() as logs:
        fake = await make_fake()
        async with asyncio.timeout(WAIT):
            await server.wait_connected()

    assert kinds(fake) == [
        (RequestKind.KEEP, "uid-stuck"),
        (RequestKind.ADD, "uid-good"),
        (RequestKind.SNAPSHOT_SENT, ""),
    ]
    (failed,) = [e for e in logs if e["event"] == "snapshot_netns_open_failed"]
    assert failed["pod_uid"] == "uid-stuck"
    assert "Too many levels of symbolic links" in failed["reason"]
    assert retried == ["uid-stuck"]  # the reconciler Adds it again
    assert server.connections == 1


async def test_snapshot_nack_is_reported_and_the_snapshot_goes_on(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    a, b = make_pod("a"), make_pod("b")
    nacked: list[tuple[str, str]] = []
    server = await make_server(
        [Workload(a, SELF_NETNS), Workload(b, SELF_NETNS)],
        on_snapshot_nack=lambda uid, error: nacked.append((uid, error)),
        on_snapshot_unsent=lambda uid, _error: pytest.fail(f"{uid} was sent"),
    )

    with structlog.testing.capture_logs() as logs:
        fake = await make_fake(
            behaviour=Behaviour(nack_uids=frozenset({"uid-a"}), nack_message="no")
        )

    assert kinds(fake) == [
        (RequestKind.ADD, "uid-a"),
        (RequestKind.ADD, "uid-b"),
        (RequestKind.SNAPSHOT_SENT, ""),
    ]
    assert nacked == [("uid-a", "no")]
    (logged,) = [e for e in logs if e["event"] == "snapshot_workload_nacked"]
    assert (logged["pod_uid"], logged["reason"], logged["log_level"]) == ("uid-a", "no", "warning")
    async with asyncio.timeout(WAIT):
        await server.wait_connected()
    assert set(fake.workloads) == {"uid-b"}


async def test_add_during_snapshot_is_sent_after_snapshot_sent(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    old, new = make_pod("old"), make_pod("new")
    server = await make_server([Workload(old, SELF_NETNS)])
    fake = await make_fake(wait_snapshot=False, behaviour=Behaviour(ack_delay=0.2))

    async with asyncio.timeout(WAIT):
        await server.wait_connections(1)  # said hello; its snapshot is under way
        assert server.live_connections == 0
        await server.add_workload(new, SELF_NETNS)

    assert kinds(fake) == [
        (RequestKind.ADD, "uid-old"),
        (RequestKind.SNAPSHOT_SENT, ""),
        (RequestKind.ADD, "uid-new"),
    ]


# --- add / del ------------------------------------------------------------------------------------


async def test_add_goes_to_the_newest_connection_and_del_to_every_one(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    pod = make_pod("p")
    server = await make_server()
    older = await make_fake()
    newer = await make_fake()
    async with asyncio.timeout(WAIT):
        await server.wait_connections(2)

    async with asyncio.timeout(WAIT):
        await server.add_workload(pod, SELF_NETNS)

    # The add returned only after the ack: the request is already recorded as answered.
    assert kinds(newer)[-1] == (RequestKind.ADD, "uid-p")
    assert newer.requests[-1].answer == ""
    assert newer.requests[-1].netns_inode == inode(SELF_NETNS)
    assert RequestKind.ADD not in {request.kind for request in older.requests}

    async with asyncio.timeout(WAIT):
        await server.del_workload(pod.uid)

    for fake in (older, newer):
        assert kinds(fake)[-1] == (RequestKind.DEL, "uid-p")
        assert fake.requests[-1].answer == ""
        assert fake.requests[-1].fds == 0
    assert newer.workloads == {}  # the fake closed the netns fd on Del
    assert newer.violations == older.violations == []


async def test_nack_raises_with_ztunnel_message_and_keeps_the_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    server = await make_server()
    fake = await make_fake(
        behaviour=Behaviour(nack_uids=frozenset({"uid-bad"}), nack_message="netns is weird")
    )

    with pytest.raises(ZtunnelNackError, match="netns is weird"):
        async with asyncio.timeout(WAIT):
            await server.add_workload(make_pod("bad"), SELF_NETNS)
    async with asyncio.timeout(WAIT):
        await server.add_workload(make_pod("good"), SELF_NETNS)

    assert set(fake.workloads) == {"uid-good"}
    assert server.connections == 1


async def test_add_with_a_netns_that_cannot_be_opened_fails_retryably_and_keeps_the_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any], unopenable_netns: str
) -> None:
    server = await make_server()
    fake = await make_fake()

    with pytest.raises(RetryableError, match="Too many levels of symbolic links"):
        async with asyncio.timeout(WAIT):
            await server.add_workload(make_pod("stuck"), unopenable_netns)
    async with asyncio.timeout(WAIT):
        await server.add_workload(make_pod("good"), SELF_NETNS)

    assert kinds(fake)[-1] == (RequestKind.ADD, "uid-good")
    assert set(fake.workloads) == {"uid-good"}
    assert server.connections == 1


async def test_add_of_a_path_naming_another_netns_than_expected_sends_nothing(
    make_server: ServerFactory, make_fake: Callable[..., Any], lab_pod: LabPod
) -> None:
    """A pid reused between the caller's check and the open: the fd opened is not the pod's."""
    server = await make_server()
    fake = await make_fake()

    with pytest.raises(NetnsNotFoundError):
        async with asyncio.timeout(WAIT):
            await server.add_workload(make_pod("p"), SELF_NETNS, identity=netns_id(lab_pod.path))
    async with asyncio.timeout(WAIT):
        await server.add_workload(make_pod("q"), lab_pod.path, identity=netns_id(lab_pod.path))

    assert kinds(fake)[-1] == (RequestKind.ADD, "uid-q")
    assert set(fake.workloads) == {"uid-q"}  # nothing was sent for p
    assert server.connections == 1


async def test_snapshot_path_naming_another_netns_than_expected_is_sent_as_keep(
    make_server: ServerFactory, make_fake: Callable[..., Any], lab_pod: LabPod
) -> None:
    pod = make_pod("reused")
    await make_server([Workload(pod, SELF_NETNS, netns_id(lab_pod.path))])

    fake = await make_fake()

    assert kinds(fake) == [(RequestKind.KEEP, "uid-reused"), (RequestKind.SNAPSHOT_SENT, "")]


async def test_a_nacked_del_raises_after_every_connection_answered(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    pod = make_pod("p")
    server = await make_server([Workload(pod, SELF_NETNS)])
    refusing = await make_fake(
        behaviour=Behaviour(nack_uids=frozenset({"uid-p"}), nack_message="busy")
    )
    accepting = await make_fake()
    async with asyncio.timeout(WAIT):
        await server.wait_connections(2)

    with pytest.raises(ZtunnelNackError, match="busy"):
        async with asyncio.timeout(WAIT):
            await server.del_workload(pod.uid)

    assert kinds(accepting)[-1] == kinds(refusing)[-1] == (RequestKind.DEL, "uid-p")
    assert accepting.workloads == {}
    assert server.connections == 2  # a nack costs no connection


async def test_a_del_whose_connection_is_lost_before_the_ack_raises(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    pod = make_pod("p")
    server = await make_server()
    fake = await make_fake()
    fake.behaviour = Behaviour(crash_after=len(fake.requests) + 1)  # dies on the next request

    with pytest.raises(ZtunnelUnavailableError, match="not acked"):
        async with asyncio.timeout(WAIT):
            await server.del_workload(pod.uid)

    assert kinds(fake)[-1] == (RequestKind.DEL, "uid-p")
    async with asyncio.timeout(WAIT):
        await server.del_workload(pod.uid)  # no connection left: no ztunnel holds it


async def test_connections_past_the_burst_are_rate_limited_not_refused(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    clock = FakeClock()
    server = await make_server(clock=clock)
    fakes = [await make_fake() for _ in range(ACCEPT_BURST)]
    late = [await make_fake(wait_snapshot=False) for _ in range(4)]

    for expected in range(ACCEPT_BURST + 1, ACCEPT_BURST + 5):
        async with asyncio.timeout(WAIT):
            await clock.wait_sleeping()  # the next accept waits for its token
        assert server.connections == expected - 1
        assert clock.sleeping == [pytest.approx(1 / ACCEPT_RATE)]
        clock.advance(1 / ACCEPT_RATE)
        async with asyncio.timeout(WAIT):
            await server.wait_connections(expected)

    for fake in late:
        async with asyncio.timeout(WAIT):
            await fake.snapshot_done.wait()
    assert not any(fake.closed.is_set() for fake in fakes + late)  # none refused
    async with asyncio.timeout(WAIT):
        await server.add_workload(make_pod("new"), SELF_NETNS)
    assert set(late[-1].workloads) == {"uid-new"}  # the newest connection is served


async def test_no_connection_is_unavailable(make_server: ServerFactory) -> None:
    server = await make_server()

    with pytest.raises(ZtunnelUnavailableError):
        await server.add_workload(make_pod("p"), SELF_NETNS)
    async with asyncio.timeout(WAIT):
        await server.del_workload(PodUid("uid-p"))  # best effort: nothing to tell, no error


async def test_slow_peer_times_out_within_the_deadline(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    server = await make_server(timeout=0.3)
    fake = await make_fake()
    fake.behaviour = Behaviour(ack_delay=30)

    # The server's own deadline ends the request (WAIT is far longer than 0.3 s).
    with pytest.raises(ZtunnelUnavailableError, match=r"\(timeout\)"):
        async with asyncio.timeout(WAIT):
            await server.add_workload(make_pod("p"), SELF_NETNS)

    # A late ack would be taken for the next request's: the connection is gone.
    assert server.connections == 0


async def test_ack_only_after_the_data_plane_started(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    events: list[tuple[str, int]] = []

    class Plane:
        def __init__(self, netns_path: str) -> None:
            self.netns_path = netns_path

        async def start(self) -> None:
            events.append(("start", inode(self.netns_path)))
            started.set()
            await release.wait()

        def close(self) -> None:
            events.append(("close", inode(self.netns_path)))

    pod = make_pod("p")
    server = await make_server()
    await make_fake(data_plane=Plane)

    add = asyncio.create_task(server.add_workload(pod, SELF_NETNS), name="test-add")
    try:
        async with asyncio.timeout(WAIT):
            await started.wait()
        assert not add.done()
        release.set()
        async with asyncio.timeout(WAIT):
            await add
            await server.del_workload(pod.uid)
    finally:
        add.cancel()

    assert events == [("start", inode(SELF_NETNS)), ("close", inode(SELF_NETNS))]


@pytest.mark.kernel
async def test_serve_runs_a_standin_in_the_workload_netns_until_del(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    lab = Lab()
    try:
        client, target = lab.add_pod("client"), lab.add_pod("target")
        pod = make_pod("target")
        server = await make_server()
        fake = await make_fake(serve=True)

        async with asyncio.timeout(WAIT):
            await server.add_workload(pod, target.path)
        # ztunnel's HBONE port answers inside the pod, reached through the node like real traffic.
        reply = await asyncio.to_thread(request, client.path, target.ipv4, HBONE_PORT, timeout=2)
        assert reply == HBONE_REPLY

        async with asyncio.timeout(WAIT):
            await server.del_workload(pod.uid)
        assert fake.workloads == {}
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(request, client.path, target.ipv4, HBONE_PORT, timeout=2)
    finally:
        lab.close()


# --- misbehaving peers lose their own connection only -------------------------------------------


async def assert_still_served(server: ZtunnelServer, good: FakeZtunnel, name: str) -> None:
    async with asyncio.timeout(WAIT):
        await server.wait_connections(1)
        await server.add_workload(make_pod(name), SELF_NETNS)
    assert kinds(good)[-1] == (RequestKind.ADD, f"uid-{name}")
    assert not good.closed.is_set()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (GARBAGE, "undecodable"),
        (b"\x08\x01" + b"x" * 2000, "message_too_large"),
        (b"", "timeout"),  # no hello at all
    ],
    ids=["garbage", "oversize", "silent"],
)
async def test_bad_hello_drops_only_that_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any], hello: bytes, reason: str
) -> None:
    server = await make_server(timeout=0.3)
    good = await make_fake()

    with structlog.testing.capture_logs() as logs:
        bad = await make_fake(hello=hello, wait_snapshot=False)
        async with asyncio.timeout(WAIT):
            await bad.closed.wait()

    assert bad.requests == ()
    assert [(e["event"], e["reason"]) for e in logs if e["event"] == "ztunnel_rejected"] == [
        ("ztunnel_rejected", reason)
    ]
    await assert_still_served(server, good, "after")


async def test_a_hello_of_another_version_is_logged_and_served(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    # As Istio's agent: the version is logged, not enforced (a newer ztunnel still speaks V1).
    pod = make_pod("p")
    server = await make_server([Workload(pod, SELF_NETNS)])

    with structlog.testing.capture_logs() as logs:
        fake = await make_fake(version=7)
        async with asyncio.timeout(WAIT):
            await server.wait_connected()

    (warned,) = [e for e in logs if e["event"] == "ztunnel_hello_version_unknown"]
    assert (warned["version"], warned["log_level"]) == (7, "warning")
    assert set(fake.workloads) == {"uid-p"}
    await assert_still_served(server, fake, "after")


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (Behaviour(reply=GARBAGE), "undecodable"),
        (Behaviour(reply=b"\x0a\x00" + b"\x00" * 1100), "message_too_large"),
        (Behaviour(reply=b"\x12\x00"), "unexpected_message"),  # a response without ack
    ],
    ids=["garbage", "oversize", "no-ack"],
)
async def test_bad_answer_drops_only_that_connection(
    make_server: ServerFactory,
    make_fake: Callable[..., Any],
    behaviour: Behaviour,
    reason: str,
) -> None:
    server = await make_server()
    good = await make_fake()
    bad = await make_fake()
    bad.behaviour = behaviour

    with structlog.testing.capture_logs() as logs, pytest.raises(ZtunnelUnavailableError):
        async with asyncio.timeout(WAIT):
            await server.add_workload(make_pod("p"), SELF_NETNS)  # the newest: the bad one
    async with asyncio.timeout(WAIT):
        await bad.closed.wait()

    drops = [e["reason"] for e in logs if e["event"] == "ztunnel_disconnected"]
    assert drops == [reason]
    await assert_still_served(server, good, "after")


async def test_unexpected_fd_in_an_answer_is_closed_and_drops_the_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    server = await make_server()
    good = await make_fake()
    bad = await make_fake()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        bad.behaviour = Behaviour(reply_fds=(write_end,))
        with pytest.raises(ZtunnelUnavailableError):
            async with asyncio.timeout(WAIT):
                await server.add_workload(make_pod("p"), SELF_NETNS)
        os.close(write_end)
        write_end = -1
        # The server received the only other copy of the write end: it must have closed it,
        # so the pipe reads as closed.
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    async with asyncio.timeout(WAIT):
        await bad.closed.wait()
    await assert_still_served(server, good, "after")


@pytest.mark.parametrize("what", ["garbage", "ack", "fd", "oversize"])
async def test_unsolicited_packet_while_idle_drops_only_that_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any], what: str
) -> None:
    server = await make_server()
    good = await make_fake()
    bad = await make_fake()
    ack = zds_pb2.WorkloadResponse(ack=zds_pb2.Ack()).SerializeToString()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if what == "garbage":
            await bad.send_raw(GARBAGE)
        elif what == "ack":
            await bad.send_raw(ack)
        elif what == "oversize":
            await bad.send_raw(b"x" * 4000)
        else:
            await bad.send_raw(ack, fds=[write_end])
        os.close(write_end)
        write_end = -1
        async with asyncio.timeout(WAIT):
            await bad.closed.wait()
        # No fd of the peer survives the dropped connection.
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    await assert_still_served(server, good, "after")


async def test_disconnect_mid_snapshot_drops_only_that_connection(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    pods = [make_pod(f"s{i}") for i in range(3)]
    server = await make_server([Workload(pod, SELF_NETNS) for pod in pods])
    good = await make_fake()
    bad = await make_fake(wait_snapshot=False, behaviour=Behaviour(crash_after=2))

    async with asyncio.timeout(WAIT):
        await bad.closed.wait()

    assert kinds(bad) == [(RequestKind.ADD, "uid-s0"), (RequestKind.ADD, "uid-s1")]
    assert bad.requests[-1].answer is None
    assert not bad.snapshot_done.is_set()
    await assert_still_served(server, good, "after")


async def test_keepalive_notices_a_dead_idle_peer(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    # The keepalive interval is far beyond the test's wait: the closed peer is noticed at once.
    server = await make_server(keepalive_interval=60)
    fake = await make_fake()
    async with asyncio.timeout(WAIT):
        await server.wait_connected()

    with structlog.testing.capture_logs() as logs:
        await fake.crash()
        async with asyncio.timeout(WAIT):
            await server.wait_connections(0)

    assert [(e["event"], e["reason"]) for e in logs if e["event"] == "ztunnel_disconnected"] == [
        ("ztunnel_disconnected", "peer_closed")
    ]
    with pytest.raises(ZtunnelUnavailableError):
        await server.add_workload(make_pod("p"), SELF_NETNS)


async def test_periodic_probe_runs_while_idle(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    # A short keepalive interval: idle wake-ups must neither drop nor disturb a healthy peer.
    server = await make_server(keepalive_interval=0.01)
    fake = await make_fake()
    async with asyncio.timeout(WAIT):
        for i in range(20):
            await server.add_workload(make_pod(f"p{i}"), SELF_NETNS)
    assert len(fake.workloads) == 20
    assert server.connections == 1


# --- resources ------------------------------------------------------------------------------------


async def test_server_keeps_no_netns_fds(
    make_server: ServerFactory, make_fake: Callable[..., Any]
) -> None:
    server = await make_server()
    fake = await make_fake()
    pods = [make_pod(f"p{i}") for i in range(200)]
    baseline = open_fds()

    async with asyncio.timeout(30):
        for pod in pods:
            await server.add_workload(pod, SELF_NETNS)
    # Only the fake holds the received fds, one per live workload.
    assert len(fake.workloads) == 200
    assert open_fds() == baseline + 200

    async with asyncio.timeout(30):
        for pod in pods:
            await server.del_workload(pod.uid)
    assert open_fds() == baseline


def socket_file(path: Path) -> tuple[bool, int] | None:
    """(is a socket, permission bits), None when there is no file."""
    if not path.exists():
        return None
    return path.is_socket(), path.stat().st_mode & 0o777


async def test_socket_file_lifecycle(sock_path: str) -> None:
    path = Path(sock_path)
    path.parent.mkdir(parents=True)
    # A stale socket from a previous agent is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock_path)
    stale.close()
    server = ZtunnelServer(path=sock_path, snapshot=list)
    await server.start()
    try:
        assert socket_file(path) == (True, 0o600)
    finally:
        await server.close()
    assert socket_file(path) is None

    not_a_socket = path.with_name("plain")
    not_a_socket.touch()
    with pytest.raises(ConfigError):
        await ZtunnelServer(path=str(not_a_socket), snapshot=list).start()
    assert socket_file(not_a_socket) == (False, not_a_socket.stat().st_mode & 0o777)


async def test_closing_an_old_server_leaves_the_new_servers_socket(
    sock_path: str, make_fake: Callable[..., Any]
) -> None:
    # A DaemonSet surge: the new agent replaces the socket file while the old one still listens.
    old = ZtunnelServer(path=sock_path, snapshot=list)
    await old.start()
    try:
        new = ZtunnelServer(path=sock_path, snapshot=list)
        await new.start()
        try:
            await old.close()
            assert socket_file(Path(sock_path)) == (True, 0o600)
            await make_fake()
            async with asyncio.timeout(WAIT):
                await new.wait_connected()
        finally:
            await new.close()
        assert socket_file(Path(sock_path)) is None
    finally:
        await old.close()
