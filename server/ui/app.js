// The chat page: conversations kept in this browser, a model picker, replies streamed from
// POST v1/chat/completions. A plain client: the server does nothing for it that it would not
// do for any other.
import { ApiError, streamChat } from "./api.js";
import { createMessage, editMessage, updateReply } from "./messages.js";
import { KeyDialog } from "./keys.js";
import { ModelPicker } from "./models.js";
import { loadConversations, newConversation, prefs, saveConversations } from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: document.querySelector(".app"), list: $("conversations"), messages: $("messages"),
  input: $("input"), composer: $("composer"), send: $("send"), stop: $("stop"),
  settings: ["system", "temperature", "top_p", "max_tokens"].map($),
  theme: $("theme-button"), sidebarButton: $("sidebar-button"),
};
const THEMES = ["auto", "light", "dark"];
const state = {
  conversations: loadConversations(),
  current: prefs.get("current"),
  streaming: null, // {controller, conversation, reply, index} while a reply streams
};
const keys = new KeyDialog($("key-dialog"));
const picker = new ModelPicker({
  select: $("model"), status: $("model-status"), progress: $("model-progress"),
  onError: modelsFailed,
  onChange(model) {
    conversation().model = model;
    prefs.set("model", model);
    save();
  },
});

function conversation() {
  return state.conversations.find((c) => c.id === state.current);
}

function save() {
  saveConversations(state.conversations);
}

// ---- conversations ----------------------------------------------------------------------

function select(id) {
  state.current = id;
  prefs.set("current", id);
  showSidebar(false);
  renderList();
  renderConversation();
}

function startConversation() {
  const current = conversation();
  if (current && current.messages.length === 0) {
    ui.input.focus();
    return;
  }
  const created = newConversation(picker.select.value || prefs.get("model") || "");
  state.conversations.push(created);
  save();
  select(created.id);
  ui.input.focus();
}

function remove(id) {
  if (state.streaming?.conversation.id === id) state.streaming.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  save();
  const next = [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
  if (state.current !== id) renderList();
  else if (next) select(next.id);
  else startConversation();
}

function renderList() {
  const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
  ui.list.replaceChildren(...sorted.map((c) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => select(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete icon";
    del.textContent = "✕";
    del.setAttribute("aria-label", `Delete conversation “${c.title}”`);
    del.addEventListener("click", () => remove(c.id));
    item.append(open, del);
    return item;
  }));
}

function renderConversation() {
  const conv = conversation();
  picker.pick(conv.model || picker.preferred());
  ui.settings.forEach((input) => { input.value = conv.settings[input.id] ?? ""; });
  renderMessages();
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderMessages() {
  const conv = conversation();
  const actions = state.streaming ? null : { edit, regenerate };
  const nodes = conv.messages.map((message, i) => createMessage(message, i, actions));
  if (nodes.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Pick a model and send a message. Conversations stay in this browser.";
    nodes.push(empty);
  }
  ui.messages.replaceChildren(...nodes);
}

function edit(index) {
  const conv = conversation();
  const article = ui.messages.querySelector(`[data-index="${index}"]`);
  editMessage(article, conv.messages[index].content, (text) => {
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  }, renderMessages);
}

function regenerate(index) {
  const conv = conversation();
  conv.messages = conv.messages.slice(0, index);
  generate(conv);
}

// ---- replies ----------------------------------------------------------------------------

function requestBody(conv) {
  const s = conv.settings;
  const messages = s.system.trim() ? [{ role: "system", content: s.system }] : [];
  for (const m of conv.messages) {
    if (m.role === "user" || m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: conv.model, messages, stream: true,
    stream_options: { include_usage: true } };
  for (const field of ["temperature", "top_p", "max_tokens"]) {
    if (s[field] !== "" && s[field] !== undefined) body[field] = Number(s[field]);
  }
  return body;
}

async function generate(conv) {
  const reply = { role: "assistant", content: "", reasoning: "", model: conv.model };
  const body = requestBody(conv);
  conv.messages.push(reply);
  conv.updated = Date.now();
  const controller = new AbortController();
  state.streaming = { controller, conversation: conv, reply, index: conv.messages.length - 1 };
  setBusy(true);
  save();
  renderList();
  renderMessages();
  ui.messages.scrollTop = ui.messages.scrollHeight;
  const showLoading = setTimeout(() => picker.refresh(), 700); // a model that loads first
  const started = performance.now();
  let first;
  let unauthorized = null;
  try {
    for await (const chunk of streamChat(body, controller.signal)) {
      const choice = chunk.choices?.[0];
      const delta = choice?.delta ?? {};
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      first ??= delta.content || delta.reasoning_content ? performance.now() : undefined;
      if (choice?.finish_reason) reply.finish = choice.finish_reason;
      if (chunk.usage) reply.usage = chunk.usage;
      scheduleDraw();
    }
  } catch (error) {
    if (controller.signal.aborted) reply.stopped = true;
    else if (error instanceof ApiError && error.status === 401) unauthorized = error;
    else reply.error = error.message;
  }
  clearTimeout(showLoading);
  timeReply(reply, started, first, performance.now());
  draw(true);
  state.streaming = null;
  setBusy(false);
  if (unauthorized) {
    conv.messages.pop();
    if (state.current === conv.id) renderMessages();
    if (await keys.ask(unauthorized.message)) return generate(conv);
    reply.error = unauthorized.message;
    conv.messages.push(reply);
  }
  save();
  if (state.current === conv.id) renderMessages();
  picker.refresh();
}

function timeReply(reply, started, first, end) {
  if (first === undefined) return;
  reply.firstTokenS = (first - started) / 1000;
  const tokens = reply.usage?.completion_tokens ?? 0;
  // speed after the first token: the first one also waited for the prompt
  if (tokens > 1 && end > first) reply.rate = (tokens - 1) / ((end - first) / 1000);
}

let frame = 0;

function scheduleDraw() {
  frame ||= requestAnimationFrame(() => {
    frame = 0;
    draw(false);
  });
}

function draw(final) {
  const streaming = state.streaming;
  if (!streaming || streaming.conversation.id !== state.current) return;
  const article = ui.messages.querySelector(`[data-index="${streaming.index}"]`);
  if (!article) return;
  const box = ui.messages;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  updateReply(article, streaming.reply, final);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

function stop() {
  state.streaming?.controller.abort();
}

// ---- models and page ---------------------------------------------------------------------

async function modelsFailed(error) {
  if (error instanceof ApiError && error.status === 401) {
    if (await keys.ask(error.message)) picker.refresh();
    else picker.status.textContent = error.message;
    return;
  }
  picker.status.textContent = `Could not list models: ${error.message}`;
}

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  ui.theme.textContent = `Theme: ${theme}`;
  prefs.set("theme", theme === "auto" ? null : theme);
}

function showSidebar(open) { // on narrow screens the sidebar slides over the chat
  ui.app.classList.toggle("sidebar-open", open);
  ui.sidebarButton.setAttribute("aria-expanded", String(open));
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 60 ? `${line.slice(0, 59)}…` : line;
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${ui.input.scrollHeight}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value;
  if (!text.trim() || state.streaming) return;
  const conv = conversation();
  conv.model = picker.select.value || conv.model;
  if (conv.messages.length === 0) conv.title = titleOf(text);
  conv.messages.push({ role: "user", content: text });
  ui.input.value = "";
  autosize();
  generate(conv);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", autosize);
ui.stop.addEventListener("click", stop);
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || keys.open) return;
  if (ui.app.classList.contains("sidebar-open")) showSidebar(false);
  else stop();
});
ui.settings.forEach((input) => input.addEventListener("input", () => {
  conversation().settings[input.id] = input.value;
  save();
}));
$("new-chat").addEventListener("click", startConversation);
ui.sidebarButton.addEventListener("click", () => showSidebar(true));
document.addEventListener("click", (event) => {
  if (event.target !== ui.sidebarButton && !$("sidebar").contains(event.target)) {
    showSidebar(false);
  }
});
ui.theme.addEventListener("click", () => {
  const now = document.documentElement.dataset.theme ?? "auto";
  applyTheme(THEMES[(THEMES.indexOf(now) + 1) % THEMES.length]);
});
$("key-button").addEventListener("click", async () => {
  if (await keys.ask("")) picker.refresh();
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && !state.streaming) picker.refresh();
});

applyTheme(document.documentElement.dataset.theme ?? "auto");
if (!conversation()) startConversation();
else select(state.current);
picker.refresh().then(() => {
  const conv = conversation();
  conv.model ||= picker.preferred();
  picker.pick(conv.model);
});
