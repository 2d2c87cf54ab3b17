"""The pods of this node and the namespaces, as the API says: the one writer of both.

Event handlers (the watch, a CNI ADD) only record what changed here; every change names the
keys whose desired state may differ now, and the store hands them to its subscriber (the keyed
queue), which runs the reconciler for each. Nothing here touches the kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ztunnel_redirect.core.model import Namespace, Pod, PodUid
from ztunnel_redirect.kernel.netns import NetnsId

__all__ = ["ClusterStore", "Sandbox"]


@dataclass(frozen=True)
class Sandbox:
    """A pod's new sandbox as the runtime reported it (CNI ADD)."""

    netns: str
    identity: NetnsId | None
    """What `netns` named when the event came (checked before each use)."""


def _ignore(_key: str) -> None:
    """No subscriber yet: changes are recorded, nobody is told."""


class ClusterStore:
    """Implements `kube.Store`. Read through the mappings; write through the methods only."""

    def __init__(self) -> None:
        self._notify: Callable[[str], None] = _ignore
        self._pods: dict[PodUid, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._deleted: dict[PodUid, Pod] = {}
        self._sandboxes: dict[PodUid, Sandbox] = {}

    def subscribe(self, notify: Callable[[str], None]) -> None:
        """`notify(key)` for every key that may need reconciling from now on (one subscriber)."""
        self._notify = notify

    def touch(self, key: str) -> None:
        """Have `key` looked at again although nothing here changed (e.g. its netns moved)."""
        self._notify(key)

    # --- reading ---

    @property
    def pods(self) -> Mapping[PodUid, Pod]:
        return MappingProxyType(self._pods)

    @property
    def namespaces(self) -> Mapping[str, Namespace]:
        return MappingProxyType(self._namespaces)

    @property
    def deleted(self) -> Mapping[PodUid, Pod]:
        """Pods gone from the API whose cleanup has not run yet (keeps their IPs)."""
        return MappingProxyType(self._deleted)

    @property
    def sandboxes(self) -> int:
        """Sandboxes reported by a CNI ADD and not taken by the reconciler yet."""
        return len(self._sandboxes)

    def has_sandbox(self, uid: PodUid) -> bool:
        """A CNI ADD reported a new sandbox of `uid` that the reconciler has not taken yet."""
        return uid in self._sandboxes

    def namespace_of(self, pod: Pod) -> Namespace | None:
        return self._namespaces.get(pod.namespace)

    def find(self, namespace: str, name: str) -> Pod | None:
        return next(
            (p for p in self._pods.values() if p.namespace == namespace and p.name == name), None
        )

    # --- what the reconciler takes over ---

    def take_deleted(self, uid: PodUid) -> Pod | None:
        """The deleted pod `uid`, once: its cleanup runs now."""
        return self._deleted.pop(uid, None)

    def take_sandbox(self, uid: PodUid) -> Sandbox | None:
        """The new sandbox a CNI ADD reported for `uid`, once: the reconciler uses it now."""
        return self._sandboxes.pop(uid, None)

    # --- the watch (kube.Store) ---

    def _with_known_ips(self, pod: Pod) -> Pod:
        """A running pod's IPs do not go away: until the kubelet reports the sandbox's IPs, the
        API shows none, while the CNI ADD already told us them. Keep what we know."""
        known = self._pods.get(pod.uid)
        if pod.ips or known is None or not known.ips:
            return pod
        return dataclasses.replace(pod, ips=known.ips)

    def replace_pods(self, pods: Sequence[Pod]) -> None:
        fresh = {pod.uid: self._with_known_ips(pod) for pod in pods}
        for uid in self._pods.keys() - fresh.keys():
            self._gone(self._pods[uid])
        changed = [uid for uid, pod in fresh.items() if self._pods.get(uid) != pod]
        self._pods = fresh
        for uid in changed:
            self._notify(uid)

    def upsert_pod(self, pod: Pod) -> None:
        pod = self._with_known_ips(pod)
        if self._pods.get(pod.uid) != pod:
            self._pods[pod.uid] = pod
            self._notify(pod.uid)

    def delete_pod(self, pod: Pod) -> None:
        self._gone(self._pods.pop(pod.uid, pod))

    def _gone(self, known: Pod) -> None:
        self._deleted[known.uid] = dataclasses.replace(known, deleted=True)
        self._sandboxes.pop(known.uid, None)
        self._notify(known.uid)

    def _namespace_changed(self, name: str) -> None:
        for pod in self._pods.values():
            if pod.namespace == name:
                self._notify(pod.uid)

    def replace_namespaces(self, namespaces: Sequence[Namespace]) -> None:
        fresh = {ns.name: ns for ns in namespaces}
        changed = {
            n
            for n in fresh.keys() | self._namespaces.keys()
            if fresh.get(n) != self._namespaces.get(n)
        }
        self._namespaces = fresh
        for name in changed:
            self._namespace_changed(name)

    def upsert_namespace(self, ns: Namespace) -> None:
        if self._namespaces.get(ns.name) != ns:
            self._namespaces[ns.name] = ns
            self._namespace_changed(ns.name)

    def delete_namespace(self, ns: Namespace) -> None:
        if self._namespaces.pop(ns.name, None) is not None:
            self._namespace_changed(ns.name)

    # --- the runtime (CNI ADD) ---

    def add_sandbox(self, pod: Pod, sandbox: Sandbox) -> None:
        """A new sandbox of `pod` (CNI ADD). Until the watch has seen the sandbox's IPs, the
        runtime's pod (with its IPs) is the truth; the sandbox is handed to the next run."""
        known = self._pods.get(pod.uid)
        if known is None or not known.ips:
            self._pods[pod.uid] = pod
        self._sandboxes[pod.uid] = sandbox
        self._notify(pod.uid)
