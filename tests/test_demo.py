"""`make demo` (`python -m ztunnel_redirect.app.demo`) runs to the end on this machine, says what
happened, and leaves none of its network namespaces behind."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

import pytest

from ztunnel_redirect.testing.netnslab import PREFIX, leftovers

pytestmark = pytest.mark.kernel

DEMO_TIMEOUT = 90.0
"""The demo takes under 30 s; this only bounds a wedged run."""


def test_demo_runs_explains_and_cleans_up() -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ztunnel_redirect.app.demo"],
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess.run killed the demo: its finally blocks did not run; say what it printed.
        pytest.fail(f"demo did not finish within {DEMO_TIMEOUT}s:\n{exc.stdout!r}")
    out = result.stdout
    run = re.search(r"^demo run (\w+)$", out, re.MULTILINE)
    assert run is not None, out + result.stderr
    left = [name for name in leftovers() if name.startswith(f"{PREFIX}{run.group(1)}-")]
    assert left == [], f"namespaces left behind: {left}"
    assert result.returncode == 0, out + result.stderr

    # Each step said what happened.
    assert "agent pid" in out and "is ready" in out
    assert "ztunnel Add a (1 netns fd)" in out
    assert "ztunnel Add b (1 netns fd)" in out
    assert re.search(r"ztunnel-redirect-cni ADD for demo/c .* exited 0", out)
    assert "printed prevResult back unchanged: True" in out
    # The short ruleset of pod a, with the outbound redirect and the policy-routing rule.
    assert "redirect to :15001" in out
    assert "fwmark 0x111/0xfff lookup 100" in out
    # Per-hop proof, with the address the app saw.
    assert "hop 1: a's ztunnel caught it outbound on :15001" in out
    assert "hop 2: b's ztunnel caught it inbound on :15006 (client 10.244.0." in out
    assert "hop 1: c's ztunnel caught it outbound" in out
    assert re.search(r"the app answered: 'app b saw 10\.244\.0\.\d+'", out)
    for pod in "abc":
        assert f"{pod}: ambient.istio.io/redirection=enabled" in out
    assert "the kernel announced the change in pod a's netns (nft)" in out
    assert re.search(
        r"repaired it \d+ ms after the flush, .* the table holds 4 redirect rules", out, re.S
    )
    assert "exit code 0" in out
    assert f"no {PREFIX}{run.group(1)}-* namespace is left" in out
    assert out.rstrip().endswith("demo finished")


async def test_demo_interrupted_mid_way_removes_what_it_created() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztunnel_redirect.app.demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run_id = ""
    try:
        async with asyncio.timeout(DEMO_TIMEOUT):
            assert proc.stdout is not None
            while line := (await proc.stdout.readline()).decode():
                if found := re.match(r"demo run (\w+)$", line.strip()):
                    run_id = found.group(1)
                if "Step 4:" in line:  # the agent runs and pods a and b are enrolled
                    break
            assert run_id, "the demo did not say its run id"
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, out.decode() + err.decode()
    assert "interrupted" in err.decode()
    left = [name for name in leftovers() if name.startswith(f"{PREFIX}{run_id}-")]
    assert left == []
    assert f"no {PREFIX}{run_id}-* namespace is left" in out.decode()
