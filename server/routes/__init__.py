"""One router per resource."""

from . import generate, health, images, metrics, models, playground

routers = [generate.router, images.router, models.router, health.router, metrics.router, playground.router]
