"""Chat with retrieval through lorag against the same final prompts sent straight to vLLM.

    .venv/bin/python -m bench.rag_bench [--requests 128] [--concurrency 32] [--variant demo]
                                        [--out bench/results/rag.json]

One run starts one `lorag serve` (embedded vLLM, the demo model), fills a collection,
then rotates three phases at the same concurrency, twice each (A B C A B C):
  lorag:  POST /v1/chat/completions with `rag` (query embedding, hybrid search, prompt assembly);
  proxy:  the final messages sent through lorag with retrieval off: what the gateway alone
          costs (HTTP, validation, relay), so that retrieval's share can be told apart;
  direct: the same final messages, sent to vLLM's own /v1/chat/completions. They are built
          here from the same search (lorag's search API) with the same prompt builder, and the
          warm-up checks that vLLM received exactly the prompt tokens it got through lorag.
Each request asks for a fixed number of tokens (ignore_eos), the same in both phases, so the
engine's work is equal; the numbers vary from request to request (max_tokens/2 to 3*max_tokens/2)
so that requests finish, and new ones arrive, spread out as in real traffic rather than in
lock-step waves of 32.
Reported: throughput ratio (output tokens/s, lorag over direct), added latency p50/p99, and
the per-request time lorag spent embedding, searching and building the prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
from transformers import AutoTokenizer

from bench import machine
from bench.demo_gateway import run_on_demo_gateway
from bench.knowledge_bench import percentile
from knowledge.prompting import PromptBuilder
from service.settings import Settings
from tests.gateway import Gateway
from training.demo.corpus import corpus

MODEL = "lorag-demo"


async def run_phase(
    url: str, bodies: list[dict], concurrency: int, path: str, headers: dict[str, str] | None = None
) -> tuple[float, list[float], list[dict]]:
    """(wall seconds, per-request latencies in ms, responses) for `bodies` sent with `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * len(bodies)
    answers: list[dict] = [{}] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as http:
        async def one(i: int, body: dict) -> None:
            async with gate:
                started = time.perf_counter()
                response = await http.post(path, json=body)
                latencies[i] = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                answers[i] = response.json()

        started = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        return time.perf_counter() - started, latencies, answers


def summarize(wall: float, latencies: list[float], tokens: int) -> dict:
    return {
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "latency_p50_ms": round(percentile(latencies, 50), 1),
        "latency_p99_ms": round(percentile(latencies, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--variant", default="demo", help="the demo base model's size: demo (5 M), small (100 M)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rag.json"))
    args = parser.parse_args()

    run_on_demo_gateway(args.variant, MODEL, lambda gw: bench(gw, args), args.out)


def bench(gw: Gateway, args: argparse.Namespace) -> dict:
    lines = corpus(5, args.documents * 6)
    docs = "\n".join(
        json.dumps({"id": f"notice-{i}", "text": " ".join(lines[i * 6:(i + 1) * 6])}) for i in range(args.documents)
    )
    httpx.post(f"{gw.url}/v1/collections", json={"name": "bench"}).raise_for_status()
    httpx.post(f"{gw.url}/v1/collections/bench/documents/bulk", content=docs, timeout=600).raise_for_status()

    questions = [q for q in corpus(11, args.requests * 4) if q.endswith("?")][: args.requests]
    lengths = [args.max_tokens // 2 + (i * 37) % (args.max_tokens + 1) for i in range(len(questions))]
    lorag_bodies = [
        {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": n,
         "ignore_eos": True, "rag": {"collection": "bench", "top_k": 4}}
        for q, n in zip(questions, lengths)
    ]
    engine, engine_headers = gw.engine_url(), gw.engine_headers()  # the engine answers only its key

    # The direct phase's prompts: the same search, the same builder, the served model's tokenizer.
    builder = PromptBuilder(AutoTokenizer.from_pretrained(gw.model), Settings().engine_max_model_len)
    direct_bodies = []
    for body in lorag_bodies:
        search = {"query": body["messages"][-1]["content"], "top_k": 4, "mode": "hybrid"}
        hits = httpx.post(f"{gw.url}/v1/collections/bench/search", json=search).json()["data"]
        passages = [SimpleNamespace(**h) for h in hits]
        messages = builder.build(body["messages"], passages, body["max_tokens"]).messages
        direct_bodies.append({**{k: v for k, v in body.items() if k != "rag"}, "messages": messages})

    # Warm-up, and proof that both paths give vLLM the same prompt.
    echo = {"return_token_ids": True}
    _, _, through = asyncio.run(run_phase(gw.url, [{**b, **echo} for b in lorag_bodies], args.concurrency, "/v1/chat/completions"))
    _, _, direct = asyncio.run(run_phase(engine, [{**b, **echo} for b in direct_bodies], args.concurrency,
                                         "/v1/chat/completions", engine_headers))
    assert all(a["prompt_token_ids"] == b["prompt_token_ids"] for a, b in zip(through, direct)), "prompts differ"

    gateway = psutil.Process(gw.proc.pid)

    def cpu_s() -> float:
        times = gateway.cpu_times()
        return times.user + times.system

    proxy_bodies = [{**b, "rag": {"enabled": False}} for b in direct_bodies]
    runs = {  # phase → (where, bodies, headers)
        "lorag": (gw.url, lorag_bodies, None),
        "proxy": (gw.url, proxy_bodies, None),
        "direct": (engine, direct_bodies, engine_headers),
    }
    phases: dict[str, list[dict]] = {name: [] for name in runs}
    all_latencies: dict[str, list[float]] = {name: [] for name in runs}
    timings: list[dict] = []
    tokens = sum(lengths)
    for _ in range(2):
        for name, (url, bodies, headers) in runs.items():
            before = cpu_s()
            wall, lat, answers = asyncio.run(run_phase(url, bodies, args.concurrency, "/v1/chat/completions", headers))
            gateway_cpu_ms = (cpu_s() - before) * 1000 / len(bodies)
            assert [a["usage"]["completion_tokens"] for a in answers] == lengths
            phases[name].append({**summarize(wall, lat, tokens), "gateway_cpu_ms_per_request": round(gateway_cpu_ms, 1)})
            all_latencies[name] += lat
            if name == "lorag":
                assert all(a["citations"] for a in answers)
                timings += [a["rag"]["timings_ms"] for a in answers]

    tps = {name: statistics.fmean(p["output_tokens_per_s"] for p in runs_) for name, runs_ in phases.items()}
    p50 = {name: percentile(lat, 50) for name, lat in all_latencies.items()}
    p99 = {name: percentile(lat, 99) for name, lat in all_latencies.items()}
    summary = {
        "throughput_ratio": round(tps["lorag"] / tps["direct"], 3),
        "lorag_output_tokens_per_s": round(tps["lorag"], 1),
        "direct_output_tokens_per_s": round(tps["direct"], 1),
        "added_latency_p50_ms": round(p50["lorag"] - p50["direct"], 1),
        "added_latency_p99_ms": round(p99["lorag"] - p99["direct"], 1),
        # The gateway without retrieval: the floor under the two numbers above on this machine.
        "proxy_throughput_ratio": round(tps["proxy"] / tps["direct"], 3),
        "proxy_added_latency_p50_ms": round(p50["proxy"] - p50["direct"], 1),
        "retrieval_ms_p50": {k: round(percentile([t[k] for t in timings], 50), 2) for k in ("embed", "search", "prompt")},
        "retrieval_ms_p99": {k: round(percentile([t[k] for t in timings], 99), 2) for k in ("embed", "search", "prompt")},
    }
    summary["targets"] = {
        "throughput_ratio >= 0.90": summary["throughput_ratio"] >= 0.90,
        "added p50 latency < 30 ms": summary["added_latency_p50_ms"] < 30,
    }
    return {
        "benchmark": "rag",
        "model": args.variant,
        "requests_per_phase": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "documents": args.documents,
        "machine": machine.description(),
        "phases": phases,
        "summary": summary,
    }


if __name__ == "__main__":
    main()
