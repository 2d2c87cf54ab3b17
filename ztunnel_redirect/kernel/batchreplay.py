"""Creating a pod's tables by replaying a recorded nftables netlink batch (docs/design.md §12.8;
here the
three pod tables into a fresh netns: 0.33 ms p50 instead of 0.73 ms through libnftables, most of
what is left being the kernel's own work).

The pod ruleset holds no per-pod value: every pod with the same options gets the same tables.
So the translation from rules to netlink is done once per `Ruleset`, by the kernel itself:

- record: in a scratch netns, listen to the nftables multicast group (as `nft monitor` does),
  load the ruleset with libnftables, and keep the kernel's notifications of what it created
  (NEWTABLE, NEWCHAIN, NEWRULE; NEWGEN ends the transaction);
- encode: turn each notification back into a request (kernel-assigned attributes such as handles,
  use counts and rule positions removed), grouped by table, between BATCH_BEGIN and BATCH_END;
- replay: per pod, send those bytes on a raw NETLINK_NETFILTER socket opened in the pod's netns
  and read one ack per message. The kernel applies the whole batch or nothing.

Only for creating tables that are missing. Tables and chains are created with NLM_F_EXCL, so a
table that exists (someone was faster) fails the whole batch instead of merging into it; repairs of
existing tables stay with libnftables (`podrules.repair_script`).

Every call here is synchronous and runs on a `NetnsRunner` worker (it opens sockets in the current
netns and may enter a scratch netns); nothing logs from here (workers have a private fd table).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.render import Ruleset
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netlink import (
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nft_type,
)
from ztunnel_redirect.kernel.netns import entered_scratch
from ztunnel_redirect.kernel.nft import Nft

__all__ = [
    "BatchRejectedError",
    "Recording",
    "Recordings",
    "Request",
    "encode_batch",
    "record_here",
    "send_batch",
]

_SOL_NETLINK: Final = 270
_NETLINK_ADD_MEMBERSHIP: Final = 1
_NFNLGRP_NFTABLES: Final = 7

_NFNL_MSG_BATCH_BEGIN: Final = 0x10
_NFNL_MSG_BATCH_END: Final = 0x11

# include/uapi/linux/netfilter/nf_tables.h
_NFT_MSG_NEWTABLE: Final = 0
_NFT_MSG_NEWCHAIN: Final = 3
_NFT_MSG_NEWRULE: Final = 6
_NFT_MSG_NEWGEN: Final = 15
_NFTA_TABLE_NAME: Final = 1  # also NFTA_CHAIN_TABLE and NFTA_RULE_TABLE: the owning table


_READ_ONLY: Final[dict[int, frozenset[int]]] = {
    # What the kernel fills in and a request must not carry (or whose value would be wrong in
    # another netns): NFTA_TABLE_USE 3, _HANDLE 4, _PAD 5, _OWNER 7 (ties a table to a socket).
    nft_type(_NFT_MSG_NEWTABLE): frozenset({3, 4, 5, 7}),
    # NFTA_CHAIN_HANDLE 2, _USE 6, _COUNTERS 8 (base chain statistics), _PAD 9, _ID 11.
    nft_type(_NFT_MSG_NEWCHAIN): frozenset({2, 6, 8, 9, 11}),
    # NFTA_RULE_HANDLE 3, _POSITION 6 (handle of the rule before it), _PAD 8, _ID 9,
    # _POSITION_ID 10, _CHAIN_ID 11: NLM_F_APPEND in batch order rebuilds the order.
    nft_type(_NFT_MSG_NEWRULE): frozenset({3, 6, 8, 9, 10, 11}),
}

_REQUEST_FLAGS: Final[dict[int, int]] = {
    # EXCL: an existing table or chain fails the batch instead of being merged into.
    nft_type(_NFT_MSG_NEWTABLE): NLM_F_CREATE | NLM_F_EXCL,
    nft_type(_NFT_MSG_NEWCHAIN): NLM_F_CREATE | NLM_F_EXCL,
    nft_type(_NFT_MSG_NEWRULE): NLM_F_CREATE | NLM_F_APPEND,
}


class BatchRejectedError(netlink.NetlinkError):
    """The kernel refused a replayed batch; nothing of it was applied."""


@dataclass(frozen=True)
class Request:
    """One nftables request of a batch, without its sequence number."""

    kind: int
    flags: int
    body: bytes
    """nfgenmsg and attributes."""


def _request_of(kind: int, data: bytes, offset: int, end: int) -> tuple[str, Request]:
    """A notification turned into a request: (its table, the request)."""
    family, _version, _res_id = NFGENMSG.unpack_from(data, offset)
    table = ""
    kept: list[bytes] = []
    for attr_kind, at, until in netlink.attributes(data, offset + NFGENMSG.size, end):
        number = attr_kind & netlink.NLA_TYPE_MASK
        if number == _NFTA_TABLE_NAME:
            table = data[at:until].rstrip(b"\0").decode()
        if number not in _READ_ONLY[kind]:
            kept.append(data[at - netlink.NLA.size : netlink.align(until)])
    if not table:
        raise KernelError(f"nftables notification of type {kind:#x} names no table")
    body = NFGENMSG.pack(family, 0, 0) + b"".join(kept)
    return table, Request(kind, NLM_F_REQUEST | _REQUEST_FLAGS[kind], body)


@dataclass(frozen=True)
class Recording:
    """What creating a ruleset sends to the kernel, table by table, in creation order."""

    tables: dict[str, tuple[Request, ...]]

    def batch(self, names: Iterable[str]) -> bytes:
        """The batch that creates exactly these tables (in the recorded order)."""
        wanted = set(names)
        unknown = wanted - set(self.tables)
        if unknown:
            raise KeyError(f"not recorded: {sorted(unknown)}")
        requests = [r for name, rs in self.tables.items() if name in wanted for r in rs]
        return encode_batch(requests)


def encode_batch(requests: list[Request]) -> bytes:
    """BATCH_BEGIN, the requests, BATCH_END, with sequence numbers 1..n+2.

    Only the last request asks for an ack: the kernel reports every failing message anyway
    (and a failed commit on BATCH_BEGIN), all before that ack, so one ack ends the wait and
    saves a receive per message.
    """
    batch_body = NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(netlink.NFNL_SUBSYS_NFTABLES))
    frames = [(_NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, batch_body)]
    frames += [(r.kind, r.flags, r.body) for r in requests]
    if requests:
        kind, flags, body = frames[-1]
        frames[-1] = (kind, flags | NLM_F_ACK, body)
    frames.append((_NFNL_MSG_BATCH_END, NLM_F_REQUEST, batch_body))
    return b"".join(
        netlink.message(kind, flags, seq, body)
        for seq, (kind, flags, body) in enumerate(frames, start=1)
    )


def record_here(ruleset: Ruleset, *, timeout: float = 5.0) -> Recording:
    """Load `ruleset` in a scratch netns and record the kernel's notifications of it.

    On a `NetnsRunner` worker (any netns: the scratch netns is nested).
    """
    creating = set(_READ_ONLY)
    tables: dict[str, list[Request]] = {t.name: [] for t in ruleset.tables}
    with (
        entered_scratch(),
        netlink.open_socket(netlink.NETLINK_NETFILTER, timeout=timeout) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
        with Nft() as nft:
            nft.run(ruleset.script())
        # Nothing else commits in a scratch netns: the first NEWGEN closes our transaction.
        done = False
        while not done:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError as exc:
                raise KernelError("no end of the nftables transaction was notified") from exc
            for kind, _flags, _seq, start, end in netlink.messages(data):
                if kind == nft_type(_NFT_MSG_NEWGEN):
                    done = True
                elif kind in creating:
                    table, request = _request_of(kind, data, start, end)
                    tables.setdefault(table, []).append(request)
                else:
                    raise KernelError(f"unexpected nftables notification of type {kind:#x}")
    if set(tables) != {t.name for t in ruleset.tables} or not all(tables.values()):
        raise KernelError(f"recorded tables {sorted(tables)} do not match the ruleset")
    return Recording({name: tuple(requests) for name, requests in tables.items()})


def send_batch(batch: bytes, *, timeout: float = 5.0) -> None:
    """Send a batch on a new NETLINK_NETFILTER socket in the current netns; raises
    `BatchRejectedError` with the first error the kernel reported (then nothing was applied)."""
    expected = _acked_seqs(batch)
    acked: set[int] = set()
    failure: tuple[int, int] | None = None
    with netlink.open_socket(netlink.NETLINK_NETFILTER, timeout=timeout) as sock:
        sock.sendall(batch)
        # Errors (a refused message, or a failed commit reported on BATCH_BEGIN) come before
        # the one ack asked for; the kernel handles the whole batch within the send.
        while acked < expected and failure is None:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError as exc:
                raise KernelError(f"nftables batch: acks missing for {expected - acked}") from exc
            for kind, _flags, seq, start, _end in netlink.messages(data):
                if kind != NLMSG_ERROR:
                    raise KernelError(f"nftables batch answered with message type {kind}")
                code = netlink.error_code(data, start)
                if code:
                    failure = failure or (seq, code)
                acked.add(seq)
    if failure is not None:
        seq, code = failure
        raise BatchRejectedError(
            f"nftables batch refused at message {seq}: {os.strerror(code)}", errno_=code
        )


def _acked_seqs(batch: bytes) -> set[int]:
    """The sequence numbers that ask for an ack."""
    return {seq for _kind, flags, seq, _s, _e in netlink.messages(batch) if flags & NLM_F_ACK}


class Recordings:
    """Recorded batches per ruleset, learnt on first use; thread-safe.

    Call `batch()` from a `NetnsRunner` worker: the first call for a ruleset records it in a
    scratch netns (~1 ms); the batches themselves are cached per set of tables.
    """

    def __init__(self) -> None:
        self._recordings: dict[Ruleset, Recording] = {}
        self._batches: dict[tuple[Ruleset, frozenset[str]], bytes] = {}
        self._lock = threading.Lock()

    def batch(self, ruleset: Ruleset, names: Iterable[str]) -> bytes:
        key = (ruleset, frozenset(names))
        with self._lock:
            known = self._batches.get(key)
            recording = self._recordings.get(ruleset)
        if known is not None:
            return known
        if recording is None:
            recording = record_here(ruleset)
        batch = recording.batch(key[1])
        with self._lock:
            self._recordings.setdefault(ruleset, recording)
            self._batches[key] = batch
        return batch
