"""Kernel notifications in a lab netns: what makes a feed say "check this netns" and what does not.

The kernel queues a multicast notification on every subscribed socket during the change itself,
so once the command that made the change has returned, the feed has it: reads here never wait.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from ztunnel_redirect.control.records import PodRecord, PodRecords
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.control.watchers import NetnsWatchers
from ztunnel_redirect.core import constants as c
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import NetnsNotFoundError
from ztunnel_redirect.core.model import Pod, PodOptions, PodUid
from ztunnel_redirect.kernel.netns import NetnsId, NetnsRunner, entered, netns_id
from ztunnel_redirect.kernel.nft import Nft
from ztunnel_redirect.kernel.notify import Feed, FeedOpener, Watched, raise_fd_limit
from ztunnel_redirect.kernel.podrules import PodRules
from ztunnel_redirect.testing.netnslab import Lab, LabPod

pytestmark = pytest.mark.kernel

V4 = PodOptions(ipv6=False)
RULE = ("fwmark", f"{c.CONNMARK:#x}/{c.CONNMARK_MASK:#x}", "lookup", str(c.ROUTE_TABLE))
RULE_AT = (*RULE, "priority", str(c.RULE_PRIORITY))
WAIT = 10.0


@pytest.fixture
async def opener() -> AsyncIterator[FeedOpener]:
    the_opener = FeedOpener()
    try:
        yield the_opener
    finally:
        the_opener.close()


@pytest.fixture
async def installed(runner: NetnsRunner, lab: Lab) -> LabPod:
    """A lab pod with our rules and routing in place."""
    pod = lab.add_pod("watched")
    await PodRules(runner).apply(pod.path, V4)
    return pod


async def feeds_of(opener: FeedOpener, pod: LabPod) -> tuple[Feed, Feed]:
    nft_feed, route_feed = await opener.open(pod.path, netns_id(pod.path), Watched.POD)
    return nft_feed, route_feed


async def test_a_foreign_flush_of_our_table_is_due_another_table_is_not(
    opener: FeedOpener, installed: LabPod
) -> None:
    nft_feed, route_feed = await feeds_of(opener, installed)
    try:
        assert not nft_feed.read()  # nothing happened yet
        installed.netns.nft("table inet someone-else {\n chain c {\n }\n}\n")
        installed.netns.exec("nft", "flush", "table", "inet", "someone-else")
        assert not nft_feed.read()
        installed.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
        assert nft_feed.read()
        assert not nft_feed.read()  # drained: one bit per burst
        installed.netns.exec("nft", "delete", "table", "inet", c.MANGLE_TABLE)
        assert nft_feed.read()
        assert not route_feed.read()
    finally:
        nft_feed.close()
        route_feed.close()


async def test_our_own_commits_are_not_due(
    opener: FeedOpener, runner: NetnsRunner, installed: LabPod
) -> None:
    """A commit by a thread of this process (the agent's own repair) is no reason to check."""
    nft_feed, route_feed = await feeds_of(opener, installed)
    try:
        installed.netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
        assert nft_feed.read()
        assert await PodRules(runner).apply(installed.path, V4) != []  # repaired, by us
        assert not nft_feed.read()
    finally:
        nft_feed.close()
        route_feed.close()


async def test_our_rule_and_routes_are_due_others_are_not(
    opener: FeedOpener, installed: LabPod
) -> None:
    nft_feed, route_feed = await feeds_of(opener, installed)
    try:
        installed.netns.ip("route", "add", "10.77.0.0/16", "dev", "lo")
        installed.netns.ip("rule", "add", "fwmark", "0x5", "lookup", "200", "priority", "100")
        assert not route_feed.read()
        installed.netns.ip("rule", "del", *RULE_AT)
        assert route_feed.read()
        installed.netns.ip("route", "add", "10.78.0.1", "dev", "lo", "table", str(c.ROUTE_TABLE))
        assert route_feed.read()
        assert not nft_feed.read()
    finally:
        nft_feed.close()
        route_feed.close()


async def test_the_host_watches_every_ip_rule_when_the_branch_eni_probe_is_on(
    opener: FeedOpener, lab: Lab
) -> None:
    """The branch-ENI probe rules (§4.5) follow the VPC CNI's rules: any rule change in the host
    is a reason to check it; routes are not (they change with every pod's veth)."""
    host = lab.node
    (nft_only,) = await opener.open(host.path, netns_id(host.path), Watched.HOST)
    nft_only.close()
    nft_feed, rule_feed = await opener.open(host.path, netns_id(host.path), Watched.HOST_WITH_RULES)
    try:
        host.ip("route", "add", "10.77.0.0/16", "dev", "lo")
        assert not rule_feed.read()
        host.ip("rule", "add", "iif", "lo", "lookup", "101", "priority", "10")
        assert rule_feed.read()
        assert not rule_feed.read()  # drained
        host.ip("rule", "del", "iif", "lo", "lookup", "101", "priority", "10")
        assert rule_feed.read()
        assert not nft_feed.read()
    finally:
        nft_feed.close()
        rule_feed.close()


async def test_an_overrun_is_due(opener: FeedOpener, installed: LabPod) -> None:
    """Notifications the socket had no room for may have been about us: ENOBUFS means check."""
    nft_feed, route_feed = await feeds_of(opener, installed)
    try:
        nft_feed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        chains = "".join(f" chain c{i} {{\n }}\n" for i in range(200))
        installed.netns.nft(f"table inet someone-else {{\n{chains}}}\n")
        assert nft_feed.read()
    finally:
        nft_feed.close()
        route_feed.close()


async def test_feeds_open_only_in_the_netns_the_path_named(opener: FeedOpener, lab: Lab) -> None:
    pod, other = lab.add_pod("p"), lab.add_pod("other")
    with pytest.raises(NetnsNotFoundError):
        await opener.open(pod.path, netns_id(other.path), Watched.POD)
    (feed,) = await opener.open(other.path, netns_id(other.path), Watched.HOST)
    try:
        pod.netns.nft(f"table inet {c.NAT_TABLE} {{\n}}\n")
        assert not feed.read()  # another netns's change
        other.netns.nft(f"table inet {c.NAT_TABLE} {{\n}}\n")
        assert feed.read()
    finally:
        feed.close()


async def test_the_event_loop_thread_never_enters_a_netns(lab: Lab) -> None:
    pod = lab.add_pod("p")
    with pytest.raises(RuntimeError, match="event loop"), entered(pod.path, shared_fds=True):
        pytest.fail("entered")


@pytest.fixture
def fd_limit() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_fd_limit_is_raised_up_to_the_hard_limit_never_lowered(fd_limit: None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 2048, "the hard limit (which only CAP_SYS_RESOURCE may raise) is too low"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    limit = raise_fd_limit(2048)
    assert (limit.was, limit.soft, limit.hard, limit.enough) == (1024, 2048, hard, True)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (2048, hard)
    limit = raise_fd_limit(hard + 1)
    assert (limit.soft, limit.enough) == (hard, False)
    assert raise_fd_limit(100).soft == hard  # never lowered


async def test_libnftables_works_while_feeds_hold_fd_numbers_above_1024(
    fd_limit: None, opener: FeedOpener, runner: NetnsRunner, lab: Lab
) -> None:
    """With the watches of a big node open, every fd the agent opens has a number over 1024;
    libnftables (select()) aborts the process on such a number unless it runs on a worker with
    a private fd table (docs/design.md §12.2)."""
    raise_fd_limit(4096)
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    pods = [lab.add_pod(f"fd{i}") for i in range(3)]
    feeds: list[Feed] = []
    try:
        for pod in pods:
            feeds += await opener.open(pod.path, netns_id(pod.path), Watched.POD)
        assert min(feed.fileno() for feed in feeds) > 1024
        rules = PodRules(runner)
        await asyncio.gather(*(rules.apply(pod.path, V4) for pod in pods))
        assert [await rules.check(pod.path, V4) for pod in pods] == [[], [], []]
        assert await runner.run(pods[0].path, _list_nat) is not None
        for feed in feeds:
            feed.read()  # our routing writes (rtnetlink names no committer)
        pods[0].netns.exec("nft", "flush", "table", "inet", c.NAT_TABLE)
        assert [feed.read() for feed in feeds[:2]] == [True, False]
    finally:
        for feed in feeds:
            feed.close()
        for fd in filler:
            os.close(fd)


def _list_nat() -> str | None:
    with Nft() as nft:
        return nft.list_table(c.NAT_TABLE)


# --- the watchers: what a burst costs ---------------------------------------------------------


def adopted(*pods: LabPod) -> PodRecords:
    """Records of `pods` enrolled, each with its lab netns (uid: the pod's name)."""
    records = PodRecords(store=ClusterStore(), policy=EnrollmentPolicy(node_name="n"))
    for pod in pods:
        records.adopt(
            Pod(uid=PodUid(pod.netns.name), name=pod.netns.name, namespace="demo"), pod.path
        )
    return records


class KeepingOpener(FeedOpener):
    """Keeps every feed it opened, for the test to reach their sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[Feed] = []

    async def open(self, path: str, expect: NetnsId | None, watched: Watched) -> list[Feed]:
        feeds = await super().open(path, expect, watched)
        self.opened += feeds
        return feeds


async def test_a_burst_costs_one_check_per_netns_and_a_leaving_pod_closes_its_sockets(
    runner: NetnsRunner, lab: Lab
) -> None:
    """Many changes while the event loop is busy (a storm) are one readable event per socket,
    drained at once: one enqueue per netns, overrun or not, and the keyed queue coalesces
    whatever comes while that check is queued (tests/test_workqueue.py). So a node-wide burst
    costs at most one queued check per pod."""
    pods = [lab.add_pod(f"storm{i}") for i in range(3)]
    rules = PodRules(runner)
    for pod in pods:
        await rules.apply(pod.path, V4)
    checks: list[str] = []
    all_checked = asyncio.Event()

    def enqueue(key: str) -> None:
        checks.append(key)
        if {p.netns.name for p in pods} <= set(checks):
            all_checked.set()

    records, opener = adopted(*pods), KeepingOpener()
    watchers = NetnsWatchers(
        records=records,
        opener=opener,
        enqueue=enqueue,
        host_netns=lab.node.path,
        host_rules=False,
    )
    try:
        for pod in pods:
            await watchers.sync(pod.netns.name, check_follows=True)
        assert (len(watchers), watchers.sockets) == (3, 6)
        overrun = opener.opened[0]  # the first pod's nftables feed
        assert overrun.kind == "nft"
        overrun.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # ENOBUFS in the burst

        for i in range(5):  # blocks the event loop: the notifications pile up
            for pod in pods:
                pod.netns.exec("nft", "add", "chain", "inet", c.NAT_TABLE, f"storm{i}")
        async with asyncio.timeout(WAIT):
            await all_checked.wait()
        readable, _, _ = select.select(opener.opened, [], [], 0)
        assert readable == [], "a feed left notifications behind: each would be another check"
        assert sorted(checks) == sorted(p.netns.name for p in pods)
        leaving = pods[1].netns.name
        del records[PodUid(leaving)]
        await watchers.sync(leaving)
        assert (len(watchers), watchers.sockets) == (2, 4)
    finally:
        watchers.close()
        opener.close()
    assert watchers.sockets == 0
    assert all(feed.sock.fileno() == -1 for feed in opener.opened)


@pytest.mark.parametrize("new_sandbox", [False, True])
async def test_a_netns_found_by_the_run_is_checked_once_more_unless_a_cni_adds_sandbox(
    lab: Lab, new_sandbox: bool
) -> None:
    """A netns the run found is watched only after it: what changed in between is seen by one
    more check. A CNI ADD's new sandbox needs none: its runtime starts nothing in it before the
    ADD is answered, after the watch is open. Either way the netns is watched after the run."""
    pod = lab.add_pod("found")
    uid = PodUid(pod.netns.name)
    records = PodRecords(store=ClusterStore(), policy=EnrollmentPolicy(node_name="n"))
    records[uid] = PodRecord(pod=Pod(uid=uid, name="found", namespace="demo"))
    checks: list[str] = []
    opener = FeedOpener()
    watchers = NetnsWatchers(
        records=records,
        opener=opener,
        enqueue=checks.append,
        host_netns=lab.node.path,
        host_rules=False,
        new_sandbox=lambda asked: asked == uid and new_sandbox,
    )

    async def run_finding_the_netns() -> None:
        assert len(watchers) == 0  # not known before the run: nothing to watch yet
        record = records[uid]
        record.netns, record.netns_id = pod.path, netns_id(pod.path)

    try:
        await watchers.around(uid, run_finding_the_netns)
        assert (len(watchers), watchers.sockets) == (1, 2)
        assert checks == ([] if new_sandbox else [uid])
    finally:
        watchers.close()
        opener.close()
