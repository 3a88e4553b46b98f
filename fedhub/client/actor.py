"""`ActorClient`: what an operator (and the demo, and tests) does over HTTP: principals, models, trainings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

import aiohttp
import structlog

from fedhub.client.retry import RetryPolicy
from fedhub.client.stream import Connected, EventStream
from fedhub.client.transport import MSGPACK, Transport
from fedhub.client.types import ModelInfo, Notification, Principal, parse_notification
from shared.codec import decode_tensors, packb, tensor_map
from shared.tensors import records_to_state_dict, state_dict_to_records

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(component="fedhub.client")


class ActorClient:
    """Async helpers for an actor's token: create principals, upload models, run and watch trainings."""

    def __init__(
        self,
        base_url: str,
        admin_or_actor_token: str,
        http: aiohttp.ClientSession | None = None,
        *,
        retry: RetryPolicy | None = None,
        events_url: str | None = None,
    ) -> None:
        self.base_url = base_url
        # Where `/v1/events` lives: the API's address unless the notifier is served apart.
        self.events_url = (events_url or base_url).rstrip("/")
        self._transport = Transport(base_url, admin_or_actor_token, http=http, retry=retry)

    async def __aenter__(self) -> ActorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def me(self) -> dict[str, Any]:
        """`GET /v1/me`: the caller's id, name and role."""
        return await self._json("GET", "/v1/me")

    async def create_principal(self, name: str, role: str = "client") -> Principal:
        """Create a client or actor principal; the answer holds its token (shown only now)."""
        raw = await self._json("POST", "/v1/principals", json={"name": name, "role": role}, idempotent=False)
        return Principal.from_json(raw)

    async def upload_model(self, state_dict: Mapping[str, torch.Tensor], name: str = "") -> ModelInfo:
        """Store a model's weights (msgpack) and return its metadata."""
        body = await asyncio.to_thread(_encode_model, state_dict, name)
        # Retried like a read: the worst a repeat can do is leave a second, unused model record.
        raw = await self._json("POST", "/v1/models", content=body, headers={"Content-Type": MSGPACK})
        return ModelInfo.from_json(raw)

    async def get_model(self, model_id: UUID | str) -> ModelInfo:
        """A stored model's metadata."""
        return ModelInfo.from_json(await self._json("GET", f"/v1/models/{model_id}"))

    async def download_model(self, model_id: UUID | str) -> dict[str, torch.Tensor]:
        """A stored model's weights as a state dict."""
        response = await self._transport.request(
            "GET", f"/v1/models/{model_id}/weights", headers={"Accept": MSGPACK}
        )
        return await asyncio.to_thread(_decode_model, response.content)

    async def get_members(self, model_id: UUID | str) -> list[dict[str, Any]]:
        """An ensemble model's members (`index`, `digest`, `size_bytes`, `update_id`, `client_id`)."""
        response = await self._transport.request("GET", f"/v1/models/{model_id}/members")
        members: list[dict[str, Any]] = response.json()
        return members

    async def download_member(self, model_id: UUID | str, index: int) -> dict[str, torch.Tensor]:
        """One ensemble member's weights as a state dict."""
        response = await self._transport.request(
            "GET", f"/v1/models/{model_id}/members/{index}", headers={"Accept": MSGPACK}
        )
        return await asyncio.to_thread(_decode_model, response.content)

    async def create_training(
        self,
        model_id: UUID | str,
        clients: Sequence[UUID | str],
        rounds: int,
        aggregation: str = "fedavg",
        min_clients: int | None = None,
        round_timeout_s: float | None = None,
        skip_model_tests: bool = False,
        model_test_after_each_round: bool = True,
        delete_local_models_after_aggregation: bool = True,
        *,
        aggregation_params: Mapping[str, Any] | None = None,
        update_kind: str | None = None,
        exclude_vars: str | None = None,
        max_update_norm: float | None = None,
    ) -> dict[str, Any]:
        """Create a training (state INITIAL) over `clients`, starting from model `model_id`.

        `aggregation` names the method and `aggregation_params` its parameters (docs/aggregation.md);
        `update_kind` ("weights" or "delta"), `exclude_vars` (a regex of tensors clients leave out)
        and `max_update_norm` (updates further from the global model are rejected) are sent only
        when given.
        """
        body: dict[str, Any] = {
            "model_id": str(model_id),
            "clients": [str(c) for c in clients],
            "aggregation": aggregation,
            "rounds": rounds,
            "skip_model_tests": skip_model_tests,
            "model_test_after_each_round": model_test_after_each_round,
            "delete_local_models_after_aggregation": delete_local_models_after_aggregation,
        }
        if min_clients is not None:
            body["min_clients"] = min_clients
        if round_timeout_s is not None:
            body["round_timeout_s"] = round_timeout_s
        optional = {
            "aggregation_params": dict(aggregation_params) if aggregation_params is not None else None,
            "update_kind": update_kind,
            "exclude_vars": exclude_vars,
            "max_update_norm": max_update_norm,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        training = await self._json("POST", "/v1/trainings", json=body, idempotent=False)
        log.info("actor.training_created", training_id=training.get("id"), rounds=rounds)
        return training

    async def start_training(self, training_id: UUID | str) -> dict[str, Any]:
        """Ask the server to start a training; the orchestrator moves it to ONGOING shortly after."""
        # Not retried on 5xx: a second start of a started training is a 409.
        return await self._json("POST", f"/v1/trainings/{training_id}/start", idempotent=False)

    async def cancel_training(self, training_id: UUID | str) -> dict[str, Any]:
        """Ask the server to cancel an INITIAL or ONGOING training ("abort job").

        The orchestrator moves it to CANCELLED shortly after and sends TRAINING_FINISHED with
        `"state": "CANCELLED"` to its participants and owner. Safe to repeat (retried like a read):
        a cancelled training is answered as it is. A COMPLETED or FAILED one raises `ClientError`
        (409 IllegalTransition).
        """
        return await self._json("POST", f"/v1/trainings/{training_id}/cancel")

    async def get_training(self, training_id: UUID | str) -> dict[str, Any]:
        """The training's JSON (state, phase, round, participants, who uploaded / tested)."""
        return await self._json("GET", f"/v1/trainings/{training_id}")

    async def get_rounds(self, training_id: UUID | str) -> list[dict[str, Any]]:
        """Per-round records: times, model, update counts and weighted train / test metrics."""
        response = await self._transport.request("GET", f"/v1/trainings/{training_id}/rounds")
        rounds: list[dict[str, Any]] = response.json()
        return rounds

    async def events(
        self, training_id: UUID | str | None = None, last_event_id: str | int | None = None
    ) -> AsyncIterator[Notification]:
        """Notifications as they come (reconnecting as needed); wrap in `contextlib.aclosing`."""
        params = {"training_id": str(training_id)} if training_id is not None else {}
        last = str(last_event_id) if last_event_id is not None else None
        async with EventStream(
            self._transport, path=f"{self.events_url}/v1/events", params=lambda: params, last_event_id=last
        ) as stream:
            async for item in stream:
                if isinstance(item, Connected):
                    continue
                try:
                    yield parse_notification(item)
                except ValueError as exc:
                    log.warning("actor.event_ignored", sse_event=item.event, reason=str(exc))

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        await self._transport.aclose()

    async def _json(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        response = await self._transport.request(
            method, path, json=json, content=content, headers=headers, idempotent=idempotent
        )
        answer: dict[str, Any] = response.json()
        return answer


def _encode_model(state_dict: Mapping[str, torch.Tensor], name: str) -> bytes:
    body: dict[str, Any] = {"tensors": tensor_map(state_dict_to_records(state_dict))}
    if name:
        body["name"] = name
    return packb(body)


def _decode_model(data: bytes) -> dict[str, torch.Tensor]:
    return records_to_state_dict(decode_tensors(data))
