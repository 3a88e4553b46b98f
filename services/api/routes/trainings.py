"""Trainings: actors create, start and cancel them; owners and participants follow their state and rounds."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Response, status

from services.api import service
from services.api.deps import CacheDep, CurrentActor, CurrentPrincipal, UowDep
from services.api.schemas import ErrorOut, RejectedOut, RoundOut, TrainingCreate, TrainingOut
from services.api.service import RoundView, TrainingView

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])


def training_out(view: TrainingView) -> TrainingOut:
    """A training as the API shows it."""
    t = view.training
    return TrainingOut(
        id=t.id,
        state=t.state,
        phase=t.phase,
        round=t.round,
        rounds=t.rounds,
        aggregation=t.aggregation,
        aggregation_params=dict(t.aggregation_params or {}),
        update_kind=t.update_kind,
        exclude_vars=t.exclude_vars,
        max_update_norm=t.max_update_norm,
        client_config=t.client_config(),
        min_clients=t.min_clients,
        round_timeout_s=t.round_timeout_s,
        skip_model_tests=t.skip_model_tests,
        model_test_after_each_round=t.model_test_after_each_round,
        delete_local_models_after_aggregation=t.delete_local_models_after_aggregation,
        initial_model_id=t.initial_model_id,
        current_model_id=t.current_model_id,
        participants=view.participants,
        uploaded=view.uploaded,
        tested=view.tested,
        deadline_at=t.deadline_at,
        failure_reason=t.failure_reason,
        created_at=t.created_at,
    )


def round_out(view: RoundView) -> RoundOut:
    """A round as the API shows it."""
    r = view.row
    return RoundOut(
        round=r.round,
        started_at=r.started_at,
        aggregated_at=r.aggregated_at,
        finished_at=r.finished_at,
        model_id=r.model_id,
        num_updates=r.num_updates,
        num_examples=r.num_examples,
        train_metrics=view.train_metrics,
        test_metrics=view.test_metrics,
        rejected=[
            RejectedOut(update_id=r.update_id, client_id=r.client_id, reason=r.reason) for r in view.rejected
        ],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def create_training(body: TrainingCreate, actor: CurrentActor, uow: UowDep) -> TrainingOut:
    """Create a training over an uploaded model and a set of clients; it waits in INITIAL."""
    return training_out(await service.create_training(uow, actor.id, body))


@router.get("/{training_id}", responses={404: {"model": ErrorOut}})
async def get_training(
    training_id: UUID, principal: CurrentPrincipal, uow: UowDep, cache: CacheDep
) -> TrainingOut:
    """A training, for its owner or its participants.

    A participant sees itself alone in `participants`, `uploaded` and `tested`: clients learn
    nothing of each other; the owner sees every client."""
    training = await service.visible_training(uow.session, cache, training_id, principal)
    return training_out(await service.training_view(uow.session, training, viewer=principal.id))


@router.post(
    "/{training_id}/start",
    status_code=status.HTTP_202_ACCEPTED,
    responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
)
async def start_training(training_id: UUID, actor: CurrentActor, uow: UowDep) -> TrainingOut:
    """Ask for the training to start; the orchestrator moves it to ONGOING."""
    return training_out(await service.request_start(uow, training_id, actor))


@router.post(
    "/{training_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"model": TrainingOut, "description": "already CANCELLED: nothing new requested"},
        404: {"model": ErrorOut},
        409: {"model": ErrorOut},
    },
)
async def cancel_training(
    training_id: UUID, actor: CurrentActor, uow: UowDep, response: Response
) -> TrainingOut:
    """Ask for the training to be cancelled (INITIAL or ONGOING); the orchestrator moves it to CANCELLED.

    A training already CANCELLED is answered 200 as it is; a COMPLETED or FAILED one is a 409.
    """
    view, requested = await service.request_cancel(uow, training_id, actor)
    if not requested:
        response.status_code = status.HTTP_200_OK
    return training_out(view)


@router.get("/{training_id}/rounds", responses={404: {"model": ErrorOut}})
async def get_rounds(
    training_id: UUID, principal: CurrentPrincipal, uow: UowDep, cache: CacheDep
) -> list[RoundOut]:
    """Every round so far with its example-weighted mean train and test metrics."""
    training = await service.visible_training(uow.session, cache, training_id, principal)
    return [round_out(view) for view in await service.round_summaries(uow.session, training)]
