"""The model names clients may ask for, and what each one means to the engine."""

from __future__ import annotations

import time

from service.errors import ModelNotFound
from service.settings import Settings


class ModelCatalog:
    def __init__(self, settings: Settings):
        self._base = settings.served_model_name
        self._created = int(time.time())

    @property
    def base(self) -> str:
        return self._base

    def names(self) -> list[str]:
        return [self._base]

    def resolve(self, name: str) -> str:
        """The engine-side model name for a client's `model`; ModelNotFound lists the known ones."""
        if name == self._base:
            return self._base
        raise ModelNotFound(name, self.names())

    def listing(self) -> list[dict]:
        return [{"id": self._base, "object": "model", "created": self._created, "owned_by": "lorag"}]
