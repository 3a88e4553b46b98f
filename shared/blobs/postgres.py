"""A blob store in the database: each blob a `blob` row and its bytes in ordered `blob_chunk` rows.

For distributed mode without a shared volume: every process reaches the same blobs through the
database it already uses. A blob is written in one transaction, so a reader sees all of it or none.
On SQLite it holds the small blobs of the local store (`shared.blobs.tiered`).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import ReturningInsert

from shared.blobs.base import DEFAULT_CHUNK_SIZE, BlobNotFound, BlobStore, check_key, gather_up_to
from shared.coalesce import Batches
from shared.db.base import create_engine

metadata = MetaData()
"""The blob tables, apart from `shared.db.Base`: a store may live in a database of its own."""

blob_table = Table(
    "blob",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("complete", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

blob_chunk_table = Table(
    "blob_chunk",
    metadata,
    Column("key", String(200), ForeignKey("blob.key", ondelete="CASCADE"), primary_key=True),
    Column("index", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),
)


def _claim(insert: postgresql.Insert | sqlite.Insert) -> ReturningInsert[tuple[str]]:
    """The complete row of a one-chunk blob unless its key exists, returning the key (none then)."""
    return (
        insert.values(key=bindparam("key"), size=bindparam("size"), sha256=bindparam("sha256"), complete=True)
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(blob_table.c.key)
    )


_CLAIMED = _claim(postgresql.insert(blob_table)).cte("claimed")
_CLAIM_SQLITE = _claim(sqlite.insert(blob_table))
"""On SQLite: the rows of one-chunk blobs whose keys are free, returning those keys (run with many
rows, SQLAlchemy makes it one multi-row INSERT ... RETURNING)."""
_WRITE_ONE = (
    blob_chunk_table.insert()
    .from_select(
        ["key", "index", "data"], select(_CLAIMED.c.key, literal(0), bindparam("data", type_=LargeBinary))
    )
    .returning(blob_chunk_table.c.key)
)
"""A one-chunk blob's row and chunk in one PostgreSQL statement, built once and run with the blob as
parameters (building it per write was a visible share of a distributed API's CPU)."""


_WRITE_GROUP = text(
    """
    WITH given AS (
        SELECT * FROM unnest(
            CAST(:keys AS varchar[]), CAST(:sizes AS bigint[]), CAST(:digests AS varchar[]),
            CAST(:datas AS bytea[])
        ) AS g(key, size, sha256, data)
    ), claimed AS (
        INSERT INTO blob (key, size, sha256, complete)
        SELECT key, size, sha256, true FROM given
        ON CONFLICT (key) DO NOTHING
        RETURNING key
    )
    INSERT INTO blob_chunk (key, index, data)
    SELECT given.key, 0, given.data FROM given JOIN claimed ON claimed.key = given.key
    RETURNING key
    """
)
"""One-chunk blobs put at the same time (distinct keys), rows and chunks in one PostgreSQL statement;
returns the keys it created (a key that existed is left alone)."""


_GET_MANY = (
    select(blob_table.c.key, blob_table.c.size, blob_chunk_table.c.data)
    .join(blob_chunk_table, blob_chunk_table.c.key == blob_table.c.key)
    .where(blob_table.c.key.in_(bindparam("keys", expanding=True)), blob_table.c.complete)
    .order_by(blob_table.c.key, blob_chunk_table.c.index)
)


def _valid_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


class BlobCorrupted(RuntimeError):
    """A stored blob's chunks do not add up to its recorded size."""


class PostgresBlobStore(BlobStore):
    """Blobs chunked into rows; writes are one transaction each, reads fetch one chunk at a time.

    Give it the process's engine to share its pool, or a URL to open (and later dispose) its own.
    The tables come from the migrations (`fedhub db upgrade`) or from `create_tables()`.
    """

    def __init__(self, engine_or_url: AsyncEngine | str, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._owns_engine = isinstance(engine_or_url, str)
        self.engine = create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
        self.chunk_size = chunk_size
        self._groups: Batches[tuple[str, bytes], bool] = Batches(self._write_group)

    async def create_tables(self) -> None:
        """Create the blob tables when missing (embedded mode and tests; distributed mode migrates)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Store `data` in chunks within one transaction; False (and no write) when `key` exists."""
        view = memoryview(data).cast("B")
        if len(view) <= self.chunk_size:
            return await self._write_one(key, bytes(view))

        async def chunks() -> AsyncIterator[memoryview]:
            for start in range(0, len(view), self.chunk_size):
                # Slices share `data`'s buffer: the driver copies one chunk at a time.
                yield view[start : start + self.chunk_size]

        return await self._write(key, chunks())

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> bool:
        """Write the chunks as they come, re-cut to `chunk_size`; False (and no write) when `key` exists.

        A stream that ends within one chunk is written by `_write_one` (most updates are small).
        """
        whole, stream = await gather_up_to(chunks, self.chunk_size)
        if whole is not None:
            return await self._write_one(key, whole)
        return await self._write(key, stream)

    async def _write_one(self, key: str, data: bytes) -> bool:
        """A blob of one chunk: its row, complete, and its chunk in one statement (PostgreSQL).

        Nobody sees the row before the commit, so it can be complete from the start; a concurrent
        writer of the same key still waits on the primary key, as in `_write`. One statement is
        atomic by itself, so on PostgreSQL it runs in autocommit: no BEGIN and COMMIT round trips.
        """
        check_key(key)
        return await self._groups.submit((key, data))

    async def _write_group(self, blobs: list[tuple[str, bytes]]) -> list[bool | Exception]:
        """One-chunk blobs put at the same time (`Batches`), written together: on PostgreSQL by one
        autocommit statement (`_WRITE_GROUP`: one round trip and one pooled connection for a round's
        uploads arriving together), on SQLite in one transaction (one turn of the file's one writer
        instead of one per blob). A key given twice is written once (the later ones get False, as
        after a commit). If that fails, each blob is written alone, so one bad blob fails only its
        caller."""
        first: dict[str, int] = {}
        for i, (key, _) in enumerate(blobs):
            first.setdefault(key, i)
        if len(first) == 1:
            key, data = blobs[0]
            try:
                created = {key} if await self._write_alone(key, data) else set()
            except Exception as exc:
                return [exc] * len(blobs)
        else:
            unique = [blobs[i] for i in first.values()]
            try:
                if self.engine.dialect.name == "sqlite":
                    created = await self._write_group_sqlite(unique)
                else:
                    created = await self._write_group_postgres(unique)
            except Exception:
                return [
                    await self._outcome_alone(key, data, first[key] == i)
                    for i, (key, data) in enumerate(blobs)
                ]
        return [key in created and first[key] == i for i, (key, _) in enumerate(blobs)]

    async def _write_group_postgres(self, blobs: list[tuple[str, bytes]]) -> set[str]:
        params = {
            "keys": [key for key, _ in blobs],
            "sizes": [len(data) for _, data in blobs],
            "digests": [hashlib.sha256(data).hexdigest() for _, data in blobs],
            "datas": [data for _, data in blobs],
        }
        async with self.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return set((await autocommit.execute(_WRITE_GROUP, params)).scalars())

    async def _write_group_sqlite(self, blobs: list[tuple[str, bytes]]) -> set[str]:
        """The blob rows of the keys not yet taken (one multi-row insert returning the keys it
        created), then those blobs' chunks, in one transaction."""
        rows = [
            {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for key, data in blobs
        ]
        async with self.engine.begin() as conn:
            result = await conn.execute(_CLAIM_SQLITE, rows)
            created: set[str] = {str(row[0]) for row in result.all()}
            chunks = [{"key": key, "index": 0, "data": data} for key, data in blobs if key in created]
            if chunks:
                await conn.execute(blob_chunk_table.insert(), chunks)
        return created

    async def _outcome_alone(self, key: str, data: bytes, writes: bool) -> bool | Exception:
        if not writes:
            return False
        try:
            return await self._write_alone(key, data)
        except Exception as exc:
            return exc

    async def _write_alone(self, key: str, data: bytes) -> bool:
        """A one-chunk blob by itself: its row and chunk in one autocommit statement (`_WRITE_ONE`),
        on SQLite a group of one (`_write_group_sqlite`)."""
        if self.engine.dialect.name == "sqlite":
            return key in await self._write_group_sqlite([(key, data)])
        values = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "data": data}
        async with self.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return (await autocommit.execute(_WRITE_ONE, values)).first() is not None

    async def _write(self, key: str, chunks: AsyncIterator[bytes] | AsyncIterator[memoryview]) -> bool:
        """Insert the blob row, its chunks, then mark it complete, all in one transaction.

        The blob row goes first with ON CONFLICT DO NOTHING: a concurrent writer of the same key
        waits on the primary key until the first commits (then gets False) or rolls back (then
        writes). Readers see only committed, complete blobs.
        """
        check_key(key)
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                self._insert_blob(conn)
                .values(key=key, size=0, sha256="", complete=False)
                .on_conflict_do_nothing(index_elements=["key"])
                .returning(blob_table.c.key)
            )
            if claimed.first() is None:
                return False
            digest = hashlib.sha256()
            size = index = 0
            pending = bytearray()
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if not pending and len(chunk) == self.chunk_size:
                    await self._write_chunk(conn, key, index, chunk)
                    index += 1
                    continue
                pending += chunk
                while len(pending) >= self.chunk_size:
                    await self._write_chunk(conn, key, index, bytes(pending[: self.chunk_size]))
                    del pending[: self.chunk_size]
                    index += 1
            if pending or index == 0:
                await self._write_chunk(conn, key, index, bytes(pending))
            await conn.execute(
                update(blob_table)
                .where(blob_table.c.key == key)
                .values(size=size, sha256=digest.hexdigest(), complete=True)
            )
        return True

    @staticmethod
    def _insert_blob(conn: AsyncConnection) -> postgresql.Insert | sqlite.Insert:
        if conn.dialect.name == "sqlite":
            return sqlite.insert(blob_table)
        return postgresql.insert(blob_table)

    @staticmethod
    async def _write_chunk(conn: AsyncConnection, key: str, index: int, data: bytes | memoryview) -> None:
        await conn.execute(blob_chunk_table.insert().values(key=key, index=index, data=data))

    async def get(self, key: str) -> bytes:
        """The whole blob, in one query (one statement sees one snapshot: no delete can cut it short)."""
        check_key(key)
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(blob_table.c.size, blob_chunk_table.c.data)
                    .join(blob_chunk_table, blob_chunk_table.c.key == blob_table.c.key)
                    .where(blob_table.c.key == key, blob_table.c.complete)
                    .order_by(blob_chunk_table.c.index)
                )
            ).all()
        if not rows:  # a complete blob has at least its chunk 0, empty or not
            raise BlobNotFound(f"blob {key} does not exist")
        data = b"".join(bytes(row.data) for row in rows)
        if len(data) != rows[0].size:
            raise BlobCorrupted(f"blob {key} has {len(data)} bytes in its chunks, {rows[0].size} recorded")
        return data

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Every blob in one query (one snapshot), in order; None for a missing or refused key.

        For the aggregator's reads of a round's small updates: 300 blobs were 300 queries, ~0.5 s
        of a distributed round; the caller bounds the bytes asked for at once."""
        wanted = [key for key in keys if _valid_key(key)]
        found: dict[str, list[bytes]] = {}
        sizes: dict[str, int] = {}
        if wanted:
            async with self.engine.connect() as conn:
                rows = await conn.execute(_GET_MANY, {"keys": sorted(set(wanted))})
                for key, size, data in rows:
                    found.setdefault(key, []).append(bytes(data))
                    sizes[key] = size
        out: list[bytes | None] = []
        for key in keys:
            chunks = found.get(key)
            if chunks is None:
                out.append(None)
                continue
            data = b"".join(chunks)
            if len(data) != sizes[key]:
                raise BlobCorrupted(f"blob {key} has {len(data)} bytes in its chunks, {sizes[key]} recorded")
            out.append(data)
        return out

    async def open_stream(self, key: str) -> AsyncIterator[bytes]:
        """Yield the chunks in order, one query each, from one snapshot.

        One row per query keeps memory at one chunk (asyncpg's server-side cursors prefetch 50 rows);
        REPEATABLE READ on PostgreSQL makes every query see the snapshot of the first, so a delete
        that commits mid-read cannot cut the blob short.
        """
        check_key(key)
        async with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                size = await conn.scalar(
                    select(blob_table.c.size).where(blob_table.c.key == key, blob_table.c.complete)
                )
                if size is None:
                    raise BlobNotFound(f"blob {key} does not exist")
                read = index = 0
                while True:
                    data = await conn.scalar(
                        select(blob_chunk_table.c.data).where(
                            blob_chunk_table.c.key == key, blob_chunk_table.c.index == index
                        )
                    )
                    if data is None:
                        break
                    read += len(data)
                    index += 1
                    if data:
                        yield bytes(data)
                if read != size:
                    raise BlobCorrupted(f"blob {key} has {read} bytes in its chunks, {size} recorded")

    async def delete(self, key: str) -> None:
        """Remove the blob and all its chunks in one transaction; a missing key is not an error."""
        check_key(key)
        async with self.engine.begin() as conn:
            await conn.execute(delete(blob_chunk_table).where(blob_chunk_table.c.key == key))
            await conn.execute(delete(blob_table).where(blob_table.c.key == key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the blobs and their chunks in one transaction; missing keys are not an error."""
        for key in keys:
            check_key(key)
        if not keys:
            return
        async with self.engine.begin() as conn:
            await conn.execute(delete(blob_chunk_table).where(blob_chunk_table.c.key.in_(keys)))
            await conn.execute(delete(blob_table).where(blob_table.c.key.in_(keys)))

    async def exists(self, key: str) -> bool:
        """Whether a complete blob is stored under `key`."""
        check_key(key)
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                select(blob_table.c.key).where(blob_table.c.key == key, blob_table.c.complete)
            )
        return found is not None

    async def close(self) -> None:
        """Dispose the engine if this store opened it."""
        if self._owns_engine:
            await self.engine.dispose()
