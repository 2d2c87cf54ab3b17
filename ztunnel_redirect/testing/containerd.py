"""A real container runtime for end-to-end tests and the benchmark: Debian's containerd (its CRI
plugin), runc and the reference CNI plugins, driven over CRI as kubelet drives them.

- `Containerd` (`Containerd.on_node(netns, work)`) starts `containerd` as a child process inside
  a given network namespace (the test node's) with `nsenter --net=...` (not `ip netns exec`,
  which also unshares the mount namespace and would hide the pod netns bind mounts under
  /run/netns from the agent), with a system PATH, its own root, state, socket and config under a
  work directory, and a CRI section pointing at the test's CNI bin and conf dirs and at a pause
  image built here (`build_pause_image`: busybox-static in a one-layer OCI tarball, imported with
  `ctr -n k8s.io images import`; nothing is pulled). `close()` removes every sandbox still there,
  stops containerd by pid, ends leftover shims of this containerd (matched by its socket address)
  and sandbox processes by pid, and removes the cgroups runc made under the pods' cgroup parents
  and the host directories containerd 1.6 and libcni make whatever their config says
  (`HOST_DIRS`) when they were not there before; also after a failure.
- `CriClient` speaks the few `runtime.v1.RuntimeService` methods kubelet uses to run a pod sandbox
  (`cri.proto`), over the Unix socket, with grpcio.
- `primary_conflist` is a real bridge + host-local chain on a private range, on a bridge of our
  own, with host-local's state under the work directory; `cni_bin_dir` links the reference plugins
  into a directory of the test's (the agent installs ours there, as on a node).
- `runtime_node` is the whole node the tests and the benchmark run pods on: the test API server,
  a `TestNode` whose netns holds containerd and the bridge, the real agent and a fake ztunnel
  when asked for (`RuntimeNode`); `timed_sandbox` times a sandbox's run and its stop + remove.

Nothing here touches /etc/cni, /opt/cni or the root network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.testing import cri_pb2
from ztunnel_redirect.testing.agentprocess import AgentProcess, built_plugin, connect_ztunnel
from ztunnel_redirect.testing.apiserver import ApiServer
from ztunnel_redirect.testing.fakeztunnel import FakeZtunnel
from ztunnel_redirect.testing.node import NODE_NAME, TestNode
from ztunnel_redirect.testing.traffic import App

__all__ = [
    "BRIDGE",
    "MESH_NAMESPACE",
    "PAUSE_IMAGE",
    "PLAIN_NAMESPACE",
    "PRIMARY_CONF",
    "SUBNET",
    "Containerd",
    "ContainerdError",
    "CriClient",
    "RuntimeNode",
    "Sandbox",
    "SandboxTiming",
    "build_pause_image",
    "cni_bin_dir",
    "pod_cgroup_parent",
    "primary_conflist",
    "runtime_node",
    "sandbox_config",
    "timed_sandbox",
    "unavailable",
]

SYSTEM_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""A node's PATH: containerd finds runc and its shim there, never a pyenv shim."""
SYSTEM_CNI_DIR: Final = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins."""
PRIMARY_PLUGINS: Final = ("bridge", "host-local", "loopback")
"""containerd's CRI also runs `loopback` itself, from the same bin dir."""
BINARIES: Final = ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "nsenter")
BUSYBOX: Final = Path("/bin/busybox")
"""Debian's busybox-static: the pause image's one binary."""
PAUSE_IMAGE: Final = "zr.test/pause:busybox"
BRIDGE: Final = "zrbr0"
SUBNET: Final = "10.233.0.0/24"
"""Private, and only inside the test's node netns: no traffic leaves the test's namespaces."""
NETWORK_NAME: Final = "zr-bridge"
PRIMARY_CONF: Final = "10-zr-bridge.conflist"
MESH_NAMESPACE: Final = "shop"
"""Labelled for the mesh on a `runtime_node`."""
PLAIN_NAMESPACE: Final = "plain"
"""Not labelled: its pods are not in the mesh."""
K8S_NAMESPACE: Final = "k8s.io"
"""containerd namespace of the CRI plugin's images and sandboxes."""
START_TIMEOUT: Final = 30.0
CALL_TIMEOUT: Final = 60.0
"""Bound on one CRI call (a RunPodSandbox is ~0.1-0.3 s here)."""
STOP_TIMEOUT: Final = 15.0
BOOTED: Final = "containerd successfully booted"
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
HOST_DIRS: Final = tuple(
    Path(p)
    for p in (
        "/var/lib/cni/results",
        "/var/lib/cni",
        "/run/containerd/runc/k8s.io",
        "/run/containerd/runc",
        "/run/containerd/s",
        "/run/containerd",
    )
)
"""Directories containerd 1.6 and libcni make whatever the config says (libcni's result cache,
the shims' sockets); `close()` removes those that were not there before, once empty."""


class ContainerdError(RuntimeError):
    """containerd would not start, or a command against it failed."""


def unavailable() -> str | None:
    """Why containerd cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "containerd end-to-end needs root"
    missing = [b for b in BINARIES if shutil.which(b, path=SYSTEM_PATH) is None]
    missing += [
        f"{SYSTEM_CNI_DIR}/{p}" for p in PRIMARY_PLUGINS if not (SYSTEM_CNI_DIR / p).is_file()
    ]
    if not BUSYBOX.is_file():
        missing.append(str(BUSYBOX))
    if missing:
        return (
            f"containerd end-to-end needs {', '.join(missing)} (Debian: containerd, runc, "
            "containernetworking-plugins, busybox-static; `make system-packages` installs them)"
        )
    return None


# --- the pause image --------------------------------------------------------------------------


def _blob(layout: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _add(layout, f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    return digest, len(data)


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    archive.addfile(info, io.BytesIO(data))


def _architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def build_pause_image(path: Path, *, name: str = PAUSE_IMAGE) -> Path:
    """An OCI image layout tarball of `name`: one layer holding busybox-static, which sleeps.

    A pod sandbox's process only holds the namespaces; containerd stops it with SIGKILL.
    """
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w") as layer:
        directory = tarfile.TarInfo("bin")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        layer.addfile(directory)
        _add(layer, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    layer_bytes = layer_buffer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    arch = _architecture()
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    with tarfile.open(path, mode="w") as layout:
        layer_digest, layer_size = _blob(layout, layer_bytes)
        config_digest, config_size = _blob(layout, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
        manifest_digest, manifest_size = _blob(layout, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                    },
                }
            ],
        }
        _add(layout, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(layout, "index.json", json.dumps(index).encode())
    return path


# --- CNI ------------------------------------------------------------------------------------


def cni_bin_dir(path: Path) -> Path:
    """A CNI bin dir of the test's: the reference plugins linked in (ours is installed there by
    the agent, as on a node)."""
    path.mkdir(parents=True, exist_ok=True)
    for plugin in PRIMARY_PLUGINS:
        link = path / plugin
        if not link.exists():
            link.symlink_to(SYSTEM_CNI_DIR / plugin)
    return path


def primary_conflist(ipam_dir: Path) -> dict[str, Any]:
    """A primary CNI's config: a bridge of our own with host-local addresses on `SUBNET`
    (host-local keeps its leases in `ipam_dir`, not /var/lib/cni)."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


# --- CRI ------------------------------------------------------------------------------------


def pod_cgroup_parent(uid: str) -> str:
    """The cgroup parent kubelet gives a best-effort pod (cgroupfs driver)."""
    return f"/kubepods/besteffort/pod{uid}"


def sandbox_config(
    name: str, namespace: str, uid: str, *, attempt: int = 0
) -> cri_pb2.PodSandboxConfig:
    """A pod sandbox as kubelet asks for it: metadata and the pod's cgroup parent."""
    return cri_pb2.PodSandboxConfig(
        metadata=cri_pb2.PodSandboxMetadata(
            name=name, namespace=namespace, uid=uid, attempt=attempt
        ),
        hostname=name,
        labels={
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
        },
        linux=cri_pb2.LinuxPodSandboxConfig(cgroup_parent=pod_cgroup_parent(uid)),
    )


@dataclass(frozen=True)
class Sandbox:
    """A running pod sandbox, as the test sees it (the attributes the traffic helpers use)."""

    id: str
    name: str
    namespace: str
    uid: str
    path: str
    """Its network namespace (a bind mount under /var/run/netns)."""
    ips: tuple[str, ...]
    pid: int


_SERVICE: Final = "/runtime.v1.RuntimeService/"


class CriClient:
    """`runtime.v1.RuntimeService` over containerd's socket (blocking calls)."""

    def __init__(self, socket_path: str) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")

    def _call(self, method: str, request: Message, reply: type[Message]) -> Any:
        rpc = self._channel.unary_unary(
            _SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return rpc(request, timeout=CALL_TIMEOUT)

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def version(self) -> cri_pb2.VersionResponse:
        reply: cri_pb2.VersionResponse = self._call(
            "Version", cri_pb2.VersionRequest(version="v1"), cri_pb2.VersionResponse
        )
        return reply

    def run_pod_sandbox(self, config: cri_pb2.PodSandboxConfig) -> str:
        """The new sandbox's id; raises `grpc.RpcError` (e.g. a failed CNI ADD)."""
        reply: cri_pb2.RunPodSandboxResponse = self._call(
            "RunPodSandbox",
            cri_pb2.RunPodSandboxRequest(config=config),
            cri_pb2.RunPodSandboxResponse,
        )
        return reply.pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(
            "StopPodSandbox",
            cri_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
            cri_pb2.StopPodSandboxResponse,
        )

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(
            "RemovePodSandbox",
            cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
            cri_pb2.RemovePodSandboxResponse,
        )

    def pod_sandbox_status(
        self, sandbox_id: str, *, verbose: bool = False
    ) -> cri_pb2.PodSandboxStatusResponse:
        reply: cri_pb2.PodSandboxStatusResponse = self._call(
            "PodSandboxStatus",
            cri_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose),
            cri_pb2.PodSandboxStatusResponse,
        )
        return reply

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """What the test needs of a running sandbox: its netns, IPs and pause pid (from the
        verbose status, whose `info` holds containerd's JSON with the OCI runtime spec)."""
        reply = self.pod_sandbox_status(sandbox_id, verbose=True)
        status = reply.status
        info = json.loads(reply.info["info"])
        namespaces = info["runtimeSpec"]["linux"]["namespaces"]
        netns = next(n["path"] for n in namespaces if n["type"] == "network")
        ips = (status.network.ip, *(ip.ip for ip in status.network.additional_ips))
        return Sandbox(
            id=status.id,
            name=status.metadata.name,
            namespace=status.metadata.namespace,
            uid=status.metadata.uid,
            path=netns,
            ips=tuple(ip for ip in ips if ip),
            pid=int(info["pid"]),
        )

    def close(self) -> None:
        self._channel.close()


# --- containerd -------------------------------------------------------------------------------


def _config(work: Path, *, cni_bin_dir: Path, cni_conf_dir: Path, sandbox_image: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{work / "root"}"
state = "{work / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{work / "containerd.sock"}"

[ttrpc]
  address = "{work / "containerd.sock.ttrpc"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{work / "opt"}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # The VM lacks CAP_SYS_RESOURCE: runc may not lower the sandbox's oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "native"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  Root = "{work / "runc"}"

[{cri}.cni]
  bin_dir = "{cni_bin_dir}"
  conf_dir = "{cni_conf_dir}"
  max_conf_num = 1
"""


class Containerd:
    """containerd with its CRI plugin, as a child process in the network namespace `netns`."""

    def __init__(self, work: Path, *, netns: str, cni_bin_dir: Path, cni_conf_dir: Path) -> None:
        """containerd's own files go in `work`; `start()` needs the CNI dirs in place."""
        self.work = work
        self.netns = netns
        self.cni_bin_dir = cni_bin_dir
        self.cni_conf_dir = cni_conf_dir
        self.socket = str(work / "containerd.sock")
        self.log_path = work / "containerd.log"
        self.cgroup_parents: set[str] = set()
        """Cgroup parents of the sandboxes run (removed by `close`)."""
        self.sandboxes: dict[str, Sandbox | None] = {}
        """Every sandbox created and not removed yet (None until looked at)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._booted = threading.Event()
        self._cri: CriClient | None = None
        self._cgroups_before = self._cgroup_dirs()
        self._host_dirs_before = {d for d in HOST_DIRS if d.exists()}

    @classmethod
    def on_node(cls, netns: str, work: Path) -> Containerd:
        """containerd for a node netns, with the node's CNI dirs under `work`: the reference
        plugins linked into `work/bin`, the primary's conflist (`primary_conflist`) in
        `work/net.d/PRIMARY_CONF`. Not started."""
        conf_dir = work / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / PRIMARY_CONF).write_text(json.dumps(primary_conflist(work / "ipam")))
        return cls(
            work / "containerd",
            netns=netns,
            cni_bin_dir=cni_bin_dir(work / "bin"),
            cni_conf_dir=conf_dir,
        )

    @property
    def primary_conf(self) -> Path:
        return self.cni_conf_dir / PRIMARY_CONF

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            raise ContainerdError("containerd not started")
        return self._cri

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ContainerdError("containerd not started")
        return self._proc.pid

    def start(self, *, timeout: float = START_TIMEOUT) -> None:
        """Start containerd; return once it has booted, answers CRI `Version` and has the pause
        image (built here, imported)."""
        if self._proc is not None:
            raise ContainerdError("containerd already started")
        self.work.mkdir(parents=True, exist_ok=True)
        self._booted.clear()
        config = self.work / "config.toml"
        config.write_text(
            _config(
                self.work,
                cni_bin_dir=self.cni_bin_dir,
                cni_conf_dir=self.cni_conf_dir,
                sandbox_image=PAUSE_IMAGE,
            )
        )
        self._proc = subprocess.Popen(
            ["nsenter", f"--net={self.netns}", "containerd", "--config", str(config)],
            env={"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self._proc,), name="containerd-log", daemon=True
        )
        self._reader.start()
        if not self._booted.wait(timeout) or self._proc.poll() is not None:
            raise ContainerdError(f"containerd did not boot within {timeout}s\n{self.tail()}")
        self._cri = CriClient(self.socket)
        self._cri.wait_ready(timeout)
        self._cri.version()
        self.import_image(build_pause_image(self.work / "pause.tar"))

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        stream = proc.stderr
        if stream is None:  # pragma: no cover - start() always pipes stderr
            return
        with self.log_path.open("ab") as out:
            for line in stream:
                out.write(line)
                out.flush()
                if BOOTED.encode() in line:
                    self._booted.set()
        self._booted.set()  # exited: start() sees poll() is not None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        return "\n".join(["--- containerd log tail ---", *text, "---"])

    def ctr(self, *argv: str) -> str:
        result = subprocess.run(
            ["ctr", "--address", self.socket, "-n", K8S_NAMESPACE, *argv],
            env={"PATH": SYSTEM_PATH},
            capture_output=True,
            text=True,
            check=False,
            timeout=CALL_TIMEOUT,
        )
        if result.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(argv)} failed: {result.stderr.strip()}")
        return result.stdout

    def import_image(self, tarball: Path) -> None:
        """Import (and unpack) an OCI tarball into the CRI plugin's `k8s.io` namespace."""
        self.ctr("images", "import", "--snapshotter", "native", str(tarball))

    # --- sandboxes, as kubelet runs them ---

    def run(self, config: cri_pb2.PodSandboxConfig) -> Sandbox:
        """RunPodSandbox; raises `grpc.RpcError` when it fails (e.g. the CNI ADD failed)."""
        self.cgroup_parents.add(config.linux.cgroup_parent)
        sandbox_id = self.cri.run_pod_sandbox(config)
        self.sandboxes[sandbox_id] = None
        sandbox = self.cri.sandbox(sandbox_id)
        self.sandboxes[sandbox_id] = sandbox
        return sandbox

    def remove(self, sandbox_id: str) -> None:
        """StopPodSandbox (the CNI DEL), then RemovePodSandbox."""
        self.cri.stop_pod_sandbox(sandbox_id)
        self.cri.remove_pod_sandbox(sandbox_id)
        self.sandboxes.pop(sandbox_id, None)

    # --- teardown ---

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM containerd (SIGKILL after `timeout`); sandboxes keep running in their shims."""
        proc = self._proc
        if proc is None:
            return
        if self._cri is not None:
            self._cri.close()
            self._cri = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
        self._proc = None

    def close(self) -> None:
        """Remove every sandbox left, stop containerd, end its leftover shims and sandbox
        processes (by pid), unmount what is left under the work dir, remove the pods' cgroups."""
        errors: list[str] = []
        if self._proc is not None and self._proc.poll() is None and self._cri is not None:
            for sandbox_id in list(self.sandboxes):
                try:
                    self.remove(sandbox_id)
                except grpc.RpcError as exc:
                    errors.append(f"sandbox {sandbox_id}: {exc}")
        self.stop()
        for pid in self._leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in self._mounts_under_work():
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        for sandbox_id, sandbox in self.sandboxes.items():
            self._forget(sandbox_id, sandbox)
        self.sandboxes.clear()
        for cgroup in sorted(self._cgroup_dirs() - self._cgroups_before, reverse=True):
            try:
                cgroup.rmdir()
            except OSError as exc:
                errors.append(f"cgroup {cgroup}: {exc}")
        for directory in HOST_DIRS:
            if directory not in self._host_dirs_before:
                with contextlib.suppress(OSError):  # not empty: someone else's now
                    directory.rmdir()
        if errors:
            raise ContainerdError("; ".join(errors))

    def _forget(self, sandbox_id: str, sandbox: Sandbox | None) -> None:
        """What a sandbox containerd could not remove leaves on the host: its netns bind mount,
        libcni's cached results and its shim's socket (named by a hash of containerd's address,
        the containerd namespace and the sandbox id)."""
        if sandbox is not None and Path(sandbox.path).exists():
            name = Path(sandbox.path).name
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        for cached in Path("/var/lib/cni/results").glob(f"*-{sandbox_id}-*"):
            cached.unlink(missing_ok=True)
        key = f"{self.socket}/{K8S_NAMESPACE}/{sandbox_id}".encode()
        (Path("/run/containerd/s") / hashlib.sha256(key).hexdigest()).unlink(missing_ok=True)

    def _leftover_pids(self) -> list[int]:
        """Shims serving this containerd (their command line names its socket) and processes in
        the cgroups of our sandboxes."""
        pids = []
        marker = self.socket.encode()
        parents = [p.encode() for p in self.cgroup_parents]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                cgroup = (entry / "cgroup").read_bytes()
            except OSError:
                continue
            if marker in cmdline.split(b"\0") or any(p in cgroup for p in parents):
                pids.append(int(entry.name))
        return pids

    def _mounts_under_work(self) -> list[str]:
        prefix = str(self.work) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return sorted((p for p in points if p.startswith(prefix)), reverse=True)

    def _cgroup_dirs(self) -> set[Path]:
        """The cgroup directories under /kubepods in every hierarchy (v1 and v2)."""
        found: set[Path] = set()
        roots = [CGROUP_ROOT / "kubepods", *CGROUP_ROOT.glob("*/kubepods")]
        for root in roots:
            if root.is_dir():
                found.add(root)
                found.update(p for p in root.rglob("*") if p.is_dir())
        return found

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxTiming:
    """One sandbox's life as kubelet drives it, in seconds."""

    run_s: float
    """RunPodSandbox: the whole CNI chain's ADD runs inside it."""
    remove_s: float
    """StopPodSandbox (the chain's DEL) and RemovePodSandbox."""


def timed_sandbox(containerd: Containerd, config: cri_pb2.PodSandboxConfig) -> SandboxTiming:
    """Run the sandbox, then stop and remove it, timing both (blocking)."""
    containerd.cgroup_parents.add(config.linux.cgroup_parent)
    started = time.perf_counter()
    sandbox_id = containerd.cri.run_pod_sandbox(config)
    ran = time.perf_counter()
    containerd.sandboxes[sandbox_id] = None
    containerd.remove(sandbox_id)
    return SandboxTiming(run_s=ran - started, remove_s=time.perf_counter() - ran)


# --- a node with a real runtime ----------------------------------------------------------------


@dataclass
class RuntimeNode:
    """What `runtime_node` yields: the test API server, the node (`TestNode`: its netns holds
    containerd, the bridge and every sandbox's veth), containerd with the node's CNI dirs, and
    the agents, fake ztunnels and apps started on it (all stopped when the node is left)."""

    api: ApiServer
    node: TestNode
    containerd: Containerd
    work: Path
    stops: contextlib.AsyncExitStack
    """Stops what is started on the node (last first) when `runtime_node` is left."""
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    async def start_agent(
        self, *, log_level: str = "debug", reconcile_period: float | None = 2.0
    ) -> AgentProcess:
        """The real agent, installing and chaining our plugin into the node's CNI dirs; returns
        once its entry is in the primary's conflist. `reconcile_period` None: the agent's own."""
        period = () if reconcile_period is None else ("--reconcile-period", str(reconcile_period))
        agent = AgentProcess.for_node(
            self.node,
            "--log-level", log_level, *period, "--proc-root", "/proc",
            "--install-cni", "--cni-bin-dir", str(self.containerd.cni_bin_dir),
            "--cni-conf-dir", str(self.containerd.cni_conf_dir),
            "--cni-plugin-binary", str(built_plugin()),
            log_path=self.work / f"agent-{len(self.agents)}.log",
        )  # fmt: skip
        self.agents.append(agent)
        self.stops.push_async_callback(agent.stop)
        await agent.start()
        await agent.wait_event("cni_plugin_installed")
        return agent

    async def ztunnel(self) -> FakeZtunnel:
        """A fake ztunnel connected to the agent, starting a stand-in in each netns it gets."""
        zt = await connect_ztunnel(self.node.ztunnel_socket)
        self.stops.push_async_callback(zt.close)
        return zt

    def create_pod(self, name: str, namespace: str) -> str:
        """The pod in the API, scheduled here, before its sandbox exists (no IPs); its UID."""
        created = self.api.create_pod(
            {
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Pending"},
            }
        )
        return str(created["metadata"]["uid"])

    async def run_sandbox(self, name: str, namespace: str, uid: str) -> Sandbox:
        """RunPodSandbox as kubelet asks for it; then kubelet reports its IPs in the API."""
        config = sandbox_config(name, namespace, uid)
        sandbox = await asyncio.to_thread(self.containerd.run, config)
        self.api.patch_pod(
            namespace,
            name,
            {
                "status": {
                    "phase": "Running",
                    "podIP": sandbox.ips[0],
                    "podIPs": [{"ip": ip} for ip in sandbox.ips],
                }
            },
        )
        return sandbox

    async def pod(self, name: str, namespace: str) -> Sandbox:
        return await self.run_sandbox(name, namespace, self.create_pod(name, namespace))

    async def timed_pod(self, name: str, namespace: str, uid: str) -> SandboxTiming:
        """The pod's sandbox run, stopped and removed, timed (`timed_sandbox`)."""
        config = sandbox_config(name, namespace, uid)
        return await asyncio.to_thread(timed_sandbox, self.containerd, config)

    async def remove(self, sandbox: Sandbox) -> None:
        """StopPodSandbox (the CNI DEL) and RemovePodSandbox."""
        await asyncio.to_thread(self.containerd.remove, sandbox.id)

    def app(self, sandbox: Sandbox, port: int) -> App:
        app = App(sandbox.path, port, name=sandbox.name)
        app.start()
        self.stops.push_async_callback(asyncio.to_thread, app.close)
        return app


@contextlib.asynccontextmanager
async def runtime_node(*, under: Path | None = None) -> AsyncIterator[RuntimeNode]:
    """A node with a real container runtime, for the tests and the benchmark: the API server and
    a `TestNode`, containerd started in the node's netns (`Containerd.on_node`: its own socket,
    state and CNI dirs in a temporary directory, the bridge/host-local primary, the pause image
    imported), namespaces `MESH_NAMESPACE` (enrolled) and `PLAIN_NAMESPACE`. No agent yet.
    The temporary directory goes `under` a directory of the caller's if given (the benchmark
    puts it on a tmpfs: containerd syncs its database to disk on every write, and each sandbox's
    root is a copy, which on a disk would time the disk).

    On the way out, also after a failure: agents, fake ztunnels and apps stopped, containerd
    closed (sandboxes removed, stopped by pid), the node's netns removed and with it the bridge,
    the temporary directory deleted.
    """
    work = Path(tempfile.mkdtemp(prefix="zr-containerd-", dir=under))
    try:
        async with contextlib.AsyncExitStack() as stack:
            api = await stack.enter_async_context(ApiServer())
            test_node = stack.enter_context(TestNode(api))
            runtime = Containerd.on_node(test_node.lab.node.path, work)
            stack.push_async_callback(asyncio.to_thread, runtime.close)
            await asyncio.to_thread(runtime.start)
            test_node.namespace(MESH_NAMESPACE, {c.ENROLL_LABEL: c.ENROLL_VALUE})
            test_node.namespace(PLAIN_NAMESPACE)
            yield RuntimeNode(api, test_node, runtime, work, stack)
    finally:
        shutil.rmtree(work, ignore_errors=True)
