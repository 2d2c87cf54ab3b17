"""What the control layer needs from the layers around it, as Protocols (istio-cni's seams).

The reconciler and its helpers depend on these only; `agent.py` wires in the real ones (pod and
host rules on netns workers, the ZDS server, the Kubernetes client, the metrics), tests wire in
`testing.fakekernel` and small fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from ztunnel_redirect.core.drift import Drift
from ztunnel_redirect.core.model import HostOptions, Namespace, Pod, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId

__all__ = [
    "HostElements",
    "HostMigration",
    "HostReport",
    "HostRuleWriter",
    "Migration",
    "NetnsLocator",
    "NetnsSurvey",
    "Observer",
    "PassObserver",
    "PodReader",
    "PodRuleWriter",
    "StatusWriter",
    "Ztunnel",
    "ZtunnelLinks",
]

HostElements = Mapping[str, PodUid]
"""The host probe sets: pod IP -> pod UID."""


class PodRuleWriter(Protocol):
    """A pod's redirection in its netns (`podrules.PodRules`). `identity`: the netns the path
    must still name when it is opened, else NetnsNotFoundError and nothing is touched."""

    async def apply(
        self,
        netns: str,
        options: PodOptions,
        *,
        fresh: bool = False,
        identity: NetnsId | None = None,
    ) -> list[Drift]:
        """Install or repair; returns what differed. `fresh`: a pod never set up by us."""
        ...

    async def check(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> list[Drift]:
        """What differs from the desired state; writes nothing."""
        ...

    async def remove(self, netns: str, *, identity: NetnsId | None = None) -> list[str]: ...

    def forget(self, netns: str) -> None:
        """The netns is gone: drop what was remembered of it."""
        ...


class HostRuleWriter(Protocol):
    """The host table and its probe sets in the host netns (`hostrules.HostRules`)."""

    async def apply(
        self, options: HostOptions, elements: HostElements | None = None
    ) -> list[Drift]:
        """Bring the table (and, when given, the set elements) to the desired state."""
        ...

    async def add_pod(
        self, ips: Iterable[str], uid: PodUid, *, ipv6: bool, branch_eni_probe: bool = False
    ) -> None:
        """The pod's elements; with `branch_eni_probe`, its probe rules if it is an AWS
        branch-ENI pod."""
        ...

    async def remove_pod(
        self, ips: Iterable[str], uid: PodUid, *, branch_eni_probe: bool = False
    ) -> list[str]:
        """Remove the pod's elements whose IP and UID both match (with `branch_eni_probe`, their
        probe rules too); returns the IPs removed."""
        ...

    def installer(
        self, options: HostOptions, elements: HostElements
    ) -> Callable[[], Iterable[object]]:
        """A function that brings the host table to `options` and `elements` when run on a
        worker in the host netns (what the Istio host migration runs first)."""
        ...


class Ztunnel(Protocol):
    async def add_workload(
        self, pod: Pod, netns_path: str, *, identity: NetnsId | None = None
    ) -> None: ...
    async def del_workload(self, uid: PodUid) -> None:
        """Raises a RetryableError when a ztunnel nacked the Del or was lost before its ack."""
        ...


class ZtunnelLinks(Protocol):
    @property
    def live_connections(self) -> int:
        """ztunnel processes connected now (their snapshot acknowledged)."""
        ...


class StatusWriter(Protocol):
    async def set_redirection_status(self, pod: Pod, value: str | None) -> None: ...


class PodReader(Protocol):
    """The API, read directly (the cache may not have a pod or namespace yet)."""

    async def get_pod(self, namespace: str, name: str) -> Pod | None: ...
    async def get_namespace(self, name: str) -> Namespace | None: ...


class NetnsLocator(Protocol):
    async def locate(self, pod: Pod) -> str | None:
        """The path of a running pod's netns (the /proc scan), or None when not found yet."""
        ...


class NetnsSurvey(Protocol):
    async def find_all(self, pods: Collection[Pod]) -> dict[PodUid, str]:
        """The netns paths of those of `pods` that run, by one scan."""
        ...


class Migration(Protocol):
    async def migrate_pod(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> object:
        """Ours in place first, then Istio's iptables-backend rules removed (if any)."""
        ...


class HostReport(Protocol):
    @property
    def postponed(self) -> tuple[str, ...]: ...


class HostMigration(Protocol):
    async def migrate_host(
        self,
        netns: str,
        install: Callable[[], Iterable[object]],
        *,
        node_ips: Collection[str] = (),
    ) -> HostReport:
        """`install` first (on the worker in `netns`), then Istio's host rules go, unless some
        of `node_ips` are in Istio's probe sets and not in ours (`postponed`)."""
        ...


class Observer(Protocol):
    """What the control layer reports (metrics)."""

    def observe_reconcile(self, kind: str, seconds: float) -> None: ...
    def count_repair(self, reason: str) -> None: ...
    def count_failure(self, reason: str) -> None: ...
    def set_pods_enrolled(self, count: int) -> None: ...


class PassObserver(Protocol):
    """What a drift pass reports (metrics): how stale the state may be."""

    def set_ztunnel_connections(self, count: int) -> None: ...
    def mark_pass(self, at: float | None = None) -> None: ...
