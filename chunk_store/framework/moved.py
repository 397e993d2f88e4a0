"""Old import paths of modules that moved to a better room keep working (INTERFACE.md: "its old
import path keeps working"): ``import chunk_store.build`` gives the very module
``chunk_store.chunk.stage`` (the same object, so patching one patches the other)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder that answers each old module name with the module now at its new name."""

    def __init__(self, moved: Mapping[str, str]) -> None:
        self.moved = dict(moved)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.moved[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new name is already imported."""


def install(moved: Mapping[str, str]) -> None:
    """Answer the old names in ``moved`` (old dotted name -> new dotted name) from now on."""
    if not any(isinstance(f, MovedModules) and f.moved == dict(moved) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules(moved))


def forward_names(package: str, module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``, a module that became a package of the same name:
    the names it held are looked up in ``module`` (imported on first use, so importing the
    package stays cheap)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(module)  # not `from package import`: that asks __getattr__
        try:
            return getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__
