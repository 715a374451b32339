"""`lorag data check`: every problem of a training file, at its line, before any training starts.

Rows are rendered and masked by masking.py, the code the recipe trains with, so what the doctor
counts (lengths, trainable tokens, the end-of-turn token in the labels) is what training sees.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.data.masking import IGNORE, Rendered, Renderer
from training.data.rows import Problem, Row, read

# Rows below which fine-tuning guidance (OpenAI's, among others) expects little: a format or
# tone is learned from 50 or more examples; a domain needs 500 or more.
FORMAT_ROWS = 50
DOMAIN_ROWS = 500
ESTIMATE_ROWS = 4  # rows of the file timed through one forward and backward pass


@dataclass
class Report:
    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"errors": [asdict(p) for p in self.errors], "warnings": self.warnings, "summary": self.summary}


def check(
    train: Path, renderer: Renderer, max_seq_len: int, eval_file: Path | None = None, model: Path | None = None
) -> Report:
    """Check `train` (and `eval_file`); `model`: also time a training step on this machine for the estimate."""
    report = Report()
    lines, rows = _rows(train, report)
    eval_rows = _rows(eval_file, report)[1] if eval_file is not None else []
    eval_lines = {row.key: row.line for row in eval_rows}
    first: dict[str, int] = {}
    good: list[tuple[Row, Rendered]] = []
    lengths: list[int] = []
    unended = []
    for row in rows:
        problems = []
        if row.key in first:
            problems.append(Problem(row.line, "duplicate", f"the same row as line {first[row.key]}", str(train)))
        first.setdefault(row.key, row.line)
        if row.key in eval_lines:
            problems.append(Problem(row.line, "in_eval_set", f"also line {eval_lines[row.key]} of {eval_file}", str(train)))
        rendered = renderer.render(row)
        lengths.append(len(rendered.input_ids))
        if len(rendered.input_ids) > max_seq_len:
            problems.append(Problem(
                row.line, "too_long",
                f"renders to {len(rendered.input_ids)} tokens, more than max_seq_len {max_seq_len}; shorten it or "
                "raise --max-seq-len", str(train)))
        kept = rendered.truncated(max_seq_len)
        if kept.trainable == 0:
            why = "every assistant turn has weight 0" if not rendered.ends_with_eot else "its trained turns lie past max_seq_len"
            problems.append(Problem(row.line, "no_trainable_tokens", f"nothing to learn: {why}", str(train)))
        if not all(rendered.ends_with_eot):
            unended.append(row.line)
        report.errors += problems
        if not problems:
            good.append((row, kept))
    report.errors.sort(key=lambda p: (p.file != str(train), p.line))

    tokens = sum(len(r.input_ids) for _, r in good)
    trainable = sum(r.trainable for _, r in good)
    report.summary = {
        "lines": lines,
        "rows": len(rows),  # lines that are well-formed rows
        "rows_without_errors": len(good),
        "eval_rows": len(eval_rows),
        "tokens_per_row": _percentiles(lengths),
        "tokens": tokens,
        "trainable_tokens": trainable,
        "trained_turns_end_with_eot": not unended,
        "end_of_turn_tokens": sorted(renderer.tokenizer.convert_ids_to_tokens(sorted(renderer.end_of_turn))),
        "max_seq_len": max_seq_len,
    }
    if model is not None and good:
        report.summary["estimate"] = _estimate(model, [r for _, r in good[:ESTIMATE_ROWS]], tokens)
    if len(rows) < FORMAT_ROWS:
        report.warnings.append(
            f"{len(rows)} rows: fewer than the {FORMAT_ROWS} that usually teach a format or tone "
            f"({DOMAIN_ROWS}+ for a domain)")
    elif len(rows) < DOMAIN_ROWS:
        report.warnings.append(f"{len(rows)} rows: enough for a format or tone; a domain usually needs {DOMAIN_ROWS}+")
    if unended:
        report.warnings.append(
            f"{len(unended)} row(s) have a trained turn whose labels lack the end-of-turn token, so the model may "
            f"not learn to stop: lines {', '.join(map(str, unended[:20]))}")
    if eval_file is None:
        report.warnings.append("no --eval file: training cannot report eval loss or stop early")
    return report


def _rows(path: Path, report: Report) -> tuple[int, list[Row]]:
    """(non-blank lines, the well-formed rows among them); the others' problems go to the report."""
    lines, rows = 0, []
    for row, problems in read(path):
        lines += 1
        report.errors += problems
        if row is not None:
            rows.append(row)
    return lines, rows


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    values = np.percentile(lengths, [50, 90, 99])
    return {"p50": int(values[0]), "p90": int(values[1]), "p99": int(values[2]), "max": max(lengths)}


def _estimate(model_dir: Path, sample: list[Rendered], tokens: int) -> dict:
    """Time one forward and backward pass over a few rows, one at a time, and scale to the file.

    Rough by design: a whole-model backward, where LoRA computes fewer weight gradients.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)

    def step(row: Rendered) -> None:
        ids = torch.tensor([row.input_ids])
        model(input_ids=ids, labels=torch.tensor([row.labels])).loss.backward()

    step(sample[0])  # warm-up: first-call allocations
    started = time.perf_counter()
    for row in sample:
        step(row)
    seconds = time.perf_counter() - started
    rate = sum(len(r.input_ids) for r in sample) / seconds
    return {"tokens_per_s": round(rate, 1), "seconds_per_epoch": round(tokens / rate, 1), "measured_rows": len(sample)}


def text(report: Report, train: Path) -> str:
    s = report.summary
    lines = [f"{train}: {s['lines']} lines, {s['rows']} well-formed rows, {len(report.errors)} error(s), "
             f"{len(report.warnings)} warning(s)"]
    lines += [f"{p.file}:{p.line}: {p.code}: {p.message}" for p in report.errors]
    lines += [f"warning: {w}" for w in report.warnings]
    if s.get("tokens_per_row"):
        t = s["tokens_per_row"]
        lines.append(f"tokens per row: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}")
    lines.append(f"trainable tokens: {s['trainable_tokens']} of {s['tokens']} (rows without errors)")
    lines.append(f"every trained turn ends with {'/'.join(s['end_of_turn_tokens'])} in its labels: "
                 f"{'yes' if s['trained_turns_end_with_eot'] else 'no'}")
    if "estimate" in s:
        e = s["estimate"]
        lines.append(f"training time on this machine: about {e['seconds_per_epoch']:.3g} s per epoch "
                     f"({e['tokens_per_s']:.0f} tokens/s measured on {e['measured_rows']} rows)")
    return "\n".join(lines)


def show(path: Path, line: int, renderer: Renderer, max_seq_len: int) -> str:
    """One row's tokens beside their labels: what the model reads, and what it learns."""
    for row, problems in read(path):
        if problems and problems[0].line == line:
            return "\n".join(f"{p.code}: {p.message}" for p in problems)
        if row is not None and row.line == line:
            rendered = renderer.render(row)
            out = [f"line {line}: {len(rendered.input_ids)} tokens, {rendered.trainable} trained"
                   f" (max_seq_len {max_seq_len})", f"{'#':>5}  {'id':>6}  {'label':>6}  token"]
            for k, (token, label) in enumerate(zip(rendered.input_ids, rendered.labels, strict=True)):
                piece = renderer.tokenizer.convert_ids_to_tokens(token)
                cut = "  (past max_seq_len)" if k >= max_seq_len else ""
                out.append(f"{k:>5}  {token:>6}  {'-' if label == IGNORE else label:>6}  {piece!r}{cut}")
            return "\n".join(out)
    raise LookupError(f"{path} has no row at line {line}")
