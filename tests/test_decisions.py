"""The CNI plugin's decision file as the agent renders and writes it (format:
cniplugin/README.md). The plugin reading it is tested in test_cni_plugin_binary.py (hand-written
files) and test_cni_e2e.py (files written by the real agent)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from ztunnel_redirect.adapters import decisions
from ztunnel_redirect.adapters.decisions import (
    AgentPods,
    DecisionFile,
    DecisionKeeper,
    Renderer,
    agent_pods_of,
    render,
)
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.model import Namespace, Pod, PodUid

NODE = "node-1"
POLICY = EnrollmentPolicy(node_name=NODE)
AMBIENT = {c.ENROLL_LABEL: c.ENROLL_VALUE}
AGENT = AgentPods("istio-system", "ztunnel-redirect-")


def pod(uid: str, namespace: str, name: str, **kw: Any) -> Pod:
    return Pod(PodUid(uid), name, namespace, node_name=kw.pop("node_name", NODE), **kw)


def namespaces(*items: Namespace) -> dict[str, Namespace]:
    return {ns.name: ns for ns in items}


NAMESPACES = namespaces(
    Namespace("shop", AMBIENT), Namespace("plain"), Namespace("kube-system", AMBIENT)
)


def decoded(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


def test_renders_every_field_of_the_format() -> None:
    pods = {
        PodUid("u1"): pod("u1", "shop", "web-0", ips=("10.0.0.1",)),
        PodUid("u2"): pod("u2", "plain", "db-0", ips=("10.0.0.2",)),
    }
    content = decoded(render(POLICY, pods, NAMESPACES, agent_pods=AGENT))
    assert content == {
        "version": 1,
        "exclude_namespaces": ["kube-system"],
        "enrolled_namespaces": ["shop"],  # kube-system is labelled, but excluded
        "agent_pods": [{"namespace": "istio-system", "name_prefix": "ztunnel-redirect-"}],
        "pods": {
            "u1": {"namespace": "shop", "name": "web-0", "in_mesh": True},
            "u2": {"namespace": "plain", "name": "db-0", "in_mesh": False},
        },
    }


@pytest.mark.parametrize(
    ("the_pod", "in_mesh"),
    [
        (pod("u", "shop", "web-0", ips=("10.0.0.1",)), True),
        (pod("u", "shop", "web-0"), True),  # waiting for its IP: in the mesh
        (pod("u", "plain", "web-0", ips=("10.0.0.1",), labels=AMBIENT), True),
        (pod("u", "shop", "web-0", ips=("10.0.0.1",), labels={c.ENROLL_LABEL: "none"}), False),
        (pod("u", "shop", "web-0", ips=("10.0.0.1",), host_network=True), False),
        (pod("u", "shop", "web-0", ips=("10.0.0.1",), phase="Succeeded"), False),
        (pod("u", "kube-system", "dns", ips=("10.0.0.1",), labels=AMBIENT), False),
        (
            pod(
                "u",
                "shop",
                "web-0",
                ips=("10.0.0.1",),
                annotations={c.SIDECAR_STATUS_ANNOTATION: "{}"},
            ),
            False,
        ),
    ],
)
def test_in_mesh_is_the_enrollment_decision(the_pod: Pod, in_mesh: bool) -> None:
    content = decoded(render(POLICY, {the_pod.uid: the_pod}, NAMESPACES, agent_pods=None))
    assert content["pods"]["u"]["in_mesh"] is in_mesh


def test_only_this_nodes_live_pods_are_listed() -> None:
    pods = {
        PodUid("a"): pod("a", "shop", "web-0", node_name="node-2"),
        PodUid("b"): pod("b", "shop", "web-1", deleted=True),
    }
    assert decoded(render(POLICY, pods, NAMESPACES, agent_pods=None))["pods"] == {}


def test_enrolled_namespaces_follow_the_policy() -> None:
    opted_out_default = namespaces(
        Namespace("shop", AMBIENT), Namespace("other", {c.ENROLL_LABEL: "none"})
    )
    policy = EnrollmentPolicy(node_name=NODE, exclude_namespaces=frozenset({"shop"}))
    assert (
        decoded(render(policy, {}, opted_out_default, agent_pods=None))["enrolled_namespaces"] == []
    )
    assert decoded(render(POLICY, {}, opted_out_default, agent_pods=None))[
        "enrolled_namespaces"
    ] == ["shop"]


def test_renderer_decides_again_only_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper renders on the event loop that answers CNI ADDs, up to every 100 ms: with 1000
    pods, deciding them all again each time cost milliseconds of every ADD. A render decides only
    the pods whose pod or namespace changed, and gives the bytes a render from nothing gives."""
    decided: list[str] = []
    decide = EnrollmentPolicy.decide

    def counted(self: EnrollmentPolicy, the_pod: Pod, namespace: Namespace | None) -> Any:
        decided.append(the_pod.name)
        return decide(self, the_pod, namespace)

    monkeypatch.setattr(EnrollmentPolicy, "decide", counted)
    pods = {PodUid(f"u{i}"): pod(f"u{i}", "shop", f"web-{i}", ips=("10.0.0.1",)) for i in range(50)}
    pods[PodUid("p")] = pod("p", "plain", "db-0", ips=("10.0.0.2",))
    ns = dict(NAMESPACES)
    renderer = Renderer(POLICY, agent_pods=AGENT)
    renderer.render(pods, ns)

    def rendered() -> tuple[dict[str, Any], list[str]]:
        """What the renderer gave (checked against a render from nothing) and what it decided."""
        decided.clear()
        data = renderer.render(pods, ns)
        by_renderer = sorted(decided)
        assert data == render(POLICY, pods, ns, agent_pods=AGENT)
        return decoded(data), by_renderer

    content, again = rendered()
    assert again == []  # nothing changed, nothing decided
    assert content["pods"]["u7"]["in_mesh"] is True

    pods[PodUid("u7")] = pod(
        "u7", "shop", "web-7", ips=("10.0.0.1",), labels={c.ENROLL_LABEL: "none"}
    )
    del pods[PodUid("u8")]
    pods[PodUid("new")] = pod("new", "shop", "web-new")
    content, again = rendered()
    assert again == ["web-7", "web-new"]
    assert content["pods"]["u7"]["in_mesh"] is False
    assert "u8" not in content["pods"]
    assert content["pods"]["new"]["in_mesh"] is True

    ns["plain"] = Namespace("plain", AMBIENT)  # its pod and the namespace itself, nothing else
    content, again = rendered()
    assert again == ["", "db-0"]
    assert content["pods"]["p"]["in_mesh"] is True
    assert content["enrolled_namespaces"] == ["plain", "shop"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ztunnel-redirect-x7k2p", AgentPods("ns", "ztunnel-redirect-")),
        ("agent-1", AgentPods("ns", "agent-")),
        ("agent", None),
        (None, None),
        ("", None),
    ],
)
def test_agent_pods_from_the_agents_own_name(name: str | None, expected: AgentPods | None) -> None:
    assert agent_pods_of("ns", name) == expected


def test_file_is_written_atomically_root_only_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "run" / c.DECISION_FILE
    file = DecisionFile(path, POLICY, agent_pods=AGENT)
    pods = {PodUid("u1"): pod("u1", "shop", "web-0", ips=("10.0.0.1",))}

    assert file.refresh(pods, NAMESPACES) is True
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    assert decoded(path.read_bytes())["pods"]["u1"]["in_mesh"] is True
    assert file.refresh(pods, NAMESPACES) is False
    assert path.stat().st_ino == st.st_ino

    # A namespace relabelled: the pod's decision changes, the file follows.
    assert file.refresh(pods, namespaces(Namespace("shop"))) is True
    assert decoded(path.read_bytes())["pods"]["u1"]["in_mesh"] is False
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left

    # Someone loosened its mode: written again, 0600.
    path.chmod(0o644)
    assert file.refresh(pods, namespaces(Namespace("shop"))) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    assert file.remove() is True
    assert file.remove() is False


async def test_keeper_writes_from_a_complete_view_only_and_coalesces(tmp_path: Path) -> None:
    path = tmp_path / c.DECISION_FILE
    pods: dict[PodUid, Pod] = {}
    renders = 0

    def snapshot() -> tuple[dict[PodUid, Pod], dict[str, Namespace]]:
        nonlocal renders
        renders += 1
        return pods, NAMESPACES

    keeper = DecisionKeeper(DecisionFile(path, POLICY, agent_pods=None), snapshot, min_interval=0)
    keeper.changed()  # before the initial lists are complete: nothing written
    await keeper.settled()
    assert not path.exists()

    keeper.start()
    for i in range(50):  # a burst (the initial list of 50 pods), all before the first render
        pods[PodUid(f"u{i}")] = pod(f"u{i}", "shop", f"web-{i}", ips=(f"10.0.0.{i}",))
        keeper.changed()
    await keeper.settled()
    assert len(decoded(path.read_bytes())["pods"]) == 50
    assert renders == 1

    # Later changes (a pod added, one deleted): rendered again, none lost.
    pods[PodUid("late")] = pod("late", "plain", "late-0", ips=("10.0.1.1",))
    keeper.changed()
    del pods[PodUid("u0")]
    keeper.changed()
    await keeper.settled()
    content = decoded(path.read_bytes())["pods"]
    assert "late" in content
    assert "u0" not in content


async def test_keeper_renders_once_pod_starts_pause(tmp_path: Path) -> None:
    """While CNI ADDs are being answered, renders wait: the changes of a burst of pod starts
    reach the file together once it pauses, none lost."""
    path = tmp_path / c.DECISION_FILE
    pods: dict[PodUid, Pod] = {}
    paused, asked = asyncio.Event(), asyncio.Event()

    async def pod_starts_paused() -> None:
        asked.set()
        await paused.wait()

    keeper = DecisionKeeper(
        DecisionFile(path, POLICY, agent_pods=None),
        lambda: (pods, NAMESPACES),
        min_interval=0,
        yield_to=pod_starts_paused,
    )
    keeper.start()
    for i in range(3):
        pods[PodUid(f"u{i}")] = pod(f"u{i}", "shop", f"web-{i}", ips=(f"10.0.0.{i}",))
        keeper.changed()
    settled = asyncio.ensure_future(keeper.settled())
    await asyncio.wait_for(asked.wait(), 5)  # the render task waits for pod starts to pause
    assert not settled.done()
    assert not path.exists()

    paused.set()
    await asyncio.wait_for(settled, 5)
    assert set(decoded(path.read_bytes())["pods"]) == {"u0", "u1", "u2"}


async def test_keeper_renders_after_the_yield_limit_if_pod_starts_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decisions, "YIELD_LIMIT", 0.01)
    path = tmp_path / c.DECISION_FILE
    never = asyncio.Event()

    async def pod_starts_never_pause() -> None:
        await never.wait()

    keeper = DecisionKeeper(
        DecisionFile(path, POLICY, agent_pods=None),
        lambda: ({PodUid("u1"): pod("u1", "shop", "web-0", ips=("10.0.0.1",))}, NAMESPACES),
        yield_to=pod_starts_never_pause,
    )
    keeper.start()
    await asyncio.wait_for(keeper.settled(), 5)
    assert set(decoded(path.read_bytes())["pods"]) == {"u1"}
