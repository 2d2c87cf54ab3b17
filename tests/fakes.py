"""Test doubles shared by several test modules."""

from __future__ import annotations

import asyncio

from ztunnel_redirect.core.errors import RetryableError
from ztunnel_redirect.core.model import CniAddEvent, Pod, PodUid
from ztunnel_redirect.kernel.netns import NetnsId


class FakeReconciler:
    """Takes CNI ADD events in place of the reconciler: records them, and can be told to fail
    or to wait for `release`."""

    def __init__(self) -> None:
        self.events: list[CniAddEvent] = []
        self.fail_with: BaseException | None = None
        self.release: asyncio.Event | None = None
        self.finished = asyncio.Event()

    async def on_add(self, event: CniAddEvent) -> None:
        self.events.append(event)
        if self.release is not None:
            await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.finished.set()


class AcceptingZtunnel:
    """`ports.Ztunnel` that accepts every pod, or refuses while `refuse` is set."""

    def __init__(self) -> None:
        self.added: list[PodUid] = []
        self.refuse = False

    async def add_workload(
        self, pod: Pod, netns_path: str, *, identity: NetnsId | None = None
    ) -> None:
        if self.refuse:
            raise RetryableError("nack")
        self.added.append(pod.uid)

    async def del_workload(self, uid: PodUid) -> None:
        if uid in self.added:
            self.added.remove(uid)


class Annotations:
    """`ports.StatusWriter` that keeps the last status of each pod."""

    def __init__(self) -> None:
        self.status: dict[PodUid, str | None] = {}

    async def set_redirection_status(self, pod: Pod, value: str | None) -> None:
        self.status[pod.uid] = value


class NoNetns:
    """`ports.NetnsLocator` that finds nothing (pods come with their netns from CNI ADD)."""

    async def locate(self, pod: Pod) -> str | None:
        return None


class Unobserved:
    """`ports.Observer` that keeps the failures it was told about."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def observe_reconcile(self, kind: str, seconds: float) -> None: ...
    def count_repair(self, reason: str) -> None: ...
    def count_failure(self, reason: str) -> None:
        self.failures.append(reason)

    def set_pods_enrolled(self, count: int) -> None: ...
