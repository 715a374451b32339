from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="For an adapter: the base model it runs on.")
    version: str | None = Field(None, description="For an adapter: the version this name serves.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
