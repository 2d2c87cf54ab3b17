"""Real traffic inside lab network namespaces: a tiny app server and one-shot clients.

Everything here runs on threads that join the target netns with `join_netns` (sockets are created
there, so they live in that netns), or, when a client must be owned by another uid, in a child
process started with `nsenter` + `setpriv`. No socket made here carries a mark.

`NetnsLoop` (an asyncio event loop on a thread that lives in one netns) is also the base of the
ztunnel stand-in (`standin.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Generic, TypeVar

import structlog

from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.kernel.netns import join_netns

__all__ = [
    "App",
    "ConnectionSet",
    "Handler",
    "NetnsLoop",
    "TrafficError",
    "close_writer",
    "drain_to_eof",
    "family_of",
    "peer_of",
    "request",
    "run_in_netns",
    "udp_request",
]

T = TypeVar("T")
R = TypeVar("R")

log = structlog.get_logger(__name__)

START_TIMEOUT: Final = 10.0
"""Bound on starting or stopping a loop thread; these are local operations."""
MAX_REPLY: Final = 1 << 20
"""Bound on what a client reads before it gives up on EOF."""
APP_MAX_LINE: Final = 64 * 1024
APP_IO_TIMEOUT: Final = 5.0


class TrafficError(RedirectError):
    """A traffic tool could not do its job for a reason other than the network's answer."""


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for a numeric address (names are not resolved on purpose)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError as exc:
        raise TrafficError(f"{host!r} is not a numeric IP address") from exc
    return socket.AF_INET if version == 4 else socket.AF_INET6


def peer_of(address: Any) -> tuple[str, int]:
    """(ip, port) from a socket address of either family (drops IPv6 flowinfo and scope)."""
    return (str(address[0]), int(address[1]))


class NetnsLoop:
    """An asyncio event loop on a dedicated thread that joined a network namespace for life.

    Sockets created by coroutines running on this loop live in that namespace. `start()` returns
    once the loop runs (raising if the thread could not join the netns); `run()` executes a
    coroutine there and waits for it; `stop()` stops the loop, closes it and joins the thread.
    """

    def __init__(self, netns_path: str, *, name: str) -> None:
        self.netns_path = netns_path
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise TrafficError(f"{self.name} already started")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TrafficError(f"{self.name}: loop thread did not start in {START_TIMEOUT}s")
        if self._error is not None:
            self._thread.join(START_TIMEOUT)
            self._thread = None
            raise self._error

    def _main(self) -> None:
        try:
            join_netns(self.netns_path)
            loop = asyncio.new_event_loop()
        except BaseException as exc:  # handed to start(), which raises it in the caller
            self._error = exc
            self._ready.set()
            return
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._finish(loop)

    @staticmethod
    def _finish(loop: asyncio.AbstractEventLoop) -> None:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()

    @property
    def running(self) -> bool:
        return self._loop is not None and self._thread is not None and self._thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float = START_TIMEOUT) -> T:
        """Run `coro` on the loop thread and return its result (blocking, from another thread)."""
        if self._loop is None or not self.running:
            coro.close()
            raise TrafficError(f"{self.name} is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            raise TrafficError(f"{self.name}: loop thread did not stop in {START_TIMEOUT}s")
        self._thread = None
        self._loop = None


async def close_writer(writer: asyncio.StreamWriter, *, grace: float = 1.0) -> None:
    """Close a stream and wait until its socket is really closed (so no fd outlives us)."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(grace):
            await writer.wait_closed()


async def drain_to_eof(reader: asyncio.StreamReader, *, grace: float) -> None:
    """Read and discard until EOF, bounded in time and size: a graceful close, no RST."""
    deadline = time.monotonic() + grace
    received = 0
    with contextlib.suppress(OSError, TimeoutError):
        while received < MAX_REPLY:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            async with asyncio.timeout(left):
                chunk = await reader.read(65536)
            if not chunk:
                return
            received += len(chunk)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ConnectionSet:
    """Stream connection handlers that can all be ended at once (on a server's close).

    Each handler's work runs as its own task; `close()` closes every stream (those accepted and
    those adopted, e.g. a relay's upstream), cancels the work and waits until every connection's
    socket is closed. The task asyncio creates per connection is never cancelled itself: on
    Python 3.11 a cancelled one makes asyncio log a spurious error.
    """

    def __init__(self, *, name: str) -> None:
        self.name = name
        self._work: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def adopt(self, writer: asyncio.StreamWriter) -> None:
        """Have `close()` close this stream too (call `release` when the handler closed it)."""
        self._writers.add(writer)

    def release(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)

    def wrap(self, handler: Handler) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            outer = asyncio.current_task()
            if outer is not None:
                self._handlers.add(outer)
            self.adopt(writer)
            work = asyncio.create_task(_as_task(handler(reader, writer)), name=self.name)
            self._work.add(work)
            try:
                await asyncio.wait([work])
                failure = None if work.cancelled() else work.exception()
                if isinstance(failure, OSError | TimeoutError):
                    log.debug("connection_failed", server=self.name, reason=repr(failure))
                elif failure is not None:
                    log.error("connection_handler_crashed", server=self.name, exc_info=failure)
            finally:
                self._work.discard(work)
                work.cancel()
                await close_writer(writer)
                self.release(writer)
                if outer is not None:
                    self._handlers.discard(outer)

        return handle

    async def close(self, *, grace: float) -> None:
        """Close every connection; a handler still running after `grace` seconds is logged
        (`connections_outlived_grace`) and left behind."""
        for writer in list(self._writers):
            writer.close()
        for work in list(self._work):
            work.cancel()
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=grace)
            if pending:
                log.warning("connections_outlived_grace", server=self.name, count=len(pending))


async def _as_task(awaitable: Awaitable[None]) -> None:
    await awaitable


class Recorder(Generic[R]):
    """What a server thread saw, in order, and a way to wait for it without polling."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._items: list[R] = []
        self._cond = threading.Condition()

    def add(self, item: R) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    @property
    def items(self) -> list[R]:
        """Everything so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._items)

    def wait_for(self, predicate: Callable[[R], bool] | None = None, *, timeout: float) -> R:
        """The first item matching `predicate` (any, by default); raises TimeoutError."""

        def find() -> R | None:
            return next((x for x in self._items if predicate is None or predicate(x)), None)

        with self._cond:
            found = self._cond.wait_for(find, timeout)
        if found is None:
            raise TimeoutError(f"{self._what}: nothing matching within {timeout}s")
        return found

    def clear(self) -> None:
        with self._cond:
            self._items.clear()


class App:
    """A TCP server in a pod netns: one line per connection, naming the peer address it saw.

    Each connection gets `f"app {name} saw {peer_ip}\\n"` after the app has read one line (or
    EOF) from the client; then the app closes. It listens on the wildcard address of IPv4 and,
    with `ipv6`, of IPv6 (IPV6_V6ONLY, so peers are never v4-mapped).
    """

    def __init__(
        self, netns_path: str, port: int, *, name: str = "app", ipv6: bool = False
    ) -> None:
        self.netns_path = netns_path
        self.port = port
        self.name = name
        self.ipv6 = ipv6
        self._loop = NetnsLoop(netns_path, name=f"app-{name}")
        self._servers: list[asyncio.Server] = []
        self._connections = ConnectionSet(name=f"app-{name}")
        self._peers: Recorder[tuple[str, int]] = Recorder(f"app {name}")

    def start(self) -> None:
        self._loop.start()
        try:
            self._loop.run(self._listen())
        except BaseException:
            self.close()
            raise
        log.debug("app_listening", netns=self.netns_path, app=self.name, port=self.port)

    async def _listen(self) -> None:
        families = [socket.AF_INET, socket.AF_INET6] if self.ipv6 else [socket.AF_INET]
        for family in families:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", self.port))  # noqa: S104
                sock.listen(128)
                sock.setblocking(False)
                server = await asyncio.start_server(self._connections.wrap(self._handle), sock=sock)
            except BaseException:
                sock.close()
                raise
            self._servers.append(server)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("peername"))
        self._peers.add(peer)
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError, TimeoutError):
            async with asyncio.timeout(APP_IO_TIMEOUT):
                await reader.readline()
        writer.write(f"app {self.name} saw {peer[0]}\n".encode())
        async with asyncio.timeout(APP_IO_TIMEOUT):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await drain_to_eof(reader, grace=APP_IO_TIMEOUT)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        await self._connections.close(grace=START_TIMEOUT)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def close(self) -> None:
        """Stop listening, close every connection, join the thread. Idempotent."""
        try:
            if self._loop.running:
                self._loop.run(self._shutdown())
        finally:
            self._loop.stop()

    @property
    def peers(self) -> list[tuple[str, int]]:
        """Every (ip, port) that connected so far, in order."""
        return self._peers.items

    def wait_for_peer(
        self,
        predicate: Callable[[tuple[str, int]], bool] | None = None,
        *,
        timeout: float = 5.0,
    ) -> tuple[str, int]:
        """The first recorded peer matching `predicate` (any, by default); waits for one."""
        return self._peers.wait_for(predicate, timeout=timeout)

    def clear(self) -> None:
        self._peers.clear()

    def __enter__(self) -> App:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_netns(netns_path: str, fn: Callable[[], T], *, timeout: float) -> T:
    """Run `fn` on a short-lived thread that joins the netns first; return or raise its outcome.

    `fn` must bound itself in time (socket timeouts); `timeout` is only a safety net.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            join_netns(netns_path)
            outcome.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=main, name="netns-client", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"client in {netns_path} did not finish within {timeout}s")
    if failure:
        raise failure[0]
    return outcome[0]


def _exchange(host: str, port: int, payload: bytes, timeout: float) -> bytes:
    """Send `payload`, half-close, return what arrives until EOF.

    Self-contained on purpose: its source is also what the uid-switched child process runs
    (`_CHILD_PRELUDE`), so it may use only `socket`, `time` and builtins.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(payload)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # A reset that arrived before the half-close leaves nothing to shut down: it is the
            # same outcome as a reset seen by recv below.
            if exc.errno != 107:  # ENOTCONN (the child's prelude has no errno module)
                raise
            raise ConnectionResetError(104, "connection reset by peer") from exc
        chunks: list[bytes] = []
        received = 0
        while received < 1 << 20:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no EOF from {host}:{port} within {timeout}s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
        return b"".join(chunks)


_CHILD_PRELUDE: Final = "import socket\nimport sys\nimport time\n\n"
_CHILD_MAIN: Final = """
try:
    data = _exchange(sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4]))
except OSError as exc:
    sys.stderr.write(type(exc).__name__ + "\\t" + str(exc))
    sys.exit(3)
sys.stdout.buffer.write(data)
"""

_CHILD_ERRORS: Final[dict[str, type[OSError]]] = {
    "TimeoutError": TimeoutError,
    "ConnectionRefusedError": ConnectionRefusedError,
    "ConnectionResetError": ConnectionResetError,
}
CHILD_STARTUP_ALLOWANCE: Final = 10.0
"""Extra time granted to nsenter + setpriv + interpreter start-up on top of the client timeout."""


def _request_as(
    netns_path: str, host: str, port: int, *, timeout: float, uid: int, payload: bytes
) -> bytes:
    source = _CHILD_PRELUDE + inspect.getsource(_exchange) + _CHILD_MAIN
    argv = [
        "nsenter",
        f"--net={netns_path}",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        sys.executable,
        "-I",
        "-S",
        "-c",
        source,
        host,
        str(port),
        payload.hex(),
        str(timeout),
    ]
    try:
        result = subprocess.run(
            argv, capture_output=True, check=False, timeout=timeout + CHILD_STARTUP_ALLOWANCE
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"client as uid {uid} in {netns_path} did not finish") from exc
    if result.returncode == 0:
        return result.stdout
    stderr = result.stderr.decode(errors="replace").strip()
    if result.returncode == 3:
        kind, _, message = stderr.partition("\t")
        raise _CHILD_ERRORS.get(kind, OSError)(f"{host}:{port} as uid {uid}: {kind}: {message}")
    raise TrafficError(f"client as uid {uid} in {netns_path} failed: {stderr}")


def request(
    netns_path: str,
    host: str,
    port: int,
    *,
    timeout: float = 5.0,
    uid: int | None = None,
    payload: bytes = b"hi\n",
) -> bytes:
    """Connect over TCP from inside `netns_path`, send `payload`, half-close, read until EOF.

    Raises ConnectionRefusedError, TimeoutError (e.g. a reply that never comes back) or
    ConnectionResetError as the network answers. With `uid`, the client runs as a child process
    owned by that uid (so nftables `meta skuid` sees it); otherwise on a thread of this process.
    """
    family_of(host)  # numeric addresses only, checked before anything runs
    if uid is not None:
        return _request_as(netns_path, host, port, timeout=timeout, uid=uid, payload=payload)
    return run_in_netns(
        netns_path,
        lambda: _exchange(host, port, payload, timeout),
        timeout=timeout + CHILD_STARTUP_ALLOWANCE,
    )


def udp_request(
    netns_path: str, host: str, port: int, payload: bytes, *, timeout: float = 2.0
) -> tuple[bytes, tuple[str, int]]:
    """Send one datagram from inside `netns_path`; return the answer and the address it came from.

    The socket is not connected, so an answer from an unexpected address (e.g. a missing reverse
    NAT) is returned as is rather than dropped. No answer raises TimeoutError.
    """
    family = family_of(host)

    def exchange() -> tuple[bytes, tuple[str, int]]:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(payload, (host, port))
            try:
                data, address = sock.recvfrom(65536)
            except TimeoutError as exc:
                raise TimeoutError(f"no UDP answer from {host}:{port} within {timeout}s") from exc
            return data, peer_of(address)

    return run_in_netns(netns_path, exchange, timeout=timeout + CHILD_STARTUP_ALLOWANCE)
