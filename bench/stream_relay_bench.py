"""Streamed chat through lorag against vLLM directly, measured by vLLM's own serving benchmark.

    .venv/bin/python -m bench.stream_relay_bench [--rounds 4] [--prompts 256] [--concurrency 32]
                                                 [--variant demo] [--out bench/results/stream_relay.json]

One run starts one `lorag serve` (embedded vLLM, the demo model) and drives it with the
client that ships in vLLM (`vllm.benchmarks.serve`: backend openai-chat, random dataset,
128 tokens in, 64 out, ignore_eos, 32 concurrent), in rounds that alternate the target
(lorag, direct, direct, lorag, ...), so both see the same machine load. No retrieval:
this measures the gateway's relay (admission, HTTP, the per-frame work), nothing else.
Reported per round: streamed output tokens/s, failures, and for the lorag rounds the
gateway process's CPU time per relayed output token (user + system, in microseconds);
over all rounds: the throughput ratio lorag/direct (target: at least 0.95).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
from pathlib import Path

import psutil
from vllm.benchmarks.serve import add_cli_args, main as vllm_bench
from vllm.utils.argparse_utils import FlexibleArgumentParser

from bench import machine
from bench.demo_gateway import run_on_demo_gateway
from tests.gateway import Gateway

MODEL = "demo-base"


def run_round(url: str, model: Path, args: argparse.Namespace, seed: int, headers: dict[str, str] | None = None) -> dict:
    """One `vllm bench serve` run against `url` (sending `headers`); its result dict."""
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions",
        "--model", MODEL, "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.prompts), "--max-concurrency", str(args.concurrency),
        "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,itl,e2el",
        *(["--header", *(f"{k}={v}" for k, v in headers.items())] if headers else []),
    ])
    with contextlib.redirect_stdout(io.StringIO()):  # its report table; the numbers come back as a dict
        return vllm_bench(bench_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per target")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--variant", default="demo", help="the demo base model's size: demo (5 M), small (100 M)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream_relay.json"))
    args = parser.parse_args()

    run_on_demo_gateway(args.variant, MODEL, lambda gw: bench(gw, gw.model, args), args.out)


def bench(gw: Gateway, model: Path, args: argparse.Namespace) -> dict:
    gateway = psutil.Process(gw.proc.pid)
    targets = {"lorag": (gw.url, None), "direct": (gw.engine_url(), gw.engine_headers())}  # the engine wants its key

    def cpu_s() -> float:
        times = gateway.cpu_times()  # the gateway alone; its engine child is not counted
        return times.user + times.system

    for url, headers in targets.values():  # warm-up: first-request costs out of the way on both paths
        run_round(url, model, argparse.Namespace(**{**vars(args), "prompts": args.concurrency}), seed=99, headers=headers)
    rounds: list[dict] = []
    for r in range(args.rounds):
        for name in (("lorag", "direct") if r % 2 == 0 else ("direct", "lorag")):
            before = cpu_s()
            url, headers = targets[name]
            result = run_round(url, model, args, seed=r, headers=headers)
            cpu = cpu_s() - before
            tokens = result["total_output_tokens"]
            entry = {
                "target": name,
                "output_tokens_per_s": round(result["output_throughput"], 1),
                "completed": result["completed"],
                "failed": result["failed"],
                "output_tokens": tokens,
                "median_ttft_ms": round(result["median_ttft_ms"], 1),
                "median_itl_ms": round(result["median_itl_ms"], 2),
                # Direct rounds show the gateway idle: the floor under the lorag figure.
                "gateway_cpu_us_per_token": round(cpu * 1e6 / max(tokens, 1), 1),
            }
            rounds.append(entry)
            print(json.dumps(entry), flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(e[key] for e in rounds if e["target"] == name)

    ratios = [a["output_tokens_per_s"] / b["output_tokens_per_s"]
              for a, b in zip([e for e in rounds if e["target"] == "lorag"], [e for e in rounds if e["target"] == "direct"])]
    summary = {
        "throughput_ratio": round(mean("lorag", "output_tokens_per_s") / mean("direct", "output_tokens_per_s"), 3),
        "throughput_ratio_per_round": [round(x, 3) for x in ratios],
        "lorag_output_tokens_per_s": round(mean("lorag", "output_tokens_per_s"), 1),
        "direct_output_tokens_per_s": round(mean("direct", "output_tokens_per_s"), 1),
        "gateway_cpu_us_per_relayed_token": round(mean("lorag", "gateway_cpu_us_per_token"), 1),
        "failed": sum(e["failed"] for e in rounds),
    }
    summary["targets"] = {"throughput_ratio >= 0.95": summary["throughput_ratio"] >= 0.95}
    return {
        "benchmark": "stream_relay",
        "client": "vllm.benchmarks.serve (openai-chat, random dataset, ignore_eos)",
        "model": args.variant,
        "prompts_per_round": args.prompts,
        "concurrency": args.concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "machine": machine.description(),
        "rounds": rounds,
        "summary": summary,
    }


if __name__ == "__main__":
    main()
