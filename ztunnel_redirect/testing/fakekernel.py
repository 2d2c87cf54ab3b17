"""A kernel in memory for the control layer's tests: pod rules and host rules without root.

Like knftables' fake, it implements the same interfaces as the real thing (`ports.PodRuleWriter`
as `FakeKernel.pod_rules`, `ports.HostRuleWriter` as `FakeKernel.host_rules`) and keeps what was
applied, so a test asserts on state (`pods`, `host_elements`) rather than on calls. It can be told
to drift (`flush_pod`, `drop_host_element`), to fail an operation (`fail`), to run a hook just
before an operation (`before`: a pid reused between a check and the use), or to hold an operation
until released (`hold`: what runs meanwhile). Each operation is also appended to `log`, in order.

Netns identities are checked as the real workers check them: a path that no longer names the
netns it was found as raises NetnsNotFoundError and nothing is touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ztunnel_redirect.control.ports import HostElements
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.drift import Drift, DriftKind
from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.core.model import HostOptions, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, netns_id

__all__ = ["FakeKernel", "Hold", "Operation"]

Operation = Literal["pod_apply", "pod_check", "pod_remove", "host_apply", "host_add", "host_remove"]
"""What the fake kernel can be told to fail, hook or hold."""

_LOGGED: dict[Operation, str] = {
    "pod_apply": "rules",
    "pod_remove": "remove_rules",
    "host_add": "host_add",
    "host_remove": "host_remove",
}
"""What each operation appends to `log` (checks and host passes are not logged)."""


@dataclass
class Hold:
    """An operation held on entry: `entered` is set when it starts, it goes on at `release()`."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    _go: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self._go.set()

    async def wait(self) -> None:
        self.entered.set()
        await self._go.wait()


class FakeKernel:
    def __init__(self, *, log: list[str] | None = None) -> None:
        self.log: list[str] = [] if log is None else log
        self.pods: dict[str, PodOptions] = {}
        """netns path → the options our rules there were applied with."""
        self.host_table: HostOptions | None = None
        self.host_elements: dict[str, PodUid] = {}
        self.branch_eni_probe: list[tuple[str, bool]] = []
        """(`add` or `remove`, the branch_eni_probe flag) of every host add and remove."""
        self.written: list[str] = []
        """Every pod netns path written to, in order."""
        self.forgotten: list[str] = []
        """Every netns the pod rules were told is gone."""
        self._failures: dict[Operation, list[Exception]] = {}
        self._hooks: dict[Operation, list[Callable[[], None]]] = {}
        self._holds: dict[Operation, list[Hold]] = {}
        self.pod_rules = _PodRules(self)
        self.host_rules = _HostRules(self)

    # --- what a test tells it ---

    def fail(self, operation: Operation, error: Exception, *, times: int = 1) -> None:
        """The next `times` runs of `operation` raise `error` (after their hooks)."""
        self._failures.setdefault(operation, []).extend([error] * times)

    def before(self, operation: Operation, hook: Callable[[], None]) -> None:
        """Run `hook` once, when `operation` next starts (before the netns is opened)."""
        self._hooks.setdefault(operation, []).append(hook)

    def hold(self, operation: Operation) -> Hold:
        """Hold the next run of `operation` on entry until the returned hold is released."""
        hold = Hold()
        self._holds.setdefault(operation, []).append(hold)
        return hold

    def flush_pod(self, netns: str) -> None:
        """Someone removed our rules from `netns` (drift)."""
        self.pods.pop(netns, None)

    def drop_host_element(self, ip: str) -> None:
        """Someone removed `ip` from the host set (drift)."""
        self.host_elements.pop(ip, None)

    # --- the operations ---

    async def enter(
        self, operation: Operation, netns: str | None, identity: NetnsId | None
    ) -> None:
        """An operation starts: logged, hooks, hold, identity check, injected failure."""
        if operation in _LOGGED:
            self.log.append(_LOGGED[operation])
        for hook in self._hooks.pop(operation, []):
            hook()
        holds = self._holds.get(operation)
        if holds:
            await holds.pop(0).wait()
        if netns is not None and identity is not None and netns_id(netns) != identity:
            raise NetnsNotFoundError(f"{netns} no longer names the netns {identity}")
        failures = self._failures.get(operation)
        if failures:
            raise failures.pop(0)


class _PodRules:
    """`ports.PodRuleWriter` on the fake kernel."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel

    async def apply(
        self,
        netns: str,
        options: PodOptions,
        *,
        fresh: bool = False,
        identity: NetnsId | None = None,
    ) -> list[Drift]:
        await self._kernel.enter("pod_apply", netns, identity)
        self._kernel.written.append(netns)
        drifts = _pod_drift(self._kernel.pods.get(netns), options)
        self._kernel.pods[netns] = options
        return drifts

    async def check(
        self, netns: str, options: PodOptions, *, identity: NetnsId | None = None
    ) -> list[Drift]:
        await self._kernel.enter("pod_check", netns, identity)
        return _pod_drift(self._kernel.pods.get(netns), options)

    async def remove(self, netns: str, *, identity: NetnsId | None = None) -> list[str]:
        await self._kernel.enter("pod_remove", netns, identity)
        self._kernel.written.append(netns)
        removed = self._kernel.pods.pop(netns, None)
        return [] if removed is None else [f"table inet {t}" for t in c.POD_TABLES]

    def forget(self, netns: str) -> None:
        self._kernel.forgotten.append(netns)


def _pod_drift(have: PodOptions | None, want: PodOptions) -> list[Drift]:
    if have is None:
        return [Drift(DriftKind.MISSING_TABLE, table) for table in c.POD_TABLES]
    return [] if have == want else [Drift(DriftKind.CHANGED_TABLE, c.POD_TABLES[0])]


class _HostRules:
    """`ports.HostRuleWriter` on the fake kernel."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel

    async def apply(
        self, options: HostOptions, elements: HostElements | None = None
    ) -> list[Drift]:
        await self._kernel.enter("host_apply", None, None)
        return self._install(options, elements)

    def installer(
        self, options: HostOptions, elements: HostElements
    ) -> Callable[[], Iterable[object]]:
        wanted = dict(elements)
        return lambda: self._install(options, wanted)

    def _install(self, options: HostOptions, elements: HostElements | None) -> list[Drift]:
        kernel = self._kernel
        drifts = (
            [] if kernel.host_table == options else [Drift(DriftKind.MISSING_TABLE, c.HOST_TABLE)]
        )
        kernel.host_table = options
        if elements is not None:
            want = {ip: uid for ip, uid in elements.items() if options.ipv6 or ":" not in ip}
            have = kernel.host_elements
            drifts += [
                Drift(DriftKind.MISSING_ELEMENT, c.HOST_TABLE, f"{ip} {uid}")
                for ip, uid in want.items()
                if have.get(ip) != uid
            ]
            drifts += [
                Drift(DriftKind.EXTRA_ELEMENT, c.HOST_TABLE, f"{ip} {uid}")
                for ip, uid in have.items()
                if want.get(ip) != uid
            ]
            kernel.host_elements = want
        return drifts

    async def add_pod(
        self, ips: Iterable[str], uid: PodUid, *, ipv6: bool, branch_eni_probe: bool = False
    ) -> None:
        await self._kernel.enter("host_add", None, None)
        self._kernel.branch_eni_probe.append(("add", branch_eni_probe))
        for ip in ips:
            if ipv6 or ":" not in ip:
                self._kernel.host_elements[ip] = uid

    async def remove_pod(
        self, ips: Iterable[str], uid: PodUid, *, branch_eni_probe: bool = False
    ) -> list[str]:
        await self._kernel.enter("host_remove", None, None)
        self._kernel.branch_eni_probe.append(("remove", branch_eni_probe))
        gone = [ip for ip in ips if self._kernel.host_elements.get(ip) == uid]
        for ip in gone:
            del self._kernel.host_elements[ip]
        return gone
