"""Fuzzing what the agent reads under /proc: any cgroup, stat, comm, cmdline or status content (a
process can name itself anything, and a container runtime can nest cgroups anyhow) gives an
answer or None, never an exception."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel_redirect.kernel.procscan import kubelet_uid, parse_start_time, pod_uid_from_cgroup

pytestmark = pytest.mark.fuzz

UID = "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80"
CGROUPS = [
    f"0::/kubepods/burstable/pod{UID}/abc\n",
    f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-1.scope\n",
    f"12:memory:/kubepods/pod{UID}/x\n11:cpu:/kubepods/pod{UID.upper()}/y\n",
]
STAT = "1234 (kube let) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 987654 0 0"
CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _around(samples: list[str]) -> st.SearchStrategy[str]:
    """The samples, cut, spliced with any text, and any text."""
    return st.one_of(
        st.sampled_from(samples),
        st.builds(lambda s, n: s[:n], st.sampled_from(samples), st.integers(0, 200)),
        st.builds(lambda s, t: s + t, st.sampled_from(samples), st.text(max_size=60)),
        st.builds(lambda t, s: t + s, st.text(max_size=60), st.sampled_from(samples)),
        st.text(max_size=200),
    )


@given(_around(CGROUPS))
def test_a_cgroup_gives_a_canonical_uid_or_none(text: str) -> None:
    uid = pod_uid_from_cgroup(text)
    assert uid is None or CANONICAL.fullmatch(uid)


@given(_around([STAT, STAT.replace("987654", "٣"), STAT.replace(")", ") (")]))
def test_a_stat_gives_a_start_time_or_none(text: str) -> None:
    start = parse_start_time(text)
    assert start is None or start >= 0


@pytest.fixture(scope="module")
def proc_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="zr-fuzz-proc-"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


@given(
    st.sampled_from(["kubelet\n", "kubelite\n", "k3s\n", "bash\n"]) | st.text(max_size=20),
    st.sampled_from([b"/usr/bin/kubelet\0--v=2\0", b"k3s\0agent\0"]) | st.binary(max_size=60),
    _around(["Name:\tkubelet\nUid:\t0\t0\t0\t0\n", "Uid:\n", "Uid:\t²\n"]),
)
def test_a_kubelet_lookup_gives_a_uid_or_none(
    proc_root: Path, comm: str, cmdline: bytes, status: str
) -> None:
    process = proc_root / "4242"
    process.mkdir(exist_ok=True)
    (process / "comm").write_text(comm, errors="surrogatepass")
    (process / "cmdline").write_bytes(cmdline)
    (process / "status").write_text(status, errors="surrogatepass")

    uid = kubelet_uid(proc_root=str(proc_root))

    assert uid is None or uid >= 0
