"""Kubernetes label selectors, and Istio's ambient enablement selectors built of them.

Pure: no I/O. `parse_enablement_selectors` reads what Istio's chart renders from
`ambient.enablementSelectors` with `toYaml`: a YAML list of `{podSelector, namespaceSelector}`,
each a Kubernetes `LabelSelector` (`matchLabels`, and `matchExpressions` with the operators `In`,
`NotIn`, `Exists`, `DoesNotExist`). A pod is selected when, for some entry, its labels match
`podSelector` and its namespace's labels match `namespaceSelector`; an empty (or absent) selector
matches everything, as in Kubernetes.

Checked as the API server checks a `LabelSelector` (label keys and values, values required for
`In`/`NotIn` and refused for `Exists`/`DoesNotExist`). Unlike Istio, which decodes leniently, an
unknown key is refused: a misspelt `matchExpression` would otherwise be dropped silently and leave
an empty selector, which matches every pod.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from ztunnel_redirect.core import constants, untrusted

__all__ = [
    "DEFAULT_ENABLEMENT_SELECTORS",
    "EnablementSelector",
    "LabelSelector",
    "Operator",
    "Requirement",
    "SelectorError",
    "parse_enablement_selectors",
]

_NAME: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_MAX_NAME: Final = 63
_MAX_PREFIX: Final = 253


class SelectorError(ValueError):
    """The text is not a valid list of enablement selectors; the message says which part."""


class Operator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    """One condition on one label (a `matchLabels` pair is `key In (value)`)."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case Operator.IN:
                return self.key in labels and labels[self.key] in self.values
            case Operator.NOT_IN:
                return self.key not in labels or labels[self.key] not in self.values
            case Operator.EXISTS:
                return self.key in labels
            case Operator.DOES_NOT_EXIST:
                return self.key not in labels


@dataclass(frozen=True)
class LabelSelector:
    """All requirements hold (none: matches everything)."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


@dataclass(frozen=True)
class EnablementSelector:
    """One entry: selects a pod when both selectors match."""

    pod: LabelSelector = LabelSelector()
    namespace: LabelSelector = LabelSelector()


DEFAULT_ENABLEMENT_SELECTORS: Final = (
    EnablementSelector(
        pod=LabelSelector(
            (Requirement(constants.ENROLL_LABEL, Operator.IN, frozenset({constants.ENROLL_VALUE})),)
        )
    ),
    EnablementSelector(
        pod=LabelSelector(
            (
                Requirement(
                    constants.ENROLL_LABEL, Operator.NOT_IN, frozenset({constants.OPT_OUT_VALUE})
                ),
            )
        ),
        namespace=LabelSelector(
            (Requirement(constants.ENROLL_LABEL, Operator.IN, frozenset({constants.ENROLL_VALUE})),)
        ),
    ),
)
"""Istio's chart default, which is the built-in rule: a pod labelled
`istio.io/dataplane-mode=ambient`, or a pod of a namespace so labelled unless the pod has
`istio.io/dataplane-mode=none`."""


# --- parsing ---


def _key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return "has an empty prefix"
    if prefix and not (len(prefix) <= _MAX_PREFIX and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return "has a prefix that is not a DNS subdomain"
    if not (len(name) <= _MAX_NAME and _NAME.fullmatch(name)):
        return (
            "must be at most 63 characters of letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit (with an optional DNS subdomain prefix and '/')"
        )
    return None


def _value_problem(value: str) -> str | None:
    if value and not (len(value) <= _MAX_NAME and _NAME.fullmatch(value)):
        return (
            "must be empty or at most 63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SelectorError(
            f"{where} must be a string, not {value!r} (quote values such as true or 1)"
        )
    return value


def _mapping(value: Any, where: str, allowed: frozenset[str] | None) -> Mapping[Any, Any]:
    """`value` as a mapping (None: empty); `allowed` None takes any key."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SelectorError(f"{where} must be a mapping, not {value!r}")
    if allowed is None:
        return value
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise SelectorError(
            f"{where} has unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )
    return value


def _key(value: Any, where: str) -> str:
    key = _string(value, where)
    problem = _key_problem(key)
    if problem is not None:
        raise SelectorError(f"{where} {key!r} {problem}")
    return key


def _label_value(value: Any, where: str) -> str:
    text = _string(value, where)
    problem = _value_problem(text)
    if problem is not None:
        raise SelectorError(f"{where} {text!r} {problem}")
    return text


_SELECTOR_KEYS: Final = frozenset({"matchLabels", "matchExpressions"})
_EXPRESSION_KEYS: Final = frozenset({"key", "operator", "values"})
_ENTRY_KEYS: Final = frozenset({"podSelector", "namespaceSelector"})


def _expression(raw: Any, where: str) -> Requirement:
    fields = _mapping(raw, where, _EXPRESSION_KEYS)
    key = _key(fields.get("key"), f"{where}.key")
    text = _string(fields.get("operator"), f"{where}.operator")
    try:
        operator = Operator(text)
    except ValueError:
        raise SelectorError(
            f"{where}.operator {text!r} is not one of {', '.join(Operator)}"
        ) from None
    raw_values = fields.get("values") or []
    if not isinstance(raw_values, list):
        raise SelectorError(f"{where}.values must be a list, not {raw_values!r}")
    values = frozenset(
        _label_value(value, f"{where}.values[{i}]") for i, value in enumerate(raw_values)
    )
    if operator in (Operator.IN, Operator.NOT_IN) and not values:
        raise SelectorError(f"{where}.values must not be empty for operator {operator}")
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        raise SelectorError(f"{where}.values must be empty for operator {operator}")
    return Requirement(key, operator, values)


def _label_selector(raw: Any, where: str) -> LabelSelector:
    fields = _mapping(raw, where, _SELECTOR_KEYS)
    labels = _mapping(fields.get("matchLabels"), f"{where}.matchLabels", None)
    requirements = [
        Requirement(
            _key(key, f"{where}.matchLabels key"),
            Operator.IN,
            frozenset({_label_value(value, f"{where}.matchLabels[{key!r}]")}),
        )
        for key, value in labels.items()
    ]
    expressions = fields.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError(f"{where}.matchExpressions must be a list, not {expressions!r}")
    requirements.extend(
        _expression(raw_expression, f"{where}.matchExpressions[{i}]")
        for i, raw_expression in enumerate(expressions)
    )
    return LabelSelector(tuple(requirements))


def parse_enablement_selectors(text: str) -> tuple[EnablementSelector, ...]:
    """The entries of a YAML (or JSON) list; `SelectorError` says which part is wrong.

    `[]` is valid and selects no pod. Anything that is not a list, `null` included, is refused.
    """
    try:
        document = untrusted.load_yaml(text)
    except untrusted.MalformedDocumentError as exc:
        raise SelectorError(f"is not valid YAML ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SelectorError(f"is not valid YAML{where} ({problem})") from None
    if not isinstance(document, list):
        raise SelectorError(
            "must be a YAML list of {podSelector, namespaceSelector} entries "
            f"(`[]` for none), not {type(document).__name__}"
        )
    try:
        return tuple(_entry(raw, f"entry {i}") for i, raw in enumerate(document))
    except SelectorError as exc:
        raise SelectorError(f"has an invalid enablement selector ({exc})") from None


def _entry(raw: Any, where: str) -> EnablementSelector:
    fields = _mapping(raw, where, _ENTRY_KEYS)
    return EnablementSelector(
        pod=_label_selector(fields.get("podSelector"), f"{where}: podSelector"),
        namespace=_label_selector(fields.get("namespaceSelector"), f"{where}: namespaceSelector"),
    )
