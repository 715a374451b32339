"""`lorag demo run`: build what is missing of the legal demo, in order, then keep serving.

    lorag demo run [--seed 0] [--articles 300] [--held-out 60] [--retrain] [--attach] [--exit]

  1. world     the seed's statutes, amendments, RAFT questions and suites (LORAG_HOME/demo/world-SEED)
  2. base      the demo base model, if the service has none (`lorag demo build-base`)
  3. serve     `lorag serve` in a child process, until /readyz answers
  4. statutes  the collection, through the bulk API (documents already there stay unchanged)
  5. raft      RAFT rows over the live collection (`lorag data raft`), plus the general rows
  6. adapter   the recipe on them (training/configs/demo-legal.yaml), unless it was trained before
  7. gate      `lorag adapters push --gate suite.yaml --activate --rag-collection statutes`:
               the adapter is activated, with the statutes as its retrieval default, only if it
               passes; otherwise the base keeps serving and the failing checks are listed
  then serve until interrupted (Ctrl-C stops the service too). With --attach, stages 2 and 3
  are skipped: the demo is built on the service already running at the URL.

Every stage is one of lorag's own commands, run as a user would run it, so each shows its own
progress; this file is only their order.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from training.demo.world import ADAPTER, COLLECTION, TOP_K, general, world, write

CONFIG = Path(__file__).parents[1] / "configs" / "demo-legal.yaml"
ORACLE_SHARE = 0.9  # RAFT: a tenth of the rows hold only near-misses, and the answer says so


class DemoFailed(RuntimeError):
    """A stage failed; the message names it."""


def lorag(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def stage(name: str, command: list[str]) -> None:
    print(f"lorag demo: {name}: {' '.join(command[3:])}", flush=True)
    if subprocess.call(command) != 0:
        raise DemoFailed(f"stage {name} failed (see above)")


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoFailed(f"the service exited ({server.returncode}) before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise DemoFailed(f"the service was not ready within {timeout:.0f} s")


def general_rows(seed: int) -> list[dict]:
    """The base model's own Calder Bay facts, replayed so the adapter does not forget them."""
    return [{"messages": [{"role": "user", "content": g.question}, {"role": "assistant", "content": g.answer}]}
            for g in general(seed)]


def run(args: argparse.Namespace) -> int:
    home, url = args.home, args.url.rstrip("/")
    work = home / "demo" / f"world-{args.seed}"
    collection = args.collection
    files = write(world(args.seed, args.articles, args.held_out), work, collection)
    print(f"lorag demo: world {args.seed} written to {work}", flush=True)
    if not args.attach and not (args.model / "config.json").exists():
        stage("base", lorag("demo", "build-base", "--out", str(args.model), "--variant", args.variant))

    server = None if args.attach else subprocess.Popen(lorag("serve"), start_new_session=True)
    try:
        if server is not None:
            wait_ready(url, server, args.ready_timeout)
        from training.demo.story import push_documents

        summary = push_documents(url, files["statutes.jsonl"], collection)
        print(f"lorag demo: statutes: {json.dumps(summary)}", flush=True)
        adapter = work / "adapter"
        if args.retrain or not (adapter / "adapter_model.safetensors").exists():
            raft = work / "raft-rows.jsonl"
            stage("raft", lorag("data", "raft", "--url", url, "--collection", collection, "--questions",
                                str(files["raft-questions.jsonl"]), "--out", str(raft), "--top-k", str(TOP_K),
                                "--oracle-share", str(ORACLE_SHARE), "--seed", str(args.seed)))
            rows = work / "train.jsonl"
            rows.write_text(raft.read_text(encoding="utf-8") + "".join(
                json.dumps(r) + "\n" for r in general_rows(args.seed)), encoding="utf-8")
            stage("adapter", lorag("train", str(CONFIG), f"train={rows}", f"output={adapter}",
                                   *args.train_overrides))
        pushed = subprocess.call(lorag("adapters", "--url", url, "push", str(adapter), "--name", ADAPTER,
                                       "--activate", "--gate", str(files["suite.yaml"]),
                                       "--rag-collection", collection, "--rag-top-k", str(TOP_K)))
        if pushed == 0:
            print(f"lorag demo: {ADAPTER} is serving at {url} with retrieval from {collection}", flush=True)
        else:
            print(f"lorag demo: {ADAPTER} did not pass its gate: the base model serves at {url}", flush=True)
        if args.exit or server is None:
            return pushed
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the service drains, then stops its engine
            server.wait(timeout=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, required=True, help="LORAG_HOME (given by `lorag demo`)")
    parser.add_argument("--model", type=Path, required=True, help="the served model folder (given by `lorag demo`)")
    parser.add_argument("--url", required=True, help="where `lorag serve` listens (given by `lorag demo`)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (default: 0)")
    parser.add_argument("--articles", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=60)
    parser.add_argument("--collection", default=COLLECTION, help=f"the statutes' collection (default: {COLLECTION})")
    parser.add_argument("--variant", default="demo", help="the base model to build if there is none")
    parser.add_argument("--attach", action="store_true", help="use the service running at --url; start none")
    parser.add_argument("--retrain", action="store_true", help="train the adapter again even if one was trained")
    parser.add_argument("--exit", action="store_true", help="stop the service once the adapter is judged "
                        "(exit status: the gate's)")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the service")
    parser.add_argument("train_overrides", nargs="*", metavar="key=value", help="for the recipe, e.g. epochs=1")
