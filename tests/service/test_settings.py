"""Settings parsing, the engine command line, and the README's settings table."""

from __future__ import annotations

from pathlib import Path

from knowledge import KnowledgeSettings
from service.engine.launcher import launch_spec
from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme():
    readme = README.read_text()
    names = [*Settings.model_fields, *KnowledgeSettings.model_fields]
    missing = [f"LORAG_{name.upper()}" for name in names if f"`LORAG_{name.upper()}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_env_lists_are_comma_and_shell_separated(monkeypatch):
    monkeypatch.setenv("LORAG_ENGINE_URLS", " http://a:1/, http://b:2 ,")
    monkeypatch.setenv("LORAG_ENGINE_ARGS", "--gpu-memory-utilization 0.8 --served-model-name 'x y'")
    settings = Settings()
    assert settings.engine_urls == ["http://a:1", "http://b:2"]
    assert not settings.embedded
    assert settings.engine_args == ["--gpu-memory-utilization", "0.8", "--served-model-name", "x y"]


def test_default_model_is_the_demo_model_under_home(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.model_path == tmp_path / "models" / "demo-base"
    assert settings.served_model_name == "lorag-demo"
    assert Settings(model=tmp_path / "my-llm").served_model_name == "my-llm"


def test_engine_is_launched_on_loopback_with_runtime_lora(tmp_path):
    spec = launch_spec(Settings(model=tmp_path, engine_max_lora_rank=16, engine_args="--seed 7"), "k3y", port=4321)
    argv = " ".join(spec.argv)
    assert "--host 127.0.0.1 --port 4321" in argv
    assert "--enable-lora" in argv and "--max-lora-rank 16" in argv
    assert argv.endswith("--seed 7")
    assert spec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert spec.env["HF_HUB_OFFLINE"] == "1"
