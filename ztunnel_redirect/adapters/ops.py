"""The operations surface: Prometheus metrics, readiness, and their HTTP server (docs/design.md
§10).

- `Metrics` owns one `CollectorRegistry` (never the global one, so tests and several agents in one
  process do not share series) and small typed methods to record each metric: callers pass enums
  and numbers, never label strings. Labels with a known, bounded set of values are created at
  start, so a rate over them is 0 rather than absent on a fresh agent.
- `Readiness` is a set of named conditions that the agent marks done as it rebuilds its state
  (`ReadinessCondition`: lists synced, host rules in place, ztunnel server listening, pods
  verified, CNI plugin installed); it is ready when all are done.
- `OpsServer` serves `/healthz` and `/readyz` on the readiness port and `/metrics` on the metrics
  port, as Istio's CNI agent does (8000 and 15014).

Besides ours (`ztunnel_redirect_*`), `Metrics` exports Istio's CNI agent metrics under Istio's
names, labels and meanings, so that an operator's dashboards and alerts keep working:
`istio_cni_install_ready`, `istio_cni_installs_total{result}`,
`istio_cni_plugin_requests_total{response_code}`, `nodeagent_reconcile_events_total{type}` and
`ztunnel_connected`.

`/healthz` answers 200 while `healthy()` says the agent's root tasks run, else 503: the kubelet's
liveness probe restarts an agent whose loop is wedged. `/readyz` answers 200 `ready` once every
condition is done, else 503 with the pending conditions, one per line.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Self

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from ztunnel_redirect.core import constants
from ztunnel_redirect.core.drift import DriftKind
from ztunnel_redirect.core.errors import (
    CapabilityError,
    ConfigError,
    KernelError,
    NetnsNotFoundError,
    NotFoundError,
    RedirectError,
    RetryableError,
)

__all__ = [
    "DURATION_BUCKETS",
    "PLUGIN_RESPONSE_CODES",
    "CniInstallResult",
    "FailureReason",
    "Held",
    "Metrics",
    "OpsServer",
    "Readiness",
    "ReadinessCondition",
    "ReconcileKind",
    "WatchEventType",
]

log = structlog.get_logger(__name__)

DURATION_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""0.1 ms (a check that finds nothing to do) to 5 s (the CNI plugin's whole budget)."""

_PREFIX: Final = "ztunnel_redirect"


class ReconcileKind(enum.Enum):
    """What one reconcile did; the `kind` label of the reconcile duration."""

    ADD = "add"
    """A pod enrolled (or re-enrolled): rules installed."""
    REMOVE = "remove"
    """A pod left the mesh: rules removed."""
    CHECK = "check"
    """An enrolled pod's rules read back and compared (and repaired if they drifted)."""
    HOST = "host"
    """The host's probe SNAT rules and sets."""


class FailureReason(enum.Enum):
    """Bounded classes of failure; the `reason` label of the failures counter."""

    NETNS_NOT_FOUND = "netns_not_found"
    NOT_FOUND = "not_found"
    KERNEL = "kernel"
    CAPABILITY = "capability"
    CONFIG = "config"
    RETRYABLE = "retryable"
    TIMEOUT = "timeout"
    OTHER = "other"
    """Another error of ours (`RedirectError`)."""
    UNEXPECTED = "unexpected"
    """Not one of our errors: a bug, or a library exception that escaped translation."""

    @classmethod
    def of(cls, error: BaseException) -> FailureReason:
        """The class of `error`, by its nearest known base class."""
        for base in type(error).__mro__:
            reason = _REASON_BY_ERROR.get(base)
            if reason is not None:
                return reason
        return cls.UNEXPECTED


_REASON_BY_ERROR: Final[dict[type[BaseException], FailureReason]] = {
    NetnsNotFoundError: FailureReason.NETNS_NOT_FOUND,
    NotFoundError: FailureReason.NOT_FOUND,
    KernelError: FailureReason.KERNEL,
    CapabilityError: FailureReason.CAPABILITY,
    ConfigError: FailureReason.CONFIG,
    RetryableError: FailureReason.RETRYABLE,
    TimeoutError: FailureReason.TIMEOUT,
    RedirectError: FailureReason.OTHER,
}


class CniInstallResult(enum.Enum):
    """The `result` label of `istio_cni_installs_total`: Istio's values."""

    SUCCESS = "SUCCESS"
    COPY_BINARIES_FAILURE = "COPY_BINARIES_FAILURE"
    READ_SERVICE_ACCOUNT_FAILURE = "READ_SERVICE_ACCOUNT_FAILURE"
    CREATE_KUBECONFIG_FAILURE = "CREATE_KUBECONFIG_FAILURE"
    CREATE_CNI_CONFIG_FAILURE = "CREATE_CNI_CONFIG_FAILURE"

    @classmethod
    def of(cls, error: BaseException, *, bin_dir: str) -> CniInstallResult:
        """The install step that `error` failed, by the file it names: the plugin binary's
        directory; anything else (an unusable primary config, one that kept changing, a write in
        the config directory) is the config. The agent writes no kubeconfig and reads no service
        account for the plugin, so Istio's two results for those never occur."""
        filename = getattr(error, "filename", None)
        if isinstance(filename, str) and filename.startswith(bin_dir.rstrip("/") + "/"):
            return cls.COPY_BINARIES_FAILURE
        return cls.CREATE_CNI_CONFIG_FAILURE


class WatchEventType(enum.Enum):
    """The `type` label of `nodeagent_reconcile_events_total`: Istio's informer event types."""

    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"


PLUGIN_RESPONSE_CODES: Final = (200, 400, 413, 500, 503)
"""What the CNI event server answers the plugin (`cnievents`); created at start."""


class Held(enum.Enum):
    """What the agent keeps in memory per pod or per piece of work: each count follows the pods
    on the node and returns to its level when they are gone (a count that only grows is a leak;
    the soak, `testing.soak`, reads them)."""

    POD_RECORDS = "pod_records"
    """The reconciler's records of enrolled pods."""
    PODS = "pods"
    """Pods of this node known from the API."""
    DELETED_PODS = "deleted_pods"
    """Pods gone from the API whose cleanup has not run yet."""
    SANDBOXES = "sandboxes"
    """Sandboxes reported by a CNI ADD that the reconciler has not taken yet."""
    QUEUE_KEYS = "queue_keys"
    """Keys the work queue holds any state for (queued, running, retrying, failure counts)."""
    STATUS_WRITES = "status_writes"
    """Pods whose redirection status is decided but not written to the API yet."""
    ASYNCIO_TASKS = "asyncio_tasks"
    """Tasks of the agent's event loop not done yet."""


class Metrics:
    """The agent's Prometheus metrics, on a registry of their own."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry: Final = CollectorRegistry() if registry is None else registry
        r = self.registry
        self._pods_enrolled = Gauge(
            f"{_PREFIX}_pods_enrolled",
            "Pods whose traffic is redirected to ztunnel on this node.",
            registry=r,
        )
        self._reconcile_duration = Histogram(
            f"{_PREFIX}_reconcile_duration_seconds",
            "Time to reconcile one pod (or the host), by what was done.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._drift_repairs = Counter(
            f"{_PREFIX}_drift_repairs",
            "Differences between the kernel and the desired rules that were repaired, by kind.",
            ["reason"],
            registry=r,
        )
        self._failures = Counter(
            f"{_PREFIX}_failures",
            "Reconciles that failed, by class of error (retried unless counted as given up).",
            ["reason"],
            registry=r,
        )
        self._given_up = Counter(
            f"{_PREFIX}_given_up",
            "Reconciles that failed with an error that cannot heal by itself (bad input or "
            "settings, a missing capability): not retried until the pod changes, by class.",
            ["reason"],
            registry=r,
        )
        self._last_pass = Gauge(
            f"{_PREFIX}_last_successful_pass_timestamp_seconds",
            "Unix time at which a periodic pass last ended within its period, every enrolled pod "
            "checked once (pods that failed are counted in ztunnel_redirect_failures_total).",
            registry=r,
        )
        self._watch_restarts = Counter(
            f"{_PREFIX}_api_watch_restarts",
            "Kubernetes list/watch loops that started over, by resource and reason.",
            ["resource", "reason"],
            registry=r,
        )
        self._ztunnel_connections = Gauge(
            f"{_PREFIX}_ztunnel_connections",
            "ztunnel processes connected to the agent (ZDS).",
            registry=r,
        )
        self._snapshot_nacks = Counter(
            f"{_PREFIX}_ztunnel_snapshot_nacks",
            "Workloads that ztunnel refused inside a snapshot. As in Istio they are only logged "
            "and counted: the pod stays enabled and in the host sets (ztunnel retries it).",
            registry=r,
        )
        self._replays_refused = Counter(
            f"{_PREFIX}_batch_replays_refused",
            "New pod tables installed through libnftables because the kernel refused the "
            "recorded netlink batch (slower, same result).",
            registry=r,
        )
        self._cni_add_duration = Histogram(
            f"{_PREFIX}_cni_add_duration_seconds",
            "Time from a CNI ADD event's arrival to its answer to the plugin.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._held = Gauge(
            f"{_PREFIX}_held_objects",
            "Objects the agent holds in memory, by kind (pod records, pods, deleted pods awaiting "
            "cleanup, sandboxes, work-queue keys, asyncio tasks); read at each scrape.",
            ["kind"],
            registry=r,
        )
        for kind in ReconcileKind:
            self._reconcile_duration.labels(kind=kind.value)
        for drift in DriftKind:
            self._drift_repairs.labels(reason=drift.value)
        for reason in FailureReason:
            self._failures.labels(reason=reason.value)
            self._given_up.labels(reason=reason.value)
        self._istio_metrics(r)

    def _istio_metrics(self, r: CollectorRegistry) -> None:
        """Istio's CNI agent metrics: its names, labels, help and meanings."""
        self._cni_install_ready = Gauge(
            "istio_cni_install_ready",
            "Whether the CNI plugin installation is ready or not",
            registry=r,
        )
        self._cni_installs = Counter(
            "istio_cni_installs",
            "Total number of CNI plugins installed by the Istio CNI installer",
            ["result"],
            registry=r,
        )
        self._plugin_requests = Counter(
            "istio_cni_plugin_requests",
            "CNI plugin add-event requests handled by the node agent, by HTTP response code",
            ["response_code"],
            registry=r,
        )
        self._reconcile_events = Counter(
            "nodeagent_reconcile_events",
            "The total number of node agent reconcile events.",
            ["type"],
            registry=r,
        )
        self._ztunnel_connected = Gauge(
            "ztunnel_connected", "number of connections to ztunnel", registry=r
        )
        for result in CniInstallResult:
            self._cni_installs.labels(result=result.value)
        for code in PLUGIN_RESPONSE_CODES:
            self._plugin_requests.labels(response_code=str(code))
        for event_type in WatchEventType:
            self._reconcile_events.labels(type=event_type.value)

    def set_pods_enrolled(self, count: int) -> None:
        self._pods_enrolled.set(count)

    # The recorders also take an enum's value as text (what `reconciler.Observer` and
    # `kube.Watcher`'s `on_restart` pass); for kinds and repairs, text outside the enum is a bug
    # and raises ValueError, so label sets stay bounded.

    def observe_reconcile(self, kind: ReconcileKind | str, seconds: float) -> None:
        self._reconcile_duration.labels(kind=ReconcileKind(kind).value).observe(seconds)

    def count_repair(self, reason: DriftKind | str, count: int = 1) -> None:
        """`count` differences of kind `reason` were repaired."""
        self._drift_repairs.labels(reason=DriftKind(reason).value).inc(count)

    def count_failure(self, reason: FailureReason | BaseException | str) -> None:
        """One failure. Best pass the exception: it is classified by its type (`FailureReason`).

        Unlike the other recorders this never raises, since it runs on error paths: text that is
        not a `FailureReason` value is taken as the label as it is (keep it to a fixed word, such
        as "drift_pass").
        """
        if isinstance(reason, BaseException):
            reason = FailureReason.of(reason)
        label = reason.value if isinstance(reason, FailureReason) else str(reason)
        self._failures.labels(reason=label).inc()

    def count_given_up(self, error: BaseException) -> None:
        """Work dropped without retry because of `error` (see `errors.retryable`)."""
        self._given_up.labels(reason=FailureReason.of(error).value).inc()

    def mark_pass(self, at: float | None = None) -> None:
        """A periodic pass checked every pod once in time; `at` is Unix time, default now."""
        self._last_pass.set(time.time() if at is None else at)

    def count_watch_restart(self, resource: str, reason: enum.Enum | str) -> None:
        """A list/watch of `resource` ("pods") restarted; `reason` is a `kube.RestartReason`."""
        label = reason.value if isinstance(reason, enum.Enum) else reason
        self._watch_restarts.labels(resource=resource, reason=str(label)).inc()

    def set_ztunnel_connections(self, count: int) -> None:
        """Ours and Istio's `ztunnel_connected` (both read `live` instead once it is followed)."""
        self._ztunnel_connections.set(count)
        self._ztunnel_connected.set(count)

    def follow_ztunnel_connections(self, live: Callable[[], int]) -> None:
        """Both ztunnel gauges read `live()` at each scrape from now on: a ztunnel that
        disconnects shows at the next scrape, as Istio's gauge does, not at the next pass."""
        self._ztunnel_connections.set_function(live)
        self._ztunnel_connected.set_function(live)

    def follow_held(self, kind: Held, count: Callable[[], int]) -> None:
        """`ztunnel_redirect_held_objects{kind}` reads `count()` at each scrape (on the event
        loop, which serves /metrics)."""
        self._held.labels(kind=kind.value).set_function(count)

    def count_snapshot_nack(self) -> None:
        self._snapshot_nacks.inc()

    def count_replay_refused(self) -> None:
        self._replays_refused.inc()

    def observe_cni_add(self, seconds: float) -> None:
        self._cni_add_duration.observe(seconds)

    def count_plugin_request(self, status: int) -> None:
        """The agent answered a CNI plugin's add event with HTTP `status`."""
        self._plugin_requests.labels(response_code=str(status)).inc()

    def count_watch_event(self, _resource: str, event_type: WatchEventType | str) -> None:
        """One pod or namespace event reached the store (what Istio's informer queue counts);
        the resource is not a label there, so not here either."""
        self._reconcile_events.labels(type=WatchEventType(event_type).value).inc()

    def cni_install_verified(self, *, installed: bool) -> None:
        """Our plugin is in place; `installed`: this check (re)installed it or was the first."""
        self._cni_install_ready.set(1)
        if installed:
            self._cni_installs.labels(result=CniInstallResult.SUCCESS.value).inc()

    def cni_install_failed(self, result: CniInstallResult) -> None:
        """Installing the plugin failed at the step `result` names; not ready until it works."""
        self._cni_install_ready.set(0)
        self._cni_installs.labels(result=result.value).inc()


class ReadinessCondition(enum.StrEnum):
    """What the agent must have done before it is ready, in the order it does them: the one
    list of conditions (the agent's `Readiness` is built from it, `/readyz` names them)."""

    INITIAL_LISTS = "initial_lists"
    """The first list of pods and namespaces is complete (nothing is written before)."""
    HOST_RULES = "host_rules"
    """The host's probe SNAT rules and sets are in place."""
    ZTUNNEL_SERVER = "ztunnel_server"
    """The ZDS socket is listening for ztunnel."""
    STARTUP_VERIFICATION = "startup_verification"
    """Every pod was handled once: rules read back (and repaired, if so configured)."""
    CNI = "cni"
    """The CNI plugin is in the primary CNI's config (done at once without --install-cni)."""


def _no_details() -> Mapping[str, object]:
    return {}


class Readiness:
    """Named conditions; ready when every one is done. Use from the event loop's thread.

    Becoming ready is logged here, once each time (`agent_ready`), whatever order the conditions
    are done in; `details` adds what the agent wants said on that line (e.g. the pod count).
    """

    def __init__(
        self,
        conditions: Iterable[str] = tuple(ReadinessCondition),
        *,
        details: Callable[[], Mapping[str, object]] = _no_details,
    ) -> None:
        self._done: dict[str, bool] = dict.fromkeys((str(c) for c in conditions), False)
        self._why: dict[str, str] = {}
        """Why a pending condition cannot be met yet, where the agent knows (shown by /readyz)."""
        self._details = details
        self._ready = asyncio.Event()
        if not self._done:
            self._ready.set()

    def _check(self, condition: str) -> str:
        name = str(condition)
        if name not in self._done:
            raise ValueError(f"unknown readiness condition {name!r}")
        return name

    def done(self, condition: str) -> None:
        """`condition` holds now; idempotent."""
        name = self._check(condition)
        if self._done[name]:
            return
        self._done[name] = True
        self._why.pop(name, None)
        log.info("readiness_condition_done", condition=name)
        if all(self._done.values()):
            self._ready.set()
            log.info("agent_ready", **self._details())

    def lost(self, condition: str) -> None:
        """`condition` no longer holds (e.g. the ZDS server stopped): not ready until redone."""
        name = self._check(condition)
        if not self._done[name]:
            return
        self._done[name] = False
        self._ready.clear()
        log.warning("readiness_condition_lost", condition=name)

    def blocked(self, condition: str, reason: str) -> None:
        """`condition` is pending for `reason` (e.g. the CNI plugin cannot run on this host),
        until it is done."""
        name = self._check(condition)
        if not self._done[name]:
            self._why[name] = reason

    def reason(self, condition: str) -> str | None:
        """Why `condition` is pending, if the agent said."""
        return self._why.get(self._check(condition))

    @property
    def ready(self) -> bool:
        return all(self._done.values())

    def pending(self) -> tuple[str, ...]:
        """Conditions not yet done, in the order they were given."""
        return tuple(name for name, done in self._done.items() if not done)

    async def wait_ready(self) -> None:
        """Return once every condition is done."""
        await self._ready.wait()


def _always_healthy() -> bool:
    return True


class OpsServer:
    """HTTP: `/healthz` and `/readyz` on the readiness port, `/metrics` on the metrics port.

    Ports may be 0 (tests): the bound ports are `readiness_port`/`metrics_port` after `start()`.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        readiness: Readiness,
        healthy: Callable[[], bool] = _always_healthy,
        host: str = "0.0.0.0",  # noqa: S104 - the kubelet and Prometheus reach the pod IP
        readiness_port: int = constants.READINESS_PORT,
        metrics_port: int = constants.METRICS_PORT,
    ) -> None:
        if readiness_port == metrics_port and readiness_port != 0:
            raise ConfigError(
                f"The readiness and metrics ports are both {readiness_port}; they must differ."
            )
        self._metrics = metrics
        self._readiness = readiness
        self._healthy = healthy
        self._host = host
        self._requested = (readiness_port, metrics_port)
        self._runners: list[web.AppRunner] = []
        self._ports: tuple[int, int] | None = None

    @property
    def readiness_port(self) -> int:
        return self._bound()[0]

    @property
    def metrics_port(self) -> int:
        return self._bound()[1]

    def _bound(self) -> tuple[int, int]:
        if self._ports is None:
            raise RuntimeError("OpsServer is not started")
        return self._ports

    async def start(self) -> None:
        """Listen on both ports; `ConfigError` when a port cannot be bound."""
        if self._runners:
            raise RuntimeError("OpsServer is already started")
        probes = web.Application()
        probes.router.add_get("/healthz", self._healthz)
        probes.router.add_get("/readyz", self._readyz)
        scrape = web.Application()
        scrape.router.add_get("/metrics", self._scrape)
        try:
            ports = (
                await self._serve(probes, self._requested[0]),
                await self._serve(scrape, self._requested[1]),
            )
        except BaseException:
            await self.close()
            raise
        self._ports = ports
        log.info(
            "ops_server_started",
            host=self._host,
            readiness_port=ports[0],
            metrics_port=ports[1],
        )

    async def _serve(self, app: web.Application, port: int) -> int:
        # No access log: the kubelet probes every few seconds.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self._host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"Cannot listen on {self._host} port {port}: {exc.strerror or exc}."
            ) from exc
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening; safe to call more than once."""
        runners, self._runners = self._runners, []
        self._ports = None
        for runner in runners:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _healthz(self, _request: web.Request) -> web.Response:
        try:
            healthy = self._healthy()
        except Exception:
            log.exception("health_check_failed")
            healthy = False
        if healthy:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="unhealthy\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        pending = self._readiness.pending()
        if not pending:
            return web.Response(text="ready\n")
        body = "not ready, pending:\n" + "".join(
            f"{name}: {why}\n" if (why := self._readiness.reason(name)) else f"{name}\n"
            for name in pending
        )
        return web.Response(status=503, text=body)

    async def _scrape(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(
            body=encode(self._metrics.registry), headers={"Content-Type": content_type}
        )
