"""The host side (docs/design.md §4): probe SNAT for kubelet, with a set of enrolled pod IPs.

Set elements are keyed by pod IP and carry the pod UID as comment; an element is removed only
when both match, because IPs get reused. Rewriting the table's rules keeps the elements: a
recreated table gets its elements back in the same transaction, so no enrolled pod's IP is ever
missing from the set (probes would be redirected to ztunnel and fail).

Beyond Istio, which writes these rules once at start, they are checked and repaired like the pod
rules (a firewall reload otherwise leaves probes failing for good, istio#60607).

The probe rules for AWS branch-ENI pods (`kernel.brancheni`, docs/design.md §4.5) are host state
too: added with a pod's element, removed with it, and checked in every host pass.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping

from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift, DriftKind, TableListing
from ztunnel_redirect.core.errors import ConfigError, NotFoundError
from ztunnel_redirect.core.model import HostOptions, PodUid
from ztunnel_redirect.core.render import element_family_set, host_ruleset
from ztunnel_redirect.kernel import brancheni
from ztunnel_redirect.kernel.dumpproof import element_comment_here
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.kernel.nft import GenerationGate, Nft, Verified, generation
from ztunnel_redirect.kernel.podrules import KernelForms, read_tables, table_drift

_UID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

Elements = Mapping[str, PodUid]
"""pod IP -> pod UID"""


def _checked(ip: str, uid: str) -> tuple[str, str]:
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError as exc:
        raise ConfigError(f"invalid pod IP {ip!r}") from exc
    if not _UID.match(uid):
        raise ConfigError(f"invalid pod UID {uid!r}")
    return ip, uid


def _element(ip: str, uid: str | None = None) -> str:
    comment = f' comment "{uid}"' if uid else ""
    return f"inet {c.HOST_TABLE} {element_family_set(ip)} {{ {ip}{comment} }}"


def _actual_elements(listing: TableListing | None) -> dict[str, str]:
    if listing is None:
        return {}
    merged: dict[str, str] = {}
    for elements in listing.elements.values():
        merged.update(elements)
    return merged


def _wanted(elements: Elements, options: HostOptions) -> dict[str, str]:
    wanted = dict(_checked(ip, uid) for ip, uid in elements.items())
    return {ip: uid for ip, uid in wanted.items() if options.ipv6 or ":" not in ip}


def _element_drift(want: Mapping[str, str], have: Mapping[str, str]) -> list[Drift]:
    drifts = [
        Drift(DriftKind.MISSING_ELEMENT, c.HOST_TABLE, f"{ip} {uid}")
        for ip, uid in want.items()
        if have.get(ip) != uid
    ]
    drifts += [
        Drift(DriftKind.EXTRA_ELEMENT, c.HOST_TABLE, f"{ip} {uid}")
        for ip, uid in have.items()
        if want.get(ip) != uid
    ]
    return drifts


def _drift_here(
    options: HostOptions, elements: Elements | None, forms: KernelForms
) -> tuple[list[Drift], dict[str, str]]:
    ruleset = host_ruleset(options)
    with Nft() as nft:
        actual = read_tables(nft, (c.HOST_TABLE,))
    drifts = table_drift(ruleset, forms.of(ruleset), actual)
    have = _actual_elements(actual[c.HOST_TABLE])
    if elements is not None:
        drifts += _element_drift(_wanted(elements, options), have)
    return drifts, have


def check_here(options: HostOptions, elements: Elements | None, forms: KernelForms) -> list[Drift]:
    """Compare the host table (and, when given, its elements) with the desired state. Reads only."""
    return _drift_here(options, elements, forms)[0]


def apply_here(options: HostOptions, elements: Elements | None, forms: KernelForms) -> list[Drift]:
    """Bring the host table to the desired state in one transaction; returns what was repaired.

    `elements=None` keeps whatever elements are there (the CLI's `host apply`).
    """
    drifts, have = _drift_here(options, elements, forms)
    if not drifts:
        return []
    want = have if elements is None else _wanted(elements, options)
    if not options.ipv6:
        want = {ip: uid for ip, uid in want.items() if ":" not in ip}
    structural = [
        d for d in drifts if d.kind not in (DriftKind.MISSING_ELEMENT, DriftKind.EXTRA_ELEMENT)
    ]
    table = host_ruleset(options).tables[0]
    script = ""
    if structural:
        if not any(d.kind is DriftKind.MISSING_TABLE for d in structural):
            script += f"add table {table.ref}\ndelete table {table.ref}\n"
        script += table.script()
        script += "".join(f"add element {_element(ip, uid)}\n" for ip, uid in want.items())
    else:
        script += "".join(
            f"delete element {_element(ip)}\n" for ip, uid in have.items() if want.get(ip) != uid
        )
        script += "".join(
            f"add element {_element(ip, uid)}\n" for ip, uid in want.items() if have.get(ip) != uid
        )
    with Nft() as nft:
        nft.run(script)
    return drifts


def _overwrite(ip: str, uid: str) -> str:
    """Commands that leave exactly `ip` with comment `uid` in its set, whatever was there.

    A plain `add element` keeps an existing element with its old comment: when an IP is reused
    before the old pod's removal, the element would keep the old pod's UID, and removing the old
    pod (IP and UID match) would then take the new pod's probe exemption away.
    """
    return (
        f"add element {_element(ip)}\n"
        f"delete element {_element(ip)}\n"
        f"add element {_element(ip, uid)}\n"
    )


def _comment(ip: str) -> str | None:
    """The UID comment of `ip`'s element, or None when the set has no such element."""
    key = ipaddress.ip_address(ip).packed
    return element_comment_here(c.HOST_TABLE, element_family_set(ip), key)


def _missing_host_objects(nft: Nft, ips: Iterable[str]) -> NotFoundError:
    text = nft.list_table(c.HOST_TABLE)
    if text is None:
        return NotFoundError(
            f"host table inet {c.HOST_TABLE} does not exist: apply the host rules first"
        )
    sets = TableListing.parse(text).sets
    missing = sorted({element_family_set(ip) for ip in ips} - sets.keys())
    return NotFoundError(
        f"host table inet {c.HOST_TABLE} has no set {', '.join(missing) or '(unknown)'}: "
        "apply the host rules with the same --ipv6 setting first"
    )


def add_pod_here(ips: Iterable[str], uid: str, *, ipv6: bool) -> None:
    """Put a pod's IPs in the sets with its UID as comment, in one transaction.

    Each IP's element is read first: a new IP is created, an IP with another pod's UID (reused)
    is overwritten, an IP already right is left alone (an agent restart writes nothing). Only a
    reused IP pays for a delete: closing the context after a deleting commit waits for
    RCU (docs/design.md §12.4). Writing blindly and reacting to "File exists" would cost as much on
    every call: the kernel waits for RCU when it aborts a refused transaction too.
    """
    pairs = [(ip, u) for ip, u in (_checked(ip, uid) for ip in ips) if ipv6 or ":" not in ip]
    have = {ip: _comment(ip) for ip, _ in pairs}
    script = "".join(
        f"create element {_element(ip, u)}\n" if have[ip] is None else _overwrite(ip, u)
        for ip, u in pairs
        if have[ip] != u
    )
    if not script:
        return
    with Nft() as nft:
        try:
            # "File exists" when someone added one meanwhile: the pod's retry reads again.
            nft.run(script)
        except NotFoundError as exc:
            raise _missing_host_objects(nft, [ip for ip, _ in pairs]) from exc


def remove_pod_here(ips: Iterable[str], uid: str) -> list[str]:
    """Remove a pod's elements, only those whose IP *and* UID comment match. Each is read by
    itself, as `add_pod_here` does: a listing of the table costs as much as the node has pods
    (milliseconds at 1000, for every pod deleted)."""
    pairs = [_checked(ip, uid) for ip in ips]
    gone = [ip for ip, u in pairs if _comment(ip) == u]
    if gone:
        with Nft() as nft:
            nft.run("".join(f"delete element {_element(ip)}\n" for ip in gone))
    return gone


def remove_here() -> bool:
    """Delete the host table (rules and sets). True when there was one."""
    with Nft() as nft:
        if nft.list_table(c.HOST_TABLE) is None:
            return False
        nft.run(f"delete table inet {c.HOST_TABLE}\n")
    return True


def _add_pod_here(ips: tuple[str, ...], uid: str, *, ipv6: bool, branch_eni: bool) -> None:
    add_pod_here(ips, uid, ipv6=ipv6)
    brancheni.add_pod_here([ip for ip in ips if ipv6 or ":" not in ip], enabled=branch_eni)


def _remove_pod_here(ips: tuple[str, ...], uid: str, *, branch_eni: bool) -> list[str]:
    gone = remove_pod_here(ips, uid)
    if gone:
        brancheni.remove_pod_here(gone, enabled=branch_eni)
    return gone


_Sync = Callable[[HostOptions, Elements | None, KernelForms], list[Drift]]


def _gated_here(
    sync: _Sync,
    options: HostOptions,
    elements: Elements | None,
    forms: KernelForms,
    verified: Verified | None,
    *,
    repair: bool,
) -> tuple[list[Drift], Verified | None]:
    """Skip the listing (the set may hold thousands of elements) while the host netns's
    nftables generation has not moved since the same desired state was verified.

    The branch-ENI probe rules are ip rules, which no nftables generation covers: they are
    checked on every call that names the elements (one rule dump; nothing more off EKS).
    """
    gate = GenerationGate(
        generation(), (options, None if elements is None else frozenset(elements.items()))
    )
    if gate.unchanged(verified):
        drifts: list[Drift] = []
    else:
        drifts = sync(options, elements, forms)
        verified = gate.verified(drifts)
    if elements is not None:
        ips = _wanted(elements, options)
        drifts += brancheni.sync_here(ips, enabled=options.aws_branch_eni_probe, repair=repair)
    return drifts, verified


class HostRules:
    """The host table in the host netns (`/proc/1/ns/net` on a node, a lab netns in tests)."""

    def __init__(self, runner: NetnsRunner, *, netns: str) -> None:
        self._runner = runner
        self._netns = netns
        self._forms = KernelForms()
        self._verified: Verified | None = None

    async def _gated(
        self, sync: _Sync, options: HostOptions, elements: Elements | None, *, repair: bool
    ) -> list[Drift]:
        drifts, self._verified = await self._runner.run(
            self._netns,
            functools.partial(_gated_here, repair=repair),
            sync,
            options,
            elements,
            self._forms,
            self._verified,
        )
        return drifts

    async def apply(self, options: HostOptions, elements: Elements | None = None) -> list[Drift]:
        return await self._gated(apply_here, options, elements, repair=True)

    async def check(self, options: HostOptions, elements: Elements | None = None) -> list[Drift]:
        return await self._gated(check_here, options, elements, repair=False)

    async def add_pod(
        self, ips: Iterable[str], uid: PodUid, *, ipv6: bool, branch_eni_probe: bool = False
    ) -> None:
        """The pod's elements, and with `branch_eni_probe` its probe rules if it is a
        branch-ENI pod (AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE)."""
        await self._runner.run(
            self._netns, _add_pod_here, tuple(ips), uid, ipv6=ipv6, branch_eni=branch_eni_probe
        )

    async def remove_pod(
        self, ips: Iterable[str], uid: PodUid, *, branch_eni_probe: bool = False
    ) -> list[str]:
        """Remove the pod's elements (IP and UID must match), and with `branch_eni_probe` the
        probe rules of the IPs removed; returns those IPs."""
        return await self._runner.run(
            self._netns, _remove_pod_here, tuple(ips), uid, branch_eni=branch_eni_probe
        )

    def installer(self, options: HostOptions, elements: Elements) -> Callable[[], list[Drift]]:
        """`apply_here` with `options` and `elements`, to run on a worker in the host netns
        (the Istio host migration installs ours first)."""
        return functools.partial(apply_here, options, dict(elements), self._forms)

    async def remove(self) -> bool:
        return await self._runner.run(self._netns, remove_here)

    async def remove_probe_rules(self) -> list[str]:
        """Every branch-ENI probe rule of ours (`cleanup`)."""
        return await self._runner.run(self._netns, brancheni.remove_here)
