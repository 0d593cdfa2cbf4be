"""Text in PostgreSQL: every string written or read, escaped so that any text
round-trips.

PostgreSQL's text cannot hold U+0000, which SQLite stores and a client may send. This
module owns `escape_text` and `unescape_text`, which write U+0000 as U+FFFF "0" and
U+FFFF as U+FFFF "1" (a noncharacter; nothing else changes, so ordinary text is
stored as it is), and `register_text_escaping`, which routes every string parameter
and text result of a connection through them (psycopg dumpers and loaders);
`chat.postgres_connections` registers it on every connection it opens.
"""

from __future__ import annotations

import psycopg
from psycopg.adapt import Buffer
from psycopg.rows import TupleRow
from psycopg.types.string import (
    StrBinaryDumper,
    StrDumper,
    StrDumperUnknown,
    TextBinaryLoader,
    TextLoader,
)

_ESCAPE = "\uffff"  # a noncharacter: no text a person or a model writes holds it


def escape_text(text: str) -> str:
    """`text` as stored: U+0000 (which PostgreSQL's text refuses) as U+FFFF "0", and
    U+FFFF itself as U+FFFF "1". Text without either is stored unchanged."""
    if "\x00" not in text and _ESCAPE not in text:
        return text
    return text.replace(_ESCAPE, _ESCAPE + "1").replace("\x00", _ESCAPE + "0")


def unescape_text(stored: str) -> str:
    """The inverse of `escape_text`. An escape cut off at the end (by `substr`) is
    dropped."""
    if _ESCAPE not in stored:
        return stored
    head, *escaped = stored.split(_ESCAPE)
    decoded = {"0": "\x00", "1": _ESCAPE}
    return head + "".join(decoded.get(part[:1], "") + part[1:] for part in escaped)


class _EscapingStrDumper(StrDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape_text(obj))


class _EscapingStrDumperUnknown(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape_text(obj))


class _EscapingStrBinaryDumper(StrBinaryDumper):
    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape_text(obj))


class _UnescapingTextLoader(TextLoader):
    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)
        return unescape_text(text) if isinstance(text, str) else text


class _UnescapingTextBinaryLoader(TextBinaryLoader):
    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)
        return unescape_text(text) if isinstance(text, str) else text


def register_text_escaping(connection: psycopg.Connection[TupleRow]) -> None:
    """Route every string parameter and text result of `connection` through
    `escape_text` and `unescape_text`. The order matters: the last dumper registered
    for str is the default (psycopg's own order: text-oid, then unknown-oid)."""
    adapters = connection.adapters
    adapters.register_dumper(str, _EscapingStrBinaryDumper)
    adapters.register_dumper(str, _EscapingStrDumper)
    adapters.register_dumper(str, _EscapingStrDumperUnknown)
    for type_name in ("text", "varchar", "bpchar"):
        adapters.register_loader(type_name, _UnescapingTextLoader)
        adapters.register_loader(type_name, _UnescapingTextBinaryLoader)
