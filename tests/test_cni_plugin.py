"""The CNI plugin, run as a subprocess exactly as a container runtime runs it.

`sys.executable -I <file>` with the `CNI_*` environment and the network config on stdin, against a
real `cnievents` server with a fake reconciler, no server at all (agent down), and the fake API
server for the fallback decision.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import copy
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fakes import FakeReconciler
from ztunnel_redirect import cni_plugin, constants, enrollment
from ztunnel_redirect.cnievents import CniAddEvent, CniEventServer
from ztunnel_redirect.enrollment import EnrollmentPolicy
from ztunnel_redirect.errors import RedirectError
from ztunnel_redirect.model import Namespace, Pod, PodUid
from ztunnel_redirect.testing.apiserver import ApiServer, kubeconfig

PLUGIN = Path(cni_plugin.__file__)
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CHECK_VERSIONS = tuple(v for v in VERSIONS if v >= "0.4.0")
"""CHECK exists from CNI 0.4.0 on (string order is version order for these)."""
POD_UID = "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80"
NETNS = "/var/run/netns/cni-6f1e2d3c-aaaa-bbbb-cccc-0123456789ab"
POD_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc"
)


def prev_result(version: str) -> dict[str, Any]:
    """What a primary plugin (ptp/bridge-like) hands on, in the shape of each version."""
    v4: dict[str, Any] = {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}
    v6: dict[str, Any] = {"address": "fd00:10:244:1::7/64", "interface": 0}
    if version.startswith("0."):
        v4["version"] = "4"
        v6["version"] = "6"
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": NETNS},
        ],
        "ips": [v4, v6],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]},
    }


def net_conf(version: str = "1.0.0", **ours: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "kindnet",
        "type": "ztunnel-redirect-cni",
        "prevResult": prev_result(version),
    }
    conf.update(ours)
    return conf


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_plugin(
    command: str,
    stdin: bytes | Mapping[str, Any],
    *,
    cni_args: str = POD_ARGS,
    netns: str = NETNS,
    python: str = sys.executable,
) -> Outcome:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "6f1e2d3c" * 8,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": cni_args,
        "CNI_PATH": "/opt/cni/bin",
    }
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    proc = await asyncio.create_subprocess_exec(
        python,
        "-I",
        str(PLUGIN),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Outcome(proc.returncode, out.decode(), err.decode())


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


@pytest.fixture
async def api(run_dir: Path) -> AsyncIterator[tuple[ApiServer, Path]]:
    async with ApiServer() as server:
        path = run_dir / "kubeconfig"
        path.write_text(json.dumps(kubeconfig(server.url)))
        yield server, path


# --- VERSION, DEL, CHECK, malformed input ----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_version_reports_supported_versions(version: str) -> None:
    out = await run_plugin("VERSION", {"cniVersion": version})
    assert out.rc == 0
    assert out.json == {"cniVersion": version, "supportedVersions": list(VERSIONS)}


async def test_version_without_config_answers_latest() -> None:
    out = await run_plugin("VERSION", b"")
    assert out.rc == 0
    assert out.json["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("version", VERSIONS)
async def test_del_succeeds_silently_even_without_agent(version: str, run_dir: Path) -> None:
    conf = net_conf(version, plugin_event_socket=str(run_dir / "absent.sock"))
    out = await run_plugin("DEL", conf)
    assert (out.rc, out.stdout) == (0, "")


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"{not json",
        json.dumps(net_conf("0.2.0")).encode(),
        json.dumps(net_conf("9.9.9")).encode(),
        json.dumps({"name": "kindnet", "type": "ztunnel-redirect-cni"}).encode(),
        json.dumps(net_conf(exclude_namespaces="kube-system")).encode(),
    ],
    ids=["empty", "not-json", "old-version", "future-version", "no-version", "bad-key"],
)
async def test_del_succeeds_whatever_the_config(stdin: bytes) -> None:
    # A failed DEL blocks the pod's teardown; there is nothing for DEL to do anyway.
    out = await run_plugin("DEL", stdin)
    assert (out.rc, out.stdout) == (0, ""), out.stderr


@pytest.mark.parametrize("version", CHECK_VERSIONS)
async def test_check_succeeds_silently_even_without_agent(version: str, run_dir: Path) -> None:
    conf = net_conf(version, plugin_event_socket=str(run_dir / "absent.sock"))
    out = await run_plugin("CHECK", conf)
    assert (out.rc, out.stdout) == (0, "")


@pytest.mark.parametrize("version", sorted(set(VERSIONS) - set(CHECK_VERSIONS)))
async def test_check_before_0_4_0_is_incompatible_version(version: str) -> None:
    # As containernetworking/cni's skel: "config version does not allow CHECK" (code 1).
    out = await run_plugin("CHECK", net_conf(version))
    assert out.rc != 0
    assert out.json["code"] == 1
    assert out.json["cniVersion"] == version
    assert "CHECK" in out.json["msg"]


@pytest.mark.parametrize(("version", "rc"), [("1.0.0", 1), ("1.1.0", 0)])
async def test_gc_exists_from_1_1_0_on(version: str, rc: int) -> None:
    out = await run_plugin("GC", net_conf(version))
    assert out.rc == rc
    if rc:
        assert out.json["code"] == 1


@pytest.mark.parametrize("stdin", [b"", b"{not json", b"[]", b'"a string"'])
async def test_malformed_stdin_is_error_7(stdin: bytes) -> None:
    out = await run_plugin("ADD", stdin)
    assert out.rc != 0
    error = out.json
    assert error["code"] == 7
    assert error["cniVersion"] in VERSIONS
    assert set(error) == {"cniVersion", "code", "msg", "details"}


async def test_wrong_types_of_our_keys_are_error_7() -> None:
    out = await run_plugin("ADD", net_conf(exclude_namespaces="kube-system"))
    assert out.rc != 0
    assert out.json["code"] == 7
    assert "exclude_namespaces" in out.json["msg"]


@pytest.mark.parametrize("version", ["0.2.0", "1.2.0"])
async def test_unsupported_version_is_error_1_in_the_requested_version(version: str) -> None:
    out = await run_plugin("ADD", net_conf(version))
    assert out.rc != 0
    assert out.json["code"] == 1
    # The CNI error object carries the version of the request.
    assert out.json["cniVersion"] == version
    assert version in out.json["msg"]


async def test_add_without_prev_result_is_refused(agent: CniEventServer) -> None:
    conf = net_conf(plugin_event_socket=agent.socket_path)
    del conf["prevResult"]
    out = await run_plugin("ADD", conf)
    assert out.rc != 0
    assert out.json["code"] == 7
    assert "chained" in out.json["msg"]


async def test_unknown_command_is_error_4() -> None:
    out = await run_plugin("FROB", net_conf())
    assert out.rc != 0
    assert out.json["code"] == 4


# --- ADD with the agent up ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_add_hands_pod_to_agent_and_prints_prev_result_unchanged(
    version: str, agent: CniEventServer, fake: FakeReconciler
) -> None:
    conf = net_conf(version, plugin_event_socket=agent.socket_path)
    out = await run_plugin("ADD", conf)
    assert out.rc == 0, out.stderr
    assert out.json == prev_result(version)
    assert fake.events == [
        CniAddEvent(
            netns=NETNS,
            pod_name="web-0",
            pod_namespace="shop",
            ips=("10.244.1.7", "fd00:10:244:1::7"),
        )
    ]


async def test_add_hands_the_runtimes_pod_uid_to_the_agent(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    conf = net_conf(plugin_event_socket=agent.socket_path)
    out = await run_plugin("ADD", conf, cni_args=f"{POD_ARGS};K8S_POD_UID={POD_UID}")
    assert out.rc == 0, out.stderr
    assert [e.pod_uid for e in fake.events] == [POD_UID]


async def test_prev_result_without_version_gets_the_config_version(agent: CniEventServer) -> None:
    conf = net_conf("1.1.0", plugin_event_socket=agent.socket_path)
    del conf["prevResult"]["cniVersion"]
    out = await run_plugin("ADD", conf)
    assert out.rc == 0, out.stderr
    expected = prev_result("1.1.0")
    assert out.json == expected


async def test_add_fails_with_the_agents_message(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    fake.fail_with = RedirectError("cannot enter netns: gone")
    out = await run_plugin("ADD", net_conf(plugin_event_socket=agent.socket_path))
    assert out.rc != 0
    assert out.json["code"] == 999
    assert "cannot enter netns: gone" in out.json["msg"]


async def test_agent_too_slow_is_try_again_later(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    fake.release = asyncio.Event()
    out = await run_plugin("ADD", net_conf(plugin_event_socket=agent.socket_path))
    assert out.rc != 0
    assert out.json["code"] == 11


async def test_pod_in_excluded_namespace_never_contacts_agent(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    conf = net_conf(plugin_event_socket=agent.socket_path, exclude_namespaces=["shop"])
    out = await run_plugin("ADD", conf)
    assert out.rc == 0
    assert out.json == prev_result("1.0.0")
    assert fake.events == []


async def test_non_kubernetes_sandbox_passes_through(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    out = await run_plugin(
        "ADD", net_conf(plugin_event_socket=agent.socket_path), cni_args="IgnoreUnknown=1"
    )
    assert out.rc == 0
    assert out.json == prev_result("1.0.0")
    assert fake.events == []


def _python39() -> str | None:
    pyenv = Path("/root/.pyenv/versions")
    found = sorted(str(p) for p in pyenv.glob("3.9*/bin/python3.9")) if pyenv.is_dir() else []
    candidates = [shutil.which("python3.9"), *found]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            subprocess.run([candidate, "-c", "pass"], check=True, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        return candidate
    return None


async def test_runs_on_the_oldest_supported_host_python(
    agent: CniEventServer, fake: FakeReconciler
) -> None:
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 on this machine")
    out = await run_plugin("ADD", net_conf(plugin_event_socket=agent.socket_path), python=python)
    assert out.rc == 0, out.stderr
    assert out.json == prev_result("1.0.0")
    assert len(fake.events) == 1


# --- ADD with the agent down -------------------------------------------------------------------


async def test_agent_down_excluded_namespace_passes(run_dir: Path) -> None:
    conf = net_conf(plugin_event_socket=str(run_dir / "absent.sock"), exclude_namespaces=["shop"])
    out = await run_plugin("ADD", conf)
    assert out.rc == 0
    assert out.json == prev_result("1.0.0")


async def test_agent_down_and_no_api_fails_closed_with_a_hint(run_dir: Path) -> None:
    socket_path = str(run_dir / "absent.sock")
    conf = net_conf(plugin_event_socket=socket_path, kubeconfig=str(run_dir / "no-kubeconfig"))
    out = await run_plugin("ADD", conf)
    assert out.rc != 0
    error = out.json
    assert error["code"] == 11
    assert f"ztunnel-redirect agent not reachable at {socket_path}" in error["msg"]
    assert "is the ztunnel-redirect DaemonSet pod running on this node?" in error["msg"]


async def test_stale_socket_counts_as_agent_down(run_dir: Path) -> None:
    path = run_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    finally:
        sock.close()
    out = await run_plugin("ADD", net_conf(plugin_event_socket=str(path)))
    assert out.rc != 0
    assert out.json["code"] == 11
    assert "not reachable" in out.json["msg"]


def _pod(labels: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-0", "namespace": "shop", "labels": dict(labels or {})},
        "spec": {"nodeName": "n1", **spec},
        "status": {"phase": "Pending"},
    }


@pytest.mark.parametrize(
    ("pod_labels", "ns_labels", "passes"),
    [
        ({}, {}, True),
        ({constants.ENROLL_LABEL: "ambient"}, {}, False),
        ({}, {constants.ENROLL_LABEL: "ambient"}, False),
        ({constants.ENROLL_LABEL: "none"}, {constants.ENROLL_LABEL: "ambient"}, True),
    ],
    ids=["not-enrolled", "pod-label", "namespace-label", "opted-out"],
)
async def test_agent_down_decides_from_the_api_server(
    run_dir: Path,
    api: tuple[ApiServer, Path],
    pod_labels: dict[str, str],
    ns_labels: dict[str, str],
    passes: bool,
) -> None:
    server, kubeconfig_path = api
    server.create_namespace({"metadata": {"name": "shop", "labels": ns_labels}})
    server.create_pod(_pod(pod_labels))
    conf = net_conf(
        plugin_event_socket=str(run_dir / "absent.sock"), kubeconfig=str(kubeconfig_path)
    )
    out = await run_plugin("ADD", conf)
    if passes:
        assert out.rc == 0, out.stdout + out.stderr
        assert out.json == prev_result("1.0.0")
    else:
        assert out.rc != 0
        assert out.json["code"] == 11
        assert "is in the ambient mesh" in out.json["msg"]
        assert "DaemonSet pod running on this node" in out.json["msg"]


async def test_agent_down_and_pod_unknown_to_api_fails_closed(
    run_dir: Path, api: tuple[ApiServer, Path]
) -> None:
    _, kubeconfig_path = api
    conf = net_conf(
        plugin_event_socket=str(run_dir / "absent.sock"), kubeconfig=str(kubeconfig_path)
    )
    out = await run_plugin("ADD", conf)
    assert out.rc != 0
    assert out.json["code"] == 11
    assert "cannot tell" in out.json["msg"]
    assert "HTTP 404" in out.json["msg"]


async def test_agent_down_host_network_pod_needs_no_namespace(
    run_dir: Path, api: tuple[ApiServer, Path]
) -> None:
    server, kubeconfig_path = api
    server.create_pod(_pod({constants.ENROLL_LABEL: "ambient"}, hostNetwork=True))
    conf = net_conf(
        plugin_event_socket=str(run_dir / "absent.sock"), kubeconfig=str(kubeconfig_path)
    )
    out = await run_plugin("ADD", conf)
    assert out.rc == 0, out.stdout + out.stderr
    assert [r.path for r in server.requests] == ["/api/v1/namespaces/shop/pods/web-0"]


# --- The plugin agrees with the agent ----------------------------------------------------------

AMBIENT = {constants.ENROLL_LABEL: "ambient"}
NONE = {constants.ENROLL_LABEL: "none"}
SIDECAR = {constants.SIDECAR_STATUS_ANNOTATION: "{}"}

# (pod namespace, pod labels, pod annotations, hostNetwork, phase, namespace labels)
Row = tuple[str, dict[str, str], dict[str, str], bool, str, dict[str, str]]
ENROLLMENT_TABLE: list[Row] = [
    ("shop", {}, {}, False, "Running", {}),
    ("shop", AMBIENT, {}, False, "Running", {}),
    ("shop", {}, {}, False, "Running", AMBIENT),
    ("shop", NONE, {}, False, "Running", AMBIENT),
    ("shop", NONE, {}, False, "Running", {}),
    ("shop", {constants.ENROLL_LABEL: "other"}, {}, False, "Running", AMBIENT),
    ("shop", {constants.ENROLL_LABEL: "other"}, {}, False, "Running", {}),
    ("shop", AMBIENT, {}, True, "Running", {}),
    ("shop", {}, {}, True, "Running", AMBIENT),
    ("shop", AMBIENT, SIDECAR, False, "Running", {}),
    ("shop", {}, SIDECAR, False, "Running", AMBIENT),
    ("kube-system", AMBIENT, {}, False, "Running", AMBIENT),
    ("istio-system", {"app": "ztunnel"}, {}, False, "Running", AMBIENT),
    ("istio-system", {"app": "ztunnel", **AMBIENT}, {}, False, "Running", {}),
    ("istio-system", {"app": "ztunnel-redirect", **AMBIENT}, {}, False, "Running", {}),
    ("istio-system", {"app": "other"}, {}, False, "Running", AMBIENT),
    ("shop", {"app": "ztunnel"}, {}, False, "Running", AMBIENT),
    ("shop", AMBIENT, {}, False, "Succeeded", {}),
    ("shop", {}, {}, False, "Failed", AMBIENT),
    ("shop", AMBIENT, {}, False, "Pending", {}),
]


@pytest.mark.parametrize("row", ENROLLMENT_TABLE)
def test_plugin_and_agent_agree_on_enrollment(row: Row) -> None:
    pod_ns, labels, annotations, host_network, phase, ns_labels = row
    pod_json = {
        "metadata": {
            "name": "p",
            "namespace": pod_ns,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"nodeName": "n1", "hostNetwork": host_network},
        "status": {"phase": phase},
    }
    ns_json = {"metadata": {"name": pod_ns, "labels": ns_labels}}
    pod = Pod(
        uid=PodUid("u1"),
        name="p",
        namespace=pod_ns,
        node_name="n1",
        ips=("10.0.0.1",),  # the plugin runs when the IPs exist
        labels=labels,
        annotations=annotations,
        host_network=host_network,
        phase=phase,
    )
    agent = EnrollmentPolicy(node_name="n1").decide(pod, Namespace(pod_ns, ns_labels)).enrolled
    plugin = cni_plugin.decide_enrollment(copy.deepcopy(pod_json), ns_json)
    assert plugin is agent
    # Without the namespace the plugin either agrees already or asks for it.
    assert cni_plugin.decide_enrollment(pod_json, None) in (agent, None)


def test_plugin_copies_of_constants_agree_with_the_package() -> None:
    assert cni_plugin.ENROLL_LABEL == constants.ENROLL_LABEL
    assert cni_plugin.ENROLL_VALUE == constants.ENROLL_VALUE
    assert cni_plugin.OPT_OUT_VALUE == constants.OPT_OUT_VALUE
    assert cni_plugin.SIDECAR_STATUS_ANNOTATION == constants.SIDECAR_STATUS_ANNOTATION
    assert cni_plugin.DEFAULT_EXCLUDE_NAMESPACES == constants.EXCLUDE_NAMESPACES
    assert cni_plugin.DEFAULT_SYSTEM_NAMESPACE == constants.SYSTEM_NAMESPACE
    assert (
        str(Path(constants.CNI_AGENT_RUN_DIR) / constants.PLUGIN_EVENT_SOCKET)
        == cni_plugin.DEFAULT_EVENT_SOCKET
    )
    assert dict(enrollment.ZTUNNEL_LABELS) == cni_plugin.ZTUNNEL_LABELS
    assert dict(enrollment.AGENT_LABELS) == cni_plugin.DEFAULT_AGENT_LABELS


def test_plugin_imports_only_the_standard_library() -> None:
    tree = ast.parse(PLUGIN.read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules.add((node.module or "").split(".")[0])
    assert modules - {"__future__"} <= sys.stdlib_module_names
    assert PLUGIN.read_text().startswith("#!/usr/bin/env python3\n")


# --- The fallback over TLS with a bearer token, as the installer's kubeconfig configures it -----


@pytest.fixture
def tls_cert(run_dir: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = run_dir / "api.pem", run_dir / "api.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_fallback_over_tls_sends_the_token_and_checks_the_ca(
    run_dir: Path, tls_cert: tuple[Path, Path]
) -> None:
    cert, key = tls_cert
    seen: list[str] = []

    async def get_pod(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response(_pod())

    async def get_namespace(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"metadata": {"name": "shop", "labels": AMBIENT}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/shop/pods/web-0", get_pod)
    app.router.add_get("/api/v1/namespaces/shop", get_namespace)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        kubeconfig_path = run_dir / "kubeconfig"
        kubeconfig_path.write_text(
            json.dumps(
                {
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": f"https://127.0.0.1:{port}",
                                "certificate-authority-data": base64.b64encode(
                                    cert.read_bytes()
                                ).decode(),
                            },
                        }
                    ],
                    "users": [{"name": "u", "user": {"token": "t0k3n"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        conf = net_conf(
            plugin_event_socket=str(run_dir / "absent.sock"), kubeconfig=str(kubeconfig_path)
        )
        out = await run_plugin("ADD", conf)
        assert out.rc != 0
        assert out.json["code"] == 11
        assert "is in the ambient mesh" in out.json["msg"]
        assert seen == ["Bearer t0k3n", "Bearer t0k3n"]

        # A CA that did not sign the server's certificate: cannot tell, so fail closed.
        other = json.loads(kubeconfig_path.read_text())
        other["clusters"][0]["cluster"].pop("certificate-authority-data")
        kubeconfig_path.write_text(json.dumps(other))
        out = await run_plugin("ADD", conf)
        assert out.rc != 0
        assert "cannot tell" in out.json["msg"]
        assert len(seen) == 2
    finally:
        await runner.cleanup()
