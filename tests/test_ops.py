"""Metrics, readiness and the ops HTTP server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import prometheus_client
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_redirect.adapters.kube import KubeApiError, RestartReason
from ztunnel_redirect.adapters.ops import (
    CniInstallResult,
    FailureReason,
    Held,
    Metrics,
    OpsServer,
    Readiness,
    ReadinessCondition,
    ReconcileKind,
    WatchEventType,
)
from ztunnel_redirect.app.agent import Agent
from ztunnel_redirect.core.drift import DriftKind
from ztunnel_redirect.core.errors import (
    CapabilityError,
    ConfigError,
    KernelError,
    NetnsNotFoundError,
    NotFoundError,
    RedirectError,
    RetryableError,
    retryable,
)
from ztunnel_redirect.core.settings import Settings

TIMEOUT = aiohttp.ClientTimeout(total=5)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Health:
    healthy: bool = True
    error: Exception | None = None

    def __call__(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.healthy


@dataclass
class Ops:
    server: OpsServer
    metrics: Metrics
    readiness: Readiness
    health: Health
    http: aiohttp.ClientSession

    async def get(self, port: int, path: str, **headers: str) -> tuple[int, str, str]:
        url = f"http://127.0.0.1:{port}{path}"
        async with self.http.get(url, headers=headers) as response:
            return response.status, await response.text(), response.headers["Content-Type"]

    async def readyz(self) -> tuple[int, str]:
        status, text, _ = await self.get(self.server.readiness_port, "/readyz")
        return status, text

    async def healthz(self) -> tuple[int, str]:
        status, text, _ = await self.get(self.server.readiness_port, "/healthz")
        return status, text

    async def scrape(self) -> Samples:
        status, text, content_type = await self.get(self.server.metrics_port, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        return parse(text)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    metrics = Metrics()
    readiness = Readiness()
    health = Health()
    server = OpsServer(
        metrics=metrics,
        readiness=readiness,
        healthy=health,
        host="127.0.0.1",
        readiness_port=0,
        metrics_port=0,
    )
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            yield Ops(server, metrics, readiness, health, http)
    finally:
        await server.close()


async def test_readyz_lists_pending_conditions_until_all_are_done(ops: Ops) -> None:
    status, text = await ops.readyz()
    assert status == 503
    assert text.splitlines()[1:] == [
        "initial_lists",
        "host_rules",
        "ztunnel_server",
        "startup_verification",
        "cni",
    ]
    ops.readiness.done(ReadinessCondition.INITIAL_LISTS)
    ops.readiness.done("host_rules")
    status, text = await ops.readyz()
    assert status == 503
    assert text.splitlines()[1:] == ["ztunnel_server", "startup_verification", "cni"]

    ops.readiness.done(ReadinessCondition.ZTUNNEL_SERVER)
    ops.readiness.done(ReadinessCondition.STARTUP_VERIFICATION)
    ops.readiness.done(ReadinessCondition.CNI)
    assert await ops.readyz() == (200, "ready\n")


def test_the_agent_waits_for_exactly_the_documented_conditions_in_their_order() -> None:
    """`ReadinessCondition` is what operators read (and `/readyz` names): the agent's readiness
    is built from it, so the two cannot disagree."""
    agent = Agent(Settings(node_name="n"))
    assert agent.readiness.pending() == tuple(ReadinessCondition)


async def test_readyz_says_why_a_condition_is_blocked_until_it_is_done(ops: Ops) -> None:
    ops.readiness.blocked("host_rules", "the CNI plugin cannot run on this host: exec format")
    ops.readiness.blocked(ReadinessCondition.INITIAL_LISTS, "first reason")
    ops.readiness.blocked(ReadinessCondition.INITIAL_LISTS, "latest reason")
    status, text = await ops.readyz()
    assert status == 503
    reasons = {
        "initial_lists": "latest reason",
        "host_rules": "the CNI plugin cannot run on this host: exec format",
    }
    assert text.splitlines()[1:] == [
        f"{name}: {reasons[name]}" if name in reasons else name for name in ops.readiness.pending()
    ]
    ops.readiness.done("host_rules")
    ops.readiness.blocked("host_rules", "too late: it is done")
    assert ops.readiness.reason("host_rules") is None
    assert "host_rules" not in (await ops.readyz())[1]


async def test_readyz_goes_back_to_503_when_a_condition_is_lost(ops: Ops) -> None:
    for condition in ReadinessCondition:
        ops.readiness.done(condition)
    assert (await ops.readyz())[0] == 200
    ops.readiness.lost(ReadinessCondition.ZTUNNEL_SERVER)
    status, text = await ops.readyz()
    assert status == 503
    assert text.splitlines()[1:] == ["ztunnel_server"]


async def test_healthz_follows_the_health_callback(ops: Ops) -> None:
    assert await ops.healthz() == (200, "ok\n")
    ops.health.healthy = False
    assert (await ops.healthz())[0] == 503
    ops.health.healthy = True
    ops.health.error = RuntimeError("task table broken")
    assert (await ops.healthz())[0] == 503


async def test_healthz_does_not_depend_on_readiness(ops: Ops) -> None:
    assert not ops.readiness.ready
    assert (await ops.healthz())[0] == 200


async def test_metrics_report_recorded_values(ops: Ops) -> None:
    m = ops.metrics
    m.set_pods_enrolled(3)
    m.observe_reconcile(ReconcileKind.ADD, 0.0004)
    m.observe_reconcile(ReconcileKind.ADD, 0.002)
    m.observe_reconcile(ReconcileKind.CHECK, 0.00005)
    m.count_repair(DriftKind.MISSING_RULE)
    m.count_repair(DriftKind.MISSING_RULE, 2)
    m.count_repair(DriftKind.MISSING_TABLE)
    m.count_failure(NetnsNotFoundError("gone"))
    m.count_failure(FailureReason.KERNEL)
    m.count_failure(KubeApiError("503 from the API", status=503))
    m.mark_pass(1_700_000_000.5)
    m.count_watch_restart("pods", RestartReason.EXPIRED)
    m.count_watch_restart("pods", RestartReason.EXPIRED)
    m.count_watch_restart("namespaces", RestartReason.STREAM_ENDED)
    m.set_ztunnel_connections(1)
    m.observe_cni_add(0.03)
    m.count_replay_refused()

    s = await ops.scrape()
    p = "ztunnel_redirect_"
    assert value(s, f"{p}pods_enrolled") == 3

    assert value(s, f"{p}reconcile_duration_seconds_count", kind="add") == 2
    assert math.isclose(value(s, f"{p}reconcile_duration_seconds_sum", kind="add"), 0.0024)
    assert value(s, f"{p}reconcile_duration_seconds_bucket", kind="add", le="0.0005") == 1
    assert value(s, f"{p}reconcile_duration_seconds_bucket", kind="add", le="0.0025") == 2
    assert value(s, f"{p}reconcile_duration_seconds_bucket", kind="check", le="0.0001") == 1
    assert value(s, f"{p}reconcile_duration_seconds_count", kind="remove") == 0
    assert value(s, f"{p}reconcile_duration_seconds_count", kind="host") == 0

    assert value(s, f"{p}drift_repairs_total", reason="missing_rule") == 3
    assert value(s, f"{p}drift_repairs_total", reason="missing_table") == 1
    assert value(s, f"{p}drift_repairs_total", reason="missing_ip_rule") == 0

    assert value(s, f"{p}failures_total", reason="netns_not_found") == 1
    assert value(s, f"{p}failures_total", reason="kernel") == 1
    assert value(s, f"{p}failures_total", reason="retryable") == 1
    assert value(s, f"{p}failures_total", reason="unexpected") == 0

    assert value(s, f"{p}last_successful_pass_timestamp_seconds") == 1_700_000_000.5
    assert value(s, f"{p}api_watch_restarts_total", resource="pods", reason="expired") == 2
    assert (
        value(s, f"{p}api_watch_restarts_total", resource="namespaces", reason="stream_ended") == 1
    )
    assert value(s, f"{p}ztunnel_connections") == 1
    assert value(s, f"{p}cni_add_duration_seconds_count") == 1
    assert value(s, f"{p}cni_add_duration_seconds_bucket", le="0.025") == 0
    assert value(s, f"{p}cni_add_duration_seconds_bucket", le="0.05") == 1
    assert value(s, f"{p}batch_replays_refused_total") == 1


async def test_every_metric_is_exposed_from_the_start(ops: Ops) -> None:
    names = {name for name, _ in await ops.scrape()}
    for name in (
        "ztunnel_redirect_pods_enrolled",
        "ztunnel_redirect_reconcile_duration_seconds_bucket",
        "ztunnel_redirect_drift_repairs_total",
        "ztunnel_redirect_failures_total",
        "ztunnel_redirect_last_successful_pass_timestamp_seconds",
        "ztunnel_redirect_ztunnel_connections",
        "ztunnel_redirect_cni_add_duration_seconds_bucket",
        "ztunnel_redirect_batch_replays_refused_total",
        "istio_cni_install_ready",
        "istio_cni_installs_total",
        "istio_cni_plugin_requests_total",
        "nodeagent_reconcile_events_total",
        "ztunnel_connected",
    ):
        assert name in names, name


async def test_istios_metrics_have_istios_names_labels_and_meanings(ops: Ops) -> None:
    m = ops.metrics
    s = await ops.scrape()
    assert value(s, "istio_cni_install_ready") == 0, "not ready before the first install"
    for result in CniInstallResult:
        assert value(s, "istio_cni_installs_total", result=result.value) == 0
    for code in ("200", "400", "413", "500", "503"):
        assert value(s, "istio_cni_plugin_requests_total", response_code=code) == 0
    for event_type in ("add", "update", "delete"):
        assert value(s, "nodeagent_reconcile_events_total", type=event_type) == 0

    m.cni_install_verified(installed=True)
    m.cni_install_verified(installed=False)
    s = await ops.scrape()
    assert value(s, "istio_cni_install_ready") == 1
    assert value(s, "istio_cni_installs_total", result="SUCCESS") == 1

    m.cni_install_failed(CniInstallResult.CREATE_CNI_CONFIG_FAILURE)
    m.count_plugin_request(200)
    m.count_plugin_request(200)
    m.count_plugin_request(503)
    m.count_watch_event("pods", WatchEventType.ADD)
    m.count_watch_event("namespaces", "update")
    m.count_watch_event("pods", "update")
    m.count_watch_event("pods", "delete")
    m.set_ztunnel_connections(2)
    s = await ops.scrape()
    assert value(s, "istio_cni_install_ready") == 0
    assert value(s, "istio_cni_installs_total", result="CREATE_CNI_CONFIG_FAILURE") == 1
    assert value(s, "istio_cni_installs_total", result="SUCCESS") == 1
    assert value(s, "istio_cni_plugin_requests_total", response_code="200") == 2
    assert value(s, "istio_cni_plugin_requests_total", response_code="503") == 1
    assert value(s, "nodeagent_reconcile_events_total", type="add") == 1
    assert value(s, "nodeagent_reconcile_events_total", type="update") == 2
    assert value(s, "nodeagent_reconcile_events_total", type="delete") == 1
    assert value(s, "ztunnel_connected") == 2
    assert value(s, "ztunnel_redirect_ztunnel_connections") == 2
    with pytest.raises(ValueError, match="resync"):
        m.count_watch_event("pods", "resync")


async def test_ztunnel_gauges_can_follow_the_live_count(ops: Ops) -> None:
    live = [1]
    ops.metrics.follow_ztunnel_connections(lambda: live[0])
    s = await ops.scrape()
    assert (value(s, "ztunnel_connected"), value(s, "ztunnel_redirect_ztunnel_connections")) == (
        1,
        1,
    )
    live[0] = 0
    ops.metrics.set_ztunnel_connections(5)  # a pass's figure no longer counts
    s = await ops.scrape()
    assert value(s, "ztunnel_connected") == 0
    assert value(s, "ztunnel_redirect_ztunnel_connections") == 0


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (PermissionError(13, "denied", "/host/opt/cni/bin/.tmp-x"), "COPY_BINARIES_FAILURE"),
        (
            OSError(28, "no space", "/host/opt/cni/bin/ztunnel-redirect-cni"),
            "COPY_BINARIES_FAILURE",
        ),
        (
            OSError(30, "read-only", "/host/etc/cni/net.d/10-calico.conflist"),
            "CREATE_CNI_CONFIG_FAILURE",
        ),
        (ConfigError("10-calico.conflist: not valid JSON"), "CREATE_CNI_CONFIG_FAILURE"),
        (RetryableError("CNI config kept changing"), "CREATE_CNI_CONFIG_FAILURE"),
        (OSError(5, "I/O error"), "CREATE_CNI_CONFIG_FAILURE"),
    ],
)
def test_an_install_failure_is_classified_by_the_file_it_names(
    error: BaseException, result: str
) -> None:
    assert CniInstallResult.of(error, bin_dir="/host/opt/cni/bin/").value == result


async def test_pass_timestamp_defaults_to_now(ops: Ops) -> None:
    before = time.time()
    ops.metrics.mark_pass()
    after = time.time()
    stamp = value(await ops.scrape(), "ztunnel_redirect_last_successful_pass_timestamp_seconds")
    assert before <= stamp <= after


async def test_metrics_negotiates_openmetrics(ops: Ops) -> None:
    status, text, content_type = await ops.get(
        ops.server.metrics_port, "/metrics", Accept="application/openmetrics-text"
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


async def test_each_port_serves_only_its_paths(ops: Ops) -> None:
    assert (await ops.get(ops.server.readiness_port, "/metrics"))[0] == 404
    assert (await ops.get(ops.server.metrics_port, "/readyz"))[0] == 404
    assert (await ops.get(ops.server.metrics_port, "/healthz"))[0] == 404
    assert ops.server.readiness_port != ops.server.metrics_port


def test_recorders_take_enum_values_as_text_but_only_known_ones() -> None:
    m = Metrics()
    m.observe_reconcile("remove", 0.001)
    m.count_repair("missing_ip_rule")
    m.count_failure("kernel")
    m.count_watch_restart("pods", "expired")
    get = m.registry.get_sample_value
    assert get("ztunnel_redirect_reconcile_duration_seconds_count", {"kind": "remove"}) == 1
    assert get("ztunnel_redirect_drift_repairs_total", {"reason": "missing_ip_rule"}) == 1
    assert get("ztunnel_redirect_failures_total", {"reason": "kernel"}) == 1
    labels = {"resource": "pods", "reason": "expired"}
    assert get("ztunnel_redirect_api_watch_restarts_total", labels) == 1
    with pytest.raises(ValueError):
        m.observe_reconcile("upsert", 0.001)
    with pytest.raises(ValueError):
        m.count_repair("gremlins")
    # A failure is always counted, even under a word of the caller's: it is an error path.
    m.count_failure("drift_pass")
    assert get("ztunnel_redirect_failures_total", {"reason": "drift_pass"}) == 1


def test_held_objects_are_read_at_each_scrape() -> None:
    m = Metrics()
    held = [3]
    m.follow_held(Held.POD_RECORDS, lambda: held[0])
    get = m.registry.get_sample_value
    assert get("ztunnel_redirect_held_objects", {"kind": "pod_records"}) == 3
    held[0] = 0
    assert get("ztunnel_redirect_held_objects", {"kind": "pod_records"}) == 0


def test_metrics_use_their_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.set_pods_enrolled(5)
    assert first.registry.get_sample_value("ztunnel_redirect_pods_enrolled") == 5
    assert second.registry.get_sample_value("ztunnel_redirect_pods_enrolled") == 0
    assert prometheus_client.REGISTRY.get_sample_value("ztunnel_redirect_pods_enrolled") is None


class _Retryable(RetryableError):
    pass


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NetnsNotFoundError("x"), FailureReason.NETNS_NOT_FOUND),
        (NotFoundError("x"), FailureReason.NOT_FOUND),
        (KernelError("x"), FailureReason.KERNEL),
        (CapabilityError("x"), FailureReason.CAPABILITY),
        (ConfigError("x"), FailureReason.CONFIG),
        (_Retryable("x"), FailureReason.RETRYABLE),
        (TimeoutError(), FailureReason.TIMEOUT),
        (RedirectError("x"), FailureReason.OTHER),
        (ValueError("x"), FailureReason.UNEXPECTED),
    ],
)
def test_failures_are_classified_by_error_type(error: Exception, reason: FailureReason) -> None:
    assert FailureReason.of(error) is reason


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConfigError("invalid pod IP"), False),
        (CapabilityError("no libnftables"), False),
        (NetnsNotFoundError("x"), True),
        (KernelError("x"), True),
        (_Retryable("x"), True),
        (ValueError("a bug, maybe a race: tried again"), True),
    ],
)
def test_only_errors_that_can_heal_are_retried(error: Exception, *, retried: bool) -> None:
    assert retryable(error) is retried


def test_work_given_up_is_counted_by_class() -> None:
    m = Metrics()
    m.count_given_up(ConfigError("invalid pod UID"))
    get = m.registry.get_sample_value
    assert get("ztunnel_redirect_given_up_total", {"reason": "config"}) == 1
    assert get("ztunnel_redirect_given_up_total", {"reason": "capability"}) == 0


async def test_wait_ready_returns_once_all_are_done() -> None:
    readiness = Readiness(["a", "b"])
    waiter = asyncio.create_task(readiness.wait_ready(), name="wait-ready")
    try:
        readiness.done("a")
        done, _ = await asyncio.wait({waiter}, timeout=0)
        assert not done
        readiness.done("b")
        await asyncio.wait_for(waiter, timeout=5)
        assert readiness.ready
    finally:
        waiter.cancel()


def test_readiness_bookkeeping() -> None:
    readiness = Readiness(["a", "b"])
    assert readiness.pending() == ("a", "b")
    readiness.done("b")
    readiness.done("b")
    assert readiness.pending() == ("a",)
    assert not readiness.ready
    with pytest.raises(ValueError, match="unknown"):
        readiness.done("c")
    assert Readiness([]).ready


def test_becoming_ready_is_logged_once_with_the_details_whatever_the_order() -> None:
    enrolled = [0]
    readiness = Readiness(["a", "b"], details=lambda: {"pods_enrolled": enrolled[0]})
    with structlog.testing.capture_logs() as logs:
        readiness.done("b")
        enrolled[0] = 3
        readiness.done("a")
        readiness.done("a")
    ready = [e for e in logs if e["event"] == "agent_ready"]
    assert ready == [{"event": "agent_ready", "log_level": "info", "pods_enrolled": 3}]


async def test_busy_port_is_a_config_error_and_nothing_stays_bound() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = OpsServer(
            metrics=Metrics(),
            readiness=Readiness(),
            host="127.0.0.1",
            readiness_port=0,
            metrics_port=port,
        )
        try:
            with pytest.raises(ConfigError, match=str(port)):
                await server.start()
            with pytest.raises(RuntimeError):
                _ = server.readiness_port
        finally:
            await server.close()


def test_same_port_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        OpsServer(metrics=Metrics(), readiness=Readiness(), readiness_port=9000, metrics_port=9000)


async def test_close_stops_listening_and_is_idempotent() -> None:
    server = OpsServer(
        metrics=Metrics(), readiness=Readiness(), host="127.0.0.1", readiness_port=0, metrics_port=0
    )
    async with server:
        port = server.readiness_port
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            assert response.status == 200
    await server.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
