"""The demo world's commands (`lorag demo ...` runs them):

    python -m training.demo build-base --out DIR [--variant tiny] [--seed N] [--force]
    python -m training.demo world --out DIR [--seed N] [--collection statutes]
    python -m training.demo story --url URL --world DIR --out DIR [--api-key KEY]
    python -m training.demo run --home DIR --model DIR --url URL [--seed N] [--retrain] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.demo.base import VARIANTS, BuildError, build_base
from training.demo.run import DemoFailed, add_arguments, run
from training.demo.world import COLLECTION, world, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorag demo", description="Build the offline demo world.")
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("build-base", help="build the demo base model (tiny Llama + tokenizer)")
    base.add_argument("--out", type=Path, required=True, help="model directory to write")
    base.add_argument("--variant", choices=sorted(VARIANTS), default="demo")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--force", action="store_true", help="rebuild even if the same model is there")
    files = commands.add_parser("world", help="write the seed's statutes, amendments, RAFT questions and suites")
    files.add_argument("--out", type=Path, required=True, help="folder to write")
    files.add_argument("--seed", type=int, default=0)
    files.add_argument("--collection", default=COLLECTION, help=f"the suites' collection (default: {COLLECTION})")
    told = commands.add_parser("story", help="the measured story: the suites in every cell, before and after "
                               "the amendments are pushed (exit 1 if a suite's gate fails)")
    told.add_argument("--url", required=True, help="a lorag service serving the legal adapter")
    told.add_argument("--world", type=Path, required=True, help="the folder `world` wrote")
    told.add_argument("--out", type=Path, required=True, help="where story.json, story.md and the charts go")
    told.add_argument("--api-key", default=os.environ.get("LORAG_API_KEY"), help="(LORAG_API_KEY)")
    add_arguments(commands.add_parser("run", help="build what is missing of the legal demo, then keep serving"))
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "world":
        for path in write(world(args.seed), args.out, args.collection).values():
            print(path)
        return 0
    if args.command == "story":
        return _story(parser, args)
    if args.command == "run":
        try:
            return run(args)
        except DemoFailed as exc:
            parser.exit(1, f"lorag demo: {exc}\n")
    try:
        build_base(args.out, args.variant, args.seed, args.force)
    except BuildError as exc:
        parser.exit(2, f"lorag demo: {exc}\n")
    return 0


def _story(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from training.demo.story import StoryFailed, story
    from training.eval.chat import ChatFailed
    from training.eval.suite import SuiteError

    try:
        result = story(args.url, args.world, args.out, api_key=args.api_key)
    except (StoryFailed, ChatFailed, SuiteError, OSError) as exc:
        parser.exit(2, f"lorag demo story: {exc}\n")
    print((args.out / "story.md").read_text(encoding="utf-8"))
    failed = {suite: failures for suite, failures in result["gates"].items() if failures}
    for suite, failures in failed.items():
        print(f"lorag demo story: the {suite} gate failed:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
