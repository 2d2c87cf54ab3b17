"""Netlink at the socket level: message and attribute encoding and decoding, and the loops that
read answers (acks, one answer, dumps). No policy: the callers (`nft`, `routing`, `procscan`,
`batchreplay`, `dumpproof`) know what they ask for and what an answer means.

Decoding works on offsets into one received buffer (`struct.unpack_from`), never on copies per
message: dumps and acks are on the hot path of every pod check. Sockets are blocking with a
timeout (`TimeoutError`, an `OSError`, when the kernel does not answer in time); every call runs
on a `NetnsRunner` worker, in the netns the socket was opened in.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Collection, Iterator
from typing import Any, Final

from ztunnel_redirect.core.errors import KernelError

__all__ = [
    "ERRNO",
    "NETLINK_NETFILTER",
    "NETLINK_ROUTE",
    "NFGENMSG",
    "NFNETLINK_V0",
    "NFNL_SUBSYS_NFTABLES",
    "NLA",
    "NLA_F_NESTED",
    "NLA_F_NET_BYTEORDER",
    "NLA_TYPE_MASK",
    "NLMSG",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_APPEND",
    "NLM_F_CREATE",
    "NLM_F_DUMP",
    "NLM_F_DUMP_INTR",
    "NLM_F_EXCL",
    "NLM_F_MULTI",
    "NLM_F_REPLACE",
    "NLM_F_REQUEST",
    "NetlinkError",
    "acks",
    "align",
    "answers",
    "attr",
    "attr_str",
    "attributes",
    "dump",
    "error_code",
    "get",
    "message",
    "messages",
    "nft_type",
    "open_socket",
    "pyroute2_bytes",
]

# linux/netlink.h
NETLINK_ROUTE: Final = 0
NETLINK_NETFILTER: Final = 12
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_DUMP: Final = 0x300
NLM_F_CREATE: Final = 0x400
NLM_F_APPEND: Final = 0x800
NLA_F_NESTED: Final = 0x8000
NLA_F_NET_BYTEORDER: Final = 0x4000
NLA_TYPE_MASK: Final = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

NLMSG: Final = struct.Struct("=IHHII")
"""nlmsghdr: length, type, flags, seq, pid."""
NLA: Final = struct.Struct("=HH")
"""nlattr: length (header included, padding not), type with its flags."""
NFGENMSG: Final = struct.Struct("=BBH")
"""nfgenmsg: family, version, res_id (big endian on the wire)."""
ERRNO: Final = struct.Struct("=i")
"""The negative errno that starts an NLMSG_ERROR payload (0: an ack)."""

# linux/netfilter/nfnetlink.h
NFNL_SUBSYS_NFTABLES: Final = 10
NFNETLINK_V0: Final = 0


def nft_type(msg: int) -> int:
    """The netlink message type of nftables message `msg` (NFT_MSG_*)."""
    return (NFNL_SUBSYS_NFTABLES << 8) | msg


class NetlinkError(KernelError):
    """The kernel answered a request with an error."""

    def __init__(self, message: str, *, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


def align(n: int) -> int:
    return (n + 3) & ~3


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message (header and `body`), padded to 4 bytes."""
    return NLMSG.pack(NLMSG.size + len(body), kind, flags, seq, 0) + body + bytes(-len(body) % 4)


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes. Nest by passing encoded attributes as `payload`."""
    return NLA.pack(NLA.size + len(payload), kind) + payload + bytes(-len(payload) % 4)


def attr_str(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, text.encode() + b"\0")


def pyroute2_bytes(msg: Any, kind: int, flags: int) -> bytes:
    """A pyroute2 message class instance encoded with this type and these flags (seq 0)."""
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg.encode()
    data: bytes = msg.data
    return data


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload offset, message end) of every message in one datagram."""
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, flags, seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            raise KernelError("malformed netlink message")
        yield kind, flags, seq, offset + NLMSG.size, offset + length
        offset += align(length)


def attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type with its flags, payload offset, payload end) of the attributes in data[offset:end].
    Mask the type with `NLA_TYPE_MASK` to compare it; nested ones are read by calling this on
    their payload."""
    while offset + NLA.size <= end:
        size, kind = NLA.unpack_from(data, offset)
        if size < NLA.size or offset + size > end:
            raise KernelError(f"malformed netlink attribute at {offset}")
        yield kind, offset + NLA.size, offset + size
        offset += align(size)


def error_code(data: bytes, start: int) -> int:
    """The errno of an NLMSG_ERROR message whose payload starts at `start` (0: an ack)."""
    code: int = -ERRNO.unpack_from(data, start)[0]
    return code


def _error(what: str, code: int) -> NetlinkError:
    return NetlinkError(f"{what}: {errno.errorcode.get(code, code)}", errno_=code)


def open_socket(protocol: int, *, timeout: float = 5.0) -> socket.socket:
    """A bound, blocking netlink socket in the calling thread's current netns."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def acks(
    sock: socket.socket,
    requests: bytes,
    count: int,
    *,
    ok: Collection[int] = (),
    what: str = "netlink",
    bufsize: int = 1 << 16,
) -> None:
    """Send `requests` (`count` messages asking for an ack) in one write and read the acks;
    raises `NetlinkError` for the first errno not in `ok`. Other messages are skipped."""
    sock.send(requests)
    pending = count
    while pending:
        data = sock.recv(bufsize)
        for kind, _flags, _seq, start, _end in messages(data):
            if kind != NLMSG_ERROR:
                continue
            pending -= 1
            code = error_code(data, start)
            if code and code not in ok:
                raise _error(what, code)


def answers(
    sock: socket.socket,
    seqs: Collection[int],
    *,
    bufsize: int = 1 << 16,
    max_recvs: int = 1 << 16,
    what: str = "netlink dump",
) -> Iterator[tuple[int, int, int, bytes, int, int]]:
    """(seq, type, flags, data, payload offset, message end) of the answers to requests already
    sent with sequence numbers `seqs`, until each has answered: a dump ends with NLMSG_DONE (or
    an NLMSG_ERROR), a get with its one answer. Messages of other sequence numbers (the end of
    an earlier, abandoned request) are skipped. NLMSG_DONE and NLMSG_ERROR are yielded too:
    what an error means is the caller's (see `error_code`)."""
    waiting = set(seqs)
    for _ in range(max_recvs):
        if not waiting:
            return
        data = sock.recv(bufsize)
        for kind, flags, seq, start, end in messages(data):
            if seq not in waiting:
                continue
            if kind in (NLMSG_DONE, NLMSG_ERROR) or not flags & NLM_F_MULTI:
                waiting.discard(seq)
            yield seq, kind, flags, data, start, end
    raise KernelError(f"{what} did not end")


def get(
    sock: socket.socket, request: bytes, *, what: str = "netlink"
) -> tuple[int, bytes, int, int]:
    """Send one request that is not a dump; (type, data, payload offset, message end) of its
    answer. An NLMSG_ERROR answer raises `NetlinkError` (an ack too: a get expects data)."""
    sock.send(request)
    seq = NLMSG.unpack_from(request)[3]
    for _seq, kind, _flags, data, start, end in answers(sock, (seq,), what=what):
        if kind == NLMSG_ERROR:
            raise _error(what, error_code(data, start))
        return kind, data, start, end
    raise KernelError(f"{what}: empty answer")


def dump(
    sock: socket.socket, request: bytes, *, what: str = "netlink dump", bufsize: int = 1 << 16
) -> Iterator[tuple[int, int, bytes, int, int]]:
    """Send a dump request; (type, flags, data, payload offset, message end) of each message of
    the answer, read to NLMSG_DONE. An error raises `NetlinkError`."""
    sock.send(request)
    seq = NLMSG.unpack_from(request)[3]
    for _seq, kind, flags, data, start, end in answers(sock, (seq,), bufsize=bufsize, what=what):
        if kind == NLMSG_DONE:
            return
        if kind == NLMSG_ERROR:
            code = error_code(data, start)
            if code:
                raise _error(what, code)
            return
        yield kind, flags, data, start, end
