"""Fuzzing the settings: any value in any of the agent's environment variables or flags, the
enablement selectors' YAML included, gives settings or one `ConfigError` naming what is wrong,
never another exception."""

from __future__ import annotations

import argparse

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import deeply_nested, json_values
from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.labelselector import SelectorError, parse_enablement_selectors
from ztunnel_redirect.core.settings import SETTINGS, Settings, add_arguments, from_args

pytestmark = pytest.mark.fuzz

SELECTOR = """
- podSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}
  namespaceSelector:
    matchExpressions: [{key: team, operator: In, values: [a, b]}]
"""

# YAML a person or a chart could write where selectors are expected: mutations of a valid list,
# any JSON-like value dumped as YAML, anchors and aliases, deep nesting, cut-off text, garbage.
selector_texts = st.one_of(
    st.just(SELECTOR),
    st.integers(0, len(SELECTOR)).map(lambda n: SELECTOR[:n]),
    json_values.map(yaml.safe_dump),
    st.lists(
        st.fixed_dictionaries(
            {"podSelector": json_values, "namespaceSelector": json_values}, optional={}
        ),
        max_size=3,
    ).map(yaml.safe_dump),
    deeply_nested().map(lambda nested: nested.decode()),
    st.just("- &a [*a]"),
    st.just("a: &x [*x, *x]\nb: *x"),
    st.text(max_size=80),
)

values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["0", "-1", "1e400", "nan", "true", "::1", "10.0.0.1/8", "a,,b", "/x", "x"]),
    st.just("n" * 100_000),
    selector_texts,
)
names = sorted(SETTINGS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser


@given(selector_texts)
def test_selectors_are_parsed_or_a_selector_error(text: str) -> None:
    try:
        parse_enablement_selectors(text)
    except SelectorError as exc:
        assert str(exc)


@given(st.dictionaries(st.sampled_from(names), values, max_size=4))
def test_environment_gives_settings_or_a_config_error(given_values: dict[str, str]) -> None:
    environ = {"NODE_NAME": "node-a"}
    environ.update({SETTINGS[name].env: value for name, value in given_values.items()})
    try:
        settings = from_args(_parser().parse_args([]), environ=environ)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(settings, Settings)


@given(st.dictionaries(st.sampled_from(names), values, max_size=4))
def test_flags_give_settings_or_a_config_error(given_values: dict[str, str]) -> None:
    argv = [f"{SETTINGS[name].flag}={value}" for name, value in given_values.items()]
    try:
        namespace = _parser().parse_args(["--node-name=node-a", *argv])
    except argparse.ArgumentError:
        return  # a flag that takes no value, given one: argparse's usage error
    try:
        settings = from_args(namespace, environ={})
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(settings, Settings)
