"""What the host's `/proc` tells us: the kubelet's uid (docs/design.md §4) and running pods' netns
(docs/design.md §7).

Every function takes `proc_root` so tests run on a fake proc tree in a temporary directory.
Processes come and go while we read: a process that vanishes mid-scan is skipped, never an error.
Scans are bounded by `max_processes`.

Finding a pod's netns after an agent restart (`NetnsFinder`):

- The host's own netns is never a candidate: a process is skipped when the `(st_dev, st_ino)` of
  its `ns/net` equals that of `<proc_root>/1/ns/net` (init's, the host's with `hostPID`) **or**
  `<proc_root>/self/ns/net` (the agent's own, the host's with `hostNetwork`). Both are skipped so
  that neither a container-local pid 1 nor an unusual deployment can make us pair a pod with the
  netns that carries the host rules.
- The pod UID comes from the process's cgroup path (`pod_uid_from_cgroup`).
- Ownership is verified: a cgroup ties a process to a pod, not to a netns (a process may be
  transiting another pod's netns). A candidate is accepted only when one of the pod's IPs is
  configured on an interface inside it. Reading that needs the kernel, so it is the injected
  `addresses_of(netns_path)`; the real one is `runner_addresses(runner)`, which runs
  `netns_addresses` on a `NetnsRunner` worker. A failing check rejects the candidate (fail closed).
- Several verified netns for one UID: the one whose process started first wins.

A `NetnsMatch.path` names the netns through a pid, which may exit and be reused: open it promptly
and compare the inode of what you opened (`os.fstat(fd).st_ino`) with `NetnsMatch.inode`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Final

import structlog

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.errors import KernelError, NetnsNotFoundError, RedirectError
from ztunnel_redirect.core.model import PodUid
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netns import NetnsId, NetnsRunner, netns_id

__all__ = [
    "KUBELET_PROCESSES",
    "MAX_PROCESSES",
    "AddressesOf",
    "NetnsFinder",
    "NetnsMatch",
    "kubelet_uid",
    "netns_addresses",
    "parse_start_time",
    "pod_uid_from_cgroup",
    "runner_addresses",
]

log = structlog.get_logger(__name__)

MAX_PROCESSES: Final = 200_000
"""Upper bound on the `/proc` entries one scan reads (pid_max is 4M; real nodes hold far fewer)."""
_MAX_READ: Final = 64 * 1024
"""Upper bound on the bytes read from one `/proc` file."""

KUBELET_PROCESSES: Final = (
    ("kubelet", frozenset({"kubelet"})),
    ("kubelite", frozenset({"kubelite"})),
    # k3s embeds the kubelet; it renames its main process, so its comm may carry the role.
    ("k3s", frozenset({"k3s", "k3s-server", "k3s-agent"})),
)
"""In order of preference: (word the cmdline must contain, accepted `comm` values)."""

AddressesOf = Callable[[str], Set[str]]
"""Given a netns path, the IP addresses configured on its interfaces."""

_HEX: Final = "[0-9a-fA-F]"
# "pod" + UID, with '-' or '_' (systemd escapes '-' as '_') or no separators; preceded by
# punctuation ("/pod…", "-pod…") and followed by punctuation or the end (".slice", "/", ":").
_POD_UID: Final = re.compile(
    rf"(?:^|[/\-_.:])pod({_HEX}{{8}})[-_]?({_HEX}{{4}})[-_]?({_HEX}{{4}})[-_]?({_HEX}{{4}})"
    rf"[-_]?({_HEX}{{12}})(?=$|[/\-_.:])"
)
_STARTTIME_FIELD: Final = 22
"""`starttime` is field 22 of `/proc/<pid>/stat` (proc(5)), in clock ticks since boot."""


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a `/proc/<pid>/cgroup` content, canonical (8-4-4-4-12, '-'), or None.

    Handles cgroup v1 (one line per hierarchy) and v2 (`0::/path`), the cgroupfs driver
    (`/kubepods/burstable/pod<uid>/<ctr>`) and the systemd driver
    (`kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`, `crio-`,
    `docker-`), nested under a Docker or kind node. None when no line names a pod, or when lines
    name different pods (ambiguous: better not to guess).
    """
    found: set[str] = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        path = parts[2] if len(parts) == 3 else line
        for match in _POD_UID.finditer(path):
            found.add("-".join(match.groups()))
    return found.pop() if len(found) == 1 else None


def parse_start_time(stat: str) -> int | None:
    """Field 22 (`starttime`) of a `/proc/<pid>/stat` content, or None if it is malformed.

    Field 2 is `(comm)`, and comm may contain spaces and parentheses: split after the *last* ')'.
    """
    close = stat.rfind(")")
    if close < 0:
        return None
    fields = stat[close + 1 :].split()
    index = _STARTTIME_FIELD - 3  # the fields after ')' start at field 3
    return _number(fields[index]) if len(fields) > index else None


def _number(text: str) -> int | None:
    """A decimal number as `/proc` writes it (ASCII digits only: `str.isdigit` also takes
    superscripts, which `int` refuses)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _read(path: str) -> bytes | None:
    """A `/proc` file's content (bounded), or None when the process or the file is gone."""
    try:
        with open(path, "rb") as file:
            return file.read(_MAX_READ)
    except OSError:  # vanished (ENOENT, ESRCH), or not ours to read (EACCES)
        return None


def _read_text(path: str) -> str | None:
    data = _read(path)
    return None if data is None else data.decode("utf-8", "replace")


def pids(proc_root: str, max_processes: int) -> Iterator[int]:
    """Numeric entries of `proc_root`, in ascending pid order, at most `max_processes`."""
    pids: list[int] = []
    try:
        with os.scandir(proc_root) as entries:
            for entry in entries:
                name = entry.name
                if not (name.isascii() and name.isdigit()):
                    continue
                if len(pids) >= max_processes:
                    log.warning("proc_scan_truncated", proc_root=proc_root, limit=max_processes)
                    break
                pids.append(int(name))
    except OSError as exc:
        raise KernelError(f"cannot list processes in {proc_root}: {exc}") from exc
    pids.sort()
    return iter(pids)


def _real_uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return _number(fields[1]) if len(fields) >= 2 else None
    return None


def kubelet_uid(
    *, proc_root: str = constants.PROC_ROOT, max_processes: int = MAX_PROCESSES
) -> int | None:
    """The real uid of the kubelet (docs/design.md §4), or None when no kubelet process is found.

    The first process (lowest pid) whose `comm` is `kubelet` and whose cmdline contains
    "kubelet"; else the same for `kubelite` (MicroK8s); else `k3s`.
    """
    candidates: dict[str, list[int]] = {word: [] for word, _ in KUBELET_PROCESSES}
    comms = {comm: word for word, names in KUBELET_PROCESSES for comm in names}
    for pid in pids(proc_root, max_processes):
        comm = _read_text(f"{proc_root}/{pid}/comm")
        word = comms.get(comm.strip()) if comm is not None else None
        if word is not None:
            candidates[word].append(pid)
    for word, _ in KUBELET_PROCESSES:
        for pid in candidates[word]:
            cmdline = _read(f"{proc_root}/{pid}/cmdline")
            if cmdline is None or word.encode() not in cmdline:
                continue
            status = _read_text(f"{proc_root}/{pid}/status")
            uid = _real_uid(status) if status is not None else None
            if uid is not None:
                log.debug("kubelet_found", pid=pid, comm=word, uid=uid)
                return uid
    return None


@dataclass(frozen=True)
class NetnsMatch:
    """A running pod's netns, found through one of its processes."""

    pod_uid: PodUid
    path: str
    """`<proc_root>/<pid>/ns/net`: valid while that process lives."""
    pid: int
    inode: int
    start_time: int
    """Start time of the process, in clock ticks since boot."""


def _normalise(ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _normalise_all(ips: Collection[str]) -> frozenset[str]:
    return frozenset(n for n in map(_normalise, ips) if n is not None)


class NetnsFinder:
    """Finds running pods' netns by scanning `/proc` (docs/design.md §7). Blocking: run it off the
    loop.

    Do not run it on a `NetnsRunner` worker when `addresses_of` calls that same runner: with
    every worker busy scanning, the verification would wait forever.
    """

    def __init__(
        self,
        *,
        addresses_of: AddressesOf,
        proc_root: str = constants.PROC_ROOT,
        max_processes: int = MAX_PROCESSES,
    ) -> None:
        self._addresses_of = addresses_of
        self._proc_root = proc_root
        self._max_processes = max_processes

    def _host_netns(self) -> frozenset[NetnsId]:
        keys = {netns_id(f"{self._proc_root}/{who}/ns/net") for who in ("1", "self")}
        keys.discard(None)
        if not keys:
            raise NetnsNotFoundError(
                f"cannot identify the host network namespace under {self._proc_root}"
                " (neither 1/ns/net nor self/ns/net is readable)"
            )
        return frozenset(k for k in keys if k is not None)

    def find(self, pod_uid: PodUid, pod_ips: Collection[str]) -> NetnsMatch | None:
        return self.find_all({pod_uid: pod_ips}).get(pod_uid)

    def find_all(self, pods: Mapping[PodUid, Collection[str]]) -> dict[PodUid, NetnsMatch]:
        """Scan `/proc` once for all `pods` (UID → IPs); the pods found, with their netns.

        Pods without IPs are not looked for: their netns could not be verified.
        """
        wanted = {uid: _normalise_all(ips) for uid, ips in pods.items()}
        wanted = {uid: ips for uid, ips in wanted.items() if ips}
        if not wanted:
            return {}
        started = time.monotonic()
        host = self._host_netns()
        found: dict[PodUid, NetnsMatch] = {}
        verified: dict[NetnsId, frozenset[str]] = {}
        scanned = 0
        for pid in pids(self._proc_root, self._max_processes):
            scanned += 1
            candidate = self._candidate(pid, wanted, host, found)
            if candidate is None:
                continue
            key = (candidate.dev, candidate.inode)
            addresses = verified.get(key)
            if addresses is None:
                addresses = self._verify(candidate.path, key)
                if addresses is None:
                    continue  # the process went away while we looked
                verified[key] = addresses
            if addresses.isdisjoint(wanted[candidate.uid]):
                log.warning(
                    "netns_rejected",
                    pod_uid=candidate.uid,
                    pid=pid,
                    netns=candidate.path,
                    reason="pod_ip_absent",
                )
                continue
            found[candidate.uid] = NetnsMatch(
                pod_uid=candidate.uid,
                path=candidate.path,
                pid=pid,
                inode=candidate.inode,
                start_time=candidate.start_time,
            )
        log.debug(
            "proc_scanned",
            processes=scanned,
            pods=len(wanted),
            found=len(found),
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )
        return found

    def _candidate(
        self,
        pid: int,
        wanted: Mapping[PodUid, frozenset[str]],
        host: frozenset[NetnsId],
        found: Mapping[PodUid, NetnsMatch],
    ) -> _Candidate | None:
        base = f"{self._proc_root}/{pid}"
        path = f"{base}/ns/net"
        key = netns_id(path)
        if key is None or key in host:
            return None
        cgroup = _read_text(f"{base}/cgroup")
        uid = pod_uid_from_cgroup(cgroup) if cgroup is not None else None
        if uid is None or PodUid(uid) not in wanted:
            return None
        stat = _read_text(f"{base}/stat")
        start_time = parse_start_time(stat) if stat is not None else None
        if start_time is None:
            return None
        best = found.get(PodUid(uid))
        if best is not None and (best.start_time, best.pid) <= (start_time, pid):
            return None  # an older process of this pod already won; no need to verify this one
        return _Candidate(
            uid=PodUid(uid), path=path, dev=key[0], inode=key[1], start_time=start_time
        )

    def _verify(self, path: str, key: NetnsId) -> frozenset[str] | None:
        """The addresses in the netns at `path`; empty when unreadable (fail closed).

        None when the pid no longer names the netns we examined (it exited, maybe was reused).
        """
        try:
            addresses = _normalise_all(self._addresses_of(path))
        except (RedirectError, OSError) as exc:
            log.warning("netns_unverifiable", netns=path, error=str(exc))
            addresses = frozenset()
        if netns_id(path) != key:
            return None
        return addresses


@dataclass(frozen=True)
class _Candidate:
    uid: PodUid
    path: str
    dev: int
    inode: int
    start_time: int


# rtnetlink, enough for an RTM_GETADDR dump (linux/rtnetlink.h, linux/if_addr.h).
_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_IFADDRMSG: Final = struct.Struct("=BBBBI")
_RECV_BUFFER: Final = 1 << 17
_MAX_RECVS: Final = 10_000
_DUMP_ATTEMPTS: Final = 3
_TIMEOUT_S: Final = 5.0


def _parse_addr(data: bytes, start: int, end: int) -> str | None:
    family = data[start]
    local = address = None
    for kind, at, until in netlink.attributes(data, start + _IFADDRMSG.size, end):
        if kind == _IFA_LOCAL:
            local = data[at:until]
        elif kind == _IFA_ADDRESS:
            address = data[at:until]
    # IFA_LOCAL is the local address; on a point-to-point link IFA_ADDRESS is the peer's.
    raw = local if local is not None else address
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return socket.inet_ntop(family, raw)
    except ValueError:
        return None


def _dump_addresses(sock: socket.socket, seq: int) -> tuple[set[str], bool]:
    request = netlink.message(
        _RTM_GETADDR,
        netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP,
        seq,
        _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0),
    )
    sock.send(request)
    addresses: set[str] = set()
    interrupted = False
    for _seq, kind, flags, data, start, end in netlink.answers(
        sock, (seq,), bufsize=_RECV_BUFFER, max_recvs=_MAX_RECVS, what="address dump"
    ):
        interrupted = interrupted or bool(flags & netlink.NLM_F_DUMP_INTR)
        if kind == netlink.NLMSG_ERROR:
            error = netlink.error_code(data, start)
            if error:
                raise KernelError(f"address dump failed: {os.strerror(error)}")
        elif kind == _RTM_NEWADDR:
            addr = _parse_addr(data, start, end)
            if addr is not None:
                addresses.add(addr)
    return addresses, interrupted


def netns_addresses() -> set[str]:
    """The IP addresses on every interface of the netns the calling thread is in.

    One raw rtnetlink dump (no pyroute2 socket set-up, no child process). Meant to run on a
    `NetnsRunner` worker: `runner.call(path, netns_addresses)`; the socket belongs to the netns
    the thread is in when it is created.
    """
    try:
        sock = netlink.open_socket(netlink.NETLINK_ROUTE, timeout=_TIMEOUT_S)
    except OSError as exc:
        raise KernelError(f"address dump failed: {exc}") from exc
    with sock:
        for attempt in range(1, _DUMP_ATTEMPTS + 1):
            try:
                addresses, interrupted = _dump_addresses(sock, attempt)
            except OSError as exc:
                raise KernelError(f"address dump failed: {exc}") from exc
            if not interrupted:
                return addresses
        # Addresses changed during every attempt: what we have is still a real snapshot of
        # most of them, and the caller only needs one of the pod's IPs to be present.
        return addresses


def runner_addresses(runner: NetnsRunner) -> AddressesOf:
    """The real `addresses_of` for `NetnsFinder`: dumps addresses on a worker of `runner`."""

    def addresses_of(path: str) -> set[str]:
        return runner.call(path, netns_addresses)

    return addresses_of
