"""A body's content coding (RFC 9110 §8.4), undone in pieces of bounded size.

What it owns: ``content_coding``, which reads a body's ``Content-Encoding`` and names
the one coding we undo ("identity", "gzip" or "deflate"), and ``ContentDecoder``,
which undoes it piece by piece so that its caller can give the event loop a turn
between pieces and a small compressed chunk never inflates in one go. Pure, no I/O.

``agent_client`` reads the upstream's body through it: it asks for identity, but an
upstream may compress anyway. The bound on the inflated payload is the caller's
(``ContentDecoder``'s ``max_bytes``); the size of one piece is ``DECODE_PIECE_BYTES``.

Error handling: everything that goes wrong here raises ``ContentCodingError`` (a
coding we cannot undo, data that is not in its coding, a payload inflating past its
bound), whose message names the failure in the terms of the body.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import httpx

# The body is decoded and parsed at most this much per step of the event loop: 16 KB
# of the costliest SSE (empty comments, ":\n\n") takes ~3 ms to parse here, the same
# as one lean read of an uncompressed body (chat.upstream_transport.LEAN_READ_BYTES).
DECODE_PIECE_BYTES = 16 * 1024

# zlib's window bits for the two content codings we undo (RFC 9110 §8.4.1).
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_DEFLATE_WBITS = zlib.MAX_WBITS


class ContentCodingError(Exception):
    """A body whose content coding we cannot undo: one we do not know, data that is not
    in its coding, or a payload that inflates past its bound."""


def content_coding(headers: httpx.Headers) -> str:
    """The content coding of a body: "identity", "gzip" or "deflate". Raises
    ContentCodingError for any other, and for more than one applied in turn."""
    codings = [c.strip().lower() for c in headers.get_list("content-encoding", split_commas=True)]
    applied = [c for c in codings if c not in ("", "identity")]
    if not applied:
        return "identity"
    if len(applied) == 1 and applied[0] in ("gzip", "x-gzip", "deflate"):
        return "deflate" if applied[0] == "deflate" else "gzip"
    raise ContentCodingError(
        f"body has content coding {', '.join(applied)!r}, which we cannot undo"
    )


class ContentDecoder:
    """The payload of a body in its content coding, in pieces of bounded size.

    Pure, no I/O: ``feed`` takes each raw chunk and returns an iterator over the
    payload it carries, pieces of at most ``piece_bytes`` made one at a time as the
    iterator is advanced, so the caller can give its event loop a turn between
    pieces: a small compressed chunk never inflates in one go. "identity" passes the
    chunk on (cut to size); "gzip" (one member after another) and "deflate" (the zlib
    format) are inflated. Bounded: raises ContentCodingError once the inflated
    payload passes ``max_bytes`` in all, and for data that is not in its coding.
    """

    def __init__(
        self, coding: str, *, max_bytes: int, piece_bytes: int = DECODE_PIECE_BYTES
    ) -> None:
        self.coding = coding
        self._max_bytes = max_bytes
        self._piece_bytes = piece_bytes
        self._inflater: zlib._Decompress | None = None
        if coding != "identity":
            self._inflater = zlib.decompressobj(_GZIP_WBITS if coding == "gzip" else _DEFLATE_WBITS)
        self._inflated_bytes = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.coding == "identity":
            for start in range(0, len(data), self._piece_bytes):
                yield data[start : start + self._piece_bytes]
            return
        pending = data
        while pending and (inflater := self._inflater) is not None:
            try:
                piece = inflater.decompress(pending, self._piece_bytes)
            except zlib.error as exc:
                raise ContentCodingError(f"body is not valid {self.coding}: {exc}") from exc
            pending = inflater.unconsumed_tail
            if inflater.eof:
                if self.coding == "gzip":  # what follows a member is the next member
                    pending = inflater.unused_data
                    self._inflater = zlib.decompressobj(_GZIP_WBITS)
                else:  # nothing after the end of a zlib stream is payload
                    self._inflater = None
            if piece:
                self._inflated_bytes += len(piece)
                if self._inflated_bytes > self._max_bytes:
                    raise ContentCodingError(
                        f"{self.coding} body inflates past {self._max_bytes} bytes"
                    )
                yield piece
