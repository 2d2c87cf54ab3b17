"""`ztunnel-redirect cleanup`: remove everything we own from a node (the uninstall path).

Ownership is recognised by our table names only (docs/design.md §11.9: Istio left rules behind after
uninstall). Every network namespace that can be found is visited: those of running processes
(the /proc scan) and those bound under the netns directories. In each, our tables are deleted, and
our policy routing too, but only where our tables were (an identical ip rule may belong to
Istio's iptables backend). Then the host table and the CNI plugin (our config entry or files, the
executable, the decision file in the agent's run dir, and a kubeconfig an older version wrote
into the CNI conf dir), and the host's branch-ENI probe rules (recognised by their shape, which is
Istio's: one Istio left behind goes too). Safe to run twice: the second run finds nothing. Not run
on upgrade restarts (the decision file is kept then: the plugin reads it while the agent is away).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel_redirect.adapters.cniinstall import CniInstaller
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.netns import NetnsRunner, netns_id
from ztunnel_redirect.kernel.nft import Nft
from ztunnel_redirect.kernel.podrules import remove_here
from ztunnel_redirect.kernel.procscan import MAX_PROCESSES, pids


@dataclass
class CleanupReport:
    pods: dict[str, list[str]] = field(default_factory=dict)
    """netns path -> what was removed there"""
    host_table: bool = False
    host_probe_rules: list[str] = field(default_factory=list)
    """the branch-ENI probe rules removed from the host"""
    cni: bool = False

    def lines(self) -> list[str]:
        out = [f"{netns}: removed {', '.join(items)}" for netns, items in self.pods.items()]
        out.append("host: removed table inet " + c.HOST_TABLE if self.host_table else "host: clean")
        out += [f"host: removed {rule}" for rule in self.host_probe_rules]
        if self.cni:
            out.append("cni: removed plugin config, executable, decision file and sockets")
        return out


def candidate_netns(*, proc_root: str, netns_dirs: Iterable[str], host_netns: str) -> list[str]:
    """One path per distinct network namespace on the node, the host's excluded."""
    seen = {k for k in (netns_id(host_netns),) if k is not None}
    paths: list[str] = []
    entries = [str(p) for d in netns_dirs if Path(d).is_dir() for p in sorted(Path(d).iterdir())]
    entries += [f"{proc_root}/{pid}/ns/net" for pid in pids(proc_root, MAX_PROCESSES)]
    for path in entries:
        key = netns_id(path)
        if key is not None and key not in seen:
            seen.add(key)
            paths.append(path)
    return paths


def _remove_if_ours() -> list[str]:
    with Nft() as nft:
        ours = any(nft.list_table(name) is not None for name in c.POD_TABLES)
    return remove_here() if ours else []


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


async def cleanup(
    runner: NetnsRunner,
    *,
    host_netns: str,
    proc_root: str = c.PROC_ROOT,
    netns_dirs: Iterable[str] = c.NETNS_DIRS,
    installer: CniInstaller | None = None,
    run_files: Sequence[Path] = (),
) -> CleanupReport:
    """`run_files`: what the agent leaves for the plugin in its run directory (the decision file,
    the event and log sockets of an agent that did not stop cleanly)."""
    report = CleanupReport()
    if installer is not None:
        # First, so that no new pod is sent to an agent that is going away.
        report.cni = installer.binary_path.exists()
        await asyncio.to_thread(installer.uninstall)
    for run_file in run_files:
        if await asyncio.to_thread(_remove, run_file):
            report.cni = True
    paths = candidate_netns(proc_root=proc_root, netns_dirs=netns_dirs, host_netns=host_netns)
    for path in paths:
        with contextlib.suppress(NetnsNotFoundError):  # the process exited meanwhile
            removed = await runner.run(path, _remove_if_ours)
            if removed:
                report.pods[path] = removed
    host = HostRules(runner, netns=host_netns)
    report.host_table = await host.remove()
    report.host_probe_rules = await host.remove_probe_rules()
    return report
