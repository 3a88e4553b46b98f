"""The event-stream parser: fields, comments, line endings and chunk boundaries anywhere."""

from __future__ import annotations

import pytest

from fedhub.client.sse import ServerSentEvent, SSEParser

SAMPLE = (
    "\ufeff: a comment before anything\n"
    "retry: 1500\n"
    "id: 1\n"
    "event: UPDATE_ROUND_START\n"
    'data: {"round": 1}\n'
    "\n"
    ": keepalive\r\n"
    "data: first line\r\n"
    "data:second line without space\r\n"
    "data\r\n"
    "data:  two spaces keep one\r\n"
    "id: 2\r\n"
    "\r\n"
    "id: 3\r"
    "event: ignored-without-data\r"
    "\r"
    "id: bad\0id\n"
    "unknown: field\n"
    "retry: not-a-number\n"
    "data: caf\u00e9 \u6f22 \U0001f600\n"
    "\n"
    "event: empty-data\n"
    "data:\n"
    "\n"
    "id\n"
    "data: after id reset\n"
    "\n"
    "data: incomplete, never dispatched\n"
).encode()

EXPECTED = [
    ServerSentEvent(event="UPDATE_ROUND_START", data='{"round": 1}', id="1", retry=1500),
    ServerSentEvent(
        event="message",
        data="first line\nsecond line without space\n\n two spaces keep one",
        id="2",
        retry=1500,
    ),
    ServerSentEvent(event="message", data="caf\u00e9 \u6f22 \U0001f600", id="3", retry=1500),
    ServerSentEvent(event="empty-data", data="", id="3", retry=1500),
    ServerSentEvent(event="message", data="after id reset", id="", retry=1500),
]


def parse(chunks: list[bytes]) -> tuple[list[ServerSentEvent], SSEParser]:
    """Feed `chunks` to a fresh parser; return every event and the parser."""
    parser = SSEParser()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser


def test_sample_stream_gives_the_expected_events():
    """Every field kind, comment, line ending and dispatch rule in one stream."""
    events, parser = parse([SAMPLE])
    assert events == EXPECTED
    assert parser.retry == 1500
    assert parser.last_event_id == ""


@pytest.mark.parametrize("cut", range(len(SAMPLE) + 1))
def test_a_cut_at_any_byte_gives_the_same_events(cut):
    """Two chunks split anywhere (inside CRLF, inside a UTF-8 sequence, inside the BOM) parse alike."""
    events, _ = parse([SAMPLE[:cut], SAMPLE[cut:]])
    assert events == EXPECTED


def test_byte_by_byte_gives_the_same_events():
    """The smallest chunks possible still parse to the same events."""
    events, _ = parse([SAMPLE[i : i + 1] for i in range(len(SAMPLE))])
    assert events == EXPECTED


def test_text_chunks_are_accepted():
    """Already decoded text parses like bytes."""
    parser = SSEParser()
    assert parser.feed("data: x\n") == []
    assert parser.feed("\n") == [ServerSentEvent(data="x")]


def test_id_only_block_moves_last_event_id_without_an_event():
    """A block with an id and no data dispatches nothing but is remembered for reconnects."""
    parser = SSEParser()
    assert parser.feed(b"id: 41\n\n") == []
    assert parser.last_event_id == "41"


def test_reset_drops_partial_event_but_keeps_last_id_and_retry():
    """A reconnect starts clean: half an event from the dead connection is discarded."""
    parser = SSEParser(last_event_id="7")
    assert parser.feed(b"retry: 250\ndata: half an eve") == []
    parser.reset()
    assert parser.feed(b"data: whole\n\n") == [ServerSentEvent(data="whole", id="7", retry=250)]
    assert parser.last_event_id == "7"


def test_cr_at_chunk_end_then_lf_is_one_line_ending():
    """CR ending one chunk and LF starting the next make one CRLF, not an extra blank line."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == [ServerSentEvent(data="a\nb")]
