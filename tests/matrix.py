"""The option matrices the rendering, batch replay and dump proof tests run over, with a
readable name per case (also the golden file's name)."""

from __future__ import annotations

import itertools

from ztunnel_redirect.core.model import HostOptions, PodOptions

POD_MATRIX = [
    PodOptions(ipv6=v6, dns_capture=dns, bypass_inbound=bypass, virtual_interfaces=vifs)
    for v6, dns, bypass, vifs in itertools.product(
        (False, True), (True, False), (False, True), ((), ("eth1", "net1"))
    )
]


def pod_name(o: PodOptions) -> str:
    parts = ["dual" if o.ipv6 else "v4", "dns" if o.dns_capture else "nodns"]
    parts += ["bypass"] if o.bypass_inbound else []
    parts += ["vif"] if o.virtual_interfaces else []
    return "pod-" + "-".join(parts)


HOST_MATRIX = [HostOptions(kubelet_uid=1000, ipv6=v6) for v6 in (False, True)]


def host_name(o: HostOptions) -> str:
    return "host-" + ("dual" if o.ipv6 else "v4")
