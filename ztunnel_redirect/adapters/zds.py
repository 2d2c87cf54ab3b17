"""ZDS: the agent's side of the agent <-> ztunnel protocol (docs/design.md §9).

The agent listens on a Unix `SOCK_SEQPACKET` socket; each ztunnel connects, says
`ZdsHello{V1}`, and then receives a snapshot of every enrolled workload (`Add` with the netns fd
when its netns is known, `Keep` otherwise), then `SnapshotSent`. After that the reconciler sends
`Add` to the newest connection and `Del` to every connection. Every request waits for exactly one
`WorkloadResponse{ack}`; one protobuf message per packet, at most 1024 bytes.

As Istio's agent does, a hello of another version than V1 is logged and served, and connections
are never refused: past a burst of 16, accepting is rate-limited (a ztunnel reconnecting in a
loop must not exhaust the agent). A nack inside a snapshot is logged and counted only (ztunnel
retries the workload itself); a Del that any connection nacks or loses fails, for the caller to
retry.

One task per connection owns its socket: it reads the hello, sends the snapshot, then serves
requests queued by `add_workload`/`del_workload` one at a time. When idle it watches the socket;
a peer that closes (or sends anything unasked) is dropped at once, and a periodic probe backs that
up. A peer that breaks the protocol (undecodable or unexpected message, an fd, an oversized
packet, a missed deadline) loses its own connection only; a timed-out request also drops the
connection, because a late ack would otherwise be taken as the answer to the next request.

The agent keeps no netns fds: the fd of an `Add` is opened just before sending and closed right
after (docs/design.md §11.7, §11.13).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import itertools
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog
from google.protobuf.message import DecodeError

from ztunnel_redirect.adapters import unixsocket, zds_pb2
from ztunnel_redirect.control.workqueue import MONOTONIC, Clock
from ztunnel_redirect.core import constants
from ztunnel_redirect.core.errors import (
    ConfigError,
    NetnsNotFoundError,
    RedirectError,
    RetryableError,
)
from ztunnel_redirect.core.model import Pod, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, open_netns

__all__ = [
    "ACCEPT_BURST",
    "ACCEPT_RATE",
    "MAX_MESSAGE_SIZE",
    "DropReason",
    "NetnsOpenError",
    "Packet",
    "RequestKind",
    "Workload",
    "ZdsProtocolError",
    "ZtunnelNackError",
    "ZtunnelServer",
    "ZtunnelUnavailableError",
    "close_fds",
    "encode_request",
    "recv_packet",
    "send_packet",
]

log = structlog.get_logger(__name__)

MAX_MESSAGE_SIZE: Final = 1024
"""Largest ZDS packet, either direction (docs/design.md §9)."""
ACCEPT_BURST: Final = 16
"""Connections accepted at once before accepting is rate-limited (a node has one or two
ztunnels; more is a ztunnel reconnecting in a loop)."""
ACCEPT_RATE: Final = 5.0
"""Connections accepted per second past the burst (Istio accepts at most 5 per second)."""
_FD_SIZE: Final = array.array("i").itemsize
_SERVER_MAX_FDS: Final = 4
"""Room for fds a misbehaving peer sends us, so that we receive them and can close them."""


class ZtunnelUnavailableError(RetryableError):
    """No ztunnel connection to send to, or it timed out or went away while we waited."""


class ZtunnelNackError(RetryableError):
    """ztunnel answered with a non-empty `Ack.error`; the message carries it."""


class NetnsOpenError(RetryableError):
    """The netns of an `Add` exists but could not be opened (e.g. out of fds); nothing was sent,
    and the connection is fine."""


class ZdsProtocolError(RedirectError):
    """A message that the protocol does not allow (too large to send, or malformed)."""


class RequestKind(enum.Enum):
    """The payload of a `WorkloadRequest`; values are the protobuf oneof field names."""

    ADD = "add"
    KEEP = "keep"
    DEL = "del"
    SNAPSHOT_SENT = "snapshot_sent"


class DropReason(enum.Enum):
    """Why a connection was closed by the server (the `reason` of `ztunnel_disconnected`)."""

    PEER_CLOSED = "peer_closed"
    TIMEOUT = "timeout"
    IO_ERROR = "io_error"
    UNDECODABLE = "undecodable"
    UNEXPECTED_MESSAGE = "unexpected_message"
    UNEXPECTED_FD = "unexpected_fd"
    MESSAGE_TOO_LARGE = "message_too_large"
    SERVER_CLOSED = "server_closed"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class Workload:
    """An enrolled pod as the snapshot sees it; `netns_path=None` means its netns is unknown."""

    pod: Pod
    netns_path: str | None
    netns_id: NetnsId | None = None
    """The netns `netns_path` must name (checked on the fd sent); None: not checked."""


# --- the wire: one message per SOCK_SEQPACKET packet, fds as SCM_RIGHTS --------------------------


@dataclass(frozen=True)
class Packet:
    """One received packet. The receiver owns `fds` and must close them."""

    data: bytes
    fds: tuple[int, ...] = ()
    truncated: bool = False
    """The packet was larger than MAX_MESSAGE_SIZE, or carried more fds than asked for."""

    @property
    def eof(self) -> bool:
        """The peer closed the connection (ZDS never sends an empty packet)."""
        return not self.data and not self.fds and not self.truncated


async def _wait_ready(sock: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, ...]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(received)
    return tuple(fds)


def close_fds(fds: Sequence[int]) -> None:
    """Close received fds that nobody will own (best effort)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def recv_packet(sock: socket.socket, *, max_fds: int = _SERVER_MAX_FDS) -> Packet:
    """Receive one packet from a non-blocking SEQPACKET socket (bound it with asyncio.timeout)."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(
                MAX_MESSAGE_SIZE, socket.CMSG_SPACE(max_fds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            await _wait_ready(sock, writable=False)
            continue
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
        return Packet(data, _fds_from(ancdata), truncated)


async def send_packet(sock: socket.socket, data: bytes, *, fds: Sequence[int] = ()) -> None:
    """Send one packet, with `fds` as SCM_RIGHTS (bound it with asyncio.timeout)."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise ZdsProtocolError(f"ZDS message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    ancdata = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    while True:
        try:
            sock.sendmsg([data], ancdata)
        except (BlockingIOError, InterruptedError):
            await _wait_ready(sock, writable=True)
            continue
        return


def encode_request(kind: RequestKind, uid: str = "", pod: Pod | None = None) -> bytes:
    """Serialise one `WorkloadRequest`."""
    if kind is RequestKind.ADD:
        if pod is None:
            raise ValueError("an Add needs the pod for its workload_info")
        info = zds_pb2.WorkloadInfo(
            name=pod.name, namespace=pod.namespace, service_account=pod.service_account
        )
        message = zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid=uid, workload_info=info))
    elif kind is RequestKind.KEEP:
        message = zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid))
    elif kind is RequestKind.DEL:
        message = zds_pb2.WorkloadRequest()
        # `del` is a Python keyword: the field is reachable through getattr only.
        getattr(message, "del").uid = uid
    else:
        message = zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent())
    return message.SerializeToString()


# --- the server ----------------------------------------------------------------------------------


class _Dropped(Exception):  # control flow inside a connection task only
    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(reason.value if not detail else f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Request:
    """A queued request and the future its caller awaits (the ack's error text)."""

    kind: RequestKind
    uid: PodUid
    pod: Pod | None
    netns_path: str | None
    netns_id: NetnsId | None
    future: asyncio.Future[str]


class _Connection:
    def __init__(self, sock: socket.socket, number: int, peer_pid: int) -> None:
        self.sock = sock
        self.number = number
        self.peer_pid = peer_pid
        self.pending: deque[_Request] = deque()
        self.wake = asyncio.Event()
        self.greeted = False
        self.live = False

    def submit(
        self,
        kind: RequestKind,
        uid: PodUid,
        pod: Pod | None,
        netns_path: str | None,
        netns_id: NetnsId | None = None,
    ) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append(_Request(kind, uid, pod, netns_path, netns_id, future))
        self.wake.set()
        return future


def _peer_pid(sock: socket.socket) -> int:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def _open_for_add(path: str, identity: NetnsId | None) -> int:
    """The netns fd of an `Add`, checked to be the netns `identity` when given (else
    NetnsNotFoundError). Any error but a vanished netns (EMFILE, EACCES...) is the pod's problem,
    not the connection's."""
    try:
        return open_netns(path, expect=identity)
    except OSError as exc:
        raise NetnsOpenError(f"cannot open network namespace {path}: {exc}") from exc


class _AcceptLimiter:
    """A token bucket: `burst` accepts at once, then `rate` per second. Connections past it wait
    in the listen backlog instead of being refused; the newest one is served once accepted."""

    def __init__(self, *, burst: int, rate: float, clock: Clock) -> None:
        if burst < 1 or rate <= 0:
            raise ConfigError(f"accept limit needs burst >= 1 and rate > 0, got {burst}, {rate}")
        self._burst = burst
        self._rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.now()

    async def take(self) -> None:
        """Until an accept is allowed."""
        now = self._clock.now()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return
        log.warning("ztunnel_accept_rate_limited", wait_s=round((1 - self._tokens) / self._rate, 3))
        await self._clock.sleep((1 - self._tokens) / self._rate)
        self._tokens = 0.0  # the token that came in while we slept is this accept's
        self._last = self._clock.now()


class ZtunnelServer:
    """Listens for ztunnel connections and sends them workloads.

    `snapshot` is called once per new connection, after its hello, and must return every
    enrolled workload at that moment. Requests made after that call are queued on the
    connection and sent once its snapshot is complete, so a workload enrolled during a
    snapshot is never missed.

    A connection counts (`connections`, target of `add_workload`) from its hello on; it is
    *live* (`wait_connected`) once its snapshot was acknowledged.

    `on_snapshot_nack(uid, reason)` is called for a pod that ztunnel nacked inside a snapshot:
    as in Istio, that is only reported (ztunnel retries the workload itself; the pod stays
    accepted). `on_snapshot_unsent(uid, reason)` is called for a pod whose netns could not be
    opened, so that it went as `Keep`: the caller Adds it again.

    Accepting is rate-limited past `accept_burst` connections (`accept_rate` per second, on
    `clock`); no connection is refused.
    """

    def __init__(
        self,
        *,
        path: str = constants.ZTUNNEL_UDS_ADDRESS,
        snapshot: Callable[[], Sequence[Workload]],
        timeout: float = 5.0,
        keepalive_interval: float = 5.0,
        accept_burst: int = ACCEPT_BURST,
        accept_rate: float = ACCEPT_RATE,
        clock: Clock = MONOTONIC,
        on_snapshot_nack: Callable[[PodUid, str], None] | None = None,
        on_snapshot_unsent: Callable[[PodUid, str], None] | None = None,
    ) -> None:
        self._path = path
        self._snapshot = snapshot
        self._timeout = timeout
        self._keepalive_interval = keepalive_interval
        self._accepts = _AcceptLimiter(burst=accept_burst, rate=accept_rate, clock=clock)
        self._on_snapshot_nack = on_snapshot_nack
        self._on_snapshot_unsent = on_snapshot_unsent
        self._listener: socket.socket | None = None
        self._socket_file: unixsocket.SocketFile | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._all: list[_Connection] = []
        self._greeted: list[_Connection] = []
        """Connections that said hello, oldest first."""
        self._changed = asyncio.Condition()
        self._numbers = itertools.count(1)

    # --- lifecycle

    async def start(self) -> None:
        """Listen (replacing a stale socket file); connections are served from then on."""
        if self._listener is not None:
            return
        # Connections past the accept rate wait in the backlog rather than being refused.
        self._listener, self._socket_file = unixsocket.listen(
            self._path, socket.SOCK_SEQPACKET, backlog=socket.SOMAXCONN
        )
        self._accept_task = asyncio.create_task(self._accept_loop(), name="zds-accept")
        log.info("zds_server_listening", path=self._path)

    async def close(self) -> None:
        """Stop listening, drop every connection (failing their queued requests), remove the
        socket file. Idempotent."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._socket_file is not None:  # only the file we bound: a newer agent may own it
                self._socket_file.remove()
                self._socket_file = None
            log.info("zds_server_closed", path=self._path)

    async def __aenter__(self) -> ZtunnelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- state

    @property
    def path(self) -> str:
        return self._path

    @property
    def connections(self) -> int:
        """ztunnel connections that said hello (live or still receiving their snapshot)."""
        return len(self._greeted)

    @property
    def live_connections(self) -> int:
        """Connections whose snapshot was acknowledged."""
        return sum(1 for conn in self._greeted if conn.live)

    async def wait_connected(self) -> None:
        """Until at least one ztunnel is live; bound it with `asyncio.timeout`."""
        await self._wait(lambda: self.live_connections > 0)

    async def wait_connections(self, count: int) -> None:
        """Until exactly `count` connections said hello and are still open."""
        await self._wait(lambda: self.connections == count)

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the reconciler's API

    async def add_workload(
        self, pod: Pod, netns_path: str, *, identity: NetnsId | None = None
    ) -> None:
        """Send `Add` (with the netns fd) to the newest connection and wait for its ack.

        `identity`: the netns `netns_path` must name; checked on the fd opened for sending.

        Raises ZtunnelUnavailableError (no connection, timeout, connection lost),
        ZtunnelNackError (ztunnel refused), NetnsNotFoundError (the netns is gone, or the path
        names another netns than `identity`), NetnsOpenError (the netns could not be opened now).
        """
        if not self._greeted:
            raise ZtunnelUnavailableError("no ztunnel connected")
        conn = self._greeted[-1]
        error = await conn.submit(RequestKind.ADD, pod.uid, pod, netns_path, identity)
        if error:
            raise ZtunnelNackError(f"ztunnel refused pod {pod.key} ({pod.uid}): {error}")

    async def del_workload(self, uid: PodUid) -> None:
        """Send `Del` to every connection and wait for all their acks.

        Raises ZtunnelNackError when a connection nacked it, ZtunnelUnavailableError when one
        was lost before its ack: the caller retries (a retry goes to the connections open then;
        a ztunnel that reconnected meanwhile has the pod only if its snapshot had it). With no
        connection there is no ztunnel to tell: that succeeds.
        """
        conns = list(self._greeted)
        futures = [conn.submit(RequestKind.DEL, uid, None, None) for conn in conns]
        results = await asyncio.gather(*futures, return_exceptions=True)
        nacks: list[str] = []
        lost: list[str] = []
        for conn, result in zip(conns, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                log.warning(
                    "workload_delete_failed", pod_uid=uid, conn=conn.number, reason=str(result)
                )
                lost.append(f"connection {conn.number}: {result}")
            elif result:
                log.warning("workload_delete_nacked", pod_uid=uid, conn=conn.number, reason=result)
                nacks.append(f"connection {conn.number}: {result}")
        if nacks:
            raise ZtunnelNackError(f"ztunnel refused to delete {uid}: {'; '.join(nacks + lost)}")
        if lost:
            raise ZtunnelUnavailableError(f"delete of {uid} not acked: {'; '.join(lost)}")

    # --- connections

    async def _accept_loop(self) -> None:
        assert self._listener is not None  # noqa: S101 - set by start() before this task exists
        loop = asyncio.get_running_loop()
        while True:
            # A token is taken for a connection that is there (the rate-limit log says so).
            await _wait_ready(self._listener, writable=False)
            await self._accepts.take()
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning on a readable listener.
                log.warning("zds_accept_failed", reason=str(exc))
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            conn = _Connection(sock, next(self._numbers), _peer_pid(sock))
            self._all.append(conn)
            task = asyncio.create_task(self._serve(conn), name=f"zds-conn-{conn.number}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Connection) -> None:
        reason = DropReason.SERVER_CLOSED
        detail = ""
        try:
            await self._receive_hello(conn)
            conn.greeted = True
            self._greeted.append(conn)
            log.info("ztunnel_connected", conn=conn.number, peer_pid=conn.peer_pid)
            await self._notify()
            await self._send_snapshot(conn)
            conn.live = True
            await self._notify()
            await self._serve_requests(conn)
        except _Dropped as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:
            # A bug of ours must cost this connection only; ztunnel reconnects.
            log.exception("zds_connection_failed", conn=conn.number)
            reason, detail = DropReason.INTERNAL_ERROR, repr(exc)
        finally:
            self._drop(conn, reason, detail)
        await self._notify()

    def _drop(self, conn: _Connection, reason: DropReason, detail: str) -> None:
        # Bookkeeping and log first: once the peer sees EOF, the server no longer counts it.
        self._all.remove(conn)
        if conn.greeted:
            self._greeted.remove(conn)
        while conn.pending:
            request = conn.pending.popleft()
            if not request.future.done():
                request.future.set_exception(
                    ZtunnelUnavailableError(f"ztunnel connection lost ({reason.value})")
                )
        event = "ztunnel_disconnected" if conn.greeted else "ztunnel_rejected"
        log.info(
            event, conn=conn.number, peer_pid=conn.peer_pid, reason=reason.value, detail=detail
        )
        conn.sock.close()

    async def _receive(self, conn: _Connection) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                packet = await recv_packet(conn.sock)
        except TimeoutError as exc:
            raise _Dropped(DropReason.TIMEOUT, "no answer within the deadline") from exc
        except OSError as exc:
            raise _Dropped(DropReason.IO_ERROR, str(exc)) from exc
        if packet.fds:
            close_fds(packet.fds)
            raise _Dropped(DropReason.UNEXPECTED_FD, f"{len(packet.fds)} fd(s)")
        if packet.truncated:
            raise _Dropped(DropReason.MESSAGE_TOO_LARGE, f"over {MAX_MESSAGE_SIZE} bytes")
        if packet.eof:
            raise _Dropped(DropReason.PEER_CLOSED)
        return packet.data

    async def _receive_hello(self, conn: _Connection) -> None:
        data = await self._receive(conn)
        try:
            hello = zds_pb2.ZdsHello.FromString(data)
        except DecodeError as exc:
            raise _Dropped(DropReason.UNDECODABLE, "hello") from exc
        if hello.version != zds_pb2.V1:
            # Istio logs the version and serves the connection: a newer ztunnel still speaks V1.
            log.warning("ztunnel_hello_version_unknown", conn=conn.number, version=hello.version)

    async def _exchange(
        self,
        conn: _Connection,
        kind: RequestKind,
        uid: str = "",
        pod: Pod | None = None,
        netns_path: str | None = None,
        *,
        netns_id: NetnsId | None = None,
    ) -> str:
        """Send one request, wait for its ack; returns the ack's error text ("" = success).

        NetnsNotFoundError when the netns is gone, NetnsOpenError when it cannot be opened
        (nothing was sent; the connection is fine); any other failure drops the connection
        (`_Dropped`).
        """
        data = encode_request(kind, uid, pod)
        fd = _open_for_add(netns_path, netns_id) if netns_path is not None else None
        try:
            async with asyncio.timeout(self._timeout):
                await send_packet(conn.sock, data, fds=() if fd is None else (fd,))
        except TimeoutError as exc:
            raise _Dropped(DropReason.TIMEOUT, "send") from exc
        except OSError as exc:
            raise _Dropped(DropReason.IO_ERROR, str(exc)) from exc
        finally:
            if fd is not None:
                os.close(fd)
        answer = await self._receive(conn)
        try:
            response = zds_pb2.WorkloadResponse.FromString(answer)
        except DecodeError as exc:
            raise _Dropped(DropReason.UNDECODABLE, "response") from exc
        if response.WhichOneof("payload") != "ack":
            raise _Dropped(DropReason.UNEXPECTED_MESSAGE, "response without ack")
        return response.ack.error

    async def _send_snapshot(self, conn: _Connection) -> None:
        started = time.monotonic()
        workloads = list(self._snapshot())
        adds = keeps = 0
        for workload in workloads:
            pod = workload.pod
            kind, error = await self._hand_over(conn, workload)
            if kind is RequestKind.ADD:
                adds += 1
            else:
                keeps += 1
            if error:
                log.warning(
                    "snapshot_workload_nacked", pod_uid=pod.uid, pod=pod.key, conn=conn.number,
                    kind=kind.value, reason=error,
                )  # fmt: skip
                if self._on_snapshot_nack is not None:
                    self._on_snapshot_nack(pod.uid, error)
        error = await self._exchange(conn, RequestKind.SNAPSHOT_SENT)
        if error:
            log.warning("snapshot_nacked", conn=conn.number, reason=error)
        log.info(
            "ztunnel_snapshot_sent", conn=conn.number, adds=adds, keeps=keeps,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )  # fmt: skip

    async def _hand_over(self, conn: _Connection, workload: Workload) -> tuple[RequestKind, str]:
        """One snapshot entry: `Add` with the netns, or `Keep` when the netns is unknown or
        cannot be opened; returns what was sent and the ack's error text."""
        pod = workload.pod
        if workload.netns_path:
            try:
                return RequestKind.ADD, await self._exchange(
                    conn,
                    RequestKind.ADD,
                    pod.uid,
                    pod,
                    workload.netns_path,
                    netns_id=workload.netns_id,
                )
            except NetnsNotFoundError as exc:  # the netns vanished (or its path was reused)
                log.warning(
                    "snapshot_netns_missing", pod_uid=pod.uid, pod=pod.key,
                    netns=workload.netns_path, reason=str(exc),
                )  # fmt: skip
            except NetnsOpenError as exc:  # still there (EMFILE...): the reconciler Adds it later
                log.warning(
                    "snapshot_netns_open_failed", pod_uid=pod.uid, pod=pod.key,
                    netns=workload.netns_path, reason=str(exc),
                )  # fmt: skip
                if self._on_snapshot_unsent is not None:
                    self._on_snapshot_unsent(pod.uid, str(exc))
        return RequestKind.KEEP, await self._exchange(conn, RequestKind.KEEP, pod.uid)

    def _probe(self, conn: _Connection) -> None:
        """Between requests the peer must be silent: EOF or any packet drops the connection."""
        try:
            peeked = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _Dropped(DropReason.IO_ERROR, str(exc)) from exc
        if not peeked:
            raise _Dropped(DropReason.PEER_CLOSED)
        raise _Dropped(DropReason.UNEXPECTED_MESSAGE, "unsolicited packet")

    async def _wait_idle(self, conn: _Connection) -> None:
        """Until a request is queued, the socket turns readable, or the keepalive interval."""
        if conn.pending:
            return
        conn.wake.clear()
        loop = asyncio.get_running_loop()
        fd = conn.sock.fileno()
        loop.add_reader(fd, conn.wake.set)
        try:
            async with asyncio.timeout(self._keepalive_interval):
                await conn.wake.wait()
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    async def _serve_requests(self, conn: _Connection) -> None:
        while True:
            await self._wait_idle(conn)
            self._probe(conn)
            while conn.pending:
                request = conn.pending.popleft()
                if request.future.done():  # the caller gave up before it was sent
                    continue
                await self._serve_one(conn, request)

    async def _serve_one(self, conn: _Connection, request: _Request) -> None:
        started = time.monotonic()
        try:
            error = await self._exchange(
                conn,
                request.kind,
                request.uid,
                request.pod,
                request.netns_path,
                netns_id=request.netns_id,
            )
        except _Dropped:
            conn.pending.appendleft(request)  # failed by _drop with the connection
            raise
        except RedirectError as exc:
            if not request.future.done():
                request.future.set_exception(exc)
            return
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        if error:
            log.warning(
                "workload_nacked", pod_uid=request.uid, conn=conn.number,
                kind=request.kind.value, reason=error, duration_ms=duration_ms,
            )  # fmt: skip
        elif request.kind is RequestKind.ADD:
            # At debug: the reconciler logs the acceptance (`ztunnel_accepted_pod`), with this
            # exchange's time included.
            pod = request.pod
            log.debug(
                "workload_added", pod_uid=request.uid, pod=pod.key if pod else "",
                netns=request.netns_path, conn=conn.number, duration_ms=duration_ms,
            )  # fmt: skip
        else:
            log.info(
                "workload_deleted", pod_uid=request.uid, conn=conn.number, duration_ms=duration_ms
            )
        if not request.future.done():
            request.future.set_result(error)
