"""Fuzzing the CNI configs other CNIs write: whatever the primary's file holds (nested, of the
wrong types, huge, cut off), installing our entry either succeeds with our entry in it or raises
one of our typed errors and writes nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import documents_around
from ztunnel_redirect.adapters.cniinstall import CniInstaller
from ztunnel_redirect.core.errors import RedirectError
from ztunnel_redirect.testing.agentprocess import built_plugin

pytestmark = pytest.mark.fuzz

KINDNET = {
    "cniVersion": "0.3.1",
    "name": "kindnet",
    "plugins": [
        {"type": "ptp", "ipMasq": False, "ipam": {"type": "host-local", "ranges": [[]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


@pytest.fixture(scope="module")
def installer() -> Iterator[CniInstaller]:
    """One node for every example: the executable is copied and probed once."""
    root = Path(tempfile.mkdtemp(prefix="zr-fuzz-cni-"))
    try:
        (root / "bin").mkdir()
        (root / "net.d").mkdir()
        yield CniInstaller(
            bin_dir=str(root / "bin"),
            conf_dir=str(root / "net.d"),
            plugin_source=str(built_plugin()),
        )
    finally:
        shutil.rmtree(root)


def _contents(conf_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in conf_dir.iterdir()}


@given(
    documents_around(KINDNET) | st.just(b'{"plugins":' * 20_000),
    st.sampled_from(["10-kindnet.conflist", "10-bridge.conf"]),
)
def test_a_foreign_config_takes_our_entry_or_is_left_untouched(
    installer: CniInstaller, data: bytes, name: str
) -> None:
    for path in installer.conf_dir.iterdir():
        path.unlink()
    (installer.conf_dir / name).write_bytes(data)
    before = _contents(installer.conf_dir)
    try:
        installer.ensure()
    except RedirectError as exc:
        assert str(exc)
        assert _contents(installer.conf_dir) == before
        return
    written = [path for path in installer.conf_dir.iterdir() if path.read_bytes() != data]
    assert written, "success without our entry anywhere"
    plugins = json.loads(written[0].read_bytes())["plugins"]
    assert plugins[-1]["type"] == installer.plugin_name
