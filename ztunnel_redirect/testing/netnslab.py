"""Build a small node out of network namespaces: a "node" netns and "pod" netns joined by veths.

Every namespace is named `zr-<run>-<name>` (one prefix, so leftovers can be found with
`ip netns list | grep ^zr-`), and `Lab.close()` removes all that it created, also after a failure.
Nothing here touches the root network namespace: veths are created inside lab namespaces.
"""

from __future__ import annotations

import itertools
import secrets
import subprocess
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "zr-"


def run(*argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def leftovers() -> list[str]:
    """Lab namespaces that exist now (ours or a crashed run's)."""
    out = run("ip", "netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def ip(self, *argv: str) -> str:
        return run("ip", "-n", self.name, *argv)

    def exec(self, *argv: str) -> str:
        return run("ip", "netns", "exec", self.name, *argv)

    def nft(self, script: str) -> None:
        """Load an nft script in this namespace, as `nft -f` does."""
        run("ip", "netns", "exec", self.name, "nft", "-f", "-", stdin=script)


@dataclass(frozen=True)
class LabPod:
    netns: Netns
    ipv4: str
    ipv6: str | None
    node_side: str
    """The node end of the pod's veth."""

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)

    @property
    def path(self) -> str:
        return self.netns.path


@dataclass(frozen=True)
class BranchEniPod:
    """A pod wired as the AWS VPC CNI wires a branch-ENI pod (`Lab.add_branch_eni_pod`)."""

    netns: Netns
    ip: str
    veth: str
    """The host end of the pod's veth."""
    vlan: str
    """The pod's VLAN link on the host."""
    table: int
    gateway: str

    @property
    def path(self) -> str:
        return self.netns.path


class Lab:
    """A node netns and any number of pods routed through it (like a primary CNI would)."""

    NODE_V4: Final = "10.244.0.1"
    NODE_V6: Final = "fd00:244::1"

    def __init__(self, *, ipv6: bool = False, run_id: str | None = None) -> None:
        self.ipv6 = ipv6
        self.run_id = run_id or secrets.token_hex(3)
        self._created: list[Netns] = []
        self._index = itertools.count(2)
        self.node = self.add_netns("node")
        self.node.ip("link", "set", "lo", "up")
        self.node.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        if ipv6:
            self.node.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def add_netns(self, name: str) -> Netns:
        ns = Netns(f"{PREFIX}{self.run_id}-{name}")
        run("ip", "netns", "add", ns.name)
        self._created.append(ns)
        return ns

    def add_pod(self, name: str) -> LabPod:
        """A pod netns with a veth to the node, an address, and a default route via the node."""
        n = next(self._index)
        ns = self.add_netns(name)
        node_side = f"veth{n}"
        self.node.ip(
            "link", "add", node_side, "type", "veth", "peer", "name", "eth0", "netns", ns.name
        )
        ipv4 = f"10.244.{n // 250}.{n % 250 + 2}"
        ipv6 = f"fd00:244::{n:x}:2" if self.ipv6 else None
        ns.ip("link", "set", "lo", "up")
        ns.ip("addr", "add", f"{ipv4}/32", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        self.node.ip("link", "set", node_side, "up")
        # Point-to-point routing as calico does: a host route per pod, the pod reaches the node
        # through a link-scoped gateway.
        self.node.ip("route", "add", f"{ipv4}/32", "dev", node_side)
        self.node.ip("addr", "add", f"{self.NODE_V4}/32", "dev", node_side)
        ns.ip("route", "add", f"{self.NODE_V4}/32", "dev", "eth0")
        ns.ip("route", "add", "default", "via", self.NODE_V4, "dev", "eth0")
        if ipv6 is not None:
            ns.exec("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
            self.node.exec("sysctl", "-qw", f"net.ipv6.conf.{node_side}.accept_dad=0")
            ns.ip("-6", "addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad")
            self.node.ip("-6", "addr", "add", f"{self.NODE_V6}/128", "dev", node_side, "nodad")
            self.node.ip("-6", "route", "add", f"{ipv6}/128", "dev", node_side)
            ns.ip("-6", "route", "add", f"{self.NODE_V6}/128", "dev", "eth0")
            ns.ip("-6", "route", "add", "default", "via", self.NODE_V6, "dev", "eth0")
        return LabPod(netns=ns, ipv4=ipv4, ipv6=ipv6, node_side=node_side)

    NODE_ENI_V4: Final = "10.0.0.10"
    """The node's primary ENI address in a branch-ENI lab (`add_branch_eni_pod`)."""
    VPC_CNI_IIF_PRIORITY: Final = 10
    VPC_CNI_LOCAL_PRIORITY: Final = 20
    POD_GATEWAY: Final = "169.254.1.1"
    """The pods' link-local gateway, answered by the host veth's MAC (a static neighbour)."""

    def _branch_eni_node(self) -> None:
        """Once per node: the primary ENI (eth0, a default route through it) and the VPC CNI's
        move of the `lookup local` rule behind its per-pod iif rules."""
        if ": eth0@" in self.node.ip("-o", "link", "show"):
            return
        self.node.ip("link", "add", "eth0", "type", "veth", "peer", "name", "vpc0")
        self.node.ip("addr", "add", f"{self.NODE_ENI_V4}/24", "dev", "eth0")
        for link in ("eth0", "vpc0"):
            self.node.ip("link", "set", link, "up")
        self.node.ip("route", "add", "default", "via", "10.0.0.1", "dev", "eth0")
        self.node.ip("rule", "add", "priority", str(self.VPC_CNI_LOCAL_PRIORITY), "lookup", "local")
        self.node.ip("rule", "del", "priority", "0", "lookup", "local")

    def add_branch_eni_pod(self, name: str, *, vlan_id: int) -> BranchEniPod:
        """A pod the way the AWS VPC CNI wires a branch-ENI pod (Security Groups for Pods,
        strict mode): a host veth `vlan<n>` with no route in main, table `vlan_id + 100` holding
        the host route to the pod through that veth and a default route out of the pod's VLAN
        link, and `iif <veth> lookup <table>` and `iif <vlan link> lookup <table>` at priority
        10. The VLAN link is a veth here (the lab kernel may lack 802.1q) whose far end stays on
        the node, unanswered: what reaches it is lost, as the VPC fabric loses a probe."""
        self._branch_eni_node()
        n = next(self._index)
        ns = self.add_netns(name)
        veth, vlan, table = f"vlan{n}", f"vlan.eth.{vlan_id}", vlan_id + 100
        ip, gateway = f"192.168.{vlan_id}.{n + 10}", f"192.168.{vlan_id}.1"
        self.node.ip("link", "add", vlan, "type", "veth", "peer", "name", f"trunk{vlan_id}")
        self.node.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        for link in (vlan, f"trunk{vlan_id}", veth):
            self.node.ip("link", "set", link, "up")
        ns.ip("link", "set", "lo", "up")
        ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        mac = self.node.ip("-o", "link", "show", veth).split("link/ether ")[1].split()[0]
        ns.ip("route", "add", self.POD_GATEWAY, "dev", "eth0", "scope", "link")
        ns.ip("route", "add", "default", "via", self.POD_GATEWAY, "dev", "eth0")
        ns.ip("neigh", "add", self.POD_GATEWAY, "lladdr", mac, "dev", "eth0", "nud", "permanent")
        t = str(table)
        self.node.ip("route", "add", gateway, "dev", vlan, "scope", "link", "table", t)
        self.node.ip("route", "add", "default", "via", gateway, "dev", vlan, "table", t)
        self.node.ip("route", "add", f"{ip}/32", "dev", veth, "scope", "link", "table", t)
        for iif in (vlan, veth):
            self.node.ip(
                "rule", "add", "priority", str(self.VPC_CNI_IIF_PRIORITY), "iif", iif,
                "lookup", t,
            )  # fmt: skip
        return BranchEniPod(ns, ip, veth, vlan, table, gateway)

    def remove_branch_eni_pod(self, pod: BranchEniPod) -> None:
        """What the VPC CNI's teardown leaves behind: no pod netns (its veth goes with it, and the
        route through it), no VLAN link, no iif rules for its table."""
        self.delete(pod.netns)
        self.node.ip("link", "del", pod.vlan)
        for iif in (pod.vlan, pod.veth):
            self.node.ip("rule", "del", "priority", str(self.VPC_CNI_IIF_PRIORITY), "iif", iif)

    def delete(self, ns: Netns) -> None:
        """Delete one namespace now (a pod that went away)."""
        self._created.remove(ns)
        run("ip", "netns", "del", ns.name)

    def close(self) -> None:
        errors = []
        for ns in reversed(self._created):
            try:
                run("ip", "netns", "del", ns.name)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._created.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
