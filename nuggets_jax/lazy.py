"""Lazy names for a subpackage's public face (PEP 562): each loads its module on first use, so
importing one module of a package does not import every other (the engine pulls in JAX)."""

import importlib
import sys
from collections.abc import Callable, Mapping


def exports(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` whose names live in `homes` (name -> module)."""

    def getattr_(name: str):
        if name in homes:
            value = getattr(importlib.import_module(homes[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted([*vars(sys.modules[package]), *homes])

    return getattr_, dir_
