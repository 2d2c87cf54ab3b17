"""Scanning /proc: kubelet uid (docs/design.md §4) and a running pod's netns (docs/design.md §7), on
fake proc trees.

A fake process is a directory with `comm`, `cmdline`, `status`, `stat`, `cgroup` and `ns/net`,
a symlink to a file under `<root>/_netns/` that stands for one network namespace: processes in
the same fake netns share its inode, as they would under the real /proc.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ztunnel_redirect.core.errors import KernelError, NetnsNotFoundError
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.procscan import (
    NetnsFinder,
    kubelet_uid,
    netns_addresses,
    parse_start_time,
    pod_uid_from_cgroup,
    runner_addresses,
)
from ztunnel_redirect.testing.netnslab import Lab

UID_A = "863b91d4-4b68-4efa-917f-4b560e3e86aa"
UID_B = "aaaabbbb-cccc-dddd-eeee-ffff00001111"
CTR = "75c7fe7ad0df679971e755bd97b84dd68a32e1eba8e8f99b01ab3c07196a3e4a"


def underscored(uid: str) -> str:
    return uid.replace("-", "_")


def systemd_cgroup(uid: str, qos: str = "burstable", runtime: str = "cri-containerd") -> str:
    return (
        f"0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored(uid)}.slice"
        f"/{runtime}-{CTR}.scope\n"
    )


def stat_line(pid: int, start: int, comm: str = "app") -> str:
    # Fields 3..52 after "(comm)"; starttime is field 22.
    after = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start)]
    after += ["1000", "100"] + ["0"] * 28
    return f"{pid} ({comm}) {' '.join(after)}\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "_netns").mkdir(parents=True)
        self.add(1, comm="systemd", netns="host", cgroup="0::/init.scope\n")
        (root / "self").symlink_to("1")

    def netns_file(self, name: str) -> Path:
        path = self.root / "_netns" / name
        path.touch()
        return path

    def add(
        self,
        pid: int,
        *,
        netns: str,
        cgroup: str = "",
        start: int = 1000,
        comm: str = "app",
        cmdline: bytes = b"app\0",
        uid: int = 0,
    ) -> Path:
        base = self.root / str(pid)
        (base / "ns").mkdir(parents=True)
        (base / "comm").write_text(comm + "\n")
        (base / "cmdline").write_bytes(cmdline)
        (base / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (base / "stat").write_text(stat_line(pid, start, comm))
        (base / "cgroup").write_text(cgroup)
        (base / "ns" / "net").symlink_to(self.netns_file(netns))
        return base

    def vanish(self, pid: int, *what: str) -> None:
        """A process that exits mid-scan: some or all of its files are gone."""
        base = self.root / str(pid)
        if not what:
            shutil.rmtree(base)
        for name in what:
            (base / name).unlink()

    def inode(self, netns: str) -> int:
        return (self.root / "_netns" / netns).stat().st_ino


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


class FakeAddresses:
    """addresses_of for fake netns: addresses per fake netns name, and a record of calls."""

    def __init__(self, by_netns: dict[str, set[str]]) -> None:
        self.by_netns = by_netns
        self.calls: list[str] = []

    def __call__(self, path: str) -> set[str]:
        name = Path(path).resolve().name
        self.calls.append(name)
        return self.by_netns.get(name, set())


# --- cgroup paths -------------------------------------------------------------------------------

CGROUPS = [
    # cgroup v1, cgroupfs driver (one line per hierarchy; dockershim/containerd)
    (
        "v1 cgroupfs burstable",
        f"12:pids:/kubepods/burstable/pod{UID_A}/{CTR}\n"
        f"11:memory:/kubepods/burstable/pod{UID_A}/{CTR}\n"
        "1:name=systemd:/kubepods/burstable/pod" + UID_A + "/" + CTR + "\n",
        UID_A,
    ),
    ("v1 cgroupfs besteffort", f"4:cpu,cpuacct:/kubepods/besteffort/pod{UID_A}/{CTR}\n", UID_A),
    ("v1 cgroupfs guaranteed", f"4:cpu,cpuacct:/kubepods/pod{UID_A}/{CTR}\n", UID_A),
    ("v1 underscored uid", f"3:memory:/kubepods/pod{underscored(UID_A)}/{CTR}\n", UID_A),
    ("v2 cgroupfs", f"0::/kubepods/burstable/pod{UID_A}/{CTR}\n", UID_A),
    ("v2 systemd containerd burstable", systemd_cgroup(UID_A), UID_A),
    ("v2 systemd containerd besteffort", systemd_cgroup(UID_A, qos="besteffort"), UID_A),
    ("v2 systemd cri-o", systemd_cgroup(UID_A, runtime="crio"), UID_A),
    ("v2 systemd docker", systemd_cgroup(UID_A, runtime="docker"), UID_A),
    (
        "v2 systemd guaranteed",
        f"0::/kubepods.slice/kubepods-pod{underscored(UID_A)}.slice/cri-containerd-{CTR}.scope\n",
        UID_A,
    ),
    (
        "v1 systemd, all hierarchies",
        "".join(
            f"{n}:{ctl}:/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{underscored(UID_A)}.slice/crio-{CTR}.scope\n"
            for n, ctl in ((12, "pids"), (5, "memory"), (1, "name=systemd"))
        )
        + "0::/\n",
        UID_A,
    ),
    (
        # istio/istio cni/pkg/nodeagent/testdata/cgroupns/0/cgroup: a kind node inside Docker
        "kind node in docker",
        "0::/system.slice/docker-8445c3ca20fac1d8e74854d84a7e6a57297ffb22809098b2816b31a428f2b777"
        ".scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        "kubelet-kubepods-besteffort-pod863b91d4_4b68_4efa_917f_4b560e3e86aa.slice/"
        "cri-containerd-75c7fe7ad0df679971e755bd97b84dd68a32e1eba8e8f99b01ab3c07196a3e4a.scope\n",
        UID_A,
    ),
    (
        # spire/istio test string: the containerd systemd form with ':' separators
        "containerd colon form",
        "0::/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:"
        "b2a102854b4969b2ce98dc329c86b4fb2b06e4ad2cc8da9d8a7578c9cd2004a2\n",
        "72f7f152-440c-66ac-9084-e0fc1d8a910c",
    ),
    (
        "docker-in-docker cgroupfs",
        "0::/docker/8d461fa5765781bcf5f7eb192f101bc3103d4b932e26236f43feecfa20664f96/kubepods/"
        "besteffort/poddaa5c7ee-3484-4533-af39-3591564fd03e/"
        "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934\n",
        "daa5c7ee-3484-4533-af39-3591564fd03e",
    ),
    (
        "cgroup namespace relative path",
        f"0::/../../pod{UID_A}/{CTR}\n",
        UID_A,
    ),
    ("pod-level cgroup, no container", f"0::/kubepods/besteffort/pod{UID_A}\n", UID_A),
    ("uid without separators", f"0::/kubepods/pod{UID_A.replace('-', '')}/{CTR}\n", UID_A),
    # not a pod
    ("empty", "", None),
    ("host process", "0::/system.slice/kubelet.service\n", None),
    ("init", "0::/init.scope\n", None),
    ("user session", "12:pids:/user.slice/user-1000.slice/session-3.scope\n0::/user.slice\n", None),
    (
        # cri-o under kubeedge puts no pod UID in the path
        "cri-o without pod uid",
        "0::/../crio-45490e76e0878aaa4d9808f7d2eefba37f093c3efbba9838b6d8ab804d9bd814.scope\n",
        None,
    ),
    ("kubepods slice only", "0::/kubepods.slice/kubepods-burstable.slice\n", None),
    ("not preceded by punctuation", f"0::/kubepods/xpod{UID_A}/{CTR}\n", None),
    ("truncated uid", f"0::/kubepods/pod{UID_A[:-1]}/{CTR}\n", None),
    ("uid run into more hex", f"0::/kubepods/pod{UID_A}0/{CTR}\n", None),
    (
        "two different pods: ambiguous",
        f"11:memory:/kubepods/pod{UID_A}/{CTR}\n12:pids:/kubepods/besteffort/pod{UID_B}/{CTR}\n",
        None,
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in CGROUPS], ids=[c[0] for c in CGROUPS]
)
def test_pod_uid_from_cgroup(text: str, expected: str | None) -> None:
    assert pod_uid_from_cgroup(text) == expected


# --- stat ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "comm", ["app", "my app", "a) b (c", "((", "))", ") 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17"]
)
def test_start_time_with_awkward_comm(comm: str) -> None:
    assert parse_start_time(stat_line(4242, 70298968, comm)) == 70298968


def test_start_time_of_a_real_stat_line() -> None:
    # istio/istio cni/pkg/nodeagent/testdata/cgroupns/1/stat
    line = (
        "3331234 (sd_espeak-ng-mb) S 12634 12891 12891 0 -1 4194304 437 0 5 0 0 3 0 0 20 0 2 0 "
        "70298968 339460096 590 18446744073709551615 187654169755648 187654169783348 "
        "281474700653408 0 0 0 0 16777216 0 0 0 0 17 9 0 0 0 0 0 187654169950632 "
        "187654169952260 187655190429696 281474700669910 281474700670021 281474700670021 "
        "281474700672958 0\n"
    )
    assert parse_start_time(line) == 70298968


@pytest.mark.parametrize("text", ["", "1 (x S 1 2", "1 (x) S 1 2 3", "1 (x) " + "a " * 30])
def test_malformed_stat(text: str) -> None:
    assert parse_start_time(text) is None


# --- kubelet uid --------------------------------------------------------------------------------


def test_kubelet_uid(proc: FakeProc) -> None:
    proc.add(50, netns="host", comm="containerd", cmdline=b"/usr/bin/containerd\0", uid=0)
    proc.add(100, netns="host", comm="kubelet", cmdline=b"/usr/bin/kubelet\0--v=2\0", uid=1234)
    assert kubelet_uid(proc_root=str(proc.root)) == 1234


def test_kubelet_uid_none_when_absent(proc: FakeProc) -> None:
    proc.add(50, netns="host", comm="containerd")
    assert kubelet_uid(proc_root=str(proc.root)) is None


def test_kubelet_comm_without_kubelet_cmdline_is_not_the_kubelet(proc: FakeProc) -> None:
    proc.add(100, netns="host", comm="kubelet", cmdline=b"/opt/fake\0", uid=7)
    proc.add(200, netns="host", comm="kubelet", cmdline=b"/usr/bin/kubelet\0", uid=8)
    assert kubelet_uid(proc_root=str(proc.root)) == 8


def test_first_kubelet_by_pid_wins(proc: FakeProc) -> None:
    # Created in this order so that directory order differs from pid order.
    proc.add(900, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=9)
    proc.add(30, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=3)
    assert kubelet_uid(proc_root=str(proc.root)) == 3


def test_kubelet_preferred_over_kubelite_and_k3s(proc: FakeProc) -> None:
    proc.add(10, netns="host", comm="k3s-server", cmdline=b"/usr/local/bin/k3s\0server\0", uid=1)
    proc.add(20, netns="host", comm="kubelite", cmdline=b"/snap/bin/kubelite\0", uid=2)
    proc.add(30, netns="host", comm="kubelet", cmdline=b"/usr/bin/kubelet\0", uid=3)
    assert kubelet_uid(proc_root=str(proc.root)) == 3


def test_kubelite_then_k3s(proc: FakeProc) -> None:
    proc.add(10, netns="host", comm="k3s", cmdline=b"/usr/local/bin/k3s\0agent\0", uid=1)
    proc.add(20, netns="host", comm="kubelite", cmdline=b"/snap/microk8s/bin/kubelite\0", uid=2)
    assert kubelet_uid(proc_root=str(proc.root)) == 2
    proc.vanish(20)
    assert kubelet_uid(proc_root=str(proc.root)) == 1


def test_kubelet_vanishing_mid_scan_falls_to_the_next(proc: FakeProc) -> None:
    proc.add(100, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=5)
    proc.add(200, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=6)
    proc.vanish(100, "status")
    proc.add(300, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=7)
    proc.vanish(300, "comm")  # gone before its comm was read
    assert kubelet_uid(proc_root=str(proc.root)) == 6


def test_non_process_entries_are_ignored(proc: FakeProc) -> None:
    for name in ("sys", "net", "12a", "thread-self"):
        (proc.root / name).mkdir()
        (proc.root / name / "comm").write_text("kubelet\n")
    (proc.root / "uptime").write_text("1.0 1.0\n")
    assert kubelet_uid(proc_root=str(proc.root)) is None


def test_missing_proc_root_is_a_kernel_error(tmp_path: Path) -> None:
    with pytest.raises(KernelError):
        kubelet_uid(proc_root=str(tmp_path / "nowhere"))


def test_kubelet_scan_is_bounded(proc: FakeProc) -> None:
    for pid in range(2, 12):
        proc.add(pid, netns="host", comm="bash")
    proc.add(500, netns="host", comm="kubelet", cmdline=b"kubelet\0", uid=5)
    # A bound smaller than the number of entries: the scan stops instead of reading them all.
    with capture_logs() as logs:
        kubelet_uid(proc_root=str(proc.root), max_processes=5)
    assert [e["limit"] for e in logs if e["event"] == "proc_scan_truncated"] == [5]
    with capture_logs() as logs:
        assert kubelet_uid(proc_root=str(proc.root), max_processes=100) == 5
    assert not [e for e in logs if e["event"] == "proc_scan_truncated"]


# --- finding a pod's netns ----------------------------------------------------------------------


def finder(proc: FakeProc, addresses: FakeAddresses, **kwargs: int) -> NetnsFinder:
    return NetnsFinder(addresses_of=addresses, proc_root=str(proc.root), **kwargs)


@pytest.mark.parametrize(
    "cgroup",
    [c[1] for c in CGROUPS if c[2] == UID_A],
    ids=[c[0] for c in CGROUPS if c[2] == UID_A],
)
def test_finds_pod_netns_for_each_cgroup_form(proc: FakeProc, cgroup: str) -> None:
    proc.add(4000, netns="pod-a", cgroup=cgroup, start=555)
    addresses = FakeAddresses({"pod-a": {"10.244.0.5", "127.0.0.1"}})
    match = finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"])
    assert match is not None
    assert match.pod_uid == UID_A
    assert match.path == f"{proc.root}/4000/ns/net"
    assert match.pid == 4000
    assert match.start_time == 555
    assert match.inode == proc.inode("pod-a")
    assert Path(match.path).stat().st_ino == match.inode


def test_host_netns_is_never_a_candidate(proc: FakeProc) -> None:
    # A process in the host netns whose cgroup names the pod (e.g. a hostNetwork helper).
    proc.add(4000, netns="host", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"host": {"10.244.0.5"}})
    assert finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"]) is None
    assert addresses.calls == []


def test_agent_netns_is_never_a_candidate(proc: FakeProc) -> None:
    # /proc/self in another netns than pid 1 (say, pid 1 is not the host's init): skip both.
    (proc.root / "self").unlink()
    proc.add(77, netns="agent", comm="ztunnel-redirect")
    (proc.root / "self").symlink_to("77")
    proc.add(4000, netns="agent", cgroup=systemd_cgroup(UID_A))
    proc.add(4001, netns="host", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"agent": {"10.244.0.5"}, "host": {"10.244.0.5"}})
    assert finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"]) is None
    assert addresses.calls == []


def test_without_a_known_host_netns_the_scan_refuses(proc: FakeProc) -> None:
    (proc.root / "self").unlink()
    proc.vanish(1)
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    with pytest.raises(NetnsNotFoundError):
        finder(proc, FakeAddresses({"pod-a": {"10.244.0.5"}})).find(PodUid(UID_A), ["10.244.0.5"])


def test_oldest_process_wins(proc: FakeProc) -> None:
    # Three processes of one pod, each in its own netns that carries the pod IP; scanned in pid
    # order 4000, 4001, 4002 with start times 70298999, 70298968 (oldest), 70298977.
    proc.add(4000, netns="n0", cgroup=systemd_cgroup(UID_A), start=70298999)
    proc.add(4001, netns="n1", cgroup=systemd_cgroup(UID_A), start=70298968)
    proc.add(4002, netns="n2", cgroup=systemd_cgroup(UID_A), start=70298977)
    addresses = FakeAddresses({n: {"10.244.0.5"} for n in ("n0", "n1", "n2")})
    match = finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"])
    assert match is not None
    assert (match.pid, match.start_time, match.inode) == (4001, 70298968, proc.inode("n1"))
    # The younger process scanned after the winner is not even verified.
    assert addresses.calls == ["n0", "n1"]


def test_oldest_verified_wins_over_an_older_unverified(proc: FakeProc) -> None:
    proc.add(4000, netns="stray", cgroup=systemd_cgroup(UID_A), start=10)
    proc.add(4001, netns="pod-a", cgroup=systemd_cgroup(UID_A), start=20)
    addresses = FakeAddresses({"stray": {"10.9.9.9"}, "pod-a": {"10.244.0.5"}})
    match = finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"])
    assert match is not None
    assert match.pid == 4001


def test_netns_without_the_pod_ip_is_rejected(proc: FakeProc) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"pod-a": {"10.244.0.6", "127.0.0.1"}})
    assert finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"]) is None
    assert addresses.calls == ["pod-a"]


def test_foreign_process_does_not_steal_another_pods_netns(proc: FakeProc) -> None:
    # Pod A's process transiting pod B's netns is scanned first; pod B's own process later.
    proc.add(4000, netns="pod-b", cgroup=systemd_cgroup(UID_A), start=1)
    proc.add(4001, netns="pod-b", cgroup=systemd_cgroup(UID_B), start=2)
    addresses = FakeAddresses({"pod-b": {"10.244.0.2"}})
    found = finder(proc, addresses).find_all(
        {PodUid(UID_A): ["10.244.0.1"], PodUid(UID_B): ["10.244.0.2"]}
    )
    assert set(found) == {UID_B}
    assert found[PodUid(UID_B)].pid == 4001
    assert found[PodUid(UID_B)].inode == proc.inode("pod-b")


def test_dual_stack_pod_is_accepted_by_any_ip_in_any_spelling(proc: FakeProc) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"pod-a": {"fd00:244:0:0:0:0:5:2", "fe80::1"}})
    match = finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5", "fd00:244::5:2"])
    assert match is not None


def test_pod_without_ips_is_not_looked_for(proc: FakeProc) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"pod-a": {"10.244.0.5"}})
    assert finder(proc, addresses).find(PodUid(UID_A), []) is None
    assert finder(proc, addresses).find(PodUid(UID_A), ["not-an-ip"]) is None
    assert addresses.calls == []


@pytest.mark.parametrize("error", [KernelError("dump failed"), NetnsNotFoundError("gone")])
def test_failing_verification_rejects_fail_closed(proc: FakeProc, error: Exception) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))

    def addresses_of(path: str) -> set[str]:
        raise error

    scan = NetnsFinder(addresses_of=addresses_of, proc_root=str(proc.root))
    assert scan.find(PodUid(UID_A), ["10.244.0.5"]) is None


@pytest.mark.parametrize(
    "gone", [(), ("cgroup",), ("stat",), ("ns/net",)], ids=["all", "cgroup", "stat", "ns"]
)
def test_vanished_processes_are_skipped(proc: FakeProc, gone: tuple[str, ...]) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A), start=1)
    proc.vanish(4000, *gone)
    proc.add(4001, netns="pod-a", cgroup=systemd_cgroup(UID_A), start=2)
    addresses = FakeAddresses({"pod-a": {"10.244.0.5"}})
    match = finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"])
    assert match is not None
    assert match.pid == 4001


def test_process_exiting_during_verification_is_dropped(proc: FakeProc) -> None:
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))

    def addresses_of(path: str) -> set[str]:
        proc.vanish(4000)  # exits while we are inside its netns
        return {"10.244.0.5"}

    scan = NetnsFinder(addresses_of=addresses_of, proc_root=str(proc.root))
    assert scan.find(PodUid(UID_A), ["10.244.0.5"]) is None


def test_dangling_netns_link(proc: FakeProc) -> None:
    base = proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    (base / "ns" / "net").unlink()
    (base / "ns" / "net").symlink_to(proc.root / "_netns" / "nowhere")
    assert finder(proc, FakeAddresses({})).find(PodUid(UID_A), ["10.244.0.5"]) is None


def test_find_all_scans_proc_once_for_many_pods(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    pods: dict[PodUid, list[str]] = {}
    by_netns: dict[str, set[str]] = {}
    for i in range(300):
        uid = f"{i:08x}-0000-4000-8000-{i:012x}"
        ip = f"10.{i // 250}.{i % 250}.9"
        pods[PodUid(uid)] = [ip]
        by_netns[f"pod-{i}"] = {ip, "127.0.0.1"}
        # A sandbox (pause) process and an app container process per pod, same netns.
        proc.add(10_000 + 2 * i, netns=f"pod-{i}", cgroup=systemd_cgroup(uid), start=i)
        proc.add(10_001 + 2 * i, netns=f"pod-{i}", cgroup=systemd_cgroup(uid), start=i + 1)
    scans = 0
    real_scandir = os.scandir

    def counting_scandir(path: str) -> Iterator[os.DirEntry[str]]:
        nonlocal scans
        scans += 1
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    addresses = FakeAddresses(by_netns)
    found = finder(proc, addresses).find_all(pods)
    assert scans == 1
    assert set(found) == set(pods)
    assert all(found[PodUid(uid)].start_time == i for i, uid in enumerate(pods))
    assert sorted(addresses.calls) == sorted(by_netns)  # each netns entered once


def test_scan_is_bounded(proc: FakeProc) -> None:
    for pid in range(2, 50):
        proc.add(pid, netns="host")
    proc.add(4000, netns="pod-a", cgroup=systemd_cgroup(UID_A))
    addresses = FakeAddresses({"pod-a": {"10.244.0.5"}})
    with capture_logs() as logs:
        finder(proc, addresses, max_processes=10).find(PodUid(UID_A), ["10.244.0.5"])
    assert [e["limit"] for e in logs if e["event"] == "proc_scan_truncated"] == [10]
    assert finder(proc, addresses).find(PodUid(UID_A), ["10.244.0.5"]) is not None


# --- the kernel ---------------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(ipv6=True, run_id=f"procscan{secrets.token_hex(2)}")
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.kernel
def test_netns_addresses_of_a_real_pod_netns(lab: Lab, proc: FakeProc) -> None:
    pod = lab.add_pod("a")
    other = lab.add_pod("b")
    with NetnsRunner(workers=1) as runner:
        addresses = runner.call(pod.path, netns_addresses)
        assert pod.ipv4 in addresses
        assert pod.ipv6 in addresses
        assert "127.0.0.1" in addresses
        assert other.ipv4 not in addresses

        # The same check as the finder runs it: fake processes whose ns/net are the lab netns.
        for pid, netns in ((4000, pod), (4001, other)):
            base = proc.root / str(pid)
            (base / "ns").mkdir(parents=True)
            (base / "stat").write_text(stat_line(pid, pid))
            (base / "cgroup").write_text(systemd_cgroup(UID_A))
            (base / "ns" / "net").symlink_to(netns.path)
        (proc.root / "1" / "ns" / "net").unlink()
        (proc.root / "1" / "ns" / "net").symlink_to("/proc/self/ns/net")
        scan = NetnsFinder(addresses_of=runner_addresses(runner), proc_root=str(proc.root))
        match = scan.find(PodUid(UID_A), [pod.ipv4])
        assert match is not None
        assert match.pid == 4000
        assert match.inode == Path(pod.path).stat().st_ino
        mismatch = scan.find(PodUid(UID_A), ["10.99.99.99"])
        assert mismatch is None
