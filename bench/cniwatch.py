"""How fast our CNI entry comes back after the primary CNI rewrites its config (issue: inotify
instead of polling the conf dir).

`measure_entry_restore` runs the agent's own `CniKeeper` (inotify on the conf dir) against a
temporary conf dir holding a Calico-shaped conflist and the built plugin executable, then
rewrites the conflist `rounds` times as calico-node does on restart (in place: truncate, write,
close) and times each rewrite to the keeper's pass that put our entry back. Nothing is polled:
the time is inotify's wake-up, the event loop, one `ensure()` in a thread and its atomic write.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from ztunnel_redirect.adapters.cniinstall import CniInstaller, CniKeeper
from ztunnel_redirect.testing.agentprocess import built_plugin

PRIMARY: Final = {
    "name": "k8s-pod-network",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "calico", "datastore_type": "kubernetes", "ipam": {"type": "calico-ipam"}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
    ],
}
TIMEOUT: Final = 10.0
LONG_PERIOD: Final = 3600.0
"""The keeper's periodic re-check, never reached: only inotify wakes it."""


async def measure_entry_restore(rounds: int = 50) -> dict[str, Any]:
    """Milliseconds from a rewrite of the primary's conflist to our entry back in it: p50, p99,
    max over `rounds` rewrites."""
    plugin = await asyncio.to_thread(built_plugin)
    root = Path(tempfile.mkdtemp(prefix="zr-cniwatch-"))
    try:
        conf_dir, bin_dir = root / "net.d", root / "bin"
        conf_dir.mkdir()
        primary = conf_dir / "10-calico.conflist"
        content = json.dumps(PRIMARY, indent=2)
        primary.write_text(content)
        installer = CniInstaller(
            bin_dir=str(bin_dir), conf_dir=str(conf_dir), plugin_source=str(plugin)
        )
        wrote = asyncio.Event()
        done_at = [0.0]

        def on_pass(changed: bool) -> None:
            if changed:
                done_at[0] = time.perf_counter()
                wrote.set()

        keeper = CniKeeper(installer, period=LONG_PERIOD, on_pass=on_pass)
        task = asyncio.create_task(keeper.run(), name="bench-cni-keeper")
        try:
            await asyncio.wait_for(wrote.wait(), TIMEOUT)  # the first install
            samples = []
            for _ in range(rounds):
                wrote.clear()
                started = time.perf_counter()
                primary.write_text(content)  # calico-node restarts
                await asyncio.wait_for(wrote.wait(), TIMEOUT)
                samples.append((done_at[0] - started) * 1e3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ordered = sorted(samples)
    return {
        "rounds": rounds,
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
    }


if __name__ == "__main__":
    print(asyncio.run(measure_entry_restore()))
