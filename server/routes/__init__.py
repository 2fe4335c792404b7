"""One router per resource."""

from . import generate, health, metrics, models, playground

routers = [generate.router, models.router, health.router, metrics.router, playground.router]
