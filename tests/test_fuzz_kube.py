"""Fuzzing the objects the API server hands us: whatever a pod or namespace holds (labels,
annotations, IPs, fields missing, of the wrong type, huge), translating it gives our model or
`MalformedObjectError`, and a list keeps every well-formed object when others are skipped."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import json_values, mutations_of
from ztunnel_redirect.adapters.kube import (
    MalformedObjectError,
    _well_formed,
    namespace_from_api,
    pod_from_api,
)
from ztunnel_redirect.core.model import Namespace, Pod

pytestmark = pytest.mark.fuzz

HUGE = "x" * 300_000
"""Larger than any label or annotation the API server admits (256 KiB for all annotations)."""


def _pod(n: int) -> dict[str, Any]:
    return {
        "metadata": {
            "uid": f"0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a{n:02d}",
            "name": f"web-{n}",
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {"ambient.istio.io/redirection": "enabled"},
        },
        "spec": {"nodeName": "node-a", "hostNetwork": False, "serviceAccountName": "web"},
        "status": {"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}]},
    }


def _near(good: dict[str, Any]) -> st.SearchStrategy[Any]:
    """`good` with each of its sections mutated, or any JSON value in its place."""
    sections = {
        key: st.one_of(st.just(value), mutations_of(value), json_values)
        for key, value in good.items()
    }
    strings = st.one_of(st.text(max_size=30), st.just(HUGE), st.just("10.0.0.1\x00"))
    addresses = st.one_of(
        strings, json_values, st.sampled_from(["::1", "10.0.0.256", "fe80::1%eth0"])
    )
    return st.one_of(
        st.fixed_dictionaries(sections),
        st.fixed_dictionaries(
            {
                "metadata": st.fixed_dictionaries(
                    {
                        "uid": strings,
                        "name": strings,
                        "namespace": strings,
                        "labels": st.dictionaries(strings, strings | json_values, max_size=3),
                        "annotations": st.dictionaries(strings, strings, max_size=3),
                    }
                ),
                "status": st.fixed_dictionaries(
                    {"podIPs": st.lists(st.fixed_dictionaries({"ip": addresses}), max_size=3)}
                ),
            }
        ),
        json_values,
    )


@given(_near(_pod(0)))
def test_a_pod_from_the_api_is_ours_or_a_typed_error(obj: Any) -> None:
    try:
        pod = pod_from_api(obj)
    except MalformedObjectError as exc:
        assert str(exc)
        return
    assert isinstance(pod, Pod)
    assert all(isinstance(ip, str) for ip in pod.ips)


@given(_near({"metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}))
def test_a_namespace_from_the_api_is_ours_or_a_typed_error(obj: Any) -> None:
    try:
        namespace = namespace_from_api(obj)
    except MalformedObjectError:
        return
    assert isinstance(namespace, Namespace)


@given(st.lists(_near(_pod(0)), max_size=4), st.randoms(use_true_random=False))
def test_a_list_keeps_every_well_formed_pod(bad: list[Any], rnd: Any) -> None:
    good = [_pod(n) for n in range(1, 4)]
    items = good + bad
    rnd.shuffle(items)

    names = {pod.name for pod in _well_formed("pods", pod_from_api, items)}

    assert {f"web-{n}" for n in range(1, 4)} <= names
