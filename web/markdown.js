// Model output as Markdown: `marked` makes HTML, DOMPurify cleans it, and only then
// does it touch the page. Owns what model output may do in the page (nothing that runs,
// nothing that loads) and how a streaming answer is rendered without re-parsing it.
//
// Streaming: `MarkdownStream` renders an answer block by block. A block is complete once
// a later block has started (Markdown never reaches back across a block boundary, bar
// reference links defined further down, which we accept), so each complete block is
// parsed, sanitized and inserted once and then left alone: its DOM node keeps the
// reader's selection and stays under the mouse. Only the unfinished last block (the
// "tail") is parsed again, at most once per animation frame. The cost per frame is the
// tail's size, not the answer's.

import { Marked } from "/web/vendor/marked/marked.esm.js";
import DOMPurify from "/web/vendor/dompurify/purify.es.js";

const LINK_SCHEMES = /^(https?:|mailto:)/i;

const markdown = new Marked(
  { gfm: true, breaks: true },
  {
    renderer: {
      // Model output must not make the page fetch anything (an image of "x" is a
      // request to /x, with the user's cookies, from the user's address). An image
      // becomes a link the user can choose to follow.
      image({ href, text }) {
        const label = `Image: ${text || href || "untitled"}`;
        if (href && LINK_SCHEMES.test(href.trim())) {
          return `<a href="${escapeHtml(href.trim())}">${escapeHtml(label)}</a>`;
        }
        return escapeHtml(`[${label}]`);
      },
    },
  },
);

// Everything that can run script or load a resource, on top of the html profile (which
// already leaves out SVG and MathML, and so their scriptable corners).
const SANITIZE_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: [
    "style", "link", "meta", "base", "form", "input", "button", "textarea", "select",
    "img", "picture", "source", "video", "audio", "track", "iframe", "object", "embed",
  ],
  FORBID_ATTR: ["style", "src", "srcset", "poster", "background", "ping", "action", "formaction"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** `\r\n` and lone `\r` as `\n`: what marked's lexer would do, done here so that the
 * tokens' `raw` lengths add up to our own text. */
export function normalizeNewlines(text) {
  return text.replace(/\r\n?/g, "\n");
}

/** Sanitized DOM for some block tokens. `final`: the blocks will not change again, so
 * code blocks get their "Copy code" button. */
function blocksFragment(tokens, final) {
  const fragment = DOMPurify.sanitize(markdown.parser(tokens), SANITIZE_OPTIONS);
  for (const child of fragment.children) child.setAttribute("dir", "auto");
  if (final) {
    for (const pre of fragment.querySelectorAll("pre")) decorateCodeBlock(pre);
  }
  return fragment;
}

function decorateCodeBlock(pre) {
  const wrapper = document.createElement("div");
  wrapper.className = "code-block";
  pre.setAttribute("dir", "ltr"); // code reads left to right whatever surrounds it
  pre.replaceWith(wrapper);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-code quiet";
  button.textContent = "Copy code";
  wrapper.append(button, pre);
}

/** Render a whole, finished Markdown text into `target` (history, a replaced answer). */
export function renderMarkdown(target, text) {
  const tokens = markdown.lexer(normalizeNewlines(text));
  target.replaceChildren(blocksFragment(tokens, true));
}

/** One streaming answer rendered into one element, incrementally (see the top). */
export class MarkdownStream {
  /** `onRender` runs after each render (the page uses it to follow the end). */
  constructor(target, onRender = () => {}) {
    this.target = target;
    this.onRender = onRender;
    this.source = ""; // the whole text so far, newlines normalized
    this.committed = 0; // length of the source prefix rendered as complete blocks
    this.tail = []; // the DOM nodes of the unfinished last block, replaced per render
    this.scheduled = false;
    this.pendingCR = false; // a chunk ended with \r: a leading \n in the next is its pair
  }

  /** Add streamed text; renders on the next animation frame (many deltas, one render). */
  append(text) {
    let chunk = text;
    if (this.pendingCR && chunk.startsWith("\n")) chunk = chunk.slice(1);
    this.pendingCR = chunk.endsWith("\r");
    this.source += normalizeNewlines(chunk);
    this.schedule();
  }

  /** Start over with `text` (a resumed turn replays its whole text so far). */
  reset(text = "") {
    this.source = "";
    this.committed = 0;
    this.tail = [];
    this.pendingCR = false;
    this.target.replaceChildren();
    this.append(text);
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      if (!this.scheduled) return; // `finish` came first
      this.scheduled = false;
      this.render(false);
      this.onRender();
    });
  }

  /** The answer is over: render what is left as complete, now. */
  finish() {
    this.scheduled = false;
    this.render(true);
  }

  render(final) {
    const pending = this.source.slice(this.committed);
    const tokens = markdown.lexer(pending);
    let cut = tokens.length;
    if (!final) {
      // Everything before the last real block is complete; trailing blank lines
      // ("space" tokens) do not make the block before them complete.
      cut = 0;
      for (let i = tokens.length - 1; i >= 0; i -= 1) {
        if (tokens[i].type !== "space") {
          cut = i;
          break;
        }
      }
    }
    const complete = tokens.slice(0, cut);
    const consumed = complete.reduce((sum, token) => sum + token.raw.length, 0);
    // The blocks must be an exact prefix of the text, or the offsets would drift: if not
    // (a lexer that rewrote its input), keep everything in the tail, which is correct,
    // only slower.
    const exact = complete.map((token) => token.raw).join("") === pending.slice(0, consumed);
    for (const node of this.tail) node.remove();
    this.tail = [];
    let rest = tokens;
    if (exact && complete.length) {
      this.target.append(blocksFragment(complete, true));
      this.committed += consumed;
      rest = tokens.slice(cut);
    }
    const tailFragment = blocksFragment(rest, final);
    this.tail = final ? [] : [...tailFragment.childNodes];
    this.target.append(tailFragment);
    if (final) this.committed = this.source.length;
  }
}
