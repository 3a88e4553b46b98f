"""An incremental parser of the `text/event-stream` format (WHATWG HTML, "server-sent events").

Bytes go in as they arrive, in chunks cut anywhere (inside a line, a CRLF pair or a UTF-8 sequence);
whole events come out. Fields: `event`, `data` (several lines joined with a line feed), `id`,
`retry`; lines starting with a colon are comments; a blank line dispatches the event.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event; `id` is the stream's last event id at dispatch ("" when none was set)."""

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class SSEParser:
    """Turns chunks of an event stream into `ServerSentEvent`s; keeps `last_event_id` and `retry`."""

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget any partial line or event (a new connection), keeping `last_event_id` and `retry`."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""
        self._pending_cr = False
        self._bom_checked = False
        self._id = self.last_event_id
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        """Parse the next chunk of the stream and return the events it completes, in order."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if not text:
            # A chunk can end inside a UTF-8 sequence; nothing to do until the rest arrives.
            return []
        if not self._bom_checked:
            self._bom_checked = True
            text = text.removeprefix(_BOM)
        if self._pending_cr and text.startswith("\n"):
            # The CR ending the previous chunk and this LF are one CRLF line ending.
            text = text[1:]
        self._pending_cr = False
        events: list[ServerSentEvent] = []
        start = 0
        for match in _LINE_END.finditer(text):
            line = self._line + text[start : match.start()]
            self._line = ""
            start = match.end()
            if match.group() == "\r" and start == len(text):
                self._pending_cr = True
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        self._line += text[start:]
        return events

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self.last_event_id,
            retry=self.retry,
        )
        self._event = ""
        self._data = []
        return event
