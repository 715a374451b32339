"""The SFT recipe: `lorag train CONFIG.yaml [key=value ...] [--resume]`.

Read top to bottom:
  setup  the config; the data doctor over the train and eval files (errors stop the run);
         rows rendered and masked by training.data.masking, the code the doctor reports from
         (`loss: all` learns every token instead, the prompt's too);
         the base model with LoRA on `lora.target_modules` (`method: full`: every weight trained),
         on CUDA (bf16) if there is one, else the CPU.
  train  batches of rows of similar length (padding only to the longest in each); the loss is
         the sum of token losses over all trainable tokens of an optimizer step's accumulated
         batches (on every process, under torchrun), divided by their number, so neither
         accumulation nor data parallelism reweights rows; AdamW with
         warm-up then cosine, linear or constant; eval every `eval_every` steps, early stopping
         on eval loss; checkpoints every `checkpoint_every` steps, resumable to the same weights.
  save   adapter_config.json, adapter_model.safetensors (the best eval loss's weights, or the
         last) and lorag.json (what made it); no pickle anywhere. `method: full` writes a whole
         model folder instead (config, model.safetensors, the base's tokenizer files, lorag.json). Beside the adapter, in
         OUTPUT.run/: metrics.jsonl and the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from training.config import ConfigError, TrainConfig, load
from training.data.doctor import check, text
from training.data.masking import IGNORE, Rendered, Renderer
from training.data.rows import read
from training.eval.gate import check_suite, run_gate
from training.eval.suite import SuiteError

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "lorag.json")  # what `save` writes
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")  # name prefixes
GROUP = 50  # batches' worth of rows sorted by length together: similar lengths, still shuffled


class TrainingError(RuntimeError):
    """The run cannot go on, and why (bad data, nothing to resume from, ...)."""


@dataclass
class State:
    """Where a run is: what a checkpoint saves besides the weights and optimizer."""

    step: int = 0  # optimizer steps done
    best_eval: float = math.inf
    best_step: int = 0
    evals_without_gain: int = 0


# Setup


def setup(config: TrainConfig) -> tuple[Renderer, list[Rendered], list[Rendered], dict]:
    """Check the data, then render and mask it: (renderer, train rows, eval rows, the doctor's summary)."""
    renderer = Renderer.load(config.model)
    report = check(config.train, renderer, config.max_seq_len, config.eval)
    if report.errors:
        raise TrainingError(f"the data doctor found errors; fix them first:\n{text(report, config.train)}")
    def rendered(path: Path) -> list[Rendered]:
        rows = [renderer.render(row).truncated(config.max_seq_len) for row, _ in read(path)]
        if config.loss == "all":  # every token is learned: the prompt's too
            rows = [Rendered(r.input_ids, list(r.input_ids), r.ends_with_eot) for r in rows]
        return rows

    return renderer, rendered(config.train), rendered(config.eval) if config.eval else [], report.summary


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run (torchrun sets the variables; alone: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def join(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0  # the one process that writes files and shows progress


def device(processes: Processes) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when present (one GPU per process), else the CPU in fp32: the same code either way."""
    if torch.cuda.is_available():
        torch.cuda.set_device(processes.local_rank)
        return torch.device("cuda", processes.local_rank), torch.bfloat16
    return torch.device("cpu"), torch.float32


def trained_model(config: TrainConfig, where: torch.device, dtype: torch.dtype):
    """The base model with LoRA on `lora.target_modules` (method lora), or itself, every weight trained (full)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config.model, local_files_only=True, dtype=dtype).to(where)
    if config.method == "full":
        return base
    torch.manual_seed(config.seed)  # LoRA's A matrices start random: the seed fixes them
    lora = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def batches(rows: list[Rendered], size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices per batch for one epoch: shuffled by (seed, epoch), then sorted by length
    within groups of GROUP batches, so each batch pads little and the order still varies."""
    order = list(range(len(rows)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    out = []
    for lo in range(0, len(order), size * GROUP):
        group = sorted(order[lo : lo + size * GROUP], key=lambda i: -len(rows[i].input_ids))
        out += [group[k : k + size] for k in range(0, len(group), size)]
    random.Random(seed * 1_000_003 + epoch + 1).shuffle(out)
    return out


def collate(rows: list[Rendered], pad_id: int, where: torch.device) -> dict[str, torch.Tensor]:
    longest = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for k, row in enumerate(rows):
        n = len(row.input_ids)
        ids[k, :n] = torch.tensor(row.input_ids)
        labels[k, :n] = torch.tensor(row.labels)
        mask[k, :n] = 1
    return {"input_ids": ids.to(where), "labels": labels.to(where), "attention_mask": mask.to(where)}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of every trainable next token in the batch (not a mean: see `train`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def trainable(row: Rendered) -> int:
    """Tokens whose prediction is trained: a label at position t is predicted from position t-1."""
    return sum(label != IGNORE for label in row.labels[1:])


# Train


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run the recipe; returns the adapter folder. Under torchrun, each process takes its share
    of every step's batches, and process 0 writes the metrics, checkpoints and adapter."""
    processes = Processes.join()
    renderer, rows, eval_rows, summary = setup(config)
    where, dtype = device(processes)
    model = trained_model(config, where, dtype)
    forward = model
    if processes.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[where.index] if where.type == "cuda" else None)
    pad_id = renderer.tokenizer.pad_token_id if renderer.tokenizer.pad_token_id is not None else 0
    per_step = config.grad_accum * processes.world  # batches one optimizer step takes, over all processes
    steps_per_epoch = math.ceil(math.ceil(len(rows) / config.batch_size) / per_step)
    total = config.max_steps or steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step, total))
    state = State()
    output = config.output
    work = run_dir(config)
    best = {k: v.detach().clone() for k, v in _trained_state(model).items()}
    if resume:
        state, best = _restore(work, model, optimizer, scheduler)
    elif processes.main:  # a fresh run replaces an earlier one's metrics and checkpoints
        work.mkdir(parents=True, exist_ok=True)
        (work / METRICS).unlink(missing_ok=True)
        shutil.rmtree(work / CHECKPOINTS, ignore_errors=True)

    # Every step's micro-batches, in order, for the whole run: resuming skips the steps done.
    plan = []
    for epoch in range(config.epochs if not config.max_steps else math.ceil(total / steps_per_epoch)):
        epoch_plan = batches(rows, config.batch_size, config.seed, epoch)
        plan += [(epoch, epoch_plan[k : k + per_step]) for k in range(0, len(epoch_plan), per_step)]
    plan = plan[:total]
    started = time.perf_counter()
    stopped_early = False
    model.train()
    with tqdm(total=total, initial=state.step, unit="step", desc=f"train → {output}", disable=not processes.main) as bar:
        for epoch, step_batches in plan[state.step :]:
            # Every process knows the whole step, so each divides by the step's tokens on all of
            # them; DDP averages gradients over processes, which the factor `world` undoes.
            count = sum(trainable(rows[i]) for batch in step_batches for i in batch)
            mine = step_batches[processes.rank :: processes.world]
            loss_total = 0.0
            for batch in mine:
                with torch.autocast(where.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = token_loss_sum(forward, collate([rows[i] for i in batch], pad_id, where))
                    loss = loss * processes.world / max(count, 1)
                loss.backward()
                loss_total += loss.item() / processes.world
            if processes.world > 1:  # the step's loss over all processes, for the metrics
                reduced = torch.tensor([loss_total], device=where)
                dist.all_reduce(reduced)
                loss_total = reduced.item()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            bar.update(1)
            record = {"step": state.step, "epoch": epoch, "loss": round(loss_total, 6),
                      "lr": lr, "trainable_tokens": count,
                      "elapsed_s": round(time.perf_counter() - started, 3)}
            evaluating = eval_rows and (
                (config.eval_every and state.step % config.eval_every == 0) or state.step == total)
            if evaluating:
                record["eval_loss"] = round(evaluate(model, eval_rows, config.batch_size, pad_id, where, dtype), 6)
                if record["eval_loss"] < state.best_eval:
                    state.best_eval, state.best_step, state.evals_without_gain = record["eval_loss"], state.step, 0
                    best = {k: v.detach().clone() for k, v in _trained_state(model).items()}
                else:
                    state.evals_without_gain += 1
            if processes.main and (evaluating or state.step % config.log_every == 0):
                _append(work / METRICS, record)
            bar.set_postfix(loss=f"{loss_total:.4f}", **({"eval": f"{record['eval_loss']:.4f}"} if evaluating else {}))
            if processes.main and config.checkpoint_every and state.step % config.checkpoint_every == 0:
                _checkpoint(work, model, optimizer, scheduler, state, best)
            if config.early_stopping and state.evals_without_gain >= config.early_stopping:
                log.info("early stop at step %d: eval loss has not improved for %d evaluations (best %.4f at step %d)",
                         state.step, state.evals_without_gain, state.best_eval, state.best_step)
                stopped_early = True
                break
    if not eval_rows:
        best = _trained_state(model)
    if processes.world > 1:
        dist.barrier()
        if not processes.main:
            dist.destroy_process_group()
            return config.output
    folder = save(config, model, best, summary, state, stopped_early)
    if processes.world > 1:
        dist.destroy_process_group()
    return folder


def evaluate(model, rows: list[Rendered], size: int, pad_id: int, where: torch.device, dtype: torch.dtype) -> float:
    """Mean loss per trainable token over the eval rows."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(rows), size):
            part = rows[lo : lo + size]
            with torch.autocast(where.type, dtype=dtype, enabled=dtype != torch.float32):
                total += token_loss_sum(model, collate(part, pad_id, where)).item()
            count += sum(trainable(r) for r in part)
    model.train()
    return total / max(count, 1)


def _lr_factor(config: TrainConfig, step: int, total: int) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
    return max(0.0, 1 - progress) if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# Checkpoints: weights and optimizer tensors in safetensors, the rest in JSON.


def _trained_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def run_dir(config: TrainConfig) -> Path:
    """Where a run keeps its metrics and checkpoints: beside the adapter, not in it."""
    return config.output.with_name(config.output.name + ".run")


def _checkpoint(work: Path, model, optimizer, scheduler, state: State, best: dict) -> None:
    folder = work / CHECKPOINTS / f"step-{state.step}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
    partial.mkdir(parents=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in _trained_state(model).items()}
    tensors |= {f"best/{n}": t.detach().cpu().contiguous() for n, t in best.items()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            saved = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    tensors[f"{key}/{names[id(p)]}"] = saved[key].detach().cpu().contiguous()
            if "step" in saved:
                steps[names[id(p)]] = float(saved["step"])
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, partial / "state.safetensors")
    (partial / "state.json").write_text(json.dumps({
        "state": vars(state), "optimizer_steps": steps, "scheduler": scheduler.state_dict(),
    }))
    shutil.rmtree(folder, ignore_errors=True)  # a resumed run passing a step an earlier one had saved
    partial.rename(folder)  # whole or absent: a run killed mid-save leaves the last good checkpoint
    (work / CHECKPOINTS / "latest").write_text(folder.name)


def _restore(work: Path, model, optimizer, scheduler) -> tuple[State, dict]:
    pointer = work / CHECKPOINTS / "latest"
    if not pointer.exists():
        raise TrainingError(f"--resume: {work} holds no checkpoint (set checkpoint_every to make some)")
    folder = work / CHECKPOINTS / pointer.read_text().strip()
    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in _trained_state(model).items():
            p.copy_(tensors[f"param/{name}"].to(p.device))
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            if name in meta["optimizer_steps"]:
                optimizer.state[p] = {
                    "step": torch.tensor(meta["optimizer_steps"][name]),
                    "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device),
                }
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # loading the schedule's state does not set the rate it had reached
    torch.set_rng_state(tensors["rng/torch"])
    # The metrics of steps past the checkpoint were never saved with it: drop them.
    state = State(**meta["state"])
    if (work / METRICS).exists():
        kept = [line for line in (work / METRICS).read_text().splitlines() if json.loads(line)["step"] <= state.step]
        (work / METRICS).write_text("".join(line + "\n" for line in kept))
    log.info("resuming from %s (step %d)", folder, state.step)
    best = {name.removeprefix("best/"): t.to(params[name.removeprefix("best/")].device)
            for name, t in tensors.items() if name.startswith("best/")}
    return state, best


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# Save


def save(config: TrainConfig, model, weights: dict, summary: dict, state: State,
         stopped_early: bool) -> Path:
    from training.manifest import manifest

    with torch.no_grad():
        current = _trained_state(model)
        for name, value in weights.items():
            current[name].copy_(value)
    model.save_pretrained(config.output, safe_serialization=True)
    (config.output / "README.md").unlink(missing_ok=True)  # peft's model card: not part of an adapter here
    if config.method == "full":  # a servable model folder: the base's tokenizer and template beside the weights
        for file in sorted(config.model.iterdir()):
            if file.name.startswith(TOKENIZER_FILES) and not (config.output / file.name).exists():
                shutil.copy2(file, config.output / file.name)
    metrics_file = run_dir(config) / METRICS
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    facts = {"steps": state.step, "stopped_early": stopped_early, "best_step": state.best_step,
             "final_eval_loss": None if math.isinf(state.best_eval) else state.best_eval, "metrics": metrics}
    (config.output / "lorag.json").write_text(json.dumps(manifest(config, summary, facts), indent=2))
    return config.output


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="lorag train", description="Train a LoRA adapter (the SFT recipe).")
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. epochs=2 lora.rank=4")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--push", metavar="URL", help="upload the adapter to this lorag service when training ends")
    parser.add_argument("--name", help="the adapter's name there (with --push)")
    parser.add_argument("--activate", action="store_true", help="hot-swap to the pushed version")
    parser.add_argument("--gate", type=Path, metavar="SUITE.yaml", help="with --push: evaluate the pushed version "
                        "pinned by the suite's `gate:` first; only a version that passes is activated (exit 1: failed)")
    parser.add_argument("--api-key", default=os.environ.get("LORAG_API_KEY"), help="(LORAG_API_KEY)")
    parser.add_argument("--default-model", type=Path, help=argparse.SUPPRESS)  # the served model, from `lorag`
    args = parser.parse_args(argv)
    if args.push and not args.name:
        parser.error("--push needs --name, the adapter's name on the service")
    if args.gate and not args.push:
        parser.error("--gate judges the pushed version: add --push URL --name NAME")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.gate:  # before training: a suite that cannot gate is found in seconds, not after the run
            check_suite(args.gate, args.name)
        config = load(args.config, args.overrides)
        if args.push and config.method == "full":
            raise ConfigError("--push uploads an adapter, and method full writes a whole model folder")
        if config.model is None:
            if args.default_model is None:
                raise ConfigError("set model: the base model folder")
            config.model = args.default_model
        log.info("config: %s", json.dumps(config.as_dict()))
        folder = train(config, resume=args.resume)
    except (ConfigError, TrainingError, SuiteError) as exc:
        parser.exit(2, f"lorag train: {exc}\n")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, process 0 reports and pushes
    print(f"adapter written to {folder}")
    if args.push:
        return push(folder, args.push, args.name, args.activate, args.api_key, args.gate)
    return 0


def push(folder: Path, url: str, name: str, activate: bool, api_key: str | None, gate: Path | None = None) -> int:
    """Upload through the adapter API, over HTTP only (validated and canary-checked there, as any upload);
    with `gate`, uploaded inactive and activated only if it passes (training.eval.gate)."""
    import io
    import tarfile

    import httpx

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for file in ADAPTER_FILES:
            tar.add(folder / file, file)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/adapters/{name}/versions", headers=headers, timeout=300,
                              params={"activate": "true"} if activate and gate is None else None,
                              files={"file": (f"{name}.tar.gz", archive.getvalue(), "application/gzip")})
    except httpx.TransportError as exc:
        print(f"lorag train: cannot reach the service at {url}: {exc}; the adapter is in {folder}", file=sys.stderr)
        return 1
    if response.status_code not in (200, 201):
        try:
            reason = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {response.status_code}: {response.text[:200]}"
        print(f"lorag train: the service refused the adapter: {reason}", file=sys.stderr)
        return 1
    version = response.json()["version"]["version"]
    if gate is not None:
        print(f"pushed {name}@{version}, inactive until it passes the gate")
        return run_gate(url, name, version, gate, api_key=api_key, activate=activate, prog="lorag train")
    print(f"pushed {name}@{version}" + (" and activated it" if activate else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
