"""The migrations on SQLite too: a model change without its migration fails even without PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from fedhub import db
from shared.db import create_engine
from shared.db.models import Model, Training


async def test_upgrade_on_sqlite_matches_the_models(tmp_path):
    """Upgrading an empty SQLite file reaches head with no difference from the models; twice is harmless."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'migrated.db'}"
    assert await db.current(url) is None
    await db.upgrade(url)
    await db.upgrade(url)
    assert await db.current(url) == db.head()
    assert await db.schema_diff(url) == []


async def test_trainings_from_before_the_aggregation_spec_read_as_plain_fedavg(tmp_path):
    """0001 -> 0002 on a database with a training: its new columns take their defaults, and it reads back."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await db.upgrade(url, "0001")
    owner, model, training = uuid4(), uuid4(), uuid4()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            now = datetime.now(UTC)
            await conn.execute(
                text("INSERT INTO principal VALUES (:id, 'actor', 'ACTOR', :token, :now)"),
                {"id": owner.hex, "token": uuid4().hex, "now": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO model (id, name, owner_id, blob_key, digest, size_bytes, spec, created_at) "
                    "VALUES (:id, 'm', :owner, 'sha256/x', 'x', 1, '{}', :now)"
                ),
                {"id": model.hex, "owner": owner.hex, "now": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO training (id, owner_id, initial_model_id, current_model_id, aggregation, "
                    "rounds, min_clients, round_timeout_s, skip_model_tests, model_test_after_each_round, "
                    "delete_local_models_after_aggregation, state, round, version, created_at, updated_at) "
                    "VALUES (:id, :owner, :model, :model, 'fedavg', 1, 1, 60, 0, 1, 1, 'INITIAL', 0, 0, "
                    ":now, :now)"
                ),
                {"id": training.hex, "owner": owner.hex, "model": model.hex, "now": now},
            )
        await db.upgrade(url)
        assert await db.schema_diff(url) == []
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            row = await session.get(Training, training)
            assert row is not None
            assert (row.aggregation_params, row.update_kind, row.exclude_vars, row.max_update_norm) == (
                {},
                "weights",
                None,
                None,
            )
            assert row.client_config() == {"update_kind": "weights", "exclude_vars": None}
            stored = await session.get(Model, model)
            assert stored is not None and (stored.state_blob_key, stored.record) == (None, None)
    finally:
        await engine.dispose()
