"""Vocabulary every service agrees on: roles, training states, round phases.

Aggregation methods and their parameters are in `shared.aggregation`.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """Who a principal is: an actor (operator) runs trainings; a client trains on its data."""

    ACTOR = "actor"
    CLIENT = "client"


class TrainingState(enum.StrEnum):
    """A training's life: INITIAL -> ONGOING -> COMPLETED, or FAILED / CANCELLED."""

    INITIAL = "INITIAL"
    ONGOING = "ONGOING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class RoundPhase(enum.StrEnum):
    """Where an ONGOING training's current round stands."""

    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    TESTING = "TESTING"
