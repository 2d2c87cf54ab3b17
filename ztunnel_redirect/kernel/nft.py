"""libnftables, called in-process, and what the kernel lists back.

Chosen by measurement (docs/design.md §12.8): libnftables through ctypes costs ~0.3 ms per pod
ruleset, one `nft -f` process per pod ~2-3 ms. The traps it comes with are handled here:

- a context programs the netns it was *created* in: `Nft` is created after entering the pod's
  netns, on a `NetnsRunner` worker, and never outlives that visit;
- its netlink socket must get an fd number below 1024: workers have a private fd table;
- libnftables is not thread-safe (non-reentrant libc lookups): calls are serialised by one lock,
  and listings print protocols numerically.

Only our own tables are ever named: no `list ruleset`, no `flush ruleset` (docs/design.md §11.3).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from collections.abc import Hashable, Sized
from dataclasses import dataclass
from typing import Final

from ztunnel_redirect.core.errors import CapabilityError, KernelError, NotFoundError
from ztunnel_redirect.core.model import HostOptions, PodOptions
from ztunnel_redirect.core.render import host_ruleset, pod_ruleset
from ztunnel_redirect.kernel import netlink

_OUTPUT_STATELESS: Final = 1 << 2
_OUTPUT_NUMERIC_PROTO: Final = 1 << 7

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib  # noqa: PLW0603 - the shared library is loaded once per process
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise CapabilityError(
            f"libnftables is not available ({exc}): install the distribution's nftables package"
        ) from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    _lib = lib
    return lib


class Nft:
    """One libnftables context, bound to the netns of the thread that created it."""

    def __init__(self) -> None:
        self._lib = _load()
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise KernelError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        self._lib.nft_ctx_output_set_flags(ctx, _OUTPUT_STATELESS | _OUTPUT_NUMERIC_PROTO)

    def run(self, script: str) -> str:
        """Run commands as one transaction; returns what nft printed."""
        if self._ctx is None:
            raise RuntimeError("Nft context used after close")
        with _lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            message = err.strip() or "nft command failed"
            if "No such file or directory" in message:
                raise NotFoundError(message)
            raise KernelError(message)
        return out

    def list_table(self, name: str) -> str | None:
        """The kernel's listing of one of our inet tables, or None when it does not exist."""
        try:
            return self.run(f"list table inet {name}")
        except NotFoundError:
            return None

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NFT_MSG_GETGEN: Final = netlink.nft_type(16)
_NFT_MSG_NEWGEN: Final = netlink.nft_type(15)
_NFTA_GEN_ID: Final = 1
_GETGEN: Final = netlink.message(
    _NFT_MSG_GETGEN, netlink.NLM_F_REQUEST, 1, netlink.NFGENMSG.pack(0, 0, 0)
)
_BE32: Final = struct.Struct("!I")


def generation() -> int:
    """The current netns's nftables generation id (raw netlink, ~0.01 ms).

    Every committed nftables change in the netns bumps it, whoever makes it; reads do not. So an
    unchanged id since a verified check proves that no table can have drifted meanwhile.
    """
    with netlink.open_socket(netlink.NETLINK_NETFILTER) as sock:
        kind, data, start, end = netlink.get(sock, _GETGEN, what="NFT_MSG_GETGEN")
    if kind != _NFT_MSG_NEWGEN:
        raise KernelError(f"NFT_MSG_GETGEN answered with message type {kind}")
    for attr, at, _end in netlink.attributes(data, start + netlink.NFGENMSG.size, end):
        if attr & netlink.NLA_TYPE_MASK == _NFTA_GEN_ID:
            genid: int = _BE32.unpack_from(data, at)[0]
            return genid
    raise KernelError("NFT_MSG_NEWGEN without NFTA_GEN_ID")


@dataclass(frozen=True)
class Verified:
    """The nftables generation of a netns at which a desired state was last seen in it."""

    generation: int
    desired: Hashable


@dataclass(frozen=True)
class GenerationGate:
    """The generation gate of a check: `GenerationGate(generation(), desired)`, read on a
    `NetnsRunner` worker in the netns checked.

    Every commit by anyone bumps the generation, so when a check verified this very desired
    state at this generation, nothing can have changed since and the listing is skipped.
    """

    generation: int
    desired: Hashable

    def unchanged(self, verified: Verified | None) -> bool:
        """Whether `verified` (kept from an earlier check) proves the desired state still."""
        return verified == Verified(self.generation, self.desired)

    def verified(self, drifts: Sized) -> Verified | None:
        """What to keep after a check that found `drifts`: after a write (any drift), the next
        check lists again before it trusts a generation."""
        return None if drifts else Verified(self.generation, self.desired)


def probe() -> None:
    """Check at start that libnftables and the kernel can do all we need, or fail clearly.

    Run it in a scratch netns: it loads every kind of object we use (nat/route/filter chains,
    redirect, ct mark and zone, sets with comments, snat by socket uid) and lists them back.
    """
    pod = pod_ruleset(PodOptions(ipv6=True, dns_capture=True, virtual_interfaces=("eth1",)))
    host = host_ruleset(HostOptions(kubelet_uid=0))
    try:
        with Nft() as nft:
            nft.run(pod.script())
            for table in pod.tables:
                nft.list_table(table.name)
            nft.run(f"delete table inet {pod.tables[0].name}\n" + host.script())
            nft.list_table(host.tables[0].name)
    except KernelError as exc:
        raise CapabilityError(
            f"the kernel or libnftables cannot load our rules ({exc}); "
            "nftables >= 1.0.1 and a kernel with nf_tables, nft_nat, nft_redir, nft_ct are needed"
        ) from exc
