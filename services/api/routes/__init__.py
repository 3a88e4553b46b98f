"""The API's routers, one module per resource."""

from fastapi import APIRouter

from services.api.routes import health, models, principals, trainings, updates

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    principals.router,
    models.router,
    trainings.router,
    updates.router,
)
"""Every router `create_app` includes."""

__all__ = ["ROUTERS"]
