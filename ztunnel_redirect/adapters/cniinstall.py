"""Installing the CNI plugin on the node: the executable and our CNI config.

Runs in the agent, on the host's CNI directories mounted into its container. The installer's
methods do blocking file I/O; call them with `asyncio.to_thread`.

- The executable (cniplugin/, a static Go binary the image carries at `plugin_source`) is copied
  byte for byte as `<bin_dir>/<plugin_name>`, mode 0755. Before any config names it, it must
  answer `CNI_COMMAND=VERSION` on this host: a plugin that cannot run would fail every new pod of
  the node, kube-system's included. Until it does, no config is touched (`PluginUnusableError`).
- No credentials are written: the plugin decides from the agent's decision file (`decisions`)
  when the agent does not answer. A kubeconfig left by an older version is removed by
  `uninstall()` (`ztunnel-redirect cleanup`).
- Our config, in one of three modes (Istio's settings, docs/design.md "CNI config options"):
  - chained (default): our entry at the END of the `plugins` list of the primary CNI config:
    `conf_name` when given (`x.conf` and `x.conflist` stand in for each other), else the first
    file by name in `conf_dir` ending in `.conf`, `.conflist` or `.json`, as libcni (containerd,
    CRI-O) picks it. A single-plugin config is turned into a `.conflist` (the old file is
    removed); the file's mode is kept.
  - owned (`owned_conf_name`, Istio's `ISTIO_OWNED_CNI_CONFIG`): the primary's config plus our
    entry is written to a file of our own that sorts first; the primary's file is not touched.
  - standalone (`chained=False`): our own single-plugin config `conf_name` (default
    `YYY-istio-cni.conf`), for setups that attach it as a network of its own (Multus).

Every write is atomic (temporary file in the same directory, then rename), and the primary's
config is re-read just before the rename: if the primary CNI rewrote it meanwhile, we start over
rather than overwrite its change. Nothing is written when our config is already there and the
same. A primary that writes its `.conf` again next to the `.conflist` we made of it wins: the
`.conflist` is made again from the fresh `.conf` (which sorts first, so the runtime would use it).

`CniKeeper` is the agent's async face: it waits for the primary's config at node boot (the
primary CNI may start after us), and puts our entry back as soon as the primary rewrites its
config (Cilium and Calico do on restart). It learns of every change in `conf_dir` from inotify
(`ConfDirWatch`), read by the event loop: the entry is back within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Self

import structlog

from ztunnel_redirect.adapters.atomicfile import write_atomically
from ztunnel_redirect.core import constants, untrusted
from ztunnel_redirect.core.errors import ConfigError, RetryableError

__all__ = [
    "CONFIG_EXTENSIONS",
    "LEGACY_KUBECONFIG_NAME",
    "PLUGIN_CONFIG_KEYS",
    "PLUGIN_NAME",
    "CniConfigError",
    "CniInstaller",
    "CniKeeper",
    "ConfDirWatch",
    "NoPrimaryConfigError",
    "PluginUnusableError",
]

log = structlog.get_logger(__name__)

PLUGIN_NAME: Final = "ztunnel-redirect-cni"
LEGACY_KUBECONFIG_NAME: Final = "ZZZ-ztunnel-redirect-cni-kubeconfig"
"""What versions before the static plugin wrote into the conf dir (with a token): removed by
`uninstall()`, never a config file."""
CONFIG_EXTENSIONS: Final = (".conf", ".conflist", ".json")
PLUGIN_CONFIG_KEYS: Final = frozenset({"plugin_event_socket", "exclude_namespaces", "log_level"})
"""The keys of our entry the plugin reads (cniplugin/README.md); anything else is a typo."""
STANDALONE_NETWORK: Final = "istio-cni"
"""The network name of our standalone config (as Istio's)."""
VERSION_TIMEOUT: Final = 5.0
"""Seconds the copied executable has to answer VERSION (it takes about a millisecond)."""
_ATTEMPTS: Final = 3


class CniConfigError(ConfigError):
    """A CNI config file we cannot read or understand; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"CNI config {path}: {problem}")
        self.path = path


class NoPrimaryConfigError(RetryableError):
    """No primary CNI config in the directory yet (the primary CNI may still be starting)."""


class PluginUnusableError(ConfigError):
    """The plugin executable cannot run on this host (or is missing): no config may name it."""


_Edit = Callable[[dict[str, Any]], dict[str, Any] | None]
"""A change to a conflist: the new content, or None when nothing needs to change."""


class _ChangedUnderUsError(Exception):
    """The file changed between our read and our write."""


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
        config = untrusted.load_json(data)
    except ValueError as exc:
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


def check_conf_name(name: str) -> str | None:
    """None when `name` can be a CNI config file name in the conf dir, else what is wrong."""
    if not name or "/" in name or name.startswith(".") or not name.endswith(CONFIG_EXTENSIONS):
        return f"must be a file name ending in .conf, .conflist or .json, not {name!r}"
    return None


def _stand_ins(name: str) -> tuple[str, ...]:
    """`x.conf` and `x.conflist` name the same config (libcni's and Istio's rule)."""
    stem, dot, ext = name.rpartition(".")
    if ext in ("conf", "conflist"):
        return (name, f"{stem}{dot}{'conflist' if ext == 'conf' else 'conf'}")
    return (name,)


def probe_plugin(path: Path) -> str | None:
    """Run the executable as a runtime asks for its version; None when it answered, else why it
    cannot be used on this host."""
    try:
        done = subprocess.run(
            [str(path)],
            input=b'{"cniVersion": "1.0.0"}',
            env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"no answer to VERSION within {VERSION_TIMEOUT:g} s"
    except OSError as exc:
        return f"cannot be executed ({exc.strerror or exc})"
    tail = done.stderr.decode(errors="replace").strip()[-200:]
    if done.returncode != 0:
        return f"VERSION exited with status {done.returncode}" + (f": {tail}" if tail else "")
    try:
        answer = untrusted.load_json(done.stdout)
    except ValueError:
        return "VERSION did not print JSON"
    versions = answer.get("supportedVersions") if isinstance(answer, dict) else None
    if not isinstance(versions, list) or not versions:
        return "VERSION printed no supportedVersions"
    return None


class CniInstaller:
    """Keeps the plugin executable and our CNI config in place on this node."""

    def __init__(
        self,
        *,
        bin_dir: str = constants.CNI_BIN_DIR,
        conf_dir: str = constants.CNI_CONF_DIR,
        plugin_source: str = constants.CNI_PLUGIN_SOURCE,
        plugin_name: str = PLUGIN_NAME,
        plugin_config: Mapping[str, Any] | None = None,
        conf_name: str | None = None,
        chained: bool = True,
        owned_conf_name: str | None = None,
    ) -> None:
        """`plugin_config` holds our entry's keys (`PLUGIN_CONFIG_KEYS`). `conf_name`: chained,
        the primary's file (default: the first by name); standalone, our file (default
        `YYY-istio-cni.conf`). `owned_conf_name`: chained into a file of our own (the owned mode).
        """
        config = dict(plugin_config or {})
        unknown = set(config) - PLUGIN_CONFIG_KEYS
        if unknown:
            raise ConfigError(f"unknown CNI plugin config keys: {', '.join(sorted(unknown))}")
        for name in (conf_name, owned_conf_name):
            problem = None if name is None else check_conf_name(name)
            if problem is not None:
                raise ConfigError(f"CNI config name {problem}")
        if owned_conf_name is not None and not chained:
            raise ConfigError("an owned CNI config only exists when chained")
        self.bin_dir = Path(bin_dir)
        self.conf_dir = Path(conf_dir)
        self.plugin_name = plugin_name
        self.plugin_source = Path(plugin_source)
        self.entry: dict[str, Any] = {"type": plugin_name, **config}
        self.chained = chained
        self.conf_name = conf_name
        self.owned_conf_name = owned_conf_name
        self._probed: tuple[int, int, int] | None = None
        """(inode, size, mtime) of the installed executable when it last answered VERSION."""

    @property
    def binary_path(self) -> Path:
        return self.bin_dir / self.plugin_name

    @property
    def standalone_path(self) -> Path:
        return self.conf_dir / (self.conf_name or constants.CNI_STANDALONE_CONF_NAME)

    # --- public operations ---

    def install(self) -> bool:
        """Put everything in place; returns whether anything was written."""
        changed = self.ensure()
        log.info("cni_plugin_installed", conf_dir=str(self.conf_dir), changed=changed)
        return changed

    def ensure(self) -> bool:
        """Repair whatever is missing or stale (the primary CNI rewrote its config, a changed
        executable); returns whether anything was written. Raises `PluginUnusableError`, and
        touches no config, when the executable cannot run here."""
        changed = self._ensure_binary()
        self._ensure_runs()
        if not self.chained:
            return self._ensure_standalone() or changed
        return self._ensure_entry() or changed

    def uninstall(self) -> None:
        """Remove our entry from every config in `conf_dir`, our own config files, the
        executable and a kubeconfig left by an older version."""
        ours = [self.standalone_path] if not self.chained else []
        for path in self._config_files(include_ours=True):
            try:
                if path in ours or self._only_us(path) or path.name == self.owned_conf_name:
                    if path.name == self.owned_conf_name and not self._holds_us(path):
                        continue
                    path.unlink(missing_ok=True)
                    log.info("cni_file_removed", file=str(path))
                else:
                    self._rewrite(path, self._without_us)
            except CniConfigError as exc:
                log.warning("cni_config_unreadable", file=str(path), reason=str(exc))
        for path in (self.binary_path, self.conf_dir / LEGACY_KUBECONFIG_NAME):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("cni_file_removed", file=str(path))
        log.info("cni_plugin_uninstalled", conf_dir=str(self.conf_dir))

    def primary_config_path(self) -> Path:
        """The primary CNI's config: `conf_name` (or its stand-in) when given, else the first
        config file by name, as libcni picks it."""
        files = self._config_files()
        if self.conf_name is not None:
            for name in _stand_ins(self.conf_name):
                if self.conf_dir / name in files:
                    return self.conf_dir / name
            raise NoPrimaryConfigError(f"no CNI config {self.conf_name} in {self.conf_dir} yet")
        if not files:
            raise NoPrimaryConfigError(
                f"no CNI config (*.conf, *.conflist, *.json) in {self.conf_dir} yet"
            )
        return files[0]

    # --- the executable ---

    def _ensure_binary(self) -> bool:
        try:
            data = self.plugin_source.read_bytes()
        except OSError as exc:
            raise PluginUnusableError(
                f"CNI plugin executable {self.plugin_source} cannot be read: {exc.strerror}"
            ) from exc
        path = self.binary_path
        if _read_bytes(path) == data and (path.stat().st_mode & 0o777) == 0o755:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data, mode=0o755, durable=True)
        log.info("cni_binary_installed", file=str(path), source=str(self.plugin_source))
        return True

    def _ensure_runs(self) -> None:
        """The installed executable answered VERSION here (asked again when it changed)."""
        st = self.binary_path.stat()
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._probed == signature:
            return
        problem = probe_plugin(self.binary_path)
        if problem is not None:
            self._probed = None
            raise PluginUnusableError(
                f"CNI plugin {self.binary_path} cannot run on this host: {problem}; "
                "no CNI config was changed"
            )
        self._probed = signature
        log.info("cni_binary_runs", file=str(self.binary_path))

    # --- our config ---

    def _config_files(self, *, include_ours: bool = False) -> list[Path]:
        """Config files in `conf_dir` by name; without `include_ours`, not the files that are
        ours alone (the owned copy, the standalone config)."""
        try:
            names = sorted(entry.name for entry in self.conf_dir.iterdir())
        except FileNotFoundError:
            return []
        ours = set()
        if not include_ours:
            ours.add(self.owned_conf_name)
            if not self.chained:
                ours.add(self.standalone_path.name)
        return [
            self.conf_dir / name
            for name in names
            if name.endswith(CONFIG_EXTENSIONS)
            and not name.startswith(".")
            and name not in ours
            and (self.conf_dir / name).is_file()
        ]

    def _is_ours(self, plugin: Mapping[str, Any]) -> bool:
        return plugin.get("type") == self.plugin_name

    def _plugins(self, path: Path) -> list[dict[str, Any]]:
        data = _read_bytes(path)
        if data is None:
            return []
        config, _ = _parse(path, data)
        plugins: list[dict[str, Any]] = config["plugins"]
        return plugins

    def _holds_us(self, path: Path) -> bool:
        """Whether the config in `path` has our entry (we wrote it), False when it is gone."""
        return any(map(self._is_ours, self._plugins(path)))

    def _only_us(self, path: Path) -> bool:
        """Whether `path` is a standalone config of ours (our plugin and nothing else)."""
        plugins = self._plugins(path)
        return bool(plugins) and all(map(self._is_ours, plugins))

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

    def _drop_us_elsewhere(self, keep: set[Path]) -> bool:
        """Our entry out of every config but `keep` (the primary moved, or the mode changed)."""
        changed = False
        for other in self._config_files():
            if other not in keep:
                with contextlib.suppress(CniConfigError):
                    changed = self._rewrite(other, self._without_us) is not None or changed
        return changed

    def _ensure_entry(self) -> bool:
        for _ in range(_ATTEMPTS):
            primary = self.primary_config_path()
            try:
                if self.owned_conf_name is not None:
                    written = self._copy_with_us(primary, self.conf_dir / self.owned_conf_name)
                    keep = set()
                else:
                    written = self._rewrite(primary, self._with_us)
                    keep = {primary} if written is None else {primary, written}
                changed = self._drop_us_elsewhere(keep) or written is not None
            except _ChangedUnderUsError:
                continue
            return changed
        raise RetryableError(f"CNI config in {self.conf_dir} kept changing while we updated it")

    def _copy_with_us(self, primary: Path, target: Path) -> Path | None:
        """The owned mode: the primary's config plus our entry in `target`, a file of our own
        that must sort first; the primary's file is only read."""
        data = _read_bytes(primary)
        if data is None:
            raise _ChangedUnderUsError
        config, _ = _parse(primary, data)
        new = self._with_us(config) or config
        content = _dump(new)
        mode = primary.stat().st_mode & 0o777
        current = target.stat() if target.exists() else None
        if _read_bytes(target) == content and current and (current.st_mode & 0o777) == mode:
            return None
        if target.name > primary.name:
            log.warning(
                "cni_owned_config_sorts_after_primary",
                file=str(target),
                primary=str(primary),
                hint="the runtime uses the primary's file: choose a name that sorts first",
            )
        if _read_bytes(primary) != data:
            raise _ChangedUnderUsError
        write_atomically(target, content, mode=mode, durable=True)
        plugins = [p.get("type") for p in new["plugins"]]
        log.info("cni_config_updated", file=str(target), primary=str(primary), plugins=plugins)
        return target

    def _ensure_standalone(self) -> bool:
        """The standalone mode: our own single-plugin config, and our entry nowhere else."""
        path = self.standalone_path
        content = _dump({"cniVersion": "1.0.0", "name": STANDALONE_NETWORK, **self.entry})
        changed = False
        if _read_bytes(path) != content:
            write_atomically(path, content, mode=0o644, durable=True)
            log.info("cni_config_updated", file=str(path), plugins=[self.plugin_name])
            changed = True
        with contextlib.suppress(_ChangedUnderUsError):
            changed = self._drop_us_elsewhere(set()) or changed
        return changed

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
        write_atomically(target, _dump(new), mode=mode, durable=True)
        if target != path:
            path.unlink(missing_ok=True)
            log.info("cni_config_converted", file=str(path), conflist=str(target))
        plugins = [p.get("type") for p in new["plugins"]]
        log.info("cni_config_updated", file=str(target), plugins=plugins)
        return target


# --- watching the conf dir: inotify(7) through libc, read by the event loop ----------------------

_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_IN_ATTRIB: Final = 0x004
_IN_CLOSE_WRITE: Final = 0x008
_IN_MOVED_FROM: Final = 0x040
_IN_MOVED_TO: Final = 0x080
_IN_DELETE: Final = 0x200
_IN_DELETE_SELF: Final = 0x400
_IN_MOVE_SELF: Final = 0x800
_WATCH_MASK: Final = (
    _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
"""Every way a file in the directory can be complete and changed, or go: closed after a write
(in place or new), renamed onto or away, chmod'ed, deleted, and the directory itself going. Not
IN_MODIFY or IN_CREATE: a file being written in place is half there until it is closed (reading
it then would count a failure for a config that is fine a moment later)."""
_READ_SIZE: Final = 64 * 1024


class ConfDirWatch:
    """inotify on one directory: `wait()` returns once anything in it changed since `clear()`.

    The events themselves are not parsed: any change means "look again" (the installer reads the
    whole directory, a few small files). A queue overflow is a change like any other.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd: int = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        directory.mkdir(parents=True, exist_ok=True)
        wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), _WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"inotify_add_watch {directory}: {os.strerror(code)}")

    def start(self) -> None:
        """Serve the fd from the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._drain)

    def _drain(self) -> None:
        while True:
            try:
                if not os.read(self._fd, _READ_SIZE):
                    break
            except BlockingIOError:
                break
            except OSError as exc:  # never expected; treated as a change, logged once per read
                if exc.errno != errno.EINTR:
                    log.warning("cni_conf_dir_watch_error", error=str(exc))
                break
        self._changed.set()

    def clear(self) -> None:
        """Changes from now on count for the next `wait()`."""
        self._changed.clear()

    async def wait(self) -> None:
        await self._changed.wait()

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nothing() -> None:
    pass


def _ignore_ensured(_installed: bool) -> None:
    pass


def _ignore(_exc: Exception) -> None:
    pass


def _ignore_pass(_changed: bool) -> None:
    pass


class CniKeeper:
    """Keeps the plugin installed while the agent runs: `ensure()` at once when `conf_dir`
    changes (inotify), and every `period` anyway (a replaced executable).

    A change in the directory is what a primary CNI rewriting its config looks like, and new pods
    start without our plugin until the entry is back. Until the primary has written a config
    (node boot), it waits for one: logged once, `on_installed` not called yet. A config it cannot
    update, or an executable that cannot run here, is logged, passed to `on_failure`, and tried
    again on the next change: the keeper never stops.
    """

    def __init__(
        self,
        installer: CniInstaller,
        *,
        period: float,
        on_installed: Callable[[], None] = _nothing,
        on_failure: Callable[[Exception], None] = _ignore,
        on_ensured: Callable[[bool], None] = _ignore_ensured,
        on_pass: Callable[[bool], None] = _ignore_pass,
    ) -> None:
        """`on_installed` is called once, when our config is first in place; `on_ensured` after
        every look that leaves it in place, with True when that look wrote something or was the
        first (an install, as Istio's installer counts them); `on_pass(changed)` after each
        successful `ensure()` (whether it wrote anything)."""
        if period <= 0:
            raise ConfigError(f"CNI keeper: the period must be positive, got {period}")
        self._installer = installer
        self._period = period
        self._on_installed = on_installed
        self._on_failure = on_failure
        self._on_ensured = on_ensured
        self._on_pass = on_pass
        self.installed = False
        """Our config was in place at least once."""
        self._waiting = False

    async def run(self) -> None:
        """Keep the plugin installed until cancelled."""
        with ConfDirWatch(self._installer.conf_dir) as watch:
            while True:
                # Cleared before ensure(): our own write shows as a change, so one more ensure()
                # runs and finds nothing to do; a change by the primary during our write is
                # never lost.
                watch.clear()
                await self._ensure()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._period):
                        await watch.wait()

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
        self._on_pass(changed)
