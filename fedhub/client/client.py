"""`Client`: a federated-learning participant that trains and tests when the server says so.

It listens to `GET /v1/events`, downloads the global model, runs the user's `fit` / `evaluate` in a
worker thread and sends the results back. It checks the training's state whenever its event stream
(re)connects, so a client that joins late or restarts picks up where the training is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import inspect
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import aiohttp
import structlog

from fedhub.client.errors import ClientError
from fedhub.client.retry import RetryPolicy
from fedhub.client.stream import Connected, EventStream
from fedhub.client.transport import MSGPACK, Transport
from fedhub.client.types import EvaluateFn, EventHook, FitFn, Notification, RunResult, parse_notification
from shared.aggregation import excluded_by
from shared.codec import TensorRecord, decode_tensors, packb, tensor_map
from shared.errors import MalformedPayload
from shared.tensors import records_to_state_dict, state_dict_to_records
from shared.threads import off_loop

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(component="fedhub.client")

TRAINING_START = "TRAINING_START"
UPDATE_ROUND_START = "UPDATE_ROUND_START"
MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
TRAINING_FINISHED = "TRAINING_FINISHED"

_TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})

INLINE_BYTES = 256 * 1024
"""Models up to this size are decoded and encoded on the event loop: for them a thread hop costs
more than the work. Larger ones, and `fit` and `evaluate` always, run in a worker thread."""

T = TypeVar("T")
R = TypeVar("R")


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline for payloads up to `INLINE_BYTES`, else in a worker thread."""
    return await off_loop(size <= INLINE_BYTES, fn, *args)


async def _call(fn: Callable[..., R | Coroutine[Any, Any, R]], *args: Any) -> R:
    """A user callback: an `async def` one awaited here, a plain one run in a worker thread."""
    if inspect.iscoroutinefunction(fn):
        result: R = await fn(*args)
        return result
    return cast(R, await asyncio.to_thread(fn, *args))


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Client:
    """A participant: `run()` follows one training until it finishes and returns what it did.

    Parameters
    ----------
    base_url, token
        The server (e.g. ``http://localhost:8000``) and this client's bearer token.
    fit
        ``(weights, config) -> (new_weights, num_examples, metrics)``, run in a worker thread; an
        ``async def`` one is awaited on the event loop instead (no thread hop: for asynchronous
        work, or many simulated clients in one process).
    evaluate
        ``(weights, config) -> (num_examples, metrics)``, run as ``fit`` is; without it test
        rounds are skipped.
    training_id
        The training to follow; ``None`` follows the first training the client hears of.
    http
        An ``aiohttp.ClientSession`` to send requests with (left open); one is made otherwise.
    retry
        Backoff for HTTP retries and event-stream reconnects.
    name
        A label for logs and hooks.
    on_event
        Called with ``("uploaded" | "tested" | "finished", details)``; errors it raises are logged.

    ``config`` holds ``training_id``, ``round`` and ``global_model_id`` (strings but ``round``) and
    what the training tells its clients (its ``client_config``): ``update_kind``, ``exclude_vars``
    and, for FedProx, ``mu`` (the proximal weight ``fit`` should apply). ``fit`` always returns full
    weights: with ``update_kind="delta"`` the SDK uploads ``new - global`` (xor for bool tensors), and
    it leaves out the tensors ``exclude_vars`` matches (they keep the server's values).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        fit: FitFn,
        evaluate: EvaluateFn | None = None,
        training_id: UUID | str | None = None,
        http: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        on_event: EventHook | None = None,
        events_url: str | None = None,
    ) -> None:
        self.base_url = base_url
        # Where `/v1/events` lives: the API's address unless the notifier is served apart.
        self.events_url = (events_url or base_url).rstrip("/")
        self.name = name
        self.fit = fit
        self.evaluate = evaluate
        self.training_id = UUID(str(training_id)) if training_id is not None else None
        self.on_event = on_event
        self._token = token
        self._http = http
        self._retry = retry

    async def run(self) -> RunResult:
        """Follow the training until it finishes; return the rounds trained and tested."""
        transport = Transport(self.base_url, self._token, http=self._http, retry=self._retry)
        try:
            return await _Session(self, transport).run()
        finally:
            await transport.aclose()

    def run_sync(self) -> RunResult:
        """`run()` in a fresh event loop, for scripts without one."""
        return asyncio.run(self.run())


class _Session:
    """The state of one `run()`: the training followed, the rounds done, the last model downloaded."""

    def __init__(self, client: Client, transport: Transport) -> None:
        self.client = client
        self.transport = transport
        self.training_id = client.training_id
        self.log = log.bind(client=client.name)
        if self.training_id is not None:
            self.log = self.log.bind(training_id=str(self.training_id))
        self.me: UUID | None = None
        self.trained: list[int] = []
        self.tested: list[int] = []
        # Rounds handled one way or another (done, duplicate or closed), so none runs twice.
        self.updates_done: set[int] = set()
        self.tests_done: set[int] = set()
        # Rounds below these are over: a notification about them (a replay) is stale.
        self.open_update_round = 0
        self.open_test_round = 0
        self.cached: tuple[UUID, list[TensorRecord]] | None = None
        # What the training tells clients (update kind, excluded tensors, mu): from the round's
        # notification, or from the training's JSON when catching up.
        self.client_config: dict[str, Any] = {}

    def _params(self) -> dict[str, str]:
        return {"training_id": str(self.training_id)} if self.training_id is not None else {}

    async def run(self) -> RunResult:
        async with EventStream(
            self.transport, path=f"{self.client.events_url}/v1/events", params=self._params
        ) as stream:
            async for item in stream:
                if isinstance(item, Connected):
                    if self.training_id is not None:
                        result = await self.catch_up()
                        if result is not None:
                            return result
                    continue
                try:
                    notification = parse_notification(item)
                except ValueError as exc:
                    self.log.warning(
                        "client.event_ignored", sse_event=item.event, sse_id=item.id, reason=str(exc)
                    )
                    continue
                result = await self.handle(notification)
                if result is not None:
                    return result
        raise AssertionError("unreachable: the event stream ends only by raising")

    async def handle(self, notification: Notification) -> RunResult | None:
        """Act on one notification; a `RunResult` when the training is over."""
        if self.training_id is None:
            self.training_id = notification.training_id
            self.log = self.log.bind(training_id=str(self.training_id))
            self.log.info("client.training_followed")
        elif notification.training_id != self.training_id:
            return None
        kind = notification.notification_type
        self.log.debug("client.notified", notification_type=kind, seq=notification.seq)
        if kind == TRAINING_FINISHED:
            return await self.finish(notification)
        if kind not in (UPDATE_ROUND_START, MODEL_TEST_ROUND):
            return None
        round_, model_id = notification.round, notification.global_model_id
        self.learn(notification.body.get("client_config"))
        if round_ is None or model_id is None:
            self.log.warning("client.notification_incomplete", notification_type=kind, body=notification.body)
            return None
        self.take_inline_model(model_id, notification.body.get("global_model"))
        if kind == UPDATE_ROUND_START:
            await self.train_round(round_, model_id)
        else:
            self.open_update_round = max(self.open_update_round, round_ + 1)
            await self.test_round(round_, model_id)
        return None

    async def catch_up(self) -> RunResult | None:
        """Act on the training's current state (after each connect): notifications may have been missed."""
        training = await self.get_training()
        self.learn(training.get("client_config"))
        state, phase = training.get("state"), training.get("phase")
        if state in _TERMINAL_STATES:
            return self.finished(training)
        if state != "ONGOING":
            return None
        if training.get("current_model_id") is None:
            return None
        round_ = int(training["round"])
        model_id = UUID(str(training["current_model_id"]))
        if phase == "COLLECTING":
            if await self.me_in(training.get("uploaded")):
                self.updates_done.add(round_)
            await self.train_round(round_, model_id)
        elif phase == "AGGREGATING":
            self.open_update_round = max(self.open_update_round, round_ + 1)
        elif phase == "TESTING":
            self.open_update_round = max(self.open_update_round, round_ + 1)
            if self.client.evaluate is not None and await self.me_in(training.get("tested")):
                self.tests_done.add(round_)
            await self.test_round(round_, model_id)
        return None

    async def train_round(self, round_: int, model_id: UUID) -> None:
        """Download the global model, `fit` it, upload the update (once per round)."""
        log = self.log.bind(round=round_)
        if round_ in self.updates_done or round_ < self.open_update_round:
            log.info("client.round_skipped", reason="done or over")
            return
        self.open_update_round = round_
        self.updates_done.add(round_)
        weights = await self.weights(model_id)
        config = self.config(round_, model_id)
        new_weights, num_examples, metrics = await _call(self.client.fit, weights, config)
        num_examples, metrics = _checked(num_examples, metrics, "fit")
        size = _tensor_bytes(new_weights)
        outgoing = await _off_loop(size, self.outgoing, new_weights)
        body = await _off_loop(size, _encode_update, round_, num_examples, metrics, outgoing)
        try:
            response = await self.transport.request(
                "POST",
                f"/v1/trainings/{self.training_id}/updates",
                content=body,
                headers={"Content-Type": MSGPACK},
            )
        except ClientError as exc:
            if exc.error == "RoundClosed":
                log.warning("client.update_stale", detail=exc.detail)
                return
            raise
        answer = response.json()
        self.trained.append(round_)
        log.info("client.update_uploaded", num_examples=num_examples, duplicate=answer.get("duplicate"))
        self.emit(
            "uploaded",
            {
                "round": round_,
                "num_examples": num_examples,
                "metrics": metrics,
                "update_id": answer.get("update_id"),
                "duplicate": bool(answer.get("duplicate", False)),
            },
        )

    async def test_round(self, round_: int, model_id: UUID) -> None:
        """Download the model under test, `evaluate` it, send the metrics (once per round)."""
        log = self.log.bind(round=round_)
        evaluate = self.client.evaluate
        if evaluate is None:
            log.info("client.test_skipped", reason="no evaluate function")
            return
        if round_ in self.tests_done or round_ < self.open_test_round:
            log.info("client.test_skipped", reason="done or over")
            return
        self.open_test_round = round_
        self.tests_done.add(round_)
        weights = await self.weights(model_id)
        num_examples, metrics = await _call(evaluate, weights, self.config(round_, model_id))
        num_examples, metrics = _checked(num_examples, metrics, "evaluate")
        try:
            await self.transport.request(
                "POST",
                f"/v1/trainings/{self.training_id}/test-metrics",
                json={"round": round_, "num_examples": num_examples, "metrics": metrics},
            )
        except ClientError as exc:
            if exc.error == "RoundClosed":
                log.warning("client.test_stale", detail=exc.detail)
                return
            raise
        self.tested.append(round_)
        log.info("client.test_reported", num_examples=num_examples)
        self.emit("tested", {"round": round_, "num_examples": num_examples, "metrics": metrics})

    async def finish(self, notification: Notification) -> RunResult:
        """The training finished: read its final state (the notification's body if that fails)."""
        try:
            training = await self.get_training()
        except ClientError as exc:
            self.log.warning("client.final_state_unknown", error=exc.error, detail=exc.detail)
            model_id = notification.global_model_id
            training = {
                "state": str(notification.body.get("state", "COMPLETED")),
                "current_model_id": str(model_id) if model_id else None,
            }
        return self.finished(training)

    def finished(self, training: Mapping[str, Any]) -> RunResult:
        """The `RunResult` for a training that is over."""
        assert self.training_id is not None  # set before any state is read
        model = training.get("current_model_id")
        result = RunResult(
            training_id=self.training_id,
            state=str(training.get("state")),
            final_model_id=UUID(str(model)) if model else None,
            rounds_trained=tuple(self.trained),
            rounds_tested=tuple(self.tested),
        )
        self.log.info("client.finished", state=result.state, rounds_trained=len(self.trained))
        self.emit(
            "finished",
            {
                "state": result.state,
                "final_model_id": str(result.final_model_id) if result.final_model_id else None,
                "rounds_trained": list(result.rounds_trained),
                "rounds_tested": list(result.rounds_tested),
            },
        )
        return result

    async def get_training(self) -> dict[str, Any]:
        """The training's JSON."""
        response = await self.transport.request("GET", f"/v1/trainings/{self.training_id}")
        training: dict[str, Any] = response.json()
        return training

    async def me_in(self, ids: object) -> bool:
        """Whether this client's principal id is among `ids` (a JSON list of ids)."""
        if not isinstance(ids, list) or not ids:
            return False
        if self.me is None:
            response = await self.transport.request("GET", "/v1/me")
            self.me = UUID(str(response.json()["id"]))
        return str(self.me) in {str(UUID(str(i))) for i in ids}

    def take_inline_model(self, model_id: UUID, inline: object) -> None:
        """Keep a round notification's own copy of a small global model (`body.global_model`), so
        that `weights` needs no download; one that does not check out is ignored (downloaded instead)."""
        if inline is None or (self.cached is not None and self.cached[0] == model_id):
            return
        try:
            if not isinstance(inline, Mapping):
                raise TypeError("not an object")
            data = base64.b64decode(str(inline["base64"]), validate=True)
            if hashlib.sha256(data).hexdigest() != inline["sha256"]:
                raise ValueError("sha256 mismatch")
            records = decode_tensors(data)
        except (KeyError, TypeError, ValueError, binascii.Error, MalformedPayload) as exc:
            self.log.warning("client.inline_model_ignored", model_id=str(model_id), reason=str(exc))
            return
        self.cached = (model_id, records)
        self.log.debug("client.model_inline", model_id=str(model_id), size_bytes=len(data))

    async def weights(self, model_id: UUID) -> dict[str, torch.Tensor]:
        """Fresh tensors of a global model, downloaded once per model id (none when it came inline)."""
        if self.cached is None or self.cached[0] != model_id:
            response = await self.transport.request(
                "GET", f"/v1/models/{model_id}/weights", headers={"Accept": MSGPACK}
            )
            records = await _off_loop(len(response.content), decode_tensors, response.content)
            self.cached = (model_id, records)
            self.log.debug(
                "client.model_downloaded", model_id=str(model_id), size_bytes=len(response.content)
            )
        # Read-only buffers make to_torch copy, so fit may change its tensors without touching the cache.
        size = sum(r.data.nbytes for r in self.cached[1])
        return await _off_loop(size, records_to_state_dict, self.cached[1])

    def config(self, round_: int, model_id: UUID) -> dict[str, Any]:
        """What `fit` and `evaluate` get besides the weights."""
        return {
            "training_id": str(self.training_id),
            "round": round_,
            "global_model_id": str(model_id),
            **self.client_config,
        }

    def learn(self, client_config: object) -> None:
        """Keep the training's client config when a notification or the training's JSON carries one."""
        if isinstance(client_config, Mapping):
            self.client_config = {str(k): v for k, v in client_config.items()}

    def outgoing(self, new_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What to upload of `fit`'s weights: excluded tensors left out, deltas to the global model."""
        pattern = self.client_config.get("exclude_vars")
        kept = {
            name: tensor
            for name, tensor in new_weights.items()
            if not (isinstance(pattern, str) and excluded_by(pattern, name))
        }
        if self.client_config.get("update_kind") != "delta":
            return kept
        assert self.cached is not None  # fit ran on the downloaded model
        global_weights = records_to_state_dict(self.cached[1])
        return {name: _delta(tensor, global_weights.get(name)) for name, tensor in kept.items()}

    def emit(self, kind: str, details: dict[str, Any]) -> None:
        """Call the user's hook; its failures are logged, never allowed to stop the training."""
        hook = self.client.on_event
        if hook is None:
            return
        payload = {"client": self.client.name, "training_id": str(self.training_id), **details}
        try:
            hook(kind, payload)
        except Exception:
            self.log.exception("client.hook_failed", hook_event=kind)


def _checked(num_examples: object, metrics: object, what: str) -> tuple[int, dict[str, float]]:
    """Validate what a user callback returned, with a message naming the callback."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise TypeError(f"{what} must return a non-negative int num_examples, got {num_examples!r}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{what} must return metrics as a dict of str -> float, got {type(metrics).__name__}")
    return num_examples, {str(k): float(v) for k, v in metrics.items()}


def _delta(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """``new - old`` in the tensor's dtype (integers wrap, and the server adds back exactly; bool: xor).

    A tensor the global model lacks, or of another dtype or shape, goes as it is: the server refuses
    it by name.
    """
    import torch

    if old is None or old.dtype != new.dtype or old.shape != new.shape:
        return new
    if new.dtype == torch.bool:
        return torch.logical_xor(new, old)
    return torch.sub(new, old)


def _encode_update(
    round_: int, num_examples: int, metrics: dict[str, float], weights: Mapping[str, torch.Tensor]
) -> bytes:
    """The msgpack body of `POST /v1/trainings/{id}/updates`."""
    records = state_dict_to_records(weights)
    return packb(
        {"round": round_, "num_examples": num_examples, "metrics": metrics, "tensors": tensor_map(records)}
    )
