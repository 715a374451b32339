"""Service settings: every knob of the gateway and its embedded engine, from `LORAG_*` variables."""

from __future__ import annotations

import ipaddress
import shlex
import sys
from pathlib import Path
from typing import Annotated

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from knowledge.prompting import DEFAULT_SYSTEM_TEMPLATE, check_template
from knowledge.settings import default_home

DEMO_MODEL_NAME = "lorag-demo"


class Settings(BaseSettings):
    """Read once by the CLI (or a test) and passed to `create_app`; never a module global."""

    model_config = SettingsConfigDict(env_prefix="LORAG_", protected_namespaces=())

    # Gateway
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    home: Path = Field(
        default_factory=default_home,
        description="Data directory: models, adapters, state (the key store too), logs; default $XDG_DATA_HOME/lorag "
        "or ~/.local/share/lorag.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL shared by every gateway (the adapter registry, API keys and the knowledge "
        "base's records); unset: SQLite files under home.",
    )
    log_level: str = Field("info", description="Log level; 'debug' also shows the embedded engine's output.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as one JSON object each; both carry the request id."
    )
    drain_timeout_s: float = Field(
        30, ge=0, description="On SIGTERM, longest wait for requests in flight to finish before the engine stops."
    )
    keepalive_timeout_s: int = Field(
        5, ge=1, description="Seconds a keep-alive connection may stay silent after a response before it is closed."
    )
    header_timeout_s: float = Field(
        10, gt=0, description="Seconds a connection has, from opening or from its previous response, to send the "
        "next request's headers in full; a silent or slower connection is closed.",
    )
    max_connections: int = Field(
        1000, ge=1, description="Open client connections at most; a request on one past it is answered "
        "503 too_many_connections (with Retry-After) and the connection closed.",
    )
    torch_threads: int = Field(
        1, ge=1, description="torch threads in the gateway (the embedder), and ONNX Runtime threads of the query "
        "encoder; more fight vLLM for the CPU and run slower."
    )
    query_encoder: Literal["onnx", "torch"] = Field(
        "onnx",
        description="Runtime that embeds chat queries: 'onnx' runs the embedder's model on ONNX Runtime (exported "
        "from the same weights at first start, cached under home/cache, checked against torch's vectors at every "
        "start; an export that fails stops the start), 'torch' runs the embedder itself. Documents always use torch.",
    )

    auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="API keys required: 'auto' = on unless the gateway listens on loopback only; "
        "'off' is refused on any other address.",
    )
    metrics_auth: Literal["auto", "key", "open"] = Field(
        "auto",
        description="/metrics (every tenant's adapter names, versions and traffic) needs a key with the "
        "'metrics' scope: 'auto' = when API keys are required, 'key' = always, 'open' = never.",
    )

    # Base model
    model: Path | None = Field(
        None, description="Hugging Face causal-LM directory to serve; default: the demo model under home."
    )
    model_name: str | None = Field(
        None, description="Name clients pass as `model`; default: 'lorag-demo' or the model directory's name."
    )

    adapters_root: Path | None = Field(
        None,
        description="Folder of adapter versions (default: home/adapters); with LORAG_ENGINE_URLS, "
        "every replica must see it at the same path.",
    )

    # Engine
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated vLLM server URLs (external mode); empty starts a local vLLM (embedded mode).",
    )
    engine_api_key: SecretStr | None = Field(
        None,
        min_length=1,
        description="Key the gateway sends to the engines as 'Authorization: Bearer'; external mode: the key "
        "the vLLM servers were started with (VLLM_API_KEY). Unset: embedded mode makes one at each start.",
    )
    engine_python: str = Field(sys.executable, description="Python interpreter that runs the embedded vLLM.")
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra vLLM command-line flags, shell-quoted, for the embedded engine."
    )
    engine_kv_cache_gib: int = Field(1, ge=1, description="KV-cache size in GiB for vLLM on CPU.")
    engine_max_model_len: int = Field(2048, ge=128, description="Longest prompt plus output, in tokens.")
    engine_max_lora_rank: int = Field(8, description="Largest LoRA rank the engine accepts (vLLM: 1, 8, 16, 32, ...).")
    engine_max_loras: int = Field(4, ge=1, description="LoRA adapters resident in one batch.")
    engine_dtype: str = Field("auto", description="vLLM --dtype.")
    engine_nice: int = Field(
        10, ge=0, le=19,
        description="Niceness of the embedded engine (its process group's scheduling group): the "
        "gateway's short per-request work, such as embedding a query, goes ahead of generation on shared cores.",
    )
    engine_startup_timeout_s: float = Field(600, gt=0, description="Longest wait for the engine to become ready.")
    engine_restart_backoff_max_s: float = Field(30, gt=0, description="Cap of the restart backoff after a crash.")
    engine_timeout_s: float = Field(300, gt=0, description="Longest wait for the engine's next byte on a request.")

    # Request limits, enforced before the engine sees a request
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body, in bytes.")
    max_upload_bytes: int = Field(
        20_971_520, ge=1024, description="Largest file upload or bulk (JSON lines) body, in bytes."
    )
    max_bulk_documents: int = Field(1000, ge=1, description="Most documents in one bulk request.")
    max_messages: int = Field(128, ge=1, description="Most messages in one chat request.")
    max_message_chars: int = Field(32_000, ge=1, description="Most characters in one message's content.")
    max_tokens: int = Field(1024, ge=1, description="Most output tokens one request may ask for (also the default).")
    max_n: int = Field(4, ge=1, description="Most choices (`n`) one request may ask for.")
    knowledge_workers: int = Field(
        4, ge=1, description="Knowledge API calls (ingest, reads, search) running at once, each in a worker thread; "
        "more wait their turn, so a burst of uploads cannot take the threads that chat and key checks need.",
    )
    max_inflight_per_engine: int = Field(
        64, ge=1, description="Chat requests in flight per engine that is up; beyond, 429 with Retry-After."
    )
    # Fair share: 0 by default, because with one tenant (auth off) any limit below the engines'
    # only idles capacity; set them when several tenants share the engines.
    tenant_max_inflight: int = Field(
        0, ge=0, description="Chat requests one tenant may have in flight (0: no limit but the engines'); "
        "beyond, 429 tenant_inflight_limit with Retry-After. A key's own limit replaces it.",
    )
    tenant_tokens_per_minute: int = Field(
        0, ge=0, description="Tokens (prompt + completion) one tenant may use in any 60 s (0: no limit); once "
        "used, 429 tenant_token_limit with Retry-After until enough of them are a minute old. A key's own limit "
        "replaces it.",
    )

    # Retrieval in chat
    rag_collection: str | None = Field(
        None, description="Collection chat retrieves from when a request names none; unset: only when asked."
    )
    rag_top_k: int = Field(5, ge=1, description="Chunks retrieved per chat request, unless the request says.")
    rag_mode: Literal["hybrid", "dense", "keyword"] = Field("hybrid", description="Search mode for chat retrieval.")
    rag_query_turns: int = Field(
        1, ge=1, description="Latest user turns joined into the retrieval query (1: the last user message only)."
    )
    rag_system_template: str = Field(
        DEFAULT_SYSTEM_TEMPLATE, description="System prompt around the sources block; must contain {sources}."
    )

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Settings:
        if self.auth == "off" and not self.loopback:
            raise ValueError(
                f"LORAG_AUTH=off with LORAG_HOST={self.host}: anyone who can reach that address could read "
                "and change every tenant's documents and adapters. Listen on 127.0.0.1, or turn auth on "
                "(LORAG_AUTH=auto or on) and create keys with `lorag keys create`."
            )
        return self

    @property
    def loopback(self) -> bool:
        """Whether the gateway listens on a loopback address only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name other than localhost: assume it is reachable
            return False

    @property
    def auth_required(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and not self.loopback)

    @property
    def metrics_key_required(self) -> bool:
        return self.metrics_auth == "key" or (self.metrics_auth == "auto" and self.auth_required)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()  # logs and `lorag keys` name the directory actually used

    @field_validator("rag_system_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        return check_template(value)  # InvalidTemplate is a ValueError: pydantic reports it

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
        return value

    @field_validator("engine_args", mode="before")
    @classmethod
    def _split_args(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else self.home / "models" / "demo-base"

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return DEMO_MODEL_NAME if self.model is None else self.model.resolve().name

    @property
    def store_path(self) -> Path:
        """The SQLite file of the adapter registry and the API keys when LORAG_DATABASE_URL is unset."""
        return self.home / "lorag.db"

    @property
    def store(self) -> str:
        """Where the adapter registry and the API keys live (the service and `lorag keys` open it)."""
        return self.database_url or f"sqlite:///{self.store_path}"

    @property
    def adapters_path(self) -> Path:
        return self.adapters_root if self.adapters_root is not None else self.home / "adapters"

    @property
    def embedded(self) -> bool:
        return not self.engine_urls
