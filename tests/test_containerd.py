"""End to end through a real container runtime: containerd's CRI plugin runs the CNI chain (a real
bridge + host-local primary, then our plugin) when the test asks it for pod sandboxes over CRI, as
kubelet does.

The node (`testing.containerd.runtime_node`, which the benchmark's real-runtime part runs on too)
is a network namespace (`TestNode`): containerd runs in it, so does
the bridge `zrbr0` and every sandbox's veth; the sandboxes' addresses (10.233.0.0/24) exist only in
there. The real agent process runs against the test API server with the host netns set to the
node's and the real /proc, and chains itself into the test's CNI conf dir as on a node. A fake
ztunnel (a real ZDS client) starts a ztunnel stand-in in each netns it gets, so that a sandbox's
first connection proves the redirect. Nothing sleeps to wait: the agent's log lines, the fake
ztunnel's requests and the API server's state are waited for on conditions under timeouts.

Skipped, with the reason, where containerd, runc, the CNI plugins or busybox-static are missing
(`make system-packages` installs them) or without root.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.testing import containerd as ctd
from ztunnel_redirect.testing.containerd import RuntimeNode, Sandbox
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import Netns
from ztunnel_redirect.testing.standin import Hop, HopKind, Standin
from ztunnel_redirect.testing.traffic import request

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(ctd.unavailable() is not None, reason=str(ctd.unavailable())),
]

MESH_NS: Final = ctd.MESH_NAMESPACE
PLAIN_NS: Final = ctd.PLAIN_NAMESPACE
APP_PORT: Final = 8080
EVENT_TIMEOUT: Final = 15.0
TRAFFIC_TIMEOUT: Final = 5.0


# --- what depends on the CNI plugin --------------------------------------------------------------
# The plugin is the static executable `make cni-plugin` builds; the agent copies it into the
# node's CNI bin dir. With the agent unreachable it reads the agent's decision file in the run dir
# (no credentials on the node): a pod it does not know in an enrolled namespace fails closed.


class Plugin:
    """The installed plugin, as on a node."""

    fail_closed_text: Final = "agent not reachable"
    """In the error a mesh pod's failed ADD carries when the agent is down."""


# --- the node ------------------------------------------------------------------------------------


@pytest.fixture
async def node() -> AsyncIterator[RuntimeNode]:
    async with ctd.runtime_node() as runtime_node:
        yield runtime_node


# --- what the agent did, seen from outside -----------------------------------------------------


def netns_of(sandbox: Sandbox) -> Netns:
    """The sandbox's netns (containerd binds it under /var/run/netns, i.e. /run/netns)."""
    return Netns(Path(sandbox.path).name)


def kernel_view(ns: Netns) -> str:
    """What the agent may write in a netns: nft ruleset, IPv4 rules and routes of every table."""
    return "\n".join(
        (
            ns.exec("nft", "list", "ruleset"),
            ns.ip("rule", "show"),
            ns.ip("-4", "route", "show", "table", "all"),
        )
    )


def host_set(node: RuntimeNode) -> set[str]:
    """The pod IPs in the node's probe set (empty when there is no table)."""
    try:
        out = node.node.lab.node.exec("nft", "-j", "list", "set", "inet", c.HOST_TABLE,
                                      c.HOST_SET_V4)  # fmt: skip
    except RuntimeError:
        return set()
    return {
        str(e["elem"]["val"] if isinstance(e, dict) else e)
        for item in json.loads(out)["nftables"]
        for e in item.get("set", {}).get("elem", [])
    }


def annotation(node: RuntimeNode, sandbox: Sandbox) -> str | None:
    pod = node.api.get_pod(sandbox.namespace, sandbox.name) or {}
    value = (pod.get("metadata", {}).get("annotations") or {}).get(c.STATUS_ANNOTATION)
    return None if value is None else str(value)


async def enabled(node: RuntimeNode, sandbox: Sandbox) -> None:
    def holds(pod: dict[str, Any] | None) -> bool:
        annotations = (pod or {}).get("metadata", {}).get("annotations") or {}
        return annotations.get(c.STATUS_ANNOTATION) == "enabled"

    await node.api.wait_for_pod(sandbox.namespace, sandbox.name, holds, timeout=EVENT_TIMEOUT)


def inode(path: str) -> int:
    return Path(path).stat().st_ino


async def caught(zt: FakeZtunnel, client: Sandbox, server: Sandbox) -> Hop:
    """One new connection from client to server's app, proven to pass the client's stand-in."""
    workload = zt.workloads.get(PodUid(client.uid))
    assert workload is not None, f"ztunnel has no workload for {client.name}"
    standin = workload.data_plane
    assert isinstance(standin, Standin)
    standin.clear()
    reply = await asyncio.to_thread(
        request, client.path, server.ips[0], APP_PORT, timeout=TRAFFIC_TIMEOUT
    )
    assert reply == f"app {server.name} saw {client.ips[0]}\n".encode()
    return await asyncio.to_thread(
        standin.wait_for,
        lambda h: h.kind is HopKind.OUTBOUND and h.original_dst == (server.ips[0], APP_PORT),
        timeout=TRAFFIC_TIMEOUT,
    )


# --- tests -------------------------------------------------------------------------------------


async def test_mesh_sandbox_is_redirected_from_its_first_connection_and_tidied_up_on_removal(
    node: RuntimeNode,
) -> None:
    await node.start_agent()
    conflist = json.loads(node.containerd.primary_conf.read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "ztunnel-redirect-cni"]
    zt = await node.ztunnel()
    server = await node.pod("server", PLAIN_NS)
    await asyncio.to_thread(node.app, server, APP_PORT)

    web = await node.pod("web-0", MESH_NS)

    # The CNI ADD ran inside RunPodSandbox: ztunnel had the sandbox's netns before it returned.
    added = [r for r in zt.requests if r.kind is RequestKind.ADD and r.uid == web.uid]
    assert len(added) == 1
    assert added[0].netns_inode == inode(web.path)
    assert (added[0].name, added[0].namespace) == ("web-0", MESH_NS)
    # containerd 1.6 passes K8S_POD_UID in CNI_ARGS: the plugin hands the agent the pod's UID.
    assert node.agent.find("cni_add_received", pod_uid=web.uid)
    view = kernel_view(netns_of(web))
    assert c.NAT_TABLE in view
    assert f"lookup {c.ROUTE_TABLE}" in view
    await enabled(node, web)
    assert web.ips[0] in host_set(node)
    hop = await caught(zt, web, server)
    assert hop.client[0] == web.ips[0]
    # The pod outside the mesh started with no rules of ours.
    assert c.NAT_TABLE not in kernel_view(netns_of(server))
    assert annotation(node, server) is None
    assert node.agent.find("cni_add_skipped", pod=f"{PLAIN_NS}/server")

    await node.remove(web)

    async with asyncio.timeout(EVENT_TIMEOUT):
        await zt.wait_request(RequestKind.DEL, web.uid)
    assert web.ips[0] not in host_set(node)
    assert not await asyncio.to_thread(Path(web.path).exists)
    assert zt.violations == []


async def test_agent_down_fails_a_mesh_sandbox_closed_and_kubelets_retry_succeeds(
    node: RuntimeNode,
) -> None:
    await node.start_agent()
    await node.agent.stop()  # down, its entry left in the chain (as after a crash or upgrade)

    plain = await node.pod("batch-0", PLAIN_NS)
    uid = node.create_pod("web-0", MESH_NS)
    with pytest.raises(grpc.RpcError) as failed:
        await node.run_sandbox("web-0", MESH_NS, uid)

    assert c.NAT_TABLE not in kernel_view(netns_of(plain))
    details = str(failed.value.details())
    assert Plugin.fail_closed_text in details, details

    await node.start_agent()
    zt = await node.ztunnel()
    web = await node.run_sandbox("web-0", MESH_NS, uid)  # kubelet's retry: the same pod

    async with asyncio.timeout(EVENT_TIMEOUT):
        added = await zt.wait_request(RequestKind.ADD, uid)
    assert added.netns_inode == inode(web.path)
    await enabled(node, web)
    assert c.NAT_TABLE in kernel_view(netns_of(web))


async def test_restarted_agent_finds_running_sandboxes_by_their_cgroup_and_rewrites_nothing(
    node: RuntimeNode,
) -> None:
    first = await node.start_agent()
    zt = await node.ztunnel()
    server = await node.pod("server", PLAIN_NS)
    await asyncio.to_thread(node.app, server, APP_PORT)
    web = await node.pod("web-0", MESH_NS)
    await enabled(node, web)
    await first.wait_count("drift_pass_done", 2, since=first.mark)
    namespaces = {"node": node.node.lab.node, "web": netns_of(web)}
    before = {name: kernel_view(ns) for name, ns in namespaces.items()}

    assert await first.stop() == 0
    await zt.close()
    second = await node.start_agent()
    zt = await node.ztunnel()
    await second.wait_count("drift_pass_done", 2, since=second.mark)

    # Found through /proc: the pause process sits in the cgroup containerd made from the
    # sandbox's cgroup parent (/kubepods/besteffort/pod<uid>/<sandbox id>).
    cgroup = await asyncio.to_thread(Path(f"/proc/{web.pid}/cgroup").read_text)
    assert f"{ctd.pod_cgroup_parent(web.uid)}/{web.id}\n" in cgroup
    assert second.find("pods_adopted", pods=1, netns_found=1)
    adds = [r for r in zt.requests if r.kind is RequestKind.ADD]
    assert [(r.uid, r.netns_inode) for r in adds] == [(web.uid, inode(web.path))]
    assert {name: kernel_view(ns) for name, ns in namespaces.items()} == before
    for written in ("pod_rules_applied", "drift_repaired", "host_drift_repaired", "work_failed"):
        assert second.find(written) == [], written
    await caught(zt, web, server)
