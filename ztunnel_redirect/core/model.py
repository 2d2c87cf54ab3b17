"""The data model shared by every layer: identities, pods, namespaces and redirection options.

Pure values: frozen dataclasses, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NewType

from ztunnel_redirect.core import constants

PodUid = NewType("PodUid", str)

MAX_UID: Final = 2**32 - 2
"""The largest valid uid: (uid_t)-1 means "no uid" to the kernel."""

IFNAMSIZ: Final = 16
"""Linux limit including the terminating NUL: a name has at most 15 characters."""
# Stricter than the kernel's dev_valid_name (which only refuses '/', ':' and whitespace): the
# name ends up inside an nft script, so anything that could quote, escape or comment is refused.
_INTERFACE_NAME: Final = re.compile(rf"[A-Za-z0-9_.@+-]{{1,{IFNAMSIZ - 1}}}")


def valid_interface_name(name: str) -> bool:
    """Whether Linux would accept `name` for a link and it is safe inside an nft script.

    The one rule for every interface name we take: the virtual-interfaces annotation, the CLI's
    `--virtual-interfaces` and `PodOptions` when rendered.
    """
    return name not in {".", ".."} and _INTERFACE_NAME.fullmatch(name) is not None


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class PodOptions:
    """Everything that shapes one pod's ruleset (docs/design.md §2). Equal options give equal
    rulesets."""

    ipv6: bool = True
    dns_capture: bool = True
    bypass_inbound: bool = False
    virtual_interfaces: tuple[str, ...] = ()
    probe_snat_v4: str = constants.PROBE_SNAT_V4
    probe_snat_v6: str = constants.PROBE_SNAT_V6


@dataclass(frozen=True)
class HostOptions:
    """Everything that shapes the host ruleset (docs/design.md §4)."""

    kubelet_uid: int
    ipv6: bool = True
    probe_snat_v4: str = constants.PROBE_SNAT_V4
    probe_snat_v6: str = constants.PROBE_SNAT_V6
    aws_branch_eni_probe: bool = True
    """The ip rules that let probes reach AWS branch-ENI pods (§4.5), where tcp_early_demux
    is 0."""


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


@dataclass(frozen=True)
class Pod:
    """The part of a Kubernetes pod that the agent acts on."""

    uid: PodUid
    name: str
    namespace: str
    node_name: str = ""
    ips: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    annotations: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    host_network: bool = False
    phase: str = "Running"
    service_account: str = "default"
    deleted: bool = False
    """True once the API sent DELETED for it (a terminating pod still drains through the mesh)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CniAddEvent:
    """A pod sandbox that the runtime has just set up (the plugin's ADD)."""

    netns: str
    """Path of the pod's network namespace as the host sees it, normalised."""
    pod_name: str
    pod_namespace: str
    ips: tuple[str, ...]
    """The pod's addresses from the primary CNI's result, in canonical text form."""
    pod_uid: PodUid | None = None
    """The UID the runtime passed (`K8S_POD_UID`); None when it passed none. It tells this pod from
    an earlier pod of the same name (a StatefulSet pod deleted and recreated)."""
