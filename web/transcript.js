// The transcript's pieces: message bubbles, their timestamps, status badges and action
// buttons, and tool cards. Builds DOM only; what a button does is decided in app.js
// (one click handler on the transcript, keyed by the buttons' classes).

import { renderMarkdown } from "/web/markdown.js";

const STATUS_LABEL = {
  stopped: "stopped",
  interrupted: "interrupted",
  failed: "failed",
  incomplete: "incomplete (the model hit a limit)",
  "not sent": "not sent",
  sending: "sending…",
  "no answer": "no answer",
  disconnected: "connection lost",
};
// Answers that ended like this can be asked again.
export const RETRYABLE = new Set(["failed", "stopped", "interrupted"]);

// The Markdown source of each assistant bubble, for "Copy" (the DOM holds the HTML).
const sources = new WeakMap();

export function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function button(className, text, label) {
  const el = element("button", className, text);
  el.type = "button";
  if (label) el.setAttribute("aria-label", label);
  return el;
}

/** `<time datetime=ISO>`: the local time of day, with the full date on hover. */
export function timeElement(iso) {
  const when = new Date(iso);
  const el = element("time");
  if (Number.isNaN(when.getTime())) return el;
  el.dateTime = when.toISOString();
  const sameDay = when.toDateString() === new Date().toDateString();
  el.textContent = sameDay
    ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : when.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  el.title = when.toLocaleString();
  return el;
}

function meta(timestamp) {
  const row = element("div", "meta");
  row.append(timeElement(timestamp ?? new Date().toISOString()));
  return row;
}

/** A user's message, shown exactly as typed (never as Markdown). */
export function userMessage(content, timestamp) {
  const item = element("li", "msg user");
  item.append(element("span", "visually-hidden", "You said:"));
  const body = element("div", "body", content);
  body.dir = "auto";
  item.append(body, meta(timestamp));
  return item;
}

/** An assistant answer: rendered now when `content` is given (a stored answer), else
 * left empty for a stream. Returns the bubble; its `.body` is where the text goes. */
export function assistantMessage(content, status, timestamp) {
  const item = element("li", "msg assistant");
  item.append(element("span", "visually-hidden", "Agent:"));
  const body = element("div", "body");
  body.dir = "auto";
  const row = meta(timestamp);
  row.append(button("copy-message quiet", "Copy", "Copy"));
  item.append(body, row);
  if (content !== null) {
    renderMarkdown(body, content);
    setSource(item, content);
  }
  setBadge(item, status);
  return item;
}

export function setSource(item, text) {
  sources.set(item, text);
}

export function sourceOf(item) {
  return sources.get(item) ?? item.querySelector(".body")?.textContent ?? "";
}

/** Show `status` on a bubble (none for completed), and offer Retry where it helps. */
export function setBadge(item, status) {
  if (!item) return;
  const row = item.querySelector(".meta");
  row.querySelector(".badge")?.remove();
  item.dataset.status = status ?? "";
  if (status && status !== "completed") {
    const badge = element("span", `badge ${status.replace(/\s+/g, "-")}`, STATUS_LABEL[status] ?? status);
    row.querySelector("time").after(badge);
  }
  const retry = item.classList.contains("assistant") ? RETRYABLE.has(status) : status === "no answer";
  setRetry(item, retry);
}

export function setRetry(item, on) {
  const existing = item.querySelector(".meta .retry");
  if (!on) {
    existing?.remove();
    return;
  }
  if (!existing) item.querySelector(".meta").append(button("retry quiet", "Retry"));
}

/** Why a turn failed, in the bubble itself. */
export function setTurnError(item, text) {
  let note = item.querySelector(".turn-error");
  if (!note) {
    note = element("p", "turn-error");
    item.querySelector(".meta").before(note);
  }
  note.textContent = text;
}

export function clearTurnError(item) {
  item.querySelector(".turn-error")?.remove();
}

// ---------------------------------------------------------------- tool cards

/** "lookup_order" -> "Lookup order". */
function humanize(name) {
  const words = String(name).replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/[_\-.]+/g, " ").trim();
  return words ? words[0].toUpperCase() + words.slice(1).toLowerCase() : String(name);
}

function readableValue(value) {
  if (value === null || value === undefined) return "(none)";
  if (typeof value === "string") return value || "(empty)";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") return String(value);
  if (Array.isArray(value) && value.every((v) => typeof v !== "object" || v === null)) {
    return value.map(readableValue).join(", ") || "(none)";
  }
  return JSON.stringify(value);
}

/** The card of a tool request: what the agent asks, in words; the JSON on demand. */
export function toolCard(name, args) {
  const item = element("li", "tool");
  const head = element("p", "tool-head");
  head.append(element("strong", "", `The agent asks for your help: ${humanize(name)}`));
  item.append(head);
  const entries = Object.entries(args ?? {});
  if (entries.length) {
    item.append(element("p", "tool-lead", "It gave these details:"));
    const list = element("dl", "tool-list");
    for (const [key, value] of entries) {
      list.append(element("dt", "", humanize(key)));
      const dd = element("dd", "", readableValue(value));
      dd.dir = "auto";
      list.append(dd);
    }
    item.append(list);
  }
  const details = element("details", "tool-json");
  const summary = element("summary", "", "Show the request as JSON");
  const code = element("code", "", name);
  const pre = element("pre", "tool-args", JSON.stringify(args ?? {}, null, 2));
  const label = element("p", "tool-name", "Tool: ");
  label.append(code);
  details.append(summary, label, pre);
  item.append(details);
  return item;
}

/** A stored tool call (history): the card, and how it was answered. */
export function toolEntry(message) {
  const item = toolCard(message.name, message.arguments);
  const output = message.output ?? "";
  item.append(element("p", "tool-outcome", output ? `Answer: ${output}` : "No answer."));
  if (message.status && message.status !== "completed") {
    item.append(element("span", `badge ${message.status}`, STATUS_LABEL[message.status] ?? message.status));
  }
  item.dataset.call = message.call_id ?? "";
  return item;
}
