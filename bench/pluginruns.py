"""The container runtime's side of a CNI ADD, timed in a process of its own.

A runtime is its own process: it starts the plugin and waits for it to exit, and nothing else it
does holds that up. The benchmark process is also the fake API server and the fake ztunnel, and
reads every line the agent logs; timing the plugin from its event loop would add whatever that
loop was busy with to each ADD (about 1.5 ms to a single one, tens of ms to a burst). So the runs
are made here, as `python -m bench.pluginruns`, one batch at a time:

- it reads a batch from stdin, one JSON line: a list of runs, each `{"argv", "env", "stdin"}`;
- it starts every run of the batch at once (a thread each, released together), times each from
  just before its start to its exit, and
- writes one JSON line back: per run, in order, `{"rc", "stdout", "stderr", "seconds"}`.

`PluginRuns` is the benchmark's end: it starts the process, sends batches and stops it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from ztunnel_redirect.testing.agentprocess import PluginInvocation, PluginRun

__all__ = ["PluginRuns"]

RUN_TIMEOUT: Final = 15.0
"""Seconds one plugin run may take before it is killed (a hung plugin, not a slow one)."""
BATCH_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 5.0
REPO: Final = Path(__file__).resolve().parent.parent


def _run(job: dict[str, Any], start: threading.Barrier) -> dict[str, Any]:
    start.wait(timeout=BATCH_TIMEOUT)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            job["argv"],
            input=job["stdin"].encode(),
            env=job["env"],
            capture_output=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = {"rc": -1, "stdout": "", "stderr": f"killed after {exc.timeout} s"}
    else:
        out = {
            "rc": done.returncode,
            "stdout": done.stdout.decode(),
            "stderr": done.stderr.decode(),
        }
    return out | {"seconds": time.perf_counter() - started}


def serve() -> None:
    for line in sys.stdin:
        jobs = json.loads(line)
        start = threading.Barrier(len(jobs))
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(_run, jobs, [start] * len(jobs)))
        print(json.dumps(results), flush=True)


class PluginRuns:
    """The process that runs plugins as a runtime does; `async with` starts and stops it."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> PluginRuns:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.pluginruns",
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def run(self, invocations: Sequence[PluginInvocation]) -> list[PluginRun]:
        """Every invocation started at once; their outcomes, in order."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the plugin runner is not running")
        jobs = [{"argv": i.argv, "env": i.env, "stdin": i.stdin.decode()} for i in invocations]
        proc.stdin.write(json.dumps(jobs).encode() + b"\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), BATCH_TIMEOUT)
        if not line:
            raise RuntimeError(f"the plugin runner exited (status {await proc.wait()})")
        return [
            PluginRun(r["rc"], r["stdout"], r["stderr"], r["seconds"]) for r in json.loads(line)
        ]

    async def one(self, invocation: PluginInvocation) -> PluginRun:
        (outcome,) = await self.run([invocation])
        return outcome


if __name__ == "__main__":
    serve()
