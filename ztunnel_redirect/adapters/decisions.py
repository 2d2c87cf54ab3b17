"""The CNI plugin's decision file: what the agent decided, for the plugin to read while the agent
does not answer (format and decision table: cniplugin/README.md).

`render` is pure: the file's bytes from the pods of this node and the namespaces the agent knows,
decided by the enrollment policy (so enablement selectors reach the file with no code here).
`Renderer` gives the same bytes deciding again only the pods and namespaces that changed since its
last render (a render runs on the event loop that answers CNI ADDs).
`DecisionFile.refresh` renders and writes it atomically (temporary file in the same directory,
rename; no fsync: the run directory does not outlive a boot), mode 0600, owned by the agent
(root), only when its bytes change: the agent may call it on every pod or namespace change. The
file stays when the agent stops (that is when it is read); `remove` is for `cleanup`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from ztunnel_redirect.adapters.atomicfile import write_atomically
from ztunnel_redirect.control.workqueue import wait_at_most
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.model import Namespace, Pod, PodUid

__all__ = [
    "FORMAT_VERSION",
    "AgentPods",
    "DecisionFile",
    "DecisionKeeper",
    "Renderer",
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


def _pod_line(policy: EnrollmentPolicy, pod: Pod, namespace: Namespace | None) -> str | None:
    """The pod's line in `pods` (its UID and decision), or None when it is not listed: deleted,
    or another node's. A pod in the mesh includes one waiting for its IP."""
    if pod.deleted or pod.node_name != policy.node_name:
        return None
    decision = policy.decide(pod, namespace)
    entry = {"in_mesh": decision.enrolled or decision.waiting, "name": pod.name}
    return f"  {json.dumps(pod.uid)}: {json.dumps(entry | {'namespace': pod.namespace})}"


class Renderer:
    """Renders the decision file, deciding again only what changed since its last render.

    The store's pods and namespaces are immutable values, replaced on every change: a pod whose
    `Pod` and `Namespace` objects are the ones of the last render keeps its line. A render of
    1000 pods with one changed costs a lookup per pod and a sort (well under a millisecond),
    where deciding and encoding them all cost several milliseconds of the event loop that
    answers CNI ADDs. Lines are JSON objects on their own, one pod per line, so the file is
    assembled from cached strings; equal decisions give equal bytes.
    """

    def __init__(self, policy: EnrollmentPolicy, *, agent_pods: AgentPods | None) -> None:
        self._policy = policy
        self._agent_pods = (
            []
            if agent_pods is None
            else [{"namespace": agent_pods.namespace, "name_prefix": agent_pods.name_prefix}]
        )
        self._pods: dict[PodUid, tuple[Pod, Namespace | None, str | None]] = {}
        self._namespaces: dict[str, tuple[Namespace, bool]] = {}

    def render(self, pods: Mapping[PodUid, Pod], namespaces: Mapping[str, Namespace]) -> bytes:
        """The decision file's content. `pods`: this node's pods (others are left out)."""
        lines: dict[PodUid, tuple[Pod, Namespace | None, str | None]] = {}
        for uid, pod in pods.items():
            namespace = namespaces.get(pod.namespace)
            known = self._pods.get(uid)
            if known is None or known[0] is not pod or known[1] is not namespace:
                known = (pod, namespace, _pod_line(self._policy, pod, namespace))
            lines[uid] = known
        self._pods = lines
        enrolled: dict[str, tuple[Namespace, bool]] = {}
        for name, ns in namespaces.items():
            seen = self._namespaces.get(name)
            enrolled[name] = (
                seen
                if seen is not None and seen[0] is ns
                else (ns, _enrolls_namespace(self._policy, ns))
            )
        self._namespaces = enrolled
        listed = [line for _, (_, _, line) in sorted(lines.items()) if line is not None]
        head = [
            ("version", FORMAT_VERSION),
            ("exclude_namespaces", sorted(self._policy.exclude_namespaces)),
            ("enrolled_namespaces", sorted(name for name, (_, yes) in enrolled.items() if yes)),
            ("agent_pods", self._agent_pods),
        ]
        text = "".join(f" {json.dumps(key)}: {json.dumps(value)},\n" for key, value in head)
        pods_text = "{\n" + ",\n".join(listed) + "\n }" if listed else "{}"
        return f'{{\n{text} "pods": {pods_text}\n}}\n'.encode()


def render(
    policy: EnrollmentPolicy,
    pods: Mapping[PodUid, Pod],
    namespaces: Mapping[str, Namespace],
    *,
    agent_pods: AgentPods | None,
) -> bytes:
    """The decision file's content, from nothing cached (`Renderer.render`)."""
    return Renderer(policy, agent_pods=agent_pods).render(pods, namespaces)


class DecisionFile:
    """The decision file at `path`, kept equal to what the agent decides. Blocking file I/O on
    a change (a few hundred bytes per pod); nothing when nothing changed."""

    def __init__(
        self, path: Path, policy: EnrollmentPolicy, *, agent_pods: AgentPods | None
    ) -> None:
        self.path = path
        self._renderer = Renderer(policy, agent_pods=agent_pods)
        self._written: bytes | None = None

    def render(self, pods: Mapping[PodUid, Pod], namespaces: Mapping[str, Namespace]) -> bytes:
        return self._renderer.render(pods, namespaces)

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
        write_atomically(self.path, data, mode=_MODE, durable=False)


Snapshot = Callable[[], tuple[Mapping[PodUid, Pod], Mapping[str, Namespace]]]
"""This node's pods and the namespaces, as the agent knows them now."""


MIN_INTERVAL: Final = 0.1
"""Seconds between two renders while changes keep coming: a render of 1000 pods with few
changed costs under half a millisecond of the event loop (6 ms when all are decided again, as
after a restart)."""
YIELD_LIMIT: Final = 1.0
"""The longest a render waits for pod starts to pause: the file falls at most this far behind a
node that starts pods without a pause."""


class DecisionKeeper:
    """Keeps the decision file current from the event loop: `changed()` after any change to the
    pods or namespaces (cheap, call it for every one). A render waits for pod starts to pause
    (`yield_to`, up to `YIELD_LIMIT`), then renders every change so far; changes that come while
    that is written coalesce into one more render, at most every `min_interval`. A render is
    taken on the loop (a consistent view), the write in a thread. Failures are logged and the
    next change tries again: the file is a fallback, it never stops the agent.

    Why renders yield: each one walks every pod of the node on the loop that answers CNI ADDs
    (under half a millisecond at 1000 pods), and every ADD changes a pod, so renders would fall
    between the ADDs of a burst of pod starts. The file is read only while the agent does not
    answer; a pod missing from it meanwhile is decided by its namespace (cniplugin/README.md)."""

    def __init__(
        self,
        file: DecisionFile,
        snapshot: Snapshot,
        *,
        min_interval: float = MIN_INTERVAL,
        yield_to: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`yield_to()`: returns when the work renders yield to has paused
        (`cniadd.PodStarts.quiet`)."""
        self.file = file
        self._snapshot = snapshot
        self._min_interval = min_interval
        self._yield_to = yield_to
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
            if self._yield_to is not None:
                await wait_at_most(self._yield_to, YIELD_LIMIT)
            self._dirty = False
            data = self.file.render(*self._snapshot())
            try:
                await asyncio.to_thread(self.file.store, data)
            except OSError as exc:
                log.warning("cni_decisions_write_failed", file=str(self.file.path), error=str(exc))
            if not self._dirty:
                return
            await asyncio.sleep(self._min_interval)  # rate, not a wait for a condition
