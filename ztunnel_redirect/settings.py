"""The agent's settings: one frozen value, read from flags and Istio's environment variables.

Pure: no I/O, no asyncio. `add_arguments` adds one flag per setting; `from_args` resolves each
setting as **flag, else environment variable, else default**, then validates it. Every flag's help
names its environment variable and its default, so `ztunnel-redirect agent --help` documents them.

The environment variables keep Istio's names (SPEC §10) so that an operator's Helm values and
DaemonSet env carry over. Reading rules:

- An environment variable that is set but empty counts as unset (manifests often carry
  `value: ""`); on the command line an empty list flag (`--exclude-namespaces ''`) means "none".
- Booleans parse like Go's `strconv.ParseBool` (`1`, `t`, `TRUE`, `false`, ...), as Istio does,
  but a value that does not parse is a `ConfigError` rather than a silent fall back to the default.
- Lists are comma separated; blanks around items are dropped.

A bad value raises `ConfigError` with one sentence that names the flag and the variable.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import math
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Final, TypeVar

from ztunnel_redirect import constants
from ztunnel_redirect.enrollment import parse_bool
from ztunnel_redirect.errors import ConfigError

__all__ = [
    "DEFAULT_ALLOWED_NETNS_DIRS",
    "DEFAULT_CNI_BIN_DIR",
    "DEFAULT_CNI_CONF_DIR",
    "LogFormat",
    "LogLevel",
    "Settings",
    "add_arguments",
    "from_args",
]

DEFAULT_ALLOWED_NETNS_DIRS: Final = ("/var/run/netns/", "/run/netns/", "/proc/")
"""Same as `cnievents.DEFAULT_ALLOWED_NETNS_DIRS` (an adapter this pure module may not import);
a test keeps the two equal."""
DEFAULT_CNI_BIN_DIR: Final = "/opt/cni/bin"
"""Same as `cniinstall.DEFAULT_BIN_DIR`; a test keeps the two equal."""
DEFAULT_CNI_CONF_DIR: Final = "/etc/cni/net.d"
"""Same as `cniinstall.DEFAULT_CONF_DIR`; a test keeps the two equal."""

_MAX_PORT: Final = 65535


class LogFormat(enum.StrEnum):
    JSON = "json"
    """One JSON object per line: for log collectors."""
    CONSOLE = "console"
    """Aligned, coloured text: for a human at a terminal."""


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Settings:
    """Everything the node agent is configured with. Checked on construction (`ConfigError`)."""

    node_name: str
    """The node this agent serves; only pods scheduled here are handled."""
    dns_capture: bool = True
    """Redirect pods' DNS to ztunnel's DNS proxy (adds the raw table, SPEC §2)."""
    ipv6: bool = True
    """Install the IPv6 twin of every rule and route."""
    reconcile_on_startup: bool = True
    """At start the agent always reads back every enrolled pod's rules. True: repair what differs
    from the desired state before reporting ready. False: only report the drift (log and metric)
    and leave the pod's rules as they are until its next event or periodic check."""
    exclude_namespaces: frozenset[str] = frozenset(constants.EXCLUDE_NAMESPACES)
    """Pods in these namespaces are never enrolled."""
    ztunnel_uds: str = constants.ZTUNNEL_UDS_ADDRESS
    """Unix socket that the agent listens on for ztunnel (ZDS, SPEC §9)."""
    run_dir: str = constants.CNI_AGENT_RUN_DIR
    """Directory shared with the CNI plugin; holds the plugin event socket."""
    probe_snat_v4: str = constants.PROBE_SNAT_V4
    """Source address that kubelet probes get on the host (SPEC §4)."""
    probe_snat_v6: str = constants.PROBE_SNAT_V6
    system_namespace: str = constants.SYSTEM_NAMESPACE
    """Istio's namespace, where ztunnel runs."""
    pod_name: str | None = None
    """The agent's own pod (downward API)."""
    pod_namespace: str | None = None
    """The agent's own namespace (downward API); None means the system namespace."""
    kubeconfig: str | None = None
    """Kubeconfig file for the API server; None means the in-cluster service account."""
    host_netns: str = "/proc/1/ns/net"
    """The host's network namespace, where the probe SNAT rules go."""
    proc_root: str = "/proc"
    """The host's /proc (mounted with hostPID), scanned for pods' netns and the kubelet's uid."""
    kubelet_uid: int | None = None
    """The kubelet's uid; None means found by scanning `proc_root`."""
    reconcile_period: float = 10.0
    """Seconds between two checks of every enrolled pod's rules against the kernel."""
    readiness_port: int = constants.READINESS_PORT
    """Port of `/healthz` and `/readyz`; 0 picks a free port."""
    metrics_port: int = constants.METRICS_PORT
    """Port of `/metrics`; 0 picks a free port."""
    bind_address: str = "0.0.0.0"  # noqa: S104 - kubelet probes and Prometheus reach the pod IP
    """Address the readiness and metrics servers listen on."""
    workers: int = 8
    """Pods reconciled concurrently (events of one pod are always handled in order)."""
    log_format: LogFormat = LogFormat.JSON
    log_level: LogLevel = LogLevel.INFO
    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    """Host directory (mounted) where the CNI plugin binary is installed."""
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    """Host directory (mounted) holding the primary CNI config that our plugin is chained to."""
    install_cni: bool = True
    """Install and keep the CNI plugin, its kubeconfig and its config entry on the node."""
    allowed_netns_dirs: tuple[str, ...] = DEFAULT_ALLOWED_NETNS_DIRS
    """The only directories a netns path from the CNI plugin may be in."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_namespaces", frozenset(self.exclude_namespaces))
        object.__setattr__(self, "allowed_netns_dirs", tuple(self.allowed_netns_dirs))
        object.__setattr__(self, "log_format", _enum(LogFormat, self.log_format, "log_format"))
        object.__setattr__(self, "log_level", _enum(LogLevel, self.log_level, "log_level"))
        for option in _OPTIONS:
            problem = option.check(getattr(self, option.field))
            if problem is not None:
                raise ConfigError(f"{option.names()} {problem}.")
        if self.readiness_port == self.metrics_port and self.readiness_port != 0:
            raise ConfigError(
                f"The readiness port and the metrics port are both {self.readiness_port}; "
                "they must differ."
            )

    @property
    def plugin_event_socket(self) -> str:
        """Where the CNI plugin posts its events (SPEC §8)."""
        return posixpath.join(self.run_dir, constants.PLUGIN_EVENT_SOCKET)

    @property
    def agent_namespace(self) -> str:
        """The namespace of the agent's own pods."""
        return self.pod_namespace or self.system_namespace


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(kind: type[_E], value: object, name: str) -> _E:
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}.") from None


# Checks: None when the (typed) value is fine, else the end of a sentence saying what is wrong.


def _check_none(_value: Any) -> str | None:
    return None


def _check_name(value: str) -> str | None:
    if not value or value != value.strip() or any(c.isspace() for c in value):
        return f"must be a non-empty name without blanks, not {value!r}"
    return None


def _check_optional_name(value: str | None) -> str | None:
    return None if value is None else _check_name(value)


def _check_names(values: frozenset[str]) -> str | None:
    bad = sorted(v for v in values if _check_name(v) is not None)
    return f"has an invalid namespace name {bad[0]!r}" if bad else None


def _check_abs(value: str) -> str | None:
    if not posixpath.isabs(value):
        return f"must be an absolute path, not {value!r}"
    return None


def _check_abs_list(values: tuple[str, ...]) -> str | None:
    if not values:
        return "must name at least one directory"
    for value in values:
        problem = _check_abs(value)
        if problem is not None:
            return problem
    return None


def _check_optional_path(value: str | None) -> str | None:
    return "must not be empty" if value == "" else None


def _check_ip(version: int | None) -> Callable[[str], str | None]:
    what = "an IP address" if version is None else f"an IPv{version} address"

    def check(value: str) -> str | None:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return f"must be {what}, not {value!r}"
        if version is not None and address.version != version:
            return f"must be {what}, not {value!r}"
        return None

    return check


def _check_port(value: int) -> str | None:
    if not 0 <= value <= _MAX_PORT:
        return f"must be a port number from 0 to {_MAX_PORT}, not {value}"
    return None


def _check_uid(value: int | None) -> str | None:
    if value is not None and not 0 <= value < 2**32 - 1:
        return f"must be a uid from 0 to {2**32 - 2}, not {value}"
    return None


def _check_period(value: float) -> str | None:
    if not (math.isfinite(value) and value > 0):
        return f"must be a number of seconds greater than 0, not {value}"
    return None


def _check_workers(value: int) -> str | None:
    if value < 1:
        return f"must be at least 1, not {value}"
    return None


# Parsers: text (from a flag or the environment) to the typed value; ValueError says why not.


def _parse_str(text: str) -> str:
    return text


def _parse_bool(text: str) -> bool:
    value = parse_bool(text)
    if value is None:
        raise ValueError("must be a boolean (true, false, 1, 0, t, f)")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("must be a number") from None


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_set(text: str) -> frozenset[str]:
    return frozenset(_split(text))


def _parse_tuple(text: str) -> tuple[str, ...]:
    return tuple(_split(text))


def _parse_log_format(text: str) -> LogFormat:
    try:
        return LogFormat(text.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(LogFormat)}") from None


def _parse_log_level(text: str) -> LogLevel:
    try:
        return LogLevel(text.strip().lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(LogLevel)}") from None


class _Kind(enum.Enum):
    VALUE = "value"
    BOOL = "bool"
    OPTIONAL = "optional"
    """No default value: unset means None."""


@dataclass(frozen=True)
class _Option:
    field: str
    flag: str
    env: str
    help: str
    parse: Callable[[str], Any] = _parse_str
    check: Callable[[Any], str | None] = _check_none
    kind: _Kind = _Kind.VALUE
    metavar: str | None = None
    default_text: str | None = None
    """How the help shows the default, when not just the dataclass default."""

    def names(self) -> str:
        return f"{self.flag} (env {self.env})"


_OPTIONS: Final[tuple[_Option, ...]] = (
    _Option(
        "node_name",
        "--node-name",
        "NODE_NAME",
        "Name of the node this agent serves (required; the downward API's spec.nodeName).",
        check=_check_name,
        metavar="NAME",
        default_text="none, required",
    ),
    _Option(
        "dns_capture",
        "--dns-capture",
        "AMBIENT_DNS_CAPTURE",
        "Redirect enrolled pods' DNS queries to ztunnel's DNS proxy; a pod's "
        f"{constants.DNS_CAPTURE_ANNOTATION} annotation overrides it.",
        parse=_parse_bool,
        kind=_Kind.BOOL,
    ),
    _Option(
        "ipv6",
        "--ipv6",
        "AMBIENT_IPV6",
        "Also redirect IPv6 traffic (rules and routes for both families).",
        parse=_parse_bool,
        kind=_Kind.BOOL,
    ),
    _Option(
        "reconcile_on_startup",
        "--reconcile-on-startup",
        "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP",
        "At start every enrolled pod's rules are verified either way; with this set, what "
        "differs is repaired before the agent is ready, otherwise it is only reported.",
        parse=_parse_bool,
        kind=_Kind.BOOL,
    ),
    _Option(
        "exclude_namespaces",
        "--exclude-namespaces",
        "EXCLUDE_NAMESPACES",
        "Comma-separated namespaces whose pods are never enrolled.",
        parse=_parse_set,
        check=_check_names,
        metavar="NS,...",
        default_text=",".join(constants.EXCLUDE_NAMESPACES),
    ),
    _Option(
        "ztunnel_uds",
        "--ztunnel-uds",
        "ZTUNNEL_UDS_ADDRESS",
        "Unix socket the agent listens on for ztunnel (ZDS).",
        check=_check_abs,
        metavar="PATH",
    ),
    _Option(
        "run_dir",
        "--run-dir",
        "CNI_AGENT_RUN_DIR",
        f"Directory shared with the CNI plugin; the agent listens on "
        f"<dir>/{constants.PLUGIN_EVENT_SOCKET} for its events.",
        check=_check_abs,
        metavar="DIR",
    ),
    _Option(
        "probe_snat_v4",
        "--probe-snat-ip",
        "HOST_PROBE_SNAT_IP",
        "IPv4 source address given to kubelet probes on the host, so pods let them bypass ztunnel.",
        check=_check_ip(4),
        metavar="IP",
    ),
    _Option(
        "probe_snat_v6",
        "--probe-snat-ipv6",
        "HOST_PROBE_SNAT_IPV6",
        "IPv6 source address given to kubelet probes on the host.",
        check=_check_ip(6),
        metavar="IP",
    ),
    _Option(
        "system_namespace",
        "--system-namespace",
        "SYSTEM_NAMESPACE",
        "Istio's namespace, where ztunnel runs.",
        check=_check_name,
        metavar="NS",
    ),
    _Option(
        "pod_name",
        "--pod-name",
        "POD_NAME",
        "Name of the agent's own pod (downward API).",
        check=_check_optional_name,
        kind=_Kind.OPTIONAL,
        metavar="NAME",
        default_text="none",
    ),
    _Option(
        "pod_namespace",
        "--pod-namespace",
        "POD_NAMESPACE",
        "Namespace of the agent's own pods (downward API).",
        check=_check_optional_name,
        kind=_Kind.OPTIONAL,
        metavar="NS",
        default_text="the system namespace",
    ),
    _Option(
        "kubeconfig",
        "--kubeconfig",
        "KUBECONFIG",
        "Kubeconfig file for the Kubernetes API.",
        check=_check_optional_path,
        kind=_Kind.OPTIONAL,
        metavar="PATH",
        default_text="the in-cluster service account",
    ),
    _Option(
        "host_netns",
        "--host-netns",
        "HOST_NETNS",
        "The host's network namespace, where the kubelet probe SNAT rules are installed.",
        check=_check_abs,
        metavar="PATH",
    ),
    _Option(
        "proc_root",
        "--proc-root",
        "PROC_ROOT",
        "The host's /proc (needs hostPID), scanned for pods' network namespaces and the "
        "kubelet's uid.",
        check=_check_abs,
        metavar="DIR",
    ),
    _Option(
        "kubelet_uid",
        "--kubelet-uid",
        "KUBELET_UID",
        "Uid the kubelet runs as, whose probes bypass redirection.",
        parse=_parse_int,
        check=_check_uid,
        kind=_Kind.OPTIONAL,
        metavar="UID",
        default_text="found by scanning the proc root",
    ),
    _Option(
        "reconcile_period",
        "--reconcile-period",
        "RECONCILE_PERIOD",
        "Seconds between two checks of every enrolled pod's rules against the kernel.",
        parse=_parse_float,
        check=_check_period,
        metavar="SECONDS",
    ),
    _Option(
        "readiness_port",
        "--readiness-port",
        "READINESS_PORT",
        "Port of /healthz and /readyz (0 picks a free port).",
        parse=_parse_int,
        check=_check_port,
        metavar="PORT",
    ),
    _Option(
        "metrics_port",
        "--metrics-port",
        "MONITORING_PORT",
        "Port of /metrics in the Prometheus text format (0 picks a free port).",
        parse=_parse_int,
        check=_check_port,
        metavar="PORT",
    ),
    _Option(
        "bind_address",
        "--bind-address",
        "BIND_ADDRESS",
        "Address the readiness and metrics servers listen on.",
        check=_check_ip(None),
        metavar="IP",
    ),
    _Option(
        "workers",
        "--workers",
        "RECONCILE_WORKERS",
        "Pods reconciled concurrently (events of one pod are always handled in order).",
        parse=_parse_int,
        check=_check_workers,
        metavar="N",
    ),
    _Option(
        "log_format",
        "--log-format",
        "LOG_FORMAT",
        f"Log line format: {' or '.join(LogFormat)}.",
        parse=_parse_log_format,
        metavar="FORMAT",
    ),
    _Option(
        "log_level",
        "--log-level",
        "LOG_LEVEL",
        f"Least severe level logged: {', '.join(LogLevel)}.",
        parse=_parse_log_level,
        metavar="LEVEL",
    ),
    _Option(
        "cni_bin_dir",
        "--cni-bin-dir",
        "CNI_BIN_DIR",
        "Host CNI binary directory (mounted) where the plugin is installed.",
        check=_check_abs,
        metavar="DIR",
    ),
    _Option(
        "cni_conf_dir",
        "--cni-conf-dir",
        "CNI_NET_DIR",
        "Host CNI config directory (mounted) whose primary config gets our plugin entry.",
        check=_check_abs,
        metavar="DIR",
    ),
    _Option(
        "install_cni",
        "--install-cni",
        "INSTALL_CNI",
        "Install and maintain the CNI plugin binary, its kubeconfig and its config entry.",
        parse=_parse_bool,
        kind=_Kind.BOOL,
    ),
    _Option(
        "allowed_netns_dirs",
        "--allowed-netns-dirs",
        "ALLOWED_NETNS_DIRS",
        "Comma-separated directories that a netns path sent by the CNI plugin must be in.",
        parse=_parse_tuple,
        check=_check_abs_list,
        metavar="DIR,...",
    ),
)

_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default for f in fields(Settings) if f.default is not MISSING
}


def _default_text(option: _Option) -> str:
    if option.default_text is not None:
        return option.default_text
    value = _DEFAULTS[option.field]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | frozenset):
        return ",".join(sorted(value) if isinstance(value, frozenset) else value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to `parser`. Every flag defaults to None: "not given"."""
    group = parser.add_argument_group(
        "agent settings",
        "Each flag overrides its environment variable, which overrides the default.",
    )
    for option in _OPTIONS:
        help_text = (f"{option.help} Env {option.env}; default {_default_text(option)}.").replace(
            "%", "%%"
        )
        if option.kind is _Kind.BOOL:
            group.add_argument(
                option.flag,
                dest=option.field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                option.flag,
                dest=option.field,
                default=None,
                metavar=option.metavar,
                help=help_text,
            )


def from_args(ns: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from parsed flags, then `environ` (default `os.environ`), then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        given = getattr(ns, option.field, None)
        if given is not None:
            source = option.flag
        else:
            given = env.get(option.env) or None
            source = f"env {option.env}"
        if given is None:
            continue
        if isinstance(given, str):
            try:
                given = option.parse(given)
            except ValueError as exc:
                raise ConfigError(f"{source} {exc}, not {given!r}.") from None
        values[option.field] = given
    if "node_name" not in values:
        raise ConfigError("The node name is required: set --node-name or env NODE_NAME.")
    return Settings(**values)
