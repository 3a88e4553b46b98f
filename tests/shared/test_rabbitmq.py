"""What only a real RabbitMQ shows: wire properties, redelivery after a lost consumer, reconnects."""

from __future__ import annotations

import asyncio
import shutil
import time
from uuid import UUID, uuid4

import aio_pika
import pytest

from shared.bus import Envelope, PublishNotConfirmed, RabbitMQBus
from shared.bus.rabbitmq import REASON_HEADER, dead_queue
from shared.runtime import Runtime
from shared.settings import CommonSettings

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0


def envelope(routing_key: str, body: bytes = b"payload", **kwargs) -> Envelope:
    """A probe envelope; the bus never looks inside `body`."""
    return Envelope(message_id=uuid4(), type="Probe", routing_key=routing_key, body=body, **kwargs)


def queue_name(label: str) -> str:
    """A queue name unique to this test run."""
    return f"test-{label}-{uuid4().hex}"


async def wait_until(condition, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def drop_connection_from_the_broker(bus: RabbitMQBus) -> None:
    """Have RabbitMQ itself close `bus`'s connection, as a broker restart or a network cut would."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed here: cannot drop a connection from the broker side")
    listed = await _run(
        "rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
    )
    pids = [line.split("\t", 1)[0] for line in listed.splitlines() if f'"{bus.connection_name}"' in line]
    assert len(pids) == 1, f"connection {bus.connection_name} not listed by rabbitmqctl: {listed!r}"
    await _run("rabbitmqctl", "close_connection", pids[0], "fedhub test drops the connection")


async def _run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    if process.returncode != 0:
        pytest.skip(f"{' '.join(command[:2])} failed here ({process.returncode}): {err.decode().strip()}")
    return out.decode()


async def test_envelope_travels_in_amqp_properties_and_messages_are_persistent(rabbitmq_buses, rabbitmq_url):
    """A raw AMQP consumer sees the envelope in the properties, persistent delivery, the body untouched."""
    bus = await rabbitmq_buses.make()
    queue = queue_name("raw")
    # Declared and bound by the bus, then read with plain aio-pika.
    await bus.subscribe(queue, ["probe.raw"], _never_called)
    await bus.stop_consuming()
    sent = envelope("probe.raw", b"\x00body", correlation_id=uuid4())
    await bus.publish([sent])

    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.declare_queue(queue, durable=True, passive=True)
        message = await raw.get(no_ack=True, timeout=DEADLINE_S)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.message_id, message.type, message.correlation_id) == (
        str(sent.message_id),
        "Probe",
        str(sent.correlation_id),
    )
    assert message.headers["schema_version"] == sent.schema_version
    assert message.timestamp is not None
    assert abs(message.timestamp.timestamp() - sent.created_at.timestamp()) < 1
    assert message.routing_key == "probe.raw"
    assert message.body == sent.body


async def _never_called(env: Envelope) -> None:
    raise AssertionError(f"no delivery expected, got {env.message_id}")


async def test_a_confirmed_publish_is_there_for_a_consumer_that_comes_later(rabbitmq_buses):
    """`publish` returns once confirmed: a consumer started later, on another connection, gets it."""
    first = await rabbitmq_buses.make()
    queue = queue_name("later")
    await first.subscribe(queue, ["probe.later"], _never_called)
    await first.stop_consuming()

    publisher = await rabbitmq_buses.make()
    sent = [envelope("probe.later") for _ in range(5)]
    await publisher.publish(sent)
    await publisher.close()

    later = await rabbitmq_buses.make()
    got: list[Envelope] = []

    async def record(env: Envelope) -> None:
        got.append(env)

    await later.subscribe(queue, ["probe.later"], record)
    await wait_until(lambda: len(got) == 5, "the five messages")
    assert [e.message_id for e in got] == [e.message_id for e in sent]
    assert [e.created_at for e in got] == [e.created_at for e in sent]


async def test_an_unacked_message_goes_to_another_consumer_when_its_connection_closes(rabbitmq_buses):
    """A consumer whose connection closes mid-handling never acked: another consumer gets the message."""
    queue = queue_name("handover")
    doomed = await rabbitmq_buses.make()
    started, release = asyncio.Event(), asyncio.Event()

    async def stuck(env: Envelope) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), timeout=DEADLINE_S)

    await doomed.subscribe(queue, ["probe.handover"], stuck)
    sent = envelope("probe.handover")
    await doomed.publish([sent])
    await asyncio.wait_for(started.wait(), timeout=DEADLINE_S)

    survivor = await rabbitmq_buses.make()
    got: list[UUID] = []

    async def record(env: Envelope) -> None:
        got.append(env.message_id)

    await survivor.subscribe(queue, ["probe.handover"], record)
    assert doomed._connection is not None
    await doomed._connection.close()  # the consumer's process is gone, as far as the broker knows
    try:
        await wait_until(lambda: got == [sent.message_id], "the redelivery to the other consumer")
    finally:
        release.set()


async def test_dead_letter_keeps_the_reason_and_reading_it_consumes_nothing(rabbitmq_buses, rabbitmq_url):
    """After max_attempts the message sits in `<queue>.dead` with `x-death-reason`; listing keeps it."""
    bus = await rabbitmq_buses.make(max_attempts=2)
    queue = queue_name("dead")
    attempts: list[int] = []

    async def always_fails(env: Envelope) -> None:
        attempts.append(1)
        raise ValueError("model 42 has no round 7")

    await bus.subscribe(queue, ["probe.dead"], always_fails)
    sent = envelope("probe.dead", correlation_id=uuid4())
    await bus.publish([sent])

    deadline = time.monotonic() + DEADLINE_S
    while not (letters := await bus.dead_letters(queue)):
        assert time.monotonic() < deadline, "timed out waiting for the dead letter"
        await asyncio.sleep(0.02)
    (letter,) = letters
    assert letter.queue == queue
    assert letter.reason == "ValueError: model 42 has no round 7"
    assert letter.envelope == sent
    assert len(attempts) == 2
    assert [d.envelope.message_id for d in await bus.dead_letters(queue)] == [sent.message_id]

    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.declare_queue(dead_queue(queue), durable=True, passive=True)
        message = await raw.get(no_ack=False, timeout=DEADLINE_S)
        assert message.headers[REASON_HEADER] == "ValueError: model 42 has no round 7"
        await message.nack(requeue=True)


async def test_the_bus_reconnects_after_the_broker_drops_it_and_keeps_consuming(rabbitmq_buses):
    """The broker closes the connection; the bus reconnects, its consumer resumes, publishing works again."""
    bus = await rabbitmq_buses.make()
    queue = queue_name("reconnect")
    got: list[UUID] = []

    async def record(env: Envelope) -> None:
        got.append(env.message_id)

    await bus.subscribe(queue, ["probe.reconnect"], record)
    before = envelope("probe.reconnect")
    await bus.publish([before])
    await wait_until(lambda: got == [before.message_id], "the delivery before the drop")

    await drop_connection_from_the_broker(bus)
    await wait_until(lambda: bus.reconnects == 1, "the reconnect")

    after = envelope("probe.reconnect")
    await bus.publish([after])
    await wait_until(lambda: got == [before.message_id, after.message_id], "the delivery after the reconnect")


async def test_publishing_while_the_broker_is_away_raises_instead_of_hanging(rabbitmq_buses):
    """With the connection down (and the reconnect far away), `publish` raises within its timeout."""
    bus = await rabbitmq_buses.make(publish_timeout_s=0.5, reconnect_interval=60)
    assert bus.problem() is None
    await drop_connection_from_the_broker(bus)
    await wait_until(lambda: bus.problem() is not None, "readiness to notice the lost connection")
    assert "connection lost" in (bus.problem() or "")
    started = time.monotonic()
    with pytest.raises(PublishNotConfirmed):
        await bus.publish([envelope("probe.outage")])
    assert time.monotonic() - started < 5


async def test_a_runtime_with_an_amqp_url_opens_the_rabbitmq_bus(rabbitmq_url, tmp_path):
    """`FEDHUB_AMQP_URL` set: the runtime's bus is RabbitMQ on the default exchange, started and closable."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        amqp_url=rabbitmq_url,
    )
    rt = await Runtime.open(settings, create_tables=True)
    try:
        assert isinstance(rt.bus, RabbitMQBus)
        assert rt.bus.exchange_name == "fedhub.events"
        assert rt.bus.queue_prefix == "fedhub."
        # Confirmed by the broker although no queue is bound to the key.
        await rt.bus.publish([envelope(f"probe.{uuid4().hex}")])
    finally:
        await rt.close()
