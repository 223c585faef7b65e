"""Packages whose public names are imported on first use, so that ``import vlprompt.<package>`` stays cheap.

A package's ``__init__`` calls ``lazy_exports(__name__, {"name": "submodule", ...})`` instead of importing its
submodules: ``vlprompt.data.build_dataset`` (or ``from vlprompt.data import build_dataset``) imports
``vlprompt.data.registry`` at that moment. The command line relies on it: building the ``vlprompt`` parser imports
every command module, and none of them may pull in torch before a command actually runs.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package module that imports ``_lazy_exports[name]`` (a submodule name) when ``name`` is first read."""

    _lazy_exports: dict[str, str] = {}

    def __getattr__(self, name: str):
        submodule = self._lazy_exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module = submodule if submodule.startswith("vlprompt.") else f"{self.__name__}.{submodule}"
        value = getattr(importlib.import_module(module), name)
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on the package under its own name. Where a public function shares its
        # module's name (``vlprompt.engine.evaluate``, ``vlprompt.toyworld.render``), the function keeps the name,
        # as it did when the package imported its names eagerly.
        if isinstance(value, types.ModuleType) and self._lazy_exports.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._lazy_exports))


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` (a module's ``__name__``) serve ``exports`` (public name → submodule name, or the full name
    of a module elsewhere in vlprompt) on first use."""
    module = sys.modules[package]
    module.__class__ = LazyPackage
    module._lazy_exports = dict(exports)
