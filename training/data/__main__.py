"""`python -m training.data check TRAIN.jsonl [--eval EVAL.jsonl] --model DIR [--max-seq-len N] [--json] [--show LINE]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.data.doctor import check, show, text
from training.data.masking import Renderer, TemplateError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorag data", description="Check training data before training.")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "check", help="every problem of a chat fine-tuning file, at its line (exit status 1 on errors)",
        description="Rows: {\"messages\": [{\"role\", \"content\", \"weight\"?}]}, rendered with the model's chat "
        "template and masked as the recipe trains them.")
    doctor.add_argument("train", type=Path, metavar="TRAIN.jsonl")
    doctor.add_argument("--eval", type=Path, metavar="EVAL.jsonl", help="checked too; rows in both are errors")
    doctor.add_argument("--model", type=Path, required=True, help="the base model folder (its tokenizer and template)")
    doctor.add_argument("--max-seq-len", type=int, default=1024, help="longest row, in tokens (default 1024)")
    doctor.add_argument("--json", action="store_true", help="print {errors, warnings, summary} as JSON")
    doctor.add_argument("--show", type=int, metavar="LINE", help="print that row's tokens beside their labels")
    doctor.add_argument("--no-estimate", action="store_true", help="skip timing a training step on this machine")
    args = parser.parse_args(argv)

    for path in (args.train, args.eval):
        if path is not None and not path.is_file():
            parser.exit(2, f"lorag data check: {path} is not a file\n")
    if args.max_seq_len < 1:
        parser.exit(2, "lorag data check: --max-seq-len must be at least 1\n")
    try:
        renderer = Renderer.load(args.model)
        if args.show is not None:
            print(show(args.train, args.show, renderer, args.max_seq_len))
            return 0
        report = check(args.train, renderer, args.max_seq_len, args.eval, None if args.no_estimate else args.model)
    except (TemplateError, LookupError, OSError) as exc:
        parser.exit(2, f"lorag data check: {exc}\n")
    print(json.dumps(report.as_json(), indent=2) if args.json else text(report, args.train))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
