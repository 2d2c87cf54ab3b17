"""The host probe-SNAT rules in the kernel (a lab node netns stands in for the host)."""

from __future__ import annotations

from typing import Any

import pytest

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import DriftKind, TableListing
from ztunnel_redirect.core.errors import ConfigError, NotFoundError
from ztunnel_redirect.core.model import HostOptions, PodUid
from ztunnel_redirect.kernel import hostrules, podrules
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.nft import generation
from ztunnel_redirect.testing.netnslab import Lab

pytestmark = pytest.mark.kernel

OPTIONS = HostOptions(kubelet_uid=4242)
A = PodUid("0b5f0f57-0000-4000-8000-00000000000a")
B = PodUid("0b5f0f57-0000-4000-8000-00000000000b")


def elements(lab: Lab, family: str = "v4") -> str:
    return lab.node.exec("nft", "list", "set", "inet", c.HOST_TABLE, f"istio-inpod-probes-{family}")


async def test_apply_check_and_elements(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    wanted = {"10.244.0.2": A, "fd00::2": A}
    repaired = await host.apply(OPTIONS, wanted)
    assert DriftKind.MISSING_TABLE in {d.kind for d in repaired}
    assert await host.check(OPTIONS, wanted) == []
    assert f'10.244.0.2 comment "{A}"' in elements(lab)
    assert f'fd00::2 comment "{A}"' in elements(lab, "v6")
    before = lab.node.exec("nft", "-a", "list", "table", "inet", c.HOST_TABLE)
    assert await host.apply(OPTIONS, wanted) == []
    assert lab.node.exec("nft", "-a", "list", "table", "inet", c.HOST_TABLE) == before


async def test_rewriting_rules_keeps_elements(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {"10.244.0.2": A})
    await host.add_pod(["10.244.0.3"], B, ipv6=True)
    lab.node.exec("nft", "flush", "chain", "inet", c.HOST_TABLE, "postrouting")
    lab.node.exec("nft", "add", "chain", "inet", c.HOST_TABLE, "extra")

    drifts = await host.check(OPTIONS)
    assert {d.kind for d in drifts} == {DriftKind.MISSING_RULE, DriftKind.EXTRA_CHAIN}
    await host.apply(OPTIONS)  # no element list: keep what is there

    assert await host.check(OPTIONS, {"10.244.0.2": A, "10.244.0.3": B}) == []


async def test_full_sync_adds_missing_and_removes_unwanted_elements(
    runner: NetnsRunner, lab: Lab
) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {"10.244.0.2": A, "10.244.0.9": B})
    drifts = await host.check(OPTIONS, {"10.244.0.2": B, "10.244.0.3": A})
    assert {(d.kind, d.detail) for d in drifts} == {
        (DriftKind.MISSING_ELEMENT, f"10.244.0.2 {B}"),
        (DriftKind.MISSING_ELEMENT, f"10.244.0.3 {A}"),
        (DriftKind.EXTRA_ELEMENT, f"10.244.0.2 {A}"),
        (DriftKind.EXTRA_ELEMENT, f"10.244.0.9 {B}"),
    }
    await host.apply(OPTIONS, {"10.244.0.2": B, "10.244.0.3": A})
    assert await host.check(OPTIONS, {"10.244.0.2": B, "10.244.0.3": A}) == []


async def test_remove_pod_only_on_ip_and_uid_match(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {"10.244.0.2": A})
    assert await host.remove_pod(["10.244.0.2"], B) == []
    assert "10.244.0.2" in elements(lab)
    assert await host.remove_pod(["10.244.0.2"], A) == ["10.244.0.2"]
    assert "10.244.0.2" not in elements(lab)


async def test_ipv6_off_has_no_v6_set(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    v4 = HostOptions(kubelet_uid=4242, ipv6=False)
    await host.apply(v4, {"10.244.0.2": A, "fd00::2": A})
    assert "istio-inpod-probes-v6" not in lab.node.exec(
        "nft", "list", "table", "inet", c.HOST_TABLE
    )
    assert await host.check(v4, {"10.244.0.2": A, "fd00::2": A}) == []


async def test_bad_input_is_refused_before_the_kernel(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    with pytest.raises(ConfigError):
        await host.add_pod(["not-an-ip"], A, ipv6=True)
    with pytest.raises(ConfigError):
        await host.add_pod(["10.0.0.1"], PodUid('x" } flush ruleset'), ipv6=True)


async def test_remove_is_idempotent(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {})
    assert await host.remove() is True
    assert await host.remove() is False


async def test_a_verified_host_table_is_not_listed_again_until_something_commits(
    runner: NetnsRunner, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = HostRules(runner, netns=lab.node.path)
    wanted = {"10.244.0.2": A}
    await host.apply(OPTIONS, wanted)
    assert await host.check(OPTIONS, wanted) == []
    listings: list[object] = []
    real_read = podrules.read_tables

    def spy(*args: Any) -> dict[str, TableListing | None]:
        listings.append(args)
        return real_read(*args)

    monkeypatch.setattr(hostrules, "read_tables", spy)

    assert await host.check(OPTIONS, wanted) == []
    assert listings == []
    assert await host.check(OPTIONS, {**wanted, "10.244.0.3": B}) != []  # other desired state
    lab.node.exec("nft", "flush", "chain", "inet", c.HOST_TABLE, "postrouting")
    assert DriftKind.MISSING_RULE in {d.kind for d in await host.check(OPTIONS, wanted)}


async def test_a_reused_pod_ip_belongs_to_the_new_pod(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {"10.244.0.2": A, "fd00::2": A})
    # Pod A's removal has not reached the set yet when pod B gets the same IPs.
    await host.add_pod(["10.244.0.2", "fd00::2"], B, ipv6=True)
    assert f'10.244.0.2 comment "{B}"' in elements(lab)
    assert f'fd00::2 comment "{B}"' in elements(lab, "v6")
    assert await host.check(OPTIONS, {"10.244.0.2": B, "fd00::2": B}) == []

    assert await host.remove_pod(["10.244.0.2", "fd00::2"], A) == []
    assert "10.244.0.2" in elements(lab)
    assert "fd00::2" in elements(lab, "v6")


async def test_add_pod_writes_only_what_differs(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    await host.apply(OPTIONS, {})
    lab.node.nft(f"add element inet {c.HOST_TABLE} istio-inpod-probes-v4 {{ 10.244.0.4 }}\n")
    await host.add_pod(["10.244.0.4", "10.244.0.5"], A, ipv6=True)  # no comment, absent
    assert await host.check(OPTIONS, {"10.244.0.4": A, "10.244.0.5": A}) == []
    seen = await runner.run(lab.node.path, generation)
    await host.add_pod(["10.244.0.4", "10.244.0.5"], A, ipv6=True)  # already right
    assert await runner.run(lab.node.path, generation) == seen  # nothing was committed


async def test_add_pod_names_the_missing_set(runner: NetnsRunner, lab: Lab) -> None:
    host = HostRules(runner, netns=lab.node.path)
    with pytest.raises(NotFoundError, match=f"host table inet {c.HOST_TABLE} does not exist"):
        await host.add_pod(["10.244.0.2"], A, ipv6=True)
    await host.apply(HostOptions(kubelet_uid=4242, ipv6=False), {})
    with pytest.raises(NotFoundError, match="no set istio-inpod-probes-v6"):
        await host.add_pod(["10.244.0.2", "fd00::2"], A, ipv6=True)
    assert "10.244.0.2" not in elements(lab)  # one transaction: nothing was added
