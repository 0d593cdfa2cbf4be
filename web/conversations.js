// The "Conversations" navigation: the user's sessions from the Sessions API (see the
// contract), and rename, delete and export of the open one. Owns every HTTP request
// the page makes. A server without the Sessions API (404) leaves the list empty and is
// not asked again until the page reloads; other failures keep the last list.

import { element, timeElement } from "/web/transcript.js";

const PAGE_SIZE = 50;
const MAX_TITLE_CHARS = 200;

const $ = (id) => document.getElementById(id);

export class Conversations {
  /**
   * `app`: { token(): string|null, sessionId(): string, open(id), newChat(), notice(text) }
   */
  constructor(app) {
    this.app = app;
    this.nav = $("conversations");
    this.list = $("conversation-list");
    this.more = $("more-conversations");
    this.toggle = $("show-conversations");
    this.renameDialog = $("rename-dialog");
    this.renameForm = $("rename-form");
    this.renameInput = $("rename-title");
    this.deleteDialog = $("delete-dialog");
    this.deleteText = $("delete-text");
    this.available = true; // until the server says 404
    this.sessions = [];
    this.nextCursor = null;
    this.loading = null;
    this.refreshAgain = false;
    this.wire();
  }

  wire() {
    $("new-chat").addEventListener("click", () => {
      this.close();
      this.app.newChat();
    });
    this.toggle.addEventListener("click", () => (this.isOpen() ? this.close() : this.openDrawer()));
    this.more.addEventListener("click", () => this.loadMore());
    this.list.addEventListener("click", (event) => {
      const target = event.target.closest("button, a");
      if (!target) return;
      if (target.matches("a.conv-link")) {
        this.close();
        return; // the link's #id switches sessions (hashchange)
      }
      const action = target.dataset.action;
      if (action === "rename") this.askRename();
      else if (action === "delete") this.askDelete();
      else if (action === "export") this.exportMarkdown();
    });
    this.renameForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.rename(this.renameInput.value.trim());
    });
    $("rename-cancel").addEventListener("click", () => this.renameDialog.close());
    $("delete-confirm").addEventListener("click", () => this.remove());
    $("delete-cancel").addEventListener("click", () => this.deleteDialog.close());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.isOpen()) {
        this.close();
        this.toggle.focus();
      }
    });
  }

  // ------------------------------------------------------------ phone drawer

  isOpen() {
    return this.nav.classList.contains("open");
  }

  openDrawer() {
    this.nav.classList.add("open");
    this.toggle.setAttribute("aria-expanded", "true");
    (this.nav.querySelector("[aria-current] a") ?? $("new-chat")).focus();
  }

  close() {
    if (!this.isOpen()) return;
    this.nav.classList.remove("open");
    this.toggle.setAttribute("aria-expanded", "false");
  }

  // ------------------------------------------------------------ the list

  async request(path, options = {}) {
    const token = this.app.token();
    if (!token) return null;
    const headers = { Authorization: `Bearer ${token}`, ...(options.headers ?? {}) };
    return fetch(path, { ...options, headers, cache: "no-store", referrerPolicy: "no-referrer" });
  }

  /** Reload the first page of the list. Calls while a load runs fold into one more. */
  async refresh() {
    if (!this.available) return;
    if (this.loading) {
      this.refreshAgain = true;
      return;
    }
    this.loading = this.fetchPage(null);
    try {
      const page = await this.loading;
      if (page) {
        this.sessions = page.sessions;
        this.nextCursor = page.next_cursor ?? null;
        this.render();
      }
    } finally {
      this.loading = null;
    }
    if (this.refreshAgain) {
      this.refreshAgain = false;
      this.refresh();
    }
  }

  async loadMore() {
    if (!this.nextCursor) return;
    const page = await this.fetchPage(this.nextCursor);
    if (!page) return;
    const known = new Set(this.sessions.map((s) => s.id));
    this.sessions.push(...page.sessions.filter((s) => !known.has(s.id)));
    this.nextCursor = page.next_cursor ?? null;
    this.render();
  }

  async fetchPage(cursor) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (cursor) query.set("cursor", cursor);
    let response;
    try {
      response = await this.request(`/api/sessions?${query}`);
    } catch {
      return null; // offline: keep what we show
    }
    if (!response) return null;
    if (response.status === 404) {
      this.available = false; // a server without the Sessions API
      this.sessions = [];
      this.render();
      return null;
    }
    if (!response.ok) return null;
    try {
      const page = await response.json();
      return Array.isArray(page.sessions) ? page : null;
    } catch {
      return null;
    }
  }

  current() {
    return this.sessions.find((s) => s.id === this.app.sessionId()) ?? null;
  }

  render() {
    this.nav.dataset.available = String(this.available);
    const items = this.sessions.map((session) => this.item(session));
    this.list.replaceChildren(...items);
    this.list.hidden = items.length === 0;
    this.more.hidden = !this.nextCursor;
  }

  item(session) {
    const li = element("li", "conv");
    const link = element("a", "conv-link");
    link.href = `#${encodeURIComponent(session.id)}`;
    const title = element("span", "conv-title", session.title || "Untitled conversation");
    title.dir = "auto";
    const info = element("span", "conv-meta");
    if (session.updated_at) info.append(timeElement(session.updated_at));
    if (session.running) {
      const running = element("span", "conv-running", "answering");
      running.title = "An answer is being written";
      info.append(running);
    }
    link.append(title, info);
    li.append(link);
    if (session.id === this.app.sessionId()) {
      li.setAttribute("aria-current", "page");
      link.setAttribute("aria-current", "page");
      const actions = element("div", "conv-actions");
      for (const [action, text, label] of [
        ["rename", "Rename", "Rename conversation"],
        ["export", "Export", "Export conversation"],
        ["delete", "Delete", "Delete conversation"],
      ]) {
        const button = element("button", "quiet", text);
        button.type = "button";
        button.dataset.action = action;
        button.setAttribute("aria-label", label);
        actions.append(button);
      }
      li.append(actions);
    }
    return li;
  }

  // ------------------------------------------------------------ actions

  askRename() {
    const session = this.current();
    if (!session) return;
    this.renameInput.value = session.title ?? "";
    this.renameInput.maxLength = MAX_TITLE_CHARS;
    this.renameDialog.showModal();
    this.renameInput.select();
  }

  async rename(title) {
    const session = this.current();
    if (!session || !title) return;
    const response = await this.send(`/api/sessions/${encodeURIComponent(session.id)}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ title }),
    });
    this.renameDialog.close();
    if (response?.ok) {
      session.title = title;
      this.render();
      this.refresh();
    } else {
      this.app.notice("The conversation could not be renamed. Please try again.");
    }
  }

  askDelete() {
    const session = this.current();
    if (!session) return;
    this.deleteText.textContent =
      `Delete “${session.title || "Untitled conversation"}”? Its messages are deleted for good.`;
    this.deleteDialog.showModal();
  }

  async remove() {
    const session = this.current();
    this.deleteDialog.close();
    if (!session) return;
    const response = await this.send(`/api/sessions/${encodeURIComponent(session.id)}`, {
      method: "DELETE",
    });
    if (response && (response.ok || response.status === 404)) {
      this.sessions = this.sessions.filter((s) => s.id !== session.id);
      this.render();
      if (session.id === this.app.sessionId()) this.app.newChat();
      this.refresh();
    } else {
      this.app.notice("The conversation could not be deleted. Please try again.");
    }
  }

  async exportMarkdown() {
    const session = this.current();
    if (!session) return;
    const id = encodeURIComponent(session.id);
    const response = await this.send(`/api/sessions/${id}/export?format=markdown`);
    if (!response?.ok) {
      this.app.notice("The conversation could not be exported. Please try again.");
      return;
    }
    const blob = new Blob([await response.text()], { type: "text/markdown" });
    const url = URL.createObjectURL(blob);
    const link = element("a");
    link.href = url;
    link.download = `${fileName(session.title || session.id)}.md`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  async send(path, options) {
    try {
      return await this.request(path, options);
    } catch {
      return null;
    }
  }
}

function fileName(title) {
  return title.replace(/[\\/:*?"<>|\u0000-\u001f]+/g, " ").trim().slice(0, 80) || "conversation";
}
