"""Old import paths of modules that moved to a better room keep working (INTERFACE.md: "its old
import path keeps working"): ``import chunk_store.build`` gives the very module
``chunk_store.chunk.stage`` (the same object, so patching one patches the other)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Mapping, Sequence


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
