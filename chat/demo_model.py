"""The demo transport and the synthetic streams the fakes reuse.

Owns the offline demo model (``DemoModelTransport``: an httpx transport that answers
``POST .../responses`` itself, so the server runs without an API key) and the pure
helpers that synthesise a Responses API text stream shaped like the recordings in
``../shared/upstream-recordings/`` (``text_response_events``, ``encode_sse``,
``last_user_text``). The test fake upstream, the benchmark's fake and the soak reuse
the helpers, so every fake speaks the same wire format as the demo.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import trio

# Pace of the offline demo model: fast enough to be pleasant, slow enough to see
# streaming (and to have something to stop).
DEMO_WORD_INTERVAL_S = 0.04
# The demo echoes this much of the user's message at most.
DEMO_ECHO_CHARS = 200


def encode_sse(event: Mapping[str, Any]) -> bytes:
    """Frame one event the way the real upstream does: ``event:`` line, compact JSON."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def text_response_events(
    response_id: str,
    model: str,
    text_chunks: list[str],
    *,
    created_at: int = 0,
    previous_response_id: str | None = None,
) -> list[dict[str, Any]]:
    """The full event sequence of a one-message text answer, shaped like the recordings.

    Pure: ids derive from ``response_id``; pass ``created_at`` for a real timestamp, and
    the request's ``previous_response_id``, which the real API echoes (a chain whose id
    is not echoed is taken for one the upstream ignored: agent_client, "Chaining").
    """
    item_id = "msg_" + response_id.removeprefix("resp_")
    text = "".join(text_chunks)
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }
    place = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": output,
            "previous_response_id": previous_response_id,
            "store": True,
            "usage": None
            if status == "in_progress"
            else {"input_tokens": 0, "output_tokens": len(text_chunks)},
        }

    bodies: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("in_progress", [])},
        {"type": "response.in_progress", "response": response("in_progress", [])},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item_done, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **place, "part": {**part_done, "text": ""}},
        *(
            {"type": "response.output_text.delta", **place, "delta": chunk, "logprobs": []}
            for chunk in text_chunks
        ),
        {"type": "response.output_text.done", **place, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": part_done},
        {"type": "response.output_item.done", "output_index": 0, "item": item_done},
        {"type": "response.completed", "response": response("completed", [item_done])},
    ]
    return [
        {"type": body["type"], "sequence_number": number, **body}
        for number, body in enumerate(bodies)
    ]


def last_user_text(items: object) -> str:
    """Text of the last user message in a Responses API ``input`` (string or items)."""
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return ""
    for item in reversed(items):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return ""


def previous_response_id_of(body: object) -> str | None:
    """The ``previous_response_id`` of a Responses API request body, if it is a string:
    what an answer's response object echoes."""
    chained = body.get("previous_response_id") if isinstance(body, dict) else None
    return chained if isinstance(chained, str) else None


class _PacedSSEStream(httpx.AsyncByteStream):
    """Encodes events on demand, pausing before each text delta.

    An iterator object rather than an async generator, so a reader that stops
    early (a stopped turn) leaves nothing for trio's garbage-collection warning.
    """

    def __init__(self, events: list[dict[str, Any]], word_interval_s: float) -> None:
        self._events = iter(events)
        self._word_interval_s = word_interval_s

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        event = next(self._events, None)
        if event is None:
            raise StopAsyncIteration
        if event["type"] == "response.output_text.delta":
            await trio.sleep(self._word_interval_s)
        return encode_sse(event)


class DemoModelTransport(httpx.AsyncBaseTransport):
    """Offline demo model for running the server without an API key.

    Answers ``POST .../responses`` with a streamed, correctly shaped Responses
    API text answer that echoes the last user message and says it is a demo.
    Anything else gets a 404 JSON error, as the real API would.
    """

    def __init__(self, *, word_interval_s: float = DEMO_WORD_INTERVAL_S) -> None:
        self._word_interval_s = word_interval_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("/responses"):
            return httpx.Response(
                404, json={"error": {"code": "not_found", "message": "demo model: no such route"}}
            )
        try:
            body = json.loads(await request.aread())
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            body = None
        if not isinstance(body, dict):
            return httpx.Response(
                400, json={"error": {"code": "invalid_json", "message": "body is not JSON"}}
            )
        said = last_user_text(body.get("input")).strip() or "(nothing)"
        if len(said) > DEMO_ECHO_CHARS:
            said = said[:DEMO_ECHO_CHARS] + "…"
        text = (
            f"**(offline demo model)** You said: «{said}».\n\n"
            "Set `OPENAI_API_KEY` or `--upstream-url` to talk to a *real* model."
        )
        events = text_response_events(
            f"resp_demo_{secrets.token_hex(12)}",
            str(body.get("model", "demo")),
            re.findall(r"\s*\S+", text),
            created_at=int(time.time()),
            previous_response_id=previous_response_id_of(body),
        )
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_PacedSSEStream(events, self._word_interval_s),
        )
