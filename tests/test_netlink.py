"""The netlink codec and its loops: encoding and decoding on their own, the answer loops over a
datagram socket pair standing in for the kernel, and one real rtnetlink round trip in a lab
netns."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from ztunnel_redirect.core.errors import KernelError
from ztunnel_redirect.kernel import netlink
from ztunnel_redirect.kernel.netlink import (
    NLA,
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
)
from ztunnel_redirect.kernel.netns import NetnsRunner
from ztunnel_redirect.testing.netnslab import Lab

_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_RTM_GETLINK = 18


def error(seq: int, code: int) -> bytes:
    """An NLMSG_ERROR answer to a request of `seq` (0: an ack)."""
    return netlink.message(NLMSG_ERROR, 0, seq, netlink.ERRNO.pack(-code) + bytes(16))


def test_a_message_is_its_header_and_body_padded_to_four_bytes() -> None:
    data = netlink.message(_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 7, b"\x02abcd")
    assert NLMSG.unpack_from(data) == (16 + 5, _RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 7, 0)
    assert data[16:] == b"\x02abcd\0\0\0"
    assert list(netlink.messages(data + data)) == [
        (_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 7, 16, 21),
        (_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 7, 40, 45),
    ]


def test_attributes_nest_and_decode_to_offsets_in_the_one_buffer() -> None:
    inner = netlink.attr_str(1, "lo") + netlink.attr(2, b"\x01\x02\x03\x04\x05")
    data = netlink.attr(3 | NLA_F_NESTED, inner) + netlink.attr(4, b"")
    assert len(data) % 4 == 0
    (outer_kind, at, end), (empty_kind, empty_at, empty_end) = netlink.attributes(
        data, 0, len(data)
    )
    assert (outer_kind & NLA_TYPE_MASK, outer_kind & NLA_F_NESTED) == (3, NLA_F_NESTED)
    assert (empty_kind, empty_end - empty_at) == (4, 0)
    nested = [(kind, data[a:b]) for kind, a, b in netlink.attributes(data, at, end)]
    assert nested == [(1, b"lo\0"), (2, b"\x01\x02\x03\x04\x05")]


@pytest.mark.parametrize(
    "data",
    [NLA.pack(2, 1) + bytes(2), NLA.pack(12, 1) + bytes(4)],
    ids=["shorter than its header", "longer than the buffer"],
)
def test_a_malformed_attribute_is_an_error(data: bytes) -> None:
    with pytest.raises(KernelError, match="malformed netlink attribute"):
        list(netlink.attributes(data, 0, len(data)))


def test_a_malformed_message_is_an_error() -> None:
    with pytest.raises(KernelError, match="malformed netlink message"):
        list(netlink.messages(NLMSG.pack(64, NLMSG_DONE, 0, 1, 0)))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the kernel's): a datagram pair keeps message boundaries as netlink does."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(5.0)
    with ours, kernel:
        yield ours, kernel


def test_a_dump_reads_every_datagram_to_done_and_skips_other_requests(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    request = netlink.message(_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 5, bytes(8))
    kernel.send(netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 4, b"old!"))  # an abandoned dump
    kernel.send(netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 5, b"one!"))
    kernel.send(
        netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 5, b"two!")
        + netlink.message(NLMSG_DONE, NLM_F_MULTI, 5, bytes(4))
    )
    kernel.send(netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 6, b"next"))
    got = [data[a:b] for _kind, _flags, data, a, b in netlink.dump(ours, request)]
    assert got == [b"one!", b"two!"]
    assert kernel.recv(100) == request
    assert ours.recv(100)[16:] == b"next"  # not read: the dump ended at its NLMSG_DONE


def test_a_dump_error_raises_a_netlink_error_with_its_errno(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    kernel.send(error(9, errno.EPERM))
    request = netlink.message(_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 9, bytes(8))
    with pytest.raises(NetlinkError, match="address dump: EPERM") as caught:
        list(netlink.dump(ours, request, what="address dump"))
    assert caught.value.errno == errno.EPERM


def test_answers_wait_for_every_request_and_a_get_ends_at_its_one_answer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    kernel.send(netlink.message(_RTM_NEWADDR, 0, 1, b"get!") + error(2, errno.ENOENT))
    kernel.send(netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 3, b"dump"))
    kernel.send(netlink.message(NLMSG_DONE, NLM_F_MULTI, 3, bytes(4)))
    seen = [(seq, kind) for seq, kind, _f, _d, _a, _b in netlink.answers(ours, (1, 2, 3))]
    assert seen == [(1, _RTM_NEWADDR), (2, NLMSG_ERROR), (3, _RTM_NEWADDR), (3, NLMSG_DONE)]


def test_answers_that_never_end_are_an_error_not_a_hang(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    for _ in range(3):
        kernel.send(netlink.message(_RTM_NEWADDR, NLM_F_MULTI, 1, b"more"))
    with pytest.raises(KernelError, match="address dump did not end"):
        list(netlink.answers(ours, (1,), max_recvs=3, what="address dump"))


def test_acks_count_every_ack_and_accept_only_the_errnos_asked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, kernel = pair
    kernel.send(error(0, 0) + error(0, errno.EEXIST))
    netlink.acks(ours, b"requests", 2, ok={errno.EEXIST}, what="rtnetlink")
    kernel.send(error(0, 0))
    kernel.send(error(0, errno.EEXIST))
    with pytest.raises(NetlinkError, match="rtnetlink: EEXIST") as caught:
        netlink.acks(ours, b"requests", 2, what="rtnetlink")
    assert caught.value.errno == errno.EEXIST


def test_a_silent_kernel_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _kernel = pair
    ours.settimeout(0.01)
    with pytest.raises(TimeoutError):
        netlink.get(ours, netlink.message(_RTM_GETLINK, NLM_F_REQUEST, 1, bytes(16)))


def _real_round_trip() -> tuple[list[int], int]:
    """In the current netns: the address families dumped, and the errno of a get of a link
    that does not exist."""
    with netlink.open_socket(netlink.NETLINK_ROUTE) as sock:
        dump = netlink.message(_RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, bytes(8))
        families = [data[a] for _k, _f, data, a, _b in netlink.dump(sock, dump)]
        ifinfomsg = bytes(4) + (4242).to_bytes(4, "little") + bytes(8)
        try:
            netlink.get(sock, netlink.message(_RTM_GETLINK, NLM_F_REQUEST, 2, ifinfomsg))
        except NetlinkError as exc:
            return families, exc.errno
        return families, 0


async def test_a_real_rtnetlink_dump_and_get(runner: NetnsRunner, lab: Lab) -> None:
    pod = lab.add_pod("nl")
    families, code = await runner.run(pod.path, _real_round_trip)
    assert socket.AF_INET in families  # the pod's address and loopback's
    assert code == errno.ENODEV
