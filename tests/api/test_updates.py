"""Update uploads and test-metric reports: the happy path, every refusal, and idempotency."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from starlette.routing import Match

from services.api import service as api_service
from services.api.reports import ReportGroups
from services.api.routes.updates import DirectRoute
from shared.codec import decode_tensors, encode_tensors, packb, tensor_map
from shared.db import models as db
from shared.db.models import Principal as PrincipalRow
from shared.enums import Role, RoundPhase, TrainingState
from tests.api.conftest import World
from tests.api.helpers import (
    BF16_INF,
    BF16_NAN,
    MSGPACK,
    Announced,
    Fedhub,
    Principal,
    blob_files,
    json_body,
    json_tensors,
    model_tensors,
    msgpack_body,
    record,
)


def updates_url(world: World) -> str:
    """The update route of the world's training."""
    return f"/v1/trainings/{world.training_id}/updates"


async def test_update_is_stored_recorded_and_announced(world: World) -> None:
    """A valid update: 201, one row, its canonical bytes under update/<id>, announced once."""
    fedhub = world.fedhub
    tensors = model_tensors(scale=2.0)
    shuffled = [tensors[n] for n in ("steps", "g", "h", "b", "w")]
    resp = await fedhub.http.post(
        updates_url(world),
        content=msgpack_body(shuffled, round=1, num_examples=25, metrics={"loss": 0.5}),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 201, resp.text
    answer = resp.json()
    assert answer["round"] == 1
    assert answer["duplicate"] is False
    update_id = UUID(answer["update_id"])

    async with fedhub.runtime.uow() as uow:
        row = await uow.session.get(db.ClientUpdate, update_id)
    assert row is not None
    assert (row.round, row.num_examples, row.metrics) == (1, 25, {"loss": 0.5})
    assert str(row.client_id) == world.alice.id
    stored = (fedhub.blob_root / "update" / str(update_id)).read_bytes()
    # Canonical: the model's tensor order, whatever order the client sent.
    assert stored == encode_tensors(tensors.values())
    assert [r.name for r in decode_tensors(stored)] == list(tensors)

    assert await fedhub.announced_updates() == [
        Announced(UUID(world.training_id), 1, UUID(world.alice.id), 25, update_id)
    ]
    url = f"/v1/trainings/{world.training_id}"
    assert (await fedhub.http.get(url, headers=fedhub.admin.headers)).json()["uploaded"] == [world.alice.id]
    assert (await fedhub.http.get(url, headers=world.alice.headers)).json()["uploaded"] == [world.alice.id]
    # Another participant learns nothing of alice's upload.
    assert (await fedhub.http.get(url, headers=world.bob.headers)).json()["uploaded"] == []


async def test_json_base64_update_is_accepted(world: World) -> None:
    """The JSON+base64 form of the same tensors is accepted and stored in the same canonical bytes."""
    fedhub = world.fedhub
    resp = await fedhub.http.post(
        updates_url(world),
        content=json_body(model_tensors(), round=1, num_examples=3),
        headers={**world.bob.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 201, resp.text
    stored = (fedhub.blob_root / "update" / resp.json()["update_id"]).read_bytes()
    assert stored == encode_tensors(model_tensors().values())


def _replace(name: str, new: Any) -> Callable[[dict[str, Any]], None]:
    def change(tensors: dict[str, Any]) -> None:
        tensors[name] = new

    return change


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    def change(tensors: dict[str, Any]) -> None:
        del tensors[name]

    return change


@dataclass
class Bad:
    """One refused upload: how the request differs from a valid one and what the answer must say."""

    status: int
    error: str
    needles: tuple[str, ...]
    tensors: Callable[[dict[str, Any]], None] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = MSGPACK
    who: str = "alice"


BAD_UPLOADS = {
    "not-msgpack": Bad(400, "MalformedPayload", ("not valid msgpack",), raw=b"\xc1\xc1 garbage"),
    "not-a-map": Bad(400, "MalformedPayload", ("must be a msgpack map",), raw=b"\x93\x01\x02\x03"),
    "unknown-name": Bad(
        422,
        "TensorSpecMismatch",
        ("unknown tensor names: extra",),
        tensors=_replace("extra", record("extra", np.zeros(1, np.float32))),
    ),
    "missing-name": Bad(422, "TensorSpecMismatch", ("missing tensor names: b",), tensors=_drop("b")),
    "wrong-shape": Bad(
        422,
        "TensorSpecMismatch",
        ("'w'", "shape [3, 2]", "[2, 3]"),
        tensors=_replace("w", record("w", np.zeros((3, 2), np.float32))),
    ),
    "wrong-dtype": Bad(
        422,
        "TensorSpecMismatch",
        ("'b'", "float64", "float32"),
        tensors=_replace("b", record("b", np.zeros(3, np.float64))),
    ),
    "nan-float32": Bad(
        422,
        "NonFiniteValues",
        ("'w'",),
        tensors=_replace("w", record("w", np.array([[0, 1, np.nan], [0, 0, 0]], np.float32))),
    ),
    "inf-float32": Bad(
        422,
        "NonFiniteValues",
        ("'b'",),
        tensors=_replace("b", record("b", np.array([0, -np.inf, 0], np.float32))),
    ),
    "inf-float16": Bad(
        422,
        "NonFiniteValues",
        ("'h'",),
        tensors=_replace("h", record("h", np.array([1, 1, np.inf, 1], np.float16))),
    ),
    "nan-bfloat16": Bad(
        422,
        "NonFiniteValues",
        ("'g'",),
        tensors=_replace("g", record("g", np.array([0x3F80, BF16_NAN], np.uint16), dtype="bfloat16")),
    ),
    "inf-bfloat16": Bad(
        422,
        "NonFiniteValues",
        ("'g'",),
        tensors=_replace("g", record("g", np.array([BF16_INF, 0x3F80], np.uint16), dtype="bfloat16")),
    ),
    "unsupported-dtype": Bad(
        400,
        "UnsupportedDtype",
        ("complex64",),
        tensors=_replace("b", {"dtype": "complex64", "shape": [3], "data": b"\0" * 24}),
    ),
    "short-data": Bad(
        400,
        "MalformedPayload",
        ("'w'", "expected 24"),
        tensors=_replace("w", {"dtype": "float32", "shape": [2, 3], "data": b"\0" * 8}),
    ),
    "wrong-round": Bad(409, "RoundClosed", ("round 2", "open round 1", "COLLECTING"), fields={"round": 2}),
    "no-round": Bad(400, "MalformedPayload", ("'round'",), fields={"round": None}),
    "zero-examples": Bad(400, "MalformedPayload", ("'num_examples'",), fields={"num_examples": 0}),
    "bool-examples": Bad(400, "MalformedPayload", ("'num_examples'",), fields={"num_examples": True}),
    "text-metric": Bad(400, "MalformedPayload", ("'loss'",), fields={"metrics": {"loss": "low"}}),
    "bad-base64": Bad(
        400,
        "MalformedPayload",
        ("'w'", "base64"),
        tensors=_replace("w", {"dtype": "float32", "shape": [2, 3], "data": "not*base64!"}),
        content_type="application/json",
    ),
    "content-type": Bad(415, "UnsupportedMediaType", ("text/csv",), content_type="text/csv"),
    "no-content-type": Bad(415, "UnsupportedMediaType", ("(none)",), content_type=""),
    "not-a-participant": Bad(403, "NotAParticipant", ("is not a participant",), who="outsider"),
    "no-auth": Bad(401, "Unauthenticated", ("Authorization",), who="nobody"),
    "actor-token": Bad(403, "Forbidden", ("client role",), who="admin"),
}


def _bad_request(world: World, bad: Bad) -> tuple[bytes, dict[str, str]]:
    tensors: dict[str, Any] = dict(model_tensors())
    if bad.tensors is not None:
        bad.tensors(tensors)
    fields = {"round": 1, "num_examples": 10, "metrics": {"loss": 1.0}, **bad.fields}
    fields = {k: v for k, v in fields.items() if v is not None}
    if bad.raw is not None:
        content = bad.raw
    elif bad.content_type == "application/json":
        json_map = {n: (t if isinstance(t, dict) else json_tensors([t])[n]) for n, t in tensors.items()}
        content = json.dumps({"tensors": json_map, **fields}).encode()
    else:
        wire = {n: (t if isinstance(t, dict) else tensor_map([t])[n]) for n, t in tensors.items()}
        content = packb({"tensors": wire, **fields})
    principals = {
        "alice": world.alice,
        "outsider": world.outsider,
        "admin": world.fedhub.admin,
    }
    headers = dict(principals[bad.who].headers) if bad.who in principals else {}
    if bad.content_type:
        headers["Content-Type"] = bad.content_type
    return content, headers


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
async def test_bad_upload_is_refused_and_leaves_nothing(world: World, case: str) -> None:
    """Each bad upload gets its named 4xx and leaves no row, no new blob file and no announcement."""
    fedhub, bad = world.fedhub, BAD_UPLOADS[case]
    content, headers = _bad_request(world, bad)
    files_before = blob_files(fedhub.blob_root)

    resp = await fedhub.http.post(updates_url(world), content=content, headers=headers)

    assert resp.status_code == bad.status, resp.text
    body = resp.json()
    assert body["error"] == bad.error
    for needle in bad.needles:
        assert needle in body["detail"], (needle, body["detail"])
    assert await fedhub.count(db.ClientUpdate) == 0
    assert blob_files(fedhub.blob_root) == files_before
    assert await fedhub.announced_updates() == []


async def test_upload_to_an_unknown_training_is_404(world: World) -> None:
    """A training that does not exist is named in a 404."""
    ghost = "7b0c2f5e-1111-4222-8333-944455556666"
    resp = await world.fedhub.http.post(
        f"/v1/trainings/{ghost}/updates",
        content=msgpack_body(model_tensors(), round=1, num_examples=1),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 404
    assert ghost in resp.json()["detail"]


@pytest.mark.parametrize("report", ["updates", "test-metrics"])
def test_report_routes_are_matched_by_their_direct_twins_first(app: FastAPI, report: str) -> None:
    """Starlette's router serves a request with the first route that fully matches it: for a report,
    its `DirectRoute`, whose template is the documented route's (the metrics' label)."""
    scope = {"type": "http", "method": "POST", "path": f"/v1/trainings/{UUID(int=1)}/{report}"}
    served = next(route for route in app.router.routes if route.matches(scope)[0] is Match.FULL)
    assert isinstance(served, DirectRoute)
    assert "post" in app.openapi()["paths"][served.path], "the documented route keeps its entry"


@pytest.mark.parametrize("report", ["updates", "test-metrics"])
async def test_a_report_to_a_malformed_training_id_is_the_frameworks_422(world: World, report: str) -> None:
    """The report routes are served directly (`DirectRoute`), past FastAPI's parameter solving: a
    training id that is not a UUID still gets FastAPI's own 422 (as a route FastAPI serves gives it),
    before the caller is checked; a wrong method still gets 405."""
    framework = await world.fedhub.http.get("/v1/trainings/not-a-uuid", headers=world.alice.headers)
    for headers in (world.alice.headers, {}):
        resp = await world.fedhub.http.post(
            f"/v1/trainings/not-a-uuid/{report}",
            content=msgpack_body(model_tensors(), round=1, num_examples=1),
            headers={**headers, "Content-Type": MSGPACK},
        )
        assert resp.status_code == framework.status_code == 422
        assert resp.json() == framework.json()
        assert resp.json()["detail"].startswith("training_id: ")
    wrong_method = await world.fedhub.http.put(f"/v1/trainings/{world.training_id}/{report}")
    assert wrong_method.status_code == 405


@pytest.mark.parametrize(
    ("state", "phase"),
    [
        (TrainingState.ONGOING, RoundPhase.AGGREGATING),
        (TrainingState.ONGOING, RoundPhase.TESTING),
        (TrainingState.COMPLETED, None),
        (TrainingState.INITIAL, None),
    ],
)
async def test_upload_outside_collecting_is_round_closed(
    world: World, state: TrainingState, phase: RoundPhase | None
) -> None:
    """Only an ONGOING training in COLLECTING takes updates, even for its current round number."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, state=state, phase=phase)
    files_before = blob_files(fedhub.blob_root)
    resp = await fedhub.http.post(
        updates_url(world),
        content=msgpack_body(model_tensors(), round=1, num_examples=1),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 409
    assert resp.json()["error"] == "RoundClosed"
    assert (phase.value if phase else "none") in resp.json()["detail"]
    assert await fedhub.count(db.ClientUpdate) == 0
    assert blob_files(fedhub.blob_root) == files_before


@pytest.mark.parametrize("sent", ["whole", "chunked"])
async def test_round_closing_during_the_upload_leaves_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, sent: str
) -> None:
    """The round closes while the blob is written: 409, and the blob, row and event are all undone.

    Both ways in: a small body with its length is read whole (`BlobStore.put`), a chunked one
    streams (`BlobStore.put_stream`)."""
    fedhub = world.fedhub
    real_put, real_put_stream = fedhub.runtime.blobs.put, fedhub.runtime.blobs.put_stream
    writes: list[str] = []

    async def close_round(how: str) -> None:
        writes.append(how)
        # The orchestrator's deadline fires right now.
        await fedhub.set_round(world.training_id, phase=RoundPhase.AGGREGATING)

    async def put_then_close_round(key: str, data: bytes) -> bool:
        created = await real_put(key, data)
        await close_round("put")
        return created

    async def put_stream_then_close_round(key: str, data: AsyncIterator[bytes]) -> bool:
        created = await real_put_stream(key, data)
        await close_round("put_stream")
        return created

    monkeypatch.setattr(fedhub.runtime.blobs, "put", put_then_close_round)
    monkeypatch.setattr(fedhub.runtime.blobs, "put_stream", put_stream_then_close_round)
    files_before = blob_files(fedhub.blob_root)
    body = msgpack_body(model_tensors(), round=1, num_examples=1)

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    resp = await fedhub.http.post(
        updates_url(world),
        content=body if sent == "whole" else chunks(),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert writes == (["put"] if sent == "whole" else ["put_stream"])
    assert resp.status_code == 409
    assert resp.json()["error"] == "RoundClosed"
    assert "AGGREGATING" in resp.json()["detail"]
    assert await fedhub.count(db.ClientUpdate) == 0
    assert blob_files(fedhub.blob_root) == files_before
    assert await fedhub.announced_updates() == []


async def test_repeated_upload_answers_the_first_update(world: World) -> None:
    """The same client and round twice: 201 then 200 with the same id; one row, one blob, one event."""
    fedhub = world.fedhub
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    first = await fedhub.http.post(
        updates_url(world), content=msgpack_body(model_tensors(), round=1, num_examples=5), headers=headers
    )
    files_after_first = blob_files(fedhub.blob_root)
    # The repeat differs (other weights, other count) and is still only a repeat.
    second = await fedhub.http.post(
        updates_url(world), content=msgpack_body(model_tensors(3.0), round=1, num_examples=9), headers=headers
    )
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json() == {"update_id": first.json()["update_id"], "round": 1, "duplicate": True}
    assert await fedhub.count(db.ClientUpdate) == 1
    assert blob_files(fedhub.blob_root) == files_after_first
    assert len(await fedhub.announced_updates()) == 1


async def test_repeat_is_answered_even_after_the_round_closed(world: World) -> None:
    """A client retrying after the round moved on still learns its update was taken."""
    fedhub = world.fedhub
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    body = msgpack_body(model_tensors(), round=1, num_examples=5)
    first = await fedhub.http.post(updates_url(world), content=body, headers=headers)
    await fedhub.set_round(world.training_id, phase=RoundPhase.AGGREGATING)
    retry = await fedhub.http.post(updates_url(world), content=body, headers=headers)
    assert retry.status_code == 200
    assert retry.json()["update_id"] == first.json()["update_id"]


async def test_concurrent_duplicates_keep_one_update(world: World) -> None:
    """Two identical uploads at once: one 201, one 200 naming the same id; one row, one blob, one event."""
    fedhub = world.fedhub
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    body = msgpack_body(model_tensors(), round=1, num_examples=5)
    files_before = blob_files(fedhub.blob_root)
    answers = await asyncio.gather(
        *(fedhub.http.post(updates_url(world), content=body, headers=headers) for _ in range(4))
    )
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201]
    assert len({a.json()["update_id"] for a in answers}) == 1
    assert await fedhub.count(db.ClientUpdate) == 1
    assert len(blob_files(fedhub.blob_root) - files_before) == 1
    assert len(await fedhub.announced_updates()) == 1


async def test_a_repeat_in_an_open_round_is_caught_by_the_insert(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the round is open nothing is looked up before the upload: the insert that does nothing
    finds the repeat, answered with the first update, its blob deleted again."""
    fedhub = world.fedhub
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    body = msgpack_body(model_tensors(), round=1, num_examples=5)
    first = await fedhub.http.post(updates_url(world), content=body, headers=headers)
    files_after_first = blob_files(fedhub.blob_root)
    real_lookup, real_record = api_service._existing_update, ReportGroups._record
    calls: list[str] = []

    async def lookup_noting(*args: Any) -> UUID | None:
        calls.append("lookup")
        return await real_lookup(*args)

    async def record_noting(self: ReportGroups, group: Any) -> None:
        calls.append(f"insert of {len(group)}")
        await real_record(self, group)

    monkeypatch.setattr(api_service, "_existing_update", lookup_noting)
    monkeypatch.setattr(ReportGroups, "_record", record_noting)
    second = await fedhub.http.post(updates_url(world), content=body, headers=headers)
    assert calls == ["insert of 1", "lookup"]
    assert second.status_code == 200, second.text
    assert second.json() == {"update_id": first.json()["update_id"], "round": 1, "duplicate": True}
    assert await fedhub.count(db.ClientUpdate) == 1
    assert blob_files(fedhub.blob_root) == files_after_first
    assert len(await fedhub.announced_updates()) == 1


async def test_request_unit_of_work_undoes_on_rollback_only(world: World) -> None:
    """Undo callbacks run when the transaction rolls back or fails to commit, never after a commit."""
    runtime, undone = world.fedhub.runtime, []

    async def undo() -> None:
        undone.append(True)

    async def committed() -> None:
        async with runtime.uow() as uow:
            uow.on_rollback(undo)

    async def raising() -> None:
        async with runtime.uow() as uow:
            uow.on_rollback(undo)
            raise RuntimeError("refused")

    async def failing_commit() -> None:
        async with runtime.uow() as uow:
            uow.on_rollback(undo)
            # A second principal with the admin's token hash fails at commit (unique token_hash).
            admin = await uow.session.get(PrincipalRow, UUID(world.fedhub.admin.id))
            assert admin is not None
            uow.session.add(PrincipalRow(name="clash", role=Role.ACTOR, token_hash=admin.token_hash))

    await committed()
    assert undone == []
    with pytest.raises(RuntimeError):
        await raising()
    assert undone == [True]
    with pytest.raises(IntegrityError):
        await failing_commit()
    assert undone == [True, True]


# --- the training's remembered view -------------------------------------------------------------


class TrainingReads:
    """Counts the selects that read a training's row (not the conditional inserts' `INSERT ... SELECT`)."""

    def __init__(self, fedhub: Fedhub) -> None:
        self.count = 0
        event.listen(fedhub.runtime.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and re.search(r"\bFROM training\b", statement):
            self.count += 1


async def test_reports_of_an_open_round_read_their_training_once(world: World) -> None:
    """The first report reads the training; later reports of the open round use that view (the
    conditional insert checks the round again), updates read whole and test metrics alike."""
    fedhub = world.fedhub
    reads = TrainingReads(world.fedhub)
    for who in (world.alice, world.bob):
        resp = await fedhub.http.post(
            updates_url(world),
            content=msgpack_body(model_tensors(), round=1, num_examples=2),
            headers={**who.headers, "Content-Type": MSGPACK},
        )
        assert resp.status_code == 201, resp.text
    assert reads.count == 1
    await fedhub.set_round(world.training_id, phase=RoundPhase.TESTING)
    reads.count = 0  # set_round read the row too
    for who in (world.alice, world.bob):
        resp = await fedhub.http.post(
            metrics_url(world), json={"round": 1, "num_examples": 2, "metrics": {}}, headers=who.headers
        )
        assert resp.status_code == 201, resp.text
    assert reads.count == 1  # the view said COLLECTING: read afresh once, then trusted
    assert await fedhub.count(db.ClientUpdate) == 2
    assert await fedhub.count(db.TestMetric) == 2


async def test_uploads_arriving_together_share_the_fresh_read(fedhub: Fedhub) -> None:
    """The remembered view is of round 1 when round 2 opens: the round's uploads arriving together
    read the training afresh once or twice between them (each joins a read that started after it
    asked), not once each, and all are accepted."""
    clients = [await fedhub.principal(name=f"site-{i}") for i in range(8)]
    model = await fedhub.upload_model(model_tensors(), name="tiny")
    training = await fedhub.create_training(str(model["id"]), [c.id for c in clients])
    await fedhub.set_round(training["id"])
    url = f"/v1/trainings/{training['id']}/updates"

    async def upload(client: Principal, round_: int) -> int:
        resp = await fedhub.http.post(
            url,
            content=msgpack_body(model_tensors(), round=round_, num_examples=1),
            headers={**client.headers, "Content-Type": MSGPACK},
        )
        return resp.status_code

    assert await upload(clients[0], 1) == 201
    await fedhub.set_round(training["id"], round=2)
    reads = TrainingReads(fedhub)
    assert await asyncio.gather(*(upload(c, 2) for c in clients)) == [201] * 8
    assert 1 <= reads.count <= 2


async def test_an_outdated_view_neither_refuses_nor_admits(world: World) -> None:
    """The remembered view says round 1 collects. The orchestrator moves on behind it: an update for
    round 2 is accepted (the view is read afresh, not trusted to refuse), and a late one for round 1
    is refused by the conditional insert, leaving no blob, row or event."""
    fedhub = world.fedhub
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    first = await fedhub.http.post(
        updates_url(world), content=msgpack_body(model_tensors(), round=1, num_examples=2), headers=headers
    )
    assert first.status_code == 201, first.text

    await fedhub.set_round(world.training_id, round=2)
    second = await fedhub.http.post(
        updates_url(world), content=msgpack_body(model_tensors(), round=2, num_examples=2), headers=headers
    )
    assert second.status_code == 201, second.text
    assert second.json()["round"] == 2

    await fedhub.set_round(world.training_id, round=2, phase=RoundPhase.AGGREGATING)
    files = blob_files(fedhub.blob_root)
    late = await fedhub.http.post(
        updates_url(world),
        content=msgpack_body(model_tensors(), round=2, num_examples=2),
        headers={**world.bob.headers, "Content-Type": MSGPACK},
    )
    assert late.status_code == 409, late.text
    assert late.json()["error"] == "RoundClosed"
    assert "AGGREGATING" in late.json()["detail"]
    assert blob_files(fedhub.blob_root) == files
    assert await fedhub.count(db.ClientUpdate) == 2
    assert len(await fedhub.announced_updates()) == 2


# --- test metrics -------------------------------------------------------------------------------


def metrics_url(world: World) -> str:
    """The test-metrics route of the world's training."""
    return f"/v1/trainings/{world.training_id}/test-metrics"


async def test_test_metrics_outside_testing_are_round_closed(world: World) -> None:
    """While the round collects updates, test metrics are refused with 409 and leave nothing."""
    fedhub = world.fedhub
    resp = await fedhub.http.post(
        metrics_url(world),
        json={"round": 1, "num_examples": 4, "metrics": {"acc": 0.5}},
        headers=world.alice.headers,
    )
    assert resp.status_code == 409
    assert resp.json()["error"] == "RoundClosed"
    assert "COLLECTING" in resp.json()["detail"]
    assert await fedhub.count(db.TestMetric) == 0
    assert await fedhub.announced_test_reports() == []


async def test_test_metrics_are_recorded_once(world: World) -> None:
    """In TESTING: 201, a row, announced once; the repeat is 200 duplicate and adds nothing."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, phase=RoundPhase.TESTING)
    body = {"round": 1, "num_examples": 4, "metrics": {"acc": 0.75, "loss": 2}}
    first = await fedhub.http.post(metrics_url(world), json=body, headers=world.bob.headers)
    assert first.status_code == 201, first.text
    assert first.json() == {"round": 1, "duplicate": False}
    again = await fedhub.http.post(metrics_url(world), json=body, headers=world.bob.headers)
    assert again.status_code == 200
    assert again.json() == {"round": 1, "duplicate": True}

    assert await fedhub.count(db.TestMetric) == 1
    assert await fedhub.announced_test_reports() == [
        Announced(UUID(world.training_id), 1, UUID(world.bob.id), 4)
    ]
    url = f"/v1/trainings/{world.training_id}"
    assert (await fedhub.http.get(url, headers=world.bob.headers)).json()["tested"] == [world.bob.id]
    assert (await fedhub.http.get(url, headers=world.alice.headers)).json()["tested"] == []
    assert (await fedhub.http.get(url, headers=fedhub.admin.headers)).json()["tested"] == [world.bob.id]


@pytest.mark.parametrize(
    ("body", "status", "error", "needle"),
    [
        ({"round": 1, "num_examples": -1, "metrics": {}}, 400, "MalformedPayload", "'num_examples'"),
        ({"round": 1, "num_examples": 1, "metrics": {"acc": "high"}}, 400, "MalformedPayload", "'acc'"),
        ({"round": 1, "num_examples": 1, "metrics": [1, 2]}, 400, "MalformedPayload", "'metrics'"),
        ({"round": "1", "num_examples": 1}, 400, "MalformedPayload", "'round'"),
        ({"round": 2, "num_examples": 1}, 409, "RoundClosed", "round 2"),
    ],
    ids=["negative-examples", "text-metric", "metrics-list", "round-string", "wrong-round"],
)
async def test_bad_test_metrics_are_refused(
    world: World, body: dict[str, Any], status: int, error: str, needle: str
) -> None:
    """Each bad report gets its named error and leaves no row and no event."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, phase=RoundPhase.TESTING)
    resp = await fedhub.http.post(metrics_url(world), json=body, headers=world.alice.headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert needle in resp.json()["detail"]
    assert await fedhub.count(db.TestMetric) == 0
    assert await fedhub.announced_test_reports() == []


async def test_test_metrics_need_a_participant(world: World) -> None:
    """An outsider client is 403 NotAParticipant."""
    await world.fedhub.set_round(world.training_id, phase=RoundPhase.TESTING)
    resp = await world.fedhub.http.post(
        metrics_url(world), json={"round": 1, "num_examples": 1}, headers=world.outsider.headers
    )
    assert resp.status_code == 403
    assert resp.json()["error"] == "NotAParticipant"


@pytest.mark.parametrize(
    ("who", "content", "status", "error"),
    [
        ("nobody", b"[1, 2]", 401, "Unauthenticated"),
        ("nobody", b"not json", 401, "Unauthenticated"),
        ("alice", b"[1, 2]", 422, "ValidationError"),
        ("alice", b"not json", 422, "ValidationError"),
    ],
)
async def test_test_metrics_check_the_caller_before_the_body(
    world: World, who: str, content: bytes, status: int, error: str
) -> None:
    """Without a token the answer is 401 whatever the body; a client's body that is no JSON object is 422."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, phase=RoundPhase.TESTING)
    headers = {"Content-Type": "application/json", **(world.alice.headers if who == "alice" else {})}
    resp = await fedhub.http.post(metrics_url(world), content=content, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert await fedhub.count(db.TestMetric) == 0
