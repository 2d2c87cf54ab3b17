"""The `ztunnel-redirect` command as an operator runs it: a subprocess, its exit code, its output.

Exit codes: 0 success (for `check`: in place), 1 `check` found drift, 2 error. Every kernel test
runs against network namespaces of its own lab.
"""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel_redirect.adapters import logs
from ztunnel_redirect.app import cli as cli_module
from ztunnel_redirect.core.constants import HOST_TABLE, MANGLE_TABLE, NAT_TABLE, RAW_TABLE
from ztunnel_redirect.kernel import nft
from ztunnel_redirect.testing.netnslab import Lab, LabPod, Netns

CLI = Path(sys.executable).with_name("ztunnel-redirect")
TIMEOUT = 60.0
KUBELET_UID = "4242"
OUR_RULE = "fwmark 0x111/0xfff lookup 100"


def cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *argv], input=stdin, capture_output=True, text=True, check=False, timeout=TIMEOUT
    )


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=TIMEOUT
    )


def tables(ns: Netns) -> set[str]:
    return set(ns.exec("nft", "list", "tables").splitlines())


def host_elements(ns: Netns) -> str:
    """The host sets with their elements, as nft lists them."""
    return ns.exec("nft", "list", "table", "inet", HOST_TABLE)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(ipv6=False) as the_lab:
        yield the_lab


@pytest.fixture
def pod(lab: Lab) -> LabPod:
    return lab.add_pod("p")


# -- arguments and paths (no kernel) -----------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["pod"],
        ["pod", "frobnicate", "--netns", "/run/netns/x"],
        ["pod", "check"],
        ["pod", "apply", "--netns", "/run/netns/x", "--no-such-flag"],
        ["render", "pod", "--ipv7"],
        ["host", "apply", "--netns", "/run/netns/x"],
        ["host", "apply", "--netns", "/run/netns/x", "--kubelet-uid", "kubelet"],
        ["host", "add-pod", "--netns", "/run/netns/x", "--pod-uid", "u"],
        ["render", "host", "--kubelet-uid", "-5"],
        ["render", "host", "--kubelet-uid", "4294967296"],
        ["render", "pod", "--virtual-interfaces", "tun0,a:b"],
        ["agent", "--node-name", "n", "--enablement-selectors", "- podSelector: {matchLabels: ["],
        [
            "agent",
            "--node-name",
            "n",
            "--enablement-selectors",
            "[{podSelector: {matchLabels: 1}}]",
        ],
    ],
    ids=[
        "nothing",
        "unknown-command",
        "no-action",
        "unknown-action",
        "no-netns",
        "unknown-flag",
        "unknown-render-flag",
        "no-kubelet-uid",
        "uid-not-a-number",
        "no-pod-ip",
        "negative-uid",
        "uid-too-large",
        "bad-interface-name",
        "enablement-selector-not-yaml",
        "enablement-selector-invalid",
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str]) -> None:
    assert_one_line_error(cli(*argv), "ztunnel-redirect")


@pytest.mark.parametrize(
    "argv",
    [
        ["pod", "check"],
        ["pod", "apply"],
        ["pod", "remove"],
        ["host", "check", "--kubelet-uid", KUBELET_UID],
        ["host", "apply", "--kubelet-uid", KUBELET_UID],
        ["host", "add-pod", "--pod-uid", "u", "--pod-ip", "10.244.0.9"],
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_a_missing_netns_path_is_a_clear_error(argv: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    assert_one_line_error(cli(*argv, "--netns", str(missing)), str(missing), "does not exist")


@pytest.mark.parametrize(
    "argv",
    [["pod", "check"], ["pod", "apply"], ["host", "apply", "--kubelet-uid", KUBELET_UID]],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_a_path_that_is_no_netns_is_a_clear_error(argv: list[str], tmp_path: Path) -> None:
    regular = tmp_path / "netns"
    regular.write_text("not a namespace\n")
    result = cli(*argv, "--netns", str(regular))
    assert_one_line_error(result, str(regular), "not a network namespace")
    assert regular.read_text() == "not a namespace\n"


# -- render ------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_rendered_pod_ruleset_loads_with_nft_in_a_fresh_netns(lab: Lab) -> None:
    rendered = cli("render", "pod", "--no-ipv6", "--dns-capture")
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stderr == ""
    fresh = lab.add_netns("render")
    loaded = run("ip", "netns", "exec", fresh.name, "nft", "-f", "-", stdin=rendered.stdout)
    assert loaded.returncode == 0, loaded.stderr
    assert tables(fresh) == {f"table inet {name}" for name in (NAT_TABLE, MANGLE_TABLE, RAW_TABLE)}
    nat = fresh.exec("nft", "list", "table", "inet", NAT_TABLE)
    assert "redirect to :15001" in nat
    assert "redirect to :15053" in nat
    assert "ip6" not in nat


@pytest.mark.kernel
def test_rendered_host_ruleset_loads_with_nft_in_a_fresh_netns(lab: Lab) -> None:
    rendered = cli("render", "host", "--kubelet-uid", KUBELET_UID)
    assert rendered.returncode == 0, rendered.stderr
    fresh = lab.add_netns("render")
    loaded = run("ip", "netns", "exec", fresh.name, "nft", "-f", "-", stdin=rendered.stdout)
    assert loaded.returncode == 0, loaded.stderr
    assert f"skuid {KUBELET_UID}" in fresh.exec("nft", "list", "table", "inet", HOST_TABLE)


# -- pod ---------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_check_on_an_unconfigured_pod_exits_1_and_lists_what_is_missing(pod: LabPod) -> None:
    result = cli("pod", "check", "--netns", pod.path, "--no-ipv6")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for name in (NAT_TABLE, MANGLE_TABLE, RAW_TABLE):
        assert f"drift: missing_table: {name}" in lines
    assert any(line.startswith("drift: missing_ip_rule: ") for line in lines), lines
    assert any(line.startswith("drift: missing_route: ") for line in lines), lines
    assert all(line.startswith("drift: ") for line in lines), lines
    # A check writes nothing.
    assert tables(pod.netns) == set()


@pytest.mark.kernel
def test_check_without_dns_capture_names_the_raw_table_missing_only_when_wanted(
    pod: LabPod,
) -> None:
    result = cli("pod", "check", "--netns", pod.path, "--no-dns-capture")
    assert result.returncode == 1
    assert f"drift: missing_table: {RAW_TABLE}" not in result.stdout.splitlines()
    assert f"drift: missing_table: {NAT_TABLE}" in result.stdout.splitlines()


@pytest.mark.kernel
@pytest.mark.parametrize("family", [[], ["--no-ipv6"]], ids=["ipv6", "no-ipv6"])
def test_apply_then_check_is_clean_and_a_second_apply_writes_nothing(
    pod: LabPod, family: list[str]
) -> None:
    applied = cli("pod", "apply", "--netns", pod.path, *family)
    assert applied.returncode == 0, applied.stderr
    assert f"repaired: missing_table: {NAT_TABLE}" in applied.stdout.splitlines()
    assert OUR_RULE in pod.netns.ip("rule")
    assert "local default dev lo" in pod.netns.ip("route", "show", "table", "100")

    checked = cli("pod", "check", "--netns", pod.path, *family)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    again = cli("pod", "apply", "--netns", pod.path, *family)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


@pytest.mark.kernel
def test_check_is_clean_when_many_other_ip_rules_follow_ours(pod: LabPod) -> None:
    assert cli("pod", "apply", "--netns", pod.path).returncode == 0
    # Rules listed after ours (priority 32764): enough that the rule dump spans several reads.
    batch = "".join(
        f"rule add priority 32765 from 10.9.{i // 250}.{i % 250} lookup 300\n" for i in range(100)
    )
    added = run("ip", "-n", pod.netns.name, "-batch", "-", stdin=batch)
    assert added.returncode == 0, added.stderr

    checked = cli("pod", "check", "--netns", pod.path)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    again = cli("pod", "apply", "--netns", pod.path)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


@pytest.mark.kernel
def test_check_against_other_options_reports_the_difference(pod: LabPod) -> None:
    assert cli("pod", "apply", "--netns", pod.path).returncode == 0
    bypass = cli("pod", "check", "--netns", pod.path, "--bypass-inbound")
    assert bypass.returncode == 1
    assert all(line.startswith("drift: ") for line in bypass.stdout.splitlines())
    assert "redirect to :15006" in bypass.stdout


@pytest.mark.kernel
def test_remove_deletes_only_what_is_ours(pod: LabPod) -> None:
    ns = pod.netns
    assert cli("pod", "apply", "--netns", pod.path).returncode == 0
    ns.exec("nft", "add", "table", "inet", "other")
    ns.exec(
        "nft", "add", "chain", "inet", "other", "input", "{ type filter hook input priority 0 ; }"
    )
    ns.exec("nft", "add", "rule", "inet", "other", "input", "counter")
    ns.ip("rule", "add", "priority", "1000", "fwmark", "0x5", "lookup", "200")
    ns.ip("route", "add", "local", "10.1.0.0/16", "dev", "lo", "table", "200")
    # Neighbours of ours: the same priority, and our route table, used by someone else.
    ns.ip("rule", "add", "priority", "32764", "fwmark", "0x6", "lookup", "201")
    ns.ip("route", "add", "local", "10.2.0.0/16", "dev", "lo", "table", "100")
    clean = cli("pod", "check", "--netns", pod.path)
    assert (clean.returncode, clean.stdout) == (0, "")

    removed = cli("pod", "remove", "--netns", pod.path)
    assert removed.returncode == 0, removed.stderr
    lines = removed.stdout.splitlines()
    for name in (NAT_TABLE, MANGLE_TABLE, RAW_TABLE):
        assert f"removed: table inet {name}" in lines
    assert any(line.startswith("removed: ip rule ") for line in lines), lines

    assert tables(ns) == {"table inet other"}
    assert "counter" in ns.exec("nft", "list", "chain", "inet", "other", "input")
    rules = ns.ip("rule")
    assert "1000:\tfrom all fwmark 0x5 lookup 200" in rules
    assert "32764:\tfrom all fwmark 0x6 lookup 201" in rules
    assert OUR_RULE not in rules
    assert ns.ip("route", "show", "table", "100").strip() == "local 10.2.0.0/16 dev lo scope host"
    assert "local 10.1.0.0/16 dev lo" in ns.ip("route", "show", "table", "200")

    # Nothing of ours left: a second remove has nothing to say, and a check finds it all missing.
    again = cli("pod", "remove", "--netns", pod.path)
    assert (again.returncode, again.stdout) == (0, "")
    assert cli("pod", "check", "--netns", pod.path).returncode == 1


# -- host --------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_host_apply_check_and_remove(lab: Lab) -> None:
    node = lab.node.path
    missing = cli("host", "check", "--netns", node, "--kubelet-uid", KUBELET_UID)
    assert missing.returncode == 1
    assert f"drift: missing_table: {HOST_TABLE}" in missing.stdout.splitlines()

    applied = cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID)
    assert applied.returncode == 0, applied.stderr
    assert f"skuid {KUBELET_UID}" in host_elements(lab.node)
    clean = cli("host", "check", "--netns", node, "--kubelet-uid", KUBELET_UID)
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "", "")

    # Another kubelet uid is drift of the postrouting chain.
    other = cli("host", "check", "--netns", node, "--kubelet-uid", "4343")
    assert other.returncode == 1
    assert "postrouting" in other.stdout

    assert cli("host", "remove", "--netns", node).stdout == "removed: host table\n"
    assert tables(lab.node) == set()
    again = cli("host", "remove", "--netns", node)
    assert (again.returncode, again.stdout) == (0, "nothing to remove\n")


@pytest.mark.kernel
def test_host_add_pod_and_remove_pod_match_ip_and_uid(lab: Lab) -> None:
    node = lab.node.path
    assert cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID).returncode == 0
    ips = ["--pod-ip", "10.244.0.9", "--pod-ip", "fd00:244::9"]

    added = cli("host", "add-pod", "--netns", node, "--pod-uid", "uid-1", *ips)
    assert (added.returncode, added.stderr) == (0, "")
    listed = host_elements(lab.node)
    assert '10.244.0.9 comment "uid-1"' in listed
    assert 'fd00:244::9 comment "uid-1"' in listed
    # `host check` without elements checks the structure only: still clean.
    assert cli("host", "check", "--netns", node, "--kubelet-uid", KUBELET_UID).returncode == 0

    # The IP was reused by another pod: a remove for the wrong uid removes nothing.
    wrong = cli("host", "remove-pod", "--netns", node, "--pod-uid", "uid-2", *ips)
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (0, "", "")
    assert host_elements(lab.node) == listed

    right = cli("host", "remove-pod", "--netns", node, "--pod-uid", "uid-1", *ips)
    assert right.returncode == 0, right.stderr
    assert right.stdout.splitlines() == ["removed: 10.244.0.9", "removed: fd00:244::9"]
    after = host_elements(lab.node)
    assert "10.244.0.9" not in after
    assert "fd00:244::9" not in after


@pytest.mark.kernel
def test_host_apply_repairs_a_flushed_table_and_keeps_the_elements(lab: Lab) -> None:
    node = lab.node.path
    assert cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID).returncode == 0
    added = cli("host", "add-pod", "--netns", node, "--pod-uid", "uid-1", "--pod-ip", "10.244.0.9")
    assert added.returncode == 0, added.stderr
    lab.node.exec("nft", "flush", "chain", "inet", HOST_TABLE, "postrouting")

    drift = cli("host", "check", "--netns", node, "--kubelet-uid", KUBELET_UID)
    assert drift.returncode == 1
    assert "missing_rule" in drift.stdout

    repaired = cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID)
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.startswith("repaired: ")
    listed = host_elements(lab.node)
    assert f"skuid {KUBELET_UID}" in listed
    assert '10.244.0.9 comment "uid-1"' in listed
    assert cli("host", "check", "--netns", node, "--kubelet-uid", KUBELET_UID).returncode == 0


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("ip", "uid", "needle"),
    [("10.244.0.300", "uid-1", "invalid pod IP"), ("10.244.0.9", "bad uid", "invalid pod UID")],
    ids=["bad-ip", "bad-uid"],
)
def test_host_add_pod_rejects_a_bad_ip_or_uid(lab: Lab, ip: str, uid: str, needle: str) -> None:
    node = lab.node.path
    assert cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID).returncode == 0
    before = host_elements(lab.node)
    result = cli("host", "add-pod", "--netns", node, "--pod-uid", uid, "--pod-ip", ip)
    assert_one_line_error(result, needle)
    assert host_elements(lab.node) == before


@pytest.mark.kernel
def test_host_add_pod_without_the_host_table_is_a_clear_one_line_error(lab: Lab) -> None:
    node = lab.node.path
    result = cli("host", "add-pod", "--netns", node, "--pod-uid", "uid-1", "--pod-ip", "10.244.0.9")
    assert tables(lab.node) == set()
    assert_one_line_error(result, HOST_TABLE)


@pytest.mark.kernel
def test_host_add_pod_v6_to_a_table_without_ipv6_names_the_missing_set(lab: Lab) -> None:
    node = lab.node.path
    apply = cli("host", "apply", "--netns", node, "--kubelet-uid", KUBELET_UID, "--no-ipv6")
    assert apply.returncode == 0, apply
    before = host_elements(lab.node)
    result = cli(
        "host", "add-pod", "--netns", node, "--pod-uid", "uid-1", "--pod-ip", "10.244.0.9",
        "--pod-ip", "fd00::9",
    )  # fmt: skip
    assert_one_line_error(result, "istio-inpod-probes-v6")
    assert "does not exist" not in result.stderr
    assert host_elements(lab.node) == before


@pytest.fixture
def without_libnftables(monkeypatch: pytest.MonkeyPatch) -> None:
    """libnftables cannot be loaded (as on a node without the nftables package)."""
    monkeypatch.setattr(nft, "_lib", None)
    monkeypatch.setattr(ctypes.util, "find_library", lambda _name: "/nonexistent/libnft.so")


@pytest.mark.kernel
@pytest.mark.usefixtures("without_libnftables")
@pytest.mark.parametrize("command", [["pod", "check"], ["host", "check", "--kubelet-uid", "0"]])
def test_without_libnftables_the_start_up_probe_fails_with_one_line(
    lab: Lab, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli_module.main([*command, "--netns", lab.node.path])
    finally:
        logs.reset()
    out = capsys.readouterr()
    assert_one_line_error(
        subprocess.CompletedProcess([], code, out.out, out.err),
        "libnftables is not available",
        "install the distribution's nftables package",
    )
    assert tables(lab.node) == set()
