"""Client-side tools: the agent asks mid-turn, the client answers, the same turn goes on.

Every test drives the real server over a real socket against the fake upstream
replaying function-call streams shaped like recordings 03-05.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agent_client import TOOL_CANCELLED_OUTPUT
from chat.settings import ConfigError, load_tools
from conftest import ChatClient, open_chat
from fake_upstream import FakeUpstream, TextReply, ToolCallReply
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]
EXAMPLE_TOOLS = Path(__file__).resolve().parents[1] / "docs" / "tools.example.json"


@pytest.fixture
async def tool_server(start_server: StartServer) -> ChatServer:
    return await start_server(tools=load_tools(str(EXAMPLE_TOOLS)))


def _outputs(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i["call_id"], i["output"]) for i in body["input"]
            if i.get("type") == "function_call_output"]


# ------------------------------------------------------------------ the tools file


def test_example_tools_file_loads_as_function_tools() -> None:
    tools = load_tools(str(EXAMPLE_TOOLS))
    assert [t["name"] for t in tools] == ["ask_user", "get_client_time", "get_page_context"]
    assert all(t["type"] == "function" and t["parameters"]["type"] == "object" for t in tools)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("not json", "cannot read JSON"),
        ('{"name": "x"}', "must be a JSON list"),
        ('[{"description": "no name"}]', "tool #0 (unnamed): name"),
        ('[{"name": "ok"}, {"name": "bad name!"}]', "tool #1"),
        ('[{"name": "a", "parameters": {"type": "string"}}]', "tool #0 (a): parameters"),
        ('[{"name": "a"}, {"name": "a"}]', "duplicate name 'a'"),
        ('[{"name": "a", "colour": "red"}]', "tool #0 (a): colour"),
    ],
)
def test_bad_tools_file_is_refused_naming_the_entry(
    tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "tools.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_tools(str(path))
    assert complaint in str(refused.value)


# ------------------------------------------------------------------ one turn, several calls


async def test_tool_request_answer_and_the_same_turn_continues(
    tool_server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(
        ToolCallReply([("call_1", "get_client_time", "{}")], text_before="Let me check. ",
                      response_id="resp_round1"),
        TextReply(["It is ", "noon."], response_id="resp_round2"),
    )
    async with open_chat(tool_server) as client:
        await client.send(type="message", content="what time is it?")
        frames = await client.receive_until("tool_request")
        request = frames[-1]
        await client.send(type="tool_response", call_id="call_1", content="2026-11-22T12:00+01:00")
        rest = await client.turn()
    turn_id = frames[1]["turn_id"]
    assert request == {"type": "tool_request", "turn_id": turn_id, "call_id": "call_1",
                       "name": "get_client_time", "arguments": {}}
    assert all(f.get("turn_id", turn_id) == turn_id for f in rest)
    end = rest[-2]
    assert end["status"] == "completed" and end["response_id"] == "resp_round2"
    assert end["full_content"] == "Let me check. It is noon."
    second = fake.requests[1].body
    assert second["previous_response_id"] == "resp_round1"
    assert second["input"] == [{"type": "function_call_output", "call_id": "call_1",
                                "output": "2026-11-22T12:00+01:00"}]
    assert second["tools"] == fake.requests[0].body["tools"]


async def test_parallel_calls_each_get_a_request_and_outputs_go_back_together(
    tool_server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(
        ToolCallReply([("call_a", "ask_user", '{"question": "Which city?"}'),
                       ("call_b", "get_page_context", '{"include_selection": true}')]),
        TextReply(["Thanks."]),
    )
    async with open_chat(tool_server) as client:
        await client.send(type="message", content="weather?")
        first = (await client.receive_until("tool_request"))[-1]
        second = (await client.receive_until("tool_request"))[-1]
        assert [first["call_id"], second["call_id"]] == ["call_a", "call_b"]
        assert first["arguments"] == {"question": "Which city?"}
        assert second["arguments"] == {"include_selection": True}
        await client.send(type="tool_response", call_id="call_b", content="page: docs")
        await client.send(type="tool_response", call_id="call_a", content="Paris")
        end = (await client.turn())[-2]
    assert end["status"] == "completed"
    assert _outputs(fake.requests[1].body) == [("call_a", "Paris"), ("call_b", "page: docs")]


async def test_several_tool_rounds_in_one_turn(tool_server: ChatServer, fake: FakeUpstream) -> None:
    fake.enqueue(
        ToolCallReply([("c1", "ask_user", '{"question": "Name?"}')], response_id="r1"),
        ToolCallReply([("c2", "ask_user", '{"question": "Age?"}')], response_id="r2"),
        TextReply(["Hello Ada, 36."], response_id="r3"),
    )
    async with open_chat(tool_server) as client:
        await client.send(type="message", content="greet me")
        for call_id, answer in (("c1", "Ada"), ("c2", "36")):
            assert (await client.receive_until("tool_request"))[-1]["call_id"] == call_id
            await client.send(type="tool_response", call_id=call_id, content=answer)
        end = (await client.turn())[-2]
        await client.send(type="history")
        history = (await client.receive_until("history"))[-1]["messages"]
    assert end["full_content"] == "Hello Ada, 36." and end["response_id"] == "r3"
    assert [r.body.get("previous_response_id") for r in fake.requests] == [None, "r1", "r2"]
    tools = [m for m in history if m["role"] == "tool"]
    assert [(t["name"], t["call_id"], t["arguments"], t["output"]) for t in tools] == [
        ("ask_user", "c1", {"question": "Name?"}, "Ada"),
        ("ask_user", "c2", {"question": "Age?"}, "36"),
    ]
    assert [m["role"] for m in history] == ["user", "tool", "tool", "assistant"]


async def test_tool_timeout_tells_the_model_and_late_answer_is_unknown(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)), tool_timeout_s=0.3)
    fake.enqueue(ToolCallReply([("slow", "get_client_time", "{}")]), TextReply(["No clock."]))
    async with open_chat(server) as client:
        await client.send(type="message", content="time?")
        await client.receive_until("tool_request")
        end = (await client.turn())[-2]
        await client.send(type="tool_response", call_id="slow", content="too late")
        error = (await client.receive_until("error"))[-1]
    assert end["status"] == "completed" and end["full_content"] == "No clock."
    [(call_id, output)] = _outputs(fake.requests[1].body)
    assert call_id == "slow" and "timed out" in output
    assert error["code"] == "unknown_call_id"


async def test_answering_twice_or_an_unknown_call_id_is_refused(
    tool_server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(ToolCallReply([("once", "get_client_time", "{}")]),
                 TextReply(["ok"], start_delay_s=0.5))
    async with open_chat(tool_server) as client:
        await client.send(type="tool_response", call_id="nobody", content="x")
        assert (await client.receive_until("error"))[-1]["code"] == "unknown_call_id"
        await client.send(type="message", content="time?")
        await client.receive_until("tool_request")
        await client.send(type="tool_response", call_id="once", content="noon")
        await client.send(type="tool_response", call_id="once", content="noon again")
        frames = await client.receive_until("error")
        assert frames[-1]["code"] == "unknown_call_id"
        end = (await client.turn())[-2]
    assert end["status"] == "completed"
    assert _outputs(fake.requests[1].body) == [("once", "noon")]


async def test_arguments_that_are_not_json_do_not_crash_the_turn(
    tool_server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(ToolCallReply([("broken", "ask_user", '{"question": ')]),
                 TextReply(["Sorry, let me rephrase."]))
    async with open_chat(tool_server) as client:
        await client.send(type="message", content="hi")
        frames = await client.turn()
    assert not [f for f in frames if f["type"] == "tool_request"]
    assert frames[-2]["status"] == "completed"
    [(call_id, output)] = _outputs(fake.requests[1].body)
    assert call_id == "broken" and "not a valid JSON" in output


# ------------------------------------------------------------------ stop and disconnect


async def _waiting_for_tool(client: ChatClient, fake: FakeUpstream, call_id: str) -> None:
    fake.enqueue(ToolCallReply([(call_id, "ask_user", '{"question": "Sure?"}')],
                               text_before="Hmm. "))
    await client.send(type="message", content="do it")
    await client.receive_until("tool_request")


async def test_stop_while_waiting_for_a_tool_and_next_context_stays_valid(
    tool_server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["Hello."], response_id="resp_before"))
    async with open_chat(tool_server) as client:
        await client.send(type="message", content="hi")
        await client.turn()
        await _waiting_for_tool(client, fake, "pending_call")
        stopped_at = trio.current_time()
        await client.send(type="stop")
        end = (await client.receive_until("response_end"))[-1]
        assert trio.current_time() - stopped_at < 1.0
        await client.receive_until("typing")
        await client.send(type="message", content="never mind")
        await client.turn()
    assert end["status"] == "stopped" and end["full_content"] == "Hmm. "
    body = fake.requests[-1].body
    assert body["previous_response_id"] == "resp_before"
    assert body["input"] == [
        {"role": "user", "content": "do it"},
        {"type": "function_call", "call_id": "pending_call", "name": "ask_user",
         "arguments": '{"question": "Sure?"}'},
        {"type": "function_call_output", "call_id": "pending_call",
         "output": TOOL_CANCELLED_OUTPUT},
        {"role": "assistant", "content": "Hmm. "},
        {"role": "user", "content": "never mind"},
    ]


async def test_disconnect_without_grace_while_waiting_for_a_tool_stores_interrupted(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    tool_server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)), detach_grace_s=0)
    async with open_chat(tool_server, "tools-vanish") as client:
        await _waiting_for_tool(client, fake, "orphan")
        await client.ws._stream.aclose()
    async with open_chat(tool_server, "tools-vanish") as client:
        await client.send(type="history")
        history = (await client.receive_until("history"))[-1]["messages"]
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", None), ("tool", "interrupted"), ("assistant", "interrupted")]
    assert history[1]["call_id"] == "orphan" and history[1]["output"] == TOOL_CANCELLED_OUTPUT


async def test_no_store_mode_rebuilds_context_with_tool_items(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)), upstream_store=False)
    fake.enqueue(ToolCallReply([("c1", "get_client_time", "{}")], text_before="Checking. "),
                 TextReply(["Noon."]), TextReply(["Bye."]))
    async with open_chat(server) as client:
        await client.send(type="message", content="time?")
        await client.receive_until("tool_request")
        await client.send(type="tool_response", call_id="c1", content="12:00")
        await client.turn()
        await client.send(type="message", content="thanks")
        await client.turn()
    call = {"type": "function_call", "call_id": "c1", "name": "get_client_time",
            "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "12:00"}
    round_two, next_turn = fake.requests[1].body, fake.requests[2].body
    assert round_two.get("previous_response_id") is None
    assert round_two["input"] == [{"role": "user", "content": "time?"},
                                  {"role": "assistant", "content": "Checking. "}, call, output]
    assert next_turn["input"] == [
        {"role": "user", "content": "time?"}, call, output,
        {"role": "assistant", "content": "Checking. Noon."},
        {"role": "user", "content": "thanks"},
    ]
