"""The hub and the stream's frames without HTTP: overflow, shutdown, the replay/live seam."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import pytest

from services.notifier.deps import NotifierStopping
from services.notifier.payloads import KEEPALIVE, LiveNotification
from services.notifier.sse import Hub, Subscription, event_frames


def live(seq: int, receivers, training_id=None) -> LiveNotification:
    """A live notification whose frame names its seq."""
    return LiveNotification(
        seq=seq, training_id=training_id or uuid4(), receivers=frozenset(receivers), frame=b"seq %d" % seq
    )


async def next_seq(sub: Subscription) -> int:
    """The seq of the subscription's next live notification (which must exist)."""
    item = await sub.get()
    assert isinstance(item, LiveNotification)
    return item.seq


async def test_slow_subscriber_is_disconnected_not_waited_for():
    """A full buffer ends that subscription; the other subscriber still gets everything."""
    hub = Hub(queue_size=2)
    p = uuid4()
    slow, fast = hub.subscribe(p), hub.subscribe(p)
    for seq in (1, 2):
        assert hub.publish(live(seq, [p])) == 2
        assert await next_seq(fast) == seq
    assert hub.publish(live(3, [p])) == 1
    assert slow.ended == "overflow"
    assert await slow.get() is None
    assert await next_seq(fast) == 3
    assert len(hub) == 1


async def test_close_ends_every_subscription_and_refuses_new_ones():
    """`close` wakes every stream with the end marker; `subscribe` then raises NotifierStopping."""
    hub = Hub(queue_size=10)
    subs = [hub.subscribe(uuid4()) for _ in range(3)]
    hub.close()
    assert [await s.get() for s in subs] == [None, None, None]
    with pytest.raises(NotifierStopping) as refused:
        hub.subscribe(uuid4())
    assert refused.value.status_code == 503


async def test_publish_respects_receivers_and_training_filter():
    """Only receivers' streams, and only those whose filter matches, get a notification."""
    hub = Hub(queue_size=10)
    a, b, training = uuid4(), uuid4(), uuid4()
    all_of_a, only_training, of_b = hub.subscribe(a), hub.subscribe(a, training), hub.subscribe(b)
    assert hub.publish(live(1, [a])) == 1
    assert hub.publish(live(2, [a, b], training_id=training)) == 3
    assert [await next_seq(all_of_a), await next_seq(all_of_a)] == [1, 2]
    assert await next_seq(only_training) == 2
    assert await next_seq(of_b) == 2


async def test_replay_and_live_overlap_is_sent_once_in_order():
    """A notification both replayed and queued live is sent once; a tick while idle adds a keepalive."""
    hub = Hub(queue_size=10)
    p = uuid4()
    sub = hub.subscribe(p)
    hub.publish(live(5, [p]))
    hub.publish(live(6, [p]))

    async def missed():
        for seq in (4, 5):
            yield seq, b"seq %d" % seq

    frames = event_frames(sub, missed(), after=3)
    got = [await anext(frames) for _ in range(3)]
    assert got == [b"seq 4", b"seq 5", b"seq 6"]
    hub.tick(time.monotonic() + hub.keepalive_s)
    assert await anext(frames) == KEEPALIVE
    hub.publish(live(4, [p]))  # older than what was sent: dropped
    hub.publish(live(7, [p]))
    assert await anext(frames) == b"seq 7"
    hub.close()
    assert [f async for f in frames] == []


async def test_a_tick_sends_keepalives_only_to_streams_idle_for_keepalive_s():
    """Each tick finds the streams that got nothing for `keepalive_s` and gives each one keepalive."""
    hub = Hub(queue_size=10, keepalive_s=15.0)
    idle, busy = uuid4(), uuid4()
    idle_sub, busy_sub = hub.subscribe(idle), hub.subscribe(busy)
    start = time.monotonic()
    hub.tick(start + 5)
    assert hub.publish(live(1, [busy])) == 1
    hub.tick(start + 15.5)  # idle_sub: idle since it opened; busy_sub: got seq 1 just now
    hub.tick(start + 15.6)  # still queued: no second keepalive
    assert await idle_sub.get() == KEEPALIVE
    assert await next_seq(busy_sub) == 1
    hub.close()
    assert await idle_sub.get() is None
    assert await busy_sub.get() is None


async def test_the_keepalive_task_ticks_every_half_keepalive():
    """`Hub.keepalives` sends an idle stream a keepalive within 1.5 `keepalive_s`."""
    hub = Hub(queue_size=10, keepalive_s=0.1)
    sub = hub.subscribe(uuid4())
    ticking = asyncio.create_task(hub.keepalives())
    try:
        async with asyncio.timeout(0.15 + 1.0):
            assert await sub.get() == KEEPALIVE
    finally:
        ticking.cancel()
