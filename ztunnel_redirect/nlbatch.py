"""Creating a pod's tables by replaying a recorded nftables netlink batch (SPEC §12; here the
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

import collections
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from ztunnel_redirect.errors import KernelError
from ztunnel_redirect.netns import entered_scratch
from ztunnel_redirect.nft import Nft
from ztunnel_redirect.render import Ruleset

__all__ = [
    "BatchRejectedError",
    "DumpInconsistentError",
    "ExpectedDumps",
    "Normalised",
    "Recording",
    "Recordings",
    "Request",
    "dump_here",
    "element_comment_here",
    "encode_batch",
    "provable",
    "record_here",
    "send_batch",
]

_NETLINK_NETFILTER: Final = 12
_SOL_NETLINK: Final = 270
_NETLINK_ADD_MEMBERSHIP: Final = 1
_NETLINK_EXT_ACK: Final = 11
_NFNLGRP_NFTABLES: Final = 7

_NLMSG_ERROR: Final = 2
_ENOENT: Final = 2
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_EXCL: Final = 0x200
_NLM_F_CREATE: Final = 0x400
_NLM_F_APPEND: Final = 0x800

_NFNL_SUBSYS_NFTABLES: Final = 10
_NFNL_MSG_BATCH_BEGIN: Final = 0x10
_NFNL_MSG_BATCH_END: Final = 0x11

# include/uapi/linux/netfilter/nf_tables.h
_NFT_MSG_NEWTABLE: Final = 0
_NFT_MSG_NEWCHAIN: Final = 3
_NFT_MSG_NEWRULE: Final = 6
_NFT_MSG_NEWGEN: Final = 15
_NFTA_TABLE_NAME: Final = 1  # also NFTA_CHAIN_TABLE and NFTA_RULE_TABLE: the owning table
_NFTA_NESTED: Final = 0x8000
_NFTA_BYTEORDER: Final = 0x4000

_NLMSG: Final = struct.Struct("=IHHII")
_NFGENMSG: Final = struct.Struct("=BBH")  # family, version, res_id (big endian on the wire)
_NLA: Final = struct.Struct("=HH")
_ERRNO: Final = struct.Struct("=i")


def _nft_type(msg: int) -> int:
    return (_NFNL_SUBSYS_NFTABLES << 8) | msg


_READ_ONLY: Final[dict[int, frozenset[int]]] = {
    # What the kernel fills in and a request must not carry (or whose value would be wrong in
    # another netns): NFTA_TABLE_USE 3, _HANDLE 4, _PAD 5, _OWNER 7 (ties a table to a socket).
    _nft_type(_NFT_MSG_NEWTABLE): frozenset({3, 4, 5, 7}),
    # NFTA_CHAIN_HANDLE 2, _USE 6, _COUNTERS 8 (base chain statistics), _PAD 9, _ID 11.
    _nft_type(_NFT_MSG_NEWCHAIN): frozenset({2, 6, 8, 9, 11}),
    # NFTA_RULE_HANDLE 3, _POSITION 6 (handle of the rule before it), _PAD 8, _ID 9,
    # _POSITION_ID 10, _CHAIN_ID 11: NLM_F_APPEND in batch order rebuilds the order.
    _nft_type(_NFT_MSG_NEWRULE): frozenset({3, 6, 8, 9, 10, 11}),
}

_REQUEST_FLAGS: Final[dict[int, int]] = {
    # EXCL: an existing table or chain fails the batch instead of being merged into.
    _nft_type(_NFT_MSG_NEWTABLE): _NLM_F_CREATE | _NLM_F_EXCL,
    _nft_type(_NFT_MSG_NEWCHAIN): _NLM_F_CREATE | _NLM_F_EXCL,
    _nft_type(_NFT_MSG_NEWRULE): _NLM_F_CREATE | _NLM_F_APPEND,
}


class BatchRejectedError(KernelError):
    """The kernel refused a replayed batch; nothing of it was applied."""

    def __init__(self, message: str, *, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class Request:
    """One nftables request of a batch, without its sequence number."""

    kind: int
    flags: int
    body: bytes
    """nfgenmsg and attributes."""


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type with its flags, whole attribute including header and padding)."""
    while offset + _NLA.size <= end:
        size, kind = _NLA.unpack_from(data, offset)
        if size < _NLA.size:
            raise KernelError(f"malformed netlink attribute at {offset}")
        step = (size + 3) & ~3
        yield kind, data[offset : offset + step]
        offset += step


def _nla(kind: int, payload: bytes) -> bytes:
    return _NLA.pack(_NLA.size + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _nla_str(kind: int, text: str) -> bytes:
    return _nla(kind, text.encode() + b"\0")


def _attr_str(attr: bytes) -> str:
    size = _NLA.unpack_from(attr)[0]
    return attr[_NLA.size : size].rstrip(b"\0").decode()


def _request_of(kind: int, data: bytes, offset: int, end: int) -> tuple[str, Request]:
    """A notification turned into a request: (its table, the request)."""
    family, _version, _res_id = _NFGENMSG.unpack_from(data, offset)
    table = ""
    kept: list[bytes] = []
    for attr_kind, attr in _attributes(data, offset + _NFGENMSG.size, end):
        number = attr_kind & ~(_NFTA_NESTED | _NFTA_BYTEORDER)
        if number == _NFTA_TABLE_NAME:
            table = _attr_str(attr)
        if number not in _READ_ONLY[kind]:
            kept.append(attr)
    if not table:
        raise KernelError(f"nftables notification of type {kind:#x} names no table")
    body = _NFGENMSG.pack(family, 0, 0) + b"".join(kept)
    return table, Request(kind, _NLM_F_REQUEST | _REQUEST_FLAGS[kind], body)


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
    batch_body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(_NFNL_SUBSYS_NFTABLES))
    frames = [(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, batch_body)]
    frames += [(r.kind, r.flags, r.body) for r in requests]
    if requests:
        kind, flags, body = frames[-1]
        frames[-1] = (kind, flags | _NLM_F_ACK, body)
    frames.append((_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, batch_body))
    out = bytearray()
    for seq, (kind, flags, body) in enumerate(frames, start=1):
        out += _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body
        out += bytes(-len(out) % 4)
    return bytes(out)


def _recv_all(sock: socket.socket) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, seq, data, payload offset, message end) of every message of one datagram."""
    data = sock.recv(1 << 20)
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            raise KernelError("malformed netlink message")
        yield kind, seq, data, offset + _NLMSG.size, offset + length
        offset += (length + 3) & ~3


def record_here(ruleset: Ruleset, *, timeout: float = 5.0) -> Recording:
    """Load `ruleset` in a scratch netns and record the kernel's notifications of it.

    On a `NetnsRunner` worker (any netns: the scratch netns is nested).
    """
    creating = set(_READ_ONLY)
    tables: dict[str, list[Request]] = {t.name: [] for t in ruleset.tables}
    with (
        entered_scratch(),
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock,
    ):
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
        with Nft() as nft:
            nft.run(ruleset.script())
        # Nothing else commits in a scratch netns: the first NEWGEN closes our transaction.
        done = False
        while not done:
            try:
                messages = list(_recv_all(sock))
            except TimeoutError as exc:
                raise KernelError("no end of the nftables transaction was notified") from exc
            for kind, _seq, data, start, end in messages:
                if kind == _nft_type(_NFT_MSG_NEWGEN):
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
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.sendall(batch)
        # Errors (a refused message, or a failed commit reported on BATCH_BEGIN) come before
        # the one ack asked for; the kernel handles the whole batch within the send.
        while acked < expected and failure is None:
            try:
                messages = list(_recv_all(sock))
            except TimeoutError as exc:
                raise KernelError(f"nftables batch: acks missing for {expected - acked}") from exc
            for kind, seq, data, start, _end in messages:
                if kind != _NLMSG_ERROR:
                    raise KernelError(f"nftables batch answered with message type {kind}")
                code = -_ERRNO.unpack_from(data, start)[0]
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
    seqs: set[int] = set()
    offset = 0
    while offset + _NLMSG.size <= len(batch):
        length, _kind, flags, seq, _pid = _NLMSG.unpack_from(batch, offset)
        if flags & _NLM_F_ACK:
            seqs.add(seq)
        offset += (length + 3) & ~3
    return seqs


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


# ---------------------------------------------------------------------------------------------
# Read-back: a normalised raw dump of our tables, for a proof of "no drift" (SPEC §12: a raw
# netlink dump of a pod's rules costs ~0.07 ms where the libnftables listing costs ~0.5 ms).
#
# The proof can only say "identical": the caller compares the pod's normalised dump with the
# normalised dump of the desired ruleset loaded into a scratch netns (the kernel's own form, like
# `podrules.KernelForms`), and anything but equality falls back to the libnftables listing and
# its precise diff. So the normalisation may be too strict (a wasted dump), never too lax. What
# it drops is exactly what differs between two netns holding the same ruleset, and no semantics:
#
# - nfgenmsg res_id (the generation, low 16 bits): checked, not compared (see `dump_here`);
# - table: NFTA_TABLE_HANDLE, _PAD. NFTA_TABLE_USE is *kept*: it counts the table's chains,
#   sets (anonymous ones too), stateful objects and flowtables, none of which but chains is
#   dumped here, so an added set or object makes the dump differ; and a desired ruleset that
#   has any of them is never proven (`provable`): their contents are not dumped;
# - chain: NFTA_CHAIN_HANDLE, _USE (jumps to it: the rules themselves are compared), _COUNTERS
#   (base chain packet/byte statistics), _PAD, _ID;
# - rule: NFTA_RULE_HANDLE, _POSITION (handle of the previous rule: the order itself is kept,
#   rules are compared in dump order per chain), _PAD, _ID, _POSITION_ID, _CHAIN_ID;
# - inside a rule, the data of a `counter` expression (NFTA_COUNTER_BYTES/_PACKETS/_PAD, its
#   only attributes, all traffic): the expression itself stays in its place.
#
# Everything else is kept byte for byte: table flags (dormant) and owner, chain hook number,
# priority, type, policy, flags and userdata, rule userdata (comments) and every other expression
# with all its attributes. Chains and tables are compared by name, not by creation order (a
# table's chain order has no meaning to the kernel: base chains run by priority, others by jump).
# ---------------------------------------------------------------------------------------------

_NFNETLINK_V0: Final = 0
_NFPROTO_INET: Final = 1
_NLMSG_DONE: Final = 3
_NLM_F_DUMP: Final = 0x300
_NLM_F_DUMP_INTR: Final = 0x10
_NLM_F_MULTI: Final = 0x2

_NFT_MSG_GETTABLE: Final = 1
_NFT_MSG_GETCHAIN: Final = 4
_NFT_MSG_GETRULE: Final = 7
_NFTA_CHAIN_NAME: Final = 3
_NFTA_RULE_CHAIN: Final = 2
_NFTA_RULE_EXPRESSIONS: Final = 4
_NFTA_EXPR_NAME: Final = 1

_RUNTIME_ONLY: Final[dict[int, frozenset[int]]] = {
    _nft_type(_NFT_MSG_NEWTABLE): frozenset({4, 5}),
    _nft_type(_NFT_MSG_NEWCHAIN): frozenset({2, 6, 8, 9, 11}),
    _nft_type(_NFT_MSG_NEWRULE): frozenset({3, 6, 8, 9, 10, 11}),
}

_NFTA_TYPE_MASK: Final = ~(_NFTA_NESTED | _NFTA_BYTEORDER)
_NAMED_BY: Final = {  # the attribute that names a chain or a rule's chain
    _nft_type(_NFT_MSG_NEWTABLE): -1,
    _nft_type(_NFT_MSG_NEWCHAIN): _NFTA_CHAIN_NAME,
    _nft_type(_NFT_MSG_NEWRULE): _NFTA_RULE_CHAIN,
}
_COUNTER: Final = _NLA.pack(_NLA.size + 8, _NFTA_EXPR_NAME) + b"counter\0"
"""A `counter` expression's name attribute: it stands for the whole expression, whatever the
expression counted. (It can stand for nothing else: the kernel puts NFTA_EXPR_NAME first in an
expression, and a whole expression is never these 12 bytes.)"""


class DumpInconsistentError(KernelError):
    """A dump crossed an nftables commit (or answered with an error): it proves nothing."""


@dataclass(frozen=True)
class Normalised:
    """Our tables as dumped, without runtime state; equal for any two netns holding the same
    ruleset (handles, counters and generation aside). Only tables asked for are in it."""

    tables: tuple[tuple[str, bytes], ...]
    """(name, attributes), sorted by name."""
    chains: tuple[tuple[str, str, bytes], ...]
    """(table, chain, attributes), sorted."""
    rules: tuple[tuple[str, str, tuple[tuple[bytes, bytes], ...]], ...]
    """(table, chain, its rules in chain order as (attributes, expressions)), sorted by table and
    chain."""


def _expressions(data: bytes, offset: int, end: int) -> bytes:
    """The NFTA_LIST_ELEMs of NFTA_RULE_EXPRESSIONS, each whole but a counter by its name."""
    unpack = _NLA.unpack_from
    out: list[bytes] = []
    while offset + _NLA.size <= end:
        size = unpack(data, offset)[0]
        if size < _NLA.size:
            raise KernelError(f"malformed netlink attribute at {offset}")
        step = (size + 3) & ~3
        if data.startswith(_COUNTER, offset + _NLA.size):
            out.append(_COUNTER)
        else:
            out.append(data[offset : offset + step])
        offset += step
    return b"".join(out)


def _object(kind: int, data: bytes, offset: int, end: int) -> tuple[str, str, bytes, bytes]:
    """One dumped object: (table, chain or "", the attributes that are not runtime state,
    the normalised expressions of a rule or b"")."""
    unpack = _NLA.unpack_from
    dropped = _RUNTIME_ONLY[kind]
    named_by = _NAMED_BY[kind]
    expressions_at = _NFTA_RULE_EXPRESSIONS if kind == _nft_type(_NFT_MSG_NEWRULE) else -1
    table = name = ""
    kept: list[bytes] = []
    expressions = b""
    while offset + _NLA.size <= end:
        size, number = unpack(data, offset)
        if size < _NLA.size:
            raise KernelError(f"malformed netlink attribute at {offset}")
        step = (size + 3) & ~3
        number &= _NFTA_TYPE_MASK
        if number == expressions_at:
            expressions = _expressions(data, offset + _NLA.size, offset + size)
        elif number not in dropped:
            kept.append(data[offset : offset + step])
            if number == _NFTA_TABLE_NAME:
                table = data[offset + _NLA.size : offset + size].rstrip(b"\0").decode()
            elif number == named_by:
                name = data[offset + _NLA.size : offset + size].rstrip(b"\0").decode()
        offset += step
    return table, name, b"".join(kept), expressions


def _answers(
    sock: socket.socket, seqs: Iterable[int]
) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(seq, type, data, payload offset, message end) of the answers to requests `seqs`,
    until each has answered or an NLMSG_DONE ends it. Messages of other sequence numbers (the
    end of an earlier, abandoned request) are skipped."""
    waiting = set(seqs)
    for _ in range(1 << 16):  # bounded: our few objects take one or two datagrams
        if not waiting:
            return
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, flags, seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                raise KernelError("malformed netlink message")
            start, end = offset + _NLMSG.size, offset + length
            offset += (length + 3) & ~3
            if seq not in waiting:
                continue
            if flags & _NLM_F_DUMP_INTR:
                raise DumpInconsistentError("nftables dump interrupted by a commit")
            if kind in (_NLMSG_DONE, _NLMSG_ERROR) or not flags & _NLM_F_MULTI:
                waiting.discard(seq)  # a get has one answer; a dump ends with NLMSG_DONE
            yield seq, kind, data, start, end
    raise KernelError("nftables dump did not end")


def _request(msg: int, seq: int, attributes: bytes, *, dump: bool = False) -> bytes:
    body = _NFGENMSG.pack(_NFPROTO_INET, _NFNETLINK_V0, 0) + attributes
    flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else 0)
    return _NLMSG.pack(_NLMSG.size + len(body), _nft_type(msg), flags, seq, 0) + body


def _objects(
    sock: socket.socket, requests: dict[int, bytes]
) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, res_id, data, attributes offset, message end) of every object answered to these
    requests (seq -> request), sent in one datagram. A get of an object that does not exist
    answers ENOENT and yields nothing; any other error proves nothing."""
    sock.sendall(b"".join(requests.values()))
    for _seq, kind, data, start, end in _answers(sock, requests):
        if kind == _NLMSG_DONE:
            continue
        if kind == _NLMSG_ERROR:
            code = -_ERRNO.unpack_from(data, start)[0]
            if code in (0, _ENOENT):
                continue
            raise DumpInconsistentError(f"nftables dump refused: {os.strerror(code)}")
        family, _version, res_id = _NFGENMSG.unpack_from(data, start)
        if family == _NFPROTO_INET:
            yield kind, socket.ntohs(res_id), data, start + _NFGENMSG.size, end


def dump_here(
    ruleset: Ruleset, *, generation: int | None = None, timeout: float = 5.0
) -> Normalised:
    """Our tables of `ruleset` in the current netns (and those of its absent ones that exist),
    their chains and rules, normalised (module comment above). On a `NetnsRunner` worker.

    Only our objects are ever asked for (SPEC §11.3): each table and each chain of the ruleset
    by name (all in one datagram; a chain that is not in the ruleset shows in its table's use
    count), then each table's rules in a dump that the kernel filters by table. The answers
    are several reads: each object carries the generation it was read at (low 16 bits), and
    all must carry the same one, `generation` when given (the id the caller read before), else
    `DumpInconsistentError`: the reads crossed a commit.
    """
    tables: list[tuple[str, bytes]] = []
    chains: list[tuple[str, str, bytes]] = []
    rules: dict[tuple[str, str], list[tuple[bytes, bytes]]] = {}
    seen: set[int] = set() if generation is None else {generation & 0xFFFF}
    names = ExpectedDumps.names(ruleset)
    gets = [(_NFT_MSG_GETTABLE, _nla_str(_NFTA_TABLE_NAME, name)) for name in names]
    gets += [
        (
            _NFT_MSG_GETCHAIN,
            _nla_str(_NFTA_TABLE_NAME, table.name) + _nla_str(_NFTA_CHAIN_NAME, chain.name),
        )
        for table in ruleset.tables
        for chain in table.chains
    ]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        requests = {seq: _request(msg, seq, attrs) for seq, (msg, attrs) in enumerate(gets, 1)}
        for kind, res_id, data, start, end in _objects(sock, requests):
            seen.add(res_id)
            table, name, attrs, _ = _object(kind, data, start, end)
            if kind == _nft_type(_NFT_MSG_NEWTABLE):
                tables.append((table, attrs))
            else:
                chains.append((table, name, attrs))
        for seq, (table, _attrs) in enumerate(tables, len(gets) + 1):
            dump = _request(_NFT_MSG_GETRULE, seq, _nla_str(_NFTA_TABLE_NAME, table), dump=True)
            for _kind, res_id, data, start, end in _objects(sock, {seq: dump}):
                seen.add(res_id)
                rule_table, chain, attrs, expressions = _object(
                    _nft_type(_NFT_MSG_NEWRULE), data, start, end
                )
                if rule_table != table:
                    raise DumpInconsistentError(f"asked for rules of {table}, got {rule_table}")
                rules.setdefault((table, chain), []).append((attrs, expressions))
    if len(seen) > 1:
        raise DumpInconsistentError(f"nftables dumps crossed commits: generations {sorted(seen)}")
    return Normalised(
        tuple(sorted(tables)),
        tuple(sorted(chains)),
        tuple((t, ch, tuple(rs)) for (t, ch), rs in sorted(rules.items())),
    )


_NFTA_TABLE_USE: Final = 3


def provable(expected: Normalised) -> bool:
    """Whether the dump covers everything in these tables: each table's use count (chains,
    sets, objects, flowtables) equals its number of chains, so it holds nothing but chains
    and their rules."""
    chains = collections.Counter(table for table, _chain, _attrs in expected.chains)
    for name, attrs in expected.tables:
        uses = [
            struct.unpack_from("!I", attr, _NLA.size)[0]
            for kind, attr in _attributes(attrs, 0, len(attrs))
            if kind & _NFTA_TYPE_MASK == _NFTA_TABLE_USE
        ]
        if uses != [chains[name]]:
            return False
    return True


class ExpectedDumps:
    """The normalised dump of each desired ruleset, learnt once in a scratch netns (like
    `podrules.KernelForms`); thread-safe. Call from a `NetnsRunner` worker."""

    def __init__(self) -> None:
        self._cache: dict[Ruleset, Normalised] = {}
        self._lock = threading.Lock()

    @staticmethod
    def names(ruleset: Ruleset) -> tuple[str, ...]:
        """What is dumped: the ruleset's tables and the stale ones that must be absent."""
        return tuple(t.name for t in ruleset.tables) + ruleset.absent

    def of(self, ruleset: Ruleset) -> Normalised:
        with self._lock:
            known = self._cache.get(ruleset)
        if known is not None:
            return known
        with entered_scratch():
            with Nft() as nft:
                nft.run(ruleset.script())
            expected = dump_here(ruleset)
        with self._lock:
            self._cache[ruleset] = expected
        return expected

    def identical(self, ruleset: Ruleset, *, generation: int) -> bool:
        """True only when the current netns holds exactly `ruleset`'s tables and none of its
        absent ones, as of `generation`. False says nothing: the dump failed, crossed a commit,
        or something differs; the caller lists and diffs to find out.

        Never True for a ruleset with sets (named or anonymous), stateful objects or
        flowtables: their contents are not dumped here.
        """
        expected = self.of(ruleset)
        if not provable(expected):
            return False
        try:
            actual = dump_here(ruleset, generation=generation)
        except (KernelError, OSError):
            return False
        return actual == expected


# ---------------------------------------------------------------------------------------------
# One set element's comment, by a targeted get (libnftables' `get element` loads the whole set
# first: ~8 ms with 3000 elements, where this costs a round trip).
# ---------------------------------------------------------------------------------------------

_NFT_MSG_NEWSETELEM: Final = 12
_NFT_MSG_GETSETELEM: Final = 13
_NFTA_SET_ELEM_LIST_TABLE: Final = 1
_NFTA_SET_ELEM_LIST_SET: Final = 2
_NFTA_SET_ELEM_LIST_ELEMENTS: Final = 3
_NFTA_LIST_ELEM: Final = 1
_NFTA_SET_ELEM_KEY: Final = 1
_NFTA_SET_ELEM_USERDATA: Final = 6
_NFTA_DATA_VALUE: Final = 1
_NFTNL_UDATA_SET_ELEM_COMMENT: Final = 0  # libnftnl's userdata TLV (u8 type, u8 length)


def _comment_of(userdata: bytes) -> str:
    offset = 0
    while offset + 2 <= len(userdata):
        kind, size = userdata[offset], userdata[offset + 1]
        if kind == _NFTNL_UDATA_SET_ELEM_COMMENT:
            return userdata[offset + 2 : offset + 2 + size].rstrip(b"\0").decode()
        offset += 2 + size
    return ""


def element_comment_here(
    table: str, set_name: str, key: bytes, *, timeout: float = 5.0
) -> str | None:
    """The comment of the element `key` (an address, network order) of an inet table's set in the
    current netns: "" when it has none, None when there is no such element, set or table."""
    element = _nla(
        _NFTA_LIST_ELEM | _NFTA_NESTED,
        _nla(_NFTA_SET_ELEM_KEY | _NFTA_NESTED, _nla(_NFTA_DATA_VALUE, key)),
    )
    body = _NFGENMSG.pack(_NFPROTO_INET, _NFNETLINK_V0, 0)
    body += _nla_str(_NFTA_SET_ELEM_LIST_TABLE, table) + _nla_str(_NFTA_SET_ELEM_LIST_SET, set_name)
    body += _nla(_NFTA_SET_ELEM_LIST_ELEMENTS | _NFTA_NESTED, element)
    request = _NLMSG.pack(
        _NLMSG.size + len(body), _nft_type(_NFT_MSG_GETSETELEM), _NLM_F_REQUEST, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.sendall(request + body)
        try:
            messages = list(_recv_all(sock))
        except TimeoutError as exc:
            raise KernelError("no answer to an nftables element get") from exc
    for kind, _seq, data, start, end in messages:
        if kind == _NLMSG_ERROR:
            code = -_ERRNO.unpack_from(data, start)[0]
            if code == _ENOENT:
                return None
            raise KernelError(f"nftables element get refused: {os.strerror(code)}")
        if kind != _nft_type(_NFT_MSG_NEWSETELEM):
            continue
        # NFTA_SET_ELEM_LIST_ELEMENTS > NFTA_LIST_ELEM > NFTA_SET_ELEM_USERDATA
        for outer, attr in _attributes(data, start + _NFGENMSG.size, end):
            if outer & _NFTA_TYPE_MASK != _NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for _item, item in _attributes(attr, _NLA.size, len(attr)):
                for inner, field in _attributes(item, _NLA.size, _NLA.unpack_from(item)[0]):
                    if inner & _NFTA_TYPE_MASK == _NFTA_SET_ELEM_USERDATA:
                        return _comment_of(field[_NLA.size : _NLA.unpack_from(field)[0]])
            return ""
    raise KernelError("nftables element get answered without the element")
