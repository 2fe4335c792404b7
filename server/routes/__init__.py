"""One router per resource."""

from . import generate, health, metrics, models

routers = [generate.router, models.router, health.router, metrics.router]
