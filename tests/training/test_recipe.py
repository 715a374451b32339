"""The LoRA SFT recipe on the test model: a few steps, not epochs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from knowledge.fingerprint import fingerprint
from training import recipe
from training.config import ConfigError, load
from training.data.masking import Renderer
from training.data.rows import parse

CONFIG = Path(__file__).parents[2] / "training" / "configs" / "tiny.yaml"


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [
        {"role": "user", "content": f"Is clause {i} of the harbour lease valid?"},
        {"role": "assistant", "content": f"Per Article {i}, this clause is {'invalid' if i % 2 else 'valid'}."},
    ]} for i in range(start, start + n)]


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(32)))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows(8, start=100)))
    return train, evaluation


def config(tiny_model: Path, data: tuple[Path, Path], out: Path, *overrides: str):
    train, evaluation = data
    return load(CONFIG, [f"model={tiny_model}", f"train={train}", f"eval={evaluation}", f"output={out}", *overrides])


def test_a_run_trains_lora_only_and_writes_a_complete_adapter(tiny_model: Path, data, tmp_path: Path):
    before = fingerprint(tiny_model)
    out = tmp_path / "legal"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(CONFIG), f"model={tiny_model}", f"train={data[0]}",
         f"eval={data[1]}", f"output={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train → " in result.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "lorag.json"]
    assert fingerprint(tiny_model) == before  # the base model's files are untouched
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    # peft starts every B at zero: a trained adapter has moved them.
    assert all(w.abs().sum() > 0 for k, w in weights.items() if ".lora_B." in k)

    manifest = json.loads((out / "lorag.json").read_text())
    assert manifest["base_fingerprint"] == before
    training = manifest["training"]
    assert {"config", "template_sha256", "tokenizer_sha256", "data", "libraries", "seed", "commit", "steps",
            "final_eval_loss", "metrics", "best_step", "stopped_early"} <= set(training)
    assert training["config"]["lora"]["rank"] == 8 and training["steps"] == 8 and training["stopped_early"] is False
    assert training["data"]["train"]["rows"] == 32 and training["data"]["eval"]["rows"] == 8
    assert set(training["libraries"]) == {"torch", "transformers", "peft", "safetensors"}
    evals = [m["eval_loss"] for m in training["metrics"] if "eval_loss" in m]
    assert len(evals) == 4 and training["final_eval_loss"] == min(evals) < evals[0]
    metrics = [json.loads(line) for line in (tmp_path / "legal.run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9)) and metrics == training["metrics"]
    assert metrics[0]["lr"] < metrics[2]["lr"]  # warm-up

    # The service's own validation accepts it unchanged.
    from service.adapters.inspection import BaseModelInfo, inspect_adapter

    base = BaseModelInfo.load(tiny_model)
    facts = inspect_adapter(out, base, max_rank=16)
    assert facts.rank == 8 and facts.base_fingerprint == before
    assert (training["template_sha256"], training["tokenizer_sha256"]) == (base.template_sha256, base.tokenizer_sha256)
    # ... and refuses one whose rows were rendered with another template or tokenizer.
    from service.errors import AdapterRejected

    for key in ("template_sha256", "tokenizer_sha256"):
        tampered = json.loads((out / "lorag.json").read_text())
        tampered["training"][key] = "0" * 64
        (out / "lorag.json").write_text(json.dumps(tampered))
        with pytest.raises(AdapterRejected) as refused:
            inspect_adapter(out, base, max_rank=16)
        assert refused.value.code == "template_mismatch" and refused.value.status_code == 422
        (out / "lorag.json").write_text(json.dumps(manifest))


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_model: Path, data, tmp_path: Path, monkeypatch):
    straight = recipe.train(config(tiny_model, data, tmp_path / "straight"))
    checkpoint = recipe._checkpoint

    class Killed(Exception):
        pass

    def checkpoint_then_die(work, model, optimizer, scheduler, state, best):
        checkpoint(work, model, optimizer, scheduler, state, best)
        if state.step == 4:
            raise Killed

    monkeypatch.setattr(recipe, "_checkpoint", checkpoint_then_die)
    resumed_config = config(tiny_model, data, tmp_path / "resumed")
    with pytest.raises(Killed):
        recipe.train(resumed_config)
    monkeypatch.undo()
    resumed = recipe.train(resumed_config, resume=True)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in json.loads((resumed / "lorag.json").read_text())["training"]["metrics"]]
    assert steps == list(range(1, 9))  # nothing lost or counted twice
    with pytest.raises(recipe.TrainingError, match="no checkpoint"):
        recipe.train(config(tiny_model, data, tmp_path / "never", "checkpoint_every=0"), resume=True)


def test_early_stopping_stops_and_keeps_the_best_weights(tiny_model: Path, data, tmp_path: Path):
    # A learning rate far too high: eval loss gets worse after the first steps.
    out = recipe.train(config(tiny_model, data, tmp_path / "wild", "learning_rate=0.5", "warmup_steps=0",
                              "eval_every=1", "early_stopping=2", "epochs=4"))
    training = json.loads((out / "lorag.json").read_text())["training"]
    evals = {m["step"]: m["eval_loss"] for m in training["metrics"] if "eval_loss" in m}
    assert training["stopped_early"] is True and training["steps"] < 16
    assert training["final_eval_loss"] == min(evals.values()) == evals[training["best_step"]]
    assert list(evals)[-1] == training["best_step"] + 2  # two evaluations without a gain


def test_method_full_with_loss_all_trains_every_weight_on_every_token_into_a_loadable_model(
        tiny_model: Path, data, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    cfg = config(tiny_model, data, out, "method=full", "loss=all", "max_grad_norm=1.0", "max_steps=4",
                 "eval_every=0", "checkpoint_every=0")
    renderer, rows_seen, _, _ = recipe.setup(cfg)
    # Every token is a label, the prompt's too: more than the assistant turns alone.
    assert all(r.labels == r.input_ids for r in rows_seen)
    assert sum(map(recipe.trainable, rows_seen)) > sum(map(recipe.trainable, recipe.setup(
        config(tiny_model, data, out))[1]))
    recipe.train(cfg)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "lorag.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"adapter_config.json", "lorag-demo.json"}  # a model, not an adapter; not the built base
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == renderer.tokenizer.chat_template
    assert model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=2).shape == (1, 3)
    training = json.loads((out / "lorag.json").read_text())["training"]
    assert (training["config"]["method"], training["config"]["loss"], training["steps"]) == ("full", "all", 4)
    with pytest.raises(ConfigError, match="method must be one of lora, full"):
        config(tiny_model, data, out, "method=qlora")


def test_accumulated_batches_weigh_every_trainable_token_alike(tiny_model: Path, data):
    """grad_accum=2 of 2 rows gives the gradients of one batch of 4: the loss is over all their tokens."""
    renderer = Renderer.load(tiny_model)
    uneven = rows(2) + [{"messages": [{"role": "user", "content": "Long?"},
                                      {"role": "assistant", "content": "Per Article 9, " + "it is void; " * 12}]}] * 2
    rendered = [renderer.render(parse(i + 1, json.dumps(r))[0]) for i, r in enumerate(uneven)]
    cfg = config(tiny_model, data, Path("unused"), "lora.dropout=0")
    model = recipe.trained_model(cfg, torch.device("cpu"), torch.float32)
    count = sum(recipe.trainable(r) for r in rendered)

    def grads(parts: list[list[int]]) -> list[torch.Tensor]:
        model.zero_grad()
        for part in parts:
            batch = recipe.collate([rendered[i] for i in part], 0, torch.device("cpu"))
            (recipe.token_loss_sum(model, batch) / count).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole, accumulated = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, accumulated, strict=True))
    # Averaging each micro-batch's mean instead (what a naive loop does) would weigh short rows up.
    model.zero_grad()
    for part in ([0, 1], [2, 3]):
        batch = recipe.collate([rendered[i] for i in part], 0, torch.device("cpu"))
        tokens = sum(recipe.trainable(rendered[i]) for i in part)
        (recipe.token_loss_sum(model, batch) / tokens / 2).backward()
    naive = [p.grad for p in model.parameters() if p.requires_grad]
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, naive, strict=True))


def test_bad_data_or_config_stops_the_run_before_training(tiny_model: Path, data, tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows(1)[0]) + "\n{oops\n")
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(CONFIG), f"model={tiny_model}", f"train={bad}",
         f"output={tmp_path / 'x'}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "data doctor found errors" in run.stderr and ":2: invalid_json" in run.stderr
    assert not (tmp_path / "x").exists()
    for override, complaint in [("lora.rnk=4", "unknown setting(s) lora.rnk"), ("epochs=0", "epochs must be at least 1"),
                                ("schedule=step", "schedule must be one of"), ("batch_size=two", "must be a number"),
                                ("early_stopping=2", "early_stopping needs an eval file")]:
        run = subprocess.run([sys.executable, "-m", "training.recipe", str(CONFIG), f"model={tiny_model}",
                              f"train={data[0]}", override], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and complaint in run.stderr, (override, run.stderr[-500:])


def test_a_trained_adapter_passes_the_canary_and_changes_the_engines_greedy_answer(gateway, tiny_model, data,
                                                                                   tmp_path: Path):
    import httpx

    from tests.conftest import MODEL_NAME

    train, evaluation = data
    pushed = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", str(CONFIG), f"model={tiny_model}", f"train={train}",
         f"eval={evaluation}", f"output={tmp_path / 'served'}", "learning_rate=0.02", "epochs=4",
         "--push", gateway.url, "--name", "recipe-legal", "--activate"],
        capture_output=True, text=True, timeout=600,
    )
    try:
        # Validated, loaded and canary-checked by the service, then active.
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr[-3000:]
        assert "pushed recipe-legal@" in pushed.stdout and "activated" in pushed.stdout

        def answer(model: str) -> str:
            body = {"model": model, "max_tokens": 12, "temperature": 0,
                    "messages": [{"role": "user", "content": "Is clause 3 of the harbour lease valid?"}]}
            response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        assert answer("recipe-legal") != answer(MODEL_NAME)
    finally:
        httpx.delete(f"{gateway.url}/v1/adapters/recipe-legal", timeout=60)


def test_training_renders_a_prompt_to_the_token_ids_the_engine_uses(gateway, tiny_model: Path):
    import httpx

    from tests.conftest import MODEL_NAME

    renderer = Renderer.load(tiny_model)
    messages = [{"role": "system", "content": "Answer as counsel."},
                {"role": "user", "content": "Is clause 7 of the harbour lease valid?"},
                {"role": "assistant", "content": "Per Article 7, it is invalid."},
                {"role": "user", "content": "And clause 8?"}]
    # vLLM's own tokenizer endpoint, on the engine behind the gateway: the ids it would prefill.
    counted = httpx.post(f"{gateway.engine_url()}/tokenize", headers=gateway.engine_headers(), timeout=30,
                         json={"model": MODEL_NAME, "messages": messages, "add_generation_prompt": True}).json()
    assert renderer.encode(messages, generation_prompt=True) == counted["tokens"]


def test_two_processes_train_one_adapter_as_one_process_accumulating_would(tiny_model: Path, data, tmp_path: Path):
    """torchrun with 2 CPU processes (gloo), one batch each per step, against one process
    accumulating the same two batches: the same step, so the same weights."""
    from service.engine.launcher import free_port

    train, evaluation = data
    common = [f"model={tiny_model}", f"train={train}", f"eval={evaluation}", "lora.dropout=0", "checkpoint_every=0"]
    two = tmp_path / "two"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "training.recipe", str(CONFIG), *common, f"output={two}",
         "grad_accum=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert sorted(p.name for p in two.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "lorag.json"]
    steps = [m["step"] for m in json.loads((two / "lorag.json").read_text())["training"]["metrics"]]
    assert steps == list(range(1, 9))  # written by one process, each step once (32 rows, 2 batches of 4 a step, 2 epochs)
    one = recipe.train(config(tiny_model, data, tmp_path / "one", *common[3:], "grad_accum=2"))
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(w.abs().sum() > 0 for k, w in a.items() if ".lora_B." in k)
