"""Streamed msgpack updates: checked and stored chunk by chunk, in canonical bytes, over both blob
stores; refusals found mid-stream leave nothing; fields sent first are answered before any tensor."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from services.api.main import create_app
from services.api.uploads import canonical_update
from shared.blobs import BlobStore, LocalBlobStore, PostgresBlobStore, TieredBlobStore, update_key
from shared.codec import (
    StreamedField,
    StreamedTensor,
    TensorDocumentReader,
    TensorRecord,
    encode_tensors,
    packb,
    tensor_map,
)
from shared.db import models as db
from shared.enums import RoundPhase
from shared.errors import NonFiniteValues
from shared.runtime import Runtime
from shared.settings import CommonSettings
from tests.api.conftest import api_settings
from tests.api.helpers import MSGPACK, Fedhub, Principal, RecordingBus, blob_files, record

MiB = 1024 * 1024


@pytest.fixture(params=["local", "rows", "tiered"])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    """The embedded runtime with each blob store: files, chunk rows (the PostgreSQL store on SQLite),
    or both (the embedded default: rows up to 64 KiB, files above)."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        blob_backend="postgres" if request.param == "rows" else "local",
        blob_row_max_bytes={"local": 0, "rows": 0, "tiered": 64 * 1024}[request.param],
    )
    rt = await Runtime.open(settings, bus=RecordingBus(), create_tables=True)
    try:
        yield rt
    finally:
        await rt.close()


def big_model() -> dict[str, TensorRecord]:
    """Three tensors, one of 4 MiB (several stream chunks), in model order."""
    rng = np.random.default_rng(7)
    return {
        "a": record("a", rng.standard_normal(MiB).astype(np.float32)),
        "b": record("b", rng.standard_normal(3000).astype(np.float16)),
        "c": record("c", np.arange(10, dtype=np.int64)),
    }


async def stored_keys(runtime: Runtime) -> set[str]:
    """Everything the blob store holds: files (temporary ones included) and blob and chunk rows."""
    found: set[str] = set()
    if isinstance(runtime.blobs, PostgresBlobStore | TieredBlobStore):
        async with runtime.engine.connect() as conn:
            keys = {row[0] for row in await conn.execute(text("SELECT key FROM blob"))}
            chunks = await conn.scalar(text("SELECT count(*) FROM blob_chunk"))
        found |= keys | {f"chunk-rows:{chunks}"}
    if not isinstance(runtime.blobs, PostgresBlobStore):
        found |= blob_files(runtime.settings.blob_path)
    return found


class Upload:
    """A request body sent in 64 KiB pieces from a generator, remembering how much was read."""

    def __init__(self, body: bytes, piece: int = 64 * 1024) -> None:
        self.body, self.piece, self.sent = body, piece, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.piece):
            self.sent = start + self.piece
            yield self.body[start : start + self.piece]


async def setup(fedhub: Fedhub) -> tuple[str, Principal]:
    """A training over `big_model()` collecting round 1, and its one client."""
    client = await fedhub.principal(name="site")
    model = await fedhub.upload_model(big_model())
    training = await fedhub.create_training(str(model["id"]), [client.id])
    await fedhub.set_round(training["id"])
    return f"/v1/trainings/{training['id']}/updates", client


async def post(fedhub: Fedhub, url: str, client: Principal, upload: Upload) -> httpx.Response:
    """POST a streamed msgpack body (chunked: no Content-Length)."""
    return await fedhub.http.post(
        url, content=upload.__aiter__(), headers={**client.headers, "Content-Type": MSGPACK}
    )


async def test_streamed_update_is_stored_in_canonical_bytes(fedhub: Fedhub) -> None:
    """Tensors out of model order, fields after them: stored bytes equal `encode_tensors` in model order."""
    url, client = await setup(fedhub)
    tensors = big_model()
    body = packb(
        {"tensors": tensor_map([tensors["c"], tensors["a"], tensors["b"]]), "round": 1, "num_examples": 4}
    )
    resp = await post(fedhub, url, client, Upload(body))
    assert resp.status_code == 201, resp.text
    update_id = UUID(resp.json()["update_id"])
    stored = await fedhub.runtime.blobs.get(update_key(update_id))
    assert stored == encode_tensors(tensors.values())
    async with fedhub.runtime.uow() as uow:
        row = await uow.session.get(db.ClientUpdate, update_id)
    assert row is not None
    assert row.digest == hashlib.sha256(stored).hexdigest()
    assert row.num_examples == 4
    assert len(await fedhub.announced_updates()) == 1


async def test_nan_in_a_late_chunk_leaves_nothing(fedhub: Fedhub) -> None:
    """A NaN in the last MiB of a 4 MiB tensor: 422, and no blob, temp file, chunk row or update row."""
    url, client = await setup(fedhub)
    tensors = big_model()
    values = np.frombuffer(tensors["a"].data, dtype=np.float32).copy()
    values[-5] = np.nan
    tensors["a"] = record("a", values)
    before = await stored_keys(fedhub.runtime)
    body = packb({"round": 1, "num_examples": 4, "tensors": tensor_map(tensors.values())})
    resp = await post(fedhub, url, client, Upload(body))
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": "NonFiniteValues", "detail": "tensor 'a' holds NaN or Inf values"}
    assert await stored_keys(fedhub.runtime) == before
    assert await fedhub.count(db.ClientUpdate) == 0
    assert await fedhub.announced_updates() == []


async def test_round_sent_first_is_checked_before_any_tensor(fedhub: Fedhub) -> None:
    """`round` before `tensors`: a closed round is refused, a repeat answered, neither reading the tensors."""
    url, client = await setup(fedhub)
    body = packb({"round": 1, "num_examples": 2, "tensors": tensor_map(big_model().values())})
    first = await post(fedhub, url, client, Upload(body))
    assert first.status_code == 201, first.text
    stored = await stored_keys(fedhub.runtime)

    repeat = Upload(body)
    again = await post(fedhub, url, client, repeat)
    assert again.status_code == 200
    assert again.json() == {"update_id": first.json()["update_id"], "round": 1, "duplicate": True}
    assert repeat.sent < len(body) // 2

    outsider = await fedhub.principal(name="outsider")
    unread = Upload(body)
    refused = await post(fedhub, url, outsider, unread)
    assert refused.status_code == 403
    assert unread.sent == 0  # refused before the body is read at all
    assert await stored_keys(fedhub.runtime) == stored
    assert await fedhub.count(db.ClientUpdate) == 1


async def test_round_closed_before_the_tensors_are_read(fedhub: Fedhub) -> None:
    """A closed round named before the tensors: 409 after reading only the fields."""
    url, client = await setup(fedhub)
    await fedhub.set_round(url.split("/")[3], phase=RoundPhase.TESTING)
    upload = Upload(packb({"round": 1, "num_examples": 2, "tensors": tensor_map(big_model().values())}))
    resp = await post(fedhub, url, client, upload)
    assert resp.status_code == 409
    assert resp.json()["error"] == "RoundClosed"
    assert upload.sent < len(upload.body) // 2
    assert await fedhub.count(db.ClientUpdate) == 0


async def test_data_before_dtype_is_refused_with_the_rule(fedhub: Fedhub) -> None:
    """In a streamed body `dtype` and `shape` must precede `data`; otherwise 400 naming the rule."""
    url, client = await setup(fedhub)
    wire: dict[str, Any] = tensor_map(big_model().values())
    wire["b"] = {"data": bytes(wire["b"]["data"]), "dtype": "float16", "shape": [3000]}
    before = await stored_keys(fedhub.runtime)
    resp = await post(fedhub, url, client, Upload(packb({"round": 1, "num_examples": 1, "tensors": wire})))
    assert resp.status_code == 400
    assert resp.json()["error"] == "MalformedPayload"
    assert "'dtype' and 'shape' must come before 'data'" in resp.json()["detail"]
    assert await stored_keys(fedhub.runtime) == before


async def test_body_limit_is_enforced_while_streaming(fedhub: Fedhub) -> None:
    """Without a Content-Length the limit still holds: 413 once the stream passes it, nothing stored."""
    url, client = await setup(fedhub)
    before = await stored_keys(fedhub.runtime)
    app = create_app(api_settings(fedhub.runtime, max_upload_bytes=2 * MiB), fedhub.runtime)
    upload = Upload(packb({"tensors": tensor_map(big_model().values()), "round": 1, "num_examples": 1}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.post(
            url, content=upload.__aiter__(), headers={**client.headers, "Content-Type": MSGPACK}
        )
    assert resp.status_code == 413
    assert resp.json()["error"] == "PayloadTooLarge"
    assert upload.sent <= 2 * MiB + upload.piece
    assert await stored_keys(fedhub.runtime) == before
    assert await fedhub.count(db.ClientUpdate) == 0


# --- the stores themselves ----------------------------------------------------------------------


async def _failing_update() -> AsyncIterator[bytes]:
    """The canonical bytes of an update whose NaN sits in its third data chunk."""
    values = np.zeros(MiB, dtype=np.float32)
    values[600_000] = np.inf
    body = packb({"tensors": tensor_map([record("a", values)])})

    async def items() -> AsyncIterator[StreamedField | StreamedTensor]:
        reader = TensorDocumentReader(Upload(body).__aiter__(), chunk_size=MiB // 2)
        while (item := await reader.next_item()) is not None:
            if isinstance(item, StreamedTensor | StreamedField):
                yield item

    async for chunk in canonical_update(items(), {"a": ("float32", (MiB,))}, {}):
        yield chunk


async def _assert_aborted_put_leaves_nothing(store: BlobStore) -> None:
    key = f"update/{uuid4()}"
    with pytest.raises(NonFiniteValues):
        await store.put_stream(key, _failing_update())
    assert await store.exists(key) is False


async def test_local_store_keeps_nothing_of_an_aborted_put_stream(tmp_path: Path) -> None:
    """LocalBlobStore: an error mid-stream leaves no file and no temporary file."""
    store = LocalBlobStore(tmp_path / "blobs")
    await _assert_aborted_put_leaves_nothing(store)
    assert blob_files(tmp_path / "blobs") == set()


@pytest.mark.integration
async def test_postgres_store_keeps_nothing_of_an_aborted_put_stream(postgres_url: str) -> None:
    """PostgresBlobStore on PostgreSQL: an error mid-stream leaves no blob row and no chunk row."""
    store = PostgresBlobStore(postgres_url)
    try:
        await _assert_aborted_put_leaves_nothing(store)
        async with store.engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM blob")) == 0
            assert await conn.scalar(text("SELECT count(*) FROM blob_chunk")) == 0
    finally:
        await store.close()


async def test_streamed_model_is_stored_content_addressed(fedhub: Fedhub) -> None:
    """A model streamed in pieces, name after the tensors: canonical bytes under their digest, once."""
    tensors = big_model()
    canonical = encode_tensors(tensors.values())
    digest = hashlib.sha256(canonical).hexdigest()
    answers = []
    for _ in range(2):
        upload = Upload(packb({"tensors": tensor_map(tensors.values()), "name": "big"}))
        resp = await fedhub.http.post(
            "/v1/models",
            content=upload.__aiter__(),
            headers={**fedhub.admin.headers, "Content-Type": MSGPACK},
        )
        assert resp.status_code == 201, resp.text
        answers.append(resp.json())
    assert [a["digest"] for a in answers] == [digest, digest]
    assert answers[0]["size_bytes"] == len(canonical)
    assert answers[0]["name"] == "big"
    assert answers[0]["spec"]["a"] == {"dtype": "float32", "shape": [MiB]}
    assert await fedhub.runtime.blobs.get(f"sha256/{digest}") == canonical
    assert await fedhub.count(db.Model) == 2


async def test_streamed_model_with_a_bad_name_leaves_nothing(fedhub: Fedhub) -> None:
    """A name that is not a string, sent after the tensors: 400, no model row and no blob."""
    before = await stored_keys(fedhub.runtime)
    upload = Upload(packb({"tensors": tensor_map(big_model().values()), "name": 5}))
    resp = await fedhub.http.post(
        "/v1/models", content=upload.__aiter__(), headers={**fedhub.admin.headers, "Content-Type": MSGPACK}
    )
    assert resp.status_code == 400
    assert "'name'" in resp.json()["detail"]
    assert await stored_keys(fedhub.runtime) == before
    assert await fedhub.count(db.Model) == 0
