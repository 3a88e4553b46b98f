"""Cancelling a training mid-round in embedded mode, through real HTTP and server-sent events."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
import pytest
import torch

from fedhub.client import ActorClient, Client, Notification
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from fedhub.task import DemoWorkload, make_model
from shared.codec import packb, tensor_map
from shared.tensors import state_dict_to_records

pytestmark = pytest.mark.e2e

ROUND_TIMEOUT_S = 8.0
"""Long enough for two uploads on a busy machine; the test then waits past it."""


async def _until(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _finished_notice(base_url: str, token: str, training_id: UUID) -> Notification:
    """The first TRAINING_FINISHED on this principal's stream (replayed from the start)."""
    async with ActorClient(base_url, token) as reader:
        async for note in reader.events(training_id=training_id, last_event_id=0):
            if note.notification_type == "TRAINING_FINISHED":
                return note
    raise AssertionError("the event stream ended")


async def test_cancel_mid_round_ends_every_client_run_with_cancelled(tmp_path: Any) -> None:
    """Round 1 with two of three updates in, the third client still fitting: the owner cancels.

    Every client's run ends with CANCELLED (the slow one's upload refused), TRAINING_FINISHED with
    state CANCELLED reaches the owner's and every client's stream, a late upload is a 409 naming the
    state, and the training stays CANCELLED past the round's deadline.
    """
    workload = DemoWorkload.create(3, seed=2)
    settings = EmbeddedSettings(data_dir=tmp_path, log_level="WARNING", deadline_tick_s=0.2)
    async with EmbeddedServer(settings) as server, ActorClient(server.base_url, server.admin_token) as actor:
        principals = [await actor.create_principal(f"site-{i}") for i in range(3)]
        initial = make_model(1).state_dict()
        model = await actor.upload_model(initial, name="mlp")
        training = await actor.create_training(
            model.id, [p.id for p in principals], rounds=3, round_timeout_s=ROUND_TIMEOUT_S
        )
        training_id = UUID(str(training["id"]))

        entered, release = threading.Event(), threading.Event()
        slow_fit = workload.fit_fn(2, epochs=1, lr=0.1)

        def gated_fit(
            weights: dict[str, torch.Tensor], config: dict[str, Any]
        ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
            entered.set()
            release.wait(timeout=60)
            return slow_fit(weights, config)

        clients = [
            Client(
                server.base_url,
                p.token,
                fit=gated_fit if i == 2 else workload.fit_fn(i, epochs=1, lr=0.1),
                evaluate=workload.evaluate_fn(i),
                training_id=training_id,
            )
            for i, p in enumerate(principals)
        ]
        runs = [asyncio.create_task(c.run()) for c in clients]
        try:
            await actor.start_training(training_id)

            async def mid_round() -> bool:
                t = await actor.get_training(training_id)
                return entered.is_set() and t["phase"] == "COLLECTING" and len(t["uploaded"]) == 2

            await _until(mid_round, "two uploads of round 1 and the third client fitting")
            deadline_at = datetime.fromisoformat(str((await actor.get_training(training_id))["deadline_at"]))

            accepted = await actor.cancel_training(training_id)
            assert accepted["id"] == str(training_id)
            assert accepted["state"] in ("ONGOING", "CANCELLED")

            async def cancelled() -> bool:
                return (await actor.get_training(training_id))["state"] == "CANCELLED"

            await _until(cancelled, "the orchestrator to cancel the training")
            again = await actor.cancel_training(training_id)  # idempotent
            assert again["state"] == "CANCELLED"
        finally:
            release.set()
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=60)

        assert [r.state for r in results] == ["CANCELLED"] * 3
        assert [r.rounds_trained for r in results] == [(1,), (1,), ()]
        assert all(r.rounds_tested == () for r in results)
        assert all(r.final_model_id == model.id for r in results)

        for token in (server.admin_token, *(p.token for p in principals)):
            note = await asyncio.wait_for(_finished_notice(server.base_url, token, training_id), timeout=10)
            assert note.body == {"round": 1, "global_model_uuid": str(model.id), "state": "CANCELLED"}

        late = packb({"tensors": tensor_map(state_dict_to_records(initial)), "round": 1, "num_examples": 5})
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            resp = await http.post(
                f"/v1/trainings/{training_id}/updates",
                content=late,
                headers={
                    "Authorization": f"Bearer {principals[2].token}",
                    "Content-Type": "application/msgpack",
                },
            )
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"] == "RoundClosed"
        assert "CANCELLED" in resp.json()["detail"]

        # Past the round's deadline (2 of the 3 updates needed: it would fail), nothing moves it.
        wait = (deadline_at - datetime.now(deadline_at.tzinfo)).total_seconds() + 0.5
        await asyncio.sleep(max(wait, 0.5))
        final = await actor.get_training(training_id)
        assert (final["state"], final["phase"], final["round"]) == ("CANCELLED", None, 1)
        assert final["deadline_at"] is None and final["current_model_id"] == str(model.id)
        assert len(final["uploaded"]) == 2
        (round1,) = await actor.get_rounds(training_id)
        assert round1["round"] == 1 and round1["finished_at"] is not None and round1["model_id"] is None
