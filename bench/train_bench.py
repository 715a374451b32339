"""Training benchmark: the recipe's trainable tokens/s against a plain transformers Trainer + peft.

    .venv/bin/python -m bench.train_bench [--model DIR] [--rounds 2] [--out bench/results/train.json]

Both train the same model (the demo base model unless --model), on the same rows rendered and
masked by training.data.masking, with the same LoRA config, learning rate, schedule and
effective batch, for one epoch. The baseline is what a Trainer user writes: rows in random
order, each batch padded to its longest row (DataCollatorForSeq2Seq). Each run is a child
process of its own, so its peak memory (max RSS) is its own; rounds alternate the two, and the
ratio is the median of the per-round ratios. Both final eval losses are measured by the same
function (the recipe's token-mean eval loss over the eval rows).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import machine

ROWS, EVAL_ROWS = 320, 32
SETTINGS = {"lora.rank": 8, "lora.alpha": 16, "lora.dropout": 0.05, "learning_rate": 1e-3, "schedule": "linear",
            "warmup_steps": 0, "batch_size": 8, "grad_accum": 1, "epochs": 1, "max_seq_len": 512, "seed": 0}


def write_rows(folder: Path) -> tuple[Path, Path]:
    """Questions and answers of very different lengths (1 to 14 sentences of the demo corpus)."""
    from training.demo.corpus import corpus

    lines = corpus(7, 8000)
    rng = random.Random(7)

    def row() -> dict:
        answer = " ".join(rng.sample(lines, rng.randint(1, 14)))
        return {"messages": [{"role": "user", "content": rng.choice(lines)}, {"role": "assistant", "content": answer}]}

    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(row()) + "\n" for _ in range(ROWS)))
    evaluation.write_text("".join(json.dumps(row()) + "\n" for _ in range(EVAL_ROWS)))
    return train, evaluation


def run_recipe(model: Path, train: Path, evaluation: Path, out: Path) -> dict:
    from training import recipe
    from training.config import load

    config_file = out.parent / "bench.yaml"
    config_file.write_text("{}\n")
    overrides = [f"{k}={v}" for k, v in SETTINGS.items()]
    config = load(config_file, [*overrides, f"model={model}", f"train={train}", f"eval={evaluation}", f"output={out}"])
    folder = recipe.train(config)
    training = json.loads((folder / "lorag.json").read_text())["training"]
    seconds = training["metrics"][-1]["elapsed_s"]  # the training loop, without setup or the final eval
    return {"seconds": seconds, "eval_loss": training["final_eval_loss"]}


def run_trainer(model_dir: Path, train: Path, evaluation: Path, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from training import recipe
    from training.data.masking import Renderer
    from training.data.rows import read

    renderer = Renderer.load(model_dir)
    rows = [renderer.render(r).truncated(SETTINGS["max_seq_len"]) for r, _ in read(train)]
    eval_rows = [renderer.render(r).truncated(SETTINGS["max_seq_len"]) for r, _ in read(evaluation)]
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(SETTINGS["seed"])
    model = get_peft_model(base, LoraConfig(
        r=SETTINGS["lora.rank"], lora_alpha=SETTINGS["lora.alpha"], lora_dropout=SETTINGS["lora.dropout"],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    tokenizer = renderer.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = 0
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=SETTINGS["batch_size"],
        gradient_accumulation_steps=SETTINGS["grad_accum"], num_train_epochs=SETTINGS["epochs"],
        learning_rate=SETTINGS["learning_rate"], lr_scheduler_type=SETTINGS["schedule"],
        warmup_steps=SETTINGS["warmup_steps"], seed=SETTINGS["seed"], save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, logging_steps=1000,
        remove_unused_columns=False, disable_tqdm=True,
    )
    dataset = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    result = trainer.train()
    where = next(model.parameters()).device
    eval_loss = recipe.evaluate(model, eval_rows, SETTINGS["batch_size"], 0, where, torch.float32)
    return {"seconds": result.metrics["train_runtime"], "eval_loss": eval_loss}


def child(kind: str, model: Path, train: Path, evaluation: Path, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    found = (run_recipe if kind == "recipe" else run_trainer)(model, train, evaluation, out)
    found["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(found))


def spawn(kind: str, model: Path, train: Path, evaluation: Path, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_bench", "--child", kind, "--model", str(model), "--train", str(train),
         "--eval", str(evaluation), "--output", str(out)],
        capture_output=True, text=True, check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="base model folder (default: the demo model, built here)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--child", choices=["recipe", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.train, args.eval, args.output)
        return 0

    from training.data.doctor import check
    from training.data.masking import Renderer
    from training.demo.base import build_base

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or build_base(folder / "demo", variant="demo", seed=0)
        train, evaluation = write_rows(folder)
        summary = check(train, Renderer.load(model), SETTINGS["max_seq_len"], evaluation).summary
        rounds = []
        for r in range(args.rounds):
            order = ["recipe", "trainer"] if r % 2 == 0 else ["trainer", "recipe"]
            found = {kind: spawn(kind, model, train, evaluation, folder / f"{kind}-{r}") for kind in order}
            for kind in found:
                found[kind]["trainable_tokens_per_s"] = round(summary["trainable_tokens"] / found[kind]["seconds"], 1)
            found["ratio"] = round(found["recipe"]["trainable_tokens_per_s"] / found["trainer"]["trainable_tokens_per_s"], 3)
            rounds.append(found)
            print(json.dumps(found), flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    eval_gap = statistics.median(abs(r["recipe"]["eval_loss"] / r["trainer"]["eval_loss"] - 1) for r in rounds)
    results = {
        "benchmark": "train_bench",
        "settings": SETTINGS,
        "data": {"rows": summary["rows"], "eval_rows": summary["eval_rows"], "tokens_per_row": summary["tokens_per_row"],
                 "trainable_tokens": summary["trainable_tokens"], "tokens": summary["tokens"]},
        "machine": machine.description(),
        "rounds": rounds,
        "ratio_median": ratio,
        "eval_loss_gap_median": round(eval_gap, 4),
        "targets": {"ratio": ">= 1.25", "eval_loss_gap": "<= 0.02",
                    "met": ratio >= 1.25 and eval_gap <= 0.02},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("ratio_median", "eval_loss_gap_median", "targets")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
