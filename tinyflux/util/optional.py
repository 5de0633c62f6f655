"""Optional libraries load when they are chosen: bitsandbytes only for 8-bit Adam.

diffusers and peft import bitsandbytes whenever it is installed (diffusers' quantizers and peft.helpers at their own
import, peft's LoRA layers when it builds an adapter), and bitsandbytes then loads its kernels, which on a CPU machine
prints "Failed to load CPU gemm_4bit_forward from kernels-community ..." (offline, after a Hub trust check). TinyFlux
asks neither library for quantisation, so their modules run with bitsandbytes hidden: there `import bitsandbytes`
raises ImportError (which both handle) and importlib.util.find_spec finds nothing, so the flags they compute on import
(diffusers' is_bitsandbytes_available, peft's cached is_bnb_available) say it is absent, and later calls believe them.
Elsewhere it imports as usual (optim.py's AdamW8bit). tinyflux/__init__.py installs this, so it covers every entry
point; a program that imported diffusers or peft before tinyflux keeps what they did.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

HIDDEN = "bitsandbytes"
QUIET_PACKAGES = ("diffusers", "peft")  # whose module code runs with HIDDEN hidden
# Availability checks a package caches on first call (functools.lru_cache): called once while hidden, so that a
# call at run time (peft builds LoRA layers) agrees with what the package's modules imported.
CACHED_CHECKS = {"peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available")}


@contextmanager
def hidden(name: str = HIDDEN) -> Iterator[None]:
    """Within the block, `import name` raises ImportError and find_spec(name) is None, unless it is loaded already.
    A None in sys.modules is how the import system spells "not importable"; nested blocks leave it to the outer one."""
    placed = name not in sys.modules
    if placed:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if placed and name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


class _QuietLoader(importlib.abc.Loader):
    """The package's own loader, executing the module with bitsandbytes hidden."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with hidden():
            self.loader.exec_module(module)
            for check in CACHED_CHECKS.get(module.__name__, ()):
                getattr(module, check)()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, get_data, ...
        return getattr(self.loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in QUIET_PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Hide bitsandbytes from diffusers' and peft's modules (once per process)."""
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
