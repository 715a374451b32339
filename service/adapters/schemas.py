"""Adapter API shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    rag: dict[str, Any] | None = Field(description="Retrieval defaults the version is meant to serve with.")
    engines: dict[str, bool] = Field(description="Engine name → whether the version is loaded there now.")
    in_flight: int = Field(description="Requests holding this version now.")


class AdapterOut(BaseModel):
    object: Literal["adapter"] = "adapter"
    name: str
    active: str | None = Field(description="The version that `model: name` resolves to; null before activation.")
    created: float
    versions: list[VersionOut]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="The version to activate (see GET /v1/adapters/{name}).")


class ActivationOut(BaseModel):
    object: Literal["adapter.activation"] = "adapter.activation"
    adapter: str
    active: str
    served_name: str = Field(description="`name@version` of the active version: what `model` may name to pin it.")
    previous: str | None
    changed: bool = Field(description="false when the version was already active.")
    engines: dict[str, bool] = Field(description="Engine name → loaded there.")
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
