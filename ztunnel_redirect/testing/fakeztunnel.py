"""A real ZDS client standing in for ztunnel: it connects, says hello and answers requests.

It speaks the wire protocol over a real `SOCK_SEQPACKET` socket with real fd passing, records
every request it got (waitable without polling), and can be told to misbehave: nack, answer late,
crash mid-conversation, or send whatever bytes and fds a test wants.

On `Add` it keeps the received netns fd open while the workload is live (closed on `Del` or
`close()`), and may start a data-plane stand-in in that netns: `data_plane` is a factory called
with the netns path (`netns.fd_path(fd)`) whose result has `start()` and `close()` (coroutine
methods are awaited, plain ones run on a worker thread); `serve=True` uses
`ztunnel_redirect.testing.standin.Standin`. The ack is sent after `start()` has finished; a
failing `start()` is answered with a nack.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import os
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from google.protobuf.message import DecodeError

from ztunnel_redirect.adapters import zds_pb2
from ztunnel_redirect.adapters.zds import (
    MAX_MESSAGE_SIZE,
    RequestKind,
    close_fds,
    recv_packet,
    send_packet,
)
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.kernel.netns import fd_path

__all__ = ["GARBAGE", "Behaviour", "DataPlane", "FakeZtunnel", "LiveWorkload", "ReceivedRequest"]

GARBAGE = b"\xff\xff\xff\xff not a protobuf"
"""Bytes that do not decode as any ZDS message."""

_CLIENT_MAX_FDS = 4
"""Room for more fds than the protocol allows, so that an extra one is seen (and closed)."""


class DataPlane(Protocol):
    """What the fake runs in a workload's netns while it is live (e.g. a `Standin`)."""

    def start(self) -> object: ...
    def close(self) -> object: ...


DataPlaneFactory = Callable[[str], DataPlane]


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers; replace `FakeZtunnel.behaviour` at any time."""

    nack_all: bool = False
    nack_uids: frozenset[str] = frozenset()
    nack_message: str = "refused by fake ztunnel"
    ack_delay: float = 0.0
    """Seconds to wait before each answer (a slow ztunnel)."""
    crash_after: int | None = None
    """Close the socket abruptly on receiving the n-th request (1-based), without answering."""
    reply: bytes | None = None
    """Raw bytes to answer each request with instead of the ack (e.g. GARBAGE, or oversized);
    sent as is, without the size check."""
    reply_fds: tuple[int, ...] = ()
    """fds to attach to each answer (the protocol allows none); the test owns them."""


@dataclass(frozen=True)
class ReceivedRequest:
    kind: RequestKind
    uid: PodUid
    name: str = ""
    namespace: str = ""
    service_account: str = ""
    fds: int = 0
    """How many fds came with it (the protocol allows exactly one, only on Add)."""
    netns_inode: int | None = None
    """Inode of the netns behind the received fd (compare with `os.stat(path).st_ino`)."""
    answer: str | None = None
    """The ack's error that the fake sent ("" = success); None when it did not answer."""


@dataclass
class LiveWorkload:
    uid: PodUid
    fd: int
    data_plane: DataPlane | None = None

    @property
    def netns_path(self) -> str:
        return fd_path(self.fd)


async def _send_unchecked(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Like `zds.send_packet`, without its size limit: the fake may break the protocol."""
    if len(data) <= MAX_MESSAGE_SIZE:
        await send_packet(sock, data, fds=fds)
        return
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([data], ancdata if fds else [])


async def _call(method: Callable[[], object]) -> None:
    """Await a coroutine method; run a plain one on a worker thread (a `Standin` blocks)."""
    if inspect.iscoroutinefunction(method):
        await method()
    else:
        await asyncio.to_thread(method)


def _standin_factory(*, ipv6: bool) -> DataPlaneFactory:
    # Imported by name on first use: the stand-in is optional for this module and its tests.
    module = importlib.import_module("ztunnel_redirect.testing.standin")

    def build(netns_path: str) -> DataPlane:
        standin: DataPlane = module.Standin(netns_path, ipv6=ipv6)
        return standin

    return build


@dataclass
class _State:
    requests: list[ReceivedRequest] = field(default_factory=list)
    workloads: dict[PodUid, LiveWorkload] = field(default_factory=dict)


class FakeZtunnel:
    """One ztunnel connection to the agent's ZDS socket at `path`."""

    def __init__(
        self,
        path: str,
        *,
        behaviour: Behaviour | None = None,
        data_plane: DataPlaneFactory | None = None,
        serve: bool = False,
        ipv6: bool = False,
        version: int = zds_pb2.V1,
        hello: bytes | None = None,
    ) -> None:
        """`version`: the `ZdsHello` version to announce (a ztunnel newer than the agent);
        `hello`: raw bytes to send instead of the hello (b"" sends no hello at all)."""
        self.path = path
        self.behaviour = behaviour or Behaviour()
        if data_plane is None and serve:
            data_plane = _standin_factory(ipv6=ipv6)
        self._data_plane = data_plane
        self._hello = (
            # cast: proto3 enums are open, an unknown number is what a newer ztunnel sends.
            zds_pb2.ZdsHello(version=cast(zds_pb2.Version, version)).SerializeToString()
            if hello is None
            else hello
        )
        self._state = _State()
        self._changed = asyncio.Condition()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        """Set when the connection is over (the agent closed it, or we crashed or closed)."""
        self.snapshot_done = asyncio.Event()
        self.violations: list[str] = []
        """Protocol violations by the agent that the fake saw (a test expects none)."""

    # --- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.path)
            if self._hello:
                await _send_unchecked(sock, self._hello, ())
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.create_task(self._run(), name=f"fake-ztunnel-{sock.fileno()}")

    async def close(self) -> None:
        """Disconnect, stop every data plane and close every fd received."""
        await self.crash()
        workloads = list(self._state.workloads.values())
        self._state.workloads.clear()
        for workload in workloads:
            await self._release(workload)

    async def crash(self) -> None:
        """Close the socket abruptly, like a ztunnel that died (workloads stay as they are)."""
        # The reading task owns the socket and closes it on its way out; closing it under its
        # feet would leave the event loop watching an fd number that the kernel may reuse.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.closed.set()

    async def __aenter__(self) -> FakeZtunnel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what it saw

    @property
    def requests(self) -> Sequence[ReceivedRequest]:
        return tuple(self._state.requests)

    @property
    def workloads(self) -> dict[PodUid, LiveWorkload]:
        return dict(self._state.workloads)

    async def wait_for(
        self, predicate: Callable[[Sequence[ReceivedRequest]], bool]
    ) -> Sequence[ReceivedRequest]:
        """Until `predicate(requests)` holds; bound it with `asyncio.timeout`."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self.requests))
        return self.requests

    async def wait_request(self, kind: RequestKind, uid: str | None = None) -> ReceivedRequest:
        """Until a request of `kind` (for `uid`, if given) was handled; returns the first such."""

        def match(request: ReceivedRequest) -> bool:
            return request.kind is kind and (uid is None or request.uid == uid)

        requests = await self.wait_for(lambda seen: any(map(match, seen)))
        return next(request for request in requests if match(request))

    # --- misbehaving on purpose

    async def send_raw(self, data: bytes, *, fds: Collection[int] = ()) -> None:
        """Send any packet (garbage, oversized, unsolicited acks, fds) at any time."""
        if self._sock is None:
            raise ConnectionError("fake ztunnel is not connected")
        await _send_unchecked(self._sock, data, tuple(fds))

    # --- the conversation

    async def _run(self) -> None:
        sock = self._sock
        assert sock is not None  # noqa: S101 - start() sets it before creating this task
        try:
            while True:
                packet = await recv_packet(sock, max_fds=_CLIENT_MAX_FDS)
                if packet.eof:
                    return
                if not await self._handle(sock, packet.data, list(packet.fds), packet.truncated):
                    return
        except OSError:
            return  # the agent reset the connection
        finally:
            self._close_socket()
            async with self._changed:
                self._changed.notify_all()

    async def _handle(
        self, sock: socket.socket, data: bytes, fds: list[int], truncated: bool
    ) -> bool:
        """Answer one request; False to end the connection."""
        count = len(self._state.requests) + 1
        try:
            message = zds_pb2.WorkloadRequest.FromString(data)
            payload = message.WhichOneof("payload")
        except DecodeError:
            payload = None
        if truncated or payload is None:
            close_fds(fds)
            self.violations.append(f"undecodable request #{count}")
            return False
        kind = RequestKind(payload)
        body = getattr(message, payload)
        uid = PodUid(getattr(body, "uid", ""))
        info = message.add.workload_info if kind is RequestKind.ADD else None
        inode = os.fstat(fds[0]).st_ino if fds else None
        received = ReceivedRequest(
            kind,
            uid,
            name=info.name if info else "",
            namespace=info.namespace if info else "",
            service_account=info.service_account if info else "",
            fds=len(fds),
            netns_inode=inode,
        )
        behaviour = self.behaviour
        if behaviour.crash_after is not None and count >= behaviour.crash_after:
            close_fds(fds)
            await self._record(received)
            return False
        answer = await self._apply(kind, uid, fds, behaviour)
        if behaviour.ack_delay:
            await asyncio.sleep(behaviour.ack_delay)
        ack = zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=answer)).SerializeToString()
        reply = ack if behaviour.reply is None else behaviour.reply
        await _send_unchecked(sock, reply, behaviour.reply_fds)
        await self._record(received, answer=answer if reply == ack else None)
        if kind is RequestKind.SNAPSHOT_SENT:
            self.snapshot_done.set()
        return True

    async def _apply(
        self, kind: RequestKind, uid: PodUid, fds: list[int], behaviour: Behaviour
    ) -> str:
        """Do what ztunnel would; returns the ack's error text. Takes ownership of `fds`."""
        expected = 1 if kind is RequestKind.ADD else 0
        if len(fds) != expected:
            close_fds(fds)
            self.violations.append(f"{kind.value} for {uid!r} came with {len(fds)} fds")
            return f"expected {expected} fds, got {len(fds)}"
        if behaviour.nack_all or uid in behaviour.nack_uids:
            close_fds(fds)
            return behaviour.nack_message
        if kind is RequestKind.ADD:
            previous = self._state.workloads.pop(uid, None)
            if previous is not None:
                await self._release(previous)
            workload = LiveWorkload(uid, fds[0])
            if self._data_plane is not None:
                try:
                    workload.data_plane = self._data_plane(workload.netns_path)
                    await _call(workload.data_plane.start)
                except Exception as exc:  # a broken stand-in is the agent's nack, not our crash
                    await self._release(workload)
                    return f"data plane failed: {exc!r}"
            self._state.workloads[uid] = workload
        elif kind is RequestKind.DEL:
            gone = self._state.workloads.pop(uid, None)
            if gone is not None:
                await self._release(gone)
        return ""

    async def _release(self, workload: LiveWorkload) -> None:
        try:
            if workload.data_plane is not None:
                await _call(workload.data_plane.close)
        finally:
            close_fds((workload.fd,))

    async def _record(self, request: ReceivedRequest, *, answer: str | None = None) -> None:
        if answer is not None:
            request = dataclasses.replace(request, answer=answer)
        self._state.requests.append(request)
        async with self._changed:
            self._changed.notify_all()
