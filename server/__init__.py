"""adsa-serve HTTP daemon: FastAPI app over the adsa_core AsyncEngine."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
