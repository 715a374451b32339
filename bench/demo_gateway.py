"""The gateway a benchmark measures: the demo base model built in a temporary home, one
`lorag serve` on it (embedded vLLM), stopped afterwards; the results written as JSON."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.gateway import Gateway
from training.demo.base import build_base


def run_on_demo_gateway(variant: str, model_name: str, measure: Callable[[Gateway], dict], out: Path) -> None:
    """Start the gateway, `measure` it, stop it; write what `measure` returned to `out` and print its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = build_base(home / "models" / "demo-base", variant=variant, seed=0)
        gw = Gateway(model, home, env={"LORAG_MODEL_NAME": model_name, "LORAG_LOG_LEVEL": "warning"}).start()
        try:
            print(f"engine ready after {gw.wait_ready():.0f} s", flush=True)
            results = measure(gw)
        finally:
            gw.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2), f"→ {out}")
