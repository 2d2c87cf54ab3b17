"""The install methods the benchmark compares, and the probes it runs inside pod namespaces.

Every function named `*_here` runs on a `NetnsRunner` worker that has entered a pod's netns
(`runner.run(path, fn, ...)`), so ours and the baseline pay the same cost to get there and the
comparison isolates how the rules are installed.

- ours: the core's own functions, as the agent runs them: `PodRules.apply(..., fresh=True)` for
  a new sandbox (a netns still at nftables generation 1 is not listed, the routing is not read),
  `podrules.sync_tables_here` / `sync_routing_here` for each half alone, and `PodRules.check`
  (with its remembered generations) for the drift pass.
- the fast paths against their fallbacks: a new pod's tables by the recorded netlink batch or by
  libnftables (`tables_install_here`), and a first check proven by the netlink dump or decided
  by listing the tables (`tables_first_check_here`), each timed on the worker.
- baseline, Istio's method: one `nft -f -` process per pod fed `pod_ruleset(options).script()`.
  The child is spawned from the worker thread with `subprocess.run`, so it inherits the thread's
  netns (docs/design.md §12.5: asyncio's subprocess on the loop thread would not). Its routing is
  done by our code, so only the rule install differs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Final

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift
from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.render import Ruleset
from ztunnel_redirect.kernel import routing
from ztunnel_redirect.kernel.batchreplay import Recordings
from ztunnel_redirect.kernel.dumpproof import ExpectedDumps
from ztunnel_redirect.kernel.nft import Nft, generation
from ztunnel_redirect.kernel.podrules import (
    KernelForms,
    PodState,
    sync_routing_here,
    sync_tables_here,
)

NFT_TIMEOUT: Final = 10.0
"""Bound on one `nft` child; a pod install takes milliseconds."""


class Method(Enum):
    """One way of installing a pod's redirection; each gets its own fresh set of pods."""

    BASE_RULES = "baseline_rules"
    OURS_RULES = "ours_rules"
    BASE_FULL = "baseline_full"
    OURS_FULL = "ours_full"
    OURS_ROUTING = "ours_routing"

    @property
    def label(self) -> str:
        return {
            Method.BASE_RULES: "baseline (nft -f child) rules only",
            Method.OURS_RULES: "ours (libnftables) rules only",
            Method.BASE_FULL: "baseline rules + our routing",
            Method.OURS_FULL: "ours PodRules.apply(fresh=True) (rules + routing)",
            Method.OURS_ROUTING: "ours routing only (rtnetlink)",
        }[self]


def table_names(ruleset: Ruleset) -> tuple[str, ...]:
    """Every table a check reads: the desired ones and those that must be absent."""
    return tuple(t.name for t in ruleset.tables) + ruleset.absent


def ours_rules_here(state: PodState, forms: KernelForms) -> list[Drift]:
    """The nftables half of `podrules.apply_here` on a pod never seen (no remembered generation)."""
    return sync_tables_here(state, forms, None, write=True).drifts


def table_drift_here(state: PodState, forms: KernelForms) -> list[Drift]:
    """The nftables half of `podrules.check_here`, without a remembered generation. Reads only."""
    return sync_tables_here(state, forms, None, write=False).drifts


def routing_here(state: PodState) -> list[Drift]:
    """The routing half of `podrules.apply_here` for a new sandbox (`fresh`: nothing read)."""
    return sync_routing_here(state, write=True, fresh=True)


def routing_missing_here(state: PodState) -> list[Drift]:
    return sync_routing_here(state, write=False)


class NoReplay(Recordings):
    """The batch replay switched off: `sync_tables_here` installs through libnftables."""

    def batch(self, ruleset: Ruleset, names: Iterable[str]) -> bytes:
        raise KernelError("batch replay switched off (benchmark)")


class NeverIdentical(ExpectedDumps):
    """The dump proof switched off: every first check lists the tables."""

    def identical(self, ruleset: Ruleset, *, generation: int) -> bool:
        return False


def tables_install_here(state: PodState, forms: KernelForms, *, replay: bool) -> float:
    """Milliseconds of the nftables half of a fresh install, by batch replay or libnftables."""
    t0 = time.perf_counter()
    if replay:
        outcome = sync_tables_here(state, forms, None, write=True)
    else:
        outcome = sync_tables_here(state, forms, None, write=True, recordings=NoReplay())
    ms = (time.perf_counter() - t0) * 1000
    if not outcome.drifts or (outcome.replay_refused is None) is not replay:
        raise RuntimeError(f"tables install (replay={replay}) did not take its path: {outcome}")
    return ms


def tables_first_check_here(state: PodState, forms: KernelForms, *, dump: bool) -> float:
    """Milliseconds of the nftables half of a first check (nothing remembered) of a healthy
    pod, proven by the netlink dump or decided by listing the tables. Reads only."""
    t0 = time.perf_counter()
    if dump:
        outcome = sync_tables_here(state, forms, None, write=False)
    else:
        outcome = sync_tables_here(state, forms, None, write=False, dumps=NeverIdentical())
    ms = (time.perf_counter() - t0) * 1000
    if outcome.drifts:
        raise RuntimeError(f"first check (dump={dump}) of a healthy pod saw drift: {outcome}")
    return ms


def baseline_rules_here(script: str) -> None:
    """Istio's way: one `nft -f -` process per pod, fed the whole transaction on stdin."""
    result = subprocess.run(
        ["nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=NFT_TIMEOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"nft -f - failed: {result.stderr.strip()}")


def baseline_full_here(script: str, state: PodState) -> None:
    baseline_rules_here(script)
    routing_here(state)


def flush_nat_here() -> None:
    """Drift by hand: what `nft flush table inet istio-ambient-nat` in the pod does."""
    with Nft() as nft:
        nft.run(f"flush table inet {c.NAT_TABLE}\n")


def flush_host_here() -> None:
    """Drift by hand on the host: `nft flush chain inet istio-ambient-nat postrouting` (the
    probe SNAT rules go, the sets of pod IPs stay)."""
    with Nft() as nft:
        nft.run(f"flush chain inet {c.HOST_TABLE} postrouting\n")


def handles_here(names: tuple[str, ...]) -> str:
    """`nft -a list table` of each of our tables: rule handles show any rewrite."""
    out = []
    for name in names:
        result = subprocess.run(
            ["nft", "-a", "list", "table", "inet", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=NFT_TIMEOUT,
        )
        out.append(result.stdout if result.returncode == 0 else f"(no table {name})\n")
    return "".join(out)


def child_shares_netns_here() -> tuple[str, str]:
    """(this thread's netns, a child's netns): equal when a child inherits the worker's netns."""
    mine = str(Path("/proc/thread-self/ns/net").readlink())
    child = subprocess.run(
        ["readlink", "/proc/self/ns/net"],
        capture_output=True,
        text=True,
        check=True,
        timeout=NFT_TIMEOUT,
    ).stdout.strip()
    return mine, child


nft_genid_here = generation
"""The netns's nftables generation id (every committed change bumps it, reads do not)."""


def ipv6_check_here() -> float:
    """Milliseconds of `routing.ipv6_usable()` (RTM_GETLINK for lo on a new rtnetlink socket),
    which every routing install asks. It used to read /proc/sys/net/ipv6/conf/lo/disable_ipv6,
    whose cost grew with the number of netns on the node; this one should not (the report's
    "Install cost with N" shows it)."""
    t0 = time.perf_counter()
    routing.ipv6_usable()
    return (time.perf_counter() - t0) * 1000


def noop_here() -> None:
    """Nothing: what entering the netns and the worker round trip cost by themselves."""
