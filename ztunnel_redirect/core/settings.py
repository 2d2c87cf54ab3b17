"""The agent's settings: one frozen value, read from flags and Istio's environment variables.

Pure: no I/O, no asyncio. Each setting is declared once, as a field of `Settings` whose metadata
(`_setting(...)`) names its flag, its environment variable, its help and its check; the type
annotation decides how text is parsed and the field default is the default. `add_arguments` adds
one flag per field; `from_args` resolves each setting as **flag, else environment variable, else
default**, then validates it. Every flag's help names its environment variable and its default,
so `ztunnel-redirect agent --help` documents them. Adding a setting is adding one field.

The environment variables keep Istio's names (docs/design.md §10) so that an operator's Helm values
and DaemonSet env carry over. Reading rules:

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
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, TypeVar

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.enrollment import parse_bool
from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.labelselector import (
    DEFAULT_ENABLEMENT_SELECTORS,
    EnablementSelector,
    parse_enablement_selectors,
)
from ztunnel_redirect.core.model import MAX_UID

__all__ = [
    "SETTINGS",
    "LogFormat",
    "LogLevel",
    "Setting",
    "Settings",
    "add_arguments",
    "from_args",
]

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


def _check_conf_name(value: str) -> str | None:
    if not value.endswith((".conf", ".conflist")) or "/" in value or value.startswith("."):
        return f"must be a file name ending in .conf or .conflist, not {value!r}"
    return None


def _check_optional_conf_name(value: str | None) -> str | None:
    return None if value is None else _check_conf_name(value)


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
    if value is not None and not 0 <= value <= MAX_UID:
        return f"must be a uid from 0 to {MAX_UID}, not {value}"
    return None


def _check_period(value: float) -> str | None:
    if not (math.isfinite(value) and value > 0):
        return f"must be a number of seconds greater than 0, not {value}"
    return None


def _check_workers(value: int) -> str | None:
    if value < 1:
        return f"must be at least 1, not {value}"
    return None


@dataclass(frozen=True)
class Setting:
    """How one `Settings` field is set from outside. Declared in the field's metadata."""

    flag: str
    env: str
    """Istio's environment variable name."""
    help: str
    """One or more sentences; `--help` appends the variable and the default."""
    check: Callable[[Any], str | None] = _check_none
    """None when the typed value is fine, else the end of a sentence saying what is wrong."""
    metavar: str | None = None
    """For `--help`; booleans have none (they get `--x/--no-x`)."""
    default_text: str | None = None
    """How `--help` shows the default, where the field default alone would not say it."""

    def names(self) -> str:
        return f"{self.flag} (env {self.env})"


_METADATA_KEY: Final = "setting"


def _setting(
    flag: str,
    env: str,
    help: str,
    *,
    check: Callable[[Any], str | None] = _check_none,
    metavar: str | None = None,
    default_text: str | None = None,
) -> Mapping[str, Setting]:
    """The metadata of one `Settings` field: `field(default=..., metadata=_setting(...))`."""
    return {_METADATA_KEY: Setting(flag, env, help, check, metavar, default_text)}


@dataclass(frozen=True)
class Settings:
    """Everything the node agent is configured with. Checked on construction (`ConfigError`)."""

    node_name: str = field(
        metadata=_setting(
            "--node-name",
            "NODE_NAME",
            "Name of the node this agent serves (required; the downward API's spec.nodeName).",
            check=_check_name,
            metavar="NAME",
        )
    )
    dns_capture: bool = field(
        default=True,
        metadata=_setting(
            "--dns-capture",
            "AMBIENT_DNS_CAPTURE",
            "Redirect enrolled pods' DNS queries to ztunnel's DNS proxy (adds the raw table); "
            f"a pod's {constants.DNS_CAPTURE_ANNOTATION} annotation overrides it.",
        ),
    )
    ipv6: bool = field(
        default=True,
        metadata=_setting(
            "--ipv6",
            "AMBIENT_IPV6",
            "Also redirect IPv6 traffic (rules and routes for both families).",
        ),
    )
    reconcile_on_startup: bool = field(
        default=True,
        metadata=_setting(
            "--reconcile-on-startup",
            "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP",
            "At start every enrolled pod's rules are verified either way; with this set, what "
            "differs is repaired before the agent is ready, otherwise it is only reported (log "
            "and metric) and left until the pod's next event or periodic check.",
        ),
    )
    aws_branch_eni_probe: bool = field(
        default=True,
        metadata=_setting(
            "--aws-branch-eni-probe",
            "AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE",
            "On EKS with Security Groups for Pods (detected by net.ipv4.tcp_early_demux=0 on the "
            "host), add Istio's two ip rules per enrolled branch-ENI pod so kubelet probes reach "
            "it through its veth and the replies come back to the host.",
        ),
    )
    exclude_namespaces: frozenset[str] = field(
        default=frozenset(constants.EXCLUDE_NAMESPACES),
        metadata=_setting(
            "--exclude-namespaces",
            "EXCLUDE_NAMESPACES",
            "Comma-separated namespaces whose pods are never enrolled.",
            check=_check_names,
            metavar="NS,...",
        ),
    )
    enablement_selectors: tuple[EnablementSelector, ...] = field(
        default=DEFAULT_ENABLEMENT_SELECTORS,
        metadata=_setting(
            "--enablement-selectors",
            "AMBIENT_ENABLEMENT_SELECTOR",
            "Which pods are enrolled, as Istio's chart value ambient.enablementSelectors renders "
            "it: a YAML list of {podSelector, namespaceSelector} Kubernetes label selectors; a "
            "pod is enrolled when some entry's podSelector matches its labels and the same "
            "entry's namespaceSelector its namespace's (an empty selector matches everything). "
            "Host-network pods, sidecar pods and excluded namespaces never are.",
            metavar="YAML",
            default_text=(
                "Istio's chart default: pods labelled istio.io/dataplane-mode=ambient, and the "
                "pods of namespaces so labelled unless the pod has istio.io/dataplane-mode=none"
            ),
        ),
    )
    ztunnel_uds: str = field(
        default=constants.ZTUNNEL_UDS_ADDRESS,
        metadata=_setting(
            "--ztunnel-uds",
            "ZTUNNEL_UDS_ADDRESS",
            "Unix socket the agent listens on for ztunnel (ZDS).",
            check=_check_abs,
            metavar="PATH",
        ),
    )
    run_dir: str = field(
        default=constants.CNI_AGENT_RUN_DIR,
        metadata=_setting(
            "--run-dir",
            "CNI_AGENT_RUN_DIR",
            f"Directory shared with the CNI plugin; the agent listens on "
            f"<dir>/{constants.PLUGIN_EVENT_SOCKET} for its events and "
            f"<dir>/{constants.PLUGIN_LOG_SOCKET} for its log lines.",
            check=_check_abs,
            metavar="DIR",
        ),
    )
    probe_snat_v4: str = field(
        default=constants.PROBE_SNAT_V4,
        metadata=_setting(
            "--probe-snat-ip",
            "HOST_PROBE_SNAT_IP",
            "IPv4 source address given to kubelet probes on the host, so pods let them bypass "
            "ztunnel.",
            check=_check_ip(4),
            metavar="IP",
        ),
    )
    probe_snat_v6: str = field(
        default=constants.PROBE_SNAT_V6,
        metadata=_setting(
            "--probe-snat-ipv6",
            "HOST_PROBE_SNAT_IPV6",
            "IPv6 source address given to kubelet probes on the host.",
            check=_check_ip(6),
            metavar="IP",
        ),
    )
    system_namespace: str = field(
        default=constants.SYSTEM_NAMESPACE,
        metadata=_setting(
            "--system-namespace",
            "SYSTEM_NAMESPACE",
            "Istio's namespace, where ztunnel runs.",
            check=_check_name,
            metavar="NS",
        ),
    )
    pod_name: str | None = field(
        default=None,
        metadata=_setting(
            "--pod-name",
            "POD_NAME",
            "Name of the agent's own pod (downward API).",
            check=_check_optional_name,
            metavar="NAME",
        ),
    )
    pod_namespace: str | None = field(
        default=None,
        metadata=_setting(
            "--pod-namespace",
            "POD_NAMESPACE",
            "Namespace of the agent's own pods (downward API).",
            check=_check_optional_name,
            metavar="NS",
            default_text="the system namespace",
        ),
    )
    kubeconfig: str | None = field(
        default=None,
        metadata=_setting(
            "--kubeconfig",
            "KUBECONFIG",
            "Kubeconfig file for the Kubernetes API.",
            check=_check_optional_path,
            metavar="PATH",
            default_text="the in-cluster service account",
        ),
    )
    host_netns: str = field(
        default=constants.HOST_NETNS,
        metadata=_setting(
            "--host-netns",
            "HOST_NETNS",
            "The host's network namespace, where the kubelet probe SNAT rules are installed.",
            check=_check_abs,
            metavar="PATH",
        ),
    )
    proc_root: str = field(
        default=constants.PROC_ROOT,
        metadata=_setting(
            "--proc-root",
            "PROC_ROOT",
            "The host's /proc (needs hostPID), scanned for pods' network namespaces and the "
            "kubelet's uid.",
            check=_check_abs,
            metavar="DIR",
        ),
    )
    kubelet_uid: int | None = field(
        default=None,
        metadata=_setting(
            "--kubelet-uid",
            "KUBELET_UID",
            "Uid the kubelet runs as, whose probes bypass redirection.",
            check=_check_uid,
            metavar="UID",
            default_text="found by scanning the proc root",
        ),
    )
    reconcile_period: float = field(
        default=300.0,
        metadata=_setting(
            "--reconcile-period",
            "RECONCILE_PERIOD",
            "Seconds between two backstop checks of every enrolled pod's rules against the kernel"
            " (drift is found at once by kernel notifications; the pass catches what they cannot"
            " show).",
            check=_check_period,
            metavar="SECONDS",
        ),
    )
    readiness_port: int = field(
        default=constants.READINESS_PORT,
        metadata=_setting(
            "--readiness-port",
            "READINESS_PORT",
            "Port of /healthz and /readyz (0 picks a free port).",
            check=_check_port,
            metavar="PORT",
        ),
    )
    metrics_port: int = field(
        default=constants.METRICS_PORT,
        metadata=_setting(
            "--metrics-port",
            "MONITORING_PORT",
            "Port of /metrics in the Prometheus text format (0 picks a free port).",
            check=_check_port,
            metavar="PORT",
        ),
    )
    bind_address: str = field(
        default="0.0.0.0",  # noqa: S104 - kubelet probes and Prometheus reach the pod IP
        metadata=_setting(
            "--bind-address",
            "BIND_ADDRESS",
            "Address the readiness and metrics servers listen on.",
            check=_check_ip(None),
            metavar="IP",
        ),
    )
    workers: int = field(
        default=8,
        metadata=_setting(
            "--workers",
            "RECONCILE_WORKERS",
            "Pods reconciled concurrently (events of one pod are always handled in order).",
            check=_check_workers,
            metavar="N",
        ),
    )
    log_format: LogFormat = field(
        default=LogFormat.JSON,
        metadata=_setting(
            "--log-format",
            "LOG_FORMAT",
            f"Log line format: {' or '.join(LogFormat)}.",
            metavar="FORMAT",
        ),
    )
    log_level: LogLevel = field(
        default=LogLevel.INFO,
        metadata=_setting(
            "--log-level",
            "LOG_LEVEL",
            f"Least severe level logged: {', '.join(LogLevel)}.",
            metavar="LEVEL",
        ),
    )
    cni_bin_dir: str = field(
        default=constants.CNI_BIN_DIR,
        metadata=_setting(
            "--cni-bin-dir",
            "CNI_BIN_DIR",
            "Host CNI binary directory (mounted) where the plugin is installed.",
            check=_check_abs,
            metavar="DIR",
        ),
    )
    cni_conf_dir: str = field(
        default=constants.CNI_CONF_DIR,
        metadata=_setting(
            "--cni-conf-dir",
            "CNI_NET_DIR",
            "Host CNI config directory (mounted) whose primary config gets our plugin entry.",
            check=_check_abs,
            metavar="DIR",
        ),
    )
    install_cni: bool = field(
        default=True,
        metadata=_setting(
            "--install-cni",
            "INSTALL_CNI",
            "Install and maintain the CNI plugin executable and its CNI config.",
        ),
    )
    cni_plugin_binary: str = field(
        default=constants.CNI_PLUGIN_SOURCE,
        metadata=_setting(
            "--cni-plugin-binary",
            "CNI_PLUGIN_BINARY",
            "The CNI plugin executable to install (copied into the CNI bin dir; it must answer "
            "VERSION there before any CNI config names it).",
            check=_check_abs,
            metavar="PATH",
        ),
    )
    cni_conf_name: str | None = field(
        default=None,
        metadata=_setting(
            "--cni-conf-name",
            "CNI_CONF_NAME",
            "Chained: the primary CNI config file to add our entry to (x.conf and x.conflist "
            "stand in for each other). Not chained: the name of our own config.",
            check=_check_optional_conf_name,
            metavar="FILE",
            default_text="chained, the first config file by name; not chained, "
            + constants.CNI_STANDALONE_CONF_NAME,
        ),
    )
    chained_cni_plugin: bool = field(
        default=True,
        metadata=_setting(
            "--chained-cni-plugin",
            "CHAINED_CNI_PLUGIN",
            "Chain the plugin after the primary CNI; when false, write a standalone config of "
            "our own instead (for setups that attach it as a network of its own, e.g. Multus).",
        ),
    )
    istio_owned_cni_config: bool = field(
        default=False,
        metadata=_setting(
            "--istio-owned-cni-config",
            "ISTIO_OWNED_CNI_CONFIG",
            "Chained: write the primary's config plus our entry into a file of our own that "
            "sorts first, and leave the primary's file untouched.",
        ),
    )
    istio_owned_cni_conf_filename: str = field(
        default=constants.CNI_OWNED_CONF_NAME,
        metadata=_setting(
            "--istio-owned-cni-conf-filename",
            "ISTIO_OWNED_CNI_CONF_FILENAME",
            "The file of our own with --istio-owned-cni-config.",
            check=_check_conf_name,
            metavar="FILE",
        ),
    )
    allowed_netns_dirs: tuple[str, ...] = field(
        default=constants.ALLOWED_NETNS_DIRS,
        metadata=_setting(
            "--allowed-netns-dirs",
            "ALLOWED_NETNS_DIRS",
            "Comma-separated directories that a netns path sent by the CNI plugin must be in.",
            check=_check_abs_list,
            metavar="DIR,...",
        ),
    )

    def __post_init__(self) -> None:
        for option in _OPTIONS:
            value = option.normalise(getattr(self, option.name))
            object.__setattr__(self, option.name, value)
            problem = option.setting.check(value)
            if problem is not None:
                raise ConfigError(f"{option.setting.names()} {problem}.")
        if self.istio_owned_cni_config and not self.chained_cni_plugin:
            raise ConfigError(
                "ISTIO_OWNED_CNI_CONFIG (--istio-owned-cni-config) needs a chained plugin: "
                "CHAINED_CNI_PLUGIN (--chained-cni-plugin) is false."
            )
        if self.readiness_port == self.metrics_port and self.readiness_port != 0:
            raise ConfigError(
                f"The readiness port and the metrics port are both {self.readiness_port}; "
                "they must differ."
            )

    @property
    def plugin_event_socket(self) -> str:
        """Where the CNI plugin posts its events (docs/design.md §8)."""
        return posixpath.join(self.run_dir, constants.PLUGIN_EVENT_SOCKET)

    @property
    def plugin_log_socket(self) -> str:
        """Where the CNI plugin posts its log lines (docs/design.md §8.3)."""
        return posixpath.join(self.run_dir, constants.PLUGIN_LOG_SOCKET)

    @property
    def decision_file(self) -> str:
        """The CNI plugin's decision file, next to its event socket (cniplugin/README.md)."""
        return posixpath.join(self.run_dir, constants.DECISION_FILE)

    @property
    def agent_namespace(self) -> str:
        """The namespace of the agent's own pods."""
        return self.pod_namespace or self.system_namespace


# Parsers: text (from a flag or the environment) to the typed value; ValueError says why not.
# Which one a setting uses follows from its type annotation (`_parser`).


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


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum_parser(kind: type[_E]) -> Callable[[str], _E]:
    def parse(text: str) -> _E:
        try:
            return kind(text.strip().lower())
        except ValueError:
            raise ValueError(f"must be one of {', '.join(kind)}") from None

    return parse


def _enum(kind: type[_E], value: object, name: str) -> _E:
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}.") from None


_PARSERS: Final[Mapping[object, Callable[[str], Any]]] = {
    str: _parse_str,
    bool: _parse_bool,
    int: _parse_int,
    float: _parse_float,
    frozenset[str]: _parse_set,
    tuple[str, ...]: _parse_tuple,
    tuple[EnablementSelector, ...]: parse_enablement_selectors,
}


def _parser(hint: Any) -> Callable[[str], Any]:
    """How text becomes a value of type `hint`; `X | None` parses as X (unset text is None)."""
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return _enum_parser(hint)
    try:
        return _PARSERS[hint]
    except KeyError:
        raise TypeError(f"no parser for settings of type {hint}") from None


@dataclass(frozen=True)
class _Option:
    """One `Settings` field with everything derived from its declaration."""

    name: str
    setting: Setting
    hint: Any
    default: Any
    """`MISSING` for a required setting."""
    parse: Callable[[str], Any]

    @property
    def is_bool(self) -> bool:
        return self.hint is bool

    def normalise(self, value: Any) -> Any:
        """A directly constructed value in its canonical type (a list becomes a tuple, ...)."""
        if isinstance(self.hint, type) and issubclass(self.hint, enum.StrEnum):
            return _enum(self.hint, value, self.name)
        origin = typing.get_origin(self.hint)
        return origin(value) if origin in (frozenset, tuple) else value

    def default_text(self) -> str:
        if self.setting.default_text is not None:
            return self.setting.default_text
        if self.default is MISSING:
            return "none, required"
        return _as_text(self.default)


def _as_text(value: Any) -> str:
    """A default as an operator would write it in a flag or an environment variable."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, frozenset | tuple):
        return ",".join(sorted(value) if isinstance(value, frozenset) else value)
    return str(value)


def _options() -> tuple[_Option, ...]:
    hints = typing.get_type_hints(Settings)
    return tuple(
        _Option(
            name=f.name,
            setting=f.metadata[_METADATA_KEY],
            hint=hints[f.name],
            default=f.default,
            parse=_parser(hints[f.name]),
        )
        for f in fields(Settings)
    )


_OPTIONS: Final = _options()

SETTINGS: Final[Mapping[str, Setting]] = types.MappingProxyType(
    {option.name: option.setting for option in _OPTIONS}
)
"""Every `Settings` field by name, with its flag, environment variable and help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to `parser`. Every flag defaults to None: "not given"."""
    group = parser.add_argument_group(
        "agent settings",
        "Each flag overrides its environment variable, which overrides the default.",
    )
    for option in _OPTIONS:
        setting = option.setting
        help_text = f"{setting.help} Env {setting.env}; default {option.default_text()}."
        kwargs: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if option.is_bool
            else {"metavar": setting.metavar}
        )
        group.add_argument(
            setting.flag,
            dest=option.name,
            default=None,
            help=help_text.replace("%", "%%"),
            **kwargs,
        )


def from_args(ns: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from parsed flags, then `environ` (default `os.environ`), then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        setting = option.setting
        given = getattr(ns, option.name, None)
        if given is not None:
            source = setting.flag
        else:
            given = env.get(setting.env) or None
            source = f"env {setting.env}"
        if given is None:
            if option.default is MISSING:
                noun = option.name.replace("_", " ")
                raise ConfigError(
                    f"The {noun} is required: set {setting.flag} or env {setting.env}."
                )
            continue
        if isinstance(given, str):
            try:
                given = option.parse(given)
            except ValueError as exc:
                raise ConfigError(f"{source} {exc}, not {given!r}.") from None
        values[option.name] = given
    return Settings(**values)
