"""A stand-in for ztunnel's data plane inside ONE pod network namespace.

It opens the listeners real ztunnel opens in a pod netns (docs/design.md §1.2) and behaves like
ztunnel towards the redirect rules, so that tests can prove with real traffic that the rules work:

- 15001 outbound: learn the original destination (`SO_ORIGINAL_DST`), connect there, relay.
- 15006 inbound plaintext: learn the original destination (the app in this pod) and connect to
  it from the client's own source address (`IP_TRANSPARENT`), relay. The app's reply reaches that
  socket only through the pod's mangle rules and policy routing (docs/design.md §2, §3, §12.7).
- 15008 HBONE: answer `b"hbone\\n"` and close (shows 15008 is not redirected).
- 15053 DNS on 127.0.0.1 (and ::1), UDP and TCP: answer `b"dns:" + request`.

Every socket it opens carries SO_MARK 0x539, like ztunnel's, so the rules never redirect it.
Each connection is recorded as a `Hop`; tests wait for hops on a condition, never by sleeping.
A connection that was not redirected (no original destination other than the listener itself)
is recorded and closed without an answer (the client reads EOF): relaying it would connect the
stand-in to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, cast

import structlog

from ztunnel_redirect.core.constants import (
    DNS_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    ZTUNNEL_MARK,
)
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.testing.traffic import (
    ConnectionSet,
    Handler,
    NetnsLoop,
    Recorder,
    close_writer,
    drain_to_eof,
    family_of,
    peer_of,
)

__all__ = [
    "HBONE_REPLY",
    "Hop",
    "HopKind",
    "Standin",
    "StandinError",
    "dns_reply",
    "original_dst",
    "parse_original_dst",
]

log = structlog.get_logger(__name__)

SO_ORIGINAL_DST: Final = 80
"""getsockopt(SOL_IP, ...) on an accepted TCP socket: the pre-NAT destination (sockaddr_in)."""
IP6T_SO_ORIGINAL_DST: Final = 80
"""getsockopt(SOL_IPV6, ...): the same for IPv6 (sockaddr_in6)."""
IPV6_TRANSPARENT: Final = 75
SOL_IPV6: Final = 41
SOCKADDR_IN_SIZE: Final = 16
SOCKADDR_IN6_SIZE: Final = 28

HBONE_REPLY: Final = b"hbone\n"
DNS_REPLY_PREFIX: Final = b"dns:"

CHUNK: Final = 65536
MAX_CHUNKS: Final = 1 << 16
"""Bound on one relay direction (4 GiB at most); test traffic is a few bytes."""
MAX_DNS_REQUEST: Final = 65535


def dns_reply(request: bytes) -> bytes:
    """What the stand-in's DNS listeners answer to `request` (UDP and TCP)."""
    return DNS_REPLY_PREFIX + request


class StandinError(RedirectError):
    """The stand-in could not open its listeners in the pod netns."""


class HopKind(Enum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"
    HBONE = "hbone"
    DNS = "dns"


@dataclass(frozen=True)
class Hop:
    """One connection (or DNS datagram) that reached a stand-in listener."""

    kind: HopKind
    client: tuple[str, int]
    """The peer address as the listener saw it (after NAT: the real client)."""
    original_dst: tuple[str, int]
    """Where the client was going before the redirect; the listener's own address if not NATed."""


def parse_original_dst(raw: bytes) -> tuple[str, int]:
    """Decode the sockaddr_in / sockaddr_in6 that `SO_ORIGINAL_DST` returns.

    `sa_family` is in host byte order, the port in network byte order.
    """
    if len(raw) < 4:
        raise ValueError(f"sockaddr too short: {len(raw)} bytes")
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        # sin6_flowinfo (4 bytes) sits between the port and the address.
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unexpected sockaddr family {family} ({len(raw)} bytes)")


def original_dst(sock: Any) -> tuple[str, int] | None:
    """The pre-NAT destination of an accepted TCP socket, or None when conntrack has none.

    `sock` is a socket.socket or asyncio's TransportSocket (both have family and getsockopt).
    """
    if sock.family == socket.AF_INET:
        level, size = socket.SOL_IP, SOCKADDR_IN_SIZE
    else:
        level, size = SOL_IPV6, SOCKADDR_IN6_SIZE
    try:
        raw: bytes = sock.getsockopt(level, SO_ORIGINAL_DST, size)
    except OSError as exc:
        # ENOENT: no conntrack entry (nothing tracks this netns); ENOPROTOOPT: no conntrack.
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise
    return parse_original_dst(raw)


def _marked_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
    except BaseException:
        sock.close()
        raise
    return sock


def _listener(
    family: socket.AddressFamily, kind: socket.SocketKind, ip: str, port: int
) -> socket.socket:
    sock = _marked_socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
        raise StandinError(f"cannot listen on {ip}:{port}/{proto}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a stream with a TCP reset (SO_LINGER 0), as a proxy does when a relay fails."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, standin: Standin, local: tuple[str, int]) -> None:
        self._standin = standin
        self._local = local
        self._transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A UDP endpoint's transport (not a DatagramTransport subclass on Python 3.11).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._standin._record(Hop(HopKind.DNS, peer_of(addr), self._local))
        if self._transport is not None:
            self._transport.sendto(dns_reply(data), addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("standin_dns_error", reason=repr(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Standin:
    """ztunnel's listeners for one pod netns, on a thread that lives in that netns.

    When a relay cannot reach its destination or one side resets, the client's connection is
    reset. `connect_timeout` is longer than `request()`'s default timeout on purpose: a reply
    that never comes back (e.g. no policy routing for the inbound hop) shows as the client's
    TimeoutError, not as a reset that races it.

    Use as a context manager, or `start()` (blocks until every listener is bound; raises
    StandinError or NetnsNotFoundError) and `close()` (closes listeners and relayed connections,
    joins the thread; idempotent).
    """

    def __init__(
        self,
        netns_path: str,
        *,
        ipv6: bool = False,
        dns: bool = True,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
    ) -> None:
        self.netns_path = netns_path
        self.ipv6 = ipv6
        self.dns = dns
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._loop = NetnsLoop(netns_path, name=f"standin-{netns_path.rsplit('/', 1)[-1]}")
        self._servers: list[asyncio.Server] = []
        self._dns_transports: list[tuple[asyncio.DatagramTransport, _DnsProtocol]] = []
        self._connections = ConnectionSet(name="standin")
        self._hops: Recorder[Hop] = Recorder(f"stand-in in {netns_path}")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()
        try:
            self._loop.run(self._listen())
        except OSError as exc:
            self.close()
            raise StandinError(f"stand-in listeners in {self.netns_path}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        log.debug("standin_listening", netns=self.netns_path, ipv6=self.ipv6, dns=self.dns)

    def close(self) -> None:
        """Close the listeners and every relayed connection, join the thread. Idempotent."""
        try:
            if self._loop.running:
                self._loop.run(self._shutdown())
        finally:
            self._loop.stop()

    def __enter__(self) -> Standin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _listen(self) -> None:
        wildcards = [(socket.AF_INET, "0.0.0.0")]  # noqa: S104 -- ztunnel binds the wildcard
        loopbacks = [(socket.AF_INET, "127.0.0.1")]
        if self.ipv6:
            wildcards.append((socket.AF_INET6, "::"))
            loopbacks.append((socket.AF_INET6, "::1"))
        handlers: list[tuple[int, Handler, list[tuple[socket.AddressFamily, str]]]] = [
            (OUTBOUND_PORT, self._outbound, wildcards),
            (INBOUND_PLAINTEXT_PORT, self._inbound, wildcards),
            (HBONE_PORT, self._hbone, wildcards),
        ]
        if self.dns:
            handlers.append((DNS_PORT, self._dns_tcp, loopbacks))
        for port, handler, addresses in handlers:
            for family, ip in addresses:
                sock = _listener(family, socket.SOCK_STREAM, ip, port)
                try:
                    server = await asyncio.start_server(self._connections.wrap(handler), sock=sock)
                except BaseException:
                    sock.close()
                    raise
                self._servers.append(server)
        if self.dns:
            loop = asyncio.get_running_loop()
            for family, ip in loopbacks:
                sock = _listener(family, socket.SOCK_DGRAM, ip, DNS_PORT)
                try:
                    transport, protocol = await loop.create_datagram_endpoint(
                        functools.partial(_DnsProtocol, self, (ip, DNS_PORT)),
                        sock=sock,
                    )
                except BaseException:
                    sock.close()
                    raise
                self._dns_transports.append((transport, protocol))

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        await self._connections.close(grace=self.connect_timeout)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for transport, protocol in self._dns_transports:
            transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.connect_timeout):
                    await protocol.closed
        self._dns_transports.clear()

    # -- hop records ---------------------------------------------------------------------------

    def _record(self, hop: Hop) -> None:
        self._hops.add(hop)
        log.debug(
            "standin_hop_recorded",
            netns=self.netns_path,
            kind=hop.kind.value,
            client=hop.client,
            original_dst=hop.original_dst,
        )

    @property
    def hops(self) -> list[Hop]:
        """Every hop so far, in arrival order (a copy)."""
        return self._hops.items

    def wait_for(
        self, predicate: Callable[[Hop], bool] | None = None, *, timeout: float = 5.0
    ) -> Hop:
        """The first recorded hop matching `predicate` (any, by default); waits for one.

        Raises TimeoutError when none arrives within `timeout` seconds.
        """
        return self._hops.wait_for(predicate, timeout=timeout)

    def clear(self) -> None:
        self._hops.clear()

    # -- connection handlers (run on the stand-in's loop thread) -------------------------------

    def _addresses(
        self, writer: asyncio.StreamWriter
    ) -> tuple[tuple[str, int], tuple[str, int], bool]:
        """(client, original destination, redirected?) of an accepted connection."""
        client = peer_of(writer.get_extra_info("peername"))
        local = peer_of(writer.get_extra_info("sockname"))
        dst = original_dst(writer.get_extra_info("socket"))
        if dst is None or dst == local:
            return client, local, False
        return client, dst, True

    async def _outbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, dst, redirected = self._addresses(writer)
        self._record(Hop(HopKind.OUTBOUND, client, dst))
        if not redirected:
            log.debug("standin_not_redirected", netns=self.netns_path, port=OUTBOUND_PORT)
            await self._refuse(reader, writer)
            return
        sock = _marked_socket(family_of(dst[0]), socket.SOCK_STREAM)
        await self._relay(reader, writer, sock, dst)

    async def _inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, dst, redirected = self._addresses(writer)
        self._record(Hop(HopKind.INBOUND, client, dst))
        if not redirected:
            log.debug("standin_not_redirected", netns=self.netns_path, port=INBOUND_PLAINTEXT_PORT)
            await self._refuse(reader, writer)
            return
        family = family_of(client[0])
        sock = _marked_socket(family, socket.SOCK_STREAM)
        try:
            # Connect to the app from the client's own address, as ztunnel does (docs/design.md
            # §12.7).
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((client[0], 0))
        except BaseException:
            sock.close()
            raise
        await self._relay(reader, writer, sock, dst)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close a connection gracefully without answering: the client reads EOF, not a reset."""
        if writer.can_write_eof():
            writer.write_eof()
        await drain_to_eof(reader, grace=self.connect_timeout)

    async def _hbone(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, dst, _ = self._addresses(writer)
        self._record(Hop(HopKind.HBONE, client, dst))
        writer.write(HBONE_REPLY)
        async with asyncio.timeout(self.connect_timeout):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await drain_to_eof(reader, grace=self.connect_timeout)

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client, dst, _ = self._addresses(writer)
        self._record(Hop(HopKind.DNS, client, dst))
        async with asyncio.timeout(self.connect_timeout):
            request = await reader.read(MAX_DNS_REQUEST)
        writer.write(dns_reply(request))
        async with asyncio.timeout(self.connect_timeout):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await drain_to_eof(reader, grace=self.connect_timeout)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: socket.socket,
        dst: tuple[str, int],
    ) -> None:
        """Connect `upstream` to `dst` and copy both ways; half-closes are passed on."""
        loop = asyncio.get_running_loop()
        try:
            upstream.setblocking(False)
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(upstream, dst)
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except (OSError, TimeoutError):
            upstream.close()
            # The client learns that its destination was unreachable: a reset, never an EOF
            # that would look like an empty answer.
            _abort(writer)
            raise
        except BaseException:
            upstream.close()
            raise
        self._connections.adopt(up_writer)
        try:
            copies = [
                asyncio.create_task(self._copy(reader, up_writer), name="standin-copy-up"),
                asyncio.create_task(self._copy(up_reader, writer), name="standin-copy-down"),
            ]
            try:
                await asyncio.gather(*copies)
            except (OSError, TimeoutError):
                # A reset (or a stall) on one side is passed on as a reset to both.
                _abort(writer)
                _abort(up_writer)
                raise
            finally:
                for copy in copies:
                    copy.cancel()
                await asyncio.wait(copies, timeout=self.connect_timeout)
        finally:
            await close_writer(up_writer)
            self._connections.release(up_writer)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(MAX_CHUNKS):
            async with asyncio.timeout(self.idle_timeout):
                data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            async with asyncio.timeout(self.idle_timeout):
                await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
