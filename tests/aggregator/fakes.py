"""Fakes that subclass the real ports: a blob store that holds the aggregator mid-job, a stand-in ensemble."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from services.aggregator.methods import Aggregate, Method, RoundContext
from shared.aggregation import AggregationMethod, EnsembleParams, MethodParams
from shared.blobs import LocalBlobStore


class GatedBlobStore(LocalBlobStore):
    """A local blob store whose reads of `gated` keys wait until `release` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gated: set[str] = set()
        self.entered = asyncio.Event()
        self.entries = 0
        self.release = asyncio.Event()

    async def get(self, key: str) -> bytes:
        """Read, first waiting at the gate for gated keys."""
        await self._gate([key])
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read, first waiting at the gate when any key is gated."""
        await self._gate(keys)
        return await super().get_many(keys)

    async def _gate(self, keys: Sequence[str]) -> None:
        if self.gated.intersection(keys):
            self.entries += 1
            self.entered.set()
            await self.release.wait()


class KeepAll(Method):
    """A stand-in ensemble: keeps every update as a member; the model is the first member."""

    name: ClassVar[AggregationMethod] = AggregationMethod.ENSEMBLE
    params_type: ClassVar[type[MethodParams]] = EnsembleParams
    holds_updates: ClassVar[bool] = True

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self.members: list[dict[str, torch.Tensor]] = []

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Keep a copy."""
        self.members.append({k: v.clone() for k, v in update.items()})

    def result(self) -> Aggregate:
        """The first member as the model, all of them as members."""
        record = {"members": len(self.members)}
        return Aggregate(model=dict(self.members[0]), members=self.members, record=record)
