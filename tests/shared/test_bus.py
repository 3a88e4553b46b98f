"""The bus contract, written against the `Bus` port only and run over every bus implementation.

Each test uses its own queue names and a routing-key namespace of its own (and, on RabbitMQ, an
exchange of its own, deleted after it with its queues), so the suite runs against a shared broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import pytest

from shared.bus import Bus, DeadLetter, Envelope, InMemoryBus, RabbitMQBus, topic_matches
from tests.shared.conftest import RabbitMQBuses

DEADLINE_S = 10.0


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
async def bus(request):
    """A started bus of each implementation, closed after the test (RabbitMQ: skipped when absent)."""
    if request.param == "memory":
        memory = InMemoryBus(retry_base_s=0.01)
        await memory.start()
        yield memory
        await memory.close()
        return
    # A sync fixture: resolving it from inside this running fixture needs no event loop of its own.
    buses = RabbitMQBuses(request.getfixturevalue("rabbitmq_url"))
    try:
        yield await buses.make(max_attempts=3)
    finally:
        await buses.cleanup()


@pytest.fixture
def ns() -> str:
    """A routing-key namespace no other test publishes into."""
    return f"t{uuid4().hex}"


def queue_name(label: str) -> str:
    """A queue name unique to this test run."""
    return f"test-{label}-{uuid4().hex}"


def envelope(routing_key: str, body: bytes = b"payload") -> Envelope:
    """A probe envelope; the bus never looks inside `body`."""
    return Envelope(message_id=uuid4(), type="Probe", routing_key=routing_key, body=body)


class Inbox:
    """A handler that records what it receives, in order."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def __call__(self, env: Envelope) -> None:
        self.received.append(env)

    @property
    def ids(self) -> list[UUID]:
        """Message ids in delivery order."""
        return [e.message_id for e in self.received]


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def eventually(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    """Like `wait_until`, for a condition that has to ask the broker."""
    deadline = time.monotonic() + DEADLINE_S
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def dead_letters_in(bus: Bus, queue: str) -> list[DeadLetter]:
    """The dead letters of `queue`, whichever bus holds them."""
    if isinstance(bus, InMemoryBus):
        return [d for d in bus.dead_letters if d.queue == queue]
    assert isinstance(bus, RabbitMQBus)
    return await bus.dead_letters(queue)


async def test_topic_patterns_route_by_words(bus, ns):
    """`*` matches exactly one word, `#` zero or more; each queue gets exactly its matches, in order."""
    star, hash_all, prefix = Inbox(), Inbox(), Inbox()
    await bus.subscribe(queue_name("star"), [f"{ns}.*.started"], star)
    await bus.subscribe(queue_name("hash"), [f"{ns}.#"], hash_all)
    await bus.subscribe(queue_name("prefix"), [f"{ns}.training.*"], prefix)

    training_started = envelope(f"{ns}.training.started")
    round_started = envelope(f"{ns}.round.started")
    too_deep = envelope(f"{ns}.training.started.late")
    bare = envelope(ns)
    other_ns = envelope(f"x{ns}.training.started")
    fence = envelope(f"{ns}.training.started", b"fence")
    await bus.publish([training_started, round_started, too_deep, bare, other_ns])
    await bus.publish([fence])

    await wait_until(
        lambda: all(fence.message_id in inbox.ids for inbox in (star, hash_all, prefix)), "the fence"
    )
    assert star.ids == [training_started.message_id, round_started.message_id, fence.message_id]
    assert hash_all.ids == [e.message_id for e in (training_started, round_started, too_deep, bare, fence)]
    assert prefix.ids == [training_started.message_id, fence.message_id]


async def test_delivery_carries_the_envelope_unchanged(bus, ns):
    """What the handler gets is what was published: ids, type, key, body."""
    inbox = Inbox()
    await bus.subscribe(queue_name("exact"), [f"{ns}.x"], inbox)
    sent = Envelope(
        message_id=uuid4(), type="Probe", routing_key=f"{ns}.x", body=b"\x00\xffbytes", correlation_id=uuid4()
    )
    await bus.publish([sent])
    await wait_until(lambda: bool(inbox.received), "the delivery")
    (got,) = inbox.received
    assert (got.message_id, got.type, got.routing_key, got.body, got.correlation_id) == (
        sent.message_id,
        sent.type,
        sent.routing_key,
        sent.body,
        sent.correlation_id,
    )


async def test_two_queues_bound_to_one_key_each_get_a_copy(bus, ns):
    """Fan-out: every bound queue receives every message once."""
    first, second = Inbox(), Inbox()
    await bus.subscribe(queue_name("first"), [f"{ns}.model.aggregated"], first)
    await bus.subscribe(queue_name("second"), [f"{ns}.model.aggregated"], second)
    sent = [envelope(f"{ns}.model.aggregated") for _ in range(3)]
    await bus.publish(sent)
    await wait_until(lambda: len(first.received) == 3 and len(second.received) == 3, "both copies")
    assert first.ids == second.ids == [e.message_id for e in sent]


async def test_competing_consumers_split_a_queue_and_handle_each_message_once(bus, ns):
    """Two consumers on one queue share its messages; none is handled twice or lost."""
    queue = queue_name("work")
    got: dict[str, list[UUID]] = {"a": [], "b": []}
    both_busy = asyncio.Event()

    def consumer(label: str):
        async def handle(env: Envelope) -> None:
            got[label].append(env.message_id)
            if got["a"] and got["b"]:
                both_busy.set()
            # Hold the first message until the other consumer has one too: proves the split.
            await asyncio.wait_for(both_busy.wait(), timeout=5)

        return handle

    await bus.subscribe(queue, [f"{ns}.job"], consumer("a"), prefetch=1)
    await bus.subscribe(queue, [f"{ns}.job"], consumer("b"), prefetch=1)
    sent = [envelope(f"{ns}.job") for _ in range(20)]
    await bus.publish(sent)
    await wait_until(lambda: len(got["a"]) + len(got["b"]) >= 20, "all 20 jobs")
    fence = envelope(f"{ns}.job", b"fence")
    await bus.publish([fence])
    await wait_until(lambda: fence.message_id in got["a"] + got["b"], "the fence")

    handled = [i for i in got["a"] + got["b"] if i != fence.message_id]
    assert got["a"]
    assert got["b"]
    assert sorted(handled) == sorted(e.message_id for e in sent)


async def test_a_failing_handler_gets_the_message_again(bus, ns):
    """A handler that fails twice then succeeds sees the same message three times, then no more."""
    attempts: list[UUID] = []
    done = Inbox()

    async def flaky(env: Envelope) -> None:
        if env.body == b"fence":
            await done(env)
            return
        attempts.append(env.message_id)
        if len(attempts) <= 2:
            raise RuntimeError(f"attempt {len(attempts)} fails")
        await done(env)

    await bus.subscribe(queue_name("flaky"), [f"{ns}.job"], flaky)
    sent = envelope(f"{ns}.job")
    await bus.publish([sent])
    await wait_until(lambda: sent.message_id in done.ids, "the successful attempt")
    fence = envelope(f"{ns}.job", b"fence")
    await bus.publish([fence])
    await wait_until(lambda: fence.message_id in done.ids, "the fence")
    assert attempts == [sent.message_id] * 3


async def test_a_handler_that_always_fails_ends_in_the_dead_letters(bus, ns):
    """Retries stop after the bus's attempts; the message is dead-lettered with the last reason."""
    queue = queue_name("doomed")
    attempts: list[UUID] = []

    async def always_fails(env: Envelope) -> None:
        attempts.append(env.message_id)
        raise ValueError(f"cannot handle {env.message_id}")

    await bus.subscribe(queue, [f"{ns}.job"], always_fails)
    sent = envelope(f"{ns}.job")
    await bus.publish([sent])

    async def dead_lettered() -> bool:
        return any(d.envelope.message_id == sent.message_id for d in await dead_letters_in(bus, queue))

    await eventually(dead_lettered, "the dead letter")
    (letter,) = await dead_letters_in(bus, queue)
    assert letter.queue == queue
    assert letter.envelope.body == sent.body
    assert letter.reason == f"ValueError: cannot handle {sent.message_id}"
    assert attempts == [sent.message_id] * bus.max_attempts


async def test_stop_consuming_lets_the_running_handler_finish_and_takes_nothing_new(bus, ns):
    """`stop_consuming` waits for the handler in flight; later messages wait for a new consumer."""
    queue = queue_name("drain")
    events: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()
    old = Inbox()

    async def slow(env: Envelope) -> None:
        await old(env)
        started.set()
        await asyncio.wait_for(release.wait(), timeout=DEADLINE_S)
        events.append("handler finished")

    await bus.subscribe(queue, [f"{ns}.job"], slow)
    first = envelope(f"{ns}.job")
    await bus.publish([first])
    await asyncio.wait_for(started.wait(), timeout=DEADLINE_S)

    async def stop() -> None:
        await bus.stop_consuming()
        events.append("stopped")

    stopping = asyncio.create_task(stop())
    # Bounded wait for something that must NOT happen: stopping while the handler still runs.
    done, _ = await asyncio.wait({stopping}, timeout=0.2)
    assert not done
    release.set()
    await asyncio.wait_for(stopping, timeout=DEADLINE_S)
    assert events == ["handler finished", "stopped"]

    second = envelope(f"{ns}.job")
    await bus.publish([second])
    new = Inbox()
    await bus.subscribe(queue, [f"{ns}.job"], new)
    await wait_until(lambda: second.message_id in new.ids, "the new consumer's delivery")
    assert old.ids == [first.message_id]
    assert new.ids == [second.message_id]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.x.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("#", "a", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b.a", False),
        ("#.c", "c", True),
        ("#.c", "a.b.c", True),
        ("#.c", "a.c.b", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.b.c", True),
        ("a.#.c", "a.b.b.d", False),
        ("*.#", "a", True),
        ("*.#", "a.b", True),
        ("#.*", "a", True),
        ("model.aggregated", "model.aggregate", False),
        ("job.*", "job.aggregate_round", True),
    ],
)
def test_topic_matches(pattern, key, matches):
    """AMQP topic semantics, case by case."""
    assert topic_matches(pattern, key) is matches
