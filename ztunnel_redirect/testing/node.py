"""A whole Kubernetes node on this machine, for integration tests, the demo and the benchmark.

- network namespaces for the node and its pods (`netnslab.Lab`);
- a fake `/proc` tree in which every pod has a "pause" process: `cgroup` naming the pod UID (the
  systemd/containerd form), `stat` with a start time, and `ns/net` linking to the pod's netns,
  so that the agent's /proc scan (docs/design.md §7) finds running pods as on a real node;
- the pods and namespaces in the fake API server, with the lab's addresses as pod IPs;
- the command line that runs the real agent against all of it.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.testing.apiserver import ApiServer, kubeconfig
from ztunnel_redirect.testing.netnslab import Lab, LabPod

NODE_NAME = "node-1"
KUBELET_UID = 4242


@dataclass(frozen=True)
class NodePod:
    name: str
    namespace: str
    uid: str
    lab: LabPod

    @property
    def path(self) -> str:
        return self.lab.path

    @property
    def ips(self) -> tuple[str, ...]:
        return self.lab.ips


class TestNode:
    """Build with `TestNode(api, ipv6=...)`; `close()` removes every namespace and file."""

    __test__ = False  # not a pytest test class

    def __init__(self, api: ApiServer, *, ipv6: bool = False) -> None:
        self.api = api
        self.ipv6 = ipv6
        self.lab = Lab(ipv6=ipv6)
        self._dir = tempfile.TemporaryDirectory(prefix="zr-node-")
        self.root = Path(self._dir.name)
        self.proc = self.root / "proc"
        self.pods: dict[str, NodePod] = {}
        self._pids = itertools.count(1000)
        self._pid_of: dict[str, int] = {}
        """Pod name → the pid of its pause process in the fake /proc."""
        self._lab_names = itertools.count()
        self._add_process(1, "systemd", "0::/init.scope\n", self.lab.node.path)
        (self.proc / "self").symlink_to("1")

    # --- paths the agent gets ---

    @property
    def kubeconfig(self) -> Path:
        path = self.root / "kubeconfig"
        if not path.exists():
            import json  # noqa: PLC0415 - only here

            path.write_text(json.dumps(kubeconfig(self.api.url)))
        return path

    @property
    def ztunnel_socket(self) -> str:
        return str(self.root / "ztunnel" / "ztunnel.sock")

    @property
    def run_dir(self) -> str:
        return str(self.root / "istio-cni")

    def agent_argv(self, *extra: str, readiness_port: int, metrics_port: int) -> list[str]:
        """The real agent, as a process, against this node."""
        return [
            sys.executable,
            "-m",
            "ztunnel_redirect.app.cli",
            "agent",
            "--kubeconfig",
            str(self.kubeconfig),
            "--node-name",
            NODE_NAME,
            "--host-netns",
            self.lab.node.path,
            "--proc-root",
            str(self.proc),
            "--kubelet-uid",
            str(KUBELET_UID),
            "--ztunnel-uds",
            self.ztunnel_socket,
            "--run-dir",
            self.run_dir,
            "--no-install-cni",
            "--bind-address",
            "127.0.0.1",
            "--readiness-port",
            str(readiness_port),
            "--metrics-port",
            str(metrics_port),
            "--no-ipv6" if not self.ipv6 else "--ipv6",
            *extra,
        ]

    # --- pods ---

    def _add_process(self, pid: int, comm: str, cgroup: str, netns: str) -> None:
        base = self.proc / str(pid)
        (base / "ns").mkdir(parents=True)
        (base / "comm").write_text(f"{comm}\n")
        (base / "cmdline").write_bytes(comm.encode() + b"\0")
        (base / "status").write_text(f"Name:\t{comm}\nUid:\t0\t0\t0\t0\n")
        fields = " ".join(["S"] + ["0"] * 18 + [str(pid)])  # field 22: start time
        (base / "stat").write_text(f"{pid} ({comm}) {fields}\n")
        (base / "cgroup").write_text(cgroup)
        (base / "ns" / "net").symlink_to(netns)

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        if self.api.get_namespace(name) is None:
            self.api.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        elif labels is not None:
            self.api.set_namespace_labels(name, labels)

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        ips: bool = True,
    ) -> NodePod:
        """A running pod: netns with veth and IPs, a pause process in /proc, and the pod in the
        API server (`ips=False`: as the API shows it before the sandbox's IPs are reported,
        which is when the CNI ADD runs)."""
        self.namespace(namespace)
        lab_pod = self.lab.add_pod(f"{next(self._lab_names)}")
        pod = NodePod(name, namespace, "", lab_pod)
        created = self.api.create_pod(
            self.pod_object(pod, labels=labels, annotations=annotations, ips=ips)
        )
        uid = created["metadata"]["uid"]
        pod = NodePod(name, namespace, uid, lab_pod)
        cgroup = (
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            f"{uid.replace('-', '_')}.slice/cri-containerd-{uid[:8]}.scope\n"
        )
        pid = next(self._pids)
        self._add_process(pid, "pause", cgroup, lab_pod.path)
        self._pid_of[name] = pid
        self.pods[name] = pod
        return pod

    def remove_sandbox(self, pod: NodePod) -> None:
        """The pod's sandbox is gone from the node: its pause process leaves /proc and its netns
        is deleted. The pod stays in the API (delete it there too for a pod that went away)."""
        shutil.rmtree(self.proc / str(self._pid_of.pop(pod.name)))
        del self.pods[pod.name]
        self.lab.delete(pod.lab.netns)

    def report_ips(self, pod: NodePod) -> None:
        """The kubelet reports the sandbox's IPs (after the CNI ADD)."""
        self.api.patch_pod(
            pod.namespace,
            pod.name,
            {"status": {"podIP": pod.ips[0], "podIPs": [{"ip": ip} for ip in pod.ips]}},
        )

    def pod_object(
        self,
        pod: NodePod,
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        ips: bool = True,
    ) -> dict[str, Any]:
        return {
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": labels or {},
                "annotations": annotations or {},
            },
            "spec": {"nodeName": NODE_NAME, "containers": [{"name": "app", "image": "app"}]},
            "status": {
                "phase": "Running",
                "podIP": pod.ips[0] if ips else None,
                "podIPs": [{"ip": ip} for ip in pod.ips] if ips else [],
            },
        }

    def enroll_namespace(self, namespace: str) -> None:
        self.namespace(namespace, {c.ENROLL_LABEL: c.ENROLL_VALUE})

    def close(self) -> None:
        try:
            self.lab.close()
        finally:
            self._dir.cleanup()

    def __enter__(self) -> TestNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
