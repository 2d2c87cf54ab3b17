"""Which pods are enrolled in ambient redirection, and with which options (docs/design.md §5, §2.3).

Pure: no I/O, no asyncio. The reconciler asks `EnrollmentPolicy.decide` for every pod event and
logs/counts the `Reason`; `EnrollmentPolicy.pod_options` turns the pod's annotations into the
`PodOptions` that shape its ruleset.

Which labels enroll a pod is Istio's enablement selectors (`AMBIENT_ENABLEMENT_SELECTOR`,
`labelselector`): a pod is enrolled when some entry's pod selector matches its labels and the
same entry's namespace selector matches its namespace's labels. The default is Istio's chart
default, which is the built-in rule (`istio.io/dataplane-mode=ambient` on the pod, or on its
namespace unless the pod has `istio.io/dataplane-mode=none`). The exclusions come first whatever
the selectors say (host network, sidecar, excluded namespaces, ztunnel and agent pods, ...).

The agent's own pods are recognised by a label selector (`agent_labels`, default
`app=ztunnel-redirect`) that only counts in the agent's namespace (`agent_namespace`, default the
system namespace). A name would change with every rollout of the DaemonSet, and a selector that
counted in any namespace would let a user's pod escape the mesh by copying the label.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.labelselector import DEFAULT_ENABLEMENT_SELECTORS, EnablementSelector
from ztunnel_redirect.core.model import Namespace, Pod, PodOptions, valid_interface_name

__all__ = [
    "AGENT_LABELS",
    "ZTUNNEL_LABELS",
    "Decision",
    "EnrollmentPolicy",
    "Reason",
    "parse_bool",
]

ZTUNNEL_LABELS: Final[Mapping[str, str]] = MappingProxyType({"app": "ztunnel"})
"""A pod with these labels in the system namespace is a ztunnel (Istio's `IsZtunnelPod`)."""
AGENT_LABELS: Final[Mapping[str, str]] = MappingProxyType({"app": "ztunnel-redirect"})
"""Default selector of the agent's own pods, in the agent's namespace."""

TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})

_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class Reason(enum.Enum):
    """Why a pod is or is not enrolled. Logged and counted: each value names one rule."""

    # The four below come from the enablement selectors; each says what it means by default.
    POD_LABEL = "pod_label"
    """Enrolled by an entry without a namespace selector (default: the pod has
    `istio.io/dataplane-mode=ambient`)."""
    NAMESPACE_LABEL = "namespace_label"
    """Enrolled by an entry with a namespace selector (default: its namespace has
    `istio.io/dataplane-mode=ambient`)."""
    OPTED_OUT = "opted_out"
    """Some entry's namespace selector matches its namespace, but no entry selects the pod
    (default: the namespace is ambient but the pod has `istio.io/dataplane-mode=none`)."""
    NOT_LABELLED = "not_labelled"
    """No entry selects the pod or its namespace (default: neither asks for ambient)."""
    HOST_NETWORK = "host_network"
    SIDECAR = "sidecar"
    """A sidecar was injected (`sidecar.istio.io/status`)."""
    EXCLUDED_NAMESPACE = "excluded_namespace"
    ZTUNNEL_POD = "ztunnel_pod"
    AGENT_POD = "agent_pod"
    TERMINAL = "terminal"
    """Phase Succeeded or Failed."""
    NO_IP = "no_ip"
    """It would be enrolled but has no IP yet: not yet, wait for an update."""
    OTHER_NODE = "other_node"
    DELETED = "deleted"


_ENROLLING: Final = frozenset({Reason.POD_LABEL, Reason.NAMESPACE_LABEL})


@dataclass(frozen=True)
class Decision:
    enrolled: bool
    reason: Reason

    @property
    def waiting(self) -> bool:
        """Not enrolled *yet*: the pod asks for ambient and will be once it has an IP."""
        return self.reason is Reason.NO_IP


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


def _has_labels(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def parse_bool(text: str) -> bool | None:
    """Parse like Go's `strconv.ParseBool`; None when the text is not one of its spellings."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


@dataclass(frozen=True)
class EnrollmentPolicy:
    """The node-wide enrollment settings and defaults of the per-pod options."""

    node_name: str
    exclude_namespaces: frozenset[str] = frozenset(constants.EXCLUDE_NAMESPACES)
    system_namespace: str = constants.SYSTEM_NAMESPACE
    agent_namespace: str | None = None
    """Where the agent's own pods run; None means the system namespace."""
    agent_labels: Mapping[str, str] = field(default_factory=lambda: AGENT_LABELS)
    """Selector of the agent's own pods (all must match); empty disables the check."""
    dns_capture: bool = True
    ipv6: bool = True
    probe_snat_v4: str = constants.PROBE_SNAT_V4
    probe_snat_v6: str = constants.PROBE_SNAT_V6
    enablement_selectors: tuple[EnablementSelector, ...] = DEFAULT_ENABLEMENT_SELECTORS
    """Istio's `AMBIENT_ENABLEMENT_SELECTOR`; the default is the built-in rule."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "agent_labels", _frozen(self.agent_labels))
        object.__setattr__(self, "exclude_namespaces", frozenset(self.exclude_namespaces))
        object.__setattr__(self, "enablement_selectors", tuple(self.enablement_selectors))

    def is_ztunnel_pod(self, pod: Pod) -> bool:
        return pod.namespace == self.system_namespace and _has_labels(pod.labels, ZTUNNEL_LABELS)

    def is_agent_pod(self, pod: Pod) -> bool:
        namespace = self.agent_namespace or self.system_namespace
        return (
            bool(self.agent_labels)
            and pod.namespace == namespace
            and _has_labels(pod.labels, self.agent_labels)
        )

    def decide(self, pod: Pod, namespace: Namespace | None) -> Decision:
        """Whether `pod` must be enrolled now. `namespace` None: not known (yet); only entries
        without a namespace selector can select the pod until it is (its arrival re-decides).

        Rules that never change while the pod lives come first, so that a pod that is never
        eligible is reported for that rule rather than for its labels.
        """
        reason = self._exclusion(pod)
        if reason is None:
            reason = self._selection(pod.labels, namespace)
        if reason in _ENROLLING and not pod.ips:
            reason = Reason.NO_IP
        return Decision(enrolled=reason in _ENROLLING, reason=reason)

    def enrolls_unlabelled_pods(self, namespace: Namespace) -> bool:
        """Whether a pod with no labels or annotations of its own is enrolled in `namespace`:
        the namespace is enrolled as a whole (the CNI plugin's decision file lists these, for the
        pods it does not know yet). By default: the namespace has `istio.io/dataplane-mode=ambient`
        and is not excluded."""
        if namespace.name in self.exclude_namespaces:
            return False
        return self._selection({}, namespace) in _ENROLLING

    def _exclusion(self, pod: Pod) -> Reason | None:
        # Ordered by what an operator would look at first; the first rule that applies is reported.
        checks = (
            (pod.deleted, Reason.DELETED),
            (pod.node_name != self.node_name, Reason.OTHER_NODE),
            (pod.phase in TERMINAL_PHASES, Reason.TERMINAL),
            (pod.host_network, Reason.HOST_NETWORK),
            (pod.namespace in self.exclude_namespaces, Reason.EXCLUDED_NAMESPACE),
            (self.is_ztunnel_pod(pod), Reason.ZTUNNEL_POD),
            (self.is_agent_pod(pod), Reason.AGENT_POD),
            (constants.SIDECAR_STATUS_ANNOTATION in pod.annotations, Reason.SIDECAR),
        )
        return next((reason for applies, reason in checks if applies), None)

    def _selection(self, labels: Mapping[str, str], namespace: Namespace | None) -> Reason:
        """What the enablement selectors say; the first entry that selects the pod names the
        reason (with the default, the pod's own label comes first)."""
        namespace_selected = False
        for entry in self.enablement_selectors:
            if entry.namespace.empty:
                if entry.pod.matches(labels):
                    return Reason.POD_LABEL
            elif namespace is not None and entry.namespace.matches(namespace.labels):
                if entry.pod.matches(labels):
                    return Reason.NAMESPACE_LABEL
                namespace_selected = True
        return Reason.OPTED_OUT if namespace_selected else Reason.NOT_LABELLED

    def pod_options(self, pod: Pod) -> tuple[PodOptions, list[str]]:
        """The options of `pod`'s ruleset, and a warning for each annotation value ignored.

        Unparsable values never fail the pod: they fall back to the default and the caller logs
        the warnings (they name the annotation and the value).
        """
        warnings: list[str] = []
        annotations = pod.annotations

        def flag(key: str, default: bool) -> bool:
            text = annotations.get(key)
            if text is None:
                return default
            value = parse_bool(text)
            if value is None:
                warnings.append(f"annotation {key}={text!r} is not a boolean; ignored")
                return default
            return value

        bypass_inbound = flag(constants.BYPASS_INBOUND_ANNOTATION, False)
        dns_capture = flag(constants.DNS_CAPTURE_ANNOTATION, self.dns_capture)

        interfaces: list[str] = []
        raw = annotations.get(constants.VIRTUAL_INTERFACES_ANNOTATION, "")
        for item in raw.split(","):
            name = item.strip()
            if not name or name in interfaces:
                continue
            if not valid_interface_name(name):
                warnings.append(
                    f"annotation {constants.VIRTUAL_INTERFACES_ANNOTATION}: {name!r} is not a"
                    " valid interface name; ignored"
                )
                continue
            interfaces.append(name)

        options = PodOptions(
            ipv6=self.ipv6,
            dns_capture=dns_capture,
            bypass_inbound=bypass_inbound,
            virtual_interfaces=tuple(interfaces),
            probe_snat_v4=self.probe_snat_v4,
            probe_snat_v6=self.probe_snat_v6,
        )
        return options, warnings
