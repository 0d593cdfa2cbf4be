"""Server-sent events framing (the WHATWG ``text/event-stream`` format), bytes in, the
data of each event out.

What it owns: ``SSEParser``, pure and with no I/O, which ``agent_client`` feeds the
upstream's body with (its content coding already undone, ``chat.content_coding``) and
whose event data it then maps to its own events.

Error handling: an event that grows past its bound without ending raises
``SSEEventTooLarge``; nothing else fails (bytes that are not UTF-8 are replaced).
"""

from __future__ import annotations


class SSEEventTooLarge(Exception):
    """An event grew past the parser's ``max_event_bytes`` without ending."""


class SSEParser:
    """Server-sent events (the WHATWG ``text/event-stream`` format) from raw bytes.

    Pure, no I/O: ``feed`` takes each network chunk and returns the data of every
    event the chunk completes, so the caller sees which events arrived together.
    Lines may end in LF, CRLF or CR; ``data`` lines are joined with LF, other
    fields and comments (keep-alives) are skipped, and an unfinished event at the
    end of the stream is dropped, as the standard says. Events with no data carry
    nothing for us and are not returned.
    Bounded: an event that grows past ``max_event_bytes`` without ending raises
    SSEEventTooLarge (at most that plus one chunk is ever buffered).
    """

    def __init__(self, max_event_bytes: int) -> None:
        self._max_event_bytes = max_event_bytes
        self._pending = b""  # the unfinished event, line ends already LF
        self._cr_held = False  # the last chunk ended in CR: the next may start with its LF
        self._at_start = True

    def feed(self, chunk: bytes) -> list[str]:
        if self._at_start and chunk:
            self._at_start = False
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        if self._cr_held:
            chunk, self._cr_held = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr_held = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._pending + chunk
        events: list[str] = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            data = _event_data(buffer[start:end])
            if data:
                events.append(data)
            start = end + 2
        self._pending = buffer[start:]
        if len(self._pending) > self._max_event_bytes:
            raise SSEEventTooLarge(
                f"SSE event exceeds {self._max_event_bytes} bytes without ending"
            )
        return events


def _event_data(block: bytes) -> str | None:
    """The data of one event's lines (LF-separated, no blank line among them but
    perhaps leading ones), or None if it has no data field."""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data"):
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    # Event boundaries are ASCII, so no UTF-8 sequence is ever cut between events.
    return b"\n".join(data).decode("utf-8", errors="replace")
