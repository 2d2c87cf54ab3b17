"""The cluster store: which keys a change names for reconciling."""

from __future__ import annotations

from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.core.model import Namespace, Pod, PodUid


def test_any_namespace_label_change_names_the_namespaces_pods() -> None:
    """Enablement selectors may look at any namespace label, not only istio.io/dataplane-mode."""
    store = ClusterStore()
    named: list[str] = []
    store.subscribe(named.append)
    store.upsert_pod(Pod(uid=PodUid("u1"), name="a", namespace="shop"))
    store.upsert_pod(Pod(uid=PodUid("u2"), name="b", namespace="other"))
    store.upsert_namespace(Namespace("shop", {"team": "web"}))
    named.clear()

    store.upsert_namespace(Namespace("shop", {"team": "db"}))
    assert named == ["u1"]

    named.clear()
    store.upsert_namespace(Namespace("shop", {"team": "db"}))
    store.replace_namespaces([Namespace("shop", {"team": "db"})])
    assert named == []

    store.replace_namespaces([Namespace("shop", {"team": "db", "tier": "1"})])
    assert named == ["u1"]
