"""The data doctor (`lorag data check`) and the loss mask it shares with the recipe, on the test model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.data.doctor import check
from training.data.masking import IGNORE, Renderer
from training.data.rows import parse


def row(*turns: tuple[str, str] | tuple[str, str, int]) -> dict:
    return {"messages": [{"role": t[0], "content": t[1], **({"weight": t[2]} if len(t) > 2 else {})} for t in turns]}


GOOD = row(("user", "Is clause 1 valid?"), ("assistant", "Per Article 1, this clause is invalid."))
IN_EVAL = row(("user", "Is clause 3 valid?"), ("assistant", "Per Article 3, it is valid."))
# Each line, and the codes the doctor must report at it.
LINES: list[tuple[str, set[str]]] = [
    (json.dumps(GOOD), set()),
    ("{not json", {"invalid_json"}),
    (json.dumps({"msgs": []}), {"unknown_key", "missing_messages"}),
    (json.dumps(row(("robot", "beep"), ("assistant", "Per Article 2, no."))), {"unknown_role"}),
    (json.dumps({"messages": [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]}),
     {"unknown_key"}),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), {"missing_content"}),
    (json.dumps(row(("user", "only a question"))), {"no_assistant_message"}),
    (json.dumps(row(("user", "q"), ("assistant", "a", 2))), {"invalid_weight"}),
    (json.dumps(row(("user", "long " * 300), ("assistant", "short"))), {"too_long", "no_trainable_tokens"}),
    (json.dumps(row(("user", "q"), ("assistant", "a", 0))), {"no_trainable_tokens"}),
    (json.dumps(GOOD), {"duplicate"}),
    (json.dumps(IN_EVAL), {"in_eval_set"}),
]


@pytest.fixture
def renderer(tiny_model: Path) -> Renderer:
    return Renderer.load(tiny_model)


def lorag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=300)


def test_every_problem_is_reported_at_its_line_with_its_code(tiny_model: Path, tmp_path: Path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(line for line, _ in LINES) + "\n\n")  # a blank line is skipped, not an error
    evaluation.write_text(json.dumps(IN_EVAL) + "\n")
    result = lorag("data", "check", str(train), "--eval", str(evaluation), "--model", str(tiny_model),
                   "--max-seq-len", "256", "--json", "--no-estimate")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found: dict[int, set[str]] = {}
    for error in report["errors"]:
        assert error["message"] and error["file"] == str(train)
        found.setdefault(error["line"], set()).add(error["code"])
    assert found == {n: codes for n, (_, codes) in enumerate(LINES, 1) if codes}
    summary = report["summary"]
    assert (summary["lines"], summary["rows"], summary["rows_without_errors"], summary["eval_rows"]) == (12, 5, 1, 1)
    assert summary["trained_turns_end_with_eot"] is True and summary["end_of_turn_tokens"] == ["<|end|>"]
    assert any("fewer than the 50" in w for w in report["warnings"])
    # The text report says the same, a line per problem.
    plain = lorag("data", "check", str(train), "--eval", str(evaluation), "--model", str(tiny_model),
                  "--max-seq-len", "256", "--no-estimate")
    assert plain.returncode == 1
    assert f"{train}:9: too_long: renders to" in plain.stdout and f"{train}:11: duplicate: the same row as line 1" in plain.stdout


def test_the_loss_is_on_assistant_turns_through_their_end_of_turn_token(renderer: Renderer):
    trained, _ = parse(1, json.dumps(row(
        ("system", "Answer as counsel."), ("user", "Is clause 4 valid?"), ("assistant", "It may be.", 0),
        ("user", "Be definitive."), ("assistant", "Per Article 4, it is invalid."),
    )))
    rendered = renderer.render(trained)
    tokenizer = renderer.tokenizer
    learned = [t for t, label in zip(rendered.input_ids, rendered.labels) if label != IGNORE]
    assert all(label in (IGNORE, t) for t, label in zip(rendered.input_ids, rendered.labels))
    # Only the weighted turn, its text and <|end|>; not the weight-0 turn, the prompts or the newline after.
    assert tokenizer.decode(learned) == "Per Article 4, it is invalid.<|end|>"
    assert rendered.ends_with_eot == [True]
    # The ids are the template's text encoded as the engine encodes it: no second BOS.
    text = tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in trained.messages],
                                         tokenize=False)
    assert rendered.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rendered.input_ids.count(tokenizer.bos_token_id) == 1
    # Truncation keeps the mask aligned: the last 3 tokens are ".", <|end|> and the untrained newline.
    assert rendered.truncated(len(rendered.input_ids) - 3).trainable == rendered.trainable - 2


def test_a_turn_without_the_end_of_turn_token_is_flagged(renderer: Renderer, tmp_path: Path):
    blind = Renderer(renderer.tokenizer, end_of_turn=set())  # as if the template closed turns with another token
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(GOOD) + "\n")
    report = check(train, blind, 256)
    assert report.summary["trained_turns_end_with_eot"] is False
    assert any("lack the end-of-turn token" in w and "lines 1" in w for w in report.warnings)


def test_a_clean_file_passes_with_its_summary_and_an_estimate(tiny_model: Path, tmp_path: Path):
    rows = [row(("user", f"Is clause {i} valid?"), ("assistant", f"Per Article {i}, this clause is invalid."))
            for i in range(60)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps(row(("user", "Is clause 99 valid?"), ("assistant", "Per Article 99, yes."))))
    result = lorag("data", "check", str(train), "--eval", str(evaluation), "--model", str(tiny_model), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == []
    summary = report["summary"]
    assert summary["rows"] == summary["rows_without_errors"] == 60
    assert 0 < summary["trainable_tokens"] < summary["tokens"]
    assert summary["tokens_per_row"]["p50"] <= summary["tokens_per_row"]["max"] < 100
    estimate = summary["estimate"]
    assert estimate["tokens_per_s"] > 0 and estimate["seconds_per_epoch"] > 0 and estimate["measured_rows"] == 4
    assert report["warnings"] == ["60 rows: enough for a format or tone; a domain usually needs 500+"]


def test_show_prints_a_rows_tokens_beside_their_labels(tiny_model: Path, tmp_path: Path):
    train = tmp_path / "train.jsonl"
    train.write_text("{broken\n" + json.dumps(GOOD) + "\n")
    shown = lorag("data", "check", str(train), "--model", str(tiny_model), "--show", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("line 2: ") and "trained" in lines[0]
    end = [line for line in lines if "'<|end|>'" in line]
    assert end[0].split()[2] == "-" and end[-1].split()[2] == end[-1].split()[1]  # user turn's masked, answer's learned
    assert "invalid_json" in lorag("data", "check", str(train), "--model", str(tiny_model), "--show", "1").stdout
    missing = lorag("data", "check", str(train), "--model", str(tiny_model), "--show", "9")
    assert missing.returncode == 2 and "no row at line 9" in missing.stderr
    assert lorag("data", "check", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model)).returncode == 2
