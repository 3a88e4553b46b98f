"""Client reports (model updates, test metrics) recorded in groups: many clients' rows per transaction.

Recording each report in a transaction of its own (a session, BEGIN, the insert, the outbox row,
COMMIT, and on SQLite a turn of the one writer) was most of the API's database work at 1,000
clients a round. A `ReportGroups` queue takes the rows of the reports that arrive while the
previous group commits and records them together in one unit of work: one execution of the
conditional insert for all rows (`service.insert_if_open`: only while the round is open, only a
client's first row of the round), one read of which rows went in, one outbox write of the messages
that announce them (`announce`: one per training round, `UpdatesReceived` / `TestReportsReceived`,
not one per row), one commit. A request waits for its group's commit before it answers, so an answer still
follows the commit of what it reports. Under light load a group holds one report and costs a task
switch; nothing waits on purpose.

A group that fails as a whole (a database error) is recorded again one row at a time, so one bad
row fails its own request only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import structlog
from sqlalchemy import Table, select
from sqlalchemy.sql.dml import Insert

from shared.db.models import ClientUpdate, TestMetric
from shared.db.uow import UnitOfWorkFactory
from shared.events import Message
from shared.metrics import REGISTRY

log = structlog.get_logger(component="api.reports")

GROUP_ROWS = REGISTRY.histogram(
    "fedhub_api_report_group_rows",
    "Client reports recorded per transaction (see services/api/reports.py)",
    ("report",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

MAX_GROUP = 512
"""The most rows one transaction records; more waiting reports go in the next group."""

InsertFor = Callable[[str, type[ClientUpdate | TestMetric]], Insert]
"""The conditional insert of one row for a dialect and entity (`service.insert_if_open`)."""

Announce = Callable[[Sequence[Mapping[str, Any]]], Sequence[Message]]
"""The messages that announce the rows a group recorded (`service.announce_updates`, ...)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    row: Mapping[str, Any]
    recorded: asyncio.Future[bool]


class ReportGroups:
    """Records one kind of report (`entity`) in groups, each group's rows announced together
    (`announce`); `submit` answers whether a row went in."""

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        entity: type[ClientUpdate | TestMetric],
        insert_for: InsertFor,
        announce: Announce,
    ) -> None:
        self._uow = uow
        self._entity = entity
        self._table: Table = entity.__table__  # type: ignore[assignment]
        self._insert_for = insert_for
        self._announce = announce
        self._one_row: dict[str, Insert] = {}
        self._waiting: list[_Pending] = []
        self._draining: asyncio.Task[None] | None = None

    def submit(self, row: Mapping[str, Any]) -> asyncio.Future[bool]:
        """Queue `row` for the next group (announced with the group's other rows if it goes in).

        The future is True once the row committed, False when the insert left it out (the client's
        report for the round is already there, or the round is no longer open), and holds the error
        when it could not be recorded. It completes even if the caller stops waiting.
        """
        recorded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(row, recorded))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain(), name=f"report-groups-{self._table.name}")
        return recorded

    async def _drain(self) -> None:
        group: list[_Pending] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                try:
                    await self._record(group)
                except Exception as exc:
                    if len(group) == 1:
                        _fail(group, exc)
                        continue
                    log.warning("reports.group_failed", rows=len(group), error=repr(exc))
                    for pending in group:
                        try:
                            await self._record([pending])
                        except Exception as one:
                            _fail([pending], one)
        finally:
            self._draining = None
            # Cancelled (the process stopping): the group in hand may or may not have committed,
            # so its outcome stays unknown (cancelled); those not yet taken certainly did not.
            for pending in group:
                pending.recorded.cancel()
            waiting, self._waiting = self._waiting, []
            _fail(waiting, RuntimeError("the API stopped before this report was recorded"))

    async def _record(self, group: Sequence[_Pending]) -> None:
        table = self._table
        async with self._uow() as uow:
            session = uow.session
            dialect = session.get_bind().dialect.name
            inserted: set[UUID]
            if len(group) == 1:  # one statement: the insert returns the row's id if it went in
                inserted = set(await session.scalars(self._returning(dialect), group[0].row))
            else:
                await session.execute(self._insert_for(dialect, self._entity), [p.row for p in group])
                ids = [pending.row["id"] for pending in group]
                inserted = set(await session.scalars(select(table.c.id).where(table.c.id.in_(ids))))
            for message in self._announce([p.row for p in group if p.row["id"] in inserted]):
                uow.emit(message)
        GROUP_ROWS.observe(len(group), report=table.name)
        for pending in group:
            if not pending.recorded.done():
                pending.recorded.set_result(pending.row["id"] in inserted)

    def _returning(self, dialect: str) -> Insert:
        insert = self._one_row.get(dialect)
        if insert is None:
            insert = self._one_row[dialect] = self._insert_for(dialect, self._entity).returning(
                self._table.c.id
            )
        return insert


def _fail(group: Sequence[_Pending], exc: Exception) -> None:
    for pending in group:
        if not pending.recorded.done():
            pending.recorded.set_exception(exc)
            # Retrieved here so that a caller that stopped waiting leaves no "never retrieved" warning.
            pending.recorded.exception()


@dataclass(frozen=True, slots=True)
class Reports:
    """The API process's report groups: updates and test metrics."""

    updates: ReportGroups
    test_metrics: ReportGroups


async def recorded_or_not(recorded: asyncio.Future[bool]) -> bool:
    """Whether the row of `recorded` committed, waiting for its group: False when the group failed;
    True when the outcome was never learnt (its group was cancelled mid-way), so that the caller
    keeps what the row may point at (an orphan blob is harmless, a row without its blob is not)."""
    try:
        return await asyncio.shield(recorded)
    except asyncio.CancelledError:
        if recorded.cancelled():
            return True
        raise
    except Exception:
        return False
