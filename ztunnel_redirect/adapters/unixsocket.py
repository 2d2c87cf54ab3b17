"""The Unix socket files the agent listens on (the ZDS socket, the CNI plugin's event and log
sockets), and the HTTP server the plugin's two sockets share (`HttpOnUnixSocket`).

A new agent replaces the file of an older one, also while that one still listens: during a
DaemonSet rolling update with surge the two overlap on a node, and the new one must get the
connections. So an agent removes the file on close only while it is still the file it bound,
recognised by its device and inode; otherwise it would delete its successor's socket.
"""

from __future__ import annotations

import contextlib
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
from aiohttp import web

from ztunnel_redirect.core.errors import ConfigError

__all__ = ["HttpOnUnixSocket", "SocketFile", "listen"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SocketFile:
    """A socket file that this process bound."""

    path: str
    identity: tuple[int, int]
    """`(st_dev, st_ino)` of the file when we bound it."""

    def remove(self) -> None:
        """Remove the file, unless it is gone or another process has replaced it since."""
        path = Path(self.path)
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == self.identity:
                path.unlink()


def listen(path: str, kind: socket.SocketKind, *, backlog: int) -> tuple[socket.socket, SocketFile]:
    """A non-blocking listening `AF_UNIX` socket of `kind` on `path`, mode 0600.

    Creates the parent directory; replaces a socket file already there (a dead or older agent's);
    refuses with ConfigError to replace anything else, and when it cannot listen.
    """
    file = Path(path)
    file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(file.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; not removing it")
        file.unlink()
        log.info("stale_socket_removed", socket=path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        # Before listen(): nobody can connect while the mode is still the umask's.
        file.chmod(0o600)
        st = file.lstat()
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc}") from exc
    return sock, SocketFile(path, (st.st_dev, st.st_ino))


class HttpOnUnixSocket:
    """An aiohttp application served on a Unix stream socket made by `listen` (mode 0600).

    `close()` stops serving (requests in flight are cut after aiohttp's grace) and removes the file
    unless a newer agent has replaced it. The servers of the CNI plugin's sockets are these.
    """

    def __init__(self, socket_path: str, app: web.Application, *, backlog: int = 128) -> None:
        self.socket_path = socket_path
        self._app = app
        self._backlog = backlog
        self._runner: web.AppRunner | None = None
        self._socket_file: SocketFile | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        sock, socket_file = listen(self.socket_path, socket.SOCK_STREAM, backlog=self._backlog)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            socket_file.remove()
            raise
        self._runner = runner
        self._socket_file = socket_file

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._socket_file is not None:
            # A local unlink: no need to push it to a thread.
            self._socket_file.remove()
            self._socket_file = None
