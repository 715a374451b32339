"""Rows → token ids and labels, rendered as the served model's chat template renders them.

The text is the template's own (`apply_chat_template(..., tokenize=False)`), encoded without
adding special tokens, as vLLM's chat endpoint does: the template already holds them. The loss
is on trained assistant turns only: each turn's tokens, from after the generation prompt up to
and including the end-of-turn token, so the model learns to stop. The recipe and the data
doctor both call this module; there is no second opinion that could disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.data.rows import Row

IGNORE = -100  # the label transformers' loss skips


class TemplateError(ValueError):
    """The chat template cannot be masked turn by turn (it renders a prefix differently alone)."""


@dataclass(frozen=True)
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where nothing is learned
    ends_with_eot: list[bool]  # per trained turn: its labels end with an end-of-turn token

    def truncated(self, max_seq_len: int) -> Rendered:
        return Rendered(self.input_ids[:max_seq_len], self.labels[:max_seq_len], self.ends_with_eot)

    @property
    def trainable(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class Renderer:
    def __init__(self, tokenizer, end_of_turn: set[int]):
        if tokenizer.chat_template is None:
            raise TemplateError("the tokenizer has no chat template; training must render rows as serving does")
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn

    @classmethod
    def load(cls, model_dir: Path) -> Renderer:
        """The tokenizer and end-of-turn tokens of a model folder (nothing downloaded)."""
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        try:
            eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS is what stops generation
            eos = None
        ends |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(tokenizer, ends)

    def encode(self, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, row: Row) -> Rendered:
        messages = [{"role": m["role"], "content": m["content"]} for m in row.messages]
        ids = self.encode(messages)
        labels = [IGNORE] * len(ids)
        ends: list[bool] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.encode(messages[:i], generation_prompt=True)
            if ids[: len(prompt)] != prompt:
                raise TemplateError(
                    f"line {row.line}: the chat template renders the turns before message {i} differently on "
                    "their own; its assistant turns cannot be masked"
                )
            if not row.trained(i):
                continue
            stop = len(self.encode(messages[: i + 1]))
            turn = ids[len(prompt) : stop]
            # Up to the first end-of-turn token: what follows it (a newline) is never generated.
            cut = next((k + 1 for k, token in enumerate(turn) if token in self.end_of_turn), len(turn))
            labels[len(prompt) : len(prompt) + cut] = turn[:cut]
            ends.append(cut > 0 and turn[cut - 1] in self.end_of_turn)
        return Rendered(ids, labels, ends)
