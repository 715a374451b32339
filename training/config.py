"""The recipe's config: a YAML file whose header comment is the command that runs it, plus
`key=value` overrides from the command line (`lora.rank=4`, `epochs=2`). Every key is known;
a misspelt one is an error, never silently ignored."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = ("cosine", "linear", "constant")
METHODS = ("lora", "full")  # full: every weight trained, a whole model folder written (e.g. the demo base model)
LOSSES = ("assistant", "all")  # all: every token of a row is learned, prompt included (pretraining)


class ConfigError(ValueError):
    """A config the recipe cannot run, with what to change."""


@dataclass
class Lora:
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    train: Path = Path("train.jsonl")  # chat rows, checked by the data doctor first
    output: Path = Path("adapter")  # the adapter folder written at the end
    model: Path | None = None  # the base model folder; None: the served model (LORAG_MODEL or the demo model)
    eval: Path | None = None
    method: str = "lora"
    loss: str = "assistant"  # assistant: the trained assistant turns only
    lora: Lora = field(default_factory=Lora)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0: as many as `epochs` make
    learning_rate: float = 2e-4
    schedule: str = "cosine"  # after warm-up: cosine or linear decay to 0, or constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradient's global norm to this; 0: no clipping
    batch_size: int = 4  # rows per forward pass
    grad_accum: int = 1  # forward passes per optimizer step
    max_seq_len: int = 1024
    seed: int = 0
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end only (when `eval` is set)
    early_stopping: int = 0  # evaluations without a better eval loss before stopping; 0: never stop early
    checkpoint_every: int = 0  # optimizer steps between checkpoints (for --resume); 0: none
    log_every: int = 1  # optimizer steps between metrics lines

    def check(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum", "max_seq_len", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "early_stopping", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be above 0, got {self.learning_rate}")
        for name, choices in (("schedule", SCHEDULES), ("method", METHODS), ("loss", LOSSES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be 0 (off) or more, got {self.max_grad_norm}")
        if self.lora.rank < 1 or not self.lora.alpha > 0 or not 0 <= self.lora.dropout < 1:
            raise ConfigError("lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
        if not self.lora.target_modules:
            raise ConfigError("lora.target_modules must name at least one module (e.g. q_proj)")
        if self.early_stopping and self.eval is None:
            raise ConfigError("early_stopping needs an eval file to measure")

    def as_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def load(path: Path, overrides: list[str]) -> TrainConfig:
    """The file's values, then each `key=value` (the value read as YAML: 4, 2e-4, [q_proj, v_proj])."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides look like key=value (e.g. lora.rank=4), got {override!r}")
        node = data
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {parent} is not a section")
        node[leaf] = yaml.safe_load(value)
    config = _build(TrainConfig, data, "")
    config.check()
    return config


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; known: "
                          f"{', '.join(prefix + k for k in fields)}")
    values = {}
    for name, value in data.items():
        kind = fields[name].type
        if name == "lora":
            values[name] = _build(Lora, value, "lora.")
        elif kind in ("Path", "Path | None"):
            values[name] = None if value is None else Path(str(value))
        elif kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{prefix}{name} must be a list of names")
            values[name] = value
        elif kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind == "int" and value != int(value)):
                raise ConfigError(f"{prefix}{name} must be a number{' (whole)' if kind == 'int' else ''}, got {value!r}")
            values[name] = int(value) if kind == "int" else float(value)
        else:
            values[name] = str(value)
    return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
