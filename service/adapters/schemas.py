"""Adapter API shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# An eval result is stored and shown with its version for as long as the version exists: bounded, so
# that one caller cannot grow the registry (and every listing) without limit.
MAX_EVAL_SUITES = 32  # per version
MAX_EVAL_FAILURES = 200
MAX_FAILURE_CHARS = 2000
MAX_EVAL_REPORT_BYTES = 262_144  # the report as JSON (LORAG_MAX_BODY_BYTES may refuse it first: 413)
# A suite's `name:` as people write it ("legal house style"): 1-128 characters, no control characters,
# no space at either end (two names that differ only there would be two suites that look the same).
SUITE_NAME = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,126}[^\s\x00-\x1f\x7f])?$"


class RagDefault(BaseModel):
    """An adapter's retrieval defaults: what chat with the adapter (any of its versions) and no `rag`
    field uses. A request's own `rag` fields win; `"rag": {"enabled": false}` turns retrieval off."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(min_length=1, max_length=200, description="A collection of the caller's tenant.")
    top_k: int | None = Field(None, ge=1, le=100, description="Chunks to retrieve; default: LORAG_RAG_TOP_K.")
    mode: Literal["hybrid", "dense", "keyword"] | None = Field(
        None, description="Search mode; default: LORAG_RAG_MODE."
    )


class EvalIn(BaseModel):
    """One eval suite's result for a version; storing again for the same suite replaces it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"suite": "legal-gate", "passed": False,
                                         "failures": ["legal+rag: facts 0.82 < 0.90"],
                                         "report": {"cells": {"legal+rag": {"facts": 0.82}}}}]},
    )

    suite: str = Field(pattern=SUITE_NAME, description="The suite's name: the key results are stored under.")
    # Strict: a gate's verdict is never guessed from "yes" or 1.
    passed: bool = Field(strict=True, description="Whether the version passed the suite's gate.")
    failures: list[Annotated[str, StringConstraints(max_length=MAX_FAILURE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_EVAL_FAILURES, description="What failed, one message each."
    )
    report: dict[str, Any] = Field(
        default_factory=dict, description=f"The full report, any JSON object (at most {MAX_EVAL_REPORT_BYTES} bytes)."
    )


class EvalOut(BaseModel):
    object: Literal["adapter.eval"] = "adapter.eval"
    suite: str
    passed: bool
    failures: list[str]
    stored: float = Field(description="Unix time the result was stored.")
    report: dict[str, Any] | None = Field(
        None, description="The full report: in GET /v1/adapters/{name} and the PUT's answer, not in the list."
    )


class VersionOut(BaseModel):
    object: Literal["adapter.version"] = "adapter.version"
    version: str = Field(description="First 12 hex digits of the sha256 of the adapter's files.")
    served_name: str = Field(description="`name@version`: what `model` may name to pin this version.")
    active: bool
    created: float = Field(description="Unix time of the upload.")
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    content_hash: str
    base_fingerprint: str | None = Field(
        description="The base model it was validated against (or the one its lorag.json declares)."
    )
    training: dict[str, Any] | None = Field(description="The training manifest, when the upload had one.")
    eval: dict[str, Any] | None = Field(description="Evaluation results, when the upload had them.")
    rag: dict[str, Any] | None = Field(
        description="Retrieval defaults its lorag.json declared; the adapter's own `rag`, when set, replaces them."
    )
    evals: list[EvalOut] = Field(description="Stored eval results (PUT .../versions/{version}/eval), by suite name.")
    engines: dict[str, bool] = Field(description="Engine name → whether the version is loaded there now.")
    in_flight: int = Field(description="Requests holding this version now.")


class AdapterOut(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    active: str | None = Field(description="The version that `model: name` resolves to; null before activation.")
    created: float
    rag: RagDefault | None = Field(
        description="Retrieval defaults set through the API (activate's `rag`, PUT /v1/adapters/{name}/rag): "
        "used by chat with any version of the adapter and no `rag` field, instead of the version's lorag.json `rag`."
    )
    versions: list[VersionOut]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="The version to activate (see GET /v1/adapters/{name}).")
    rag: RagDefault | None = Field(
        None, description="Also set the adapter's retrieval defaults, in the same change (absent: kept as they are)."
    )


class ActivationOut(BaseModel):
    object: Literal["adapter.activation"] = "adapter.activation"
    adapter: str
    active: str
    served_name: str = Field(description="`name@version` of the active version: what `model` may name to pin it.")
    previous: str | None
    changed: bool = Field(description="false when the version was already active.")
    engines: dict[str, bool] = Field(description="Engine name → loaded there.")
    rag: RagDefault | None = Field(description="The adapter's retrieval defaults after the activation.")
    elapsed_ms: float


class UploadOut(BaseModel):
    object: Literal["adapter.upload"] = "adapter.upload"
    status: Literal["created", "unchanged"]
    version: VersionOut
    activation: ActivationOut | None = None


class Deleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    adapter: str
    version: str | None = None
    deleted: bool = True
