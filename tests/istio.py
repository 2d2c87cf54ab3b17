"""Istio's iptables backend in lab network namespaces, as its CNI agent leaves it: the
`iptables-restore --noflush` payloads of tests/data/iptables (modelled on istio/istio
cni/pkg/iptables) in either flavour, its ip rule and table-100 route, and its probe ipsets.
Shared by the migration tests and the agent tests that migrate a node.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.kernel.migration import Flavour
from ztunnel_redirect.kernel.routing import Family
from ztunnel_redirect.testing.netnslab import Lab, LabPod, Netns

DATA = Path(__file__).parent / "data" / "iptables"


def sh(path: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    """Run a tool in a lab netns (nsenter: /proc/net then shows that netns)."""
    result = subprocess.run(
        ["nsenter", f"--net={path}", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {path}: {result.stderr.strip()}")
    return result.stdout


def restore(path: str, flavour: Flavour, family: Family, payload: str) -> None:
    base = "ip6tables" if family is Family.V6 else "iptables"
    sh(path, f"{base}-{flavour.value}-restore", "--noflush", "-w", "5", stdin=payload)


def save(path: str, flavour: Flavour, family: Family) -> str:
    base = "ip6tables" if family is Family.V6 else "iptables"
    if flavour is Flavour.LEGACY:
        names = "ip6_tables_names" if family is Family.V6 else "ip_tables_names"
        if not sh(path, "cat", f"/proc/net/{names}").split():
            return ""
    text = sh(path, f"{base}-{flavour.value}-save")
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def all_saves(path: str) -> str:
    return "".join(save(path, flavour, family) for flavour in Flavour for family in Family)


def install_istio_pod(pod: LabPod, flavour: Flavour) -> None:
    """Istio's in-pod rules for both families, its ip rule and its local route."""
    restore(pod.path, flavour, Family.V4, (DATA / "pod-v4.rules").read_text())
    restore(pod.path, flavour, Family.V6, (DATA / "pod-v6.rules").read_text())
    for v in ("-4", "-6"):
        pod.netns.ip(v, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "100", "pref", "32764")
    pod.netns.ip("-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    pod.netns.ip("-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")


def install_istio_host(node: Netns, flavour: Flavour, members: dict[str, str]) -> None:
    """Istio's probe ipsets (hash:ip with comments) and its ISTIO_POSTRT SNAT chain."""
    for name, family in ((c.HOST_SET_V4, "inet"), (c.HOST_SET_V6, "inet6")):
        sh(node.path, "ipset", "create", name, "hash:ip", "family", family, "comment")
    for ip, uid in members.items():
        name = c.HOST_SET_V6 if ":" in ip else c.HOST_SET_V4
        sh(node.path, "ipset", "add", name, ip, "comment", uid)
    restore(node.path, flavour, Family.V4, (DATA / "host-v4.rules").read_text())
    restore(node.path, flavour, Family.V6, (DATA / "host-v6.rules").read_text())


@functools.cache
def legacy_unavailable() -> str | None:
    """Why iptables-legacy cannot be used here, or None (tried in a throwaway lab netns)."""
    if shutil.which("iptables-legacy-restore") is None:
        return "iptables-legacy is not installed"
    if not Path("/proc/net/ip_tables_names").exists():
        return "the kernel has no legacy x_tables (no /proc/net/ip_tables_names)"
    with Lab() as lab:
        probe = lab.add_netns("legacy-probe")
        try:
            restore(probe.path, Flavour.LEGACY, Family.V4, "*nat\nCOMMIT\n")
            restore(probe.path, Flavour.LEGACY, Family.V6, "*nat\nCOMMIT\n")
        except RuntimeError as exc:
            return f"legacy iptables tables cannot be loaded on this kernel: {exc}"
    return None


def need(flavour: Flavour) -> None:
    if shutil.which("iptables-nft-restore") is None or shutil.which("ipset") is None:
        pytest.skip("iptables/ipset are not installed (make setup installs them)")
    if flavour is Flavour.LEGACY and (reason := legacy_unavailable()):
        pytest.skip(reason)
