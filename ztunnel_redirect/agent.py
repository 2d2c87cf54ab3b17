"""The node agent: builds the concrete objects and runs the root tasks (the wiring layer).

Start-up follows "readiness means state has been rebuilt" (STYLE.md):
capabilities probed → ops server → initial lists complete (nothing is written before) →
pods this agent enrolled before are adopted with their netns from the /proc scan → host rules
with every enrolled pod's IP → ztunnel server (snapshot) → pod workers verify every pod once (and
repair only what drifted; a pod that fails is retried, it does not hold start-up) → CNI event
server → plugin install (waits for the primary CNI's config, which may come later at node boot;
nothing else waits for it) → ready → periodic drift pass.

Root tasks run in one TaskGroup: when one dies, all stop and the process exits non-zero.
SIGTERM stops cleanly and leaves every rule in place (an upgrade must not disturb traffic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import signal
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import structlog

from ztunnel_redirect import hostrules, nft, procscan
from ztunnel_redirect.cnievents import CniAddEvent, CniEventServer
from ztunnel_redirect.cniinstall import CniInstaller, CniKeeper
from ztunnel_redirect.constants import MIRROR_ANNOTATION
from ztunnel_redirect.decisions import DecisionFile, DecisionKeeper, agent_pods_of
from ztunnel_redirect.enrollment import EnrollmentPolicy
from ztunnel_redirect.errors import ConfigError, RedirectError, RetryableError
from ztunnel_redirect.hostrules import HostRules
from ztunnel_redirect.kube import ApiClient, KubeClient, Watcher, load_client
from ztunnel_redirect.migration import IptablesMigration
from ztunnel_redirect.model import HostOptions, Pod, PodUid
from ztunnel_redirect.netns import NetnsRunner
from ztunnel_redirect.ops import Metrics, OpsServer, Readiness
from ztunnel_redirect.podrules import KernelForms, PodRules
from ztunnel_redirect.reconciler import (
    HOST_KEY,
    ClusterState,
    Reconciler,
    enrolled_by_annotation,
)
from ztunnel_redirect.settings import Settings
from ztunnel_redirect.workqueue import KeyedQueue, Periodic
from ztunnel_redirect.zds import Workload, ZtunnelServer

log = structlog.get_logger(__name__)

NETNS_WORKERS = 2
"""Threads doing kernel work. Each call is short and mostly Python: more threads only contend
for the GIL (a drift pass over 300 pods cost 335 ms CPU with 2, 589 ms with 8). Pods are still
reconciled `workers` at a time; they queue here only for the kernel part."""

STARTUP_VERIFICATION_BUDGET = 60.0
"""Readiness waits at most this long for the start-up pass (one run of each pod); pods still
failing are retried."""

CONDITIONS = ("initial_lists", "host_rules", "ztunnel_server", "startup_verification", "cni")


class ProcLocator:
    """Finds a running pod's netns with the /proc scan (SPEC §7), off the event loop.

    A scan reads every process of the node. Labelling a namespace enrolls all its running pods
    at once, and one scan per pod made that O(pods x processes) (300 pods: ~9 s here, each scan
    run by 8 workers in parallel). So one scan looks for every pod that `candidates` names (to be
    enrolled, netns not known yet), one at a time, and keeps what it found for the others. A kept
    match is used once, and only while it is still the same process (start time and netns inode
    unchanged: a pid reused by another process is never taken for the pod's).
    """

    def __init__(
        self,
        finder: procscan.NetnsFinder,
        *,
        candidates: Callable[[], Mapping[PodUid, Collection[str]]] = dict,
    ) -> None:
        self._finder = finder
        self._candidates = candidates
        self._found: dict[PodUid, procscan.NetnsMatch] = {}
        self._scanning = asyncio.Lock()

    async def locate(self, pod: Pod) -> str | None:
        async with self._scanning:
            match = self._found.pop(pod.uid, None)
            if match is not None and await asyncio.to_thread(_same_process, match):
                return match.path
            wanted = {**self._candidates(), pod.uid: pod.ips}
            found = await asyncio.to_thread(self._finder.find_all, wanted)
            match = found.pop(pod.uid, None)
            self._found = found
        return None if match is None else match.path


def _same_process(match: procscan.NetnsMatch) -> bool:
    """Whether the process a scan found is still there, unchanged (same start time, same netns)."""
    key = procscan.netns_key(match.path)
    try:
        stat = (Path(match.path).parent.parent / "stat").read_text()
    except OSError:
        return False
    return (
        key is not None
        and key[1] == match.inode
        and procscan.parse_start_time(stat) == match.start_time
    )


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.readiness = Readiness(CONDITIONS, details=self._ready_details)
        self._healthy = True
        self._parts: _Parts | None = None
        self._host_migration_due = True
        """Istio's host rules may still be there (postponed until our sets cover its pods)."""

    def _ready_details(self) -> dict[str, object]:
        """What `agent_ready` says besides the fact."""
        return {"pods_enrolled": 0 if self._parts is None else len(self._parts.reconciler.records)}

    def policy(self) -> EnrollmentPolicy:
        s = self.settings
        return EnrollmentPolicy(
            node_name=s.node_name,
            exclude_namespaces=s.exclude_namespaces,
            system_namespace=s.system_namespace,
            agent_namespace=s.pod_namespace,
            dns_capture=s.dns_capture,
            ipv6=s.ipv6,
            probe_snat_v4=s.probe_snat_v4,
            probe_snat_v6=s.probe_snat_v6,
        )

    def _kubelet_uid(self) -> int:
        if self.settings.kubelet_uid is not None:
            return self.settings.kubelet_uid
        uid = procscan.kubelet_uid(proc_root=self.settings.proc_root)
        if uid is None:
            raise ConfigError(
                f"no kubelet process found in {self.settings.proc_root}: "
                "set KUBELET_UID (--kubelet-uid) or mount the host's /proc"
            )
        return uid

    async def run(self) -> None:
        s = self.settings
        ops = OpsServer(
            metrics=self.metrics,
            readiness=self.readiness,
            healthy=lambda: self._healthy,
            host=s.bind_address,
            readiness_port=s.readiness_port,
            metrics_port=s.metrics_port,
        )
        with NetnsRunner(workers=NETNS_WORKERS) as runner:
            await runner.run(None, nft.probe)
            host_options = HostOptions(
                kubelet_uid=self._kubelet_uid(),
                ipv6=s.ipv6,
                probe_snat_v4=s.probe_snat_v4,
                probe_snat_v6=s.probe_snat_v6,
            )
            api = await load_client(kubeconfig=s.kubeconfig)
            await ops.start()
            try:
                async with api:
                    await self._serve(api, runner, host_options)
            finally:
                self._healthy = False
                await ops.close()

    async def _serve(self, api: ApiClient, runner: NetnsRunner, host_options: HostOptions) -> None:
        parts = self._parts = self._build(api, runner, host_options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_raise_when(stop), name="signals")
                tasks.create_task(parts.watcher.run(), name="kube-watch")
                tasks.create_task(self._start(parts, tasks), name="startup")
        except* _Stop:
            log.info("agent_stopping", reason="signal", rules="left in place")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await parts.cni.close()
            await parts.zds.close()

    def _build(self, api: ApiClient, runner: NetnsRunner, host_options: HostOptions) -> _Parts:
        s = self.settings
        finder = procscan.NetnsFinder(
            addresses_of=procscan.runner_addresses(runner), proc_root=s.proc_root
        )

        async def reconcile(key: str) -> None:
            await reconciler.reconcile(key)

        queue: KeyedQueue[str] = KeyedQueue(
            handler=reconcile,
            concurrency=s.workers,
            on_failure=lambda _key, exc, _attempts: self.metrics.count_failure(exc),
            name="pods",
            log_key="pod_uid",
        )
        # An API change is a real change: it cuts a scheduled retry short (a pod in backoff that
        # leaves the mesh or is deleted is acted on at once, not after up to 30 s). The drift
        # pass enqueues without `now`, so failing pods keep their backoff.
        policy = self.policy()
        decisions = DecisionKeeper(
            DecisionFile(
                Path(s.decision_file),
                policy,
                agent_pods=agent_pods_of(s.agent_namespace, s.pod_name),
            ),
            lambda: (state.pods, state.namespaces),
        )

        def changed(key: str) -> None:
            queue.enqueue(key, now=True)
            decisions.changed()

        state = ClusterState(changed)
        kube = KubeClient(api)

        def unlocated() -> dict[PodUid, tuple[str, ...]]:
            """Pods to enroll whose netns is not known yet (looked for in one scan)."""
            return {
                uid: pod.ips
                for uid, pod in state.pods.items()
                if pod.ips
                and (uid not in reconciler.records or reconciler.records[uid].netns is None)
                and policy.decide(pod, state.namespaces.get(pod.namespace)).enrolled
            }

        def snapshot() -> list[Workload]:
            # A ztunnel just connected. Pods it had not accepted yet wait out a retry backoff
            # of up to 30 s, pending and without their host set entry (probes): retry them now.
            # Their Add is queued behind this snapshot on the new connection.
            for uid, record in reconciler.records.items():
                if not record.acked:
                    queue.enqueue(uid, now=True)
            return [Workload(*workload) for workload in reconciler.workloads()]

        zds = ZtunnelServer(
            path=s.ztunnel_uds,
            snapshot=snapshot,
            on_snapshot_nack=lambda uid, _error: reconciler.snapshot_nacked(uid),
        )
        migration = IptablesMigration(runner)
        reconciler = Reconciler(
            state=state,
            policy=policy,
            pod_rules=PodRules(runner, on_replay_refused=self.metrics.count_replay_refused),
            host_rules=HostRules(runner, netns=s.host_netns),
            host_options=host_options,
            ztunnel=zds,
            status=kube,
            locator=ProcLocator(finder, candidates=unlocated),
            observer=self.metrics,
            migration=migration,
            repair_on_startup=s.reconcile_on_startup,
        )
        watcher = Watcher(
            api=api, node_name=s.node_name, store=state, on_restart=self.metrics.count_watch_restart
        )

        async def on_cni_add(event: CniAddEvent) -> None:
            await self._cni_add(event, state, kube, reconciler)

        cni = CniEventServer(
            on_cni_add,
            socket_path=s.plugin_event_socket,
            allowed_netns_dirs=s.allowed_netns_dirs,
            host_netns=s.host_netns,
        )
        return _Parts(
            state,
            queue,
            reconciler,
            finder,
            watcher,
            zds,
            cni,
            self._installer(),
            migration,
            host_options,
            policy,
            decisions,
        )

    async def _start(self, parts: _Parts, tasks: asyncio.TaskGroup) -> None:
        await parts.watcher.synced.wait()
        self.readiness.done("initial_lists")
        log.info("initial_lists_synced", pods=len(parts.state.pods))
        parts.decisions.start()  # the CNI plugin's fallback, from a complete view only

        await self._adopt(parts.state, parts.reconciler, parts.finder)
        await parts.reconciler.reconcile(HOST_KEY)
        self.readiness.done("host_rules")

        await parts.zds.start()
        self.readiness.done("ztunnel_server")

        tasks.create_task(parts.queue.run(), name="pod-workers")
        await self._verify_at_startup(parts)
        self.readiness.done("startup_verification")
        # Enrolled pods' IPs are in our host set now: Istio's probe SNAT can go (once it holds
        # no pod of this node that ours does not; else a later pass tries again).
        await self._migrate_host(parts)

        await parts.cni.start()
        if parts.installer is None:
            self.readiness.done("cni")
        else:
            keeper = CniKeeper(
                parts.installer,
                period=self.settings.reconcile_period,
                on_installed=lambda: self.readiness.done("cni"),
                on_failure=self._cni_failed,
            )
            tasks.create_task(keeper.run(), name="cni-install")

        periodic = Periodic(
            tick=lambda: self._drift_pass(parts),
            period=self.settings.reconcile_period,
            on_failure=lambda _exc: self.metrics.count_failure("drift_pass"),
            name="drift-pass",
        )
        tasks.create_task(periodic.run(), name="drift-pass")

    def _cni_failed(self, exc: Exception) -> None:
        """Our CNI config could not be put in place: counted, and /readyz says why."""
        self.metrics.count_failure("cni_config")
        self.readiness.blocked("cni", str(exc))

    async def _verify_at_startup(self, parts: _Parts) -> None:
        """Every pod the initial lists brought and every adopted one, handled once."""
        keys = [*parts.state.pods, *parts.state.deleted, *parts.reconciler.records]
        try:
            async with asyncio.timeout(STARTUP_VERIFICATION_BUDGET):
                failed = await parts.queue.handle_once(keys)
        except TimeoutError:
            log.warning(
                "startup_verification_incomplete",
                reason="budget exceeded",
                budget_s=STARTUP_VERIFICATION_BUDGET,
            )
            return
        if failed:
            log.warning(
                "startup_verification_incomplete", reason="pods failed", retrying=len(failed)
            )

    async def _migrate_host(self, parts: _Parts) -> None:
        """Istio's host rules go once our sets cover its pods of this node; postponed until then
        (the drift pass calls again), dropped for good after a failure."""
        if not self._host_migration_due:
            return
        install = functools.partial(
            hostrules.apply_here,
            parts.host_options,
            parts.reconciler.host_elements(),
            KernelForms(),
        )
        try:
            report = await parts.migration.migrate_host(
                self.settings.host_netns, install, node_ips=_ips_to_enroll(parts)
            )
        except RedirectError as exc:
            self.metrics.count_failure("migration")
            log.warning("istio_host_migration_failed", reason=str(exc))
            self._host_migration_due = False
            return
        self._host_migration_due = bool(report.postponed)

    async def _drift_pass(self, parts: _Parts) -> None:
        """Check every enrolled pod and the host once; only what drifted gets written.

        The pass waits for one run of each, not for pods waiting out a retry backoff (they count
        as failed): one failing pod must not hold every other pod's repair beyond a period.
        """
        started = time.monotonic()
        keys = [*parts.reconciler.records, HOST_KEY]
        try:
            async with asyncio.timeout(self.settings.reconcile_period):
                failed = await parts.queue.handle_once(keys)
        except TimeoutError:
            log.warning(
                "drift_pass_slow", pods=len(keys) - 1, period_s=self.settings.reconcile_period
            )
            return
        self.metrics.set_ztunnel_connections(parts.zds.live_connections)
        self.metrics.mark_pass(time.time())
        await self._migrate_host(parts)
        # One line per period: the heartbeat that shows every enrolled pod is being verified.
        log.info(
            "drift_pass_done",
            pods=len(parts.reconciler.records),
            failed=len(failed),
            duration_ms=round((time.monotonic() - started) * 1e3, 3),
        )

    async def _adopt(
        self, state: ClusterState, reconciler: Reconciler, finder: procscan.NetnsFinder
    ) -> None:
        """Rebuild what a previous run enrolled: annotated pods, netns by one /proc scan."""
        previous = enrolled_by_annotation(state.pods.values())
        if not previous:
            return
        found = await asyncio.to_thread(finder.find_all, {p.uid: p.ips for p in previous})
        for pod in previous:
            match = found.get(pod.uid)
            reconciler.adopt(pod, None if match is None else match.path)
        log.info("pods_adopted", pods=len(previous), netns_found=len(found))

    async def _cni_add(
        self, event: CniAddEvent, state: ClusterState, kube: KubeClient, reconciler: Reconciler
    ) -> None:
        started = time.perf_counter()
        pod = state.find(event.pod_namespace, event.pod_name)
        if pod is None or not _same_pod(pod, event.pod_uid):
            # The cache may still hold the namesake this sandbox replaces (a StatefulSet pod
            # deleted and recreated): the API has the new one.
            pod = await kube.get_pod(event.pod_namespace, event.pod_name)
        if pod is None:
            raise RetryableError(f"pod {event.pod_namespace}/{event.pod_name} not found in the API")
        if not _same_pod(pod, event.pod_uid):
            raise RetryableError(
                f"pod {event.pod_namespace}/{event.pod_name} is {pod.uid} in the API; "
                f"the sandbox is for {event.pod_uid}"
            )
        if event.pod_namespace not in state.namespaces:
            namespace = await kube.get_namespace(event.pod_namespace)
            if namespace is not None:
                state.namespaces[namespace.name] = namespace
        pod = dataclasses.replace(pod, ips=event.ips or pod.ips)
        try:
            await reconciler.add_from_cni(pod, event.netns)
        finally:
            self.metrics.observe_cni_add(time.perf_counter() - started)

    def _installer(self) -> CniInstaller | None:
        s = self.settings
        if not s.install_cni:
            return None
        return CniInstaller(
            bin_dir=s.cni_bin_dir,
            conf_dir=s.cni_conf_dir,
            plugin_source=s.cni_plugin_binary,
            plugin_config={
                "plugin_event_socket": s.plugin_event_socket,
                "exclude_namespaces": sorted(s.exclude_namespaces),
            },
            conf_name=s.cni_conf_name,
            chained=s.chained_cni_plugin,
            owned_conf_name=s.istio_owned_cni_conf_filename if s.istio_owned_cni_config else None,
        )


def _ips_to_enroll(parts: _Parts) -> set[str]:
    """The IPs of this node's pods that are to be enrolled (whether they are yet or not)."""
    state = parts.state
    return {
        ip
        for pod in state.pods.values()
        if parts.policy.decide(pod, state.namespaces.get(pod.namespace)).enrolled
        for ip in pod.ips
    }


class _Stop(Exception):
    """Ends the root task group on a signal."""


async def _raise_when(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stop


@dataclasses.dataclass(frozen=True)
class _Parts:
    """The agent's concrete objects, built once and wired together."""

    state: ClusterState
    queue: KeyedQueue[str]
    reconciler: Reconciler
    finder: procscan.NetnsFinder
    watcher: Watcher
    zds: ZtunnelServer
    cni: CniEventServer
    installer: CniInstaller | None
    migration: IptablesMigration
    host_options: HostOptions
    policy: EnrollmentPolicy
    decisions: DecisionKeeper


async def run(settings: Settings) -> None:
    await Agent(settings).run()


def _same_pod(pod: Pod, uid: str | None) -> bool:
    """Is `pod` the one the runtime's `K8S_POD_UID` names? Static pods: the kubelet's UID is the
    manifest hash, kept on the mirror pod's annotation."""
    return uid is None or pod.uid == uid or pod.annotations.get(MIRROR_ANNOTATION) == uid
