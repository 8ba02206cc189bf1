"""Names of a package that load their (torch-importing) module on first use (PEP 562).

    __getattr__, __dir__ = lazy_names(__name__, {"Tag2Mask": "explainers.segment.pipeline"})
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, table: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of `package` for the names of `table`
    (name -> the module that defines it); a loaded name is kept in the package's namespace."""
    def __getattr__(name: str):
        if name in table:
            value = getattr(import_module(table[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
