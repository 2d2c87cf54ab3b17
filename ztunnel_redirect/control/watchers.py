"""Which netns are watched for kernel notifications, and what a notification does: enqueue a check
of that pod (or the host) in the work queue (docs/design.md §2.5).

A watch follows the pod's record: around every run of a key, `sync(key)` opens the feeds of the
netns the record names (with the identity it was found with) and closes those of a netns it no
longer names (the pod left, was deleted, or its netns vanished or was replaced). So the sockets,
which keep their netns alive, never outlive the pod's use of it. Before the run, a netns known
already is watched before it is checked, so no change falls between the two; a netns the run
found is watched after it, and checked once more, unless it is a CNI ADD's new sandbox: its
runtime starts nothing in it before the ADD is answered, which is after the watch is open.

Bounded under storms: a feed drains its socket on every readable event and yields one bit, and
the queue coalesces per key, so a burst touching every pod costs one queued check per pod,
served at the queue's pace. A socket that fails is closed, and its pod checked (whose run opens a
new one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from ztunnel_redirect.control.reconciler import HOST_KEY
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id
from ztunnel_redirect.kernel.notify import Feed, FeedOpener, Watched

__all__ = ["NetnsWatchers"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Watch:
    netns: str
    identity: NetnsId | None
    feeds: list[Feed]


class NetnsWatchers:
    """The feeds of every enrolled pod's netns and of the host's, served by the event loop."""

    def __init__(
        self,
        *,
        records: PodRecords,
        opener: FeedOpener,
        enqueue: Callable[[str], None],
        host_netns: str,
        host_rules: bool,
        new_sandbox: Callable[[PodUid], bool] = lambda _uid: False,
    ) -> None:
        """`host_rules`: the host has ip rules of ours (the branch-ENI probe rules, §4.5).
        `new_sandbox(uid)`: a CNI ADD reported a sandbox of the pod that no run has taken yet
        (`ClusterStore.has_sandbox`)."""
        self._new_sandbox = new_sandbox
        self._records = records
        self._opener = opener
        self._enqueue = enqueue
        self._host_netns = host_netns
        self._host_watched = Watched.HOST_WITH_RULES if host_rules else Watched.HOST
        self._watches: dict[str, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Netns watched now."""
        return len(self._watches)

    @property
    def sockets(self) -> int:
        return sum(len(w.feeds) for w in self._watches.values())

    def _wanted(self, key: str) -> tuple[str, NetnsId | None] | None:
        if key == HOST_KEY:
            return self._host_netns, netns_id(self._host_netns)
        record = self._records.get(PodUid(key))
        if record is None or record.netns is None or record.netns_id is None:
            return None
        return record.netns, record.netns_id

    async def around(self, key: str, run: Callable[[], Awaitable[None]]) -> None:
        """`run()` (a run of `key`) with `key`'s netns watched: from before the run when the
        netns is known, else from when the run found it, then checked once more, but for a
        CNI ADD's new sandbox: nothing in it can change before the ADD is answered."""
        await self.sync(key, check_follows=True)
        quiet_until_answered = key != HOST_KEY and self._new_sandbox(PodUid(key))
        try:
            await run()
        finally:
            await self.sync(key, check_follows=quiet_until_answered)

    async def sync(self, key: str, *, check_follows: bool = False) -> None:
        """Bring the watch of `key` in line with its record (around a run of `key`: one at a
        time per key). A watch opened is followed by a check, which sees what changed before
        the sockets existed: enqueued unless `check_follows` (a run is about to start, or
        nothing can have changed: `around`).

        Never raises for a netns that cannot be watched: it is checked by the periodic pass
        meanwhile, and the next run of the key tries again."""
        wanted = self._wanted(key)
        watch = self._watches.get(key)
        if watch is not None and (watch.netns, watch.identity) == wanted:
            return
        if watch is not None:
            self._close(key, reason="netns_changed" if wanted is not None else "not_enrolled")
        if wanted is None:
            return
        netns, identity = wanted
        try:
            watched = self._host_watched if key == HOST_KEY else Watched.POD
            feeds = await self._opener.open(netns, identity, watched)
        except NetnsNotFoundError:
            return  # the pod's next run finds out where it went
        except OSError as exc:  # e.g. EMFILE: the fd limit is too low for this node
            log.warning("netns_watch_failed", key=key, netns=netns, reason=str(exc))
            return
        loop = self._loop = asyncio.get_running_loop()
        for feed in feeds:
            loop.add_reader(feed.fileno(), self._readable, key, feed)
        self._watches[key] = _Watch(netns, identity, feeds)
        log.debug("netns_watch_opened", key=key, netns=netns, watched=len(self._watches))
        if not check_follows:
            self._enqueue(key)

    def _readable(self, key: str, feed: Feed) -> None:
        try:
            due = feed.read()
        except OSError as exc:
            log.warning("netns_watch_failed", key=key, source=feed.kind, reason=str(exc))
            self._close(key, reason="socket_error")
            self._enqueue(key)  # its run opens a new watch
            return
        if due:
            log.debug("netns_changed", key=key, source=feed.kind)
            self._enqueue(key)

    def _close(self, key: str, *, reason: str) -> None:
        watch = self._watches.pop(key)
        for feed in watch.feeds:
            if self._loop is not None:
                self._loop.remove_reader(feed.fileno())
            feed.close()
        log.debug(
            "netns_watch_closed",
            key=key,
            netns=watch.netns,
            reason=reason,
            sockets=len(watch.feeds),
            watched=len(self._watches),
        )

    def close(self) -> None:
        """Close every watch (the agent stops)."""
        for key in list(self._watches):
            self._close(key, reason="stopping")
