// What the page keeps: conversations and preferences, in this browser's localStorage only.

const CONVERSATIONS = "ggserve.conversations";

export const prefs = {
  get(name) {
    try {
      return localStorage.getItem(`ggserve.${name}`);
    } catch {
      return null;
    }
  },
  set(name, value) {
    try {
      if (value === null || value === "") localStorage.removeItem(`ggserve.${name}`);
      else localStorage.setItem(`ggserve.${name}`, value);
    } catch {
      // storage off or full: the preference lasts until the page closes
    }
  },
};

export function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(CONVERSATIONS) ?? "[]");
    return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
  } catch {
    return [];
  }
}

export function saveConversations(list) {
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
  } catch (error) {
    console.warn("conversations not saved:", error);
  }
}

export function newConversation(model) {
  return {
    // not crypto.randomUUID(): it exists only in secure contexts, and plain http is common here
    id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8),
    title: "New chat",
    model,
    // empty fields: the model's registry defaults (sampling) or the server's (max tokens)
    settings: { system: "", temperature: "", top_p: "", max_tokens: "" },
    messages: [],
    updated: Date.now(),
  };
}
