"""`python -m training.demo build-base --out DIR [--variant tiny] [--seed N] [--force]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.demo.base import VARIANTS, BuildError, build_base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorag demo", description="Build the offline demo world.")
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("build-base", help="build the demo base model (tiny Llama + tokenizer)")
    base.add_argument("--out", type=Path, required=True, help="model directory to write")
    base.add_argument("--variant", choices=sorted(VARIANTS), default="demo")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--force", action="store_true", help="rebuild even if the same model is there")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_base(args.out, args.variant, args.seed, args.force)
    except BuildError as exc:
        parser.exit(2, f"lorag demo: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
