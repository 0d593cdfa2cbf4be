// The bundled chat page: a reference client of docs' wire contract (PROTOCOL.md).
// One ES module, no framework, no build step. Markdown goes through `marked`, and
// every piece of HTML it makes goes through DOMPurify before it touches the DOM.

import { marked } from "/web/vendor/marked/marked.esm.js";
import DOMPurify from "/web/vendor/dompurify/purify.es.js";

const SESSION_ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;
const TOKEN_STORAGE_KEY = "chat.token";
const HISTORY_LIMIT = 500; // the contract's maximum
// Reconnect: exponential backoff with "equal jitter", capped, so a fleet of pages
// never reconnects in lockstep after a server restart.
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
// A connection that lived this long was healthy: the next drop starts backoff afresh.
const STABLE_CONNECTION_MS = 10_000;
// Our own liveness check, for sockets that die silently (sleeping laptop, lost Wi-Fi).
const CLIENT_PING_INTERVAL_MS = 25_000;
const CLIENT_PING_TIMEOUT_MS = 10_000;
const DECLINED_TOOL_OUTPUT = "The user declined to run this tool.";

// Close codes that a blind retry cannot fix: say why and wait for the user.
const FINAL_CLOSES = {
  4001: {
    state: "unauthorized",
    text: "The access token was refused (missing, invalid or expired). Enter a valid token to connect.",
  },
  4003: {
    state: "refused",
    text: "This conversation belongs to another user, or this page's address is not allowed. Start a new chat instead.",
  },
  4009: {
    state: "taken-over",
    text: "This conversation was opened in another tab or window, so this one was disconnected.",
  },
  4400: { state: "refused", text: "This conversation id is not valid. Start a new chat instead." },
};
const RETRY_NOTES = {
  1009: "Your message was too large to send.",
  1013: "The server is busy; trying again shortly.",
  4008: "Too many of your connections are open (other tabs?); trying again shortly.",
};
const ERROR_TEXT = {
  rate_limited: "You are sending messages too fast. Wait a minute, then send again.",
  queue_full:
    "Too many messages are waiting for an answer. Wait for the current answer to finish (or press Stop), then send again.",
  duplicate_message: "That message was already sent.",
  unknown_call_id: "That tool request is no longer waiting for an answer.",
  storage_unavailable: "The server could not save the conversation. Please try again.",
};
const STATUS_LABEL = {
  stopped: "stopped",
  interrupted: "interrupted",
  failed: "failed",
  incomplete: "incomplete (the model hit a limit)",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  newChat: $("new-chat"),
  tokenForm: $("token-form"),
  token: $("token"),
  transcript: $("transcript"),
  typing: $("typing"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeAction: $("notice-action"),
  noticeClose: $("notice-close"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
};

const state = {
  token: null,
  sessionId: null,
  ws: null,
  connected: false, // `connected` frame received on the current socket
  connectedAt: 0,
  attempt: 0, // reconnect attempts since the last stable connection
  retryTimer: null,
  pingTimer: null,
  pongDeadline: null,
  // Messages sent whose turn has not started: resent (same id) after a reconnect, so a
  // message lost with the socket is delivered and one the server has is not duplicated.
  outbox: [],
  resending: 0, // resent messages whose `duplicate_message` answer is expected, not news
  turns: new Map(), // turn_id -> {el, body, text, renderQueued}
  runningTurns: 0,
  stopping: false,
};

// ---------------------------------------------------------------- markdown

marked.use({ gfm: true, breaks: true });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

function renderMarkdown(target, text) {
  const html = marked.parse(text, { async: false });
  target.innerHTML = DOMPurify.sanitize(html, {
    USE_PROFILE: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
}

// ---------------------------------------------------------------- connection

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const sid = encodeURIComponent(state.sessionId);
  return `${scheme}://${location.host}/ws/chat/${sid}?token=${encodeURIComponent(state.token)}`;
}

function setStatus(name, text) {
  ui.status.dataset.state = name;
  ui.status.textContent = text;
  updateControls();
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (!state.token) {
    askForToken("Enter an access token to start.");
    return;
  }
  setStatus(state.attempt ? "reconnecting" : "connecting",
    state.attempt ? `Reconnecting (attempt ${state.attempt})…` : "Connecting…");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  state.connected = false;
  ws.addEventListener("message", (event) => {
    if (ws === state.ws) onFrame(event.data);
  });
  ws.addEventListener("close", (event) => {
    if (ws === state.ws) onClose(event);
  });
  // An error is always followed by a close event; the close decides what happens next.
}

function disconnect() {
  const ws = state.ws;
  state.ws = null;
  state.connected = false;
  stopPinging();
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
}

function send(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function onClose(event) {
  const wasStable = state.connected && Date.now() - state.connectedAt >= STABLE_CONNECTION_MS;
  state.ws = null;
  state.connected = false;
  stopPinging();
  endAllTurns("interrupted");
  showTyping(false);
  const final = FINAL_CLOSES[event.code];
  if (final) {
    state.attempt = 0;
    if (event.code === 4001) {
      sessionStorage.removeItem(TOKEN_STORAGE_KEY);
      state.token = null;
      askForToken(final.text);
      setStatus(final.state, "Unauthorized");
    } else if (event.code === 4009) {
      setStatus(final.state, "Disconnected");
      showNotice(final.text, "Use it here", () => {
        hideNotice();
        connect();
      });
    } else {
      setStatus(final.state, "Refused");
      showNotice(final.text, "New chat", newChat);
    }
    return;
  }
  if (wasStable) state.attempt = 0;
  state.attempt += 1;
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** (state.attempt - 1));
  const delayMs = ceiling / 2 + Math.random() * (ceiling / 2);
  const note = RETRY_NOTES[event.code];
  if (note) showNotice(note);
  setStatus("reconnecting", `Reconnecting in ${Math.ceil(delayMs / 1000)} s…`);
  state.retryTimer = setTimeout(connect, delayMs);
}

function startPinging() {
  stopPinging();
  state.pingTimer = setInterval(() => {
    if (!send({ type: "ping" })) return;
    clearTimeout(state.pongDeadline);
    state.pongDeadline = setTimeout(() => {
      // No frame at all for a while: the socket is dead without knowing it.
      if (state.ws) state.ws.close(4000, "no pong");
    }, CLIENT_PING_TIMEOUT_MS);
  }, CLIENT_PING_INTERVAL_MS);
}

function stopPinging() {
  clearInterval(state.pingTimer);
  clearTimeout(state.pongDeadline);
  state.pingTimer = null;
  state.pongDeadline = null;
}

// ---------------------------------------------------------------- frames

function onFrame(data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    return;
  }
  clearTimeout(state.pongDeadline); // any frame proves the socket is alive
  switch (frame.type) {
    case "connected":
      state.connected = true;
      state.connectedAt = Date.now();
      state.attempt = 0;
      hideNotice({ unlessSticky: true });
      setStatus("connected", "Connected");
      startPinging();
      requestHistory();
      break;
    case "history":
      onHistory(frame.messages, frame.messages.length >= HISTORY_LIMIT);
      break;
    case "typing":
      showTyping(frame.is_typing);
      break;
    case "response_start":
      onResponseStart(frame);
      break;
    case "text_delta":
      onTextDelta(frame);
      break;
    case "tool_request":
      onToolRequest(frame);
      break;
    case "response_end":
      onResponseEnd(frame);
      break;
    case "error":
      onError(frame);
      break;
    case "ping":
      send({ type: "pong" });
      break;
    default:
      break; // `pong` and anything newer than this page
  }
}

function requestHistory() {
  send({ type: "history", limit: HISTORY_LIMIT });
}

function onHistory(messages, truncated) {
  ui.transcript.replaceChildren();
  state.turns.clear();
  state.runningTurns = 0;
  if (truncated) {
    const note = element("li", "note", `Showing the latest ${HISTORY_LIMIT} messages.`);
    ui.transcript.append(note);
  }
  for (const message of messages) {
    if (message.role === "tool") {
      ui.transcript.append(toolEntry(message));
    } else {
      const el = messageElement(message.role, message.content, message.status);
      ui.transcript.append(el);
    }
  }
  // Resend what the server may not have: the ids make a second copy a harmless
  // `duplicate_message`, and the server has a prefix of the outbox, so each of those
  // answers stands for the oldest bubble still marked pending.
  state.resending = 0;
  for (const entry of state.outbox) {
    entry.el = messageElement("user", entry.content, null);
    entry.el.classList.add("pending");
    ui.transcript.append(entry.el);
    if (send({ type: "message", content: entry.content, id: entry.id })) state.resending += 1;
  }
  scrollToEnd(true);
  updateControls();
}

function onResponseStart(frame) {
  const index = state.outbox.findIndex((entry) => entry.id === frame.message_id);
  if (index >= 0) {
    const [entry] = state.outbox.splice(index, 1);
    entry.el?.classList.remove("pending");
  }
  const el = messageElement("assistant", "", null);
  el.classList.add("streaming");
  el.setAttribute("aria-busy", "true");
  ui.transcript.append(el);
  const body = el.querySelector(".body");
  state.turns.set(frame.turn_id, { id: frame.turn_id, el, body, text: "", queued: false });
  state.runningTurns += 1;
  state.stopping = false;
  scrollToEnd();
  updateControls();
}

function onTextDelta(frame) {
  const turn = state.turns.get(frame.turn_id);
  if (!turn) return;
  turn.text += frame.content;
  if (!turn.queued) {
    // Render at most once per frame: a fast stream does not re-parse per token.
    turn.queued = true;
    requestAnimationFrame(() => {
      turn.queued = false;
      renderMarkdown(turn.body, turn.text);
      scrollToEnd();
    });
  }
}

function onResponseEnd(frame) {
  const turn = state.turns.get(frame.turn_id);
  if (!turn) return;
  turn.text = frame.full_content;
  finishTurn(turn, frame.status);
  state.turns.delete(frame.turn_id);
  state.runningTurns = Math.max(0, state.runningTurns - 1);
  if (frame.status === "stopped") {
    // A stop drops queued turns too: their messages are stored, only unanswered.
    for (const entry of state.outbox) entry.el?.classList.remove("pending");
    state.outbox = [];
  }
  if (!state.runningTurns) state.stopping = false;
  scrollToEnd();
  updateControls();
}

function finishTurn(turn, status) {
  renderMarkdown(turn.body, turn.text);
  turn.el.classList.remove("streaming");
  turn.el.removeAttribute("aria-busy");
  setBadge(turn.el, status);
  for (const form of ui.transcript.querySelectorAll("form.tool-form")) {
    if (form.dataset.turn === turn.id) closeToolForm(form, "No longer needed: the turn ended.");
  }
}

function endAllTurns(status) {
  // The socket is gone: the server stores running turns as interrupted.
  for (const turn of state.turns.values()) finishTurn(turn, status);
  for (const form of ui.transcript.querySelectorAll("form.tool-form")) {
    closeToolForm(form, "No longer needed: the connection dropped.");
  }
  state.turns.clear();
  state.runningTurns = 0;
  state.stopping = false;
}

function onError(frame) {
  if (frame.code === "duplicate_message" && state.resending > 0) {
    state.resending -= 1;
    const entry = state.outbox.shift();
    entry?.el?.remove(); // the history above already shows it
    return;
  }
  if (["rate_limited", "queue_full", "message_too_large"].includes(frame.code)) {
    // The message the server refused is the newest one it has not started on.
    const entry = state.outbox.pop();
    if (entry) {
      entry.el?.classList.add("refused");
      setBadge(entry.el, "not sent");
      if (!ui.input.value) ui.input.value = entry.content;
      autosize();
    }
  }
  showNotice(ERROR_TEXT[frame.code] ?? frame.message ?? "Something went wrong.");
  updateControls();
}

// ---------------------------------------------------------------- tools

function onToolRequest(frame) {
  const turn = state.turns.get(frame.turn_id);
  const item = element("li", "tool");
  item.append(toolHeading(frame.name, frame.arguments));
  const form = document.createElement("form");
  form.className = "tool-form";
  form.dataset.turn = frame.turn_id;
  const fieldId = `tool-${frame.call_id}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const label = element("label", "", "Your answer");
  label.htmlFor = fieldId;
  const field = document.createElement("textarea");
  field.id = fieldId;
  field.rows = 2;
  const answer = element("button", "", "Send answer");
  answer.type = "submit";
  const decline = element("button", "quiet", "Decline");
  decline.type = "button";
  form.append(label, field, answer, decline);
  const respond = (content, summary) => {
    if (!send({ type: "tool_response", call_id: frame.call_id, content })) {
      showNotice("Not connected: the answer was not sent.");
      return;
    }
    closeToolForm(form, summary);
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    respond(field.value, `You answered: ${field.value}`);
  });
  decline.addEventListener("click", () => respond(DECLINED_TOOL_OUTPUT, "You declined."));
  item.append(form);
  if (turn) {
    ui.transcript.insertBefore(item, turn.el);
  } else {
    ui.transcript.append(item);
  }
  scrollToEnd();
  field.focus();
}

function closeToolForm(form, summary) {
  form.replaceWith(element("p", "tool-outcome", summary));
}

function toolHeading(name, args) {
  const head = element("p", "tool-head", "The agent wants to use ");
  head.append(element("code", "", name));
  const frag = document.createDocumentFragment();
  frag.append(head, element("pre", "tool-args", JSON.stringify(args ?? {}, null, 2)));
  return frag;
}

function toolEntry(message) {
  const item = element("li", "tool");
  item.append(toolHeading(message.name, message.arguments));
  const output = message.output ?? "";
  item.append(element("p", "tool-outcome", output ? `Answer: ${output}` : "No answer."));
  if (message.status && message.status !== "completed") setBadge(item, message.status);
  return item;
}

// ---------------------------------------------------------------- rendering

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function messageElement(role, content, status) {
  const item = element("li", `msg ${role}`);
  item.append(element("span", "visually-hidden", role === "user" ? "You said:" : "Agent:"));
  const body = element("div", "body");
  if (role === "assistant") renderMarkdown(body, content);
  else body.textContent = content; // the user's own words are shown as typed
  item.append(body);
  setBadge(item, status);
  return item;
}

function setBadge(item, status) {
  if (!item) return;
  item.querySelector(".badge")?.remove();
  item.dataset.status = status ?? "";
  if (!status || status === "completed") return;
  item.append(element("span", `badge ${status.replace(/\s+/g, "-")}`, STATUS_LABEL[status] ?? status));
}

function showTyping(on) {
  ui.typing.hidden = !on;
  if (on) scrollToEnd();
}

function scrollToEnd(force = false) {
  const scroller = document.scrollingElement;
  const nearEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 160;
  if (force || nearEnd) scroller.scrollTop = scroller.scrollHeight;
}

let noticeSticky = false;
function showNotice(text, actionLabel, action, sticky = Boolean(actionLabel)) {
  ui.noticeText.textContent = text;
  ui.noticeAction.hidden = !actionLabel;
  ui.noticeAction.textContent = actionLabel ?? "";
  ui.noticeAction.onclick = action ?? null;
  ui.notice.hidden = false;
  noticeSticky = sticky;
}

function hideNotice({ unlessSticky = false } = {}) {
  if (unlessSticky && noticeSticky) return;
  ui.notice.hidden = true;
  noticeSticky = false;
}

function askForToken(text) {
  ui.tokenForm.hidden = false;
  showNotice(text, undefined, undefined, true);
  setStatus("unauthorized", state.token ? "Unauthorized" : "No token");
  ui.token.focus();
}

function updateControls() {
  const busy = state.runningTurns > 0 || state.outbox.length > 0;
  ui.send.disabled = !state.connected || !ui.input.value.trim();
  ui.stop.hidden = !(busy && state.connected);
  ui.stop.disabled = state.stopping;
  ui.stop.textContent = state.stopping ? "Stopping…" : "Stop";
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
  updateControls();
}

// ---------------------------------------------------------------- user actions

function sendMessage() {
  const content = ui.input.value;
  if (!content.trim() || !state.connected) return;
  const entry = { id: crypto.randomUUID(), content, el: null };
  if (!send({ type: "message", content, id: entry.id })) return;
  entry.el = messageElement("user", content, null);
  entry.el.classList.add("pending");
  ui.transcript.append(entry.el);
  state.outbox.push(entry);
  ui.input.value = "";
  autosize();
  scrollToEnd(true);
}

function stopTurn() {
  if (send({ type: "stop" })) {
    state.stopping = true;
    updateControls();
  }
}

function newChat() {
  location.hash = randomSessionId(); // the hashchange handler switches sessions
}

function randomSessionId() {
  return crypto.randomUUID();
}

function switchSession() {
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (SESSION_ID_RE.test(fromHash)) {
    state.sessionId = fromHash;
  } else {
    state.sessionId = randomSessionId();
    history.replaceState(null, "", `${location.pathname}${location.search}#${state.sessionId}`);
  }
  disconnect();
  hideNotice();
  state.outbox = [];
  state.turns.clear();
  state.runningTurns = 0;
  state.attempt = 0;
  ui.transcript.replaceChildren();
  showTyping(false);
  connect();
}

function readToken() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_STORAGE_KEY, fromUrl);
    // Keep the token out of the address bar, bookmarks and screen shares.
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  }
  return sessionStorage.getItem(TOKEN_STORAGE_KEY);
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
ui.input.addEventListener("input", autosize);
ui.stop.addEventListener("click", stopTurn);
ui.newChat.addEventListener("click", newChat);
ui.noticeClose.addEventListener("click", () => hideNotice());
ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.token.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_STORAGE_KEY, token);
  state.token = token;
  ui.token.value = "";
  ui.tokenForm.hidden = true;
  hideNotice();
  state.attempt = 0;
  disconnect();
  connect();
});
window.addEventListener("hashchange", switchSession);
window.addEventListener("online", () => {
  // The network is back: do not sit out the rest of a long backoff.
  if (state.retryTimer) connect();
});

state.token = readToken();
switchSession();
