"""What our plugin costs a pod's start in a real container runtime.

    flock /tmp/zr-bench.lock .venv/bin/python -m bench.runtime [--sandboxes 20] [--quick]

On the node the containerd end-to-end tests run on (`testing.containerd.runtime_node`: containerd's
CRI plugin, runc, a bridge/host-local primary), sandboxes are run, stopped and removed over CRI as
kubelet does, one at a time, timing `RunPodSandbox` (the whole CNI chain's ADD runs inside it) and
`StopPodSandbox` + `RemovePodSandbox` (the chain's DEL), in three series:

- `no_plugin`: the primary alone, before the agent has ever run (its entry is not in the chain);
- `not_in_mesh`: the real agent (info logging, its own drift period) chained in, a pod of a
  namespace outside the mesh (the plugin asks the agent, passes);
- `mesh`: the same chain, with the fake ztunnel starting a stand-in per pod; a pod of an enrolled
  namespace, so the ADD waits for its rules, ztunnel's ack and the host set.

The series run in that order, each as a block, every pod created in the API before its sandbox
runs (the agent has it cached, as when kubelet starts a pod it was just given). A block, not pods
alternating: what a removal leaves running after `RemovePodSandbox` returns (the kernel's
teardown of the netns, the agent's bookkeeping) falls on the next sandbox's start, and with mesh
and other pods alternating the pods outside the mesh paid ~20 ms of the mesh pods' here; in a
block each pod pays for one of its own kind, as on a node starting one kind of pod. One
untimed sandbox leads each block (the very first also pays containerd's warm-up). containerd's
files go on a tmpfs where there is one (`TMPFS`): its database syncs to disk on every write,
and the disk is not what is measured. The overhead is each series minus `no_plugin`, at p50 and
p99, and its ratio to `no_plugin`: on a shared machine the ratio within one run is the figure to
judge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Final

import structlog

from bench.report import runtime_markdown
from bench.summary import Latency
from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.testing import containerd as ctd
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel

NO_PLUGIN: Final = "no_plugin"
MESH: Final = "mesh"
NOT_IN_MESH: Final = "not_in_mesh"
SERIES_NAMESPACES: Final = {
    NO_PLUGIN: ctd.PLAIN_NAMESPACE,
    NOT_IN_MESH: ctd.PLAIN_NAMESPACE,
    MESH: ctd.MESH_NAMESPACE,
}
"""The series in the order they run, and their pods' namespace."""
SERIES: Final = tuple(SERIES_NAMESPACES)
DEFAULT_SANDBOXES: Final = 20
QUICK_SANDBOXES: Final = 5
DEL_TIMEOUT: Final = 15.0
TMPFS: Final = Path("/dev/shm")
"""Where containerd's files go, so that the disk is not timed (`runtime_node`)."""


class RuntimeBenchError(RedirectError):
    """The sandboxes did not go through the chain as the series says (the numbers would lie)."""


Samples = dict[str, dict[str, list[float]]]
"""series -> {"run_ms": [...], "stop_remove_ms": [...]}"""


def overhead(base: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """`other` against `base` (two `Latency.as_dict()`): milliseconds added and ratio, at p50
    and p99."""
    out: dict[str, float] = {}
    for q in ("p50", "p99"):
        b, o = base[f"{q}_ms"], other[f"{q}_ms"]
        out[f"{q}_added_ms"] = round(o - b, 3)
        out[f"{q}_ratio"] = round(o / b, 3) if b > 0 else float("inf")
    return out


def summarise(samples: Samples, *, sandboxes: int, runtime_version: str) -> dict[str, Any]:
    """The report's `runtime` section from the samples of every series."""
    latency = {
        phase: {s: Latency.of(samples[s][phase]).as_dict() for s in SERIES}
        for phase in ("run_ms", "stop_remove_ms")
    }
    return {
        "sandboxes": sandboxes,
        "runtime": runtime_version,
        "run_pod_sandbox": latency["run_ms"],
        "stop_remove": latency["stop_remove_ms"],
        "overhead": {
            phase: {
                s: overhead(latency[key][NO_PLUGIN], latency[key][s]) for s in (MESH, NOT_IN_MESH)
            }
            for phase, key in (("run_pod_sandbox", "run_ms"), ("stop_remove", "stop_remove_ms"))
        },
        "samples": {
            s: {phase: [round(v, 3) for v in values] for phase, values in by_phase.items()}
            for s, by_phase in samples.items()
        },
    }


async def measure_runtime(sandboxes: int = DEFAULT_SANDBOXES) -> dict[str, Any]:
    """The three series of `sandboxes` each; `{"skipped": reason}` where containerd cannot run."""
    if sandboxes < 1:
        raise ValueError("at least one sandbox per series")
    reason = ctd.unavailable()
    if reason is not None:
        return {"skipped": reason}
    samples: Samples = {s: {"run_ms": [], "stop_remove_ms": []} for s in SERIES}
    uids: dict[str, list[str]] = {s: [] for s in SERIES}

    async with ctd.runtime_node(under=TMPFS if TMPFS.is_dir() else None) as node:
        names: dict[str, tuple[str, str]] = {}
        for series, namespace in SERIES_NAMESPACES.items():
            for i in range(sandboxes):
                # In the API (and the agent's cache) before the sandbox, as kubelet runs it.
                name = f"{series.replace('_', '-')}-{i}"
                uid = node.create_pod(name, namespace)
                uids[series].append(uid)
                names[uid] = (name, namespace)
        version = (await asyncio.to_thread(node.containerd.cri.version)).runtime_version
        zt: FakeZtunnel | None = None
        for series, namespace in SERIES_NAMESPACES.items():
            if series != NO_PLUGIN and zt is None:
                await node.start_agent(log_level="info", reconcile_period=None)
                zt = await node.ztunnel()
            # Untimed: the first sandbox of a series follows one of another kind, whose netns
            # the kernel may still be tearing down (the first of all pays containerd's warm-up).
            lead = f"lead-{series.replace('_', '-')}", namespace
            await node.timed_pod(*lead, node.create_pod(*lead))
            for uid in uids[series]:
                timing = await node.timed_pod(*names[uid], uid)
                samples[series]["run_ms"].append(timing.run_s * 1e3)
                samples[series]["stop_remove_ms"].append(timing.remove_s * 1e3)
        if zt is None:  # pragma: no cover - SERIES holds the plugin's series
            raise RuntimeBenchError("no series ran with the plugin")
        # Then the pods are deleted from the API, as kubelet does once their sandboxes are gone:
        # the agent tells ztunnel then (it learns of a sandbox removed under a pod that stays,
        # which the netns it watches outlives, only at its backstop pass).
        for uid in uids[MESH]:
            node.api.delete_pod(names[uid][1], names[uid][0])
        async with asyncio.timeout(DEL_TIMEOUT):
            for uid in uids[MESH]:
                await zt.wait_request(RequestKind.DEL, uid)
        reached = {r.uid for r in zt.requests if r.kind is RequestKind.ADD}
    if missing := set(uids[MESH]) - reached:
        raise RuntimeBenchError(f"ztunnel got no Add for {len(missing)} mesh pods")
    if strays := set(uids[NOT_IN_MESH]) & reached:
        raise RuntimeBenchError(f"{len(strays)} pods not in the mesh reached ztunnel")
    return summarise(samples, sandboxes=sandboxes, runtime_version=version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__.split("\n")[0])
    p.add_argument("--sandboxes", type=int, default=DEFAULT_SANDBOXES, help="per series")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SANDBOXES} per series")
    p.add_argument("--json", type=Path, help="also write the section as JSON here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("containerd and network namespaces need root", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    data = asyncio.run(measure_runtime(QUICK_SANDBOXES if args.quick else args.sandboxes))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(runtime_markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
