"""Fixed values of ambient in-pod redirection (docs/design.md §1.2, §10), and the node's default
paths.

They must match what ztunnel and Istio use, so that a real ztunnel works with our rules unchanged.
Every default path lives here and nowhere else; settings, the CLI and the adapters refer to it.
"""

from typing import Final

ZTUNNEL_MARK: Final = 0x539
"""SO_MARK on every socket ztunnel opens inside a pod netns; never redirected."""
ZTUNNEL_MASK: Final = 0xFFF
CONNMARK: Final = 0x111
"""Set on the conntrack entry of connections that ztunnel opens toward the local app."""
CONNMARK_MASK: Final = 0xFFF

ROUTE_TABLE: Final = 100
RULE_PRIORITY: Final = 32764

OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
HBONE_PORT: Final = 15008
DNS_PORT: Final = 15053

PROBE_SNAT_V4: Final = "169.254.7.127"
PROBE_SNAT_V6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

NAT_TABLE: Final = "istio-ambient-nat"
MANGLE_TABLE: Final = "istio-ambient-mangle"
RAW_TABLE: Final = "istio-ambient-raw"
POD_TABLES: Final = (NAT_TABLE, MANGLE_TABLE, RAW_TABLE)
"""Every table we may own inside a pod netns; ownership is recognised by these names only."""

HOST_TABLE: Final = NAT_TABLE
HOST_SET_V4: Final = "istio-inpod-probes-v4"
HOST_SET_V6: Final = "istio-inpod-probes-v6"

ENROLL_LABEL: Final = "istio.io/dataplane-mode"
ENROLL_VALUE: Final = "ambient"
OPT_OUT_VALUE: Final = "none"
STATUS_ANNOTATION: Final = "ambient.istio.io/redirection"
SIDECAR_STATUS_ANNOTATION: Final = "sidecar.istio.io/status"
BYPASS_INBOUND_ANNOTATION: Final = "ambient.istio.io/bypass-inbound-capture"
DNS_CAPTURE_ANNOTATION: Final = "ambient.istio.io/dns-capture"
VIRTUAL_INTERFACES_ANNOTATION: Final = "istio.io/reroute-virtual-interfaces"
MIRROR_ANNOTATION: Final = "kubernetes.io/config.mirror"
"""On a static pod's mirror pod: the kubelet's UID of the static pod (what CNI_ARGS names)."""

ZTUNNEL_UDS_ADDRESS: Final = "/var/run/ztunnel/ztunnel.sock"
CNI_AGENT_RUN_DIR: Final = "/var/run/istio-cni"
PLUGIN_EVENT_SOCKET: Final = "pluginevent.sock"
"""File name of the CNI plugin's event socket inside `CNI_AGENT_RUN_DIR`."""
PLUGIN_LOG_SOCKET: Final = "log.sock"
"""File name of the CNI plugin's log socket inside `CNI_AGENT_RUN_DIR` (Istio's name)."""
CNI_BIN_DIR: Final = "/opt/cni/bin"
CNI_CONF_DIR: Final = "/etc/cni/net.d"
CNI_PLUGIN_SOURCE: Final = "/opt/ztunnel-redirect/cni/ztunnel-redirect-cni"
"""Where the image carries the CNI plugin executable (copied into `CNI_BIN_DIR`)."""
CNI_OWNED_CONF_NAME: Final = "02-istio-cni.conflist"
"""Istio's default name of the config file of our own that copies the primary's (owned mode)."""
CNI_STANDALONE_CONF_NAME: Final = "YYY-istio-cni.conf"
"""Istio's default name of our standalone config (not chained)."""
DECISION_FILE: Final = "cni-decisions.json"
"""File name of the CNI plugin's decision file inside `CNI_AGENT_RUN_DIR` (cniplugin/README.md)."""
PROC_ROOT: Final = "/proc"
HOST_NETNS: Final = "/proc/1/ns/net"
"""The host's network namespace, seen from a pod with hostPID: that of pid 1."""
NETNS_DIRS: Final = ("/var/run/netns", "/run/netns")
"""Where `ip netns` and container runtimes bind-mount named network namespaces."""
ALLOWED_NETNS_DIRS: Final = (*(f"{d}/" for d in NETNS_DIRS), f"{PROC_ROOT}/")
"""The only directories a netns path sent by the CNI plugin may be in (`/proc/<pid>/ns/net`
for a runtime that names a process instead of a bind mount)."""
SYSTEM_NAMESPACE: Final = "istio-system"
EXCLUDE_NAMESPACES: Final = ("kube-system",)
READINESS_PORT: Final = 8000
METRICS_PORT: Final = 15014
