"""Golden tests of the rendered rulesets over the whole option matrix, as nft scripts and as the
kernel lists them once loaded (the form an operator sees with `nft list ruleset`).

The listings were checked once against Istio's own nftables backend goldens loaded into a netns
(identical `nft list ruleset`). Regenerate after an intended change with UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.matrix import HOST_MATRIX, POD_MATRIX, host_name, pod_name
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.errors import ConfigError
from ztunnel_redirect.core.model import HostOptions, PodOptions, valid_interface_name
from ztunnel_redirect.core.render import Ruleset, host_ruleset, pod_ruleset

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _kernel_listing(script: str) -> str:
    """Load a script into a fresh anonymous netns and list it back statelessly."""
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", "nft -f - && nft -s list ruleset"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _compare(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.read_text() == actual, f"{path.name} differs (UPDATE_GOLDEN=1 to regenerate)"


def _cases() -> list[tuple[str, Ruleset]]:
    return [(pod_name(o), pod_ruleset(o)) for o in POD_MATRIX] + [
        (host_name(o), host_ruleset(o)) for o in HOST_MATRIX
    ]


@pytest.mark.parametrize(("name", "ruleset"), _cases(), ids=[n for n, _ in _cases()])
def test_script_matches_golden(name: str, ruleset: Ruleset) -> None:
    _compare(GOLDEN / f"{name}.nft", ruleset.script())


@pytest.mark.kernel
@pytest.mark.parametrize(("name", "ruleset"), _cases(), ids=[n for n, _ in _cases()])
def test_kernel_listing_matches_golden(name: str, ruleset: Ruleset) -> None:
    _compare(GOLDEN / f"{name}.list", _kernel_listing(ruleset.script()))


def test_raw_table_only_with_dns_capture() -> None:
    with_dns = pod_ruleset(PodOptions(dns_capture=True))
    without = pod_ruleset(PodOptions(dns_capture=False))
    assert [t.name for t in with_dns.tables] == [c.NAT_TABLE, c.MANGLE_TABLE, c.RAW_TABLE]
    assert with_dns.absent == ()
    assert [t.name for t in without.tables] == [c.NAT_TABLE, c.MANGLE_TABLE]
    assert without.absent == (c.RAW_TABLE,)


def test_bypass_inbound_keeps_chains_and_jumps() -> None:
    nat = pod_ruleset(PodOptions(bypass_inbound=True)).table(c.NAT_TABLE)
    assert {chain.name for chain in nat.chains} == {
        "prerouting",
        "output",
        "istio-prerouting",
        "istio-output",
    }
    assert [r.text for r in nat.rules if r.chain == "istio-prerouting"] == []
    assert any(r.text == "jump istio-prerouting" for r in nat.rules)


def test_equal_options_give_equal_rulesets() -> None:
    """The ruleset has no per-pod value: it can be cached by options."""
    assert pod_ruleset(PodOptions()) == pod_ruleset(PodOptions())
    assert hash(pod_ruleset(PodOptions())) == hash(pod_ruleset(PodOptions()))


def test_configurable_snat_addresses_reach_both_sides() -> None:
    pod = pod_ruleset(PodOptions(probe_snat_v4="169.254.9.9", probe_snat_v6="fd00::9")).script()
    host = host_ruleset(
        HostOptions(kubelet_uid=0, probe_snat_v4="169.254.9.9", probe_snat_v6="fd00::9")
    ).script()
    for text in (pod, host):
        assert "169.254.9.9" in text
        assert "fd00::9" in text
        assert c.PROBE_SNAT_V4 not in text


@pytest.mark.parametrize(
    "name", ['eth0"; flush ruleset', "a b", "x" * 16, "", "eth0\n", "a:b", "a/b", ".", ".."]
)
def test_virtual_interface_names_that_would_inject_are_refused(name: str) -> None:
    assert not valid_interface_name(name)
    with pytest.raises(ConfigError):
        pod_ruleset(PodOptions(virtual_interfaces=(name,)))


@pytest.mark.parametrize("name", ["tun0", "net1", "x" * 15, "a@b.c-d_e+f"])
def test_virtual_interface_names_the_annotation_accepts_render(name: str) -> None:
    # One rule for every interface name: what the annotation and the CLI accept renders.
    assert valid_interface_name(name)
    assert f'iifname "{name}"' in pod_ruleset(PodOptions(virtual_interfaces=(name,))).script()
