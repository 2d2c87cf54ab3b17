"""The agent's CNI event server, over a real Unix socket with a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.fakes import FakeReconciler
from ztunnel_redirect.adapters.cnievents import (
    CniAddEvent,
    CniEventServer,
    InvalidCniEventError,
    parse_add_event,
)
from ztunnel_redirect.core.errors import ConfigError, RedirectError
from ztunnel_redirect.testing.netnslab import Lab

GOOD: dict[str, Any] = {
    "Netns": "/var/run/netns/cni-1234",
    "PodName": "web-0",
    "PodNamespace": "shop",
    "IPs": [{"Address": {"IP": "10.244.1.7"}}, {"Address": {"IP": "fd00:0:0::0:7"}}],
}


@pytest.fixture
async def server(run_dir: Path, fake: FakeReconciler) -> AsyncIterator[CniEventServer]:
    srv = CniEventServer(fake.on_add, socket_path=str(run_dir / "sub" / "pluginevent.sock"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def post(session: aiohttp.ClientSession, body: bytes | dict[str, Any]) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post("http://agent/cmdadd", data=data) as resp:
        return resp.status, await resp.text()


async def test_good_event_reaches_on_add_and_answers_200(
    client: aiohttp.ClientSession, fake: FakeReconciler
) -> None:
    status, _ = await post(client, GOOD)
    assert status == 200
    assert fake.events == [
        CniAddEvent(
            netns="/var/run/netns/cni-1234",
            pod_name="web-0",
            pod_namespace="shop",
            ips=("10.244.1.7", "fd00::7"),
        )
    ]


UID = "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80"
NO_SUCH_PROCESS_NETNS = "/proc/4194304/ns/net"
"""Above the kernel's largest pid: never a process (a live one could be in the host netns)."""


@pytest.mark.parametrize(
    ("uid", "expected"),
    [
        (None, None),
        (UID, UID),
        (UID.upper(), UID.upper()),
        # A static pod's UID as the kubelet knows it: the hash of its manifest.
        ("6d1f1e2e3c4b5a69788796a5b4c3d2e1", "6d1f1e2e3c4b5a69788796a5b4c3d2e1"),
    ],
    ids=["absent", "uuid", "upper-case", "static-pod-hash"],
)
async def test_pod_uid_is_passed_on_when_present(
    client: aiohttp.ClientSession, fake: FakeReconciler, uid: str | None, expected: str | None
) -> None:
    body = GOOD if uid is None else dict(GOOD, PodUID=uid)
    status, _ = await post(client, body)
    assert status == 200
    assert [e.pod_uid for e in fake.events] == [expected]


async def test_extra_fields_from_istio_plugins_are_ignored(
    client: aiohttp.ClientSession, fake: FakeReconciler
) -> None:
    # Istio's plugin sends Go's net.IPNet (IP + Mask) plus Interface and Gateway.
    body = dict(GOOD, IPs=[{"Address": {"IP": "10.1.1.1", "Mask": "////AA=="}, "Interface": 2}])
    body["Netns"] = NO_SUCH_PROCESS_NETNS
    status, _ = await post(client, body)
    assert status == 200
    assert fake.events[0].ips == ("10.1.1.1",)
    assert fake.events[0].netns == NO_SUCH_PROCESS_NETNS


def _with(**changes: Any) -> dict[str, Any]:
    body = dict(GOOD)
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return body


@pytest.mark.parametrize(
    "body",
    [dict(GOOD, IPs=None), _with(IPs=None), dict(GOOD, IPs=[])],
    ids=["null", "absent", "empty"],
)
async def test_an_event_without_ips_is_accepted_with_none(
    client: aiohttp.ClientSession, fake: FakeReconciler, body: dict[str, Any]
) -> None:
    # Istio's plugin sends `"IPs": null` when it has no prevResult: the pod's IPs come from the
    # API then, as for an empty list.
    status, _ = await post(client, body)
    assert status == 200
    assert [e.ips for e in fake.events] == [()]


BAD_PAYLOADS: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not json", b"{nope", "not JSON"),
    ("not utf-8", b"\xff\xfe\xfa", "not JSON"),
    ("list", b"[1, 2]", "JSON object"),
    ("no netns", _with(Netns=None), "Netns"),
    ("empty pod name", _with(PodName=""), "PodName"),
    ("namespace not a string", _with(PodNamespace=7), "PodNamespace"),
    ("IPs not a list", _with(IPs={"Address": {"IP": "10.0.0.1"}}), "IPs"),
    ("IP entry shape", _with(IPs=[{"IP": "10.0.0.1"}]), "IPs[0]"),
    ("not an IP", _with(IPs=[{"Address": {"IP": "10.0.0.300"}}]), "not an IP"),
    ("CIDR is not an IP", _with(IPs=[{"Address": {"IP": "10.0.0.1/24"}}]), "not an IP"),
    ("netns outside", _with(Netns="/etc/passwd"), "outside"),
    ("netns escapes with ..", _with(Netns="/proc/../etc/shadow"), "outside"),
    ("netns escapes deeper", _with(Netns="/var/run/netns/../../../root/x"), "outside"),
    ("netns relative", _with(Netns="proc/1/ns/net"), "absolute"),
    ("netns is the directory", _with(Netns="/run/netns/"), "outside"),
    ("netns with NUL", _with(Netns="/run/netns/a\x00b"), "absolute"),
    ("uid not a string", _with(PodUID=7), "PodUID"),
    ("uid empty", _with(PodUID=""), "PodUID"),
    ("uid not hex", _with(PodUID="web-0"), "PodUID"),
    ("uid with a slash", _with(PodUID="0b7a3f52/../x"), "PodUID"),
    ("uid with a newline", _with(PodUID=UID + "\n"), "PodUID"),
    ("uid double dash", _with(PodUID="0b7a--3f52"), "PodUID"),
    ("uid too long", _with(PodUID="a" * 65), "PodUID"),
]


@pytest.mark.parametrize(
    ("body", "reason"), [(b, r) for _, b, r in BAD_PAYLOADS], ids=[i for i, _, _ in BAD_PAYLOADS]
)
async def test_bad_payload_is_400_with_reason_and_never_reaches_on_add(
    client: aiohttp.ClientSession, fake: FakeReconciler, body: bytes | dict[str, Any], reason: str
) -> None:
    status, text = await post(client, body)
    assert status == 400
    assert reason in text
    assert fake.events == []
    # Still serving.
    assert (await post(client, GOOD))[0] == 200


@pytest.mark.parametrize(
    "netns",
    ["/proc/self/ns/net", "/proc//self/ns/net", f"/proc/{os.getpid()}/ns/net"],
    ids=["self", "double-slash", "pid"],
)
async def test_the_agents_own_netns_is_refused(
    client: aiohttp.ClientSession, fake: FakeReconciler, netns: str
) -> None:
    # The agent runs in the host's netns (hostNetwork), like /proc/1.
    status, text = await post(client, dict(GOOD, Netns=netns))
    assert status == 400
    assert "host's network namespace" in text
    assert fake.events == []


async def test_the_configured_host_netns_is_refused(
    run_dir: Path, fake: FakeReconciler, lab: Lab
) -> None:
    host, pod = lab.add_pod("host"), lab.add_pod("pod")
    srv = CniEventServer(fake.on_add, socket_path=str(run_dir / "h.sock"), host_netns=host.path)
    async with srv:
        connector = aiohttp.UnixConnector(path=srv.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            status, text = await post(session, dict(GOOD, Netns=host.path))
            assert status == 400
            assert "host's network namespace" in text
            assert (await post(session, dict(GOOD, Netns=pod.path)))[0] == 200
    assert [e.netns for e in fake.events] == [pod.path]


async def test_oversized_body_is_413(client: aiohttp.ClientSession, fake: FakeReconciler) -> None:
    body = _with(PodName="x" * (70 * 1024))
    status, _ = await post(client, body)
    assert status == 413
    assert fake.events == []
    assert (await post(client, GOOD))[0] == 200


async def test_wrong_method_and_path(client: aiohttp.ClientSession) -> None:
    async with client.get("http://agent/cmdadd") as resp:
        assert resp.status == 405
    async with client.post("http://agent/cmddel", data=b"{}") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RedirectError("netns /var/run/netns/cni-1234 vanished"), "netns /var/run/netns/cni-1234"),
        (ValueError("unexpected bug"), "ValueError: unexpected bug"),
    ],
)
async def test_on_add_failure_is_500_with_message(
    client: aiohttp.ClientSession, fake: FakeReconciler, error: Exception, expected: str
) -> None:
    fake.fail_with = error
    status, text = await post(client, GOOD)
    assert status == 500
    assert expected in text
    fake.fail_with = None
    assert (await post(client, GOOD))[0] == 200


async def test_slow_on_add_is_503_within_budget_and_finishes_in_background(
    run_dir: Path, fake: FakeReconciler
) -> None:
    fake.release = asyncio.Event()
    srv = CniEventServer(fake.on_add, socket_path=str(run_dir / "e.sock"), budget=0.3)
    await srv.start()
    try:
        connector = aiohttp.UnixConnector(path=srv.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            with capture_logs() as logs:
                # The work waits for `release`: only the budget can answer (bounded, not timed).
                async with asyncio.timeout(5):
                    status, text = await post(session, GOOD)
                assert status == 503
                assert "still setting up pod shop/web-0 after 0.3s" in text
                # The work was not cancelled: releasing it lets it finish, and that is logged.
                (work,) = [t for t in asyncio.all_tasks() if t.get_name() == "cni-add shop/web-0"]
                assert not work.done()
                fake.release.set()
                # The server's done-callback was registered first, so it has run when this returns.
                await asyncio.wait_for(work, timeout=5)
                assert fake.finished.is_set()
            assert any(e["event"] == "cni_add_finished_late" for e in logs)
            fake.release = None
            assert (await post(session, GOOD))[0] == 200
    finally:
        await srv.close()


async def test_close_cancels_background_work(run_dir: Path, fake: FakeReconciler) -> None:
    fake.release = asyncio.Event()
    srv = CniEventServer(fake.on_add, socket_path=str(run_dir / "c.sock"), budget=0.1)
    await srv.start()
    try:
        connector = aiohttp.UnixConnector(path=srv.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            assert (await post(session, GOOD))[0] == 503
    finally:
        await asyncio.wait_for(srv.close(), timeout=5)
    assert not fake.finished.is_set()


async def test_socket_is_0600_and_removed_on_close(run_dir: Path, fake: FakeReconciler) -> None:
    path = run_dir / "new" / "dir" / "pluginevent.sock"
    async with CniEventServer(fake.on_add, socket_path=str(path)):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert not path.exists()


async def test_stale_socket_is_replaced(run_dir: Path, fake: FakeReconciler) -> None:
    path = run_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stale.bind(str(path))
    finally:
        stale.close()  # the file stays: a dead agent's socket
    async with CniEventServer(fake.on_add, socket_path=str(path)) as srv:
        connector = aiohttp.UnixConnector(path=srv.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            assert (await post(session, GOOD))[0] == 200


async def test_closing_an_old_server_leaves_the_new_servers_socket(
    run_dir: Path, fake: FakeReconciler
) -> None:
    # A DaemonSet surge: the new agent replaces the socket file while the old one still listens.
    path = run_dir / "pluginevent.sock"
    old = CniEventServer(FakeReconciler().on_add, socket_path=str(path))
    await old.start()
    try:
        async with CniEventServer(fake.on_add, socket_path=str(path)) as new:
            await old.close()
            assert path.is_socket()
            connector = aiohttp.UnixConnector(path=new.socket_path)
            async with aiohttp.ClientSession(connector=connector) as session:
                assert (await post(session, GOOD))[0] == 200
            assert len(fake.events) == 1
        assert not path.exists()
    finally:
        await old.close()


async def test_refuses_to_remove_a_regular_file(run_dir: Path, fake: FakeReconciler) -> None:
    path = run_dir / "not-a-socket"
    path.write_text("precious")
    srv = CniEventServer(fake.on_add, socket_path=str(path))
    with pytest.raises(ConfigError, match="not a socket"):
        await srv.start()
    assert path.read_text() == "precious"


def test_parse_honours_configured_directories() -> None:
    body = json.dumps(dict(GOOD, Netns="/host/run/netns/x")).encode()
    with pytest.raises(InvalidCniEventError, match="outside"):
        parse_add_event(body)
    event = parse_add_event(body, allowed_netns_dirs=["/host/run/netns"])
    assert event.netns == "/host/run/netns/x"
    # A sibling directory sharing the prefix is not inside.
    sibling = json.dumps(dict(GOOD, Netns="/host/run/netns-evil/x")).encode()
    with pytest.raises(InvalidCniEventError, match="outside"):
        parse_add_event(sibling, allowed_netns_dirs=["/host/run/netns"])


def test_relative_allowed_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        CniEventServer(FakeReconciler().on_add, allowed_netns_dirs=["run/netns"])


async def test_every_answer_to_an_add_is_reported_with_its_status(
    run_dir: Path, fake: FakeReconciler
) -> None:
    """What `istio_cni_plugin_requests_total{response_code}` counts."""
    statuses: list[int] = []
    srv = CniEventServer(
        fake.on_add, socket_path=str(run_dir / "r.sock"), on_response=statuses.append
    )
    async with srv:
        connector = aiohttp.UnixConnector(path=srv.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            assert (await post(session, GOOD))[0] == 200
            assert (await post(session, b"not json"))[0] == 400
            assert (await post(session, _with(PodName="x" * (70 * 1024))))[0] == 413
            fake.fail_with = RedirectError("no netns")
            assert (await post(session, GOOD))[0] == 500
            async with session.get("http://agent/cmdadd") as resp:
                assert resp.status == 405  # not an add event: not reported
    assert statuses == [200, 400, 413, 500]
