"""The node agent: builds the concrete objects and runs the root tasks (the wiring layer).

Start-up follows "readiness means state has been rebuilt" (STYLE.md):
capabilities probed → ops server → initial lists complete (nothing is written before) →
pods this agent enrolled before are adopted with their netns from the /proc scan → host rules
with every enrolled pod's IP → ztunnel server (snapshot) → pod workers verify every pod once (and
repair only what drifted; a pod that fails is retried, it does not hold start-up) → CNI event
server → plugin install (waits for the primary CNI's config, which may come later at node boot;
nothing else waits for it) → ready → periodic drift pass, a backstop: drift is found by kernel
notifications, watched in each netns from the first run of its pod (or of the host) on.

Root tasks run in one TaskGroup: when one dies, all stop and the process exits non-zero.
SIGTERM stops cleanly and leaves every rule in place (an upgrade must not disturb traffic).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import structlog

from ztunnel_redirect.adapters.cnievents import CniEventServer
from ztunnel_redirect.adapters.cniinstall import CniInstaller, CniKeeper
from ztunnel_redirect.adapters.cnilogs import PluginLogServer
from ztunnel_redirect.adapters.decisions import DecisionFile, DecisionKeeper, agent_pods_of
from ztunnel_redirect.adapters.kube import ApiClient, KubeClient, Watcher, load_client
from ztunnel_redirect.adapters.ops import (
    CniInstallResult,
    Held,
    Metrics,
    OpsServer,
    Readiness,
    ReadinessCondition,
)
from ztunnel_redirect.adapters.zds import Workload, ZtunnelServer
from ztunnel_redirect.control.cniadd import CniAdd, PodStarts
from ztunnel_redirect.control.driftpass import DriftPass
from ztunnel_redirect.control.hosthandover import HostHandover
from ztunnel_redirect.control.locator import ProcLocator
from ztunnel_redirect.control.reconciler import HOST_KEY, Reconciler
from ztunnel_redirect.control.records import PodRecords
from ztunnel_redirect.control.startup import Startup
from ztunnel_redirect.control.statuswrites import QueuedStatusWriter
from ztunnel_redirect.control.store import ClusterStore
from ztunnel_redirect.control.watchers import NetnsWatchers
from ztunnel_redirect.control.workqueue import KeyedQueue, Periodic
from ztunnel_redirect.core.enrollment import EnrollmentPolicy
from ztunnel_redirect.core.errors import ConfigError, retryable
from ztunnel_redirect.core.model import HostOptions
from ztunnel_redirect.core.settings import Settings
from ztunnel_redirect.kernel import nft, notify, procscan
from ztunnel_redirect.kernel.hostrules import HostRules
from ztunnel_redirect.kernel.migration import IptablesMigration
from ztunnel_redirect.kernel.netns import NetnsRunner, name_this_thread
from ztunnel_redirect.kernel.podrules import PodRules

log = structlog.get_logger(__name__)

NETNS_WORKERS: Final = 2
"""Threads doing kernel work. Each call is short and mostly Python: more threads only contend
for the GIL. Pods are still reconciled `workers` at a time; they queue here only for the kernel
part."""
IO_WORKERS: Final = 4
"""Threads of the event loop's default executor (`asyncio.to_thread`: the /proc scan, file
writes); named `zr-io_<n>` in /proc."""

PODS_PLANNED: Final = 5000
"""Pods whose notification sockets the fd limit is raised for: more than a kubelet runs (110 by
default; the benchmark goes to 1000)."""
FD_LIMIT_WANTED: Final = 1024 + notify.FDS_PER_POD * PODS_PLANNED
"""The soft RLIMIT_NOFILE asked for at start (the agent's own fds fit in the first 1024)."""


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.readiness = Readiness(ReadinessCondition, details=self._ready_details)
        self._healthy = True
        self._parts: _Parts | None = None

    def _ready_details(self) -> dict[str, object]:
        """What `agent_ready` says besides the fact."""
        return {"pods_enrolled": 0 if self._parts is None else len(self._parts.records)}

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
            enablement_selectors=s.enablement_selectors,
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
        _raise_fd_limit()
        ops = OpsServer(
            metrics=self.metrics,
            readiness=self.readiness,
            healthy=lambda: self._healthy,
            host=s.bind_address,
            readiness_port=s.readiness_port,
            metrics_port=s.metrics_port,
        )
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                max_workers=IO_WORKERS, thread_name_prefix="zr-io", initializer=name_this_thread
            )
        )
        with NetnsRunner(workers=NETNS_WORKERS) as runner:
            await runner.run(None, nft.probe)
            host_options = HostOptions(
                kubelet_uid=self._kubelet_uid(),
                ipv6=s.ipv6,
                probe_snat_v4=s.probe_snat_v4,
                probe_snat_v6=s.probe_snat_v6,
                aws_branch_eni_probe=s.aws_branch_eni_probe,
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
            # First: the plugin's lines while the agent starts (its ADDs that fail) matter most.
            await parts.plugin_logs.start()
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
            await parts.plugin_logs.close()
            await parts.zds.close()
            parts.watchers.close()
            parts.opener.close()

    def _build(self, api: ApiClient, runner: NetnsRunner, host_options: HostOptions) -> _Parts:
        """Every part, each built from parts built before it (keyword arguments only). The one
        edge back, from the store to the queue that runs the reconciler on its changes, is a
        subscription made once both exist."""
        s = self.settings
        policy = self.policy()
        store = ClusterStore()
        records = PodRecords(store=store, policy=policy)
        finder = procscan.NetnsFinder(
            addresses_of=procscan.runner_addresses(runner), proc_root=s.proc_root
        )
        locator = ProcLocator(finder=finder, candidates=records.unlocated)
        zds = ZtunnelServer(
            path=s.ztunnel_uds,
            snapshot=functools.partial(_snapshot, records),
            on_snapshot_nack=lambda _uid, _error: self.metrics.count_snapshot_nack(),
            on_snapshot_unsent=lambda uid, _error: records.snapshot_unsent(uid),
        )
        self.metrics.follow_ztunnel_connections(lambda: zds.live_connections)
        kube = KubeClient(api)
        pod_starts = PodStarts()
        statuses = QueuedStatusWriter(
            kube, on_failure=self._count_failure, yield_to=pod_starts.quiet
        )
        migration = IptablesMigration(runner)
        host_rules = HostRules(runner, netns=s.host_netns)
        reconciler = Reconciler(
            store=store,
            records=records,
            policy=policy,
            pod_rules=PodRules(runner, on_replay_refused=self.metrics.count_replay_refused),
            host_rules=host_rules,
            host_options=host_options,
            ztunnel=zds,
            status=statuses,
            locator=locator,
            observer=self.metrics,
            migration=migration,
            repair_on_startup=s.reconcile_on_startup,
        )
        opener = notify.FeedOpener()

        async def reconcile_and_watch(key: str) -> None:
            await watchers.around(key, functools.partial(reconciler.reconcile, key))

        queue = KeyedQueue[str](
            handler=reconcile_and_watch,
            concurrency=s.workers,
            retryable=retryable,
            on_failure=self._count_failure,
            name="pods",
            log_key="pod_uid",
        )
        # A kernel notification of a change to our rules is a reason to check, not a change of
        # what is desired: it waits out a pod's retry backoff like a pass does.
        watchers = NetnsWatchers(
            records=records,
            opener=opener,
            enqueue=queue.enqueue,
            host_netns=s.host_netns,
            host_rules=s.aws_branch_eni_probe,
            new_sandbox=store.has_sandbox,
        )
        # Every store change is a real change: it cuts a scheduled retry short (a pod in backoff
        # that leaves the mesh or is deleted is acted on at once, not after up to 30 s). The
        # drift pass enqueues without `now`, so failing pods keep their backoff.
        decisions = DecisionKeeper(
            DecisionFile(
                Path(s.decision_file),
                policy,
                agent_pods=agent_pods_of(s.agent_namespace, s.pod_name),
            ),
            lambda: (store.pods, store.namespaces),
            yield_to=pod_starts.quiet,
        )

        def changed(key: str) -> None:
            queue.enqueue(key, now=True)
            decisions.changed()

        store.subscribe(changed)
        loop = asyncio.get_running_loop()
        for kind, count in (
            (Held.POD_RECORDS, lambda: len(records)),
            (Held.PODS, lambda: len(store.pods)),
            (Held.DELETED_PODS, lambda: len(store.deleted)),
            (Held.SANDBOXES, lambda: store.sandboxes),
            (Held.QUEUE_KEYS, lambda: queue.keys_held),
            (Held.STATUS_WRITES, lambda: statuses.pending),
            (Held.ASYNCIO_TASKS, lambda: len(asyncio.all_tasks(loop))),
        ):
            self.metrics.follow_held(kind, count)
        handover = HostHandover(
            reconciler=reconciler,
            store=store,
            policy=policy,
            host_rules=host_rules,
            migration=migration,
            host_options=host_options,
            netns=s.host_netns,
            observer=self.metrics,
        )
        cni_add = CniAdd(
            store=store,
            api=kube,
            policy=policy,
            queue=queue,
            records=records,
            observe=self.metrics.observe_cni_add,
            starts=pod_starts,
        )
        return _Parts(
            store=store,
            records=records,
            queue=queue,
            statuses=statuses,
            reconciler=reconciler,
            watcher=Watcher(
                api=api,
                node_name=s.node_name,
                store=store,
                on_restart=self.metrics.count_watch_restart,
                on_event=self.metrics.count_watch_event,
            ),
            zds=zds,
            cni=CniEventServer(
                cni_add.handle,
                socket_path=s.plugin_event_socket,
                allowed_netns_dirs=s.allowed_netns_dirs,
                host_netns=s.host_netns,
                on_response=self.metrics.count_plugin_request,
            ),
            plugin_logs=PluginLogServer(socket_path=s.plugin_log_socket),
            installer=self._installer(),
            startup=Startup(store=store, records=records, locator=locator, queue=queue),
            drift_pass=DriftPass(
                queue=queue,
                records=records,
                handover=handover,
                observer=self.metrics,
                ztunnel=zds,
                period=s.reconcile_period,
            ),
            handover=handover,
            decisions=decisions,
            watchers=watchers,
            opener=opener,
        )

    def _count_failure(self, _key: str, exc: BaseException, _attempts: int) -> None:
        self.metrics.count_failure(exc)
        if not retryable(exc):
            self.metrics.count_given_up(exc)

    async def _start(self, parts: _Parts, tasks: asyncio.TaskGroup) -> None:
        """The order of "readiness means state has been rebuilt" (see the module docstring)."""
        await parts.watcher.synced.wait()
        self.readiness.done(ReadinessCondition.INITIAL_LISTS)
        log.info("initial_lists_synced", pods=len(parts.store.pods))
        parts.decisions.start()  # the CNI plugin's fallback, from a complete view only

        await parts.startup.adopt()
        # The workers do not run yet: this is the only run of the host key.
        await parts.watchers.sync(HOST_KEY, check_follows=True)
        await parts.reconciler.reconcile(HOST_KEY)
        self.readiness.done(ReadinessCondition.HOST_RULES)

        await parts.zds.start()
        self.readiness.done(ReadinessCondition.ZTUNNEL_SERVER)

        tasks.create_task(parts.queue.run(), name="pod-workers")
        tasks.create_task(parts.statuses.run(), name="status-writes")
        await parts.startup.verify()
        self.readiness.done(ReadinessCondition.STARTUP_VERIFICATION)
        # Enrolled pods' IPs are in our host set now: Istio's probe SNAT can go (once it holds
        # no pod of this node that ours does not; else a later pass tries again).
        await parts.handover.run()

        await parts.cni.start()
        if parts.installer is None:
            self.readiness.done(ReadinessCondition.CNI)
            # Installed by someone else (INSTALL_CNI=false): not the agent's to report missing.
            self.metrics.cni_install_verified(installed=False)
        else:
            keeper = CniKeeper(
                parts.installer,
                period=self.settings.reconcile_period,
                on_installed=functools.partial(self.readiness.done, ReadinessCondition.CNI),
                on_failure=functools.partial(self._cni_install_failed, parts.installer),
                on_ensured=lambda installed: self.metrics.cni_install_verified(installed=installed),
            )
            tasks.create_task(keeper.run(), name="cni-install")

        periodic = Periodic(
            tick=parts.drift_pass.run_once,
            period=self.settings.reconcile_period,
            on_failure=lambda _exc: self.metrics.count_failure("drift_pass"),
            name="drift-pass",
        )
        tasks.create_task(periodic.run(), name="drift-pass")

    def _cni_install_failed(self, installer: CniInstaller, exc: Exception) -> None:
        """Our CNI config could not be put in place: counted, and /readyz says why."""
        self.metrics.count_failure("cni_config")
        self.readiness.blocked(ReadinessCondition.CNI, str(exc))
        self.metrics.cni_install_failed(CniInstallResult.of(exc, bin_dir=str(installer.bin_dir)))

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


def _raise_fd_limit() -> None:
    """Room for every pod's notification sockets; said at start, as the operator may need to
    raise the hard limit."""
    limit = notify.raise_fd_limit(FD_LIMIT_WANTED)
    if limit.enough:
        log.info("fd_limit", soft=limit.soft, hard=limit.hard, was=limit.was)
    else:
        log.warning(
            "fd_limit_low",
            soft=limit.soft,
            hard=limit.hard,
            was=limit.was,
            pods_watchable=max(0, (limit.soft - 1024) // notify.FDS_PER_POD),
        )


def _snapshot(records: PodRecords) -> list[Workload]:
    """Every enrolled pod, for a ztunnel that just connected."""
    return [Workload(*workload) for workload in records.snapshot()]


class _Stop(Exception):
    """Ends the root task group on a signal."""


async def _raise_when(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stop


@dataclasses.dataclass(frozen=True)
class _Parts:
    """The agent's concrete objects, built once and wired together."""

    store: ClusterStore
    records: PodRecords
    queue: KeyedQueue[str]
    statuses: QueuedStatusWriter
    reconciler: Reconciler
    watcher: Watcher
    zds: ZtunnelServer
    cni: CniEventServer
    plugin_logs: PluginLogServer
    installer: CniInstaller | None
    startup: Startup
    drift_pass: DriftPass
    handover: HostHandover
    decisions: DecisionKeeper
    watchers: NetnsWatchers
    opener: notify.FeedOpener


async def run(settings: Settings) -> None:
    await Agent(settings).run()
