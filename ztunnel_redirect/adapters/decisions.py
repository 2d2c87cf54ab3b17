"""The CNI plugin's decision file: what the agent decided, for the plugin to read while the agent
does not answer (format and decision table: cniplugin/README.md).

`render` is pure: the file's bytes from the pods of this node and the namespaces the agent knows,
decided by the enrollment policy (so enablement selectors reach the file with no code here).
`DecisionFile.refresh` renders and writes it atomically (temporary file in the same directory,
fsync, rename), mode 0600, owned by the agent (root), only when its bytes change: the agent may
call it on every pod or namespace change. The file stays when the agent stops (that is when it is
read); `remove` is for `cleanup`.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.model import Namespace, Pod, PodUid

__all__ = [
    "FORMAT_VERSION",
    "AgentPods",
    "DecisionFile",
    "DecisionKeeper",
    "agent_pods_of",
    "render",
]

log = structlog.get_logger(__name__)

FORMAT_VERSION: Final = 1
_MODE: Final = 0o600
_PLACEHOLDER_IP: Final = ("192.0.2.1",)
"""An address for the unlabelled pod that asks whether a namespace is enrolled as a whole (the
rules' "waiting for an IP" must not hide the answer); TEST-NET-1, never a real pod's."""


@dataclass(frozen=True)
class AgentPods:
    """How the plugin recognises the agent's own pods: in `namespace`, named `name_prefix` and
    at least one more character."""

    namespace: str
    name_prefix: str


def agent_pods_of(namespace: str, pod_name: str | None) -> AgentPods | None:
    """The agent's pods from its own: a DaemonSet's pods are `<daemonset>-<suffix>`, so the
    prefix is the name up to and with its last `-`. None (nothing to recognise) without a name
    or a `-` in it."""
    if not pod_name or "-" not in pod_name.strip("-"):
        return None
    return AgentPods(namespace, pod_name[: pod_name.rindex("-") + 1])


def _enrolls_namespace(policy: EnrollmentPolicy, namespace: Namespace) -> bool:
    """Whether a pod with no labels or annotations of its own, on this node, is enrolled in
    `namespace`: the plugin fails such an unknown pod closed while the agent is down."""
    probe = Pod(
        uid=PodUid(""),
        name="",
        namespace=namespace.name,
        node_name=policy.node_name,
        ips=_PLACEHOLDER_IP,
    )
    return policy.decide(probe, namespace).enrolled


def render(
    policy: EnrollmentPolicy,
    pods: Mapping[PodUid, Pod],
    namespaces: Mapping[str, Namespace],
    *,
    agent_pods: AgentPods | None,
) -> bytes:
    """The decision file's content. `pods`: this node's pods (others are left out); a pod in the
    mesh includes one waiting for its IP. Sorted throughout, so equal decisions are equal bytes."""
    entries: dict[str, dict[str, Any]] = {}
    for uid, pod in sorted(pods.items()):
        if pod.deleted or pod.node_name != policy.node_name:
            continue
        decision = policy.decide(pod, namespaces.get(pod.namespace))
        entries[uid] = {
            "namespace": pod.namespace,
            "name": pod.name,
            "in_mesh": decision.enrolled or decision.waiting,
        }
    content = {
        "version": FORMAT_VERSION,
        "exclude_namespaces": sorted(policy.exclude_namespaces),
        "enrolled_namespaces": sorted(
            name for name, ns in namespaces.items() if _enrolls_namespace(policy, ns)
        ),
        "agent_pods": []
        if agent_pods is None
        else [{"namespace": agent_pods.namespace, "name_prefix": agent_pods.name_prefix}],
        "pods": entries,
    }
    return (json.dumps(content, indent=1, sort_keys=True) + "\n").encode()


class DecisionFile:
    """The decision file at `path`, kept equal to what the agent decides. Blocking file I/O on
    a change (a few hundred bytes per pod); nothing when nothing changed."""

    def __init__(
        self, path: Path, policy: EnrollmentPolicy, *, agent_pods: AgentPods | None
    ) -> None:
        self.path = path
        self._policy = policy
        self._agent_pods = agent_pods
        self._written: bytes | None = None

    def render(self, pods: Mapping[PodUid, Pod], namespaces: Mapping[str, Namespace]) -> bytes:
        return render(self._policy, pods, namespaces, agent_pods=self._agent_pods)

    def refresh(self, pods: Mapping[PodUid, Pod], namespaces: Mapping[str, Namespace]) -> bool:
        """Write the file if its content changed (or it is not ours as written); returns whether
        it was written."""
        return self.store(self.render(pods, namespaces))

    def store(self, data: bytes) -> bool:
        """Write `data` (from `render`) if it differs from the file; returns whether it did."""
        if data == self._written and self._intact():
            return False
        self._write(data)
        self._written = data
        log.debug("cni_decisions_written", file=str(self.path), pods=data.count(b'"in_mesh"'))
        return True

    def remove(self) -> bool:
        """Delete the file (uninstall); whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self._written = None
        return True

    def _intact(self) -> bool:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return False
        return st.st_mode & 0o7777 == _MODE and st.st_uid == os.geteuid()

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _MODE)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


Snapshot = Callable[[], tuple[Mapping[PodUid, Pod], Mapping[str, Namespace]]]
"""This node's pods and the namespaces, as the agent knows them now."""


MIN_INTERVAL: Final = 0.1
"""Seconds between two renders while changes keep coming (a render of 1000 pods costs about
5 ms of the event loop): a storm of pod events costs at most ~5% of the loop here."""


class DecisionKeeper:
    """Keeps the decision file current from the event loop: `changed()` after any change to the
    pods or namespaces (cheap, call it for every one). The first change is rendered at once;
    changes that come while that is written coalesce into one more render, at most every
    `min_interval`. A render is taken on the loop (a consistent view), the write in a thread.
    Failures are logged and the next change tries again: the file is a fallback, it never stops
    the agent."""

    def __init__(
        self, file: DecisionFile, snapshot: Snapshot, *, min_interval: float = MIN_INTERVAL
    ) -> None:
        self.file = file
        self._snapshot = snapshot
        self._min_interval = min_interval
        self._dirty = False
        self._started = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Write from now on, and now: call it once the agent's view is complete (the initial
        lists synced); a file from a partial view would let pods start unredirected."""
        self._started = True
        self.changed()

    def changed(self) -> None:
        self._dirty = True
        if not self._started:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="cni-decisions")

    async def settled(self) -> None:
        """Until every change so far is in the file (or failed to get there)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _flush(self) -> None:
        while True:
            self._dirty = False
            data = self.file.render(*self._snapshot())
            try:
                await asyncio.to_thread(self.file.store, data)
            except OSError as exc:
                log.warning("cni_decisions_write_failed", file=str(self.file.path), error=str(exc))
            if not self._dirty:
                return
            await asyncio.sleep(self._min_interval)  # rate, not a wait for a condition
