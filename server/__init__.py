"""adsa-serve HTTP daemon: FastAPI app over the engine client (the engine core runs in its own process)."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
