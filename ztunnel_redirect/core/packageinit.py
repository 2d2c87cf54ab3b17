"""Import the modules of a library without the library's package `__init__` importing all the rest.

Some libraries' package `__init__` imports every module they have so that `lib.Thing` works:
kubernetes_asyncio's client imports all of its generated API and model classes (about 39 MiB of
the agent's RSS), pyroute2's top level imports every socket family and NDB (about 8 MiB). The agent
uses a few of their modules. Python runs a package's `__init__` before any of its submodules, so
importing only `kubernetes_asyncio.client.api_client` still pays for everything.

`defer_package_init` puts the package's module in `sys.modules` with its `__init__` not yet run.
Its submodules then import as usual, each paying only for what it imports itself. The package
keeps its meaning: asking it for a submodule imports that submodule; asking it for any other name
(`lib.Thing`, `from lib import Thing`, `from lib import *`) runs the real `__init__` first, once,
so code that wants the whole library still gets it, only later. `reexports` names what the
`__init__` would re-export that the modules we use themselves import from the package, served
from the module that defines each, without the rest.

Call it before the first import of the package in the process (a package already imported is
left as it is: the saving is gone, nothing breaks).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from types import ModuleType

__all__ = ["defer_package_init", "is_deferred"]

_HOOK = "__getattr__"
"""A module-level `__getattr__` (PEP 562) is asked only for names the module does not have."""

_deferred: dict[str, ModuleType] = {}
"""Packages registered here whose `__init__` has not run (yet)."""


def defer_package_init(package: str, *, reexports: Mapping[str, str] | None = None) -> ModuleType:
    """Register `package` (and any parent not yet imported) with its `__init__` deferred; the
    module in `sys.modules`. `reexports` maps a name to the submodule that defines it."""
    existing = sys.modules.get(package)
    if existing is not None:
        return existing
    parent, _, child = package.rpartition(".")
    if parent:
        defer_package_init(parent)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{package} is not an importable package", name=package)
    module = importlib.util.module_from_spec(spec)
    served = dict(reexports or {})
    loader = spec.loader

    def attribute(name: str) -> object:
        if name in served:
            value = getattr(importlib.import_module(served[name]), name)
            setattr(module, name, value)
            return value
        if name.startswith("__") and name != "__all__":
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        # Anything else may be defined by the package's own __init__: run it, once.
        del module.__dict__[_HOOK]
        _deferred.pop(package, None)
        loader.exec_module(module)
        return getattr(module, name)

    setattr(module, _HOOK, attribute)
    sys.modules[package] = module
    _deferred[package] = module
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def is_deferred(package: str) -> bool:
    """True while `package` is imported with its `__init__` not (yet) run."""
    module = _deferred.get(package)
    return module is not None and sys.modules.get(package) is module
