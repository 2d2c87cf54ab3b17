"""Installing the CNI plugin on the node: binary, kubeconfig and our entry in the primary config.

Runs in the agent, on the host's CNI directories mounted into its container. The methods do
blocking file I/O; call them with `asyncio.to_thread`.

- The binary is `cni_plugin.py`, copied as `<bin_dir>/<plugin_name>` with mode 0755.
- The kubeconfig (for the plugin's fallback when the agent is down) is written as JSON, which is
  also YAML, because the plugin can only use the standard library. It holds the agent's service
  account token, so it is mode 0600 and refreshed by `ensure()` when the token rotates.
- Our entry goes at the END of the `plugins` list of the primary CNI config: the first file by
  name in `conf_dir` ending in `.conf`, `.conflist` or `.json`, as libcni (containerd, CRI-O)
  picks it. A single-plugin config is turned into a `.conflist` (the old file is removed).

Every write is atomic (temporary file in the same directory, then rename), and the primary's
config is re-read just before the rename: if the primary CNI rewrote it meanwhile, we start over
rather than overwrite its change. Nothing is written when our entry is already there and the same.
A primary that writes its `.conf` again next to the `.conflist` we made of it wins: the
`.conflist` is made again from the fresh `.conf` (which sorts first, so the runtime would use it).

`CniKeeper` is the agent's async face: it waits for the primary's config at node boot (the
primary CNI may start after us), and puts our entry back as soon as the primary rewrites its
config (Cilium and Calico do on restart), which it notices by polling the directory every second.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from ztunnel_redirect import cni_plugin, constants
from ztunnel_redirect.errors import ConfigError, RetryableError
from ztunnel_redirect.workqueue import MONOTONIC, Clock

__all__ = [
    "CONFIG_EXTENSIONS",
    "CONF_DIR_POLL",
    "KUBECONFIG_NAME",
    "PLUGIN_CONFIG_KEYS",
    "PLUGIN_NAME",
    "SERVICE_ACCOUNT_DIR",
    "CniConfigError",
    "CniInstaller",
    "CniKeeper",
    "NoPrimaryConfigError",
]

log = structlog.get_logger(__name__)

PLUGIN_NAME: Final = "ztunnel-redirect-cni"
KUBECONFIG_NAME: Final = "ZZZ-ztunnel-redirect-cni-kubeconfig"
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
CONFIG_EXTENSIONS: Final = (".conf", ".conflist", ".json")
SHEBANG: Final = "#!/usr/bin/env python3\n"
PLUGIN_CONFIG_KEYS: Final = frozenset(
    {
        "plugin_event_socket",
        "kubeconfig",
        "exclude_namespaces",
        "log_level",
        "system_namespace",
        "agent_namespace",
        "agent_labels",
    }
)
"""The keys `cni_plugin.NetConf` reads; anything else is a typo."""
_ATTEMPTS: Final = 3
CONF_DIR_POLL: Final = 1.0
"""Seconds between two looks at the CNI conf dir by `CniKeeper` (one stat per file)."""


class CniConfigError(ConfigError):
    """A CNI config file we cannot read or understand; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"CNI config {path}: {problem}")
        self.path = path


class NoPrimaryConfigError(RetryableError):
    """No primary CNI config in the directory yet (the primary CNI may still be starting)."""


_Edit = Callable[[dict[str, Any]], dict[str, Any] | None]
"""A change to a conflist: the new content, or None when nothing needs to change."""


class _ChangedUnderUsError(Exception):
    """The file changed between our read and our write."""


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _dump(config: Mapping[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


def _parse(path: Path, data: bytes) -> tuple[dict[str, Any], bool]:
    """A CNI config as a conflist (dict with `plugins`), and whether the file was one already.

    A single-plugin config is wrapped in a list, as libcni does.
    """
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniConfigError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CniConfigError(path, "not a JSON object")
    if "plugins" in config or path.suffix == ".conflist":
        plugins = config.get("plugins")
        if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
            raise CniConfigError(path, '"plugins" must be a list of objects')
        if not plugins:
            raise CniConfigError(path, '"plugins" is empty')
        return config, True
    if not isinstance(config.get("type"), str):
        raise CniConfigError(path, 'neither "plugins" nor a plugin "type"')
    # libcni: a single network config becomes a list with that one plugin.
    wrapped = {key: config[key] for key in ("cniVersion", "name") if key in config}
    return {**wrapped, "plugins": [config]}, False


class CniInstaller:
    """Keeps the plugin binary, its kubeconfig and our conflist entry in place on this node."""

    def __init__(
        self,
        *,
        bin_dir: str = constants.CNI_BIN_DIR,
        conf_dir: str = constants.CNI_CONF_DIR,
        plugin_name: str = PLUGIN_NAME,
        plugin_config: Mapping[str, Any] | None = None,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        api_server_url: str | None = None,
        plugin_source: str | None = None,
    ) -> None:
        """`api_server_url` None: from KUBERNETES_SERVICE_HOST/PORT (in-cluster).

        `plugin_config` holds our keys (`PLUGIN_CONFIG_KEYS`); `kubeconfig` defaults to
        `<conf_dir>/ZZZ-ztunnel-redirect-cni-kubeconfig`.
        """
        config = dict(plugin_config or {})
        unknown = set(config) - PLUGIN_CONFIG_KEYS
        if unknown:
            raise ConfigError(f"unknown CNI plugin config keys: {', '.join(sorted(unknown))}")
        self.bin_dir = Path(bin_dir)
        self.conf_dir = Path(conf_dir)
        self.plugin_name = plugin_name
        self.kubeconfig_path = Path(config.get("kubeconfig") or self.conf_dir / KUBECONFIG_NAME)
        config["kubeconfig"] = str(self.kubeconfig_path)
        self.entry: dict[str, Any] = {"type": plugin_name, **config}
        self._service_account_dir = Path(service_account_dir)
        self._api_server_url = api_server_url
        self._plugin_source = Path(plugin_source or cni_plugin.__file__)

    @property
    def binary_path(self) -> Path:
        return self.bin_dir / self.plugin_name

    # --- public operations ---

    def install(self) -> bool:
        """Put everything in place; returns whether anything was written."""
        changed = self.ensure()
        log.info("cni_plugin_installed", conf_dir=str(self.conf_dir), changed=changed)
        return changed

    def ensure(self) -> bool:
        """Repair whatever is missing or stale (the primary CNI rewrote its config, a rotated
        token, a changed binary); returns whether anything was written."""
        changed = self._ensure_binary()
        changed = self._ensure_kubeconfig() or changed
        return self._ensure_entry() or changed

    def uninstall(self) -> None:
        """Remove our entry from every config in `conf_dir`, the binary and the kubeconfig."""
        for path in self._config_files():
            try:
                self._rewrite(path, self._without_us)
            except CniConfigError as exc:
                log.warning("cni_config_unreadable", file=str(path), reason=str(exc))
        for path in (self.binary_path, self.kubeconfig_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("cni_file_removed", file=str(path))
        log.info("cni_plugin_uninstalled", conf_dir=str(self.conf_dir))

    def conf_dir_stamp(self) -> frozenset[tuple[str, int, int, int]]:
        """What `conf_dir` holds, cheaply: (name, inode, size, mtime in ns) of every entry. A
        write by the primary changes it (a rename brings a new inode, a write in place a new
        mtime or size)."""
        stamp = set()
        try:
            with os.scandir(self.conf_dir) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        st = entry.stat()
                        stamp.add((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            pass
        return frozenset(stamp)

    def primary_config_path(self) -> Path:
        """The file libcni would use: the first config file by name."""
        files = self._config_files()
        if not files:
            raise NoPrimaryConfigError(
                f"no CNI config (*.conf, *.conflist, *.json) in {self.conf_dir} yet"
            )
        return files[0]

    # --- binary and kubeconfig ---

    def _ensure_binary(self) -> bool:
        source = self._plugin_source.read_text()
        if source.startswith("#!"):
            source = source.split("\n", 1)[1] if "\n" in source else ""
        data = (SHEBANG + source).encode()
        path = self.binary_path
        if _read_bytes(path) == data and (path.stat().st_mode & 0o777) == 0o755:
            return False
        _atomic_write(path, data, mode=0o755)
        log.info("cni_binary_installed", file=str(path))
        return True

    def _server_url(self) -> str | None:
        if self._api_server_url:
            return self._api_server_url
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        return f"https://{host}:{port}"

    def _ensure_kubeconfig(self) -> bool:
        token_path = self._service_account_dir / "token"
        ca_path = self._service_account_dir / "ca.crt"
        server = self._server_url()
        if server is None or not token_path.exists():
            log.debug("cni_kubeconfig_skipped", reason="not running in a cluster")
            return False
        cluster: dict[str, Any] = {"server": server}
        if ca_path.exists():
            cluster["certificate-authority-data"] = base64.b64encode(ca_path.read_bytes()).decode()
        name = self.plugin_name
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": name, "user": {"token": token_path.read_text().strip()}}],
            "contexts": [{"name": name, "context": {"cluster": "local", "user": name}}],
            "current-context": self.plugin_name,
        }
        data = _dump(config)
        path = self.kubeconfig_path
        if _read_bytes(path) == data and (path.stat().st_mode & 0o777) == 0o600:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data, mode=0o600)
        log.info("cni_kubeconfig_written", file=str(path))
        return True

    # --- the conflist entry ---

    def _config_files(self) -> list[Path]:
        try:
            names = sorted(entry.name for entry in self.conf_dir.iterdir())
        except FileNotFoundError:
            return []
        ignored = {self.kubeconfig_path.name, KUBECONFIG_NAME}
        return [
            self.conf_dir / name
            for name in names
            if name.endswith(CONFIG_EXTENSIONS)
            and not name.startswith(".")
            and name not in ignored
            and (self.conf_dir / name).is_file()
        ]

    def _is_ours(self, plugin: Mapping[str, Any]) -> bool:
        return plugin.get("type") == self.plugin_name

    def _holds_us(self, path: Path) -> bool:
        """Whether the config in `path` has our entry (we wrote it), False when it is gone."""
        data = _read_bytes(path)
        if data is None:
            return False
        config, _ = _parse(path, data)
        return any(map(self._is_ours, config["plugins"]))

    def _with_us(self, config: dict[str, Any]) -> dict[str, Any] | None:
        plugins: list[dict[str, Any]] = config["plugins"]
        if plugins[-1] == self.entry and sum(map(self._is_ours, plugins)) == 1:
            return None
        others = [p for p in plugins if not self._is_ours(p)]
        return {**config, "plugins": [*others, dict(self.entry)]}

    def _without_us(self, config: dict[str, Any]) -> dict[str, Any] | None:
        plugins: list[dict[str, Any]] = config["plugins"]
        others = [p for p in plugins if not self._is_ours(p)]
        if len(others) == len(plugins):
            return None
        return {**config, "plugins": others}

    def _ensure_entry(self) -> bool:
        for _ in range(_ATTEMPTS):
            primary = self.primary_config_path()
            try:
                written = self._rewrite(primary, self._with_us)
                changed = written is not None
                for other in self._config_files():
                    if other not in (primary, written):
                        # The primary moved to a new name: our entry in the old file is stale.
                        with contextlib.suppress(CniConfigError):
                            changed = self._rewrite(other, self._without_us) is not None or changed
            except _ChangedUnderUsError:
                continue
            return changed
        raise RetryableError(f"CNI config in {self.conf_dir} kept changing while we updated it")

    def _rewrite(self, path: Path, edit: _Edit) -> Path | None:
        """Apply `edit` to one file atomically; returns the file written, None if no change."""
        data = _read_bytes(path)
        if data is None:
            raise _ChangedUnderUsError
        config, is_list = _parse(path, data)
        new = edit(config)
        if new is None:
            return None
        target = path
        if not is_list:
            # A single-plugin config: write it as a conflist under the same name.
            target = path.with_suffix(".conflist")
            if target != path and target.exists():
                if not self._holds_us(target):
                    raise CniConfigError(path, f"cannot convert to a conflist: {target} exists")
                # The primary wrote its .conf again next to the conflist we made of the last one:
                # the .conf sorts first (the runtime uses it), and it is the primary's latest.
                log.info("cni_config_rewritten_by_primary", file=str(path), conflist=str(target))
        mode = path.stat().st_mode & 0o777
        if _read_bytes(path) != data:
            raise _ChangedUnderUsError
        _atomic_write(target, _dump(new), mode=mode)
        if target != path:
            path.unlink(missing_ok=True)
            log.info("cni_config_converted", file=str(path), conflist=str(target))
        plugins = [p.get("type") for p in new["plugins"]]
        log.info("cni_config_updated", file=str(target), plugins=plugins)
        return target


def _nothing() -> None:
    pass


def _ignore_ensured(_installed: bool) -> None:
    pass


def _ignore(_exc: Exception) -> None:
    pass


class CniKeeper:
    """Keeps the plugin installed while the agent runs: `ensure()` at once when `conf_dir`
    changes, and every `period` anyway (a rotated token, a replaced binary).

    The directory is looked at every `poll` seconds (names, sizes, mtimes: `conf_dir_stamp`); a
    change is what a primary CNI rewriting its config looks like, and new pods started without our
    plugin until the entry is back. Until the primary has written a config (node boot), it waits
    for one: logged once, `on_installed` not called yet. A config it cannot update is logged,
    passed to `on_failure`, and tried again on the next change: the keeper never stops.
    """

    def __init__(
        self,
        installer: CniInstaller,
        *,
        period: float,
        poll: float = CONF_DIR_POLL,
        clock: Clock = MONOTONIC,
        on_installed: Callable[[], None] = _nothing,
        on_failure: Callable[[Exception], None] = _ignore,
        on_ensured: Callable[[bool], None] = _ignore_ensured,
    ) -> None:
        """`on_installed` is called once, when our entry is first in place; `on_ensured` after
        every look that leaves it in place, with True when that look wrote something or was the
        first (an install, as Istio's installer counts them)."""
        if period <= 0 or poll <= 0:
            raise ConfigError(f"CNI keeper: period and poll must be positive, got {period}, {poll}")
        self._installer = installer
        self._period = period
        self._poll = poll
        self._clock = clock
        self._on_installed = on_installed
        self._on_failure = on_failure
        self._on_ensured = on_ensured
        self.installed = False
        """Our entry was in place at least once."""
        self._waiting = False

    async def run(self) -> None:
        """Keep the plugin installed until cancelled."""
        seen: frozenset[tuple[str, int, int, int]] | None = None
        due = self._clock.now()
        while True:
            # Taken before ensure(): our own write shows as a change, so the next look runs one
            # more ensure(), which finds nothing to do; a change by the primary during our write
            # is never taken for ours.
            stamp = await asyncio.to_thread(self._installer.conf_dir_stamp)
            now = self._clock.now()
            if stamp != seen or now >= due:
                seen, due = stamp, now + self._period
                await self._ensure()
            await self._clock.sleep(self._poll)

    async def _ensure(self) -> None:
        conf_dir = str(self._installer.conf_dir)
        try:
            changed = await asyncio.to_thread(self._installer.ensure)
        except NoPrimaryConfigError:
            if not self._waiting:
                self._waiting = True
                log.info("cni_primary_config_waiting", conf_dir=conf_dir)
            return
        except (ConfigError, RetryableError, OSError) as exc:
            log.warning(
                "cni_config_update_failed",
                conf_dir=conf_dir,
                reason=type(exc).__name__,
                error=str(exc),
            )
            try:
                self._on_failure(exc)
            except Exception:  # a metrics hook never stops the keeper
                log.exception("failure_hook_failed", conf_dir=conf_dir)
            return
        self._waiting = False
        self._on_ensured(changed or not self.installed)
        if not self.installed:
            self.installed = True
            log.info("cni_plugin_installed", conf_dir=conf_dir, changed=changed)
            self._on_installed()
