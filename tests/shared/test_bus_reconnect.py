"""The RabbitMQ bus across a reconnect: what the broker sees of its consumers afterwards.

The distributed fault tests (tests/e2e/test_distributed.py) rely on these two properties.
"""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from shared.bus import Envelope, RabbitMQBus
from tests.e2e.faults import Broker, until

pytestmark = pytest.mark.integration


def _envelope(routing_key: str) -> Envelope:
    return Envelope(message_id=uuid4(), type="Probe", routing_key=routing_key, body=b"probe")


async def _drop(broker: Broker, bus: RabbitMQBus) -> None:
    """The broker closes `bus`'s connection; return once the bus has reconnected."""
    before = bus.reconnects
    pids = [pid for pid, name in (await broker.connections()).items() if name == bus.connection_name]
    assert len(pids) == 1, f"{bus.connection_name} is not connected"
    await broker.ctl("close_connection", pids[0], "fedhub test drops the connection")

    async def reconnected() -> bool:
        return bus.reconnects > before and bus.problem() is None

    await until(reconnected, "the bus to reconnect", timeout_s=20, every_s=0.02)


async def test_a_handler_done_after_a_reconnect_does_not_ack_the_redelivery(rabbitmq_buses, rabbitmq_url):
    """Delivery tags start again on the new channel: the first handler's ack must not settle the
    redelivered copy that a second handler is still working on."""
    broker = await Broker.reach(rabbitmq_url)
    bus = await rabbitmq_buses.make()
    queue = f"test-redelivery-{uuid4().hex}"
    calls: list[UUID] = []
    releases = [asyncio.Event(), asyncio.Event()]

    async def held(env: Envelope) -> None:
        calls.append(env.message_id)
        await asyncio.wait_for(releases[len(calls) - 1].wait(), timeout=20)

    await bus.subscribe(queue, ["probe.redelivery"], held, prefetch=1)
    sent = _envelope("probe.redelivery")
    await bus.publish([sent])

    async def calls_made(n: int) -> bool:
        return len(calls) == n

    await until(lambda: calls_made(1), "the first delivery", every_s=0.02)
    await _drop(broker, bus)
    await until(lambda: calls_made(2), "the redelivery to the reconnected consumer", every_s=0.02)
    assert calls == [sent.message_id, sent.message_id]

    releases[0].set()

    async def first_settled() -> bool:
        return len(bus._in_flight) == 1

    await until(first_settled, "the first handler to finish", every_s=0.02)
    full_queue = bus.queue_prefix + queue
    assert list((await broker.unacked(full_queue)).values()) == [1], "the redelivery is still unacked"

    releases[1].set()

    async def all_acked() -> bool:
        return not await broker.unacked(full_queue)

    await until(all_acked, "the redelivery's own ack")


async def test_the_prefetch_bound_survives_a_reconnect(rabbitmq_buses, rabbitmq_url):
    """Competing consumers stay bounded after a reconnect: the restored channel has the same prefetch."""
    broker = await Broker.reach(rabbitmq_url)
    bus = await rabbitmq_buses.make()

    async def ignore(env: Envelope) -> None:
        return None

    await bus.subscribe(f"test-prefetch-{uuid4().hex}", ["probe.prefetch"], ignore, prefetch=3)

    async def consumer_prefetch() -> list[int]:
        pids = [pid for pid, name in (await broker.connections()).items() if name == bus.connection_name]
        listed = await broker.ctl("list_channels", "connection", "consumer_count", "prefetch_count")
        return [
            int(fields[2])
            for line in listed.splitlines()
            if len(fields := line.split("\t")) == 3 and fields[0] in pids and fields[1] != "0"
        ]

    assert await consumer_prefetch() == [3]
    await _drop(broker, bus)
    assert await until(consumer_prefetch, "the consumer's channel to come back") == [3]
