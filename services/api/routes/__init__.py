"""The API's routers, one module per resource."""

from fastapi import APIRouter

from services.api.routes import health, models, principals, trainings, updates

ROUTERS: tuple[APIRouter, ...] = (
    updates.router,
    trainings.router,
    models.router,
    principals.router,
    health.router,
)
"""Every router `create_app` includes, the busiest first: a request is matched against the routes in
order (each costs Starlette a path computation), and a round's uploads and test reports are most
of the requests."""

__all__ = ["ROUTERS"]
