"""The API's caches: tokens, model rows, participants and model blobs are read once, answers unchanged."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID, uuid4

from services.api.cache import CACHE_LOOKUPS, ApiCache
from shared.auth import AUTH_LOOKUPS
from shared.blobs import LocalBlobStore
from shared.db.models import Model
from tests.api.conftest import World
from tests.api.helpers import MSGPACK, model_tensors, msgpack_body


def _lookups(cache: str, result: str) -> float:
    return CACHE_LOOKUPS.value(cache=cache, result=result)


async def test_repeated_downloads_read_the_database_and_the_blob_once(world: World) -> None:
    """A client downloading a model again: its token, the model row and its blob come from memory, and
    the bytes are the same; an outsider is still refused."""
    fedhub = world.fedhub
    url = f"/v1/models/{world.model['id']}/weights"
    first = await fedhub.http.get(url, headers=world.alice.headers)
    blobs = _lookups("blob", "miss")
    tokens = AUTH_LOOKUPS.value(source="database")
    models = _lookups("model", "miss")
    again = [await fedhub.http.get(url, headers=world.alice.headers) for _ in range(3)]
    assert all(a.content == first.content for a in again)
    assert AUTH_LOOKUPS.value(source="database") == tokens
    assert _lookups("model", "miss") == models
    assert _lookups("blob", "miss") == blobs
    refused = await fedhub.http.get(url, headers=world.outsider.headers)
    assert refused.status_code == 404


async def test_participants_are_loaded_once_per_training(world: World) -> None:
    """Uploads and reads by participants check membership from memory after the first; non-members
    are refused with the same errors as before."""
    fedhub = world.fedhub
    training_url = f"/v1/trainings/{world.training_id}"
    assert (await fedhub.http.get(training_url, headers=world.alice.headers)).is_success
    misses = _lookups("participants", "miss")
    assert (await fedhub.http.get(training_url, headers=world.bob.headers)).is_success
    upload = await fedhub.http.post(
        f"{training_url}/updates",
        content=msgpack_body(model_tensors(), round=1, num_examples=3),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert upload.status_code == 201, upload.text
    assert _lookups("participants", "miss") == misses
    outsider = await fedhub.http.post(
        f"{training_url}/updates",
        content=msgpack_body(model_tensors(), round=1, num_examples=3),
        headers={**world.outsider.headers, "Content-Type": MSGPACK},
    )
    assert outsider.status_code == 403
    assert outsider.json()["error"] == "NotAParticipant"
    assert (await fedhub.http.get(training_url, headers=world.outsider.headers)).status_code == 404


async def test_absent_rows_are_not_remembered(world: World) -> None:
    """A training or model that did not exist is looked up again next time (it may exist by then)."""
    cache = ApiCache()
    missing = uuid4()
    async with world.fedhub.runtime.uow() as uow:
        for _ in range(2):
            participants, models = _lookups("participants", "miss"), _lookups("model", "miss")
            assert await cache.participants(uow.session, missing) == frozenset()
            assert await cache.model(uow.session, missing) is None
            assert _lookups("participants", "miss") == participants + 1
            assert _lookups("model", "miss") == models + 1


async def test_only_content_addressed_blobs_within_the_bounds_are_kept(tmp_path: Path) -> None:
    """Model blobs (`sha256/...`) up to `largest_blob` are kept within `blob_bytes`, oldest first out;
    update blobs never."""
    store = LocalBlobStore(tmp_path)
    cache = ApiCache(blob_bytes=250, largest_blob=100)
    keys = [f"sha256/{i:064x}" for i in range(4)]
    for key in keys:
        await store.put(key, b"x" * 100)
    await store.put("sha256/" + "f" * 64, b"y" * 101)
    update = f"update/{uuid4()}"
    await store.put(update, b"u" * 10)

    async def misses(key: str) -> float:
        before = _lookups("blob", "miss")
        await cache.model_blob(store, key)
        return _lookups("blob", "miss") - before

    assert [await misses(k) for k in keys[:2]] == [1, 1]
    assert [await misses(k) for k in keys[:2]] == [0, 0], "both fit: 200 of 250 bytes"
    assert await misses(keys[2]) == 1  # 300 bytes: the least recently used one goes
    assert await misses(keys[0]) == 1
    assert await misses("sha256/" + "f" * 64) == 1
    assert await misses("sha256/" + "f" * 64) == 1, "larger than largest_blob: never kept"
    assert await misses(update) == 1
    assert await misses(update) == 1, "an update blob is not content-addressed: never kept"


async def test_a_round_model_is_readable_by_its_training_clients_only(world: World) -> None:
    """A model recorded for a training (its `training_id`) is visible to that training's participants
    through the cached set, and not to others."""
    fedhub = world.fedhub
    round_model = await fedhub.upload_model(model_tensors(2.0), name="round")
    async with fedhub.runtime.uow() as uow:
        row = await uow.session.get(Model, UUID(round_model["id"]))
        assert row is not None
        row.training_id = UUID(world.training_id)  # as the aggregator records a round's model
    url = f"/v1/models/{round_model['id']}/weights"
    assert (await fedhub.http.get(url, headers=world.bob.headers)).is_success
    assert (await fedhub.http.get(url, headers=world.outsider.headers)).status_code == 404
