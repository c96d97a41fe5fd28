// One message of a conversation on the page: a user's text as typed, a reply as Markdown with
// its reasoning folded away, its error in the server's words, and its token counts and speed.
import { decorateCode, renderMarkdown } from "./markdown.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, title) {
  const node = element("button", "small", label);
  node.type = "button";
  if (title) node.title = title;
  node.addEventListener("click", onClick);
  return node;
}

export function stats(message) {
  const parts = [];
  const usage = message.usage;
  if (usage) {
    parts.push(`${usage.completion_tokens} tokens`);
    if (message.rate) parts.push(`${message.rate.toFixed(1)} tokens/s`);
    parts.push(`prompt ${usage.prompt_tokens} tokens`);
  }
  if (message.firstTokenS !== undefined) parts.push(`first token ${message.firstTokenS.toFixed(2)} s`);
  if (message.stopped) parts.push("stopped");
  if (message.finish === "length") parts.push("cut off at max tokens");
  return parts.join(" · ");
}

// `actions`: {edit(index), regenerate(index)}, or null while a reply streams.
export function createMessage(message, index, actions) {
  const article = element("article", `message ${message.role}`);
  article.dataset.index = index;
  article.append(element("div", "role", message.role === "user" ? "You" : message.model ?? ""));
  if (message.role === "user") {
    article.append(element("div", "content plain", message.content));
    if (actions) article.append(footer(button("Edit", () => actions.edit(index))));
    return article;
  }
  const reasoning = element("details", "reasoning");
  reasoning.append(element("summary", "", "Reasoning"), element("div", "reasoning-text"));
  const meta = footer(element("span", "stats"));
  if (actions) {
    meta.append(button("Regenerate", () => actions.regenerate(index), "Write this reply again"));
  }
  article.append(reasoning, element("div", "content markdown"),
    element("p", "error"), meta);
  updateReply(article, message, true);
  return article;
}

function footer(...children) {
  const meta = element("div", "meta");
  meta.append(...children);
  return meta;
}

// Bring a reply's element up to date; `final`: the reply is complete (decorate its code).
export function updateReply(article, message, final) {
  const reasoning = article.querySelector(".reasoning");
  reasoning.hidden = !message.reasoning;
  reasoning.querySelector("summary").textContent =
    final || message.content ? "Reasoning" : "Thinking…";
  reasoning.querySelector(".reasoning-text").textContent = message.reasoning ?? "";
  const content = article.querySelector(".content");
  renderMarkdown(content, message.content ?? "");
  content.classList.toggle("pending", !final && !message.content && !message.reasoning);
  const error = article.querySelector(".error");
  error.hidden = !message.error;
  error.textContent = message.error ?? "";
  error.setAttribute("role", message.error ? "alert" : "none");
  article.querySelector(".stats").textContent = stats(message);
  if (final) decorateCode(content);
}

// Swap a user message's text for an editor; `save(text)` runs on Enter or the Send button.
export function editMessage(article, text, save, cancel) {
  const content = article.querySelector(".content");
  const editor = element("textarea", "editor");
  editor.value = text;
  editor.rows = Math.min(12, text.split("\n").length + 1);
  editor.setAttribute("aria-label", "Edit message");
  const done = () => {
    if (editor.value.trim()) save(editor.value);
  };
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      done();
    } else if (event.key === "Escape") {
      event.stopPropagation();
      cancel();
    }
  });
  content.replaceWith(editor);
  article.querySelector(".meta").replaceChildren(
    button("Send", done, "Send the edited message; the replies after it are replaced"),
    button("Cancel", cancel));
  editor.focus();
}
