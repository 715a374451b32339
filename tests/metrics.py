"""Read one sample from the gateway's Prometheus text."""

from __future__ import annotations


def sample(metrics: str, name: str, *, missing: float | None = None, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels`; `missing` if there is
    none (a series that has not been touched yet), or an AssertionError when `missing` is None."""
    for line in metrics.splitlines():
        if (line.startswith(name + "{") or not labels and line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if missing is not None:
        return missing
    raise AssertionError(f"no {name} with {labels} in /metrics")
