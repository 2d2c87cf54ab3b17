"""`ztunnel-redirect cleanup`: everything we own goes, nothing else, and twice is harmless."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ztunnel_redirect.adapters.cniinstall import LEGACY_KUBECONFIG_NAME, CniInstaller
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.model import HostOptions, PodOptions, PodUid
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.podrules import PodRules
from ztunnel_redirect.testing.agentprocess import built_plugin
from ztunnel_redirect.testing.netnslab import Lab

pytestmark = pytest.mark.kernel

CALICO = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [{"type": "calico"}, {"type": "portmap", "capabilities": {"portMappings": True}}],
}


def run_cleanup(tmp_path: Path, lab: Lab) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ztunnel_redirect.app.cli",
            "cleanup",
            "--host-netns",
            lab.node.path,
            "--proc-root",
            str(tmp_path / "proc"),
            "--netns-dir",
            str(tmp_path / "netns"),
            "--cni-bin-dir",
            str(tmp_path / "bin"),
            "--cni-conf-dir",
            str(tmp_path / "conf"),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_cleanup_removes_ours_only_and_is_safe_twice(
    tmp_path: Path, lab: Lab, runner: NetnsRunner
) -> None:
    enrolled = [lab.add_pod("a"), lab.add_pod("b")]
    istio_iptables_pod = lab.add_pod("c")  # same ip rule as ours, but no tables of ours
    istio_iptables_pod.netns.ip(
        "rule", "add", "fwmark", "0x111/0xfff", "lookup", "100", "priority", "32764"
    )
    for pod in enrolled:
        await PodRules(runner).apply(pod.path, PodOptions(ipv6=False))
        pod.netns.exec("nft", "add", "table", "inet", "someone-else")
    await HostRules(runner, netns=lab.node.path).apply(
        HostOptions(kubelet_uid=1), {enrolled[0].ipv4: PodUid("uid-a")}
    )
    # The branch-ENI probe rules of a pod (docs/design.md §4.5), and the VPC CNI's to-pod rule of
    # a regular pod, which has the same priority but looks up main: not ours.
    lab.node.ip("rule", "add", "to", "192.168.9.9", "lookup", "109", "priority", "512")
    lab.node.ip("rule", "add", "iif", "vlan9", "lookup", "local", "priority", "9")
    lab.node.ip("rule", "add", "to", "10.0.9.9", "lookup", "main", "priority", "512")
    (tmp_path / "proc").mkdir()
    (tmp_path / "netns").mkdir()
    for pod in [*enrolled, istio_iptables_pod]:
        (tmp_path / "netns" / pod.netns.name).symlink_to(pod.path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "10-calico.conflist").write_text(json.dumps(CALICO))
    installer = CniInstaller(
        bin_dir=str(tmp_path / "bin"),
        conf_dir=str(tmp_path / "conf"),
        plugin_source=str(built_plugin()),
    )
    installer.install()
    # What an older version left: a kubeconfig with a token in the conf dir. And the decision
    # file the agent keeps in its run dir (kept while the agent is away, gone on uninstall), and
    # the event and log sockets of an agent that was killed.
    legacy = tmp_path / "conf" / LEGACY_KUBECONFIG_NAME
    legacy.write_text('{"users": [{"user": {"token": "t"}}]}')
    decisions = tmp_path / "run" / c.DECISION_FILE
    decisions.parent.mkdir()
    decisions.write_text('{"version": 1}')
    sockets = [tmp_path / "run" / name for name in (c.PLUGIN_LOG_SOCKET, c.PLUGIN_EVENT_SOCKET)]
    for path in sockets:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))

    first = run_cleanup(tmp_path, lab)

    assert first.returncode == 0, first.stderr
    for pod in enrolled:
        assert f"{pod.netns.name}: removed table inet {c.NAT_TABLE}" in first.stdout
        tables = pod.netns.exec("nft", "list", "tables")
        assert "istio-ambient" not in tables
        assert "someone-else" in tables
        assert "lookup 100" not in pod.netns.ip("rule")
    assert "lookup 100" in istio_iptables_pod.netns.ip("rule")
    assert istio_iptables_pod.netns.name not in first.stdout
    assert f"host: removed table inet {c.HOST_TABLE}" in first.stdout
    assert "istio-ambient" not in lab.node.exec("nft", "list", "tables")
    assert "host: removed ip rule to 192.168.9.9/32 lookup 109 priority 512" in first.stdout
    assert "host: removed ip rule iif vlan9 lookup local priority 9" in first.stdout
    host_rules = lab.node.ip("rule")
    assert "lookup 109" not in host_rules
    assert "vlan9" not in host_rules
    assert "to 10.0.9.9 lookup main" in host_rules
    assert "cni: removed" in first.stdout
    assert not installer.binary_path.exists()
    assert not legacy.exists()
    assert not decisions.exists()
    assert [path for path in sockets if path.exists()] == []
    assert sorted(p.name for p in (tmp_path / "conf").iterdir()) == ["10-calico.conflist"]
    conflist = json.loads((tmp_path / "conf" / "10-calico.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["calico", "portmap"]

    second = run_cleanup(tmp_path, lab)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "host: clean"
