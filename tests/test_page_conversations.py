"""The page against the server's Sessions API and its Detach and resume, end to end.

Same harness as test_page.py (its fixtures are imported from there): a real server
and a fake upstream in a trio thread, the page in headless Chromium, loopback only,
every wait bounded. test_page.py checks the page's side of both against stand-ins
(`page.route`, `page.route_web_socket`); these check that page and server agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import test_page
from playwright.sync_api import Page, expect
from test_page import Backend, _answers, _open, _send, _wait_answer_done

from conftest import token_for
from fake_upstream import TextReply

# test_page.py's fixtures, shared: one trio thread and one browser per module.
trio_thread = test_page.trio_thread
backend = test_page.backend
browser = test_page.browser
new_page = test_page.new_page
page = test_page.page


def test_conversations_lists_the_users_sessions_newest_first_and_switches(
    backend: Backend, page: Page
) -> None:
    base = backend.start()
    _open(page, base, "trip")
    _send(page, "Plan a trip to Lisbon")
    _wait_answer_done(page, 1)
    nav = page.get_by_role("navigation", name="Conversations")
    nav.get_by_role("button", name="New chat").click()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    _send(page, "A question about taxes")
    _wait_answer_done(page, 1)
    items = nav.get_by_role("listitem")
    expect(items.locator(".conv-title")).to_have_text(
        [re.compile(r"^A question about taxes"), re.compile(r"^Plan a trip to Lisbon")]
    )
    expect(items.first).to_have_attribute("aria-current", "page")
    for item in items.all():
        assert re.match(r"\d{4}-\d\d-\d\dT", item.locator("time").get_attribute("datetime") or "")
    nav.get_by_role("link", name=re.compile("Plan a trip to Lisbon")).click()
    expect(page).to_have_url(re.compile(r"#trip$"))
    expect(page.locator("#transcript .msg.user .body")).to_have_text(["Plan a trip to Lisbon"])
    expect(items.last).to_have_attribute("aria-current", "page")


def test_conversations_shows_a_running_answer(backend: Backend, page: Page) -> None:
    base = backend.start()
    _open(page, base, "running")
    backend.enqueue(TextReply(["slow ", "answer"], delay_s=1.5))
    _send(page, "Take your time")
    nav = page.get_by_role("navigation", name="Conversations")
    current = nav.get_by_role("listitem").filter(has_text="Take your time")
    expect(current).to_contain_text("answering")
    _wait_answer_done(page, 1)
    expect(current).not_to_contain_text("answering")


def test_rename_export_and_delete_a_conversation(
    backend: Backend, page: Page, tmp_path: Path
) -> None:
    base = backend.start()
    _open(page, base, "to-rename")
    _send(page, "hello there")
    _wait_answer_done(page, 1)
    nav = page.get_by_role("navigation", name="Conversations")
    nav.get_by_role("button", name="Rename conversation").click()
    dialog = page.get_by_role("dialog", name="Rename conversation")
    dialog.get_by_label("Title").fill("Greetings")
    dialog.get_by_role("button", name="Save").click()
    expect(nav.locator("[aria-current] .conv-title")).to_have_text("Greetings")
    page.reload()
    expect(nav.locator("[aria-current] .conv-title")).to_have_text("Greetings")  # stored

    with page.expect_download() as download_info:
        nav.get_by_role("button", name="Export conversation").click()
    saved = tmp_path / "export.md"
    download_info.value.save_as(saved)
    assert download_info.value.suggested_filename == "Greetings.md"
    exported = saved.read_text()
    assert "hello there" in exported and "echo: hello there" in exported

    nav.get_by_role("button", name="Delete conversation").click()
    page.get_by_role("dialog", name="Delete conversation").get_by_role(
        "button", name="Delete", exact=True
    ).click()
    expect(page).not_to_have_url(re.compile(r"#to-rename$"))
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(nav.get_by_text("Greetings")).to_have_count(0)
    response = page.request.get(
        f"{base}/api/sessions/to-rename", headers={"Authorization": f"Bearer {token_for('alice')}"}
    )
    assert response.status == 404


def test_reload_mid_answer_continues_the_same_answer_live(backend: Backend, page: Page) -> None:
    base = backend.start()
    _open(page, base, "reload-resume")
    words = [f"w{n} " for n in range(40)]
    backend.enqueue(TextReply(words, delay_s=0.1))
    _send(page, "tell me a long story")
    expect(_answers(page).last).to_contain_text("w3")
    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(_answers(page)).to_have_count(1)
    expect(page.locator("#transcript .msg.streaming")).to_have_count(1)  # still live
    _wait_answer_done(page, 1)
    expect(_answers(page).locator(".body")).to_have_text("".join(words).strip())
    assert _answers(page).get_attribute("data-status") == "completed"
    page.reload()  # and that is what was stored
    _wait_answer_done(page, 1)
    expect(_answers(page).locator(".body")).to_have_text("".join(words).strip())


def test_taken_over_page_used_again_replaces_its_bubble_with_the_replay(
    backend: Backend, new_page: Callable[..., Page]
) -> None:
    base = backend.start()
    first = new_page()
    _open(first, base, "handover")
    words = [f"w{n} " for n in range(40)]
    backend.enqueue(TextReply(words, delay_s=0.1))
    _send(first, "a long answer please")
    expect(_answers(first).last).to_contain_text("w3")
    first.evaluate("window.__bubble = document.querySelector('.msg.assistant')")
    second = new_page()
    _open(second, base, "handover")  # takes the session over: first gets 4009
    expect(first.locator("#status")).to_have_attribute("data-state", "taken-over")
    expect(_answers(second).last).to_contain_text("w3")  # the replay reached it
    first.get_by_role("button", name="Use it here").click()
    expect(first.locator("#status")).to_have_attribute("data-state", "connected")
    _wait_answer_done(first, 1)
    expect(_answers(first).locator(".body")).to_have_text("".join(words).strip())
    assert first.evaluate("document.querySelector('.msg.assistant') === window.__bubble")
