"""Label selectors as Kubernetes matches them, and parsing Istio's enablement selectors."""

from __future__ import annotations

import pytest
import yaml

from ztunnel_redirect.core.labelselector import (
    DEFAULT_ENABLEMENT_SELECTORS,
    EnablementSelector,
    LabelSelector,
    Operator,
    Requirement,
    SelectorError,
    parse_enablement_selectors,
)

# Istio's chart default for ambient.enablementSelectors, as `toYaml` renders it (block style).
CHART_DEFAULT = """\
- podSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
- namespaceSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
  podSelector:
    matchExpressions:
    - key: istio.io/dataplane-mode
      operator: NotIn
      values:
      - none
"""


def _selector(text: str) -> LabelSelector:
    """One label selector written as YAML (the pod selector of a one-entry list)."""
    (entry,) = parse_enablement_selectors(yaml.safe_dump([{"podSelector": yaml.safe_load(text)}]))
    return entry.pod


WEB_NOT_DB = (
    "{matchLabels: {team: web}, matchExpressions: [{key: tier, operator: NotIn, values: [db]}]}"
)

# selector (YAML), labels, matches
MATCHES: list[tuple[str, dict[str, str], bool]] = [
    ("{}", {}, True),
    ("{}", {"a": "1"}, True),
    ("{matchLabels: {a: '1'}}", {"a": "1"}, True),
    ("{matchLabels: {a: '1'}}", {"a": "2"}, False),
    ("{matchLabels: {a: '1'}}", {}, False),
    ("{matchLabels: {a: '1', b: x}}", {"a": "1"}, False),
    ("{matchLabels: {a: '1', b: x}}", {"a": "1", "b": "x", "c": "y"}, True),
    ("{matchLabels: {a: ''}}", {"a": ""}, True),
    ("{matchExpressions: [{key: a, operator: In, values: [x, y]}]}", {"a": "y"}, True),
    ("{matchExpressions: [{key: a, operator: In, values: [x, y]}]}", {"a": "z"}, False),
    ("{matchExpressions: [{key: a, operator: In, values: [x, y]}]}", {}, False),
    ("{matchExpressions: [{key: a, operator: NotIn, values: [x]}]}", {"a": "y"}, True),
    ("{matchExpressions: [{key: a, operator: NotIn, values: [x]}]}", {"a": "x"}, False),
    ("{matchExpressions: [{key: a, operator: NotIn, values: [x]}]}", {}, True),
    ("{matchExpressions: [{key: a, operator: Exists}]}", {"a": ""}, True),
    ("{matchExpressions: [{key: a, operator: Exists}]}", {"b": "x"}, False),
    ("{matchExpressions: [{key: a, operator: DoesNotExist}]}", {"b": "x"}, True),
    ("{matchExpressions: [{key: a, operator: DoesNotExist}]}", {"a": ""}, False),
    (
        WEB_NOT_DB,
        {"team": "web", "tier": "db"},
        False,
    ),
    (
        WEB_NOT_DB,
        {"team": "web", "tier": "front"},
        True,
    ),
    ("{matchLabels: {example.com/team: web}}", {"example.com/team": "web"}, True),
    ("{matchLabels: null, matchExpressions: null}", {"a": "1"}, True),
]


@pytest.mark.parametrize(("text", "labels", "matches"), MATCHES)
def test_matches_as_kubernetes_does(text: str, labels: dict[str, str], matches: bool) -> None:
    assert _selector(text).matches(labels) is matches


def test_the_chart_default_is_the_built_in_rule() -> None:
    assert parse_enablement_selectors(CHART_DEFAULT) == DEFAULT_ENABLEMENT_SELECTORS


def test_flow_style_and_json_parse_the_same() -> None:
    flow = (
        "[{podSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}},"
        " {podSelector: {matchExpressions: [{key: istio.io/dataplane-mode, operator: NotIn,"
        " values: [none]}]}, namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}}]"
    )
    as_json = yaml.safe_load(CHART_DEFAULT)
    assert parse_enablement_selectors(flow) == DEFAULT_ENABLEMENT_SELECTORS
    assert parse_enablement_selectors(str(as_json).replace("'", '"')) == (
        DEFAULT_ENABLEMENT_SELECTORS
    )


def test_absent_selectors_are_empty_and_an_empty_list_selects_nothing() -> None:
    assert parse_enablement_selectors("- {}\n- podSelector: null\n") == (
        EnablementSelector(),
        EnablementSelector(),
    )
    assert parse_enablement_selectors("[]") == ()


def test_requirements_keep_their_operator_and_values() -> None:
    (entry,) = parse_enablement_selectors(
        "- namespaceSelector:\n"
        "    matchExpressions:\n"
        "    - {key: team, operator: In, values: [a, b]}\n"
        "    - {key: legacy, operator: DoesNotExist}\n"
    )
    assert entry.pod.empty
    assert entry.namespace == LabelSelector(
        (
            Requirement("team", Operator.IN, frozenset({"a", "b"})),
            Requirement("legacy", Operator.DOES_NOT_EXIST),
        )
    )


# text, what the message must say
INVALID: list[tuple[str, str]] = [
    ("- podSelector: {matchLabels: [", "is not valid YAML at line 1"),
    ("", "must be a YAML list"),
    ("null", "must be a YAML list"),
    ("podSelector: {}", "must be a YAML list"),
    ("- not-a-mapping", "entry 0 must be a mapping"),
    ("- podselector: {}", "entry 0 has unknown key 'podselector'"),
    (
        "- podSelector: {matchExpression: [{key: a, operator: Exists}]}",
        "entry 0: podSelector has unknown key 'matchExpression'",
    ),
    (
        "- {}\n- namespaceSelector: {matchExpressions: [{key: a, operator: in, values: [x]}]}",
        "entry 1: namespaceSelector.matchExpressions[0].operator 'in' is not one of In, NotIn",
    ),
    (
        "- podSelector: {matchExpressions: [{key: a, operator: In}]}",
        "values must not be empty for operator In",
    ),
    (
        "- podSelector: {matchExpressions: [{key: a, operator: NotIn, values: []}]}",
        "values must not be empty for operator NotIn",
    ),
    (
        "- podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}",
        "values must be empty for operator Exists",
    ),
    (
        "- podSelector: {matchExpressions: [{operator: Exists}]}",
        "matchExpressions[0].key must be a string, not None",
    ),
    (
        "- podSelector: {matchExpressions: [{key: a}]}",
        "matchExpressions[0].operator must be a string",
    ),
    (
        "- podSelector: {matchExpressions: [{key: a, operator: Exists, value: [x]}]}",
        "has unknown key 'value'",
    ),
    ("- podSelector: {matchLabels: {a: true}}", "must be a string, not True (quote values"),
    ("- podSelector: {matchLabels: {a: 1}}", "must be a string, not 1"),
    ("- podSelector: {matchLabels: {'-a': x}}", "matchLabels key '-a' must be at most 63"),
    ("- podSelector: {matchLabels: {'Ex.com/a': x}}", "has a prefix that is not a DNS subdomain"),
    ("- podSelector: {matchLabels: {'/a': x}}", "has an empty prefix"),
    ("- podSelector: {matchLabels: {" + "a" * 64 + ": x}}", "must be at most 63"),
    ("- podSelector: {matchLabels: {a: 'x y'}}", "'x y' must be empty or at most 63"),
    ("- podSelector: {matchLabels: {a: " + "v" * 64 + "}}", "must be empty or at most 63"),
    ("- podSelector: {matchExpressions: {key: a}}", "matchExpressions must be a list"),
    (
        "- podSelector: {matchExpressions: [{key: a, operator: In, values: x}]}",
        "values must be a list",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_an_invalid_selector_is_refused_saying_where(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_enablement_selectors(text)
    assert message in str(caught.value)
