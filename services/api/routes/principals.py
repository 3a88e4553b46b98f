"""Principals: actors create clients and actors; anyone asks who they are."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.api import service
from services.api.deps import CurrentActor, CurrentPrincipal, UowDep
from services.api.schemas import PrincipalCreate, PrincipalCreated, PrincipalOut

router = APIRouter(prefix="/v1", tags=["principals"])


@router.post("/principals", status_code=status.HTTP_201_CREATED)
async def create_principal(body: PrincipalCreate, _actor: CurrentActor, uow: UowDep) -> PrincipalCreated:
    """Create a client or actor; its token is in this answer and nowhere else."""
    principal, token = await service.create_principal(uow, body.name, body.role)
    return PrincipalCreated(id=principal.id, name=principal.name, role=principal.role, token=token)


@router.get("/me")
async def me(principal: CurrentPrincipal) -> PrincipalOut:
    """Who the token belongs to."""
    return PrincipalOut(id=principal.id, name=principal.name, role=principal.role)
