"""Pure transitions of a training: given a snapshot and what happened, the next state and its effects.

No I/O here: handlers load a `TrainingView`, call one function, and apply the returned `Step`
(row update, round bookkeeping, notifications, aggregation job) in one transaction.

States and phases::

    INITIAL --start--> ONGOING/COLLECTING(r=1)
    COLLECTING --all participants uploaded, or deadline with >= min_clients--> AGGREGATING
    COLLECTING --deadline with < min_clients--> FAILED
    AGGREGATING --model aggregated, test due--> TESTING
    AGGREGATING --model aggregated, no test, r < rounds--> COLLECTING(r+1)
    AGGREGATING --model aggregated, no test, r == rounds--> COMPLETED
    AGGREGATING --aggregation failed--> FAILED
    TESTING --all participants reported, or deadline--> COLLECTING(r+1) | COMPLETED
    INITIAL | ONGOING (any phase) --cancel--> CANCELLED
    COMPLETED, FAILED, CANCELLED: final (every transition refused)

CANCELLED closes the open round (its `finished_at`) and tells participants and owner with
TRAINING_FINISHED, whose body says `"state": "CANCELLED"` as it says FAILED or COMPLETED; an
aggregation job or a deadline that comes after it is refused, so it changes nothing.

TRAINING_START and UPDATE_ROUND_START bodies carry the training's `client_config` (update kind,
excluded tensors, FedProx's mu): what a client needs to train the round.

A test is due after round r when `not skip_model_tests and (model_test_after_each_round or
r == rounds)`: the seed's trainer options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from shared.enums import RoundPhase, TrainingState
from shared.errors import IllegalTransition
from shared.events import NotificationType


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingView:
    """What transitions need to know of a training."""

    id: UUID
    state: TrainingState
    phase: RoundPhase | None
    round: int
    rounds: int
    participants: int
    min_clients: int
    round_timeout_s: float
    current_model_id: UUID
    skip_model_tests: bool = False
    model_test_after_each_round: bool = True
    deadline_at: datetime | None = None
    client_config: dict[str, Any] = field(default_factory=dict)
    """What clients need to train a round (update kind, excluded tensors, FedProx's mu)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """A notification to issue: its type and body (the seed's `{"round", "global_model_uuid"}`)."""

    type: NotificationType
    body: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """The outcome of a transition: the new training fields and the effects to apply with them."""

    state: TrainingState
    phase: RoundPhase | None
    round: int
    deadline_at: datetime | None
    current_model_id: UUID
    failure_reason: str | None = None
    notices: tuple[Notice, ...] = ()
    aggregate: bool = False
    """Emit the aggregation job for `round`."""
    round_started: bool = False
    """`round` has just begun."""
    round_finished: int | None = None
    """This round is over (its model final, tests done or skipped)."""


def _from(view: TrainingView, **changes: Any) -> Step:
    base = Step(
        state=view.state,
        phase=view.phase,
        round=view.round,
        deadline_at=view.deadline_at,
        current_model_id=view.current_model_id,
    )
    return replace(base, **changes)


_PHASE_ORDER = {RoundPhase.COLLECTING: 0, RoundPhase.AGGREGATING: 1, RoundPhase.TESTING: 2}


def has_left(view: TrainingView, round_: int, phase: RoundPhase) -> bool:
    """Whether the training is past `phase` of `round_` for good (a later phase or round, or an end).

    Rounds and the phases within one only move forward, so once true it stays true."""
    if view.state in (TrainingState.COMPLETED, TrainingState.FAILED, TrainingState.CANCELLED):
        return True
    if view.state is not TrainingState.ONGOING or view.phase is None:
        return False
    return (view.round, _PHASE_ORDER[view.phase]) > (round_, _PHASE_ORDER[phase])


def _require(view: TrainingView, action: str, state: TrainingState, phase: RoundPhase | None = None) -> None:
    if view.state is not state or (phase is not None and view.phase is not phase):
        where = view.state.value + (f"/{view.phase.value}" if view.phase else "")
        wanted = state.value + (f"/{phase.value}" if phase else "")
        raise IllegalTransition(f"training {view.id}: cannot {action} in {where} (needs {wanted})")


def _round_body(round_: int, model_id: UUID) -> dict[str, Any]:
    return {"round": round_, "global_model_uuid": str(model_id)}


def _training_round_body(view: TrainingView, round_: int, model_id: UUID) -> dict[str, Any]:
    """A body that starts training: the round, its model, and what clients need to train it."""
    body = _round_body(round_, model_id)
    if view.client_config:
        body["client_config"] = dict(view.client_config)
    return body


def _deadline(view: TrainingView, now: datetime) -> datetime:
    return now + timedelta(seconds=view.round_timeout_s)


def start(view: TrainingView, now: datetime) -> Step:
    """INITIAL -> ONGOING: round 1 starts collecting; TRAINING_START and UPDATE_ROUND_START go out."""
    _require(view, "start", TrainingState.INITIAL)
    body = _training_round_body(view, 1, view.current_model_id)
    return _from(
        view,
        state=TrainingState.ONGOING,
        phase=RoundPhase.COLLECTING,
        round=1,
        deadline_at=_deadline(view, now),
        round_started=True,
        notices=(
            Notice(type=NotificationType.TRAINING_START, body=body),
            Notice(type=NotificationType.UPDATE_ROUND_START, body=body),
        ),
    )


def update_received(view: TrainingView, round_: int, received: int) -> Step | None:
    """An update arrived: once every participant has uploaded, the round goes to aggregation.

    Returns None when nothing changes (quorum not complete yet).
    """
    _require(view, "collect an update", TrainingState.ONGOING, RoundPhase.COLLECTING)
    if round_ != view.round:
        raise IllegalTransition(
            f"training {view.id}: update for round {round_}, the open round is {view.round}"
        )
    if received < view.participants:
        return None
    return _from(view, phase=RoundPhase.AGGREGATING, deadline_at=None, aggregate=True)


def model_aggregated(view: TrainingView, round_: int, model_id: UUID, now: datetime) -> Step:
    """The round's global model is ready: test it if a test is due, else move on."""
    _require(view, "accept an aggregated model", TrainingState.ONGOING, RoundPhase.AGGREGATING)
    if round_ != view.round:
        raise IllegalTransition(
            f"training {view.id}: model for round {round_}, aggregating round {view.round}"
        )
    view = replace(view, current_model_id=model_id)
    if test_due(view):
        return _from(
            view,
            phase=RoundPhase.TESTING,
            deadline_at=_deadline(view, now),
            notices=(Notice(type=NotificationType.MODEL_TEST_ROUND, body=_round_body(view.round, model_id)),),
        )
    return _advance(view, now)


def test_reported(view: TrainingView, round_: int, reported: int, now: datetime) -> Step | None:
    """A test report arrived: once every participant reported, the training moves on."""
    _require(view, "collect a test report", TrainingState.ONGOING, RoundPhase.TESTING)
    if round_ != view.round:
        raise IllegalTransition(
            f"training {view.id}: test report for round {round_}, testing round {view.round}"
        )
    if reported < view.participants:
        return None
    return _advance(view, now)


def deadline_passed(view: TrainingView, received: int, now: datetime) -> Step | None:
    """The phase's deadline: aggregate what arrived (quorum permitting), or stop waiting for tests.

    `received` counts the current round's updates. None when the deadline has not passed.
    """
    _require(view, "time out", TrainingState.ONGOING)
    if view.deadline_at is None or now < view.deadline_at:
        return None
    if view.phase is RoundPhase.COLLECTING:
        if received >= max(view.min_clients, 1):
            return _from(view, phase=RoundPhase.AGGREGATING, deadline_at=None, aggregate=True)
        return fail(
            view,
            f"round {view.round}: {received} of the {view.min_clients} updates needed "
            "arrived by the deadline",
        )
    if view.phase is RoundPhase.TESTING:
        return _advance(view, now)
    return None


def aggregation_failed(view: TrainingView, round_: int, reason: str) -> Step:
    """The aggregator could not produce the round's model: the training fails with its reason."""
    _require(view, "fail an aggregation", TrainingState.ONGOING, RoundPhase.AGGREGATING)
    return fail(view, f"round {round_}: aggregation failed: {reason}")


def fail(view: TrainingView, reason: str) -> Step:
    """Any ONGOING training -> FAILED; clients are told it is over."""
    _require(view, "fail", TrainingState.ONGOING)
    body = {**_round_body(view.round, view.current_model_id), "state": "FAILED", "reason": reason}
    return _from(
        view,
        state=TrainingState.FAILED,
        phase=None,
        deadline_at=None,
        failure_reason=reason,
        notices=(Notice(type=NotificationType.TRAINING_FINISHED, body=body),),
    )


def cancel(view: TrainingView) -> Step:
    """INITIAL or ONGOING (any phase) -> CANCELLED: the open round closes; everyone is told it is over.

    A finished training (COMPLETED, FAILED, or already CANCELLED) is refused.
    """
    if view.state not in (TrainingState.INITIAL, TrainingState.ONGOING):
        raise IllegalTransition(
            f"training {view.id}: cannot cancel in {view.state.value} (needs INITIAL or ONGOING)"
        )
    body = {**_round_body(view.round, view.current_model_id), "state": TrainingState.CANCELLED.value}
    return _from(
        view,
        state=TrainingState.CANCELLED,
        phase=None,
        deadline_at=None,
        round_finished=view.round if view.state is TrainingState.ONGOING else None,
        notices=(Notice(type=NotificationType.TRAINING_FINISHED, body=body),),
    )


def test_due(view: TrainingView) -> bool:
    """Whether the current round's model is tested (the seed's trainer options)."""
    if view.skip_model_tests:
        return False
    return view.model_test_after_each_round or view.round == view.rounds


def _advance(view: TrainingView, now: datetime) -> Step:
    if view.round >= view.rounds:
        body = {**_round_body(view.round, view.current_model_id), "state": "COMPLETED"}
        return _from(
            view,
            state=TrainingState.COMPLETED,
            phase=None,
            deadline_at=None,
            round_finished=view.round,
            notices=(Notice(type=NotificationType.TRAINING_FINISHED, body=body),),
        )
    nxt = view.round + 1
    return _from(
        view,
        phase=RoundPhase.COLLECTING,
        round=nxt,
        deadline_at=_deadline(view, now),
        round_started=True,
        round_finished=view.round,
        notices=(
            Notice(
                type=NotificationType.UPDATE_ROUND_START,
                body=_training_round_body(view, nxt, view.current_model_id),
            ),
        ),
    )
