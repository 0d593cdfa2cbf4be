"""The wire protocol: frames, their validation and encoding, and the error tree.

This module owns everything a client sees on the WebSocket, and nothing else: it
does no I/O. Text comes in and a typed frame comes out (`parse_client_frame`); a
typed frame goes in and text comes out (`encode`). `docs/protocol.md` is the
client authors' reference for the same rules.

Errors are one tree. Each leaf knows the contract code it becomes, so the server
maps exceptions to frames or close codes in one place (`ChatError.to_frame` and
`CloseError.close_code`)::

    ChatError
    ├── FrameError                 answered with an `error` frame; connection stays open
    │   ├── InvalidMessage         invalid_message
    │   ├── MessageTooLarge        message_too_large
    │   ├── RateLimited            rate_limited
    │   ├── QueueFull              queue_full
    │   ├── DuplicateMessage       duplicate_message
    │   ├── UnknownCallId          unknown_call_id
    │   ├── UpstreamFailed         upstream_error
    │   └── StorageUnavailable     storage_error (the database refused a write)
    └── CloseError                 the connection is closed with `close_code`
        ├── NormalClosure          1000
        ├── PeerGone               1000 (nobody left to send a close frame to)
        ├── ServerShuttingDown     1001
        ├── HeartbeatTimeout       1001 (the peer answered no ping in time)
        ├── FrameTooLarge          1009
        ├── InternalError          1011
        ├── ServerFull             1013
        ├── Unauthorized           4001
        ├── Forbidden              4003
        ├── SlowConsumer           1008 (the client stopped reading; not in the contract table)
        ├── UserConnectionLimit    4008
        ├── TakenOver              4009
        ├── SessionDeleted         4410
        └── InvalidSessionId       4400
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
MAX_CLIENT_MESSAGE_ID_CHARS = 64
MAX_HISTORY_LIMIT = 500
DEFAULT_HISTORY_LIMIT = 100
UPSTREAM_ERROR_TEXT = "I encountered an issue. Please try again."

TurnStatus = Literal["completed", "stopped", "incomplete", "failed", "interrupted"]


def utc_timestamp(at: datetime | None = None) -> str:
    """ISO 8601 in UTC with millisecond precision, e.g. `2026-11-22T10:00:00.123Z`."""
    moment = at or datetime.now(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_valid_session_id(session_id: str) -> bool:
    return SESSION_ID_PATTERN.fullmatch(session_id) is not None


# --------------------------------------------------------------------------- errors


class ChatError(Exception):
    """Base of every error the contract names."""

    message: ClassVar[str] = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)

    @property
    def detail(self) -> str:
        return str(self)


class FrameError(ChatError):
    """An error answered with an `error` frame; the connection stays open."""

    code: ClassVar[str]

    def __init__(self, message: str | None = None, *, turn_id: str | None = None) -> None:
        super().__init__(message)
        self.turn_id = turn_id

    def to_frame(self) -> ErrorFrame:
        return ErrorFrame(code=self.code, message=self.detail, turn_id=self.turn_id)


class InvalidMessage(FrameError):
    code = "invalid_message"
    message = "The frame is not a valid client frame."


class MessageTooLarge(FrameError):
    code = "message_too_large"
    message = "The message content is too long."


class RateLimited(FrameError):
    code = "rate_limited"
    message = "Too many messages; wait a moment and send again."


class QueueFull(FrameError):
    code = "queue_full"
    message = "Too many messages are waiting; wait for the current answer or send stop."


class DuplicateMessage(FrameError):
    code = "duplicate_message"
    message = "A message with this id was already accepted."


class UnknownCallId(FrameError):
    code = "unknown_call_id"
    message = "No tool request is waiting for this call_id."


class UpstreamFailed(FrameError):
    code = "upstream_error"
    message = UPSTREAM_ERROR_TEXT


class StorageUnavailable(FrameError):
    code = "storage_error"
    message = "The server could not use its database; nothing was saved. Please try again."


class CloseError(ChatError):
    """An error that ends the connection with `close_code`."""

    close_code: ClassVar[int]


class NormalClosure(CloseError):
    close_code = 1000
    message = "normal closure"


class PeerGone(CloseError):
    """The client closed or vanished; there is nobody to send a close frame to."""

    close_code = 1000
    message = "peer gone"


class HeartbeatTimeout(CloseError):
    close_code = 1001
    message = "heartbeat timeout"


class ServerShuttingDown(CloseError):
    close_code = 1001
    message = "server shutting down"


class SlowConsumer(CloseError):
    close_code = 1008
    message = "client is not reading"


class FrameTooLarge(CloseError):
    close_code = 1009
    message = "frame too large"


class InternalError(CloseError):
    close_code = 1011
    message = "internal error"


class ServerFull(CloseError):
    close_code = 1013
    message = "server at connection limit"


class Unauthorized(CloseError):
    close_code = 4001
    message = "missing, invalid or expired token"


class Forbidden(CloseError):
    close_code = 4003
    message = "forbidden"


class UserConnectionLimit(CloseError):
    close_code = 4008
    message = "too many connections for this user"


class TakenOver(CloseError):
    close_code = 4009
    message = "session taken over by a newer connection"


class SessionDeleted(CloseError):
    close_code = 4410
    message = "session deleted"


class InvalidSessionId(CloseError):
    close_code = 4400
    message = "invalid session id"


# --------------------------------------------------------------------------- client frames


class _ClientFrame(BaseModel):
    # Strict: "5" is not a limit and 1 is not a content string. Unknown fields are
    # ignored so that newer clients keep working against this server. Deferred: see
    # `validator_builds`.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, defer_build=True)


class UserMessage(_ClientFrame):
    type: Literal["message"]
    content: Annotated[str, Field(min_length=1)]
    id: Annotated[str, Field(min_length=1, max_length=MAX_CLIENT_MESSAGE_ID_CHARS)] | None = None
    metadata: dict[str, Any] | None = None


class StopRequest(_ClientFrame):
    type: Literal["stop"]


class ClientPing(_ClientFrame):
    type: Literal["ping"]


class ClientPong(_ClientFrame):
    type: Literal["pong"]


class ToolResponse(_ClientFrame):
    type: Literal["tool_response"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: str


class HistoryRequest(_ClientFrame):
    type: Literal["history"]
    limit: Annotated[int, Field(ge=1, le=MAX_HISTORY_LIMIT)] = DEFAULT_HISTORY_LIMIT


ClientFrame = Annotated[
    UserMessage | StopRequest | ClientPing | ClientPong | ToolResponse | HistoryRequest,
    Field(discriminator="type"),
]
_client_frame_adapter: TypeAdapter[ClientFrame] = TypeAdapter(
    ClientFrame, config=ConfigDict(defer_build=True)
)


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Validate one WebSocket message. Raises InvalidMessage naming what is wrong.

    Binary frames are invalid by contract, whatever they contain.
    """
    if isinstance(text, bytes):
        raise InvalidMessage("Binary frames are not accepted; send JSON text frames.")
    try:
        return _client_frame_adapter.validate_json(text)
    except ValidationError as exc:
        raise InvalidMessage(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    kind = first["type"]
    if kind == "json_invalid":
        return "The frame is not valid JSON."
    # The first location is the frame type (the union's tag); the field follows it.
    where = ".".join(str(part) for part in first["loc"][1:])
    if kind == "union_tag_not_found":
        return "The frame has no 'type' field."
    if kind == "union_tag_invalid":
        return "Unknown frame type."
    if not first["loc"]:
        return "The frame must be a JSON object."
    return f"Invalid field '{where}': {first['msg']}."


# --------------------------------------------------------------------------- server frames


class _ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)  # see `validator_builds`


class Connected(_ServerFrame):
    type: Literal["connected"] = "connected"
    session_id: str
    user_id: str
    timestamp: str
    resumed: bool
    history_length: int


class Typing(_ServerFrame):
    type: Literal["typing"] = "typing"
    is_typing: bool


class ResponseStart(_ServerFrame):
    type: Literal["response_start"] = "response_start"
    turn_id: str
    message_id: str | None
    # A running turn replayed to a connection that attached while it ran.
    resumed: bool = False


class TextDeltaFrame(_ServerFrame):
    type: Literal["text_delta"] = "text_delta"
    turn_id: str
    content: str


class ToolRequest(_ServerFrame):
    type: Literal["tool_request"] = "tool_request"
    turn_id: str
    call_id: str
    name: str
    arguments: dict[str, Any]


class ResponseEnd(_ServerFrame):
    type: Literal["response_end"] = "response_end"
    turn_id: str
    full_content: str
    status: TurnStatus
    response_id: str | None


class HistoryEntry(_ServerFrame):
    """One stored message. Tool entries add name, call_id, arguments and output."""

    id: int
    role: Literal["user", "assistant", "tool"]
    content: str
    status: str | None
    timestamp: str
    name: str | None = None
    call_id: str | None = None
    arguments: dict[str, Any] | None = None
    output: str | None = None

    @model_serializer(mode="wrap")
    def _tool_fields_only_on_tool_entries(
        self, handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.role != "tool":
            for name in _TOOL_ONLY_FIELDS:
                data.pop(name, None)
        return data


_TOOL_ONLY_FIELDS = ("name", "call_id", "arguments", "output")


class HistoryReply(_ServerFrame):
    type: Literal["history"] = "history"
    messages: list[HistoryEntry]


class ErrorFrame(_ServerFrame):
    type: Literal["error"] = "error"
    code: str
    message: str
    turn_id: str | None = None


class ServerPing(_ServerFrame):
    type: Literal["ping"] = "ping"
    timestamp: str


class ServerPong(_ServerFrame):
    type: Literal["pong"] = "pong"
    timestamp: str


ServerFrame = (
    Connected
    | Typing
    | ResponseStart
    | TextDeltaFrame
    | ToolRequest
    | ResponseEnd
    | HistoryReply
    | ErrorFrame
    | ServerPing
    | ServerPong
)


_server_frame_adapter: TypeAdapter[ServerFrame] = TypeAdapter(
    Annotated[ServerFrame, Field(discriminator="type")], config=ConfigDict(defer_build=True)
)


_FRAME_MODELS: tuple[type[BaseModel], ...] = (
    UserMessage,
    StopRequest,
    ClientPing,
    ClientPong,
    ToolResponse,
    HistoryRequest,
    Connected,
    Typing,
    ResponseStart,
    TextDeltaFrame,
    ToolRequest,
    ResponseEnd,
    HistoryEntry,
    HistoryReply,
    ErrorFrame,
    ServerPing,
    ServerPong,
)


def validator_builds() -> list[Callable[[], object]]:
    """Building every frame's validator and serializer: one call per model or adapter.

    Each is otherwise built where it is first used (``defer_build``): building them all
    at import was about two thirds of this module's import, and the first one also
    imports much of pydantic and looks for its plugins, all before the server could
    listen. The server makes these calls right after it listens, one per pass of its
    loop (`server.warm_up`), so the first frames do not pay for them."""
    return [
        *(model.model_rebuild for model in _FRAME_MODELS),
        _client_frame_adapter.rebuild,
        _server_frame_adapter.rebuild,
    ]


def decode_server_frame(document: object) -> ServerFrame:
    """A server frame from its JSON object, as another instance relayed it. Raises
    pydantic.ValidationError."""
    return _server_frame_adapter.validate_python(document)


def encode(frame: ServerFrame) -> str:
    """One server frame as JSON text."""
    return frame.model_dump_json()


def encode_text_delta(turn_id: str, content: str) -> str:
    """A `text_delta` frame as JSON text, without building a model: the same JSON as
    `encode(TextDeltaFrame(...))`, on the path every token of every answer takes."""
    return _text_delta_prefix(turn_id) + _json_string(content) + "}"


@functools.lru_cache(maxsize=1024)
def _text_delta_prefix(turn_id: str) -> str:
    return f'{{"type":"text_delta","turn_id":{_json_string(turn_id)},"content":'


# json.dumps with options builds an encoder per call; this one is built once and
# takes its C fast path for strings.
_json_string = json.JSONEncoder(ensure_ascii=False).encode
