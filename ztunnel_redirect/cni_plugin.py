#!/usr/bin/env python3
"""ztunnel-redirect CNI plugin: tells the node agent about every new pod sandbox (SPEC §8).

The container runtime runs this file on the host, chained after the primary CNI plugin, at pod
sandbox creation. It is installed as `<cni bin dir>/ztunnel-redirect-cni` by
`ztunnel_redirect.cniinstall` and runs with the host's Python (3.9 or newer), outside the agent's
container: it imports only the Python standard library, and stays one self-contained file.

Commands (containernetworking/cni SPEC.md, versions 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0):

- ADD: posts `{"Netns", "PodName", "PodNamespace", "IPs"}` (and `"PodUID"` when the runtime passes
  `K8S_POD_UID`) to the agent at `POST /cmdadd` over its Unix socket and, once the agent answers
  200, prints `prevResult` back unchanged. Fails closed: an agent error fails the ADD, and so does
  an unreachable agent unless the API server (read with the `kubeconfig` the agent wrote at
  install) shows that the pod is not for the mesh.
- DEL: always succeeds without output, whatever the config (a failed DEL blocks the pod's
  teardown; the agent cleans up from pod events).
- CHECK, GC, STATUS: succeed without output, from the CNI version that defines them on.
- VERSION: prints the supported versions.

Errors are the CNI error object on stdout with a non-zero exit; logs go to stderr only.
"""

from __future__ import annotations

import base64
import functools
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
"""0.3.0 and 0.3.1 results have the same shape; we print prevResult back unchanged anyway."""
LATEST_VERSION = "1.1.0"
FIRST_VERSION_OF = {"CHECK": "0.4.0", "GC": "1.1.0"}
"""Commands that older CNI versions do not define. containernetworking/cni's skel (which every
reference plugin runs on) answers them with error 1, "config version does not allow CHECK", and
libcni never sends them below these versions; we do the same."""

DEFAULT_EVENT_SOCKET = "/var/run/istio-cni/pluginevent.sock"
DEFAULT_EXCLUDE_NAMESPACES = ("kube-system",)
DEFAULT_SYSTEM_NAMESPACE = "istio-system"
AGENT_TIMEOUT_S = 5.0
"""Per socket operation toward the agent; the agent answers within a smaller budget (cnievents)."""
API_TIMEOUT_S = 5.0

# Copies of ztunnel_redirect.constants (this file cannot import the package); a test checks that
# they agree.
ENROLL_LABEL = "istio.io/dataplane-mode"
ENROLL_VALUE = "ambient"
OPT_OUT_VALUE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
ZTUNNEL_LABELS = {"app": "ztunnel"}
DEFAULT_AGENT_LABELS = {"app": "ztunnel-redirect"}

# CNI error codes (SPEC.md "Error"); 100 and above are the plugin's own.
CODE_INCOMPATIBLE_VERSION = 1
CODE_UNSUPPORTED_FIELD = 2
CODE_UNKNOWN_CONTAINER = 3
CODE_INVALID_ENVIRONMENT = 4
CODE_IO_FAILURE = 5
CODE_DECODE_FAILURE = 6
CODE_INVALID_CONFIG = 7
CODE_TRY_AGAIN_LATER = 11
CODE_PLUGIN = 999

log = logging.getLogger("ztunnel-redirect-cni")


class PluginError(Exception):
    """Becomes the CNI error object that the runtime reads from stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class AgentUnreachableError(Exception):
    """No answer from the agent: no socket, refused, reset or timed out."""


class EnrollmentUnknownError(Exception):
    """The API server could not tell us whether the pod is for the mesh."""


# --- Enrollment (SPEC §5) -------------------------------------------------------------------


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    return labels if isinstance(labels, dict) else {}


def decide_enrollment(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None,
    *,
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES,
    system_namespace: str = DEFAULT_SYSTEM_NAMESPACE,
    agent_namespace: str | None = None,
    agent_labels: Mapping[str, str] | None = None,
) -> bool | None:
    """Whether the pod (Kubernetes JSON) is for the mesh; None when it needs the namespace.

    The same rules as the agent's `ztunnel_redirect.enrollment`, restricted to what matters when a
    sandbox is created (node, phase and IPs are the runtime's business at that point).
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    pod_ns = meta.get("namespace", "")
    annotations = meta.get("annotations") or {}
    labels = _labels(pod)
    agent_selector = DEFAULT_AGENT_LABELS if agent_labels is None else agent_labels
    never = (
        pod_ns in excluded_namespaces,
        spec.get("hostNetwork") is True,
        SIDECAR_STATUS_ANNOTATION in annotations,
        pod_ns == system_namespace and _has_labels(labels, ZTUNNEL_LABELS),
        pod_ns == (agent_namespace or system_namespace) and _has_labels(labels, agent_selector),
        status.get("phase") in ("Succeeded", "Failed"),
    )
    mode = labels.get(ENROLL_LABEL)
    if any(never) or mode == OPT_OUT_VALUE:
        return False
    if mode == ENROLL_VALUE:
        return True
    if namespace is None:
        return None
    return _labels(namespace).get(ENROLL_LABEL) == ENROLL_VALUE


def _has_labels(labels: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Input -----------------------------------------------------------------------------------


class NetConf:
    """The network configuration read from stdin, with our keys checked."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.cni_version = _str_field(raw, "cniVersion", "")
        self.name = _str_field(raw, "name", "")
        prev = raw.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise PluginError(
                CODE_INVALID_CONFIG, "invalid network config: prevResult is not an object"
            )
        self.prev_result: dict[str, Any] | None = prev
        self.event_socket = _str_field(raw, "plugin_event_socket", DEFAULT_EVENT_SOCKET)
        self.kubeconfig = _str_field(raw, "kubeconfig", "")
        self.log_level = _str_field(raw, "log_level", "info")
        self.system_namespace = _str_field(raw, "system_namespace", DEFAULT_SYSTEM_NAMESPACE)
        self.agent_namespace = _str_field(raw, "agent_namespace", "") or None
        agent_labels = raw.get("agent_labels", DEFAULT_AGENT_LABELS)
        if not isinstance(agent_labels, dict) or not all(
            isinstance(v, str) for v in agent_labels.values()
        ):
            raise PluginError(
                CODE_INVALID_CONFIG, "invalid network config: agent_labels must map to strings"
            )
        self.agent_labels: dict[str, str] = agent_labels
        excluded = raw.get("exclude_namespaces", list(DEFAULT_EXCLUDE_NAMESPACES))
        if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
            raise PluginError(
                CODE_INVALID_CONFIG,
                "invalid network config: exclude_namespaces must be a list of strings",
            )
        self.exclude_namespaces = tuple(excluded)


def _str_field(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise PluginError(CODE_INVALID_CONFIG, f"invalid network config: {key} must be a string")
    return value


def load_conf(data: bytes) -> dict[str, Any]:
    """The network config as a JSON object, not checked further."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise PluginError(
            CODE_INVALID_CONFIG, "invalid network config: stdin is not JSON", str(exc)
        ) from exc
    if not isinstance(raw, dict):
        raise PluginError(CODE_INVALID_CONFIG, "invalid network config: not a JSON object")
    return raw


def parse_conf(data: bytes) -> NetConf:
    return NetConf(load_conf(data))


def parse_cni_args(value: str) -> dict[str, str]:
    """`K8S_POD_NAME=a;K8S_POD_NAMESPACE=b;IgnoreUnknown=1` → a dict."""
    args: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            args[key.strip()] = val.strip()
    return args


def pod_ips(prev_result: Mapping[str, Any]) -> list[str]:
    """The addresses of `prevResult.ips[].address` (CIDR form in CNI >= 0.3), prefix stripped."""
    ips = prev_result.get("ips") or []
    if not isinstance(ips, list):
        raise PluginError(
            CODE_INVALID_CONFIG, "invalid network config: prevResult.ips is not a list"
        )
    out: list[str] = []
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str):
            raise PluginError(
                CODE_INVALID_CONFIG, f"invalid network config: prevResult.ips entry {entry!r}"
            )
        try:
            out.append(str(ipaddress.ip_interface(address).ip))
        except ValueError as exc:
            raise PluginError(
                CODE_INVALID_CONFIG, f"invalid network config: bad address {address!r}"
            ) from exc
    return out


# --- The agent -------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def post_add_event(
    socket_path: str, event: Mapping[str, Any], *, timeout: float = AGENT_TIMEOUT_S
) -> None:
    """POST the event; raises AgentUnreachableError, or PluginError with the agent's answer."""
    body = json.dumps(event).encode()
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("POST", "/cmdadd", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read(4096).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        # OSError covers a missing socket, refused, reset and timeouts (socket.timeout on 3.9).
        raise AgentUnreachableError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    if response.status == 200:
        return
    code = CODE_TRY_AGAIN_LATER if response.status == 503 else CODE_PLUGIN
    raise PluginError(
        code,
        f"ztunnel-redirect agent refused pod: {text or response.reason}",
        f"HTTP {response.status} from {socket_path}",
    )


# --- The API server (fallback when the agent is unreachable) --------------------------------


class ApiClient:
    """GETs from the API server with the kubeconfig written by the installer (JSON, YAML-valid)."""

    def __init__(self, kubeconfig_path: str, *, timeout: float = API_TIMEOUT_S) -> None:
        try:
            with open(kubeconfig_path, "rb") as f:
                config = json.load(f)
            context = _current(config, "contexts")
            cluster = _named(config, "clusters", context.get("cluster")).get("cluster") or {}
            user = _named(config, "users", context.get("user")).get("user") or {}
            self.server = str(cluster["server"]).rstrip("/")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EnrollmentUnknownError(
                f"cannot use kubeconfig {kubeconfig_path!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.timeout = timeout
        self.token = self._token(user)
        self.ssl_context = self._ssl_context(cluster)

    @staticmethod
    def _token(user: Mapping[str, Any]) -> str:
        token = user.get("token")
        token_file = user.get("tokenFile")
        if not token and isinstance(token_file, str):
            try:
                with open(token_file) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise EnrollmentUnknownError(f"cannot read token file: {exc}") from exc
        return str(token or "")

    @staticmethod
    def _ssl_context(cluster: Mapping[str, Any]) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        try:
            if cluster.get("certificate-authority-data"):
                ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
                ctx.load_verify_locations(cadata=ca)
            elif cluster.get("certificate-authority"):
                ctx.load_verify_locations(cafile=cluster["certificate-authority"])
        except (ValueError, OSError, ssl.SSLError) as exc:
            raise EnrollmentUnknownError(f"bad CA in kubeconfig: {exc}") from exc
        if cluster.get("insecure-skip-tls-verify") is True:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def get(self, path: str) -> dict[str, Any]:
        url = self.server + path
        if not url.startswith(("https://", "http://")):
            raise EnrollmentUnknownError(f"unsupported API server URL {self.server!r}")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        context = self.ssl_context if url.startswith("https://") else None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as resp:  # noqa: S310 - scheme checked above
                obj = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise EnrollmentUnknownError(f"GET {path}: HTTP {exc.code}") from exc
        except (OSError, ValueError) as exc:
            raise EnrollmentUnknownError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(obj, dict):
            raise EnrollmentUnknownError(f"GET {path}: not a JSON object")
        return obj


def _current(config: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    name = config.get("current-context")
    entry = _named(config, kind, name) if name else (config[kind][0])
    context = entry.get("context") or {}
    if not isinstance(context, dict):
        raise TypeError("context is not an object")
    return context


def _named(config: Mapping[str, Any], kind: str, name: Any) -> Mapping[str, Any]:
    entries = config.get(kind) or []
    for entry in entries:
        if entry.get("name") == name:
            return dict(entry)
    if name is None and entries:
        return dict(entries[0])
    raise KeyError(f"{kind} {name!r}")


def pod_is_for_mesh(conf: NetConf, pod_namespace: str, pod_name: str) -> bool:
    """Ask the API server; raises EnrollmentUnknownError when it cannot tell."""
    if not conf.kubeconfig:
        raise EnrollmentUnknownError("no kubeconfig in the plugin config")
    api = ApiClient(conf.kubeconfig)
    ns_q = urllib.parse.quote(pod_namespace, safe="")
    pod = api.get(f"/api/v1/namespaces/{ns_q}/pods/{urllib.parse.quote(pod_name, safe='')}")
    decide = functools.partial(
        decide_enrollment,
        excluded_namespaces=conf.exclude_namespaces,
        system_namespace=conf.system_namespace,
        agent_namespace=conf.agent_namespace,
        agent_labels=conf.agent_labels,
    )
    decision = decide(pod, None)
    if decision is None:  # the pod alone does not tell: its namespace's label decides
        decision = decide(pod, api.get(f"/api/v1/namespaces/{ns_q}"))
    return bool(decision)


# --- Commands --------------------------------------------------------------------------------


def _require_env(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise PluginError(CODE_INVALID_ENVIRONMENT, f"missing environment variable {name}")
    return value


def _result(conf: NetConf) -> str:
    """The prevResult, unchanged, as the output of a successful ADD."""
    result = conf.prev_result or {}
    if "cniVersion" not in result:
        # libcni reads the result's version from the result itself.
        result = dict(result, cniVersion=conf.cni_version)
    return json.dumps(result)


def cmd_add(conf: NetConf, environ: Mapping[str, str]) -> str:
    """Returns what to print on success."""
    if conf.prev_result is None:
        raise PluginError(
            CODE_INVALID_CONFIG,
            "ztunnel-redirect-cni must be chained after the primary CNI plugin (no prevResult)",
        )
    args = parse_cni_args(environ.get("CNI_ARGS", ""))
    pod_name = args.get("K8S_POD_NAME", "")
    pod_namespace = args.get("K8S_POD_NAMESPACE", "")
    if not pod_name or not pod_namespace:
        log.info("not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE): passing through")
        return _result(conf)
    if pod_namespace in conf.exclude_namespaces:
        log.debug("pod %s/%s is in an excluded namespace: passing through", pod_namespace, pod_name)
        return _result(conf)
    netns = _require_env(environ, "CNI_NETNS")
    event: dict[str, Any] = {
        "Netns": netns,
        "PodName": pod_name,
        "PodNamespace": pod_namespace,
        "IPs": [{"Address": {"IP": ip}} for ip in pod_ips(conf.prev_result)],
    }
    pod_uid = args.get("K8S_POD_UID", "")
    if pod_uid:
        # containerd and CRI-O pass it: it tells a recreated pod from its namesake (StatefulSet).
        event["PodUID"] = pod_uid
    try:
        post_add_event(conf.event_socket, event)
    except AgentUnreachableError as exc:
        log.warning("agent unreachable at %s: %s", conf.event_socket, exc)
        return _without_agent(conf, pod_namespace, pod_name, str(exc))
    log.info("pod %s/%s handed to the agent (netns %s)", pod_namespace, pod_name, netns)
    return _result(conf)


def _without_agent(conf: NetConf, pod_namespace: str, pod_name: str, why: str) -> str:
    hint = (
        f"ztunnel-redirect agent not reachable at {conf.event_socket}: "
        "is the ztunnel-redirect DaemonSet pod running on this node?"
    )
    try:
        for_mesh = pod_is_for_mesh(conf, pod_namespace, pod_name)
    except EnrollmentUnknownError as exc:
        log.warning("cannot tell whether %s/%s is for the mesh: %s", pod_namespace, pod_name, exc)
        raise PluginError(
            CODE_TRY_AGAIN_LATER,
            f"{hint} (cannot tell whether pod {pod_namespace}/{pod_name} is in the mesh: {exc})",
            why,
        ) from exc
    if for_mesh:
        raise PluginError(
            CODE_TRY_AGAIN_LATER,
            f"{hint} (pod {pod_namespace}/{pod_name} is in the ambient mesh)",
            why,
        )
    log.info(
        "pod %s/%s is not in the mesh: passing through without the agent", pod_namespace, pod_name
    )
    return _result(conf)


def cmd_del(stdin: bytes) -> str:
    """Nothing to do (the agent cleans up from pod events), and never a failure: a failed DEL
    blocks the pod's teardown, so a config we cannot read is only logged."""
    try:
        conf = parse_conf(stdin)
        _configure_logging(conf.log_level)
        if conf.cni_version not in SUPPORTED_VERSIONS:
            log.warning("DEL with unsupported CNI version %r: nothing to do", conf.cni_version)
    except PluginError as exc:
        log.warning("DEL with an unusable network config (%s): nothing to do", exc.msg)
    except Exception:
        log.exception("unexpected failure in DEL; succeeding anyway")
    return ""


def _version_output(version: str) -> str:
    return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def _requested_version(raw: Mapping[str, Any]) -> str:
    """The cniVersion of the request, for the error object (CNI SPEC: the error's cniVersion is
    the request's); the latest when the request has none."""
    version = raw.get("cniVersion")
    return version if isinstance(version, str) and version else LATEST_VERSION


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """Run one command; returns the exit code and what to print on stdout."""
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        try:
            version = parse_conf(stdin).cni_version if stdin.strip() else ""
        except PluginError:
            version = ""
        return 0, _version_output(version if version in SUPPORTED_VERSIONS else LATEST_VERSION)
    if command == "DEL":
        return 0, cmd_del(stdin)
    version = LATEST_VERSION
    try:
        raw = load_conf(stdin)
        version = _requested_version(raw)
        return 0, _dispatch(command, NetConf(raw), environ)
    except PluginError as exc:
        log.error("%s failed: %s", command or "command", exc.msg)  # noqa: TRY400 - expected, no traceback
        error = {"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}
    except Exception as exc:
        log.exception("unexpected failure")
        msg = f"internal error: {type(exc).__name__}: {exc}"
        error = {"cniVersion": version, "code": CODE_PLUGIN, "msg": msg, "details": ""}
    return 1, json.dumps(error)


def _dispatch(command: str, conf: NetConf, environ: Mapping[str, str]) -> str:
    _configure_logging(conf.log_level)
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise PluginError(
            CODE_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {conf.cni_version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    first = FIRST_VERSION_OF.get(command)
    if first is not None and _version_tuple(conf.cni_version) < _version_tuple(first):
        raise PluginError(
            CODE_INCOMPATIBLE_VERSION,
            f"config version {conf.cni_version} does not allow {command} (from {first} on)",
        )
    if command == "ADD":
        return cmd_add(conf, environ)
    if command in ("CHECK", "GC", "STATUS"):
        return ""
    raise PluginError(CODE_INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}")


def _version_tuple(version: str) -> tuple[int, ...]:
    """`"0.4.0"` → `(0, 4, 0)`; for the versions of SUPPORTED_VERSIONS."""
    return tuple(int(part) for part in version.split("."))


def _configure_logging(level: str) -> None:
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
    levels.update(warning=logging.WARNING, error=logging.ERROR, none=logging.CRITICAL + 1)
    log.setLevel(levels.get(level.lower(), logging.INFO))


def main(*, environ: Mapping[str, str] | None = None, stdin: IO[bytes] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ztunnel-redirect-cni %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    env = os.environ if environ is None else environ
    data = (stdin or sys.stdin.buffer).read()
    code, output = run(env, data)
    if output:
        sys.stdout.write(output + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
