"""Splitting a round across aggregators (pure): which parts a round becomes, if any.

A round with more updates than `batch_size` is split when its method allows it:

- a `LinearMethod` (its result depends on the updates only through a weighted mean): the updates,
  in the job's order, in batches of `batch_size`; each batch gives a `Partial`, and the combine job
  merges them in batch order and finishes the method, as if one job had added every update.
- a `shardable` (coordinate-wise) method: the tensors the round aggregates, in the base's order,
  cut into `shards` contiguous groups of about equal size (unset: as many as there would be
  batches); each part computes its group's tensors over every update, and the combine job puts
  the groups together.
- any other (global) method: one job, never split.

Every part validates whole updates (names, dtypes, shapes, finiteness, norm), so every shard of a
round rejects the same updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from shared.aggregation import AggregationSpec
from shared.events import AggregatePart, AggregateRound

if TYPE_CHECKING:
    from services.aggregator.methods import Method

Kind = Literal["batches", "shards"]


@dataclass(frozen=True, slots=True)
class Split:
    """A round's parts and how they were cut."""

    kind: Kind
    parts: tuple[AggregatePart, ...]


def plan_split(
    job: AggregateRound,
    method_cls: type[Method],
    spec: AggregationSpec,
    base_spec: Mapping[str, Sequence[int]] | None,
    *,
    batch_size: int | None,
    shards: int | None = None,
) -> Split | None:
    """The parts `job` becomes under these settings, or None for one job (see the module doc).

    `base_spec` maps the base model's tensor names, in order, to their shapes (None: unknown, so a
    coordinate-wise round is not split).
    """
    n = len(job.updates)
    if batch_size is None or n <= batch_size:
        return None
    # Here, not at the top: the methods import torch, which an aggregator never splitting never loads.
    from services.aggregator.methods import LinearMethod

    if issubclass(method_cls, LinearMethod):
        batches = [job.updates[i : i + batch_size] for i in range(0, n, batch_size)]
        return Split(
            "batches",
            tuple(
                AggregatePart(round_job=replace(job, updates=batch), part=i, parts=len(batches))
                for i, batch in enumerate(batches)
            ),
        )
    if method_cls.shardable and base_spec is not None:
        sizes = {name: math.prod(shape) for name, shape in base_spec.items() if not spec.excluded(name)}
        count = min(shards if shards is not None else math.ceil(n / batch_size), len(sizes))
        if count <= 1:
            return None
        groups = shard_names(sizes, count)
        return Split(
            "shards",
            tuple(
                AggregatePart(round_job=job, part=i, parts=len(groups), tensors=tuple(group))
                for i, group in enumerate(groups)
            ),
        )
    return None


def shard_names(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """Cut the names (in order) into `count` non-empty contiguous groups of about equal total size."""
    if not 1 <= count <= len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} tensors into {count} shards")
    items = list(sizes.items())
    total = sum(sizes.values())
    groups: list[list[str]] = []
    current: list[str] = []
    filled = 0
    for i, (name, size) in enumerate(items):
        current.append(name)
        filled += size
        groups_left = count - len(groups) - 1
        names_left = len(items) - i - 1
        if groups_left > 0 and (filled * count >= total * (len(groups) + 1) or names_left == groups_left):
            groups.append(current)
            current = []
    groups.append(current)
    return groups
