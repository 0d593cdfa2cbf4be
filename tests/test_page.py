"""The bundled chat page (web/), driven in a real headless Chromium with Playwright.

The page is the reference client of the contract, so these tests go through it the
way a user would: type, press Enter, press Stop, answer a tool request, reload, and
watch the server restart underneath it.

Harness: Playwright's sync API needs a thread without an event loop, the server and
the fake upstream need trio. So trio runs in a background thread (`TrioThread`) and
the tests, plain sync functions, call into it with `trio.from_thread`. Every test gets
its own fake upstream and server (`Backend`) on loopback, port 0 (a restart reuses
the port the page knows), and every wait is bounded by Playwright's timeouts
(`WAIT_MS`) or `trio.fail_after`.

Skipped only when Chromium is missing and CI is not set; under CI a missing browser
fails. Screenshots go to $PAGE_SCREENSHOT_DIR or a temporary directory, never the repo.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import API_KEY, JWT_SECRET, token_for
from fake_upstream import FakeUpstream, TextReply, ToolCallReply
from server import ChatServer, Config, run_server

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000
TRIO_WAIT_S = 10.0
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
DECLINED_TOOL_OUTPUT = "The user declined to run this tool."  # as in web/app.js


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if not CHROMIUM.exists() and not _in_ci():
    pytest.skip(
        f"{CHROMIUM} not installed (build/install-browser.sh); under CI=true this fails",
        allow_module_level=True,
    )

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    WebSocket,
    expect,
    sync_playwright,
)

expect.set_options(timeout=WAIT_MS)


# --------------------------------------------------------------------------- harness


class TrioThread:
    """`trio.run` in a daemon thread, holding a root nursery until `close`."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                ready.set()
                await trio.sleep_forever()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        if not ready.wait(TRIO_WAIT_S):
            raise RuntimeError("the trio thread did not start")

    def run(self, afn: Callable[..., Any], *args: Any) -> Any:
        """Run `afn(*args)` in the trio thread, bounded; returns its result."""

        async def bounded() -> Any:
            with trio.fail_after(TRIO_WAIT_S):
                return await afn(*args)

        return trio.from_thread.run(bounded, trio_token=self._token)

    def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        assert self.nursery is not None
        self.run_sync(self.nursery.cancel_scope.cancel)
        self._thread.join(TRIO_WAIT_S)


async def _serve_until_cancelled(
    *, task_status: trio.TaskStatus[tuple[FakeUpstream, trio.Nursery]]
) -> None:
    async with trio.open_nursery() as nursery:
        fake: FakeUpstream = await nursery.start(FakeUpstream().serve)
        task_status.started((fake, nursery))


async def _run_chat_server(
    config: Config, *, task_status: trio.TaskStatus[tuple[ChatServer, trio.Event]]
) -> None:
    stopped = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            server: ChatServer = await nursery.start(run_server, config)
            task_status.started((server, stopped))
    finally:
        stopped.set()


class Backend:
    """One test's fake upstream and chat server, living in the trio thread."""

    def __init__(self, loop: TrioThread, db_path: Path) -> None:
        self._loop = loop
        self._db_path = db_path
        assert loop.nursery is not None
        self.fake, self._nursery = loop.run(loop.nursery.start, _serve_until_cancelled)
        self.server: ChatServer | None = None
        self._stopped: trio.Event | None = None
        self.port = 0

    def start(self, **overrides: Any) -> str:
        """Start the chat server (on the previous port after a stop); its base URL."""
        settings: dict[str, Any] = {
            "port": self.port,
            "db_path": str(self._db_path),
            "jwt_secret": JWT_SECRET,
            "upstream_url": self.fake.base_url,
            "api_key": API_KEY,
            "model": "test-model",
            "instructions": "You are a test agent.",
            "shutdown_grace_s": 2.0,
            **overrides,
        }
        self.server, self._stopped = self._loop.run(
            self._nursery.start, partial(_run_chat_server, Config(**settings))
        )
        assert self.server.port is not None
        self.port = self.server.port
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Graceful shutdown (connections closed with 1001); returns once it is done."""
        assert self.server is not None and self._stopped is not None
        self._loop.run_sync(self.server.shutdown)
        self._loop.run(self._stopped.wait)

    def enqueue(self, *replies: Any) -> None:
        self._loop.run_sync(self.fake.enqueue, *replies)

    def request_body(self, n: int) -> dict[str, Any]:
        """The JSON body of the n-th upstream request (1-based), waiting for it."""
        recorded = self._loop.run(self.fake.wait_for_request, n)
        body: dict[str, Any] = recorded.body
        return body

    def close(self) -> None:
        self._loop.run_sync(self._nursery.cancel_scope.cancel)


@pytest.fixture(scope="module")
def trio_thread() -> Iterator[TrioThread]:
    loop = TrioThread()
    yield loop
    loop.close()


@pytest.fixture
def backend(trio_thread: TrioThread, tmp_path: Path) -> Iterator[Backend]:
    stack = Backend(trio_thread, tmp_path / "chat.db")
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT_MS
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("PAGE_SCREENSHOT_DIR")
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured)
    return tmp_path_factory.mktemp("page-screenshots")


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Open pages in fresh browser contexts (own storage), closed after the test."""
    contexts: list[BrowserContext] = []

    def open_page(**options: Any) -> Page:
        context = browser.new_context(**{"viewport": DESKTOP, **options})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    errors: list[str] = []
    yield open_page
    for context in contexts:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(new_page: Callable[..., Page]) -> Page:
    return new_page()


def _open(page: Page, base_url: str, session: str, token: str | None = None) -> None:
    token = token_for("alice") if token is None else token
    page.goto(f"{base_url}/?token={token}#{session}")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")


def _send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def _answers(page: Page) -> Any:
    return page.locator("#transcript .msg.assistant")


def _wait_answer_done(page: Page, count: int) -> None:
    """Wait until `count` answers are in and none is still streaming."""
    expect(_answers(page)).to_have_count(count)
    expect(page.locator("#transcript .msg.streaming")).to_have_count(0)


MARKDOWN_CHUNKS = [
    "Here is **the plan**:\n\n",
    "- first item\n",
    "- second item\n\n",
    "```python\n",
    "print('hello, world')\n",
    "```\n\n",
    "See [the docs](https://example.com/docs) ",
    "for more.",
]


# --------------------------------------------------------------------------- tests


def test_answer_streams_token_by_token_as_markdown_with_typing_indicator(
    backend: Backend, page: Page, screenshot_dir: Path
) -> None:
    base = backend.start()
    _open(page, base, "markdown")
    backend.enqueue(TextReply(MARKDOWN_CHUNKS, delay_s=0.25))
    _send(page, "What is the plan?")
    answer = _answers(page).last
    expect(answer).to_contain_text("the plan")
    expect(page.locator("#typing")).to_be_visible()
    expect(page.locator("#stop")).to_be_visible()
    assert "for more." not in answer.inner_text()  # streaming, not all at once
    expect(answer).to_contain_text("for more.")
    expect(page.locator("#typing")).to_be_hidden()
    expect(page.locator("#stop")).to_be_hidden()
    body = answer.locator(".body")
    expect(body.locator("strong")).to_have_text("the plan")
    expect(body.locator("ul > li")).to_have_text(["first item", "second item"])
    expect(body.locator("pre > code")).to_contain_text("print('hello, world')")
    link = body.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    assert answer.get_attribute("data-status") == "completed"
    page.screenshot(path=screenshot_dir / "desktop-light.png", full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=screenshot_dir / "desktop-dark.png", full_page=True)


def test_model_html_and_javascript_links_never_run_script(backend: Backend, page: Page) -> None:
    base = backend.start()
    _open(page, base, "xss")
    backend.enqueue(
        TextReply(
            [
                'Look: <img src=x onerror="window.__pwned=1">\n\n',
                "[click me](javascript:window.__pwned=2) ",
                '<a href="JaVaScRiPt:window.__pwned=3">raw link</a>\n\n',
                '<svg><g onload="window.__pwned=4"></g></svg>',
                "<script>window.__pwned=5</script>",
                '<iframe src="javascript:window.__pwned=6"></iframe>',
                '<a href="https://example.com/" onclick="window.__pwned=7">ok</a> end',
            ]
        )
    )
    question = '<img src=y onerror="window.__pwned=8"> is this safe?'
    _send(page, question)
    _wait_answer_done(page, 1)
    for _ in range(2):  # as streamed, then as reloaded from history
        transcript = page.locator("#transcript")
        expect(transcript.locator(".msg.user .body")).to_have_text(question)
        expect(transcript).to_contain_text("click me")
        for link in transcript.locator("a").all():
            link.click(modifiers=["Alt"], no_wait_after=True)  # Alt: no popup
        dangerous = "[onerror], [onload], [onclick], script, iframe, [href^='javascript' i]"
        assert transcript.locator(dangerous).count() == 0
        assert page.evaluate("window.__pwned") is None
        page.reload()
        _wait_answer_done(page, 1)


def test_stop_keeps_partial_answer_marked_stopped_and_reload_shows_statuses(
    backend: Backend, page: Page
) -> None:
    base = backend.start()
    _open(page, base, "stop-and-reload")
    _send(page, "hello")  # the fake echoes: a completed turn
    _wait_answer_done(page, 1)
    backend.enqueue(TextReply([f"word{n} " for n in range(200)], delay_s=0.05))
    _send(page, "talk a lot")
    answer = _answers(page).last
    expect(answer).to_contain_text("word3")
    page.locator("#stop").click()
    expect(answer.locator(".badge")).to_have_text("stopped", timeout=2_000)
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#typing")).to_be_hidden()
    partial_text = answer.locator(".body").inner_text()
    assert "word3" in partial_text and "word199" not in partial_text

    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    messages = page.locator("#transcript .msg")
    expect(messages).to_have_count(4)
    expect(messages.locator(".body")).to_have_text(
        ["hello", "echo: hello", "talk a lot", partial_text]
    )
    statuses = [m.get_attribute("data-status") for m in _answers(page).all()]
    assert statuses == ["completed", "stopped"]
    expect(_answers(page).last.locator(".badge")).to_have_text("stopped")


def test_server_restart_reconnects_with_backoff_and_no_duplicates(
    backend: Backend, page: Page
) -> None:
    base = backend.start()
    _open(page, base, "restart")
    _send(page, "before the restart")
    _wait_answer_done(page, 1)
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    backend.stop()
    expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    page.wait_for_timeout(1_500)
    # Down for 1.5 s: backoff (0.25-0.5 s, then 0.5-1 s, ...) allows at most 3 attempts.
    assert 1 <= len(sockets) <= 3, len(sockets)
    backend.start()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    messages = page.locator("#transcript .msg")
    expect(messages.locator(".body")).to_have_text(
        ["before the restart", "echo: before the restart"]
    )
    _send(page, "after the restart")
    _wait_answer_done(page, 2)
    expect(messages).to_have_count(4)


def test_bad_token_shows_unauthorized_and_is_not_retried(
    backend: Backend, new_page: Callable[..., Page], screenshot_dir: Path
) -> None:
    base = backend.start()
    page = new_page()
    sockets: list[WebSocket] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    page.goto(f"{base}/?token=not-a-valid-token#bad-token")
    expect(page.locator("#status")).to_have_attribute("data-state", "unauthorized")
    expect(page.locator("#notice")).to_contain_text("token was refused")
    expect(page.get_by_label("Access token")).to_be_visible()
    assert "not-a-valid-token" not in page.url  # the token leaves the address bar
    page.wait_for_timeout(2_000)
    assert len(sockets) == 1
    page.screenshot(path=screenshot_dir / "unauthorized.png")
    page.get_by_label("Access token").fill(token_for("alice"))
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.get_by_label("Access token")).to_be_hidden()
    expect(page.locator("#notice")).to_be_hidden()


def test_session_taken_over_in_another_tab_is_explained_not_retried(
    backend: Backend, new_page: Callable[..., Page]
) -> None:
    base = backend.start()
    first = new_page()
    _open(first, base, "shared")
    sockets: list[WebSocket] = []
    first.on("websocket", lambda ws: sockets.append(ws))
    _open(new_page(), base, "shared")
    expect(first.locator("#status")).to_have_attribute("data-state", "taken-over")
    expect(first.locator("#notice")).to_contain_text("opened in another tab")
    first.wait_for_timeout(1_000)
    assert sockets == []


def test_tool_request_is_shown_and_answered_or_declined(
    backend: Backend, page: Page, screenshot_dir: Path
) -> None:
    tool = {
        "type": "function",
        "name": "lookup_order",
        "description": "Look up an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    }
    base = backend.start(tools=[tool])
    _open(page, base, "tools")
    backend.enqueue(
        ToolCallReply([("call_1", "lookup_order", '{"order_id": "A-17"}')]),
        TextReply(["Order A-17 ", "shipped on Monday."]),
    )
    _send(page, "Where is my order A-17?")
    card = page.locator("#transcript .tool")
    expect(card).to_contain_text("lookup_order")
    expect(card.locator(".tool-args")).to_contain_text('"order_id": "A-17"')
    page.screenshot(path=screenshot_dir / "tool-request.png")
    page.get_by_label("Your answer").fill("Shipped Monday by courier")
    page.get_by_role("button", name="Send answer").click()
    expect(card).to_contain_text("You answered: Shipped Monday by courier")
    expect(_answers(page).last).to_contain_text("shipped on Monday.")
    outputs = [item for item in backend.request_body(2)["input"] if isinstance(item, dict)]
    assert {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "Shipped Monday by courier",
    } in outputs

    backend.enqueue(
        ToolCallReply([("call_2", "lookup_order", '{"order_id": "B-2"}')]),
        TextReply(["Fine, I will not look."]),
    )
    _send(page, "And B-2?")
    expect(page.locator("#transcript .tool").last).to_contain_text('"order_id": "B-2"')
    page.get_by_role("button", name="Decline").click()
    expect(_answers(page).last).to_contain_text("Fine, I will not look.")
    outputs = [item for item in backend.request_body(4)["input"] if isinstance(item, dict)]
    assert {
        "type": "function_call_output",
        "call_id": "call_2",
        "output": DECLINED_TOOL_OUTPUT,
    } in outputs


def test_rate_limited_and_queue_full_say_what_to_do(backend: Backend, page: Page) -> None:
    # 1 message per 60 s: reading history on connect costs nothing, so the first
    # message goes through and the second is refused.
    base = backend.start(rate_limit_messages=1, rate_limit_window_s=60.0)
    _open(page, base, "rate")
    _send(page, "one")
    _wait_answer_done(page, 1)
    _send(page, "two")
    expect(page.locator("#notice")).to_contain_text("too fast. Wait a minute")
    refused = page.locator("#transcript .msg.user").last
    expect(refused.locator(".badge")).to_have_text("not sent")
    expect(page.locator("#input")).to_have_value("two")  # nothing typed is lost
    backend.stop()

    base = backend.start(port=0, max_queue=1)
    _open(page, base, "queue")
    backend.enqueue(TextReply(["slow"], start_delay_s=5.0))
    _send(page, "running")
    expect(_answers(page)).to_have_count(1)
    _send(page, "queued")
    _send(page, "one too many")
    expect(page.locator("#notice")).to_contain_text("Too many messages are waiting")
    expect(page.locator("#notice")).to_contain_text("press Stop")
    page.locator("#stop").click()
    expect(_answers(page).last.locator(".badge")).to_have_text("stopped")


def test_enter_sends_and_shift_enter_makes_a_newline(backend: Backend, page: Page) -> None:
    base = backend.start()
    _open(page, base, "keys")
    field = page.get_by_label("Message")
    field.press_sequentially("line one")
    field.press("Shift+Enter")
    field.press_sequentially("line two")
    expect(field).to_have_value("line one\nline two")
    expect(page.locator("#transcript .msg")).to_have_count(0)
    field.press("Enter")
    expect(page.locator("#transcript .msg.user .body")).to_have_text("line one\nline two")
    expect(field).to_have_value("")
    _wait_answer_done(page, 1)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_viewport_fits_without_horizontal_scrolling(
    backend: Backend, new_page: Callable[..., Page], screenshot_dir: Path, scheme: str
) -> None:
    base = backend.start()
    page = new_page(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True,
        color_scheme=scheme,
    )
    _open(page, base, f"phone-{scheme}")
    long_line = "x = " + " + ".join(str(n) for n in range(60))
    backend.enqueue(TextReply([*MARKDOWN_CHUNKS, f"\n\n```\n{long_line}\n```\n"]))
    _send(page, "Show me the plan on my phone, with a long line of code please.")
    _wait_answer_done(page, 1)
    layout = page.evaluate(
        "({scroll: document.documentElement.scrollWidth, width: window.innerWidth})"
    )
    assert layout["scroll"] <= layout["width"], layout
    for control in ("#input", "#send"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    page.screenshot(path=screenshot_dir / f"phone-{scheme}.png", full_page=True)
