"""Faults the distributed end-to-end tests inflict from outside the service processes.

Nothing here needs a hook in production code: the broker is driven and inspected with its own
`rabbitmqctl`, and the database with a table lock.

- `Broker`: which service holds a queue's deliveries unacknowledged, close a cluster's connections,
  restart the broker itself (`stop_app` / `start_app`).
- `Gate`: a PostgreSQL lock held in an open transaction, so that one kind of write waits and the
  work doing it is provably in flight (`model_gate`, `upload_gate`, `transition_gate`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

from fedhub.distributed import LocalCluster

RABBITMQCTL_ENV = "FEDHUB_TEST_RABBITMQCTL"
"""The command that runs rabbitmqctl against the test broker, e.g. `docker exec rabbitmq rabbitmqctl`."""

_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


async def until(
    check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 45, every_s: float = 0.2
) -> Any:
    """Poll `check` until it returns something truthy and return that; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (result := await check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)
    return result


def bus_connections(cluster: LocalCluster) -> dict[str, str]:
    """Connection name -> service, from the `bus.connected` lines of every service's JSON log.

    A restarted service logs its new connection too; a reconnect keeps its name.
    """
    names: dict[str, str] = {}
    for service, process in cluster.services.items():
        if not process.log_path.exists():
            continue
        for line in process.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "bus.connected":
                names[str(record["connection"])] = service
    return names


def reconnects(log_dir: Path) -> dict[str, int]:
    """Service -> how many `bus.reconnected` lines its log (`<service>.log` in `log_dir`) holds."""
    return {
        log.stem: log.read_text(errors="replace").count('"event": "bus.reconnected"')
        for log in sorted(log_dir.glob("*.log"))
    }


class Broker:
    """rabbitmqctl against the broker of the tests."""

    def __init__(self, command: list[str], vhost: str) -> None:
        self.command = command
        self.vhost = vhost

    @classmethod
    async def reach(cls, amqp_url: str) -> Broker:
        """A `Broker` whose rabbitmqctl answers; fails under CI=true when it does not, skips elsewhere."""
        command = shlex.split(os.environ.get(RABBITMQCTL_ENV, "rabbitmqctl"))
        path = urlsplit(amqp_url).path
        broker = cls(command, unquote(path[1:]) if len(path) > 1 else "/")
        reason = None
        if not command or shutil.which(command[0]) is None:
            reason = f"{command[:1]} is not installed here"
        else:
            try:
                await broker.ctl("list_connections", "pid")
            except (RuntimeError, TimeoutError) as exc:
                reason = str(exc)
        if reason is not None:
            reason = f"the broker fault tests need rabbitmqctl ({reason}); set {RABBITMQCTL_ENV}"
            if os.environ.get("CI", "").lower() in {"true", "1"}:
                pytest.fail(f"under CI=true: {reason}")
            pytest.skip(reason)
        return broker

    async def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """Run one rabbitmqctl command (quiet, no table headers); return its output, raise if it failed."""
        process = await asyncio.create_subprocess_exec(
            *self.command,
            args[0],
            "-q",
            *(["--no-table-headers"] if args[0].startswith("list_") else []),
            *args[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            detail = err.decode().strip()
            raise RuntimeError(f"rabbitmqctl {args[0]} exited with {process.returncode}: {detail}")
        return out.decode()

    async def connections(self) -> dict[str, str]:
        """Connection pid -> the connection name its client gave (fedhub buses name theirs)."""
        found: dict[str, str] = {}
        for line in (await self.ctl("list_connections", "pid", "client_properties")).splitlines():
            pid, _, properties = line.partition("\t")
            if match := _CONNECTION_NAME.search(properties):
                found[pid] = match.group(1)
        return found

    async def unacked(self, queue: str) -> dict[str, int]:
        """Connection name -> deliveries of `queue` its consuming channels hold unacknowledged."""
        consumers = await self.ctl("list_consumers", "-p", self.vhost, "queue_name", "channel_pid")
        channels = {
            fields[1]
            for line in consumers.splitlines()
            if len(fields := line.split("\t")) == 2 and fields[0] == queue
        }
        connections = await self.connections()
        held: dict[str, int] = {}
        listed = await self.ctl("list_channels", "pid", "connection", "messages_unacknowledged")
        for line in listed.splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[0] in channels and int(fields[2]) > 0:
                name = connections.get(fields[1], fields[1])
                held[name] = held.get(name, 0) + int(fields[2])
        return held

    async def holders(self, cluster: LocalCluster, queue: str) -> dict[str, int]:
        """Service -> deliveries of `queue` it holds unacknowledged, as the broker sees it."""
        services = bus_connections(cluster)
        return {services.get(name, name): count for name, count in (await self.unacked(queue)).items()}

    async def connected(self, cluster: LocalCluster) -> set[str]:
        """The services of `cluster` that have a connection open on the broker now."""
        services = bus_connections(cluster)
        return {services[name] for name in (await self.connections()).values() if name in services}

    async def drop(self, cluster: LocalCluster) -> list[str]:
        """Have the broker close every connection of `cluster` (and no one else's) at once; return
        their services."""
        services = bus_connections(cluster)
        doomed = {pid: services[name] for pid, name in (await self.connections()).items() if name in services}
        await asyncio.gather(
            *(self.ctl("close_connection", pid, "fedhub fault test drops the connection") for pid in doomed)
        )
        return sorted(doomed.values())

    async def restart(self, while_down: Callable[[], Awaitable[None]], down_s: float = 0.5) -> None:
        """Stop the RabbitMQ application (every connection drops, the port closes), run `while_down`,
        start it again.

        Other suites may share the broker: the outage is kept short, and the start runs whatever
        happened to the stop.
        """
        try:
            await self.ctl("stop_app")
            await while_down()
            await asyncio.sleep(down_s)
        finally:
            await self.ctl("start_app")
            await self.ctl("await_startup")


class Gate:
    """Holds a lock in an open transaction on a cluster's database until `open`.

    `lock` is the SQL that takes it; `holds_back` (an ILIKE pattern) matches the statements it makes
    wait, which `waiting` counts.
    """

    def __init__(self, database_url: str, lock: str, holds_back: str) -> None:
        self.dsn = _dsn(database_url)
        self.lock = lock
        self.holds_back = holds_back
        self._holder: Any = None
        self._transaction: Any = None

    async def shut(self) -> None:
        """Take the lock; from now on the statements it holds back wait."""
        self._holder = await asyncpg.connect(self.dsn, timeout=10)
        self._transaction = self._holder.transaction()
        await self._transaction.start()
        await self._holder.execute(self.lock)

    async def open(self) -> None:
        """Release the lock (idempotent): the waiting statements go on."""
        if self._holder is None:
            return
        holder, self._holder = self._holder, None
        try:
            await self._transaction.rollback()
        finally:
            await holder.close()

    async def waiting(self) -> int:
        """How many sessions wait on a lock in a statement this gate holds back."""
        return await count(
            self.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query ILIKE $1",
            self.holds_back,
        )


def model_gate(database_url: str) -> Gate:
    """Reads pass; an INSERT into `model` waits. Only an aggregator that has computed a round's global
    model inserts one during a training: while this is shut, that round's job is in flight (its
    handler running, its message unacknowledged) and the round cannot end."""
    return Gate(database_url, "LOCK TABLE model IN SHARE MODE", "INSERT INTO model %")


def upload_gate(database_url: str) -> Gate:
    """An upload the api accepted waits, uncommitted, at its INSERT into `client_update`."""
    return Gate(database_url, "LOCK TABLE client_update IN SHARE MODE", "INSERT INTO client_update %")


def transition_gate(database_url: str) -> Gate:
    """Holds every training row FOR SHARE: the api's checks (also FOR SHARE) pass, while an orchestrator
    handler waits where it locks its training FOR UPDATE, its event delivered and unacknowledged."""
    return Gate(database_url, "SELECT 1 FROM training FOR SHARE", "SELECT %FROM training %FOR UPDATE%")


async def committed(database_url: str, table: str, round_number: int) -> int:
    """How many committed rows of `table` (`model`, `client_update`) belong to round `round_number`."""
    return await count(_dsn(database_url), f'SELECT count(*) FROM "{table}" WHERE round = $1', round_number)


async def count(dsn: str, query: str, *args: Any) -> int:
    """The integer `query` selects, over a connection of its own (pg_stat_activity is a snapshot per
    transaction)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(query, *args))
    finally:
        await conn.close()


def _dsn(database_url: str) -> str:
    url = make_url(database_url)
    if "+" in url.drivername:
        url = url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)
