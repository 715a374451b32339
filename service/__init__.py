"""The lorag gateway: FastAPI app, engines, chat."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.app import create_app
    from service.settings import Settings

__all__ = ["Settings", "create_app"]

# Resolved on first use: the CLI's client commands (`lorag docs`, `adapters`, `keys`, `--help`)
# import service.cli, which must not load torch, vLLM and Chroma with the app; nor may the
# embedded vLLM, which imports its key guard (service.engine.guard) from this package.
_HOMES = {"create_app": "service.app", "Settings": "service.settings"}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
