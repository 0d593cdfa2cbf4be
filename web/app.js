// The bundled chat page: a reference client of the wire contract (PROTOCOL.md).
// ES modules, no framework, no build step. This one owns the connection, the frames and
// the user's actions; markdown.js renders model output, transcript.js builds the
// transcript's DOM, conversations.js speaks the Sessions API.
//
// Messages: each one the user sends gets a client id and waits in `state.outbox` until
// its turn starts (`response_start.message_id`). After a reconnect the outbox is sent
// again with the same ids, so a message lost with the socket is delivered and one the
// server has is answered `duplicate_message`, never stored twice. A message that cannot
// be delivered (too large, refused) is marked "not sent" and its text given back; it is
// never re-sent by itself.

import { MarkdownStream } from "/web/markdown.js";
import {
  assistantMessage,
  clearTurnError,
  element,
  setBadge,
  setRetry,
  setSource,
  setTurnError,
  sourceOf,
  toolCard,
  toolEntry,
  userMessage,
} from "/web/transcript.js";
import { Conversations } from "/web/conversations.js";

const SESSION_ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;
const TOKEN_STORAGE_KEY = "chat.token";
const HISTORY_LIMIT = 500; // the contract's maximum
// The contract's defaults; a `connected` frame that names other limits wins.
const DEFAULT_MAX_FRAME_BYTES = 65_536;
const DEFAULT_MAX_CONTENT_CHARS = 10_000;
// Reconnect: exponential backoff with "equal jitter", capped, so a fleet of pages
// never reconnects in lockstep after a server restart.
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
const COUNTDOWN_TICK_MS = 250;
// A connection that lived this long was healthy: the next drop starts backoff afresh.
const STABLE_CONNECTION_MS = 10_000;
// Our own liveness check, for sockets that die silently (sleeping laptop, lost Wi-Fi).
const CLIENT_PING_INTERVAL_MS = 25_000;
const CLIENT_PING_TIMEOUT_MS = 10_000;
// Following the answer: within this distance of the end counts as "at the end".
const FOLLOW_SLACK_PX = 48;
const COPIED_FEEDBACK_MS = 1_500;
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
  4410: { state: "refused", text: "This conversation was deleted. Start a new chat." },
};
const RETRY_NOTES = {
  1013: "The server is busy; trying again shortly.",
  4008: "Too many of your connections are open (other tabs?); trying again shortly.",
};
const ERROR_TEXT = {
  rate_limited: "You are sending messages too fast. Wait a minute, then send again.",
  queue_full:
    "Too many messages are waiting for an answer. Wait for the current answer to finish (or press Stop), then send again.",
  message_too_large: "That message is too long for the server. Shorten it or send it in parts.",
  unknown_call_id: "That tool request is no longer waiting for an answer.",
  storage_error: "The server could not save the conversation. Please try again.",
};
const REFUSING_ERRORS = new Set(["rate_limited", "queue_full", "message_too_large"]);

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  countdown: $("countdown"),
  retryNow: $("retry-now"),
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
  inputError: $("input-error"),
  send: $("send"),
  stop: $("stop"),
};

const state = {
  token: null,
  sessionId: null,
  ws: null,
  connected: false, // `connected` frame received on the current socket
  synced: false, // ... and the history that follows it shown: the outbox may go out
  connectedAt: 0,
  attempt: 0, // reconnect attempts since the last stable connection
  retryTimer: null,
  retryAt: 0,
  countdownTimer: null,
  pingTimer: null,
  pongDeadline: null,
  limits: { maxFrameBytes: DEFAULT_MAX_FRAME_BYTES, maxContentChars: DEFAULT_MAX_CONTENT_CHARS },
  // {id, content, el, sent, resent, known}: sent and not yet started, or typed offline.
  outbox: [],
  // Resent entries whose `duplicate_message` is expected, oldest first: the server
  // holds a prefix of what it was sent, so each such answer is for the oldest of them.
  resent: [],
  reconciling: false, // a history request went out to place `known` entries
  turns: new Map(), // turn_id -> {id, el, stream, detached, tools: Map(call_id -> card)}
  stopping: false,
  followEnd: true,
  autoScrollTop: -1,
};

// The question each answer bubble answers, for Retry.
const prompts = new WeakMap();

const conversations = new Conversations({
  token: () => state.token,
  sessionId: () => state.sessionId,
  newChat,
  notice: (text) => showNotice(text),
});

// ---------------------------------------------------------------- connection

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const sid = encodeURIComponent(state.sessionId);
  return `${scheme}://${location.host}/ws/chat/${sid}?token=${encodeURIComponent(state.token)}`;
}

function setStatus(name, text) {
  ui.status.dataset.state = name;
  ui.status.textContent = text;
  if (name !== "reconnecting") stopCountdown();
  updateControls();
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  stopCountdown();
  if (!state.token) {
    askForToken("Enter an access token to start.");
    return;
  }
  setStatus(state.attempt ? "reconnecting" : "connecting",
    state.attempt ? `Reconnecting (attempt ${state.attempt})…` : "Connecting…");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  state.connected = false;
  state.synced = false;
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
  state.synced = false;
  stopPinging();
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  stopCountdown();
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
  state.synced = false;
  stopPinging();
  detachTurns();
  showTyping(false);
  if (event.code === 1009) refuseNewestSent("The message was too large for the server to accept.");
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
      setStatus(final.state, event.code === 4410 ? "Deleted" : "Refused");
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
  state.retryTimer = setTimeout(connect, delayMs);
  state.retryAt = Date.now() + delayMs;
  setStatus("reconnecting", "Reconnecting…");
  startCountdown();
}

/** The visible "in N s" and "Retry now" while a reconnect is scheduled. The countdown
 * sits outside the status live region: a screen reader hears "Reconnecting…" once,
 * not a number every second. */
function startCountdown() {
  const tick = () => {
    const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    ui.countdown.textContent = `Reconnecting in ${seconds} s`;
  };
  tick();
  ui.countdown.hidden = false;
  ui.retryNow.hidden = false;
  clearInterval(state.countdownTimer);
  state.countdownTimer = setInterval(tick, COUNTDOWN_TICK_MS);
}

function stopCountdown() {
  clearInterval(state.countdownTimer);
  state.countdownTimer = null;
  ui.countdown.hidden = true;
  ui.retryNow.hidden = true;
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
      onConnected(frame);
      break;
    case "history":
      onHistory(Array.isArray(frame.messages) ? frame.messages : []);
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

function onConnected(frame) {
  state.connected = true;
  state.connectedAt = Date.now();
  state.attempt = 0;
  // A server may name its own limits; the contract's defaults hold otherwise.
  const limits = frame.limits ?? frame;
  if (Number.isInteger(limits.max_frame_bytes)) state.limits.maxFrameBytes = limits.max_frame_bytes;
  if (Number.isInteger(limits.max_content_chars)) state.limits.maxContentChars = limits.max_content_chars;
  hideNotice({ unlessSticky: true });
  setStatus("connected", "Connected");
  startPinging();
  send({ type: "history", limit: HISTORY_LIMIT });
  conversations.refresh();
}

/** Show the stored conversation. Turns running on this connection (a resumed one
 * included) keep their bubbles, after the stored messages; the first history after a
 * connect also sends the outbox. */
function onHistory(messages) {
  const firstSync = !state.synced;
  state.synced = true;
  // Turns that were running when the socket dropped and were not replayed since ended
  // while we were away: the history has them as stored.
  for (const [id, turn] of state.turns) {
    if (turn.detached) state.turns.delete(id);
  }
  const liveCalls = new Set();
  for (const turn of state.turns.values()) for (const call of turn.tools.keys()) liveCalls.add(call);

  const items = [];
  if (messages.length >= HISTORY_LIMIT) {
    items.push(element("li", "note", `Showing the latest ${HISTORY_LIMIT} messages.`));
  }
  const userItems = new Map(); // history entry -> its bubble
  const answers = new Map();
  for (const message of messages) {
    if (message.role === "tool") {
      if (!liveCalls.has(message.call_id)) items.push(toolEntry(message));
    } else if (message.role === "user") {
      const item = userMessage(message.content, message.timestamp);
      items.push(item);
      userItems.set(message, item);
    } else {
      const item = assistantMessage(message.content, message.status, message.timestamp);
      items.push(item);
      answers.set(message, item);
    }
  }
  for (const turn of state.turns.values()) items.push(...turn.tools.values(), turn.el);
  ui.transcript.replaceChildren(...items);

  const unanswered = pairTurns(messages, userItems, answers);
  placeOutbox(unanswered);
  if (firstSync) flushOutbox();
  if (state.reconciling) {
    state.reconciling = false;
    strandKnownEntries();
  }
  keepAtEnd(true);
  updateControls();
}

/** Pair stored answers with their questions (for Retry) and return the bubbles of the
 * user messages that got no answer. Turns run in order, one answer per message; a
 * stopped or interrupted turn drops the messages queued behind it. */
function pairTurns(messages, userItems, answers) {
  const waiting = [];
  const unanswered = [];
  for (const message of messages) {
    if (message.role === "user") {
      waiting.push(message);
    } else if (message.role === "assistant") {
      const question = waiting.shift();
      if (question) prompts.set(answers.get(message), question.content);
      if (message.status === "stopped" || message.status === "interrupted") {
        unanswered.push(...waiting.splice(0));
      }
    }
  }
  unanswered.push(...waiting);
  return unanswered.map((message) => userItems.get(message));
}

/** Show the outbox after the history. A message that went out before may be in the
 * history already (the server got it before the socket dropped): then its stored
 * bubble stands for it, marked pending, rather than a second copy. */
function placeOutbox(unanswered) {
  const free = [...unanswered];
  for (const entry of state.outbox) {
    entry.el = entry.ownEl;
    if (!entry.sent) continue; // typed offline: the server cannot have it
    const index = free.findLastIndex((item) => item.querySelector(".body").textContent === entry.content);
    if (index >= 0) {
      [entry.el] = free.splice(index, 1);
      entry.el.classList.add("pending");
    } else if (entry.known) {
      entry.el = null; // the server has it and it was answered: nothing to wait for
    }
  }
  state.outbox = state.outbox.filter((entry) => entry.el);
  for (const entry of state.outbox) {
    if (entry.el === entry.ownEl) ui.transcript.append(entry.el);
  }
}

/** After reconciling: a known message with no answer while no turn runs will never be
 * answered (its queue died with the server). Say so and offer to send it again. */
function strandKnownEntries() {
  if (runningTurns() > 0) return; // it may still be queued behind the running turn
  for (const entry of state.outbox.filter((e) => e.known)) {
    entry.el.classList.remove("pending");
    entry.el.dataset.messageId = entry.id;
    setBadge(entry.el, "no answer");
  }
  state.outbox = state.outbox.filter((entry) => !entry.known);
}

/** Send what the outbox holds: resend what went out before (same ids), send for the
 * first time what was typed while offline. */
function flushOutbox() {
  state.resent = [];
  for (const entry of state.outbox) {
    if (entry.known) continue;
    if (!send({ type: "message", content: entry.content, id: entry.id })) return;
    if (entry.sent) state.resent.push(entry);
    entry.sent = true;
    setBadge(entry.el, null);
  }
}

function onResponseStart(frame) {
  const question = state.outbox.find((entry) => entry.id === frame.message_id)?.content;
  claimMessage(frame.message_id);
  let turn = state.turns.get(frame.turn_id);
  if (turn) {
    // A replay of a turn this page shows: the replayed delta carries the whole text.
    turn.detached = false;
    turn.stream.reset("");
    clearTurnError(turn.el);
    setBadge(turn.el, null);
  } else {
    const el = assistantMessage(null, null, new Date().toISOString());
    el.dataset.turn = frame.turn_id;
    ui.transcript.append(el);
    const stream = new MarkdownStream(el.querySelector(".body"), () => keepAtEnd());
    turn = { id: frame.turn_id, el, stream, detached: false, tools: new Map() };
    if (question !== undefined) prompts.set(el, question);
    state.turns.set(frame.turn_id, turn);
  }
  turn.el.classList.add("streaming");
  turn.el.classList.remove("detached");
  turn.el.setAttribute("aria-busy", "true");
  state.stopping = false;
  keepAtEnd();
  updateControls();
  conversations.refresh(); // the list shows it running
}

/** The turn of message `id` started: it is no longer waiting (nor stranded). */
function claimMessage(id) {
  if (!id) return;
  const index = state.outbox.findIndex((entry) => entry.id === id);
  if (index >= 0) {
    const [entry] = state.outbox.splice(index, 1);
    entry.el?.classList.remove("pending");
    setBadge(entry.el, null);
  }
  state.resent = state.resent.filter((entry) => entry.id !== id);
  const stranded = ui.transcript.querySelector(`.msg.user[data-message-id="${CSS.escape(id)}"]`);
  if (stranded) setBadge(stranded, null);
}

function onTextDelta(frame) {
  const turn = state.turns.get(frame.turn_id);
  if (!turn || turn.detached) return;
  turn.stream.append(frame.content);
}

function onResponseEnd(frame) {
  const turn = state.turns.get(frame.turn_id);
  if (!turn) return;
  if (frame.full_content !== undefined && frame.full_content !== turn.stream.source) {
    turn.stream.reset(frame.full_content);
  }
  finishTurn(turn, frame.status);
  state.turns.delete(frame.turn_id);
  if (frame.status === "stopped") {
    // A stop drops queued turns too: their messages are stored, only unanswered.
    for (const entry of state.outbox) {
      entry.el?.classList.remove("pending");
      if (entry.sent) setBadge(entry.el, "no answer");
    }
    state.outbox = state.outbox.filter((entry) => !entry.sent);
    state.resent = [];
  }
  if (!runningTurns()) state.stopping = false;
  if (!runningTurns() && state.outbox.some((entry) => entry.known)) requestReconcile();
  keepAtEnd();
  updateControls();
  conversations.refresh();
}

function finishTurn(turn, status) {
  turn.stream.finish();
  setSource(turn.el, turn.stream.source);
  turn.el.classList.remove("streaming", "detached");
  turn.el.removeAttribute("aria-busy");
  setBadge(turn.el, status);
  for (const card of turn.tools.values()) {
    const form = card.querySelector("form.tool-form");
    if (form) closeToolForm(form, "No longer needed: the turn ended.");
  }
}

/** The socket is gone. Running turns go on on the server for a while (Detach and
 * resume): keep their bubbles until a replay continues them or the history replaces
 * them. */
function detachTurns() {
  for (const turn of state.turns.values()) {
    turn.detached = true;
    turn.stream.finish();
    setSource(turn.el, turn.stream.source);
    turn.el.classList.remove("streaming");
    turn.el.classList.add("detached");
    turn.el.removeAttribute("aria-busy");
    setBadge(turn.el, "disconnected");
    for (const card of turn.tools.values()) {
      for (const control of card.querySelectorAll("form.tool-form textarea, form.tool-form button")) {
        control.disabled = true;
      }
    }
  }
  state.stopping = false;
  state.resent = [];
}

function runningTurns() {
  let count = 0;
  for (const turn of state.turns.values()) if (!turn.detached) count += 1;
  return count;
}

function requestReconcile() {
  state.reconciling = true;
  send({ type: "history", limit: HISTORY_LIMIT });
}

function onError(frame) {
  if (frame.code === "duplicate_message") {
    // The server already has this message (it got it before the socket dropped). It
    // is stored; whether it was answered, the history says.
    const entry = state.resent.shift();
    if (entry) {
      entry.known = true;
      requestReconcile();
      return;
    }
  }
  const text = ERROR_TEXT[frame.code] ?? frame.message ?? "Something went wrong.";
  const turnEl = frame.turn_id
    ? ui.transcript.querySelector(`.msg.assistant[data-turn="${CSS.escape(frame.turn_id)}"]`)
    : null;
  if (turnEl) {
    setTurnError(turnEl, frame.code === "upstream_error" ? (frame.message ?? text) : text);
    return;
  }
  if (REFUSING_ERRORS.has(frame.code)) refuseNewestSent();
  showNotice(text);
  updateControls();
}

/** The server refused the newest message it was sent: it is not sent, and never will
 * be unless the user sends it again; its text goes back to the input. */
function refuseNewestSent(why) {
  let index = -1;
  for (let i = state.outbox.length - 1; i >= 0; i -= 1) {
    if (state.outbox[i].sent && !state.outbox[i].known) {
      index = i;
      break;
    }
  }
  if (index < 0) return;
  const [entry] = state.outbox.splice(index, 1);
  state.resent = state.resent.filter((e) => e !== entry);
  entry.el?.classList.remove("pending");
  entry.el?.classList.add("refused");
  setBadge(entry.el, "not sent");
  if (!ui.input.value) {
    ui.input.value = entry.content;
    autosize();
  }
  if (why) {
    showInputError(`${why} It was not sent; its text is back in the message box. Shorten it or send it in parts.`);
    showNotice(`${why} It was not sent.`);
  }
  updateControls();
}

// ---------------------------------------------------------------- tools

function onToolRequest(frame) {
  const turn = state.turns.get(frame.turn_id);
  const existing = turn?.tools.get(frame.call_id);
  if (existing) {
    // Replayed after a reconnect: the same question, still open.
    for (const control of existing.querySelectorAll("form.tool-form textarea, form.tool-form button")) {
      control.disabled = false;
    }
    return;
  }
  const item = toolCard(frame.name, frame.arguments);
  item.dataset.call = frame.call_id;
  const form = document.createElement("form");
  form.className = "tool-form";
  const fieldId = `tool-${frame.call_id}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const label = element("label", "", "Your answer");
  label.htmlFor = fieldId;
  const field = document.createElement("textarea");
  field.id = fieldId;
  field.rows = 2;
  field.dir = "auto";
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
    ui.input.focus();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    respond(field.value, `You answered: ${field.value}`);
  });
  decline.addEventListener("click", () => respond(DECLINED_TOOL_OUTPUT, "You declined."));
  item.append(form);
  if (turn) {
    turn.tools.set(frame.call_id, item);
    ui.transcript.insertBefore(item, turn.el);
  } else {
    ui.transcript.append(item);
  }
  keepAtEnd();
  field.focus();
}

function closeToolForm(form, summary) {
  form.replaceWith(element("p", "tool-outcome", summary));
}

// ---------------------------------------------------------------- page state

function showTyping(on) {
  ui.typing.hidden = !on;
  if (on) keepAtEnd();
}

/** Follow the end of the transcript while the reader is there: an answer that grows by
 * a screenful at once is followed all the same; a reader who scrolled up stays put. */
function keepAtEnd(force = false) {
  if (force) state.followEnd = true;
  if (!state.followEnd) return;
  const scroller = document.scrollingElement;
  scroller.scrollTop = scroller.scrollHeight;
  state.autoScrollTop = scroller.scrollTop;
}

function onScroll() {
  const scroller = document.scrollingElement;
  if (Math.abs(scroller.scrollTop - state.autoScrollTop) < 2) return; // our own scroll
  const distance = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
  state.followEnd = distance < FOLLOW_SLACK_PX;
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

function showInputError(text) {
  ui.inputError.textContent = text;
  ui.inputError.hidden = false;
  ui.input.setAttribute("aria-invalid", "true");
}

function clearInputError() {
  if (ui.inputError.hidden) return;
  ui.inputError.hidden = true;
  ui.inputError.textContent = "";
  ui.input.removeAttribute("aria-invalid");
}

function askForToken(text) {
  ui.tokenForm.hidden = false;
  showNotice(text, undefined, undefined, true);
  setStatus("unauthorized", state.token ? "Unauthorized" : "No token");
  ui.token.focus();
}

function updateControls() {
  const busy = runningTurns() > 0 || state.outbox.some((entry) => entry.sent);
  ui.send.disabled = !ui.input.value.trim();
  const stopWasFocused = document.activeElement === ui.stop;
  ui.stop.hidden = !(busy && state.connected);
  ui.stop.disabled = state.stopping;
  ui.stop.textContent = state.stopping ? "Stopping…" : "Stop";
  // A hidden or disabled button drops focus to <body>: keep the user in the composer.
  if (stopWasFocused && (ui.stop.hidden || ui.stop.disabled)) ui.input.focus();
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
  updateControls();
}

// ---------------------------------------------------------------- user actions

function codePoints(text) {
  let count = 0;
  for (const _ of text) count += 1;
  return count;
}

/** Why `content` cannot be sent as one message, or null. */
function sizeProblem(content) {
  const chars = codePoints(content);
  const { maxContentChars, maxFrameBytes } = state.limits;
  const n = (value) => value.toLocaleString("en");
  if (chars > maxContentChars) {
    return `This message has ${n(chars)} characters; the limit is ${n(maxContentChars)}. Shorten it or send it in parts.`;
  }
  const frame = JSON.stringify({ type: "message", content, id: crypto.randomUUID() });
  const bytes = new TextEncoder().encode(frame).length;
  if (bytes > maxFrameBytes) {
    return `This message takes ${n(bytes)} bytes; the limit is ${n(maxFrameBytes)}. Shorten it or send it in parts.`;
  }
  return null;
}

/** Send `content` as a new message. While offline it waits, shown as pending, and goes
 * out once after the reconnect. Returns false (and says why) when it cannot be sent. */
function sendMessage(content) {
  if (!content.trim()) return false;
  const problem = sizeProblem(content);
  if (problem) {
    showInputError(problem);
    return false;
  }
  const el = userMessage(content);
  const entry = { id: crypto.randomUUID(), content, el, ownEl: el, sent: false, known: false };
  entry.el.classList.add("pending");
  ui.transcript.append(entry.el);
  state.outbox.push(entry);
  if (state.synced && send({ type: "message", content, id: entry.id })) {
    entry.sent = true;
  } else {
    setBadge(entry.el, "sending");
  }
  keepAtEnd(true);
  updateControls();
  return true;
}

function sendFromComposer() {
  if (sendMessage(ui.input.value)) {
    ui.input.value = "";
    clearInputError();
    autosize();
  }
}

function stopTurn() {
  ui.input.focus(); // the button is about to be disabled, then hidden
  if (send({ type: "stop" })) {
    state.stopping = true;
    updateControls();
  }
}

/** The user text of the turn an answer belongs to: as paired when it started or was
 * loaded, else the nearest user message above it. */
function promptFor(answer) {
  if (prompts.has(answer)) return prompts.get(answer);
  for (let el = answer.previousElementSibling; el; el = el.previousElementSibling) {
    if (el.matches(".msg.user")) return el.querySelector(".body").textContent;
  }
  return null;
}

async function copyText(button, text) {
  const label = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    showNotice("Copying failed: the browser did not allow it.");
    return;
  }
  setTimeout(() => {
    button.textContent = label;
  }, COPIED_FEEDBACK_MS);
}

function onTranscriptClick(event) {
  const button = event.target.closest("button");
  if (!button) return;
  const item = button.closest(".msg");
  if (button.matches(".copy-code")) {
    copyText(button, button.parentElement.querySelector("pre code, pre")?.textContent ?? "");
  } else if (button.matches(".copy-message") && item) {
    copyText(button, sourceOf(item));
  } else if (button.matches(".retry") && item) {
    const text = item.matches(".user") ? item.querySelector(".body").textContent : promptFor(item);
    if (text !== null && sendMessage(text)) {
      setRetry(item, false);
      ui.input.focus();
    }
  }
}

function newChat() {
  location.hash = crypto.randomUUID(); // the hashchange handler switches sessions
}

function switchSession() {
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (SESSION_ID_RE.test(fromHash)) {
    if (fromHash === state.sessionId && state.ws) return;
    state.sessionId = fromHash;
  } else {
    state.sessionId = crypto.randomUUID();
    history.replaceState(null, "", `${location.pathname}${location.search}#${state.sessionId}`);
  }
  disconnect();
  hideNotice();
  clearInputError();
  state.outbox = [];
  state.resent = [];
  state.reconciling = false;
  state.turns.clear();
  state.attempt = 0;
  state.stopping = false;
  ui.transcript.replaceChildren();
  showTyping(false);
  conversations.render();
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
  sendFromComposer();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendFromComposer();
  }
});
ui.input.addEventListener("input", () => {
  if (!ui.inputError.hidden && !sizeProblem(ui.input.value)) clearInputError();
  autosize();
});
ui.stop.addEventListener("click", stopTurn);
ui.retryNow.addEventListener("click", () => connect());
ui.noticeClose.addEventListener("click", () => hideNotice());
ui.transcript.addEventListener("click", onTranscriptClick);
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
window.addEventListener("scroll", onScroll, { passive: true });
window.addEventListener("online", () => {
  // The network is back: do not sit out the rest of a long backoff.
  if (state.retryTimer) connect();
});

state.token = readToken();
switchSession();
