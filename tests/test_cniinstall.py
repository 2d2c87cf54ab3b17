"""Installing the CNI plugin into realistic CNI directories (temporary, never the node's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from ztunnel_redirect import cni_plugin, cnievents
from ztunnel_redirect.cniinstall import (
    CONF_DIR_POLL,
    KUBECONFIG_NAME,
    CniConfigError,
    CniInstaller,
    CniKeeper,
    NoPrimaryConfigError,
)
from ztunnel_redirect.errors import ConfigError, RetryableError
from ztunnel_redirect.workqueue import FakeClock

DATA = Path(__file__).parent / "data" / "cni"
PLUGIN_CONFIG: dict[str, Any] = {
    "plugin_event_socket": cnievents.DEFAULT_SOCKET_PATH,
    "exclude_namespaces": ["kube-system"],
    "log_level": "info",
}


class Node:
    """A node's CNI directories and the agent's service account, under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.bin_dir = root / "opt" / "cni" / "bin"
        self.conf_dir = root / "etc" / "cni" / "net.d"
        self.sa_dir = root / "serviceaccount"
        self.bin_dir.mkdir(parents=True)
        self.conf_dir.mkdir(parents=True)
        self.sa_dir.mkdir()

    def add(self, name: str, as_name: str | None = None) -> Path:
        target = self.conf_dir / (as_name or name)
        shutil.copyfile(DATA / name, target)
        target.chmod(0o644)
        return target

    def installer(self, **overrides: Any) -> CniInstaller:
        kwargs: dict[str, Any] = {
            "bin_dir": str(self.bin_dir),
            "conf_dir": str(self.conf_dir),
            "plugin_config": PLUGIN_CONFIG,
            "service_account_dir": str(self.sa_dir),
            "api_server_url": "https://10.96.0.1:443",
        }
        kwargs.update(overrides)
        return CniInstaller(**kwargs)

    def in_cluster(self, token: str = "token-1") -> None:  # noqa: S107 - a fake token
        (self.sa_dir / "token").write_text(token)
        shutil.copyfile(self.ca_pem(), self.sa_dir / "ca.crt")

    def ca_pem(self) -> Path:
        """A real self-signed CA, so that the plugin's TLS setup can load it."""
        pem = self.sa_dir.parent / "ca.pem"
        if not pem.exists():
            if shutil.which("openssl") is None:
                pytest.skip("openssl is needed to make a CA certificate")
            subprocess.run(
                [
                    *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                    *("-subj", "/CN=test-ca", "-keyout", str(pem.with_suffix(".key"))),
                    *("-out", str(pem)),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
        return pem


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield Node(tmp_path)


def load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def our_entry(installer: CniInstaller) -> dict[str, Any]:
    return {
        "type": "ztunnel-redirect-cni",
        **PLUGIN_CONFIG,
        "kubeconfig": str(installer.kubeconfig_path),
    }


PRIMARIES = [
    "10-calico.conflist",
    "05-cilium.conflist",
    "10-flannel.conflist",
    "10-kindnet.conflist",
]


@pytest.mark.parametrize("name", PRIMARIES)
def test_install_appends_our_entry_to_the_primary_conflist(node: Node, name: str) -> None:
    original = load(DATA / name)
    path = node.add(name)
    installer = node.installer()

    assert installer.install() is True

    config = load(path)
    assert config["plugins"][:-1] == original["plugins"]
    assert config["plugins"][-1] == our_entry(installer)
    assert {k: v for k, v in config.items() if k != "plugins"} == {
        k: v for k, v in original.items() if k != "plugins"
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in node.conf_dir.iterdir()] == [name]  # no temp files left


@pytest.mark.parametrize("name", PRIMARIES)
def test_install_is_idempotent(node: Node, name: str) -> None:
    path = node.add(name)
    node.in_cluster()
    installer = node.installer()
    installer.install()
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in (path, installer.binary_path)}

    assert node.installer().install() is False
    assert node.installer().ensure() is False

    after = {p: (p.stat().st_ino, p.read_bytes()) for p in (path, installer.binary_path)}
    assert after == before


def test_binary_is_the_plugin_with_a_shebang_and_mode_0755(node: Node) -> None:
    node.add("10-kindnet.conflist")
    installer = node.installer()
    installer.install()
    binary = node.bin_dir / "ztunnel-redirect-cni"
    assert installer.binary_path == binary
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    text = binary.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert text == Path(cni_plugin.__file__).read_text()


def test_binary_is_replaced_when_it_differs(node: Node) -> None:
    node.add("10-kindnet.conflist")
    installer = node.installer()
    installer.install()
    installer.binary_path.write_text("#!/bin/sh\necho old version\n")
    assert installer.ensure() is True
    assert installer.binary_path.read_text() == Path(cni_plugin.__file__).read_text()


def test_single_plugin_conf_becomes_a_conflist(node: Node) -> None:
    original = load(DATA / "10-bridge.conf")
    node.add("10-bridge.conf")
    installer = node.installer()

    installer.install()

    assert not (node.conf_dir / "10-bridge.conf").exists()
    config = load(node.conf_dir / "10-bridge.conflist")
    assert config["cniVersion"] == "1.0.0"
    assert config["name"] == "bridge"
    assert config["plugins"] == [original, our_entry(installer)]
    assert node.installer().ensure() is False


def test_primary_writing_its_conf_again_wins_over_the_conflist_we_made(node: Node) -> None:
    node.add("10-bridge.conf")
    installer = node.installer()
    installer.install()
    # The primary CNI restarts and writes its .conf again, changed: it sorts before our
    # .conflist, so the runtime would use it, without our plugin.
    fresh = {**load(DATA / "10-bridge.conf"), "bridge": "cni1"}
    (node.conf_dir / "10-bridge.conf").write_text(json.dumps(fresh))

    assert installer.ensure() is True

    assert [p.name for p in node.conf_dir.iterdir()] == ["10-bridge.conflist"]
    assert load(node.conf_dir / "10-bridge.conflist")["plugins"] == [fresh, our_entry(installer)]
    assert installer.ensure() is False


def test_conf_next_to_a_conflist_that_is_not_ours_is_left_alone(node: Node) -> None:
    conf = node.add("10-bridge.conf")
    conflist = node.add("10-flannel.conflist", as_name="10-bridge.conflist")
    before = {p: p.read_bytes() for p in (conf, conflist)}

    with pytest.raises(CniConfigError, match="cannot convert to a conflist"):
        node.installer().install()

    assert {p: p.read_bytes() for p in (conf, conflist)} == before


def test_single_plugin_json_is_recognised(node: Node) -> None:
    node.add("10-bridge.conf", as_name="10-bridge.json")
    node.installer().install()
    assert [p.name for p in node.conf_dir.iterdir()] == ["10-bridge.conflist"]


def test_conflist_in_a_json_file_keeps_its_name(node: Node) -> None:
    path = node.add("10-flannel.conflist", as_name="10-flannel.json")
    installer = node.installer()
    installer.install()
    assert load(path)["plugins"][-1] == our_entry(installer)


def test_first_config_by_name_is_the_primary(node: Node) -> None:
    calico = node.add("10-calico.conflist")
    loopback = node.add("99-loopback.conf")
    cilium = node.add("05-cilium.conflist")
    (node.conf_dir / "calico-kubeconfig").write_text("apiVersion: v1\n")
    (node.conf_dir / "README").write_text("not a config")
    untouched = {p: p.read_bytes() for p in (calico, loopback)}
    installer = node.installer()

    assert installer.primary_config_path() == cilium
    installer.install()

    assert load(cilium)["plugins"][-1] == our_entry(installer)
    assert {p: p.read_bytes() for p in untouched} == untouched


def test_our_kubeconfig_is_never_the_primary(node: Node) -> None:
    node.in_cluster()
    (node.conf_dir / KUBECONFIG_NAME).write_text("{}")
    (node.conf_dir / "00-ours.json").write_text("{}")
    installer = node.installer(
        plugin_config={**PLUGIN_CONFIG, "kubeconfig": str(node.conf_dir / "00-ours.json")}
    )
    with pytest.raises(NoPrimaryConfigError):
        installer.install()


def test_no_config_yet_is_retryable(node: Node) -> None:
    with pytest.raises(RetryableError, match=str(node.conf_dir)):
        node.installer().install()


def test_entry_already_present_and_identical_is_not_rewritten(node: Node) -> None:
    path = node.add("10-calico.conflist")
    installer = node.installer()
    config = load(path)
    config["plugins"].append(our_entry(installer))
    path.write_text(json.dumps(config))
    inode, data = path.stat().st_ino, path.read_bytes()

    assert installer.install() is True  # the binary was missing
    assert (path.stat().st_ino, path.read_bytes()) == (inode, data)


def test_stale_or_misplaced_entry_is_replaced_by_one_at_the_end(node: Node) -> None:
    path = node.add("10-calico.conflist")
    original = load(path)
    installer = node.installer()
    config = load(path)
    stale = {**our_entry(installer), "plugin_event_socket": "/old/path.sock"}
    config["plugins"].insert(1, stale)
    config["plugins"].insert(0, our_entry(installer))
    path.write_text(json.dumps(config))

    assert installer.ensure() is True
    assert load(path)["plugins"] == [*original["plugins"], our_entry(installer)]


def test_primary_rewriting_its_file_gets_our_entry_back(node: Node) -> None:
    path = node.add("10-calico.conflist")
    installer = node.installer()
    installer.install()
    shutil.copyfile(DATA / "10-calico.conflist", path)  # calico-node restarts and rewrites it

    assert installer.ensure() is True
    assert load(path)["plugins"][-1] == our_entry(installer)
    assert installer.ensure() is False


def test_primary_changing_its_file_name(node: Node) -> None:
    old = node.add("10-calico.conflist")
    installer = node.installer()
    installer.install()

    # The primary CNI is replaced: a new file sorts first, the old one stays behind.
    new = node.add("05-cilium.conflist")
    assert installer.ensure() is True
    assert load(new)["plugins"][-1] == our_entry(installer)
    assert load(old) == load(DATA / "10-calico.conflist")

    # And renamed outright.
    new.unlink()
    assert installer.ensure() is True
    assert load(old)["plugins"][-1] == our_entry(installer)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"name": "k8s-pod-network", "plugins": [{"type": "calico"}', "not valid JSON"),
        ('{"name": "x", "plugins": {"type": "calico"}}', '"plugins" must be a list'),
        ('{"name": "x", "plugins": []}', '"plugins" is empty'),
        ('{"name": "x"}', '"plugins" must be a list'),
        ("[]", "not a JSON object"),
    ],
)
def test_malformed_conflist_is_a_config_error_naming_the_file(
    node: Node, content: str, problem: str
) -> None:
    path = node.conf_dir / "10-calico.conflist"
    path.write_text(content)
    with pytest.raises(CniConfigError, match=problem) as info:
        node.installer().install()
    assert str(path) in str(info.value)
    assert info.value.path == path
    assert path.read_text() == content  # never truncated or replaced


def test_malformed_single_conf_is_a_config_error(node: Node) -> None:
    path = node.conf_dir / "10-bridge.conf"
    path.write_text('{"name": "bridge"}')
    with pytest.raises(ConfigError, match=r"10-bridge\.conf"):
        node.installer().install()
    assert path.read_text() == '{"name": "bridge"}'


def test_uninstall_removes_entry_binary_and_kubeconfig(node: Node) -> None:
    path = node.add("10-flannel.conflist")
    node.in_cluster()
    installer = node.installer()
    installer.install()
    assert installer.kubeconfig_path.exists()

    installer.uninstall()

    assert load(path) == load(DATA / "10-flannel.conflist")
    assert not installer.binary_path.exists()
    assert not installer.kubeconfig_path.exists()
    installer.uninstall()  # twice is fine


def test_uninstall_after_conversion_leaves_the_primary_alone_in_the_conflist(node: Node) -> None:
    node.add("10-bridge.conf")
    installer = node.installer()
    installer.install()
    installer.uninstall()
    config = load(node.conf_dir / "10-bridge.conflist")
    assert config["plugins"] == [load(DATA / "10-bridge.conf")]


def test_kubeconfig_from_the_service_account(node: Node) -> None:
    node.add("10-kindnet.conflist")
    node.in_cluster("token-1")
    installer = node.installer()
    installer.install()

    path = node.conf_dir / KUBECONFIG_NAME
    assert installer.kubeconfig_path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load(path)
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://10.96.0.1:443"
    ca = (node.sa_dir / "ca.crt").read_bytes()
    assert base64.b64decode(cluster["certificate-authority-data"]) == ca
    # The plugin (stdlib only) can use what we wrote.
    client = cni_plugin.ApiClient(str(path))
    assert (client.server, client.token) == ("https://10.96.0.1:443", "token-1")

    # The token rotates: ensure() follows.
    (node.sa_dir / "token").write_text("token-2")
    assert installer.ensure() is True
    assert load(path)["users"][0]["user"]["token"] == "token-2"  # noqa: S105 - a fake token
    assert installer.ensure() is False


def test_kubeconfig_server_from_the_environment(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.add("10-kindnet.conflist")
    node.in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    installer = node.installer(api_server_url=None)
    installer.install()
    config = load(installer.kubeconfig_path)
    assert config["clusters"][0]["cluster"]["server"] == "https://[fd00:10:96::1]:6443"


def test_no_kubeconfig_outside_a_cluster(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = node.add("10-kindnet.conflist")
    installer = node.installer(api_server_url=None)
    installer.install()
    assert not installer.kubeconfig_path.exists()
    assert load(path)["plugins"][-1]["kubeconfig"] == str(installer.kubeconfig_path)


def test_unknown_plugin_config_key_is_refused(node: Node) -> None:
    with pytest.raises(ConfigError, match="plugin_event_sock"):
        node.installer(plugin_config={"plugin_event_sock": "/x"})


# --- CniKeeper: the agent's face, on a fake clock -------------------------------------------------


TIMEOUT = 10.0
LONG_PERIOD = 3600.0
"""The keeper's full re-check period in these tests: never reached, only changes are acted on."""


@dataclass
class Kept:
    """A running keeper with what it reported."""

    keeper: CniKeeper
    clock: FakeClock
    installed: int = 0
    failures: list[Exception] = field(default_factory=list)
    ensured: list[bool] = field(default_factory=list)

    async def look(self) -> None:
        """Let the keeper take one more look at the directory: past its poll, until it sleeps
        again (so whatever that look did is done)."""
        self.clock.advance(CONF_DIR_POLL)
        await asyncio.wait_for(self.clock.wait_sleeping(), TIMEOUT)


@contextlib.asynccontextmanager
async def keeping(installer: CniInstaller) -> AsyncIterator[Kept]:
    """A keeper running for the body (cancelled afterwards, also on failure); its first look
    at the directory is done when the body starts."""
    clock = FakeClock()
    failures: list[Exception] = []
    ensured: list[bool] = []

    def installed() -> None:
        kept.installed += 1

    keeper = CniKeeper(
        installer,
        period=LONG_PERIOD,
        clock=clock,
        on_installed=installed,
        on_failure=failures.append,
        on_ensured=ensured.append,
    )
    kept = Kept(keeper, clock, failures=failures, ensured=ensured)
    task = asyncio.create_task(keeper.run(), name="test-cni-keeper")
    try:
        await asyncio.wait_for(clock.wait_sleeping(), TIMEOUT)
        yield kept
        assert not task.done()  # the keeper never stops on its own
    finally:
        task.cancel()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception):
            raise outcome


async def test_keeper_waits_for_the_primary_config_then_installs(node: Node) -> None:
    installer = node.installer()
    with structlog.testing.capture_logs() as logs:
        async with keeping(installer) as kept:
            for _ in range(3):  # node boot: the primary CNI has not written its config yet
                await kept.look()
            assert kept.installed == 0
            assert not kept.keeper.installed

            path = node.add("10-calico.conflist")
            await kept.look()

            assert kept.installed == 1
            assert load(path)["plugins"][-1] == our_entry(installer)
            await kept.look()
            assert kept.installed == 1
    waiting = [e for e in logs if e["event"] == "cni_primary_config_waiting"]
    assert len(waiting) == 1, "logged once"
    assert kept.failures == []


async def test_keeper_puts_our_entry_back_when_the_primary_rewrites_its_config(node: Node) -> None:
    path = node.add("10-calico.conflist")
    installer = node.installer()
    async with keeping(installer) as kept:
        assert kept.installed == 1
        shutil.copyfile(DATA / "10-calico.conflist", path)  # calico-node restarts

        await kept.look()  # one poll later, not a period later

        assert load(path)["plugins"][-1] == our_entry(installer)
        assert kept.clock.now() < LONG_PERIOD


async def test_keeper_survives_a_config_it_cannot_update(node: Node) -> None:
    # Any error updating the config (here a malformed file; before, at agent start, one made
    # the agent crash-loop) is counted, and the keeper goes on.
    path = node.conf_dir / "10-calico.conflist"
    path.write_text('{"name": "k8s-pod-network", "plugins": [')
    installer = node.installer()
    async with keeping(installer) as kept:
        await kept.look()
        assert [type(exc) for exc in kept.failures] == [CniConfigError], "counted once"
        assert kept.installed == 0

        shutil.copyfile(DATA / "10-calico.conflist", path)  # the primary fixes its file
        await kept.look()

        assert kept.installed == 1
        assert load(path)["plugins"][-1] == our_entry(installer)


async def test_keeper_reports_every_look_that_leaves_our_entry_in_place(node: Node) -> None:
    """What `istio_cni_install_ready` and `istio_cni_installs_total` follow: True for an install
    (the first look, or one that wrote), False for a look that found everything in place."""
    path = node.add("10-calico.conflist")
    installer = node.installer()
    installer.ensure()  # a previous agent installed it: the first look writes nothing
    async with keeping(installer) as kept:
        assert kept.ensured == [True]
        shutil.copyfile(DATA / "10-calico.conflist", path)
        await kept.look()
        assert kept.ensured == [True, True]
        await kept.look()  # our own write showed as a change: a look that finds it in place
        assert kept.ensured == [True, True, False]

        path.write_text('{"name": "k8s-pod-network", "plugins": [')
        await kept.look()
        assert kept.ensured == [True, True, False], "a failure is not ensured"
        assert [type(exc) for exc in kept.failures] == [CniConfigError]
