"""Every transition of the training state machine, and the illegal ones refused."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from services.orchestrator import machine
from services.orchestrator.machine import TrainingView
from shared.enums import RoundPhase, TrainingState
from shared.errors import IllegalTransition
from shared.events import NotificationType

NOW = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = uuid4()


def view(**changes: object) -> TrainingView:
    """A training of 3 participants, 2 rounds, min 2 clients, 60 s rounds; INITIAL unless changed."""
    base = TrainingView(
        id=uuid4(),
        state=TrainingState.INITIAL,
        phase=None,
        round=0,
        rounds=2,
        participants=3,
        min_clients=2,
        round_timeout_s=60,
        current_model_id=MODEL,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def collecting(round_: int = 1, **changes: object) -> TrainingView:
    """An ongoing training collecting updates for `round_`, due in 60 s."""
    fields: dict[str, object] = {
        "state": TrainingState.ONGOING,
        "phase": RoundPhase.COLLECTING,
        "round": round_,
        "deadline_at": NOW + timedelta(seconds=60),
    }
    return view(**{**fields, **changes})


def test_start_moves_initial_to_ongoing_collecting_round_one_with_both_notifications() -> None:
    """start: INITIAL -> ONGOING/COLLECTING r1, TRAINING_START then UPDATE_ROUND_START, deadline set."""
    step = machine.start(view(), NOW)
    assert (step.state, step.phase, step.round) == (TrainingState.ONGOING, RoundPhase.COLLECTING, 1)
    assert step.deadline_at == NOW + timedelta(seconds=60)
    assert [n.type for n in step.notices] == [
        NotificationType.TRAINING_START,
        NotificationType.UPDATE_ROUND_START,
    ]
    assert step.notices[1].body == {"round": 1, "global_model_uuid": str(MODEL)}
    assert step.round_started


@pytest.mark.parametrize(
    "state", [TrainingState.ONGOING, TrainingState.COMPLETED, TrainingState.FAILED, TrainingState.CANCELLED]
)
def test_start_is_refused_unless_initial(state: TrainingState) -> None:
    """A second start (or a start of a finished training) is an illegal transition."""
    with pytest.raises(IllegalTransition, match="cannot start"):
        machine.start(view(state=state), NOW)


def test_updates_below_participants_change_nothing_and_the_last_one_triggers_aggregation() -> None:
    """COLLECTING stays until every participant uploaded, then AGGREGATING with the job."""
    v = collecting()
    assert machine.update_received(v, 1, 2) is None
    step = machine.update_received(v, 1, 3)
    assert step is not None
    assert (step.phase, step.aggregate, step.deadline_at) == (RoundPhase.AGGREGATING, True, None)
    assert step.notices == ()


def test_update_for_another_round_or_outside_collecting_is_refused() -> None:
    """Stale updates are illegal: wrong round, or the round already aggregating."""
    with pytest.raises(IllegalTransition, match="round 2"):
        machine.update_received(collecting(), 2, 3)
    with pytest.raises(IllegalTransition, match="COLLECTING"):
        machine.update_received(collecting(phase=RoundPhase.AGGREGATING), 1, 3)
    with pytest.raises(IllegalTransition):
        machine.update_received(view(), 1, 3)


def test_aggregated_model_with_test_due_goes_to_testing_with_model_test_notification() -> None:
    """AGGREGATING -> TESTING: MODEL_TEST_ROUND names the new global model."""
    new_model = uuid4()
    step = machine.model_aggregated(collecting(phase=RoundPhase.AGGREGATING), 1, new_model, NOW)
    assert (step.phase, step.round, step.current_model_id) == (RoundPhase.TESTING, 1, new_model)
    assert [n.type for n in step.notices] == [NotificationType.MODEL_TEST_ROUND]
    assert step.notices[0].body == {"round": 1, "global_model_uuid": str(new_model)}
    assert step.deadline_at == NOW + timedelta(seconds=60)


def test_aggregated_model_without_tests_starts_next_round() -> None:
    """skip_model_tests: AGGREGATING r1 -> COLLECTING r2 with UPDATE_ROUND_START on the new model."""
    new_model = uuid4()
    v = collecting(phase=RoundPhase.AGGREGATING, skip_model_tests=True)
    step = machine.model_aggregated(v, 1, new_model, NOW)
    assert (step.state, step.phase, step.round) == (TrainingState.ONGOING, RoundPhase.COLLECTING, 2)
    assert step.round_started and step.round_finished == 1
    assert step.notices[0].type is NotificationType.UPDATE_ROUND_START
    assert step.notices[0].body == {"round": 2, "global_model_uuid": str(new_model)}


def test_last_round_without_tests_completes_with_training_finished() -> None:
    """skip_model_tests on the last round: AGGREGATING -> COMPLETED, TRAINING_FINISHED."""
    new_model = uuid4()
    v = collecting(round_=2, phase=RoundPhase.AGGREGATING, skip_model_tests=True)
    step = machine.model_aggregated(v, 2, new_model, NOW)
    assert (step.state, step.phase, step.deadline_at) == (TrainingState.COMPLETED, None, None)
    assert step.notices[0].type is NotificationType.TRAINING_FINISHED
    assert step.notices[0].body["global_model_uuid"] == str(new_model)


def test_test_only_after_last_round_when_not_after_each_round() -> None:
    """model_test_after_each_round=False: round 1 skips the test, the last round is tested."""
    v1 = collecting(phase=RoundPhase.AGGREGATING, model_test_after_each_round=False)
    assert machine.model_aggregated(v1, 1, uuid4(), NOW).phase is RoundPhase.COLLECTING
    v2 = collecting(round_=2, phase=RoundPhase.AGGREGATING, model_test_after_each_round=False)
    assert machine.model_aggregated(v2, 2, uuid4(), NOW).phase is RoundPhase.TESTING


def test_aggregated_model_outside_aggregating_or_for_another_round_is_refused() -> None:
    """A duplicate or stale ModelAggregated has no effect."""
    with pytest.raises(IllegalTransition):
        machine.model_aggregated(collecting(), 1, uuid4(), NOW)
    with pytest.raises(IllegalTransition, match="round 2"):
        machine.model_aggregated(collecting(phase=RoundPhase.AGGREGATING), 2, uuid4(), NOW)


def test_all_test_reports_advance_to_next_round_and_on_last_round_complete() -> None:
    """TESTING -> COLLECTING r+1, or COMPLETED after the last round."""
    testing = collecting(phase=RoundPhase.TESTING)
    assert machine.test_reported(testing, 1, 2, NOW) is None
    step = machine.test_reported(testing, 1, 3, NOW)
    assert step is not None and (step.phase, step.round) == (RoundPhase.COLLECTING, 2)
    last = collecting(round_=2, phase=RoundPhase.TESTING)
    done = machine.test_reported(last, 2, 3, NOW)
    assert done is not None and done.state is TrainingState.COMPLETED
    assert done.notices[0].type is NotificationType.TRAINING_FINISHED
    with pytest.raises(IllegalTransition):
        machine.test_reported(collecting(), 1, 3, NOW)


def test_deadline_before_time_does_nothing() -> None:
    """No transition before the deadline."""
    assert machine.deadline_passed(collecting(), 3, NOW) is None


def test_deadline_with_quorum_aggregates_what_arrived() -> None:
    """COLLECTING past the deadline with >= min_clients updates -> AGGREGATING."""
    step = machine.deadline_passed(collecting(), 2, NOW + timedelta(seconds=61))
    assert step is not None and step.aggregate and step.phase is RoundPhase.AGGREGATING


def test_deadline_without_quorum_fails_the_training_and_tells_clients() -> None:
    """COLLECTING past the deadline with too few updates -> FAILED with a reason."""
    step = machine.deadline_passed(collecting(), 1, NOW + timedelta(seconds=61))
    assert step is not None and step.state is TrainingState.FAILED
    assert step.failure_reason is not None and "1 of the 2" in step.failure_reason
    assert step.notices[0].type is NotificationType.TRAINING_FINISHED
    assert step.notices[0].body["state"] == "FAILED"


def test_deadline_in_testing_moves_on_without_the_missing_reports() -> None:
    """TESTING past the deadline -> next round."""
    step = machine.deadline_passed(collecting(phase=RoundPhase.TESTING), 0, NOW + timedelta(seconds=61))
    assert step is not None and (step.phase, step.round) == (RoundPhase.COLLECTING, 2)


def test_deadline_of_a_finished_training_is_refused() -> None:
    """Deadlines only apply to ONGOING trainings."""
    with pytest.raises(IllegalTransition):
        machine.deadline_passed(view(state=TrainingState.COMPLETED), 3, NOW)


def test_aggregation_failure_fails_the_training() -> None:
    """AGGREGATING -> FAILED with the aggregator's reason; refused in other phases."""
    step = machine.aggregation_failed(collecting(phase=RoundPhase.AGGREGATING), 1, "blob missing")
    assert step.state is TrainingState.FAILED and "blob missing" in (step.failure_reason or "")
    with pytest.raises(IllegalTransition):
        machine.aggregation_failed(collecting(), 1, "x")


def test_test_report_for_another_round_is_refused() -> None:
    """A test report naming a round other than the one under test is illegal, and names that round."""
    with pytest.raises(IllegalTransition, match="test report for round 2, testing round 1"):
        machine.test_reported(collecting(phase=RoundPhase.TESTING), 2, 3, NOW)


def test_testing_deadline_on_the_last_round_completes_the_training() -> None:
    """TESTING past the deadline on the last round -> COMPLETED with TRAINING_FINISHED (state COMPLETED)."""
    last = collecting(round_=2, phase=RoundPhase.TESTING)
    step = machine.deadline_passed(last, 3, NOW + timedelta(seconds=61))
    assert step is not None
    assert (step.state, step.phase, step.round, step.deadline_at) == (TrainingState.COMPLETED, None, 2, None)
    assert step.round_finished == 2 and not step.round_started
    assert [n.type for n in step.notices] == [NotificationType.TRAINING_FINISHED]
    assert step.notices[0].body == {"round": 2, "global_model_uuid": str(MODEL), "state": "COMPLETED"}


def test_deadline_while_aggregating_changes_nothing() -> None:
    """AGGREGATING waits for the aggregator: a passed deadline there is no transition (None)."""
    aggregating = collecting(phase=RoundPhase.AGGREGATING)
    assert machine.deadline_passed(aggregating, 3, NOW + timedelta(seconds=61)) is None
    assert machine.deadline_passed(aggregating, 0, NOW + timedelta(seconds=61)) is None


@pytest.mark.parametrize(
    "state", [TrainingState.INITIAL, TrainingState.COMPLETED, TrainingState.FAILED, TrainingState.CANCELLED]
)
def test_fail_outside_ongoing_is_refused(state: TrainingState) -> None:
    """fail() applies only to an ONGOING training; anything else is an illegal transition naming it."""
    with pytest.raises(IllegalTransition, match=f"cannot fail in {state.value}"):
        machine.fail(view(state=state), "boom")


def test_cancel_from_initial_is_cancelled_and_tells_everyone() -> None:
    """INITIAL -> CANCELLED: no round to close, TRAINING_FINISHED says CANCELLED."""
    step = machine.cancel(view())
    assert (step.state, step.phase, step.round, step.deadline_at) == (TrainingState.CANCELLED, None, 0, None)
    assert step.round_finished is None and not step.round_started and not step.aggregate
    assert step.failure_reason is None
    assert [n.type for n in step.notices] == [NotificationType.TRAINING_FINISHED]
    assert step.notices[0].body == {"round": 0, "global_model_uuid": str(MODEL), "state": "CANCELLED"}


@pytest.mark.parametrize("phase", list(RoundPhase))
def test_cancel_from_ongoing_in_every_phase_closes_the_round(phase: RoundPhase) -> None:
    """ONGOING (COLLECTING, AGGREGATING or TESTING) -> CANCELLED: deadline cleared, round 2 closed."""
    current = uuid4()
    v = collecting(round_=2, phase=phase, current_model_id=current)
    step = machine.cancel(v)
    assert (step.state, step.phase, step.round, step.deadline_at) == (TrainingState.CANCELLED, None, 2, None)
    assert step.current_model_id == current
    assert step.round_finished == 2 and not step.round_started and not step.aggregate
    assert [n.type for n in step.notices] == [NotificationType.TRAINING_FINISHED]
    assert step.notices[0].body == {"round": 2, "global_model_uuid": str(current), "state": "CANCELLED"}


@pytest.mark.parametrize("state", [TrainingState.COMPLETED, TrainingState.FAILED, TrainingState.CANCELLED])
def test_cancel_of_a_finished_training_is_refused(state: TrainingState) -> None:
    """A COMPLETED, FAILED (or already CANCELLED) training cannot be cancelled; the error names its state."""
    with pytest.raises(IllegalTransition, match=f"cannot cancel in {state.value}"):
        machine.cancel(view(state=state, round=2))


def test_nothing_moves_a_cancelled_training() -> None:
    """After cancel, a late update, aggregated model, test report, deadline or failure is refused."""
    cancelled = view(state=TrainingState.CANCELLED, round=1)
    late = NOW + timedelta(seconds=61)
    with pytest.raises(IllegalTransition, match="CANCELLED"):
        machine.update_received(cancelled, 1, 3)
    with pytest.raises(IllegalTransition, match="CANCELLED"):
        machine.model_aggregated(cancelled, 1, uuid4(), late)
    with pytest.raises(IllegalTransition, match="CANCELLED"):
        machine.test_reported(cancelled, 1, 3, late)
    with pytest.raises(IllegalTransition, match="CANCELLED"):
        machine.deadline_passed(cancelled, 3, late)
    with pytest.raises(IllegalTransition, match="CANCELLED"):
        machine.aggregation_failed(cancelled, 1, "x")


@pytest.mark.parametrize(
    ("training", "round_", "phase", "left"),
    [
        (collecting(2), 2, RoundPhase.COLLECTING, False),
        (collecting(2, phase=RoundPhase.AGGREGATING), 2, RoundPhase.COLLECTING, True),
        (collecting(2, phase=RoundPhase.TESTING), 2, RoundPhase.COLLECTING, True),
        (collecting(2, phase=RoundPhase.TESTING), 2, RoundPhase.TESTING, False),
        (collecting(2), 2, RoundPhase.TESTING, False),
        (collecting(3), 2, RoundPhase.TESTING, True),
        (collecting(1, phase=RoundPhase.TESTING), 2, RoundPhase.COLLECTING, False),
        (view(), 1, RoundPhase.COLLECTING, False),
        (collecting(1, state=TrainingState.COMPLETED), 2, RoundPhase.TESTING, True),
        (collecting(1, state=TrainingState.CANCELLED), 1, RoundPhase.COLLECTING, True),
    ],
)
def test_has_left_only_for_later_phases_rounds_and_ends(
    training: TrainingView, round_: int, phase: RoundPhase, left: bool
) -> None:
    """A round's phase is left for good once a later phase or round is reached or the training ended."""
    assert machine.has_left(training, round_, phase) is left
