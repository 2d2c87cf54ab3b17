"""The CNI plugin executable (cniplugin/), built once by `make cni-plugin` and run as a subprocess
exactly as a container runtime runs it: the `CNI_*` environment, the network config on stdin.

Against a fake agent (aiohttp on a real Unix socket, recording what is posted), the agent's real
event server (`cnievents`) with a fake reconciler, and no agent at all, where each row of the
decision table (cniplugin/README.md) decides from a decision file written here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fakes import FakeReconciler
from ztunnel_redirect.adapters.cnievents import CniAddEvent, CniEventServer
from ztunnel_redirect.core import constants
from ztunnel_redirect.core.model import PodUid

REPO = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "ztunnel-redirect-cni"
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CHECK_VERSIONS = tuple(v for v in VERSIONS if v >= "0.4.0")
"""CHECK exists from CNI 0.4.0 on (string order is version order for these)."""
POD_UID = "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80"
NETNS = "/var/run/netns/cni-6f1e2d3c-aaaa-bbbb-cccc-0123456789ab"
MAX_STDIN = 1 << 20
DECISION_FILE = "cni-decisions.json"
UNREACHABLE = "is the ztunnel-redirect DaemonSet pod running on this node?"


def build(out: Path) -> Path:
    binary = out / PLUGIN_NAME
    subprocess.run(
        ["make", "-s", "--no-print-directory", "cni-plugin", f"CNI_PLUGIN={binary}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return binary


@pytest.fixture(scope="session")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("go") is None:
        pytest.fail("go is not installed: run `make system-packages`")
    return build(tmp_path_factory.mktemp("cni"))


def prev_result(version: str) -> dict[str, Any]:
    """What a primary plugin (ptp/bridge-like) hands on, in the shape of each version."""
    v4: dict[str, Any] = {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}
    v6: dict[str, Any] = {"address": "fd00:10:244:1::7/64", "interface": 0}
    if version.startswith("0."):
        v4["version"] = "4"
        v6["version"] = "6"
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": NETNS}],
        "ips": [v4, v6],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]},
    }


def net_conf(version: str = "1.0.0", **ours: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "kindnet",
        "type": PLUGIN_NAME,
        "prevResult": prev_result(version),
    }
    conf.update(ours)
    return conf


def pod_args(namespace: str = "shop", name: str = "web-0", uid: str | None = None) -> str:
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
    return args + (f";K8S_POD_UID={uid}" if uid else "") + ";K8S_POD_INFRA_CONTAINER_ID=abc"


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def error(self, code: int, version: str = "1.0.0") -> dict[str, Any]:
        """The CNI error object, checked: non-zero exit, exactly the four keys, code, version."""
        assert self.rc != 0, self.stdout
        error: dict[str, Any] = self.json
        assert set(error) == {"cniVersion", "code", "msg", "details"}
        assert (error["code"], error["cniVersion"]) == (code, version), error
        return error


async def run_plugin(
    plugin: Path,
    command: str | None,
    stdin: bytes | Mapping[str, Any],
    *,
    cni_args: str | None = None,
    netns: str | None = NETNS,
    argv: tuple[str, ...] = (),
) -> Outcome:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_CONTAINERID": "6f1e2d3c" * 8}
    env |= {"CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": cni_args or pod_args()}
    if command is not None:
        env["CNI_COMMAND"] = command
    if netns is not None:
        env["CNI_NETNS"] = netns
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    proc = await asyncio.create_subprocess_exec(
        *(argv or (str(plugin),)),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate(data)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    assert not err.startswith(b"panic") and b"goroutine " not in err, err.decode()
    return Outcome(proc.returncode, out.decode(), err.decode())


# --- The executable itself ----------------------------------------------------------------------


def test_static_executable(plugin: Path) -> None:
    data = plugin.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert b"/lib64/ld-linux" not in data and b"/lib/ld-" not in data  # no program interpreter
    if shutil.which("ldd"):
        ldd = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=False)
        assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    if shutil.which("file"):
        kind = subprocess.run(["file", str(plugin)], capture_output=True, text=True, check=True)
        assert "statically linked" in kind.stdout


def test_build_is_reproducible(plugin: Path, tmp_path: Path) -> None:
    assert build(tmp_path).read_bytes() == plugin.read_bytes()


# --- VERSION, DEL, CHECK, GC, STATUS, bad input ----------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_version_reports_supported_versions(plugin: Path, version: str) -> None:
    out = await run_plugin(plugin, "VERSION", {"cniVersion": version})
    assert out.rc == 0
    assert out.json == {"cniVersion": version, "supportedVersions": list(VERSIONS)}


@pytest.mark.parametrize("stdin", [b"", b"{not json", b'{"cniVersion": "0.2.0"}'])
async def test_version_without_usable_config_answers_latest(plugin: Path, stdin: bytes) -> None:
    out = await run_plugin(plugin, "VERSION", stdin)
    assert (out.rc, out.json["cniVersion"]) == (0, "1.1.0")


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"{not json",
        b"[" * 100_000,
        b" " * (MAX_STDIN + 1),
        json.dumps(net_conf("0.2.0")).encode(),
        json.dumps(net_conf("9.9.9")).encode(),
        json.dumps({"name": "kindnet", "type": PLUGIN_NAME}).encode(),
        json.dumps(net_conf(exclude_namespaces="kube-system")).encode(),
    ],
    ids=["empty", "not-json", "nested", "huge", "old", "future", "no-version", "bad-key"],
)
async def test_del_succeeds_silently_whatever_the_config(plugin: Path, stdin: bytes) -> None:
    # A failed DEL blocks the pod's teardown; there is nothing for DEL to do anyway.
    out = await run_plugin(plugin, "DEL", stdin)
    assert (out.rc, out.stdout) == (0, ""), out.stderr


@pytest.mark.parametrize("version", VERSIONS)
async def test_check_exists_from_0_4_0_on(plugin: Path, version: str, run_dir: Path) -> None:
    conf = net_conf(version, plugin_event_socket=str(run_dir / "absent.sock"))
    out = await run_plugin(plugin, "CHECK", conf)
    if version in CHECK_VERSIONS:
        assert (out.rc, out.stdout) == (0, "")
    else:
        # As containernetworking/cni's skel: "config version does not allow CHECK" (code 1).
        assert "CHECK" in out.error(1, version)["msg"]


@pytest.mark.parametrize(("command", "version", "rc"), [("GC", "1.0.0", 1), ("GC", "1.1.0", 0)])
async def test_gc_exists_from_1_1_0_on(plugin: Path, command: str, version: str, rc: int) -> None:
    out = await run_plugin(plugin, command, net_conf(version))
    if rc:
        out.error(1, version)
    else:
        assert (out.rc, out.stdout) == (0, "")


@pytest.mark.parametrize("version", VERSIONS)
async def test_status_succeeds(plugin: Path, version: str) -> None:
    out = await run_plugin(plugin, "STATUS", net_conf(version))
    assert (out.rc, out.stdout) == (0, "")


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"{not json",
        b"[]",
        b'"a string"',
        b"null",
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
        b" " * (MAX_STDIN + 1),
        json.dumps(net_conf(padding="x" * MAX_STDIN)).encode(),
    ],
    ids=[
        *("empty", "not-json", "list", "string", "null", "binary"),
        *("nested-list", "nested-object", "huge-blank", "huge-conf"),
    ],
)
async def test_malformed_or_huge_stdin_is_error_7(plugin: Path, stdin: bytes) -> None:
    out = await run_plugin(plugin, "ADD", stdin)
    out.error(7, "1.1.0")


async def test_deeply_nested_prev_result_within_the_cap_is_printed_back(
    plugin: Path, run_dir: Path
) -> None:
    # Deeper than Python's own json handles: the text is spliced in and compared as text.
    conf = net_conf(plugin_event_socket=str(run_dir / "absent.sock"), exclude_namespaces=["shop"])
    conf["prevResult"]["deep"] = "DEEP"
    nested = "[" * 5000 + "1" + "]" * 5000
    stdin = json.dumps(conf).replace('"DEEP"', nested).encode()
    out = await run_plugin(plugin, "ADD", stdin)
    assert out.rc == 0, out.stdout
    assert nested in out.stdout
    assert json.loads(out.stdout.replace(nested, '"DEEP"')) == conf["prevResult"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("exclude_namespaces", "kube-system"), ("plugin_event_socket", 7), ("prevResult", "x")],
)
async def test_wrong_types_of_our_keys_are_error_7(plugin: Path, key: str, value: Any) -> None:
    out = await run_plugin(plugin, "ADD", net_conf("0.4.0", **{key: value}))
    assert key in out.error(7, "0.4.0")["msg"]


@pytest.mark.parametrize("version", ["0.2.0", "1.2.0"])
async def test_unsupported_version_is_error_1_in_the_requested_version(
    plugin: Path, version: str
) -> None:
    out = await run_plugin(plugin, "ADD", net_conf(version))
    assert version in out.error(1, version)["msg"]


async def test_unknown_command_is_error_4(plugin: Path) -> None:
    out = await run_plugin(plugin, "FROB", net_conf())
    assert "FROB" in out.error(4)["msg"]


async def test_missing_command_is_error_4(plugin: Path) -> None:
    out = await run_plugin(plugin, None, net_conf())
    assert "CNI_COMMAND" in out.error(4)["msg"]


async def test_add_without_netns_is_error_4(plugin: Path, run_dir: Path) -> None:
    conf = net_conf(plugin_event_socket=str(run_dir / "absent.sock"))
    out = await run_plugin(plugin, "ADD", conf, netns=None)
    assert "CNI_NETNS" in out.error(4)["msg"]


# --- ADD with the agent up: a fake agent records what is posted -------------------------------


@dataclass
class FakeAgent:
    socket_path: str
    status: int = 200
    text: str = "ok"
    bodies: list[Any] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.bodies.append(json.loads(await request.read()))
        return web.Response(status=self.status, text=self.text)


@pytest.fixture
async def fake_agent(run_dir: Path) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(str(run_dir / "pluginevent.sock"))
    app = web.Application()
    app.router.add_post("/cmdadd", agent.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, agent.socket_path).start()
        yield agent
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("version", VERSIONS)
async def test_add_posts_the_event_and_prints_prev_result_unchanged(
    plugin: Path, version: str, fake_agent: FakeAgent
) -> None:
    conf = net_conf(version, plugin_event_socket=fake_agent.socket_path)
    out = await run_plugin(plugin, "ADD", conf, cni_args=pod_args(uid=POD_UID))
    assert out.rc == 0, out.stdout + out.stderr
    assert out.json == prev_result(version)
    assert fake_agent.bodies == [
        {
            "Netns": NETNS,
            "PodName": "web-0",
            "PodNamespace": "shop",
            "IPs": [{"Address": {"IP": "10.244.1.7"}}, {"Address": {"IP": "fd00:10:244:1::7"}}],
            "PodUID": POD_UID,
        }
    ]


async def test_add_without_uid_sends_none(plugin: Path, fake_agent: FakeAgent) -> None:
    out = await run_plugin(plugin, "ADD", net_conf(plugin_event_socket=fake_agent.socket_path))
    assert out.rc == 0, out.stdout
    assert [sorted(body) for body in fake_agent.bodies] == [
        ["IPs", "Netns", "PodName", "PodNamespace"]
    ]


async def test_prev_result_without_version_gets_the_request_version(
    plugin: Path, fake_agent: FakeAgent
) -> None:
    conf = net_conf("1.1.0", plugin_event_socket=fake_agent.socket_path)
    del conf["prevResult"]["cniVersion"]
    out = await run_plugin(plugin, "ADD", conf)
    assert out.rc == 0, out.stdout
    assert out.json == prev_result("1.1.0")


@pytest.mark.parametrize("version", VERSIONS)
async def test_add_without_prev_result_succeeds_with_an_empty_result(
    plugin: Path, version: str, fake_agent: FakeAgent
) -> None:
    # Attached standalone (Multus): Istio's plugin answers an empty result in the request's
    # version; the agent still hears of the pod, without IPs.
    conf = net_conf(version, plugin_event_socket=fake_agent.socket_path)
    del conf["prevResult"]
    out = await run_plugin(plugin, "ADD", conf)
    assert (out.rc, out.json) == (0, {"cniVersion": version})
    assert [body["IPs"] for body in fake_agent.bodies] == [[]]


@pytest.mark.parametrize(
    ("status", "text", "code"),
    [(500, "cannot enter netns: gone", 999), (400, "Netns is outside", 999), (503, "later", 11)],
)
async def test_add_fails_with_the_agents_answer(
    plugin: Path, fake_agent: FakeAgent, status: int, text: str, code: int
) -> None:
    fake_agent.status, fake_agent.text = status, text
    out = await run_plugin(plugin, "ADD", net_conf(plugin_event_socket=fake_agent.socket_path))
    error = out.error(code)
    assert error["msg"] == f"ztunnel-redirect agent refused pod: {text}"
    assert error["details"] == f"HTTP {status} from {fake_agent.socket_path}"


async def test_excluded_namespace_and_non_pods_never_reach_the_agent(
    plugin: Path, fake_agent: FakeAgent
) -> None:
    fake_agent.status = 500
    conf = net_conf(plugin_event_socket=fake_agent.socket_path, exclude_namespaces=["shop"])
    excluded = await run_plugin(plugin, "ADD", conf)
    conf = net_conf(plugin_event_socket=fake_agent.socket_path)
    not_a_pod = await run_plugin(plugin, "ADD", conf, cni_args="IgnoreUnknown=1")
    assert (excluded.rc, excluded.json) == (0, prev_result("1.0.0"))
    assert (not_a_pod.rc, not_a_pod.json) == (0, prev_result("1.0.0"))
    assert fake_agent.bodies == []


# --- ADD against the agent's own event server: the contract holds ----------------------------


@pytest.fixture
async def agent(run_dir: Path, fake: FakeReconciler) -> AsyncIterator[CniEventServer]:
    server = CniEventServer(fake.on_add, socket_path=str(run_dir / "pluginevent.sock"), budget=1.0)
    await server.start()
    try:
        yield server
    finally:
        if fake.release is not None:
            fake.release.set()
        await server.close()


async def test_the_agents_event_server_takes_the_event(
    plugin: Path, agent: CniEventServer, fake: FakeReconciler
) -> None:
    conf = net_conf(plugin_event_socket=agent.socket_path)
    out = await run_plugin(plugin, "ADD", conf, cni_args=pod_args(uid=POD_UID))
    assert (out.rc, out.json) == (0, prev_result("1.0.0")), out.stderr
    assert fake.events == [
        CniAddEvent(
            netns=NETNS,
            pod_name="web-0",
            pod_namespace="shop",
            ips=("10.244.1.7", "fd00:10:244:1::7"),
            pod_uid=PodUid(POD_UID),
        )
    ]


async def test_agent_too_slow_is_try_again_later(
    plugin: Path, agent: CniEventServer, fake: FakeReconciler
) -> None:
    fake.release = asyncio.Event()
    out = await run_plugin(plugin, "ADD", net_conf(plugin_event_socket=agent.socket_path))
    out.error(11)


@pytest.fixture
def chroot_dir() -> Iterator[Path]:
    # Short: the agent's socket lives inside it, and a socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="zr-root-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


async def test_runs_in_a_chroot_holding_only_itself_and_the_socket(
    plugin: Path, chroot_dir: Path, fake: FakeReconciler
) -> None:
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot(8)")
    shutil.copy(plugin, chroot_dir / PLUGIN_NAME)
    server = CniEventServer(fake.on_add, socket_path=str(chroot_dir / "pluginevent.sock"))
    await server.start()
    try:
        assert listing(chroot_dir) == ["pluginevent.sock", PLUGIN_NAME]
        conf = net_conf(plugin_event_socket="/pluginevent.sock")
        argv = ("chroot", str(chroot_dir), f"/{PLUGIN_NAME}")
        out = await run_plugin(plugin, "ADD", conf, argv=argv)
        assert (out.rc, out.json) == (0, prev_result("1.0.0")), out.stdout + out.stderr
        assert [(e.pod_namespace, e.pod_name) for e in fake.events] == [("shop", "web-0")]
    finally:
        await server.close()


# --- ADD with the agent down: the decision table, one test per row ----------------------------


def decision_file(
    pods: Mapping[str, tuple[str, str, bool]] | None = None, *, version: int = 1
) -> dict[str, Any]:
    """As the agent writes it: shop enrolled, plain not, infra excluded by the agent's settings."""
    return {
        "version": version,
        "exclude_namespaces": ["kube-system", "infra"],
        "enrolled_namespaces": ["shop"],
        "agent_pods": [{"namespace": "istio-system", "name_prefix": "ztunnel-redirect-"}],
        "pods": {
            uid: {"namespace": ns, "name": name, "in_mesh": in_mesh}
            for uid, (ns, name, in_mesh) in (pods or {}).items()
        },
    }


def write_decisions(run_dir: Path, content: Mapping[str, Any] | bytes, mode: int = 0o600) -> None:
    path = run_dir / DECISION_FILE
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    path.chmod(mode)


async def add_without_agent(
    plugin: Path, run_dir: Path, cni_args: str, *, netns: str = NETNS
) -> Outcome:
    """ADD with nothing listening on the agent's socket (its decision file is next to it)."""
    conf = net_conf(plugin_event_socket=str(run_dir / "pluginevent.sock"))
    return await run_plugin(plugin, "ADD", conf, cni_args=cni_args, netns=netns)


def assert_passes(out: Outcome) -> None:
    assert out.rc == 0, out.stdout + out.stderr
    assert out.json == prev_result("1.0.0")


def assert_fails_closed(out: Outcome, run_dir: Path, why: str) -> None:
    error = out.error(11)
    socket_path = run_dir / "pluginevent.sock"
    assert f"ztunnel-redirect agent not reachable at {socket_path}: {UNREACHABLE}" in error["msg"]
    assert why in error["msg"]


async def test_agent_down_excluded_namespace_passes(plugin: Path, run_dir: Path) -> None:
    # From the plugin's own config, without a file; and from the file.
    assert_passes(await add_without_agent(plugin, run_dir, pod_args("kube-system", "dns-0")))
    write_decisions(run_dir, decision_file({POD_UID: ("infra", "x", True)}))
    assert_passes(await add_without_agent(plugin, run_dir, pod_args("infra", "x", POD_UID)))


async def test_default_excluded_namespaces_are_the_agents(plugin: Path, run_dir: Path) -> None:
    conf = net_conf(plugin_event_socket=str(run_dir / "pluginevent.sock"))
    for namespace in constants.EXCLUDE_NAMESPACES:
        out = await run_plugin(plugin, "ADD", conf, cni_args=pod_args(namespace, "x-0"))
        assert (out.rc, out.json) == (0, prev_result("1.0.0")), out.stdout


async def test_agent_down_host_network_passes(plugin: Path, run_dir: Path) -> None:
    # The netns is the host's own: the plugin runs in it, as this test does.
    host = f"/proc/{os.getpid()}/ns/net"
    assert_passes(await add_without_agent(plugin, run_dir, pod_args(), netns=host))


async def test_agent_down_the_agents_own_pod_passes(plugin: Path, run_dir: Path) -> None:
    write_decisions(run_dir, decision_file())
    args = pod_args("istio-system", "ztunnel-redirect-x7k2p", POD_UID)
    assert_passes(await add_without_agent(plugin, run_dir, args))
    # The same name elsewhere is not the agent's.
    out = await add_without_agent(plugin, run_dir, pod_args("shop", "ztunnel-redirect-x7k2p"))
    assert_fails_closed(out, run_dir, "shop/ztunnel-redirect-x7k2p is not known to the agent")


@pytest.mark.parametrize("uid", [POD_UID, None], ids=["by-uid", "by-name"])
async def test_agent_down_pod_known_in_mesh_fails_closed(
    plugin: Path, run_dir: Path, uid: str | None
) -> None:
    write_decisions(run_dir, decision_file({POD_UID: ("plain", "web-0", True)}))
    out = await add_without_agent(plugin, run_dir, pod_args("plain", "web-0", uid))
    assert_fails_closed(out, run_dir, "pod plain/web-0 is in the ambient mesh")


@pytest.mark.parametrize("uid", [POD_UID, None], ids=["by-uid", "by-name"])
async def test_agent_down_pod_known_not_in_mesh_passes(
    plugin: Path, run_dir: Path, uid: str | None
) -> None:
    write_decisions(run_dir, decision_file({POD_UID: ("shop", "web-0", False)}))
    assert_passes(await add_without_agent(plugin, run_dir, pod_args("shop", "web-0", uid)))


async def test_agent_down_unknown_pod_in_enrolled_namespace_fails_closed(
    plugin: Path, run_dir: Path
) -> None:
    # A namesake under another UID (a StatefulSet pod recreated) does not make it known.
    write_decisions(run_dir, decision_file({"1111": ("shop", "web-0", False)}))
    out = await add_without_agent(plugin, run_dir, pod_args("shop", "web-0", POD_UID))
    why = (
        "pod shop/web-0 is not known to the agent yet and its namespace shop is in the ambient mesh"
    )
    assert_fails_closed(out, run_dir, why)


async def test_agent_down_unknown_pod_in_namespace_not_enrolled_passes(
    plugin: Path, run_dir: Path
) -> None:
    write_decisions(run_dir, decision_file())
    assert_passes(await add_without_agent(plugin, run_dir, pod_args("plain", "web-0", POD_UID)))


@pytest.mark.parametrize(
    ("content", "mode"),
    [
        (None, 0o600),
        (b"{", 0o600),
        (b"[]", 0o600),
        (decision_file(version=2), 0o600),
        ({k: v for k, v in decision_file().items() if k != "pods"}, 0o600),
        (decision_file(), 0o666),
    ],
    ids=["absent", "not-json", "not-object", "future-version", "no-pods", "world-writable"],
)
async def test_agent_down_no_usable_decision_file_fails_closed(
    plugin: Path, run_dir: Path, content: Mapping[str, Any] | bytes | None, mode: int
) -> None:
    if content is not None:
        write_decisions(run_dir, content, mode)
    out = await add_without_agent(plugin, run_dir, pod_args("plain", "web-0", POD_UID))
    assert_fails_closed(out, run_dir, "cannot tell whether pod plain/web-0 is in the ambient mesh")
    # ... except in an excluded namespace, known from the plugin's own config.
    assert_passes(await add_without_agent(plugin, run_dir, pod_args("kube-system", "dns-0")))


async def test_stale_socket_counts_as_agent_down(plugin: Path, run_dir: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(run_dir / "pluginevent.sock"))
    finally:
        sock.close()
    out = await add_without_agent(plugin, run_dir, pod_args("plain", "web-0"))
    assert "connection refused" in out.error(11)["details"]
