"""Deferred package `__init__`s: the mechanism, and that the agent does not load the parts of its
libraries it never runs (kubernetes_asyncio's generated classes, pyroute2's socket families).

The agent checks run in a fresh interpreter: this process has imported the whole libraries
already (other tests use them directly).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ztunnel_redirect.core.packageinit import defer_package_init, is_deferred

PACKAGE = "zr_deferred_demo"

NEVER_LOADED_BY_THE_AGENT = (
    "kubernetes_asyncio.client.models.",  # the generated model classes (about 39 MiB)
    "kubernetes_asyncio.client.api.",  # the generated API classes
    "kubernetes_asyncio.watch",
    "kubernetes_asyncio.dynamic",
    "pyroute2.ndb",
    "pyroute2.iproute",
    "pyroute2.ipdb",
)
"""Module name prefixes whose presence after the agent's imports means the saving is gone."""


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package whose `__init__`s (its own and its subpackage's) count their runs, and which
    re-exports a name of a submodule."""
    root = tmp_path / PACKAGE
    (root / "inner").mkdir(parents=True)
    (root / "__init__.py").write_text(
        textwrap.dedent(
            """
            import builtins
            builtins.zr_init_runs = getattr(builtins, "zr_init_runs", 0) + 1
            from zr_deferred_demo.things import Thing
            ONLY_HERE = "defined by __init__"
            """
        )
    )
    (root / "things.py").write_text("class Thing:\n    pass\n")
    (root / "inner" / "__init__.py").write_text(
        "import builtins\nbuiltins.zr_init_runs = getattr(builtins, 'zr_init_runs', 0) + 1\n"
    )
    (root / "inner" / "heavy.py").write_text("class Heavy:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    import builtins  # noqa: PLC0415 - the counter the demo package keeps

    if hasattr(builtins, "zr_init_runs"):
        del builtins.zr_init_runs


def _init_runs() -> int:
    import builtins  # noqa: PLC0415

    runs: int = getattr(builtins, "zr_init_runs", 0)
    return runs


@pytest.mark.usefixtures("package")
def test_submodules_import_without_the_package_init() -> None:
    defer_package_init(f"{PACKAGE}.inner")  # and its parent, not yet imported
    from zr_deferred_demo.inner.heavy import Heavy  # type: ignore[import-not-found]  # noqa: PLC0415
    from zr_deferred_demo.things import Thing  # type: ignore[import-not-found]  # noqa: PLC0415

    assert (Heavy.__name__, Thing.__name__) == ("Heavy", "Thing")
    assert _init_runs() == 0
    assert is_deferred(PACKAGE)
    assert is_deferred(f"{PACKAGE}.inner")


@pytest.mark.usefixtures("package")
def test_a_submodule_asked_of_the_package_is_served_without_the_init() -> None:
    module: Any = defer_package_init(PACKAGE)
    from zr_deferred_demo import things  # type: ignore[import-not-found]  # noqa: PLC0415

    assert things.Thing.__name__ == "Thing"
    assert module.things is things
    assert _init_runs() == 0


@pytest.mark.usefixtures("package")
def test_any_other_name_runs_the_init_once() -> None:
    module: Any = defer_package_init(PACKAGE, reexports={"Thing": f"{PACKAGE}.things"})
    from zr_deferred_demo import Thing  # noqa: PLC0415 - a re-export, served alone

    assert _init_runs() == 0
    assert module.ONLY_HERE == "defined by __init__"
    assert _init_runs() == 1
    assert not is_deferred(PACKAGE)
    assert module.Thing is Thing
    with pytest.raises(AttributeError):
        _ = module.missing
    assert _init_runs() == 1


@pytest.mark.usefixtures("package")
def test_an_imported_package_is_left_as_it_is() -> None:
    import zr_deferred_demo  # noqa: PLC0415

    assert _init_runs() == 1
    assert defer_package_init(PACKAGE) is zr_deferred_demo
    assert not is_deferred(PACKAGE)


@pytest.mark.usefixtures("package")
def test_a_module_that_is_not_a_package_is_refused() -> None:
    with pytest.raises(ImportError, match="not an importable package"):
        defer_package_init(f"{PACKAGE}.things")
    with pytest.raises(ImportError, match="not an importable package"):
        defer_package_init(f"{PACKAGE}.absent")


# --- the agent ------------------------------------------------------------------------------


_AGENT_PROBE = """
import asyncio, json, sys, tempfile
from pathlib import Path

import ztunnel_redirect.app.agent
import ztunnel_redirect.app.cli  # the agent's entry point: all it imports at start-up

at_start = sorted(sys.modules)

from ztunnel_redirect.adapters.kube import KubeClient, Watcher, load_client
from ztunnel_redirect.testing.apiserver import ApiServer, kubeconfig


class Store:
    pods = []
    def replace_pods(self, pods): self.pods = [p.name for p in pods]
    def upsert_pod(self, pod): pass
    def delete_pod(self, pod): pass
    def replace_namespaces(self, namespaces): pass
    def upsert_namespace(self, ns): pass
    def delete_namespace(self, ns): pass


async def main():
    store = Store()
    async with ApiServer() as server:
        server.create_namespace("default")
        server.create_pod({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": "10.0.0.9"},
        })
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kubeconfig"
            path.write_text(json.dumps(kubeconfig(server.url)))
            api = await load_client(kubeconfig=str(path))
        try:
            watcher = Watcher(api=api, node_name="node-a", store=store)
            task = asyncio.create_task(watcher.run())
            await asyncio.wait_for(watcher.synced.wait(), 30)
            kube = KubeClient(api)
            pod = await kube.get_pod("default", "p")
            await kube.set_redirection_status(pod, "enabled")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await api.close()
        stored = server.get_pod("default", "p")
    return store.pods, stored["metadata"]["annotations"]


listed, annotations = asyncio.run(main())
print(json.dumps({
    "at_start": at_start,
    "after_requests": sorted(sys.modules),
    "listed": listed,
    "annotations": annotations,
}))
"""


@pytest.fixture(scope="module")
def agent_modules() -> dict[str, Any]:
    """What a fresh interpreter has imported after the agent's imports, and after the adapter
    listed, watched, read and patched against the fake API server."""
    done = subprocess.run(
        [sys.executable, "-c", _AGENT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])  # after any log lines
    return result


def _unwanted(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(NEVER_LOADED_BY_THE_AGENT)]


def test_the_agent_imports_none_of_the_generated_client_nor_pyroute2s_rest(
    agent_modules: dict[str, Any],
) -> None:
    at_start = agent_modules["at_start"]
    # The libraries are there, their deferred package __init__s are not run.
    assert "kubernetes_asyncio.client.api_client" in at_start
    assert "pyroute2.netlink" in at_start
    assert _unwanted(at_start) == []


def test_the_kubernetes_requests_load_no_generated_class(agent_modules: dict[str, Any]) -> None:
    assert agent_modules["listed"] == ["p"]
    assert agent_modules["annotations"] == {"ambient.istio.io/redirection": "enabled"}
    assert _unwanted(agent_modules["after_requests"]) == []
