"""Importing things named by dotted paths: ``pkg.module.name`` or ``pkg.module:Qual.Name``."""

from __future__ import annotations

import functools
import importlib
from typing import Any


@functools.lru_cache(maxsize=1024)
def import_object(path: str) -> Any:
    """The object at ``path``; ImportError or AttributeError when there is none."""
    if ":" in path:
        module_name, _, qualname = path.partition(":")
    else:
        module_name, _, qualname = path.rpartition(".")
    if not module_name or not qualname:
        raise ImportError(f"'{path}' is not a dotted path like package.module.name")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found
