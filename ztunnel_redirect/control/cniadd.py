"""A CNI ADD, from the plugin's event to a redirected pod (or a clear refusal).

The event names the pod by namespace and name, with the runtime's UID, netns and IPs. The pod is
resolved (the cache first, by UID or else by name; the API when the cache has none or a
namesake), the sandbox is recorded in the store, and the pod is handed to the keyed queue with
`handle_now`: the same run as for any other change of the pod, ahead of all background work and
behind the ADDs that came before it, whose outcome is the plugin's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Final

import structlog

from ztunnel_redirect.control.ports import PodReader
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.store import ClusterStore, Sandbox
from ztunnel_redirect.control.workqueue import MONOTONIC, Clock, KeyedQueue
from ztunnel_redirect.core.constants import MIRROR_ANNOTATION
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import RetryableError
from ztunnel_redirect.core.model import CniAddEvent, Pod
from ztunnel_redirect.kernel.netns import netns_id

__all__ = ["CniAdd", "PodStarts", "same_pod"]

log = structlog.get_logger(__name__)


def same_pod(pod: Pod, uid: str | None) -> bool:
    """Is `pod` the one the runtime's `K8S_POD_UID` names? Static pods: the kubelet's UID is the
    manifest hash, kept on the mirror pod's annotation."""
    return uid is None or pod.uid == uid or pod.annotations.get(MIRROR_ANNOTATION) == uid


SETTLE_S: Final = 0.1
"""How long no CNI ADD must have been answered for pod starts to count as paused: the sandboxes
of a burst reach the agent over tens of ms, with gaps in which none is being answered."""


class PodStarts:
    """The CNI ADDs being answered now: work that can wait for them (`quiet`) yields to them, so
    that a node starting many pods at once answers each sooner."""

    def __init__(self, *, clock: Clock = MONOTONIC, settle: float = SETTLE_S) -> None:
        self._clock = clock
        self._settle = settle
        self._count = 0
        self._last_end = -settle
        self._ended = asyncio.Event()

    def __len__(self) -> int:
        return self._count

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            self._last_end = self._clock.now()
            self._ended.set()

    async def quiet(self) -> None:
        """Until no ADD has been answered for `settle` seconds."""
        while True:
            if self._count:
                self._ended.clear()
                await self._ended.wait()
                continue
            rest = self._last_end + self._settle - self._clock.now()
            if rest <= 0:
                return
            await self._clock.sleep(rest)


class CniAdd:
    """Handles the CNI event server's ADD events (`cnievents.OnAdd`: pass `handle`)."""

    def __init__(
        self,
        *,
        store: ClusterStore,
        api: PodReader,
        policy: EnrollmentPolicy,
        queue: KeyedQueue[str],
        records: PodRecords,
        observe: Callable[[float], None],
        starts: PodStarts | None = None,
    ) -> None:
        """`observe(seconds)`: how long each event took to answer (a metric); `starts` counts
        the events being answered."""
        self._starts = PodStarts() if starts is None else starts
        self._store = store
        self._api = api
        self._policy = policy
        self._queue = queue
        self._records = records
        self._observe = observe

    async def handle(self, event: CniAddEvent) -> None:
        """Returns once the pod is redirected and accepted by ztunnel, or is not for the mesh;
        raises when that could not be done (the plugin fails the sandbox, the runtime retries)."""
        started = time.perf_counter()
        try:
            with self._starts.answering():
                await self._add(event)
        finally:
            self._observe(time.perf_counter() - started)

    async def _add(self, event: CniAddEvent) -> None:
        pod = await self._resolve(event)
        if event.pod_namespace not in self._store.namespaces:
            namespace = await self._api.get_namespace(event.pod_namespace)
            if namespace is not None:
                self._store.upsert_namespace(namespace)
        pod = dataclasses.replace(pod, ips=event.ips or pod.ips)
        decision = self._policy.decide(pod, self._store.namespace_of(pod))
        if not decision.enrolled:
            log.debug("cni_add_skipped", pod=pod.key, pod_uid=pod.uid, reason=decision.reason.value)
            return
        self._store.add_sandbox(pod, Sandbox(event.netns, netns_id(event.netns)))
        await self._queue.handle_now(pod.uid)
        if not self._records.accepted(pod.uid):
            raise RetryableError(f"pod {pod.key} is not accepted by ztunnel yet")

    async def _resolve(self, event: CniAddEvent) -> Pod:
        """The pod the event is for. The cache may still hold the namesake this sandbox replaces
        (a StatefulSet pod deleted and recreated): the API has the new one."""
        pod = self._store.pods.get(event.pod_uid) if event.pod_uid is not None else None
        if pod is None or (pod.namespace, pod.name) != (event.pod_namespace, event.pod_name):
            pod = self._store.find(event.pod_namespace, event.pod_name)
        if pod is None or not same_pod(pod, event.pod_uid):
            pod = await self._api.get_pod(event.pod_namespace, event.pod_name)
        if pod is None:
            raise RetryableError(f"pod {event.pod_namespace}/{event.pod_name} not found in the API")
        if not same_pod(pod, event.pod_uid):
            raise RetryableError(
                f"pod {event.pod_namespace}/{event.pod_name} is {pod.uid} in the API; "
                f"the sandbox is for {event.pod_uid}"
            )
        return pod
