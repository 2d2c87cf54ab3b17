"""Kubelet probes to AWS branch-ENI pods (docs/design.md §4.5): the decision on rules and routes
as data, then in a lab node netns wired as the VPC CNI wires Security Groups for Pods, with a real
probe connection from the kubelet's uid proving the path there and back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ztunnel_redirect.core.brancheni import (
    HostRoute,
    IpRule,
    ProbeRule,
    is_ours,
    probe_rules,
    wanted,
)
from ztunnel_redirect.core.drift import DriftKind
from ztunnel_redirect.core.model import HostOptions, PodUid
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.netnslab import BranchEniPod, Lab
from ztunnel_redirect.testing.traffic import App, request

KUBELET_UID = 4242
OPTIONS = HostOptions(kubelet_uid=KUBELET_UID)
A = PodUid("0b5f0f57-0000-4000-8000-00000000000a")
B = PodUid("0b5f0f57-0000-4000-8000-00000000000b")
APP_PORT = 8080
PROBE_SNAT = "169.254.7.127"

# -- the decision, as data ------------------------------------------------------------------------

VPC_CNI_RULES = [
    IpRule(priority=10, table=101, iif="vlan.eth.1"),
    IpRule(priority=10, table=101, iif="vlanabc"),
    IpRule(priority=20, table=255),
    IpRule(priority=512, table=254, dst="10.0.5.7/32"),  # a regular pod: lookup main
    IpRule(priority=32766, table=254),
]
VPC_CNI_ROUTES = [
    HostRoute(table=101, dst="192.168.1.1", dev="vlan.eth.1"),
    HostRoute(table=101, dst="192.168.1.12", dev="vlanabc"),
]
FORWARD = ProbeRule(512, 101, dst="192.168.1.12/32")
BACK = ProbeRule(9, 255, iif="vlanabc")


def test_a_branch_eni_pod_gets_istios_two_rules() -> None:
    assert probe_rules("192.168.1.12", VPC_CNI_RULES, VPC_CNI_ROUTES) == (FORWARD, BACK)
    assert str(FORWARD) == "ip rule to 192.168.1.12/32 lookup 101 priority 512"
    assert str(BACK) == "ip rule iif vlanabc lookup local priority 9"


@pytest.mark.parametrize(
    ("ip", "rules", "routes"),
    [
        # a regular pod: its route is in main, its rule looks up main
        ("10.0.5.7", VPC_CNI_RULES, VPC_CNI_ROUTES),
        # the route's device has no iif rule for that table
        ("192.168.1.12", VPC_CNI_RULES[:1], VPC_CNI_ROUTES),
        # an iif rule for the device, but into another table
        ("192.168.1.12", [IpRule(10, 102, iif="vlanabc")], VPC_CNI_ROUTES),
        # the iif rule looks up main: never a pod's own table
        ("192.168.1.12", [IpRule(10, 254, iif="vlanabc")], [HostRoute(254, "192.168.1.12", "x")]),
    ],
)
def test_anything_else_is_left_alone(ip: str, rules: list[IpRule], routes: list[HostRoute]) -> None:
    assert probe_rules(ip, rules, routes) is None


def test_ipv6_and_priority_zero() -> None:
    rules = [IpRule(0, 300, iif="vlanv6")]
    routes = [HostRoute(300, "fd00:1::5", "vlanv6")]
    assert wanted(["fd00:1::5", "10.9.9.9"], rules, routes) == {
        ProbeRule(512, 300, dst="fd00:1::5/128", ipv6=True),
        ProbeRule(0, 255, iif="vlanv6", ipv6=True),
    }


@pytest.mark.parametrize(
    ("rule", "ours"),
    [
        (IpRule(512, 101, dst="192.168.1.12/32"), True),
        (IpRule(9, 255, iif="vlanabc"), True),
        (IpRule(512, 254, dst="10.0.5.7/32"), False),  # the VPC CNI's to-pod rule
        (IpRule(512, 101, dst="192.168.1.0/24"), False),
        (IpRule(511, 101, dst="192.168.1.12/32"), False),
        (IpRule(512, 101, dst="192.168.1.12/32", plain=False), False),
        (IpRule(10, 101, iif="vlanabc"), False),  # the VPC CNI's iif rule
        (IpRule(20, 255), False),  # the moved local rule
        (IpRule(9, 255, iif="vlanabc", dst="10.0.0.0/8"), False),
    ],
)
def test_only_our_two_shapes_are_ours(rule: IpRule, ours: bool) -> None:
    assert is_ours(rule) is ours


# -- in a lab node wired as the VPC CNI wires it ---------------------------------------------------


@pytest.fixture
def sgp_lab() -> Iterator[Lab]:
    """A node with tcp_early_demux=0 (the Security Groups for Pods prerequisite), in the lab's
    node netns only."""
    with Lab() as lab:
        lab.node.exec("sysctl", "-qw", "net.ipv4.tcp_early_demux=0")
        yield lab


def probe_rules_in(lab: Lab) -> set[str]:
    """Our two shapes as `ip rule` lists them in the lab node."""
    lines = lab.node.ip("rule", "show").splitlines()
    return {
        " ".join(line.split())
        for line in lines
        if (line.startswith("512:") and "lookup main" not in line) or "lookup local" in line
    } - {f"{Lab.VPC_CNI_LOCAL_PRIORITY}: from all lookup local"}


def expected(pod: BranchEniPod) -> set[str]:
    return {
        f"512: from all to {pod.ip} lookup {pod.table}",
        f"9: from all iif {pod.veth} lookup local",
    }


def reply_route(lab: Lab, pod: BranchEniPod) -> str:
    """Where the host routes a reply from the pod to its own address, as the kernel decides."""
    return lab.node.ip("route", "get", Lab.NODE_ENI_V4, "from", pod.ip, "iif", pod.veth)


def probe(lab: Lab, pod: BranchEniPod) -> bytes:
    return request(lab.node.path, pod.ip, APP_PORT, uid=KUBELET_UID, timeout=5.0)


@pytest.mark.kernel
async def test_probe_reaches_a_branch_eni_pod_and_its_reply_comes_back(
    runner: NetnsRunner, sgp_lab: Lab
) -> None:
    pod = sgp_lab.add_branch_eni_pod("sgp", vlan_id=1)
    host = HostRules(runner, netns=sgp_lab.node.path)
    # Without the rules: the probe would leave through the primary ENI, the reply through the
    # pod's VLAN, both lost in the VPC fabric.
    assert "dev eth0" in sgp_lab.node.ip("route", "get", pod.ip)
    assert f"dev {pod.vlan}" in reply_route(sgp_lab, pod)

    await host.apply(OPTIONS, {})
    await host.add_pod([pod.ip], A, ipv6=True, branch_eni_probe=True)
    assert probe_rules_in(sgp_lab) == expected(pod)
    assert f"dev {pod.veth}" in sgp_lab.node.ip("route", "get", pod.ip)
    assert reply_route(sgp_lab, pod).startswith(f"local {Lab.NODE_ENI_V4}")

    with App(pod.path, APP_PORT) as app:
        # A real connection from the kubelet's uid: SNATed to the probe address, through the
        # veth, answered by the app, and the answer delivered to the host socket.
        assert probe(sgp_lab, pod) == f"app app saw {PROBE_SNAT}\n".encode()
        assert app.wait_for_peer(timeout=5.0)[0] == PROBE_SNAT


@pytest.mark.kernel
async def test_rules_are_repaired_and_follow_the_pod_and_the_setting(
    runner: NetnsRunner, sgp_lab: Lab
) -> None:
    pod = sgp_lab.add_branch_eni_pod("sgp", vlan_id=1)
    other = sgp_lab.add_branch_eni_pod("sgp2", vlan_id=2)
    plain = sgp_lab.add_pod("plain")  # a regular pod: nothing added for it
    host = HostRules(runner, netns=sgp_lab.node.path)
    enrolled = {pod.ip: A, other.ip: B, plain.ipv4: B}

    repaired = await host.apply(OPTIONS, enrolled)
    assert probe_rules_in(sgp_lab) == expected(pod) | expected(other)
    assert {str(d) for d in repaired if d.kind is DriftKind.MISSING_IP_RULE} >= {
        f"missing_ip_rule: ip rule to {pod.ip}/32 lookup {pod.table} priority 512"
    }
    assert await host.check(OPTIONS, enrolled) == []

    # Drift: someone deletes one; the check sees it, the host pass puts it back.
    sgp_lab.node.ip("rule", "del", "priority", "9", "iif", pod.veth)
    drifts = await host.check(OPTIONS, enrolled)
    assert [(d.kind, d.detail) for d in drifts] == [
        (DriftKind.MISSING_IP_RULE, f"ip rule iif {pod.veth} lookup local priority 9")
    ]
    assert [d.kind for d in await host.apply(OPTIONS, enrolled)] == [DriftKind.MISSING_IP_RULE]
    assert probe_rules_in(sgp_lab) == expected(pod) | expected(other)

    # The pod goes (the VPC CNI tears its wiring down first): its removal takes its two rules,
    # though its veth is gone; the other pod's stay.
    sgp_lab.remove_branch_eni_pod(pod)
    assert await host.remove_pod([pod.ip], A, branch_eni_probe=True) == [pod.ip]
    assert probe_rules_in(sgp_lab) == expected(other)

    # Unenrolled without a removal (e.g. a restart missed it): the host pass removes them.
    del enrolled[pod.ip], enrolled[other.ip]
    stale = [d for d in await host.apply(OPTIONS, enrolled) if d.kind is DriftKind.STALE_IP_RULE]
    assert len(stale) == 2
    assert probe_rules_in(sgp_lab) == set()

    # Enrolled again, then the setting turned off: gone at the next pass.
    enrolled[other.ip] = B
    await host.apply(OPTIONS, enrolled)
    assert probe_rules_in(sgp_lab) == expected(other)
    off = HostOptions(kubelet_uid=KUBELET_UID, aws_branch_eni_probe=False)
    await host.apply(off, enrolled)
    assert probe_rules_in(sgp_lab) == set()
    await host.add_pod([other.ip], B, ipv6=True, branch_eni_probe=False)
    assert probe_rules_in(sgp_lab) == set()

    # And `cleanup` removes them, and only them.
    await host.apply(OPTIONS, enrolled)
    before = sgp_lab.node.ip("rule", "show")
    assert await host.remove_probe_rules() == sorted(
        f"ip rule {r}"
        for r in (
            f"iif {other.veth} lookup local priority 9",
            f"to {other.ip}/32 lookup 102 priority 512",
        )
    )
    assert probe_rules_in(sgp_lab) == set()
    assert len(sgp_lab.node.ip("rule", "show").splitlines()) == len(before.splitlines()) - 2


@pytest.mark.kernel
async def test_nothing_happens_where_tcp_early_demux_is_on(runner: NetnsRunner, lab: Lab) -> None:
    """The lab node keeps the kernel default (1): a branch-ENI layout is not acted on, as on
    any node without Security Groups for Pods."""
    pod = lab.add_branch_eni_pod("sgp", vlan_id=1)
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {pod.ip: A})
    await host.add_pod([pod.ip], A, ipv6=True, branch_eni_probe=True)
    assert probe_rules_in(lab) == set()
    assert await host.check(OPTIONS, {pod.ip: A}) == []


@pytest.mark.kernel
async def test_ipv6_branch_eni_pod(runner: NetnsRunner, sgp_lab: Lab) -> None:
    """The same two rules for an IPv6 pod (the gate is the IPv4 sysctl, as in Istio)."""
    node = sgp_lab.node
    node.ip("link", "add", "vlan6", "type", "veth", "peer", "name", "pod6")
    node.ip("link", "set", "vlan6", "up")
    node.ip("-6", "route", "add", "fd00:1::5/128", "dev", "vlan6", "table", "300")
    node.ip("-6", "rule", "add", "priority", "10", "iif", "vlan6", "lookup", "300")
    host = HostRules(runner, netns=node.path)

    await host.apply(OPTIONS, {"fd00:1::5": A})
    rules = {" ".join(line.split()) for line in node.ip("-6", "rule", "show").splitlines()}
    assert {"512: from all to fd00:1::5 lookup 300", "9: from all iif vlan6 lookup local"} <= rules
    assert await host.check(OPTIONS, {"fd00:1::5": A}) == []

    assert await host.remove_pod(["fd00:1::5"], A, branch_eni_probe=True) == ["fd00:1::5"]
    rules_after = node.ip("-6", "rule", "show")
    assert "fd00:1::5" not in rules_after
    assert "lookup local" in rules_after  # the kernel's own
    assert "iif vlan6 lookup local" not in rules_after
