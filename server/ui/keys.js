// The API key dialog: opened when the API answers 401, with the server's reason; the key is
// kept in this browser (api.js sends it as `Authorization: Bearer`).
import { prefs } from "./store.js";

export class KeyDialog {
  constructor(dialog) {
    this.dialog = dialog;
    this.message = dialog.querySelector("#key-message");
    this.input = dialog.querySelector("#key-input");
    this.waiting = [];
    dialog.querySelector("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      prefs.set("apiKey", this.input.value.trim());
      this.close(true);
    });
    dialog.querySelector("#key-cancel").addEventListener("click", () => this.close(false));
    dialog.querySelector("#key-clear").addEventListener("click", () => {
      prefs.set("apiKey", null);
      this.close(false);
    });
    dialog.addEventListener("close", () => this.close(false)); // Escape too
  }

  get open() {
    return this.dialog.open;
  }

  // Resolves true once a key is saved, false if the person declines.
  ask(message) {
    this.message.textContent = message ?? "";
    this.message.hidden = !message;
    this.input.value = "";
    if (!this.dialog.open) this.dialog.showModal();
    this.input.focus();
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  close(saved) {
    const waiting = this.waiting;
    this.waiting = [];
    if (this.dialog.open) this.dialog.close();
    waiting.forEach((answer) => answer(saved));
  }
}
