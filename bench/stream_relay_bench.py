"""Streamed chat through lorag against vLLM directly, measured by vLLM's own serving benchmark.

    .venv/bin/python -m bench.stream_relay_bench [--rounds 4] [--prompts 256] [--concurrency 32]
                                                 [--variant demo] [--out bench/results/stream_relay.json]

One run starts one `lorag serve` (embedded vLLM, the demo model) and drives it with the
client that ships in vLLM (`vllm.benchmarks.serve`: backend openai-chat, random dataset,
128 tokens in, 64 out, ignore_eos, 32 concurrent), in rounds that alternate the target,
so all see the same machine load. No retrieval: this measures the gateway's relay
(admission, HTTP, the per-frame work), nothing else. The targets: lorag, the engine
directly, and the engine through `bench.byte_relay`, a relay that copies bytes and
parses nothing: the most any relay process can keep of direct's throughput here.
Reported per round: streamed output tokens/s, failures, and the relaying process's CPU
time per relayed output token (user + system, in microseconds; the gateway's in the
direct rounds shows it idle); over all rounds: lorag/direct (target: at least 0.95),
byte relay/direct, and lorag/byte relay.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
from vllm.benchmarks.serve import add_cli_args, main as vllm_bench
from vllm.utils.argparse_utils import FlexibleArgumentParser

from bench import machine
from bench.demo_gateway import run_on_demo_gateway
from service.engine.launcher import free_port
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
    engine = urlparse(gw.engine_url())
    relay_port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "bench.byte_relay", engine.hostname, str(engine.port), str(relay_port)])
    try:
        _wait_listening(relay_port)
        gateway = psutil.Process(gw.proc.pid)  # the gateway alone; its engine child is not counted
        targets = {  # name: url, headers, the process that relays
            "lorag": (gw.url, None, gateway),
            "direct": (gw.engine_url(), gw.engine_headers(), gateway),  # the engine wants its key
            "byte_relay": (f"http://127.0.0.1:{relay_port}", gw.engine_headers(), psutil.Process(relay.pid)),
        }
        return _measure(targets, model, args)
    finally:
        relay.kill()
        relay.wait()


def _measure(targets: dict[str, tuple[str, dict | None, psutil.Process]], model: Path, args: argparse.Namespace) -> dict:
    def cpu_s(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    for url, headers, _ in targets.values():  # warm-up: first-request costs out of the way on every path
        run_round(url, model, argparse.Namespace(**{**vars(args), "prompts": args.concurrency}), seed=99, headers=headers)
    rounds: list[dict] = []
    order = list(targets)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            url, headers, relaying = targets[name]
            before = cpu_s(relaying)
            result = run_round(url, model, args, seed=r, headers=headers)
            cpu = cpu_s(relaying) - before
            tokens = result["total_output_tokens"]
            entry = {
                "target": name,
                "output_tokens_per_s": round(result["output_throughput"], 1),
                "completed": result["completed"],
                "failed": result["failed"],
                "output_tokens": tokens,
                "median_ttft_ms": round(result["median_ttft_ms"], 1),
                "median_itl_ms": round(result["median_itl_ms"], 2),
                "relay_cpu_us_per_token": round(cpu * 1e6 / max(tokens, 1), 1),
            }
            rounds.append(entry)
            print(json.dumps(entry), flush=True)

    def mean(name: str, key: str = "output_tokens_per_s") -> float:
        return statistics.fmean(e[key] for e in rounds if e["target"] == name)

    def per_round(a: str, b: str) -> list[float]:
        pairs = zip([e for e in rounds if e["target"] == a], [e for e in rounds if e["target"] == b])
        return [round(x["output_tokens_per_s"] / y["output_tokens_per_s"], 3) for x, y in pairs]

    summary = {
        "throughput_ratio": round(mean("lorag") / mean("direct"), 3),
        "throughput_ratio_per_round": per_round("lorag", "direct"),
        "byte_relay_ratio": round(mean("byte_relay") / mean("direct"), 3),
        "byte_relay_ratio_per_round": per_round("byte_relay", "direct"),
        "lorag_to_byte_relay": round(mean("lorag") / mean("byte_relay"), 3),
        "lorag_output_tokens_per_s": round(mean("lorag"), 1),
        "direct_output_tokens_per_s": round(mean("direct"), 1),
        "byte_relay_output_tokens_per_s": round(mean("byte_relay"), 1),
        "gateway_cpu_us_per_relayed_token": round(mean("lorag", "relay_cpu_us_per_token"), 1),
        "byte_relay_cpu_us_per_relayed_token": round(mean("byte_relay", "relay_cpu_us_per_token"), 1),
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


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":
    main()
