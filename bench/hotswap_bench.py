"""Adapter hot-swap under streaming load: throughput and failures while versions are activated back to back.

    .venv/bin/python -m bench.hotswap_bench [--concurrency 16] [--max-tokens 32] [--duration 20]
        [--pause 0.5] [--variant demo] [--out bench/results/hotswap.json]

One run starts one `lorag serve` (embedded vLLM, the demo model), uploads two versions v1 and v2
of the adapter `bench` (real peft LoRA adapters, different seeds), activates v1 and warms up.
A short swap phase (at most 5 s, not recorded) ends the warm-up.
Then it alternates two phases of the same load (A B A B ..., `--rounds` pairs), so drift cancels:
  steady: C streaming clients, each sending one chat request after the other with
          `model: "bench"`, a fixed output length (max_tokens N, ignore_eos);
  swap:   the same load, while one more task activates v2, v1, v2, ... back to back,
          with a short pause between an activation's answer and the next request.
Clients start staggered over one request's duration (measured in the warm-up), so that their
requests stay spread out instead of moving in lock-step waves, and the measured window of each
phase (`--duration` seconds) begins once all of them run. After a swap phase, v1 is activated
again (untimed) so that every phase starts from the same state.

Per request: HTTP status, every `data:` frame, the served name (`model`, the same in every chunk),
the arrival time of its first chunk and of each output token (from the usage that
`stream_options.continuous_usage_stats` puts in every chunk). A request fails on a non-200
answer, an `"error"` frame, a stream that does not end with `data: [DONE]`, a transport error,
or an output length other than N; failures count in the phase the request was sent in.
Throughput: output tokens that arrived inside the window, over the window.
Activation time: from sending the activate request to the first chunk, from any client, of a
request served by the new version (its `model` is the new served name) whose first chunk came
after that send (a request whose first chunk came earlier was admitted before the swap) and
that was sent after the previous activation's answer (so a request still held by the same
version from two activations ago cannot end it). Also the activate request's round trip and
the server's own `elapsed_ms`.
Reported: throughput swap over steady (target >= 0.90), failed requests while activating
(target 0), activation time p50/p99/max, activate round trip p50/p99, requests per version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import machine
from bench.knowledge_bench import percentile
from tests.adapters import make_adapter, pack
from tests.gateway import Gateway
from training.demo.base import build_base
from training.demo.corpus import corpus

MODEL = "lorag-demo"
ADAPTER = "bench"


@dataclass
class Request:
    """One streamed chat request, as the client saw it (times are time.perf_counter())."""

    sent: float
    status: int = 0
    model: str | None = None
    models: set[str] = field(default_factory=set)
    first_chunk: float | None = None
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (arrival, new output tokens)
    completion_tokens: int = 0
    done: bool = False  # ended with data: [DONE]
    error: str | None = None
    finished: float = 0.0


@dataclass
class Activation:
    target: str  # served name, bench@VERSION
    sent: float
    answered: float = 0.0
    status: int = 0
    elapsed_ms: float | None = None
    changed: bool | None = None
    error: str | None = None
    served_from: float | None = None  # first chunk served by `target`, as the docstring defines it

    @property
    def round_trip_ms(self) -> float:
        return (self.answered - self.sent) * 1000

    @property
    def activation_ms(self) -> float | None:
        return None if self.served_from is None else (self.served_from - self.sent) * 1000


class Load:
    """C clients streaming chat requests back to back until stopped."""

    def __init__(self, http: httpx.AsyncClient, bodies: list[dict], concurrency: int, max_tokens: int):
        self.http, self.bodies, self.concurrency, self.max_tokens = http, bodies, concurrency, max_tokens
        self.requests: list[Request] = []
        self.stop = asyncio.Event()
        self._next = 0

    async def run(self, stagger_s: float) -> None:
        await asyncio.gather(*(self._client(i * stagger_s / self.concurrency) for i in range(self.concurrency)))

    async def _client(self, delay: float) -> None:
        await asyncio.sleep(delay)
        while not self.stop.is_set():
            body = self.bodies[self._next % len(self.bodies)]
            self._next += 1
            req = Request(sent=time.perf_counter())
            self.requests.append(req)
            await self._one(req, body)

    async def _one(self, req: Request, body: dict) -> None:
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                req.status = response.status_code
                if response.status_code != 200:
                    req.error = f"{response.status_code}: {(await response.aread())[:300]!r}"
                    return
                pending = b""
                # Split on bytes: a text line reader would also cut at U+2028 and U+0085 inside JSON strings.
                async for block in response.aiter_bytes():
                    now = time.perf_counter()
                    *frames, pending = (pending + block).split(b"\n\n")
                    for frame in frames:
                        self._frame(req, frame.decode(), now)
            if not req.done:
                req.error = req.error or "stream did not end with data: [DONE]"
            elif req.error is None and req.completion_tokens != self.max_tokens:
                req.error = f"{req.completion_tokens} output tokens, not {self.max_tokens}"
        except (httpx.HTTPError, ValueError) as exc:
            req.error = req.error or f"{exc.__class__.__name__}: {exc}"
        finally:
            req.finished = time.perf_counter()


    def _frame(self, req: Request, line: str, now: float) -> None:
        if not line:
            return
        if req.done:
            req.error = f"data after [DONE]: {line[:200]!r}"
            return
        if not line.startswith("data: "):
            req.error = req.error or f"not a data line: {line[:200]!r}"
            return
        data = line[len("data: "):]
        if data == "[DONE]":
            req.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            req.error = req.error or f"error frame: {data[:300]}"
            return
        if req.first_chunk is None:
            req.first_chunk = now
        if chunk.get("model"):
            req.models.add(chunk["model"])
            req.model = req.model or chunk["model"]
        usage = chunk.get("usage") or {}
        count = usage.get("completion_tokens")
        if isinstance(count, int) and count > req.completion_tokens:
            req.tokens.append((now, count - req.completion_tokens))
            req.completion_tokens = count


class Swapper:
    """Activates the two versions in turn, `pause` seconds apart, until `deadline`."""

    def __init__(self, admin: httpx.AsyncClient, versions: list[str], pause: float):
        self.admin, self.versions, self.pause = admin, versions, pause
        self.activations: list[Activation] = []

    async def run(self, deadline: float) -> None:
        i = 1  # the phase starts with versions[0] active
        while time.perf_counter() < deadline:
            version = self.versions[i % 2]
            act = Activation(target=f"{ADAPTER}@{version}", sent=time.perf_counter())
            self.activations.append(act)
            try:
                response = await self.admin.post(f"/v1/adapters/{ADAPTER}/activate", json={"version": version})
                act.answered = time.perf_counter()
                act.status = response.status_code
                if response.status_code == 200:
                    report = response.json()
                    act.elapsed_ms, act.changed = report.get("elapsed_ms"), report.get("changed")
                    if report.get("served_name") != act.target:
                        act.error = f"served_name {report.get('served_name')!r}, expected {act.target!r}"
                else:
                    act.error = f"{response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as exc:
                act.answered = time.perf_counter()
                act.error = f"{exc.__class__.__name__}: {exc}"
            i += 1
            await asyncio.sleep(self.pause)


def observe(activations: list[Activation], requests: list[Request], since: float) -> None:
    """Set each activation's `served_from` (see the module docstring)."""
    for i, act in enumerate(activations):
        earliest_send = activations[i - 1].answered if i else since
        firsts = [
            r.first_chunk for r in requests
            if r.model == act.target and r.first_chunk is not None and r.first_chunk > act.sent
            and r.sent > earliest_send
        ]
        act.served_from = min(firsts) if firsts else None


async def activate(admin: httpx.AsyncClient, version: str) -> dict:
    response = await admin.post(f"/v1/adapters/{ADAPTER}/activate", json={"version": version})
    assert response.status_code == 200, response.text
    return response.json()


async def phase(kind: str, gw: Gateway, bodies: list[dict], versions: list[str], args, stagger_s: float,
                duration: float) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=gw.url, timeout=600, limits=limits) as http, \
            httpx.AsyncClient(base_url=gw.url, timeout=600) as admin:
        load = Load(http, bodies, args.concurrency, args.max_tokens)
        started = time.perf_counter()
        clients = asyncio.create_task(load.run(stagger_s))
        window_start = started + stagger_s
        window_end = window_start + duration
        swapper = Swapper(admin, versions, args.pause)
        await asyncio.sleep(window_start - time.perf_counter())
        if kind == "swap":
            await swapper.run(window_end)
            # Keep the load on until the last activation is served by its version (or 10 s).
            waited = time.perf_counter()
            while time.perf_counter() - waited < 10:
                observe(swapper.activations[-1:], load.requests, swapper.activations[-1].sent)
                if swapper.activations[-1].served_from is not None:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        load.stop.set()
        await clients
        if kind == "swap":
            await activate(admin, versions[0])  # the next phase starts from v1, as this one did
    observe(swapper.activations, load.requests, window_start)
    return summarize_phase(kind, load.requests, swapper.activations, window_start, window_end, versions)


def summarize_phase(kind, requests, activations, start, end, versions) -> dict:
    tokens = sum(n for r in requests for t, n in r.tokens if start <= t <= end)
    failed = [r for r in requests if r.error]
    served: dict[str, int] = {}
    for r in requests:
        for model in r.models:
            served[model] = served.get(model, 0) + 1
    expected = {f"{ADAPTER}@{v}" for v in versions}
    out = {
        "kind": kind,
        "window_s": round(end - start, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / (end - start), 1),
        "requests_sent": len(requests),
        "requests_completed_in_window": sum(1 for r in requests if not r.error and start <= r.finished <= end),
        "requests_failed": len(failed),
        "failures": [f.error for f in failed[:5]],
        "served": served,
        "unexpected_served_name": sum(1 for r in requests if r.models - expected),
        "mixed_served_name": sum(1 for r in requests if len(r.models) > 1),
    }
    if kind == "swap":
        out["activations"] = [
            {"target": a.target, "status": a.status, "changed": a.changed, "error": a.error,
             "round_trip_ms": round(a.round_trip_ms, 1), "server_elapsed_ms": a.elapsed_ms,
             "activation_ms": None if a.activation_ms is None else round(a.activation_ms, 1)}
            for a in activations
        ]
    return out


def stats(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1),
            "max": round(max(values), 1)}


async def bench(gw: Gateway, model: Path, work: Path, args: argparse.Namespace) -> dict:
    print("building adapters ...", flush=True)
    versions = []
    async with httpx.AsyncClient(base_url=gw.url, timeout=600) as admin:
        for seed in (1, 2):
            folder = make_adapter(model, work / f"adapter-v{seed}", seed=seed)
            response = await admin.post(f"/v1/adapters/{ADAPTER}/versions",
                                        files={"file": ("adapter.tar.gz", pack(folder))})
            assert response.status_code == 201, response.text
            versions.append(response.json()["version"]["version"])
        await activate(admin, versions[0])

    questions = [q for q in corpus(11, 1000) if q.endswith("?")][:128]
    bodies = [
        {"model": ADAPTER, "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
         "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        for q in questions
    ]

    # Warm-up: two waves at full concurrency; the second gives one request's duration under load.
    print("warm-up ...", flush=True)
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=gw.url, timeout=600, limits=limits) as http:
        load = Load(http, bodies, args.concurrency, args.max_tokens)
        for _ in range(2):
            reqs = [Request(sent=time.perf_counter()) for _ in range(args.concurrency)]
            await asyncio.gather(*(load._one(r, bodies[i]) for i, r in enumerate(reqs)))
            bad = [r.error for r in reqs if r.error]
            assert not bad, bad[:3]
            assert {r.model for r in reqs} == {f"{ADAPTER}@{versions[0]}"}, {r.model for r in reqs}
    request_s = statistics.median(r.finished - r.sent for r in reqs)
    print(f"one request under load: {request_s:.2f} s", flush=True)
    # A short swap phase, not recorded: both versions loaded once, the staggered load's batch shapes seen.
    await phase("swap", gw, bodies, versions, args, request_s, min(args.duration, 5.0))

    phases: dict[str, list[dict]] = {"steady": [], "swap": []}
    for round_ in range(args.rounds):
        for kind in ("steady", "swap"):
            result = await phase(kind, gw, bodies, versions, args, request_s, args.duration)
            phases[kind].append(result)
            line = (f"round {round_ + 1} {kind:6}: {result['output_tokens_per_s']:7.1f} tok/s, "
                    f"{result['requests_sent']} requests, {result['requests_failed']} failed")
            if kind == "swap":
                acts = result["activations"]
                observed = [a["activation_ms"] for a in acts if a["activation_ms"] is not None]
                line += f", {len(acts)} activations (activation p50 {stats(observed)['p50']} ms)"
            print(line, flush=True)

    steady_tps = statistics.fmean(p["output_tokens_per_s"] for p in phases["steady"])
    swap_tps = statistics.fmean(p["output_tokens_per_s"] for p in phases["swap"])
    acts = [a for p in phases["swap"] for a in p["activations"]]
    activation_ms = [a["activation_ms"] for a in acts if a["activation_ms"] is not None]
    served: dict[str, int] = {}
    for p in phases["steady"] + phases["swap"]:
        for model, n in p["served"].items():
            served[model] = served.get(model, 0) + n
    summary = {
        "throughput_ratio": round(swap_tps / steady_tps, 3),
        # Each swap phase over the steady phase just before it: the spread shows the machine's noise.
        "throughput_ratio_per_round": [round(b["output_tokens_per_s"] / a["output_tokens_per_s"], 3)
                                       for a, b in zip(phases["steady"], phases["swap"])],
        "steady_output_tokens_per_s": round(steady_tps, 1),
        "swap_output_tokens_per_s": round(swap_tps, 1),
        "failed_requests_steady": sum(p["requests_failed"] for p in phases["steady"]),
        "failed_requests_swap": sum(p["requests_failed"] for p in phases["swap"]),
        "activations": len(acts),
        "activations_failed": sum(1 for a in acts if a["error"] or not a["changed"]),
        "activations_unobserved": len(acts) - len(activation_ms),
        "activation_ms": stats(activation_ms),
        "activate_round_trip_ms": stats([a["round_trip_ms"] for a in acts]),
        "activate_server_elapsed_ms": stats([a["server_elapsed_ms"] for a in acts if a["server_elapsed_ms"] is not None]),
        "requests_per_version": {v: served.get(f"{ADAPTER}@{v}", 0) for v in versions},
        "unexpected_served_name": sum(p["unexpected_served_name"] for p in phases["steady"] + phases["swap"]),
    }
    checks = {
        "throughput_ratio >= 0.90": summary["throughput_ratio"] >= 0.90,
        "0 failed requests during activations": summary["failed_requests_swap"] == 0,
    }
    summary["targets"] = {name: {"met": met} for name, met in checks.items()}
    summary["met"] = all(checks.values())
    return {
        "benchmark": "hotswap",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "variant": args.variant,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "duration_s": args.duration,
            "pause_s": args.pause,
            "rounds": args.rounds,
            "prompts": len(bodies),
            "stagger_s": round(request_s, 3),
        },
        "versions": versions,
        "machine": machine.description(),
        "phases": phases,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15, help="seconds measured in each phase")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between activations")
    parser.add_argument("--rounds", type=int, default=4, help="steady+swap pairs (A B A B)")
    parser.add_argument("--variant", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hotswap.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = build_base(home / "models" / f"{args.variant}-base", variant=args.variant, seed=0)
        gw = Gateway(model, home, env={"LORAG_MODEL_NAME": MODEL, "LORAG_LOG_LEVEL": "warning"}).start()
        try:
            print(f"engine ready after {gw.wait_ready():.0f} s", flush=True)
            results = asyncio.run(bench(gw, model, home, args))
        finally:
            gw.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2), f"→ {args.out}")


if __name__ == "__main__":
    main()
