// The model picker: each model of GET /v1/models with where it stands, refreshed while one
// downloads or loads.
import { listModels } from "./api.js";

const BUSY_POLL_MS = 1000;

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(1)} GB`;
  return `${Math.max(1, Math.round(bytes / 1e6))} MB`;
}

// What a person needs to know of a model: a short state, whether it can chat, any progress.
export function describe(model) {
  if (model.kind === "embedding") return { text: "embeddings only, not for chat", chat: false };
  if (model.kind === "rerank") return { text: "reranker only, not for chat", chat: false };
  const download = model.download ?? {};
  switch (model.status) {
    case "loaded":
      return { text: "loaded", chat: true };
    case "loading":
      return { text: "loading…", chat: true, busy: true };
    case "downloading": {
      const total = download.total ?? model.size_bytes;
      const text = total
        ? `downloading ${Math.floor((100 * download.downloaded) / total)}% of ${size(total)}`
        : `downloading, ${size(download.downloaded ?? 0)} so far`;
      return { text, chat: true, busy: true, progress: total ? download.downloaded / total : null };
    }
    case "not_downloaded":
      return { text: model.size_bytes ? `needs download (${size(model.size_bytes)})`
        : "needs download", chat: true };
    case "failed":
      return { text: `failed: ${model.error ?? "unknown error"}`, chat: true };
    default: // on_disk
      return { text: model.size_bytes ? `on disk (${size(model.size_bytes)}), loads on first use`
        : "on disk, loads on first use", chat: true };
  }
}

export class ModelPicker {
  constructor({ select, status, progress, onError, onChange }) {
    Object.assign(this, { select, status, progress, onError, onChange });
    this.models = [];
    this.wanted = "";
    this.timer = null;
    select.addEventListener("change", () => {
      this.wanted = select.value;
      this.show();
      onChange(select.value);
    });
  }

  // The model a new conversation starts with: the first loaded chat model, else any chat one.
  preferred() {
    const chat = this.models.filter((m) => describe(m).chat);
    return (chat.find((m) => m.status === "loaded") ?? chat[0])?.id ?? "";
  }

  async refresh() {
    clearTimeout(this.timer);
    try {
      this.models = await listModels();
    } catch (error) {
      this.onError(error);
      return;
    }
    this.select.replaceChildren(...this.models.map((model) => {
      const { text, chat } = describe(model);
      const option = new Option(`${model.id} · ${text}`, model.id);
      option.disabled = !chat;
      return option;
    }));
    this.pick(this.wanted);
    if (this.models.some((m) => describe(m).busy)) {
      this.timer = setTimeout(() => this.refresh(), BUSY_POLL_MS);
    }
  }

  // Show `id` as picked (a model the list no longer has stays, marked as missing).
  pick(id) {
    this.wanted = id;
    if (id && !this.models.some((m) => m.id === id) && this.models.length > 0) {
      this.select.append(new Option(`${id} · not on this server`, id));
    }
    this.select.value = id;
    this.show();
  }

  show() {
    const model = this.models.find((m) => m.id === this.select.value);
    const info = model ? describe(model) : { text: "" };
    this.status.textContent = info.text;
    this.status.title = info.text;
    this.progress.hidden = info.progress === undefined;
    if (info.progress === null) this.progress.removeAttribute("value");
    else if (info.progress !== undefined) this.progress.value = info.progress;
  }
}
