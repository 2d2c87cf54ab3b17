"""Proving "no drift" by a normalised raw dump of our tables (docs/design.md §12.8: a raw netlink
dump of a pod's rules costs ~0.07 ms where the libnftables listing costs ~0.5 ms).

The proof can only say "identical": the caller compares the pod's normalised dump with the
normalised dump of the desired ruleset loaded into a scratch netns (the kernel's own form, like
`podrules.KernelForms`), and anything but equality falls back to the libnftables listing and
its precise diff. So the normalisation may be too strict (a wasted dump), never too lax. What
it drops is exactly what differs between two netns holding the same ruleset, and no semantics:

- nfgenmsg res_id (the generation, low 16 bits): checked, not compared (see `dump_here`);
- table: NFTA_TABLE_HANDLE, _PAD. NFTA_TABLE_USE is *kept*: it counts the table's chains,
  sets (anonymous ones too), stateful objects and flowtables, none of which but chains is
  dumped here, so an added set or object makes the dump differ; and a desired ruleset that
  has any of them is never proven (`provable`): their contents are not dumped;
- chain: NFTA_CHAIN_HANDLE, _USE (jumps to it: the rules themselves are compared), _COUNTERS
  (base chain packet/byte statistics), _PAD, _ID;
- rule: NFTA_RULE_HANDLE, _POSITION (handle of the previous rule: the order itself is kept,
  rules are compared in dump order per chain), _PAD, _ID, _POSITION_ID, _CHAIN_ID;
- inside a rule, the data of a `counter` expression (NFTA_COUNTER_BYTES/_PACKETS/_PAD, its
  only attributes, all traffic): the expression itself stays in its place.

Everything else is kept byte for byte: table flags (dormant) and owner, chain hook number,
priority, type, policy, flags and userdata, rule userdata (comments) and every other expression
with all its attributes. Chains and tables are compared by name, not by creation order (a
table's chain order has no meaning to the kernel: base chains run by priority, others by jump).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.core.render import Ruleset
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netlink import (
    NFGENMSG,
    NLA,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attr,
    attr_str,
    nft_type,
)
from ztunnel_redirect.kernel.netns import entered_scratch
from ztunnel_redirect.kernel.nft import Nft

__all__ = [
    "DumpInconsistentError",
    "ExpectedDumps",
    "Normalised",
    "dump_here",
    "element_comment_here",
    "provable",
]

_ENOENT: Final = 2
_NFPROTO_INET: Final = 1

# include/uapi/linux/netfilter/nf_tables.h
_NFT_MSG_NEWTABLE: Final = 0
_NFT_MSG_GETTABLE: Final = 1
_NFT_MSG_NEWCHAIN: Final = 3
_NFT_MSG_GETCHAIN: Final = 4
_NFT_MSG_NEWRULE: Final = 6
_NFT_MSG_GETRULE: Final = 7
_NFTA_TABLE_NAME: Final = 1  # also NFTA_CHAIN_TABLE and NFTA_RULE_TABLE: the owning table


_NFTA_CHAIN_NAME: Final = 3
_NFTA_RULE_CHAIN: Final = 2
_NFTA_RULE_EXPRESSIONS: Final = 4
_NFTA_EXPR_NAME: Final = 1

_RUNTIME_ONLY: Final[dict[int, frozenset[int]]] = {
    nft_type(_NFT_MSG_NEWTABLE): frozenset({4, 5}),
    nft_type(_NFT_MSG_NEWCHAIN): frozenset({2, 6, 8, 9, 11}),
    nft_type(_NFT_MSG_NEWRULE): frozenset({3, 6, 8, 9, 10, 11}),
}

_NAMED_BY: Final = {  # the attribute that names a chain or a rule's chain
    nft_type(_NFT_MSG_NEWTABLE): -1,
    nft_type(_NFT_MSG_NEWCHAIN): _NFTA_CHAIN_NAME,
    nft_type(_NFT_MSG_NEWRULE): _NFTA_RULE_CHAIN,
}
_COUNTER: Final = NLA.pack(NLA.size + 8, _NFTA_EXPR_NAME) + b"counter\0"
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
    unpack = NLA.unpack_from
    out: list[bytes] = []
    while offset + NLA.size <= end:
        size = unpack(data, offset)[0]
        if size < NLA.size:
            raise KernelError(f"malformed netlink attribute at {offset}")
        step = (size + 3) & ~3
        if data.startswith(_COUNTER, offset + NLA.size):
            out.append(_COUNTER)
        else:
            out.append(data[offset : offset + step])
        offset += step
    return b"".join(out)


def _object(kind: int, data: bytes, offset: int, end: int) -> tuple[str, str, bytes, bytes]:
    """One dumped object: (table, chain or "", the attributes that are not runtime state,
    the normalised expressions of a rule or b"")."""
    unpack = NLA.unpack_from
    dropped = _RUNTIME_ONLY[kind]
    named_by = _NAMED_BY[kind]
    expressions_at = _NFTA_RULE_EXPRESSIONS if kind == nft_type(_NFT_MSG_NEWRULE) else -1
    table = name = ""
    kept: list[bytes] = []
    expressions = b""
    while offset + NLA.size <= end:
        size, number = unpack(data, offset)
        if size < NLA.size:
            raise KernelError(f"malformed netlink attribute at {offset}")
        step = (size + 3) & ~3
        number &= NLA_TYPE_MASK
        if number == expressions_at:
            expressions = _expressions(data, offset + NLA.size, offset + size)
        elif number not in dropped:
            kept.append(data[offset : offset + step])
            if number == _NFTA_TABLE_NAME:
                table = data[offset + NLA.size : offset + size].rstrip(b"\0").decode()
            elif number == named_by:
                name = data[offset + NLA.size : offset + size].rstrip(b"\0").decode()
        offset += step
    return table, name, b"".join(kept), expressions


def _request(msg: int, seq: int, attributes: bytes, *, dump: bool = False) -> bytes:
    body = NFGENMSG.pack(_NFPROTO_INET, netlink.NFNETLINK_V0, 0) + attributes
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    return netlink.message(nft_type(msg), flags, seq, body)


def _objects(
    sock: socket.socket, requests: dict[int, bytes]
) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, res_id, data, attributes offset, message end) of every object answered to these
    requests (seq -> request), sent in one datagram. A get of an object that does not exist
    answers ENOENT and yields nothing; any other error proves nothing."""
    sock.sendall(b"".join(requests.values()))
    # Bounded: our few objects take one or two datagrams.
    for _seq, kind, flags, data, start, end in netlink.answers(
        sock, requests, bufsize=1 << 20, what="nftables dump"
    ):
        if flags & NLM_F_DUMP_INTR:
            raise DumpInconsistentError("nftables dump interrupted by a commit")
        if kind == NLMSG_DONE:
            continue
        if kind == NLMSG_ERROR:
            code = netlink.error_code(data, start)
            if code in (0, _ENOENT):
                continue
            raise DumpInconsistentError(f"nftables dump refused: {os.strerror(code)}")
        family, _version, res_id = NFGENMSG.unpack_from(data, start)
        if family == _NFPROTO_INET:
            yield kind, socket.ntohs(res_id), data, start + NFGENMSG.size, end


def dump_here(
    ruleset: Ruleset, *, generation: int | None = None, timeout: float = 5.0
) -> Normalised:
    """Our tables of `ruleset` in the current netns (and those of its absent ones that exist),
    their chains and rules, normalised (module comment above). On a `NetnsRunner` worker.

    Only our objects are ever asked for (docs/design.md §11.3): each table and each chain of the
    ruleset
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
    gets = [(_NFT_MSG_GETTABLE, attr_str(_NFTA_TABLE_NAME, name)) for name in names]
    gets += [
        (
            _NFT_MSG_GETCHAIN,
            attr_str(_NFTA_TABLE_NAME, table.name) + attr_str(_NFTA_CHAIN_NAME, chain.name),
        )
        for table in ruleset.tables
        for chain in table.chains
    ]
    with netlink.open_socket(netlink.NETLINK_NETFILTER, timeout=timeout) as sock:
        requests = {seq: _request(msg, seq, attrs) for seq, (msg, attrs) in enumerate(gets, 1)}
        for kind, res_id, data, start, end in _objects(sock, requests):
            seen.add(res_id)
            table, name, attrs, _ = _object(kind, data, start, end)
            if kind == nft_type(_NFT_MSG_NEWTABLE):
                tables.append((table, attrs))
            else:
                chains.append((table, name, attrs))
        for seq, (table, _attrs) in enumerate(tables, len(gets) + 1):
            dump = _request(_NFT_MSG_GETRULE, seq, attr_str(_NFTA_TABLE_NAME, table), dump=True)
            for _kind, res_id, data, start, end in _objects(sock, {seq: dump}):
                seen.add(res_id)
                rule_table, chain, attrs, expressions = _object(
                    nft_type(_NFT_MSG_NEWRULE), data, start, end
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
_BE32: Final = struct.Struct("!I")


def provable(expected: Normalised) -> bool:
    """Whether the dump covers everything in these tables: each table's use count (chains,
    sets, objects, flowtables) equals its number of chains, so it holds nothing but chains
    and their rules."""
    chains = collections.Counter(table for table, _chain, _attrs in expected.chains)
    for name, attrs in expected.tables:
        uses = [
            _BE32.unpack_from(attrs, at)[0]
            for kind, at, _end in netlink.attributes(attrs, 0, len(attrs))
            if kind & NLA_TYPE_MASK == _NFTA_TABLE_USE
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
    element = attr(
        _NFTA_LIST_ELEM | NLA_F_NESTED,
        attr(_NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(_NFTA_DATA_VALUE, key)),
    )
    body = NFGENMSG.pack(_NFPROTO_INET, netlink.NFNETLINK_V0, 0)
    body += attr_str(_NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(_NFTA_SET_ELEM_LIST_SET, set_name)
    body += attr(_NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, element)
    request = netlink.message(nft_type(_NFT_MSG_GETSETELEM), NLM_F_REQUEST, 1, body)
    with netlink.open_socket(netlink.NETLINK_NETFILTER, timeout=timeout) as sock:
        sock.sendall(request)
        try:
            data = sock.recv(1 << 20)
        except TimeoutError as exc:
            raise KernelError("no answer to an nftables element get") from exc
    for kind, _flags, _seq, start, end in netlink.messages(data):
        if kind == NLMSG_ERROR:
            code = netlink.error_code(data, start)
            if code == _ENOENT:
                return None
            raise KernelError(f"nftables element get refused: {os.strerror(code)}")
        if kind != nft_type(_NFT_MSG_NEWSETELEM):
            continue
        # NFTA_SET_ELEM_LIST_ELEMENTS > NFTA_LIST_ELEM > NFTA_SET_ELEM_USERDATA
        for outer, at, until in netlink.attributes(data, start + NFGENMSG.size, end):
            if outer & NLA_TYPE_MASK != _NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for _item, item_at, item_end in netlink.attributes(data, at, until):
                for inner, field_at, field_end in netlink.attributes(data, item_at, item_end):
                    if inner & NLA_TYPE_MASK == _NFTA_SET_ELEM_USERDATA:
                        return _comment_of(data[field_at:field_end])
            return ""
    raise KernelError("nftables element get answered without the element")
