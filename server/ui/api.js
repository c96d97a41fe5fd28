// The server's API, by relative URLs so that the page works under a proxy's path prefix.
import { prefs } from "./store.js";

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function headers(json) {
  const result = json ? { "Content-Type": "application/json" } : {};
  const key = prefs.get("apiKey");
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// The server's own words: error.message of its JSON envelope, else the body as it came.
async function errorOf(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text)?.error?.message;
    if (typeof message === "string") {
      return new ApiError(message, response.status, JSON.parse(text).error.code);
    }
  } catch {
    // not JSON (a proxy's page): show the text
  }
  return new ApiError(text.trim() || `${response.status} ${response.statusText}`,
                      response.status);
}

export async function listModels() {
  const response = await fetch("v1/models", { headers: headers(false), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  return (await response.json()).data;
}

// The chunks of a streamed chat completion; an in-band error (`data: {"error": …}`) throws.
export async function* streamChat(body, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) {
      throw new ApiError(chunk.error.message ?? JSON.stringify(chunk.error), response.status,
                         chunk.error.code);
    }
    yield chunk;
  }
}

// Server-sent events: events end at a blank line, their `data:` lines are joined, and other
// lines (`: ping` comments, `event:`) are skipped.
async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  const boundary = /\r?\n\r?\n/;
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let end = boundary.exec(buffer); end; end = boundary.exec(buffer)) {
      const data = buffer.slice(0, end.index).split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
        .join("\n");
      buffer = buffer.slice(end.index + end[0].length);
      if (data) yield data;
    }
  }
}
