"""The lorag gateway: FastAPI app, engines, chat."""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
