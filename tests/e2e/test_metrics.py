"""The services' own timing metrics count what a real embedded training did, phase by phase.

Counts only: how long things took is the benchmark's business (bench/e2e.py --profile).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import torch

from fedhub.client import ActorClient, Client
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from shared.metrics import Samples, parse_exposition, total

pytestmark = pytest.mark.e2e

CLIENTS = 3
ROUNDS = 2


def _echo(weights: dict[str, torch.Tensor], config: dict[str, object]):
    return weights, 1, {"loss": 0.5}


def _evaluate(weights: dict[str, torch.Tensor], config: dict[str, object]):
    return 1, {"accuracy": 1.0}


def _count(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, f"{name}_count", **labels) - total(before, f"{name}_count", **labels)


async def test_a_training_shows_in_every_phase_metric(tmp_path: Path) -> None:
    """3 clients, 2 rounds with tests: requests by route, triggers, fan-out per stream, aggregator stages."""
    settings = EmbeddedSettings(data_dir=tmp_path, log_level="WARNING")
    async with EmbeddedServer(settings) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        actor = ActorClient(server.base_url, server.admin_token)
        principals = [await actor.create_principal(f"site-{i}") for i in range(CLIENTS)]
        model = await actor.upload_model({"w": torch.zeros(4, 4)}, name="m")
        training = await actor.create_training(model.id, [p.id for p in principals], rounds=ROUNDS)
        training_id = UUID(str(training["id"]))
        clients = [
            Client(server.base_url, p.token, fit=_echo, evaluate=_evaluate, training_id=training_id)
            for p in principals
        ]
        streams_before = parse_exposition((await http.get("/metrics")).text)
        runs = [asyncio.create_task(c.run()) for c in clients]
        before = parse_exposition((await http.get("/metrics")).text)
        await actor.start_training(training_id)
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
        await actor.download_model(model.id)  # one download for sure (the clients' models came inline)
        after = parse_exposition((await http.get("/metrics")).text)
        await actor.aclose()
    assert all(r.state == "COMPLETED" for r in results)

    def requests(method: str, route: str) -> float:
        return _count(after, before, "fedhub_http_request_duration_seconds", method=method, route=route)

    assert requests("POST", "/v1/trainings/{training_id}/updates") == CLIENTS * ROUNDS
    assert requests("POST", "/v1/trainings/{training_id}/test-metrics") == CLIENTS * ROUNDS
    # The 4x4 model travels in each round's notification: a client downloads only when it catches up
    # with a training already started (at most once), plus the actor's one download above.
    assert 1 <= requests("GET", "/v1/models/{model_id}/weights") <= CLIENTS + 1
    assert requests("GET", "/v1/events") == 0, "event streams are not requests with a duration"
    # The embedded server serves each client's stream off the socket (services/notifier/direct.py).
    for kind, opened in (("socket", CLIENTS), ("asgi", 0)):
        name = "fedhub_event_streams_opened_total"
        assert total(after, name, served_by=kind) - total(streams_before, name, served_by=kind) == opened
    # Its API gates each report at the socket (services/api/connections.py).
    gated = "fedhub_api_socket_gate_requests_total"
    assert total(after, gated) - total(before, gated) >= 2 * CLIENTS * ROUNDS

    def triggers(on: str, emits: str) -> float:
        return _count(after, before, "fedhub_orchestrator_trigger_seconds", on=on, emits=emits)

    assert triggers("UpdatesReceived", "aggregation") == ROUNDS
    assert triggers("ModelAggregated", "MODEL_TEST_ROUND") == ROUNDS
    assert triggers("TestReportsReceived", "UPDATE_ROUND_START") == ROUNDS - 1
    assert triggers("TestReportsReceived", "TRAINING_FINISHED") == 1
    assert triggers("StartTraining", "TRAINING_START+UPDATE_ROUND_START") == 1

    # Per round: UPDATE_ROUND_START and MODEL_TEST_ROUND; then TRAINING_START and TRAINING_FINISHED.
    notifications = 2 * ROUNDS + 2
    assert _count(after, before, "fedhub_notification_stored_seconds") == notifications
    for name in ("fedhub_notification_fanout_seconds", "fedhub_notification_delivered_seconds"):
        for kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND"):
            # One frame per client stream (the actor watches no stream here).
            assert _count(after, before, name, notification_type=kind) == CLIENTS * ROUNDS, (name, kind)

    for stage in ("read", "decode", "validate", "aggregate", "store", "commit"):
        assert _count(after, before, "fedhub_aggregator_stage_seconds", stage=stage) == ROUNDS, stage
    # The updates are announced a group of reports at a time: one message per recording transaction
    # (one training here), the groups' rows adding up to every update.
    handled = _count(
        after, before, "fedhub_message_handle_seconds", consumer="orchestrator", type="UpdatesReceived"
    )
    groups = _count(after, before, "fedhub_api_report_group_rows", report="client_update")
    rows = total(after, "fedhub_api_report_group_rows_sum", report="client_update") - total(
        before, "fedhub_api_report_group_rows_sum", report="client_update"
    )
    assert ROUNDS <= handled == groups <= CLIENTS * ROUNDS
    assert rows == CLIENTS * ROUNDS
    delivered = _count(
        after, before, "fedhub_message_delivery_seconds", consumer="aggregator", type="AggregateRound"
    )
    assert delivered == ROUNDS


async def test_embedded_server_keeps_idle_connections_open_longer_than_a_round(tmp_path: Path) -> None:
    """The embedded uvicorn keeps idle client connections for `idle_connection_s`, not uvicorn's 5 s."""
    settings = EmbeddedSettings(data_dir=tmp_path, log_level="WARNING", idle_connection_s=120)
    async with EmbeddedServer(settings) as server:
        assert server._server is not None
        assert server._server.config.timeout_keep_alive == 120
