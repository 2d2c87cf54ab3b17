"""Entering network namespaces: the small privileged core that every kernel operation runs on.

Kernel work for a pod runs on a `NetnsRunner` worker thread that enters the pod's netns, does the
work and returns to where it came from. The event loop thread never calls `setns`.

Each worker thread gets a private file descriptor table (`unshare(CLONE_FILES)`) holding only
stdio and what the worker opens itself. libnftables 1.0.x uses `select()` on its netlink socket
and aborts the process when that socket's fd number is 1024 or more (docs/design.md §11.13, §12.2);
in a private table the socket always gets a low number, however many fds the agent holds.
Consequence: a worker cannot use fd numbers of the main table. Refer to a namespace by path;
for an fd held by the agent use `fd_path(fd)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from ztunnel_redirect.core.errors import CapabilityError, NetnsNotFoundError

CLONE_FILES: Final = 0x00000400
CLONE_NEWNET: Final = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
PR_SET_NAME: Final = 15
_COMM_MAX: Final = 15

_local = threading.local()

P = ParamSpec("P")
T = TypeVar("T")


def fd_path(fd: int) -> str:
    """A path that names the namespace behind an fd of this process's main fd table."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def name_this_thread() -> None:
    """Give the calling thread its Python name in /proc too (`comm`, 15 bytes), so that `top -H`,
    `ps -L` and a leak check from outside tell the agent's thread pools apart (a pool's
    `thread_name_prefix` alone names the thread for Python only). Best effort: a name is not
    worth failing for."""
    _libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:_COMM_MAX], 0, 0, 0)


def _isolate_thread(wake_fd: int) -> None:
    """Worker initializer: a private fd table holding only stdio and the runner's wake-up pipe."""
    name_this_thread()
    _check(_libc.unshare(CLONE_FILES), "unshare(CLONE_FILES)")
    # Closes only this thread's copies; the process's own descriptors stay open.
    os.closerange(3, wake_fd)
    os.closerange(wake_fd + 1, os.sysconf("SC_OPEN_MAX"))
    _local.isolated = True


def _runs_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _current_netns(*, shared_fds: bool = False) -> int:
    """An fd on the calling thread's current netns, to come back to (nesting works).

    `shared_fds`: the caller is a thread of the process's main fd table (not a worker), entering
    only to create something the event loop then uses (a socket keeps the netns it was created
    in). Never the event loop thread itself: its callbacks would run in the pod's netns."""
    if shared_fds:
        if getattr(_local, "isolated", False):
            raise RuntimeError("a NetnsRunner worker's fds are its own: open shared ones elsewhere")
        if _runs_event_loop():
            raise RuntimeError("the event loop thread never enters a network namespace")
    elif not getattr(_local, "isolated", False):
        raise RuntimeError("netns operations must run on a NetnsRunner worker thread")
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _return_to(fd: int) -> None:
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(fd)


NetnsId = tuple[int, int]
"""(st_dev, st_ino) of a network namespace: what a path named when we found it."""


def netns_id(path: str) -> NetnsId | None:
    """The identity of the netns `path` names now; None when nothing is there.

    A `/proc/<pid>/ns/net` path names whatever netns that pid is in at the time of the call: the
    process may exit and its pid be reused. Whoever keeps such a path compares this identity with
    the one it recorded before each use.
    """
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def open_netns(path: str, *, expect: NetnsId | None = None) -> int:
    """Open a network namespace by path; raises NetnsNotFoundError when it is gone.

    `expect`: the identity the path must name. A `/proc/<pid>/ns/net` path names whatever netns
    that pid is in when it is opened (the pid may have been reused); the identity is read from
    the opened fd, so what is checked is exactly what the caller then uses.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsNotFoundError(f"network namespace {path} does not exist") from exc
    except NotADirectoryError as exc:
        raise NetnsNotFoundError(f"network namespace {path} does not exist") from exc
    if expect is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != expect:
            os.close(fd)
            raise NetnsNotFoundError(f"{path} no longer names network namespace {expect}")
    return fd


def _setns(fd: int, path: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise NetnsNotFoundError(f"{path} is not a network namespace")
        if err == errno.EPERM:
            raise CapabilityError("entering a network namespace needs CAP_SYS_ADMIN")
        raise OSError(err, f"setns({path}): {os.strerror(err)}")


@contextlib.contextmanager
def entered(
    path: str, *, expect: NetnsId | None = None, shared_fds: bool = False
) -> Iterator[None]:
    """Run the body inside the network namespace at `path` (worker threads only); with
    `expect`, only if `path` names the netns of that identity (else NetnsNotFoundError).

    `shared_fds=True`: on a thread that shares the process's fd table instead (see
    `_current_netns`), to open sockets that live in that netns and are served by the event loop
    (never handed to libnftables: their fd numbers may be 1024 or more)."""
    back = _current_netns(shared_fds=shared_fds)
    try:
        fd = open_netns(path, expect=expect)
        try:
            _setns(fd, path)
        finally:
            os.close(fd)
    except BaseException:
        os.close(back)
        raise
    try:
        yield
    finally:
        _return_to(back)


@contextlib.contextmanager
def entered_scratch() -> Iterator[None]:
    """Run the body in a new, empty, anonymous netns that vanishes afterwards."""
    back = _current_netns()
    if _libc.unshare(CLONE_NEWNET) != 0:
        os.close(back)
        _check(-1, "unshare(CLONE_NEWNET)")
    try:
        yield
    finally:
        _return_to(back)


def _call_in(path: str | None, expect: NetnsId | None, fn: Callable[[], T]) -> T:
    if path is None:
        with entered_scratch():
            return fn()
    with entered(path, expect=expect):
        return fn()


class NetnsRunner:
    """A pool of worker threads that run functions inside network namespaces.

    `path=None` means a fresh scratch namespace (used to learn how the kernel lists a ruleset).

    A worker cannot wake the event loop the usual way (`call_soon_threadsafe` writes to the
    loop's self-pipe, which is not in the worker's private fd table). Workers write to the
    runner's own pipe instead, and the loop resolves finished calls when it becomes readable.
    """

    def __init__(self, *, workers: int = 4) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="zr-netns",
            initializer=_isolate_thread,
            initargs=(self._wake_w,),
        )
        self._pending: dict[Future[Any], asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def call(self, path: str | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Blocking call, for the CLI and tests; never from the event loop thread."""
        work = functools.partial(fn, *args, **kwargs)
        return self._pool.submit(_call_in, path, None, work).result()

    async def run(
        self, path: str | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self._submit(path, None, functools.partial(fn, *args, **kwargs))

    async def run_expecting(
        self,
        path: str,
        expect: NetnsId | None,
        fn: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`run`, only if `path` names the netns `expect` when the worker opens it (checked on
        the opened fd, before entering); otherwise NetnsNotFoundError and `fn` never runs.

        (Not a keyword of `run`: a ParamSpec signature allows nothing between *args and
        **kwargs.)"""
        return await self._submit(path, expect, functools.partial(fn, *args, **kwargs))

    async def _submit(self, path: str | None, expect: NetnsId | None, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._loop.remove_reader(self._wake_r)
            loop.add_reader(self._wake_r, self._resolve)
            self._loop = loop
        waiter: asyncio.Future[T] = loop.create_future()
        work = self._pool.submit(_call_in, path, expect, fn)
        self._pending[work] = waiter
        work.add_done_callback(self._wake)
        return await waiter

    def _wake(self, _work: Future[Any]) -> None:
        """Runs on the worker (or here, if the call already finished)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe already means "wake up"
            os.write(self._wake_w, b"\0")

    def _resolve(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        for work in [w for w in self._pending if w.done()]:
            waiter = self._pending.pop(work)
            if waiter.cancelled():
                continue
            exc = work.exception()
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(work.result())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> NetnsRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def join_netns(target: str | int) -> None:
    """Move the calling thread into a network namespace for the rest of its life.

    For threads dedicated to one namespace (test stand-ins that own sockets there). Unlike the
    `NetnsRunner` workers these threads share the process's fd table, so sockets they create can
    be used from any thread. The agent itself never calls this.
    """
    fd = open_netns(target) if isinstance(target, str) else target
    try:
        _setns(fd, str(target))
    finally:
        if isinstance(target, str):
            os.close(fd)
