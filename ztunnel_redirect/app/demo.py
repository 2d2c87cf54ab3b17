"""`make demo`: the real agent on this machine, no cluster needed, told step by step.

A small node is built out of network namespaces (`testing.node.TestNode`) with the fake API server
in this process; the real agent runs as its own process against it, and a fake ztunnel (a real ZDS
client) starts a ztunnel stand-in in each pod it is given. Two pods are labelled into the mesh
through their namespace, a third arrives the way a container runtime creates it (the CNI plugin
file, run with the `CNI_*` environment and `prevResult` on stdin). Then a few requests show which
stand-in caught which connection and the address the app saw; a table flushed by hand is repaired on
the kernel's notification of the change, without waiting for the backstop pass. Everything this run
created is removed at the end, also on Ctrl-C or failure, and the run checks that none of its `zr-`
namespaces is left.

The agent process, the CNI runtime and what they are observed through come from
`testing.agentprocess`, which the end-to-end tests drive too.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ztunnel_redirect.adapters import logs
from ztunnel_redirect.adapters.zds import RequestKind
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.testing.agentprocess import (
    EVENT_TIMEOUT,
    AgentProcess,
    AgentWaitError,
    CniRuntime,
    built_plugin,
    connect_ztunnel,
    prev_result,
    standin_of,
    status_annotation,
    wait_pod_settled,
)
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.netnslab import PREFIX, leftovers
from ztunnel_redirect.testing.node import NodePod, TestNode
from ztunnel_redirect.testing.standin import Hop, HopKind
from ztunnel_redirect.testing.traffic import App, request

__all__ = ["DemoError", "main"]

TRAFFIC_TIMEOUT: Final = 5.0
PERIOD: Final = 2.0
"""The agent's backstop pass in the demo (seconds; 300 by default): a pass is also the demo's
sign that the agent has handled every event of a pod (`wait_pod_settled`)."""
APP_PORT: Final = 8080
NAMESPACE: Final = "demo"


class DemoError(Exception):
    """Something the demo expected did not happen; the message says what."""


# --- the story ------------------------------------------------------------------------------------


class _Narrator:
    def __init__(self) -> None:
        self._started = time.monotonic()
        self._step = 0

    def step(self, title: str) -> None:
        self._step += 1
        print(
            f"\n[{time.monotonic() - self._started:5.1f}s] Step {self._step}: {title}", flush=True
        )

    def say(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"    {line}", flush=True)


def _short_ruleset(pod: NodePod) -> str:
    """The pod's nat table, comments and counters stripped, and its policy-routing rule."""
    table = pod.lab.netns.exec("nft", "list", "table", "inet", c.NAT_TABLE)
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    lines = [line.replace(" counter packets 0 bytes 0", "") for line in lines]
    rule = next(
        (r for r in pod.lab.netns.ip("rule").splitlines() if r.startswith(f"{c.RULE_PRIORITY}:")),
        "(no rule)",
    )
    return "\n".join([*lines, f"ip rule  {rule.strip()}"])


async def _connect(
    say: _Narrator, zt: FakeZtunnel, client: NodePod, server: NodePod
) -> tuple[Hop, Hop]:
    """One request client → server's app; says which stand-in caught it and what the app saw."""
    out_standin, in_standin = standin_of(zt, client), standin_of(zt, server)
    out_standin.clear()
    in_standin.clear()
    reply = await asyncio.to_thread(
        request, client.path, server.ips[0], APP_PORT, timeout=TRAFFIC_TIMEOUT
    )
    dst = (server.ips[0], APP_PORT)
    outbound = await asyncio.to_thread(
        out_standin.wait_for,
        lambda h: h.kind is HopKind.OUTBOUND and h.original_dst == dst,
        timeout=TRAFFIC_TIMEOUT,
    )
    inbound = await asyncio.to_thread(
        in_standin.wait_for,
        lambda h: h.kind is HopKind.INBOUND and h.original_dst == dst,
        timeout=TRAFFIC_TIMEOUT,
    )
    say.say(
        f"{client.name} ({client.ips[0]}) -> {server.name} ({dst[0]}:{dst[1]})\n"
        f"  hop 1: {client.name}'s ztunnel caught it outbound on :{c.OUTBOUND_PORT} "
        f"(client {outbound.client[0]}, original destination {outbound.original_dst[0]}:"
        f"{outbound.original_dst[1]})\n"
        f"  hop 2: {server.name}'s ztunnel caught it inbound on :{c.INBOUND_PLAINTEXT_PORT} "
        f"(client {inbound.client[0]})\n"
        f"  the app answered: {reply.decode().strip()!r}"
    )
    expected = f"app {server.name} saw {client.ips[0]}\n".encode()
    if reply != expected:
        raise DemoError(f"the app answered {reply!r}, expected {expected!r}")
    return outbound, inbound


async def _story(say: _Narrator, api: ApiServer, node: TestNode, work: Path) -> None:
    say.step("a node on this machine")
    say.say(
        f"Network namespaces {PREFIX}{node.lab.run_id}-* play the node and its pods; the fake "
        f"API server listens on {api.url};\nthe node's /proc is faked in {node.proc}."
    )
    a = await asyncio.to_thread(node.add_pod, "a", NAMESPACE)
    b = await asyncio.to_thread(node.add_pod, "b", NAMESPACE)
    say.say(f"pods: a {a.ips[0]} and b {b.ips[0]} in namespace {NAMESPACE!r}, not in the mesh")

    say.step("start the agent (a real process) and a fake ztunnel")
    agent = AgentProcess.for_node(
        node, "--log-level", "debug", "--reconcile-period", str(PERIOD), log_path=work / "agent.log"
    )
    zt: FakeZtunnel | None = None
    apps: list[App] = []
    try:
        await agent.start()
        say.say(f"agent pid {agent.pid} is ready; its log: {agent.log_path}")
        zt = await connect_ztunnel(node.ztunnel_socket)
        say.say(f"ztunnel connected on {node.ztunnel_socket} and got its (empty) snapshot")
        scene = _Scene(say, api, node, agent, zt, work, apps)
        await _enrolled_story(scene, a, b)
    finally:
        for app in apps:
            await asyncio.to_thread(app.close)
        if zt is not None:
            await zt.close()
        rc = await agent.stop()
        say.say(f"agent stopped (exit code {rc}); it leaves the rules in place on SIGTERM")


@dataclass
class _Scene:
    say: _Narrator
    api: ApiServer
    node: TestNode
    agent: AgentProcess
    zt: FakeZtunnel
    work: Path
    apps: list[App] = field(default_factory=list)


async def _enrolled_story(scene: _Scene, a: NodePod, b: NodePod) -> None:
    say, api, node, agent, zt, work = (
        scene.say, scene.api, scene.node, scene.agent, scene.zt, scene.work
    )  # fmt: skip
    say.step(f"label namespace {NAMESPACE!r} {c.ENROLL_LABEL}={c.ENROLL_VALUE}")
    await asyncio.to_thread(node.enroll_namespace, NAMESPACE)
    for pod in (a, b):
        await api.wait_for_annotation(
            NAMESPACE, pod.name, c.STATUS_ANNOTATION, "enabled", timeout=EVENT_TIMEOUT
        )
    say.say("the agent installed the rules in a and b and handed both to ztunnel:")
    for pod in (a, b):
        added = await zt.wait_request(RequestKind.ADD, pod.uid)
        say.say(f"  ztunnel Add {pod.name} ({added.fds} netns fd)")

    say.step("pod c is created the way a container runtime does it: the CNI plugin")
    c_pod = await asyncio.to_thread(node.add_pod, "c", NAMESPACE, ips=False)
    runtime = CniRuntime.for_node(node, work / "bin", await asyncio.to_thread(built_plugin))
    runtime.install()
    outcome = await runtime.add(c_pod)
    if outcome.rc != 0:
        raise DemoError(f"CNI ADD for c failed: {outcome.stdout}{outcome.stderr}")
    say.say(
        f"{runtime.plugin} ADD for {NAMESPACE}/c (netns {c_pod.path}) exited {outcome.rc} in "
        f"{outcome.seconds * 1e3:.0f} ms\nand printed prevResult back unchanged: "
        f"{outcome.json == prev_result(c_pod)}"
    )
    await asyncio.to_thread(node.report_ips, c_pod)
    await wait_pod_settled(api, agent, c_pod)
    seen = ", ".join(r.kind.value for r in zt.requests if r.uid == c_pod.uid)
    say.say(
        f"the kubelet reported c's IP {c_pod.ips[0]}; c is enrolled "
        f"(what ztunnel got for c: {seen})"
    )

    say.step("the rules in pod a (nftables, short)")
    say.say(await asyncio.to_thread(_short_ruleset, a))

    say.step("a few requests")
    for server in (b, c_pod):
        app = App(server.path, APP_PORT, name=server.name)
        await asyncio.to_thread(app.start)
        scene.apps.append(app)
    await _connect(say, zt, a, b)
    await _connect(say, zt, c_pod, b)
    await _connect(say, zt, b, c_pod)

    say.step("the annotation on each pod")
    for pod in (a, b, c_pod):
        say.say(f"{pod.name}: {c.STATUS_ANNOTATION}={status_annotation(api, pod)}")

    say.step(f"drift: flush table inet {c.NAT_TABLE} in pod a by hand")
    mark = agent.mark
    flushed_at = time.monotonic()
    await asyncio.to_thread(a.lab.netns.exec, "nft", "flush", "table", "inet", c.NAT_TABLE)
    changed = await agent.wait_event("netns_changed", key=a.uid, since=mark)
    say.say(f"the kernel announced the change in pod a's netns ({changed.get('source')})")
    repaired = await agent.wait_event("drift_repaired", pod_uid=a.uid, since=mark)
    took = time.monotonic() - flushed_at
    rules = await asyncio.to_thread(a.lab.netns.exec, "nft", "list", "table", "inet", c.NAT_TABLE)
    say.say(
        f"the agent repaired it {1000 * took:.0f} ms after the flush, without waiting for its "
        f"backstop pass (every {PERIOD:.0f}s here): reason {repaired.get('reason')}, "
        f"{repaired.get('changes')} change(s), {repaired.get('duration_ms')} ms; the table holds "
        f"{rules.count('redirect')} redirect rules again"
    )
    await _connect(say, zt, a, b)


async def _run() -> None:
    say = _Narrator()
    work = Path(tempfile.mkdtemp(prefix="zr-demo-"))
    run_id = ""
    try:
        async with ApiServer() as api:
            node = await asyncio.to_thread(TestNode, api)
            run_id = node.lab.run_id
            print(f"demo run {run_id}", flush=True)
            try:
                await _story(say, api, node, work)
            finally:
                say.step("clean up")
                await asyncio.to_thread(node.close)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if run_id:
            left = [n for n in leftovers() if n.startswith(f"{PREFIX}{run_id}-")]
            if left:
                raise DemoError(f"namespaces left behind: {', '.join(left)}")
            say.say(f"no {PREFIX}{run_id}-* namespace is left; the temporary files are removed")


async def _guarded() -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        # SIGTERM ends the demo as Ctrl-C does: the main task is cancelled and cleanup runs.
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await _run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main() -> int:
    # The in-process helpers (fake API server, stand-ins) only speak up when something is wrong;
    # the agent's own log goes to its file.
    logs.configure(fmt="console", level="warning", stream=sys.stderr)
    try:
        asyncio.run(_guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; what the demo created was removed", file=sys.stderr)
        return 130
    except (DemoError, AgentWaitError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    print("\ndemo finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
