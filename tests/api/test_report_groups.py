"""Reports recorded in groups (`services.api.reports`): many uploads per transaction, each answered
after its own row committed, one bad row failing alone, and a request that stops waiting keeping the
blob of a row that committed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import httpx
import pytest

from services.api.main import create_app
from services.api.reports import GROUP_ROWS, ReportGroups
from services.api.service import _UpdateBlob, announce_test_reports, announce_updates, insert_if_open
from shared.auth import admin_principal_id
from shared.db import UnitOfWorkFactory
from shared.db import models as db
from shared.enums import RoundPhase
from shared.events import ReceivedTestReport, ReceivedUpdate, TestReportsReceived, UpdatesReceived, utcnow
from shared.runtime import Runtime
from shared.settings import CommonSettings
from tests.api.conftest import api_settings
from tests.api.helpers import (
    ADMIN_TOKEN,
    Fedhub,
    Principal,
    RecordingBus,
    blob_files,
    model_tensors,
    msgpack_body,
)

MSGPACK = "application/msgpack"


def _group_sizes() -> tuple[int, float]:
    """(transactions, rows) recorded so far for client updates, from the group-size histogram."""
    return GROUP_ROWS.count(report="client_update"), GROUP_ROWS.sum(report="client_update")


async def test_concurrent_uploads_share_transactions_and_each_is_recorded_once(fedhub: Fedhub) -> None:
    """24 clients upload at once: 24 answers 201, 24 rows, 24 blobs, each update announced once, in
    fewer transactions than uploads and one message per transaction (all of one training round)."""
    clients = [await fedhub.principal(name=f"site-{i}") for i in range(24)]
    model = await fedhub.upload_model(model_tensors(), name="tiny")
    training = await fedhub.create_training(str(model["id"]), [c.id for c in clients])
    await fedhub.set_round(training["id"])
    url = f"/v1/trainings/{training['id']}/updates"
    files_before = blob_files(fedhub.blob_root)
    transactions_before, rows_before = _group_sizes()

    answers = await asyncio.gather(
        *(
            fedhub.http.post(
                url,
                content=msgpack_body(model_tensors(i + 1.0), round=1, num_examples=i + 1),
                headers={**c.headers, "Content-Type": MSGPACK},
            )
            for i, c in enumerate(clients)
        )
    )

    assert [a.status_code for a in answers] == [201] * 24, [a.text for a in answers if a.status_code != 201]
    assert await fedhub.count(db.ClientUpdate) == 24
    assert len(blob_files(fedhub.blob_root) - files_before) == 24
    announced = await fedhub.announced_updates()
    assert sorted(str(a.client_id) for a in announced) == sorted(c.id for c in clients)
    assert {a.json()["update_id"] for a in answers} == {str(a.update_id) for a in announced}
    assert {a.num_examples for a in announced} == set(range(1, 25))
    transactions, rows = _group_sizes()
    assert rows - rows_before == 24
    assert transactions - transactions_before < 24
    assert len(await fedhub.published(UpdatesReceived)) == transactions - transactions_before


async def _training_collecting(fedhub: Fedhub, n: int) -> tuple[UUID, list[UUID]]:
    clients = [await fedhub.principal(name=f"unit-{i}") for i in range(n)]
    model = await fedhub.upload_model(model_tensors(), name="tiny")
    training = await fedhub.create_training(str(model["id"]), [c.id for c in clients])
    await fedhub.set_round(training["id"])
    return UUID(training["id"]), [UUID(c.id) for c in clients]


def _metric_row(training_id: UUID, client_id: UUID) -> dict[str, Any]:
    return {
        "id": uuid4(),
        "training_id": training_id,
        "round": 1,
        "client_id": client_id,
        "num_examples": 2,
        "metrics": {"accuracy": 0.5},
        "received_at": utcnow(),
    }


async def test_a_failing_row_fails_alone_the_rest_of_its_group_is_recorded(
    fedhub: Fedhub, runtime: Runtime
) -> None:
    """A row the database refuses (a client that does not exist: foreign key) makes its group fail;
    the group is recorded again row by row, so only that row's report fails."""
    training_id, clients = await _training_collecting(fedhub, 3)
    await fedhub.set_round(str(training_id), phase=RoundPhase.TESTING)
    groups = ReportGroups(runtime.uow, db.TestMetric, insert_if_open, announce_test_reports)
    unknown = uuid4()
    rows = [_metric_row(training_id, c) for c in (clients[0], unknown, clients[1], clients[2])]
    # Submitted in one turn of the loop: one group of four.
    futures = [groups.submit(r) for r in rows]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    assert [o is True for o in outcomes] == [True, False, True, True]
    assert isinstance(outcomes[1], Exception)
    assert await fedhub.count(db.TestMetric) == 3
    announced = await fedhub.announced_test_reports()
    assert sorted(a.client_id for a in announced) == sorted(clients)


async def test_rows_left_out_answer_false_and_emit_nothing(fedhub: Fedhub, runtime: Runtime) -> None:
    """A client's second row of a round and a row for a round that is not open go in nowhere."""
    training_id, clients = await _training_collecting(fedhub, 2)
    await fedhub.set_round(str(training_id), phase=RoundPhase.TESTING)
    groups = ReportGroups(runtime.uow, db.TestMetric, insert_if_open, announce_test_reports)
    first, repeat, other_round = (
        _metric_row(training_id, clients[0]),
        _metric_row(training_id, clients[0]),
        {**_metric_row(training_id, clients[1]), "round": 2},
    )
    futures = [groups.submit(r) for r in (first, repeat, other_round)]
    assert await asyncio.gather(*futures) == [True, False, False]
    assert await fedhub.count(db.TestMetric) == 1
    assert [a.client_id for a in await fedhub.announced_test_reports()] == [clients[0]]


@pytest.mark.parametrize("committed", [True, False])
async def test_an_upload_blob_is_kept_only_when_its_row_committed(
    fedhub: Fedhub, runtime: Runtime, committed: bool
) -> None:
    """The rollback of a request that stopped waiting for its group deletes the blob only if the
    row did not commit (else the committed update would point at nothing)."""
    await runtime.blobs.put("update/kept-or-not", b"bytes")
    recorded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    blob = _UpdateBlob(runtime.blobs, "update/kept-or-not", recorded)
    undo = asyncio.create_task(blob.undo())
    await asyncio.sleep(0)
    assert not undo.done()  # it waits for the group's outcome
    recorded.set_result(committed)
    await undo
    assert await runtime.blobs.exists("update/kept-or-not") is committed


async def test_uploads_beyond_the_pool_do_not_starve_their_groups(tmp_path: Path) -> None:
    """More concurrent uploads than pooled connections (2, no overflow, a 3 s pool timeout): each
    request gives its read connection back before it waits for its group, so the groups always get
    one and every upload is recorded (holding them, the uploads took every connection and failed at
    the pool timeout)."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'small-pool.db'}",
        blob_path=tmp_path / "blobs",
        database_pool_size=2,
        database_pool_overflow=0,
        database_pool_timeout_s=3,
    )
    runtime = await Runtime.open(settings, bus=RecordingBus(), create_tables=True)
    app = create_app(api_settings(runtime), runtime)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fedhub.test") as http,
        ):
            admin = Principal(str(admin_principal_id(ADMIN_TOKEN)), ADMIN_TOKEN)
            fedhub = Fedhub(http=http, runtime=runtime, admin=admin)
            clients = [await fedhub.principal(name=f"pool-{i}") for i in range(12)]
            model = await fedhub.upload_model(model_tensors(), name="tiny")
            training = await fedhub.create_training(str(model["id"]), [c.id for c in clients])
            await fedhub.set_round(training["id"])
            answers = await asyncio.gather(
                *(
                    http.post(
                        f"/v1/trainings/{training['id']}/updates",
                        content=msgpack_body(model_tensors(), round=1, num_examples=1),
                        headers={**c.headers, "Content-Type": MSGPACK},
                    )
                    for c in clients
                )
            )
            assert [a.status_code for a in answers] == [201] * 12, [a.text[:200] for a in answers]
            assert await fedhub.count(db.ClientUpdate) == 12
    finally:
        await runtime.close()


async def test_a_cancelled_group_leaves_its_outcome_unknown_and_fails_the_reports_behind_it(
    fedhub: Fedhub, runtime: Runtime
) -> None:
    """The process stopping mid-group: the group's futures are cancelled (it may have committed: an
    upload then keeps its blob), the reports queued behind it fail, and a later report is recorded."""
    training_id, clients = await _training_collecting(fedhub, 3)
    await fedhub.set_round(str(training_id), phase=RoundPhase.TESTING)
    entered, release = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def gated_uow() -> AsyncIterator[Any]:
        entered.set()
        await release.wait()
        async with runtime.uow() as uow:
            yield uow

    groups = ReportGroups(
        cast(UnitOfWorkFactory, gated_uow), db.TestMetric, insert_if_open, announce_test_reports
    )

    first_row = _metric_row(training_id, clients[0])
    first = groups.submit(first_row)
    await entered.wait()  # the drain took the first row and is recording it
    behind_row = _metric_row(training_id, clients[1])
    behind = groups.submit(behind_row)
    drain = groups._draining
    assert drain is not None
    drain.cancel()
    await asyncio.gather(drain, return_exceptions=True)
    assert first.cancelled()
    assert isinstance(behind.exception(), RuntimeError)
    blob = _UpdateBlob(runtime.blobs, "update/unknown-outcome", first)
    await runtime.blobs.put("update/unknown-outcome", b"bytes")
    await blob.undo()
    assert await runtime.blobs.exists("update/unknown-outcome")  # kept: the row may be there

    release.set()
    later_row = _metric_row(training_id, clients[2])
    assert await groups.submit(later_row) is True


def test_a_group_is_announced_in_one_message_per_training_round() -> None:
    """Rows of two trainings and two rounds in one group: three messages, each with its rows in the
    order they were recorded, and nothing for no rows."""
    t1, t2 = uuid4(), uuid4()
    c = [uuid4() for _ in range(4)]
    rows: list[dict[str, Any]] = [
        {"id": uuid4(), "training_id": t1, "round": 3, "client_id": c[0], "num_examples": 5},
        {"id": uuid4(), "training_id": t2, "round": 1, "client_id": c[1], "num_examples": 6},
        {"id": uuid4(), "training_id": t1, "round": 3, "client_id": c[2], "num_examples": 7},
        {"id": uuid4(), "training_id": t1, "round": 4, "client_id": c[3], "num_examples": 8},
    ]
    assert announce_updates(rows) == [
        UpdatesReceived(
            training_id=t1,
            round=3,
            updates=(
                ReceivedUpdate(client_id=c[0], update_id=rows[0]["id"], num_examples=5),
                ReceivedUpdate(client_id=c[2], update_id=rows[2]["id"], num_examples=7),
            ),
        ),
        UpdatesReceived(
            training_id=t2,
            round=1,
            updates=(ReceivedUpdate(client_id=c[1], update_id=rows[1]["id"], num_examples=6),),
        ),
        UpdatesReceived(
            training_id=t1,
            round=4,
            updates=(ReceivedUpdate(client_id=c[3], update_id=rows[3]["id"], num_examples=8),),
        ),
    ]
    assert announce_test_reports(rows[:3]) == [
        TestReportsReceived(
            training_id=t1,
            round=3,
            reports=(
                ReceivedTestReport(client_id=c[0], num_examples=5),
                ReceivedTestReport(client_id=c[2], num_examples=7),
            ),
        ),
        TestReportsReceived(
            training_id=t2, round=1, reports=(ReceivedTestReport(client_id=c[1], num_examples=6),)
        ),
    ]
    assert announce_updates([]) == [] and announce_test_reports([]) == []
