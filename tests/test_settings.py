"""Agent settings: flags over environment over defaults, validation, and the documented --help."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.labelselector import (
    DEFAULT_ENABLEMENT_SELECTORS,
    EnablementSelector,
    LabelSelector,
    Operator,
    Requirement,
)
from ztunnel_redirect.core.settings import (
    SETTINGS,
    LogFormat,
    LogLevel,
    Settings,
    add_arguments,
    from_args,
)

ENV_NAMES = (
    "NODE_NAME",
    "AMBIENT_DNS_CAPTURE",
    "AMBIENT_IPV6",
    "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP",
    "AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE",
    "EXCLUDE_NAMESPACES",
    "AMBIENT_ENABLEMENT_SELECTOR",
    "ZTUNNEL_UDS_ADDRESS",
    "CNI_AGENT_RUN_DIR",
    "HOST_PROBE_SNAT_IP",
    "HOST_PROBE_SNAT_IPV6",
    "SYSTEM_NAMESPACE",
    "POD_NAME",
    "POD_NAMESPACE",
    "KUBECONFIG",
    "HOST_NETNS",
    "PROC_ROOT",
    "KUBELET_UID",
    "RECONCILE_PERIOD",
    "READINESS_PORT",
    "MONITORING_PORT",
    "BIND_ADDRESS",
    "RECONCILE_WORKERS",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "CNI_BIN_DIR",
    "CNI_NET_DIR",
    "INSTALL_CNI",
    "CNI_PLUGIN_BINARY",
    "CNI_CONF_NAME",
    "CHAINED_CNI_PLUGIN",
    "ISTIO_OWNED_CNI_CONFIG",
    "ISTIO_OWNED_CNI_CONF_FILENAME",
    "ALLOWED_NETNS_DIRS",
)


def _unwrapped(prog: str) -> argparse.HelpFormatter:
    # No line wrapping: it depends on the terminal width (COLUMNS) and breaks hyphenated words.
    return argparse.HelpFormatter(prog, width=100_000)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel-redirect agent", formatter_class=_unwrapped)
    add_arguments(p)
    return p


def load(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return from_args(parser().parse_args(argv), environ=env or {})


def test_defaults_follow_the_spec() -> None:
    s = load([], {"NODE_NAME": "node-1"})
    assert s.node_name == "node-1"
    assert s.dns_capture is True
    assert s.ipv6 is True
    assert s.reconcile_on_startup is True
    assert s.aws_branch_eni_probe is True
    assert s.exclude_namespaces == frozenset({"kube-system"})
    assert s.enablement_selectors == DEFAULT_ENABLEMENT_SELECTORS
    assert s.ztunnel_uds == "/var/run/ztunnel/ztunnel.sock"
    assert s.run_dir == "/var/run/istio-cni"
    assert s.plugin_event_socket == "/var/run/istio-cni/pluginevent.sock"
    assert s.probe_snat_v4 == constants.PROBE_SNAT_V4
    assert s.probe_snat_v6 == constants.PROBE_SNAT_V6
    assert s.system_namespace == "istio-system"
    assert s.pod_name is None
    assert s.pod_namespace is None
    assert s.agent_namespace == "istio-system"
    assert s.kubeconfig is None
    assert s.host_netns == "/proc/1/ns/net"
    assert s.proc_root == "/proc"
    assert s.kubelet_uid is None
    assert s.reconcile_period == 300.0
    assert s.readiness_port == 8000
    assert s.metrics_port == 15014
    assert s.bind_address == "0.0.0.0"
    assert s.workers == 8
    assert s.log_format is LogFormat.JSON
    assert s.log_level is LogLevel.INFO
    assert s.cni_bin_dir == "/opt/cni/bin"
    assert s.cni_conf_dir == "/etc/cni/net.d"
    assert s.install_cni is True
    assert s.cni_plugin_binary == "/opt/ztunnel-redirect/cni/ztunnel-redirect-cni"
    assert s.cni_conf_name is None
    assert s.chained_cni_plugin is True
    assert s.istio_owned_cni_config is False
    assert s.istio_owned_cni_conf_filename == "02-istio-cni.conflist"
    assert s.decision_file == "/var/run/istio-cni/cni-decisions.json"
    assert s.allowed_netns_dirs == ("/var/run/netns/", "/run/netns/", "/proc/")


def test_direct_construction_has_the_same_defaults_as_the_parser() -> None:
    assert Settings(node_name="node-1") == load([], {"NODE_NAME": "node-1"})


def test_every_field_is_a_setting_with_a_flag_an_environment_variable_and_help() -> None:
    names = [f.name for f in dataclasses.fields(Settings)]
    assert list(SETTINGS) == names
    assert sorted(s.env for s in SETTINGS.values()) == sorted(ENV_NAMES)
    flags = [s.flag for s in SETTINGS.values()]
    assert len(set(flags)) == len(flags)
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    for name, setting in SETTINGS.items():
        assert setting.flag.startswith("--"), name
        # Booleans are --x/--no-x; everything else shows what it takes.
        assert (setting.metavar is None) == (types[name] == "bool"), name
        assert setting.help.endswith("."), name
        assert setting.help[0].isupper(), name


def test_every_setting_is_in_help_with_its_flag_variable_and_default() -> None:
    text = parser().format_help()
    for setting in SETTINGS.values():
        assert setting.flag in text
        assert f"{setting.help} Env {setting.env}; default " in text, setting.flag


def test_a_required_setting_says_how_to_set_it() -> None:
    with pytest.raises(ConfigError) as info:
        load([], {})
    assert str(info.value) == "The node name is required: set --node-name or env NODE_NAME."


def test_every_setting_is_read_from_its_environment_variable() -> None:
    env = {
        "NODE_NAME": "node-7",
        "AMBIENT_DNS_CAPTURE": "false",
        "AMBIENT_IPV6": "0",
        "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP": "F",
        "AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE": "false",
        "EXCLUDE_NAMESPACES": "kube-system, istio-system ,,monitoring",
        "AMBIENT_ENABLEMENT_SELECTOR": "- namespaceSelector:\n    matchLabels: {team: web}\n",
        "ZTUNNEL_UDS_ADDRESS": "/run/zt/zt.sock",
        "CNI_AGENT_RUN_DIR": "/run/cni-agent",
        "HOST_PROBE_SNAT_IP": "169.254.7.1",
        "HOST_PROBE_SNAT_IPV6": "fd00::7",
        "SYSTEM_NAMESPACE": "mesh",
        "POD_NAME": "zr-abcde",
        "POD_NAMESPACE": "mesh-agents",
        "KUBECONFIG": "/etc/kube/config",
        "HOST_NETNS": "/run/netns/zr-host",
        "PROC_ROOT": "/host/proc",
        "KUBELET_UID": "1001",
        "RECONCILE_PERIOD": "2.5",
        "READINESS_PORT": "18000",
        "MONITORING_PORT": "19014",
        "BIND_ADDRESS": "127.0.0.1",
        "RECONCILE_WORKERS": "3",
        "LOG_FORMAT": "CONSOLE",
        "LOG_LEVEL": "debug",
        "CNI_BIN_DIR": "/host/opt/cni/bin",
        "CNI_NET_DIR": "/host/etc/cni/net.d",
        "INSTALL_CNI": "FALSE",
        "CNI_PLUGIN_BINARY": "/plugins/zr-cni",
        "CNI_CONF_NAME": "10-calico.conflist",
        "CHAINED_CNI_PLUGIN": "true",
        "ISTIO_OWNED_CNI_CONFIG": "true",
        "ISTIO_OWNED_CNI_CONF_FILENAME": "01-ours.conflist",
        "ALLOWED_NETNS_DIRS": "/run/netns,/var/run/netns/",
    }
    assert set(env) == set(ENV_NAMES)
    s = load([], env)
    assert s == Settings(
        node_name="node-7",
        dns_capture=False,
        ipv6=False,
        reconcile_on_startup=False,
        aws_branch_eni_probe=False,
        exclude_namespaces=frozenset({"kube-system", "istio-system", "monitoring"}),
        enablement_selectors=(
            EnablementSelector(
                namespace=LabelSelector((Requirement("team", Operator.IN, frozenset({"web"})),))
            ),
        ),
        ztunnel_uds="/run/zt/zt.sock",
        run_dir="/run/cni-agent",
        probe_snat_v4="169.254.7.1",
        probe_snat_v6="fd00::7",
        system_namespace="mesh",
        pod_name="zr-abcde",
        pod_namespace="mesh-agents",
        kubeconfig="/etc/kube/config",
        host_netns="/run/netns/zr-host",
        proc_root="/host/proc",
        kubelet_uid=1001,
        reconcile_period=2.5,
        readiness_port=18000,
        metrics_port=19014,
        bind_address="127.0.0.1",
        workers=3,
        log_format=LogFormat.CONSOLE,
        log_level=LogLevel.DEBUG,
        cni_bin_dir="/host/opt/cni/bin",
        cni_conf_dir="/host/etc/cni/net.d",
        install_cni=False,
        cni_plugin_binary="/plugins/zr-cni",
        cni_conf_name="10-calico.conflist",
        chained_cni_plugin=True,
        istio_owned_cni_config=True,
        istio_owned_cni_conf_filename="01-ours.conflist",
        allowed_netns_dirs=("/run/netns", "/var/run/netns/"),
    )
    assert s.agent_namespace == "mesh-agents"
    assert s.plugin_event_socket == "/run/cni-agent/pluginevent.sock"


def test_flags_override_environment() -> None:
    env = {
        "NODE_NAME": "from-env",
        "AMBIENT_DNS_CAPTURE": "true",
        "AMBIENT_IPV6": "false",
        "EXCLUDE_NAMESPACES": "a,b",
        "AMBIENT_ENABLEMENT_SELECTOR": "- podSelector: {matchLabels: {a: b}}",
        "READINESS_PORT": "18000",
        "RECONCILE_PERIOD": "30",
        "KUBECONFIG": "/env/kubeconfig",
    }
    s = load(
        [
            "--node-name",
            "from-flag",
            "--no-dns-capture",
            "--ipv6",
            "--exclude-namespaces",
            "c",
            "--readiness-port",
            "0",
            "--metrics-port",
            "0",
            "--reconcile-period",
            "0.5",
            "--kubeconfig",
            "/flag/kubeconfig",
            "--enablement-selectors",
            "[]",
        ],
        env,
    )
    assert s.node_name == "from-flag"
    assert s.dns_capture is False
    assert s.ipv6 is True
    assert s.exclude_namespaces == frozenset({"c"})
    assert (s.readiness_port, s.metrics_port) == (0, 0)
    assert s.reconcile_period == 0.5
    assert s.kubeconfig == "/flag/kubeconfig"
    assert s.enablement_selectors == ()


def test_environment_used_where_no_flag_is_given() -> None:
    s = load(["--node-name", "n"], {"AMBIENT_IPV6": "false", "RECONCILE_WORKERS": "2"})
    assert s.ipv6 is False
    assert s.workers == 2
    assert s.dns_capture is True


def test_empty_environment_variable_counts_as_unset() -> None:
    s = load([], {"NODE_NAME": "n", "AMBIENT_IPV6": "", "EXCLUDE_NAMESPACES": "", "KUBECONFIG": ""})
    assert s.ipv6 is True
    assert s.exclude_namespaces == frozenset({"kube-system"})
    assert s.kubeconfig is None


def test_empty_list_flag_excludes_nothing() -> None:
    s = load(["--exclude-namespaces", ""], {"NODE_NAME": "n", "EXCLUDE_NAMESPACES": "a"})
    assert s.exclude_namespaces == frozenset()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *((text, True) for text in ("1", "t", "T", "TRUE", "true", "True")),
        *((text, False) for text in ("0", "f", "F", "FALSE", "false", "False")),
    ],
)
def test_booleans_parse_like_go(text: str, expected: bool) -> None:
    assert load([], {"NODE_NAME": "n", "AMBIENT_DNS_CAPTURE": text}).dns_capture is expected


def test_environment_is_injected_not_read_from_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NODE_NAME", "from-process")
    monkeypatch.setenv("AMBIENT_IPV6", "false")
    s = load([], {"NODE_NAME": "injected"})
    assert s.node_name == "injected"
    assert s.ipv6 is True


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_NAME", "from-process")
    monkeypatch.setenv("AMBIENT_IPV6", "false")
    s = from_args(parser().parse_args([]))
    assert s.node_name == "from-process"
    assert s.ipv6 is False


@pytest.mark.parametrize(
    ("argv", "env", "mentions"),
    [
        ([], {"NODE_NAME": ""}, "NODE_NAME"),
        ([], {"NODE_NAME": " "}, "NODE_NAME"),
        (["--node-name", ""], {}, "--node-name"),
        ([], {"AMBIENT_DNS_CAPTURE": "yes"}, "AMBIENT_DNS_CAPTURE"),
        ([], {"AMBIENT_IPV6": "on"}, "AMBIENT_IPV6"),
        ([], {"AMBIENT_RECONCILE_POD_RULES_ON_STARTUP": "2"}, "AMBIENT_RECONCILE"),
        ([], {"INSTALL_CNI": "nope"}, "INSTALL_CNI"),
        ([], {"HOST_PROBE_SNAT_IP": "169.254.7"}, "HOST_PROBE_SNAT_IP"),
        ([], {"HOST_PROBE_SNAT_IP": "fd00::1"}, "HOST_PROBE_SNAT_IP"),
        (["--probe-snat-ipv6", "169.254.7.127"], {}, "--probe-snat-ipv6"),
        ([], {"BIND_ADDRESS": "localhost"}, "BIND_ADDRESS"),
        ([], {"READINESS_PORT": "80x"}, "READINESS_PORT"),
        ([], {"READINESS_PORT": "65536"}, "READINESS_PORT"),
        (["--metrics-port", "-1"], {}, "--metrics-port"),
        ([], {"READINESS_PORT": "9000", "MONITORING_PORT": "9000"}, "must differ"),
        ([], {"RECONCILE_PERIOD": "0"}, "RECONCILE_PERIOD"),
        ([], {"RECONCILE_PERIOD": "-3"}, "RECONCILE_PERIOD"),
        ([], {"RECONCILE_PERIOD": "nan"}, "RECONCILE_PERIOD"),
        ([], {"RECONCILE_PERIOD": "soon"}, "RECONCILE_PERIOD"),
        ([], {"RECONCILE_WORKERS": "0"}, "RECONCILE_WORKERS"),
        ([], {"KUBELET_UID": "-1"}, "KUBELET_UID"),
        ([], {"KUBELET_UID": "kubelet"}, "KUBELET_UID"),
        ([], {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ([], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ([], {"HOST_NETNS": "proc/1/ns/net"}, "HOST_NETNS"),
        ([], {"PROC_ROOT": "proc"}, "PROC_ROOT"),
        ([], {"ZTUNNEL_UDS_ADDRESS": "zt.sock"}, "ZTUNNEL_UDS_ADDRESS"),
        ([], {"CNI_AGENT_RUN_DIR": "run"}, "CNI_AGENT_RUN_DIR"),
        ([], {"CNI_BIN_DIR": "bin"}, "CNI_BIN_DIR"),
        ([], {"CNI_NET_DIR": "net.d"}, "CNI_NET_DIR"),
        ([], {"ALLOWED_NETNS_DIRS": "netns"}, "ALLOWED_NETNS_DIRS"),
        (["--allowed-netns-dirs", ","], {}, "--allowed-netns-dirs"),
        ([], {"EXCLUDE_NAMESPACES": "a b,c"}, "EXCLUDE_NAMESPACES"),
        ([], {"AMBIENT_ENABLEMENT_SELECTOR": "- podSelector: {"}, "is not valid YAML"),
        ([], {"AMBIENT_ENABLEMENT_SELECTOR": "podSelector: {}"}, "AMBIENT_ENABLEMENT_SELECTOR"),
        ([], {"AMBIENT_ENABLEMENT_SELECTOR": "null"}, "must be a YAML list"),
        (
            [],
            {"AMBIENT_ENABLEMENT_SELECTOR": "- podSelector:\n    matchExpression: []\n"},
            "unknown key 'matchExpression'",
        ),
        (
            [
                "--enablement-selectors",
                "- podSelector: {matchExpressions: [{key: a, operator: in}]}",
            ],
            {},
            "--enablement-selectors has an invalid enablement selector (entry 0",
        ),
        ([], {"SYSTEM_NAMESPACE": "istio system"}, "SYSTEM_NAMESPACE"),
        ([], {"POD_NAME": "a b"}, "POD_NAME"),
        (["--kubeconfig", ""], {}, "KUBECONFIG"),
        ([], {"CNI_PLUGIN_BINARY": "zr-cni"}, "CNI_PLUGIN_BINARY"),
        ([], {"CNI_CONF_NAME": "../10-calico.conflist"}, "CNI_CONF_NAME"),
        ([], {"CNI_CONF_NAME": "10-calico.yaml"}, "CNI_CONF_NAME"),
        ([], {"ISTIO_OWNED_CNI_CONF_FILENAME": ".hidden.conflist"}, "ISTIO_OWNED_CNI_CONF"),
        (
            [],
            {"ISTIO_OWNED_CNI_CONFIG": "true", "CHAINED_CNI_PLUGIN": "false"},
            "CHAINED_CNI_PLUGIN",
        ),
    ],
)
def test_invalid_values_raise_one_config_error(
    argv: list[str], env: dict[str, str], mentions: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv, {"NODE_NAME": "n"} | env)
    message = str(info.value)
    assert mentions in message
    assert message.endswith(".")
    assert "\n" not in message


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match="--readiness-port"):
        Settings(node_name="n", readiness_port=70000)
    with pytest.raises(ConfigError, match="log_format"):
        Settings(node_name="n", log_format="xml")  # type: ignore[arg-type]
    # Plain strings for the enums are accepted and normalised.
    assert Settings(node_name="n", log_level="debug").log_level is LogLevel.DEBUG  # type: ignore[arg-type]


def test_settings_are_frozen_values() -> None:
    s = Settings(node_name="n", exclude_namespaces=frozenset({"a"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node_name = "other"  # type: ignore[misc]
    assert s == Settings(node_name="n", exclude_namespaces=frozenset({"a"}))
    assert hash(s) == hash(Settings(node_name="n", exclude_namespaces=frozenset({"a"})))


def test_help_documents_every_environment_variable_and_flag() -> None:
    text = parser().format_help()
    flat = " ".join(text.split())
    for name in ENV_NAMES:
        assert f"Env {name};" in flat, name
    for flag in (
        "--node-name",
        "--dns-capture",
        "--no-dns-capture",
        "--ipv6",
        "--no-ipv6",
        "--reconcile-on-startup",
        "--exclude-namespaces",
        "--kubeconfig",
        "--host-netns",
        "--proc-root",
        "--kubelet-uid",
        "--reconcile-period",
        "--readiness-port",
        "--metrics-port",
        "--bind-address",
        "--workers",
        "--log-format",
        "--log-level",
        "--cni-bin-dir",
        "--cni-conf-dir",
        "--install-cni",
        "--no-install-cni",
        "--allowed-netns-dirs",
    ):
        assert flag in text, flag
    assert "default kube-system." in flat
    assert "default 8000." in flat
    assert "default 15014." in flat


def test_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--help"])
    assert info.value.code == 0
    assert "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP" in capsys.readouterr().out
