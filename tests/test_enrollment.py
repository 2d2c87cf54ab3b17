"""Enrollment rules (docs/design.md §5) and per-pod options (docs/design.md §2), table-driven; the
rules with the default enablement selectors and with custom ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.enrollment import (
    Decision,
    EnrollmentPolicy,
    Reason,
    parse_bool,
)
from ztunnel_redirect.core.labelselector import EnablementSelector, parse_enablement_selectors
from ztunnel_redirect.core.model import Namespace, Pod, PodOptions, PodUid, valid_interface_name

NODE = "node-a"
AMBIENT = {constants.ENROLL_LABEL: constants.ENROLL_VALUE}
NONE = {constants.ENROLL_LABEL: constants.OPT_OUT_VALUE}
POLICY = EnrollmentPolicy(node_name=NODE)


def pod(
    *,
    namespace: str = "app",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    **kwargs: object,
) -> Pod:
    fields: dict[str, object] = {
        "uid": PodUid("11111111-2222-3333-4444-555555555555"),
        "name": "web-0",
        "namespace": namespace,
        "node_name": NODE,
        "ips": ("10.244.0.2",),
        "labels": labels or {},
        "annotations": annotations or {},
    }
    fields.update(kwargs)
    return Pod(**fields)  # type: ignore[arg-type]


def ns(name: str = "app", labels: Mapping[str, str] | None = None) -> Namespace:
    return Namespace(name=name, labels=labels or {})


DECISIONS = [
    ("pod label", pod(labels=AMBIENT), ns(), True, Reason.POD_LABEL),
    ("pod label, namespace unknown", pod(labels=AMBIENT), None, True, Reason.POD_LABEL),
    ("namespace label", pod(), ns(labels=AMBIENT), True, Reason.NAMESPACE_LABEL),
    (
        "namespace label, pod opts out",
        pod(labels=NONE),
        ns(labels=AMBIENT),
        False,
        Reason.OPTED_OUT,
    ),
    ("pod label in unlabelled namespace", pod(labels=AMBIENT), ns(), True, Reason.POD_LABEL),
    (
        "pod label beats namespace none",
        pod(labels=AMBIENT),
        ns(labels=NONE),
        True,
        Reason.POD_LABEL,
    ),
    ("nothing labelled", pod(), ns(), False, Reason.NOT_LABELLED),
    ("namespace none", pod(), ns(labels=NONE), False, Reason.NOT_LABELLED),
    ("namespace unknown", pod(), None, False, Reason.NOT_LABELLED),
    (
        "namespace other value",
        pod(),
        ns(labels={constants.ENROLL_LABEL: "sidecar"}),
        False,
        Reason.NOT_LABELLED,
    ),
    (
        "host network",
        pod(labels=AMBIENT, host_network=True),
        ns(labels=AMBIENT),
        False,
        Reason.HOST_NETWORK,
    ),
    (
        "sidecar injected",
        pod(labels=AMBIENT, annotations={constants.SIDECAR_STATUS_ANNOTATION: "{}"}),
        ns(labels=AMBIENT),
        False,
        Reason.SIDECAR,
    ),
    (
        "excluded namespace, even labelled",
        pod(namespace="kube-system", labels=AMBIENT),
        ns("kube-system", labels=AMBIENT),
        False,
        Reason.EXCLUDED_NAMESPACE,
    ),
    (
        "ztunnel pod",
        pod(namespace="istio-system", labels={"app": "ztunnel", **AMBIENT}),
        ns("istio-system", labels=AMBIENT),
        False,
        Reason.ZTUNNEL_POD,
    ),
    (
        "app=ztunnel outside the system namespace is an ordinary pod",
        pod(labels={"app": "ztunnel"}),
        ns(labels=AMBIENT),
        True,
        Reason.NAMESPACE_LABEL,
    ),
    (
        "agent pod",
        pod(namespace="istio-system", labels={"app": "ztunnel-redirect", **AMBIENT}),
        ns("istio-system", labels=AMBIENT),
        False,
        Reason.AGENT_POD,
    ),
    (
        "agent label outside the agent namespace is an ordinary pod",
        pod(labels={"app": "ztunnel-redirect"}),
        ns(labels=AMBIENT),
        True,
        Reason.NAMESPACE_LABEL,
    ),
    ("succeeded", pod(labels=AMBIENT, phase="Succeeded"), ns(), False, Reason.TERMINAL),
    ("failed", pod(labels=AMBIENT, phase="Failed"), ns(), False, Reason.TERMINAL),
    ("pending with an IP", pod(labels=AMBIENT, phase="Pending"), ns(), True, Reason.POD_LABEL),
    ("no IP yet", pod(labels=AMBIENT, ips=()), ns(), False, Reason.NO_IP),
    ("no IP, namespace label", pod(ips=()), ns(labels=AMBIENT), False, Reason.NO_IP),
    ("no IP and not labelled", pod(ips=()), ns(), False, Reason.NOT_LABELLED),
    ("other node", pod(labels=AMBIENT, node_name="node-b"), ns(), False, Reason.OTHER_NODE),
    ("not scheduled", pod(labels=AMBIENT, node_name=""), ns(), False, Reason.OTHER_NODE),
    ("deleted", pod(labels=AMBIENT, deleted=True), ns(), False, Reason.DELETED),
]


@pytest.mark.parametrize(
    ("the_pod", "namespace", "enrolled", "reason"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide(the_pod: Pod, namespace: Namespace | None, enrolled: bool, reason: Reason) -> None:
    assert POLICY.decide(the_pod, namespace) == Decision(enrolled=enrolled, reason=reason)


def test_every_reason_is_covered_by_the_table() -> None:
    assert {case[4] for case in DECISIONS} == set(Reason)


def test_only_no_ip_is_waiting() -> None:
    assert POLICY.decide(pod(labels=AMBIENT, ips=()), ns()).waiting
    assert not POLICY.decide(pod(labels=AMBIENT), ns()).waiting
    assert not POLICY.decide(pod(), ns()).waiting


def test_excluded_namespaces_are_configurable() -> None:
    policy = EnrollmentPolicy(node_name=NODE, exclude_namespaces=frozenset({"app"}))
    assert policy.decide(pod(labels=AMBIENT), ns()).reason is Reason.EXCLUDED_NAMESPACE
    in_kube_system = pod(namespace="kube-system", labels=AMBIENT)
    assert policy.decide(in_kube_system, ns("kube-system")).enrolled


def test_system_namespace_is_configurable() -> None:
    policy = EnrollmentPolicy(node_name=NODE, system_namespace="mesh")
    ztunnel = pod(namespace="mesh", labels={"app": "ztunnel", **AMBIENT})
    assert policy.decide(ztunnel, ns("mesh")).reason is Reason.ZTUNNEL_POD
    agent = pod(namespace="mesh", labels={"app": "ztunnel-redirect", **AMBIENT})
    assert policy.decide(agent, ns("mesh")).reason is Reason.AGENT_POD
    old_system = pod(namespace="istio-system", labels={"app": "ztunnel", **AMBIENT})
    assert policy.decide(old_system, ns("istio-system")).enrolled


def test_agent_selector_and_namespace_are_configurable() -> None:
    policy = EnrollmentPolicy(
        node_name=NODE, agent_namespace="ops", agent_labels={"k8s-app": "redirect"}
    )
    agent = pod(namespace="ops", labels={"k8s-app": "redirect", **AMBIENT})
    assert policy.decide(agent, ns("ops")).reason is Reason.AGENT_POD
    default_label = pod(namespace="ops", labels={"app": "ztunnel-redirect", **AMBIENT})
    assert policy.decide(default_label, ns("ops")).enrolled


def test_empty_agent_selector_matches_nothing() -> None:
    policy = EnrollmentPolicy(node_name=NODE, agent_labels={})
    anything = pod(namespace="istio-system", labels=AMBIENT)
    assert policy.decide(anything, ns("istio-system")).enrolled


# A label change on the pod or its namespace: (pod, namespace) before and after, and whether the
# pod is enrolled before and after.
State = tuple[Pod, Namespace]
LABEL_CHANGES: list[tuple[str, State, State, tuple[bool, bool]]] = [
    ("namespace labelled", (pod(), ns()), (pod(), ns(labels=AMBIENT)), (False, True)),
    ("namespace unlabelled", (pod(), ns(labels=AMBIENT)), (pod(), ns()), (True, False)),
    (
        "namespace set to none",
        (pod(), ns(labels=AMBIENT)),
        (pod(), ns(labels=NONE)),
        (True, False),
    ),
    ("pod labelled", (pod(), ns()), (pod(labels=AMBIENT), ns()), (False, True)),
    ("pod unlabelled", (pod(labels=AMBIENT), ns()), (pod(), ns()), (True, False)),
    (
        "pod opts out",
        (pod(), ns(labels=AMBIENT)),
        (pod(labels=NONE), ns(labels=AMBIENT)),
        (True, False),
    ),
    (
        "pod opt-out removed",
        (pod(labels=NONE), ns(labels=AMBIENT)),
        (pod(), ns(labels=AMBIENT)),
        (False, True),
    ),
    (
        "pod label kept while namespace unlabelled",
        (pod(labels=AMBIENT), ns(labels=AMBIENT)),
        (pod(labels=AMBIENT), ns()),
        (True, True),
    ),
    (
        "pod gets an IP",
        (pod(labels=AMBIENT, ips=()), ns()),
        (pod(labels=AMBIENT), ns()),
        (False, True),
    ),
]


@pytest.mark.parametrize(
    ("before", "after", "enrolled"),
    [case[1:] for case in LABEL_CHANGES],
    ids=[case[0] for case in LABEL_CHANGES],
)
def test_label_changes(before: State, after: State, enrolled: tuple[bool, bool]) -> None:
    assert POLICY.decide(*before).enrolled is enrolled[0]
    assert POLICY.decide(*after).enrolled is enrolled[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(t, True) for t in ("1", "t", "T", "TRUE", "true", "True")],
        *[(t, False) for t in ("0", "f", "F", "FALSE", "false", "False")],
        *[(t, None) for t in ("", "yes", "no", "tRUE", " true", "true ", "2", "on", "enabled")],
    ],
)
def test_parse_bool_like_go(text: str, expected: bool | None) -> None:
    assert parse_bool(text) is expected


def options_of(annotations: Mapping[str, str], policy: EnrollmentPolicy = POLICY) -> PodOptions:
    options, warnings = policy.pod_options(pod(labels=AMBIENT, annotations=annotations))
    assert warnings == []
    return options


def test_options_default_from_policy() -> None:
    policy = EnrollmentPolicy(
        node_name=NODE,
        dns_capture=False,
        ipv6=False,
        probe_snat_v4="169.254.0.9",
        probe_snat_v6="fd00::9",
    )
    assert options_of({}, policy) == PodOptions(
        ipv6=False,
        dns_capture=False,
        bypass_inbound=False,
        virtual_interfaces=(),
        probe_snat_v4="169.254.0.9",
        probe_snat_v6="fd00::9",
    )
    assert options_of({}) == PodOptions()


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("False", False)])
def test_bypass_inbound_annotation(text: str, expected: bool) -> None:
    assert options_of({constants.BYPASS_INBOUND_ANNOTATION: text}).bypass_inbound is expected


@pytest.mark.parametrize("global_dns", [True, False])
@pytest.mark.parametrize("text", ["true", "false"])
def test_dns_capture_annotation_overrides_global(global_dns: bool, text: str) -> None:
    policy = EnrollmentPolicy(node_name=NODE, dns_capture=global_dns)
    options = options_of({constants.DNS_CAPTURE_ANNOTATION: text}, policy)
    assert options.dns_capture is (text == "true")


@pytest.mark.parametrize("global_dns", [True, False])
def test_unparsable_boolean_is_ignored_with_a_warning(global_dns: bool) -> None:
    policy = EnrollmentPolicy(node_name=NODE, dns_capture=global_dns)
    the_pod = pod(
        annotations={
            constants.DNS_CAPTURE_ANNOTATION: "yes",
            constants.BYPASS_INBOUND_ANNOTATION: "maybe",
        }
    )
    options, warnings = policy.pod_options(the_pod)
    assert options.dns_capture is global_dns
    assert options.bypass_inbound is False
    assert len(warnings) == 2
    assert any(constants.DNS_CAPTURE_ANNOTATION in w and "'yes'" in w for w in warnings)
    assert any(constants.BYPASS_INBOUND_ANNOTATION in w and "'maybe'" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("tun0", ("tun0",)),
        ("tun0,tun1", ("tun0", "tun1")),
        (" tun0 , tun1 ", ("tun0", "tun1")),
        ("tun0,,tun1,", ("tun0", "tun1")),
        (",, ,", ()),
        ("tun0,tun0", ("tun0",)),
        ("eth0.100,vlan@x,net1-a_b+c", ("eth0.100", "vlan@x", "net1-a_b+c")),
        ("abcdefghijklmno", ("abcdefghijklmno",)),
    ],
)
def test_virtual_interfaces_annotation(text: str, expected: tuple[str, ...]) -> None:
    options = options_of({constants.VIRTUAL_INTERFACES_ANNOTATION: text})
    assert options.virtual_interfaces == expected


@pytest.mark.parametrize(
    "bad",
    [
        "abcdefghijklmnop",  # 16 characters
        'tun"0',
        "tun'0",
        "tun 0\tx",
        "a/b",
        "a:b",
        ".",
        "..",
        "tun0;flush",
        "tun0}",
        "tün0",
        "tun\\0",
        "tun#0",
    ],
)
def test_invalid_interface_names_are_ignored_with_a_warning(bad: str) -> None:
    annotations = {constants.VIRTUAL_INTERFACES_ANNOTATION: f"tun0,{bad},tun1"}
    options, warnings = POLICY.pod_options(pod(annotations=annotations))
    assert not valid_interface_name(bad.strip())
    assert options.virtual_interfaces == ("tun0", "tun1")
    assert len(warnings) >= 1
    assert all(constants.VIRTUAL_INTERFACES_ANNOTATION in w for w in warnings)


def test_all_options_together() -> None:
    options = options_of(
        {
            constants.BYPASS_INBOUND_ANNOTATION: "T",
            constants.DNS_CAPTURE_ANNOTATION: "F",
            constants.VIRTUAL_INTERFACES_ANNOTATION: "tun0, net1",
        }
    )
    assert options == dataclasses.replace(
        PodOptions(), bypass_inbound=True, dns_capture=False, virtual_interfaces=("tun0", "net1")
    )


# --- custom enablement selectors (AMBIENT_ENABLEMENT_SELECTOR) -----------------------------------

# Pods labelled mesh=on in any namespace; every pod of a namespace of team web or api, unless the
# pod has legacy (any value); nothing on istio.io/dataplane-mode.
CUSTOM = parse_enablement_selectors(
    """\
- podSelector:
    matchLabels: {mesh: "on"}
- namespaceSelector:
    matchExpressions:
    - {key: team, operator: In, values: [web, api]}
  podSelector:
    matchExpressions:
    - {key: legacy, operator: DoesNotExist}
"""
)
CUSTOM_POLICY = EnrollmentPolicy(node_name=NODE, enablement_selectors=CUSTOM)
MESH_ON = {"mesh": "on"}
WEB = {"team": "web"}

SELECTED = [
    ("pod selector", pod(labels=MESH_ON), ns(), True, Reason.POD_LABEL),
    ("pod selector, namespace unknown", pod(labels=MESH_ON), None, True, Reason.POD_LABEL),
    ("pod selector, other value", pod(labels={"mesh": "off"}), ns(), False, Reason.NOT_LABELLED),
    ("namespace selector", pod(), ns(labels=WEB), True, Reason.NAMESPACE_LABEL),
    ("namespace selector, In", pod(), ns(labels={"team": "api"}), True, Reason.NAMESPACE_LABEL),
    ("namespace not selected", pod(), ns(labels={"team": "db"}), False, Reason.NOT_LABELLED),
    ("namespace unknown", pod(), None, False, Reason.NOT_LABELLED),
    (
        "pod excluded by DoesNotExist",
        pod(labels={"legacy": ""}),
        ns(labels=WEB),
        False,
        Reason.OPTED_OUT,
    ),
    (
        "pod selector wins over the namespace's exclusion",
        pod(labels={"legacy": "1", **MESH_ON}),
        ns(labels=WEB),
        True,
        Reason.POD_LABEL,
    ),
    (
        "istio.io/dataplane-mode=ambient means nothing here",
        pod(labels=AMBIENT),
        ns(labels=AMBIENT),
        False,
        Reason.NOT_LABELLED,
    ),
    (
        "istio.io/dataplane-mode=none means nothing here",
        pod(labels=NONE),
        ns(labels=WEB),
        True,
        Reason.NAMESPACE_LABEL,
    ),
    (
        "host network never matches",
        pod(labels=MESH_ON, host_network=True),
        ns(labels=WEB),
        False,
        Reason.HOST_NETWORK,
    ),
    (
        "sidecar never matches",
        pod(labels=MESH_ON, annotations={constants.SIDECAR_STATUS_ANNOTATION: "{}"}),
        ns(labels=WEB),
        False,
        Reason.SIDECAR,
    ),
    (
        "excluded namespace",
        pod(namespace="kube-system", labels=MESH_ON),
        ns("kube-system", labels=WEB),
        False,
        Reason.EXCLUDED_NAMESPACE,
    ),
    (
        "ztunnel pod",
        pod(namespace="istio-system", labels={"app": "ztunnel", **MESH_ON}),
        ns("istio-system", labels=WEB),
        False,
        Reason.ZTUNNEL_POD,
    ),
    ("no IP yet", pod(labels=MESH_ON, ips=()), ns(), False, Reason.NO_IP),
]


@pytest.mark.parametrize(
    ("the_pod", "namespace", "enrolled", "reason"),
    [case[1:] for case in SELECTED],
    ids=[case[0] for case in SELECTED],
)
def test_decide_with_custom_selectors(
    the_pod: Pod, namespace: Namespace | None, enrolled: bool, reason: Reason
) -> None:
    assert CUSTOM_POLICY.decide(the_pod, namespace) == Decision(enrolled=enrolled, reason=reason)


@pytest.mark.parametrize(
    ("the_pod", "namespace", "enrolled"),
    [
        (pod(), ns(), True),
        (pod(labels={"any": "thing"}), None, True),
        (pod(labels=NONE), ns(labels=AMBIENT), True),
        (pod(host_network=True), ns(), False),
        (pod(annotations={constants.SIDECAR_STATUS_ANNOTATION: "{}"}), ns(), False),
        (pod(namespace="kube-system"), ns("kube-system"), False),
    ],
)
def test_an_empty_entry_selects_every_eligible_pod(
    the_pod: Pod, namespace: Namespace | None, enrolled: bool
) -> None:
    policy = EnrollmentPolicy(node_name=NODE, enablement_selectors=(EnablementSelector(),))
    assert policy.decide(the_pod, namespace).enrolled is enrolled


def test_no_entry_selects_no_pod() -> None:
    policy = EnrollmentPolicy(node_name=NODE, enablement_selectors=())
    assert policy.decide(pod(labels=AMBIENT), ns(labels=AMBIENT)) == Decision(
        enrolled=False, reason=Reason.NOT_LABELLED
    )


def test_the_default_selectors_are_the_charts() -> None:
    assert POLICY.enablement_selectors == parse_enablement_selectors(
        """\
- podSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}
- podSelector: {matchExpressions: [{key: istio.io/dataplane-mode, operator: NotIn, values: [none]}]}
  namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}
"""
    )


@pytest.mark.parametrize(
    ("before", "after", "enrolled"),
    [
        ((pod(), ns()), (pod(), ns(labels=WEB)), (False, True)),
        ((pod(), ns(labels=WEB)), (pod(), ns(labels={"team": "db"})), (True, False)),
        ((pod(), ns(labels=WEB)), (pod(labels={"legacy": "y"}), ns(labels=WEB)), (True, False)),
        ((pod(), ns()), (pod(labels=MESH_ON), ns()), (False, True)),
    ],
    ids=["namespace relabelled in", "namespace relabelled out", "pod opts out", "pod opts in"],
)
def test_relabels_on_other_labels(before: State, after: State, enrolled: tuple[bool, bool]) -> None:
    assert CUSTOM_POLICY.decide(*before).enrolled is enrolled[0]
    assert CUSTOM_POLICY.decide(*after).enrolled is enrolled[1]


# namespace, (default policy, custom policy): does a pod without labels get enrolled there?
ENROLLED_NAMESPACES = [
    (ns(), (False, False)),
    (ns(labels=AMBIENT), (True, False)),
    (ns(labels=NONE), (False, False)),
    (ns(labels=WEB), (False, True)),
    (ns(labels={**WEB, **AMBIENT}), (True, True)),
    (ns("kube-system", labels={**WEB, **AMBIENT}), (False, False)),
]


@pytest.mark.parametrize(("namespace", "expected"), ENROLLED_NAMESPACES)
def test_enrolls_unlabelled_pods(namespace: Namespace, expected: tuple[bool, bool]) -> None:
    assert POLICY.enrolls_unlabelled_pods(namespace) is expected[0]
    assert CUSTOM_POLICY.enrolls_unlabelled_pods(namespace) is expected[1]
    # It is what decide says for such a pod.
    for policy, answer in zip((POLICY, CUSTOM_POLICY), expected, strict=True):
        unlabelled = pod(namespace=namespace.name)
        assert policy.decide(unlabelled, namespace).enrolled is answer


def test_a_pod_selector_alone_enrolls_every_namespace() -> None:
    policy = EnrollmentPolicy(
        node_name=NODE,
        enablement_selectors=parse_enablement_selectors(
            "- podSelector: {matchExpressions: [{key: opt-out, operator: DoesNotExist}]}"
        ),
    )
    assert policy.enrolls_unlabelled_pods(ns())
    assert not policy.enrolls_unlabelled_pods(ns("kube-system"))


def test_an_unknown_namespace_matches_no_namespace_selector() -> None:
    """Not even one that an unlabelled namespace would match: the namespace's labels are not
    known yet, and its arrival re-decides."""
    policy = EnrollmentPolicy(
        node_name=NODE,
        enablement_selectors=parse_enablement_selectors(
            "- namespaceSelector: {matchExpressions: [{key: legacy, operator: DoesNotExist}]}"
        ),
    )
    assert policy.decide(pod(), None) == Decision(enrolled=False, reason=Reason.NOT_LABELLED)
    assert policy.decide(pod(), ns()) == Decision(enrolled=True, reason=Reason.NAMESPACE_LABEL)
