"""`python -m training.data check TRAIN.jsonl [--eval EVAL.jsonl] --model DIR [--max-seq-len N] [--json] [--show LINE]`."""

from __future__ import annotations

import argparse
import json
import os
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
    raft = commands.add_parser(
        "raft", help="RAFT rows: questions answered over the running service's real search results",
        description="Q.jsonl lines: {\"id\"?, \"question\", \"answer\", \"doc_id\"} (doc_id: the document holding the answer).")
    raft.add_argument("--url", required=True, help="the lorag service")
    raft.add_argument("--collection", required=True)
    raft.add_argument("--questions", type=Path, required=True, metavar="Q.jsonl")
    raft.add_argument("--out", type=Path, required=True, metavar="ROWS.jsonl")
    raft.add_argument("--oracle-share", type=float, default=0.8, help="rows that keep the oracle document (0.8)")
    raft.add_argument("--top-k", type=int, default=5, help="sources per row, as chat retrieves (LORAG_RAG_TOP_K)")
    raft.add_argument("--mode", choices=["hybrid", "dense", "keyword"], default="hybrid", help="(LORAG_RAG_MODE)")
    raft.add_argument("--max-tokens", type=int, default=1024, help="the output budget chat reserves (LORAG_MAX_TOKENS)")
    raft.add_argument("--context-tokens", type=int, default=2048, help="(LORAG_ENGINE_MAX_MODEL_LEN)")
    raft.add_argument("--system-template", help="(LORAG_RAG_SYSTEM_TEMPLATE; default: the service's default)")
    raft.add_argument("--model", type=Path, required=True, help="the served model folder (its tokenizer)")
    raft.add_argument("--seed", type=int, default=0)
    raft.add_argument("--refresh", type=Path, metavar="ROWS.jsonl", help="keep its rows whose documents are unchanged")
    raft.add_argument("--api-key", default=os.environ.get("LORAG_API_KEY"), help="(LORAG_API_KEY)")
    args = parser.parse_args(argv)
    if args.command == "raft":
        return _raft(parser, args)

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


def _raft(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import httpx
    from transformers import AutoTokenizer

    from knowledge.prompting import DEFAULT_SYSTEM_TEMPLATE, PromptBuilder
    from training.data.raft import RaftBuilder, RaftError, build, questions

    if not 0 <= args.oracle_share <= 1:
        parser.exit(2, "lorag data raft: --oracle-share must be from 0 to 1\n")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        items = questions(args.questions)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        prompts = PromptBuilder(tokenizer, args.context_tokens, args.system_template or DEFAULT_SYSTEM_TEMPLATE)
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=120) as http:
            raft = RaftBuilder(http, args.collection, prompts, top_k=args.top_k, mode=args.mode,
                               max_tokens=args.max_tokens, oracle_share=args.oracle_share, seed=args.seed)
            counts = build(raft, items, args.out, args.refresh)
    except (RaftError, OSError, httpx.TransportError) as exc:
        parser.exit(2, f"lorag data raft: {exc}\n")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
