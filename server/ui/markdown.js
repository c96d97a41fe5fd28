// A reply's Markdown as safe HTML: marked renders, DOMPurify strips anything that could run
// code or load from elsewhere; code blocks get highlighting (loaded on first use) and a copy
// button.
import { marked } from "./vendor/marked-18.2.1/marked.esm.js";
import "./vendor/dompurify-3.4.18/purify.min.js"; // a UMD file: it defines globalThis.DOMPurify

const DOMPurify = globalThis.DOMPurify;
const HLJS = "./vendor/highlight.js-11.12.0";
const LANGUAGES = ["bash", "c", "cpp", "diff", "go", "java", "javascript", "json", "python",
  "rust", "shell", "sql", "typescript", "xml", "yaml"];
// No images or media (the page loads nothing from elsewhere), no forms, no inline styles.
const PURIFY = {
  FORBID_TAGS: ["img", "picture", "video", "audio", "source", "svg", "math", "style", "form",
    "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style", "srcset"],
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true }), PURIFY);
}

let highlighter;

function loadHighlighter() {
  highlighter ??= Promise.all([
    import(`${HLJS}/core.min.js`),
    ...LANGUAGES.map((name) => import(`${HLJS}/languages/${name}.min.js`)),
  ]).then(([core, ...grammars]) => {
    const hljs = core.default;
    grammars.forEach((grammar, i) => hljs.registerLanguage(LANGUAGES[i], grammar.default));
    return hljs;
  });
  return highlighter;
}

// Copy buttons and highlighting for the finished code blocks under `element`.
export async function decorateCode(element) {
  const blocks = [...element.querySelectorAll("pre > code")];
  if (blocks.length === 0) return;
  for (const code of blocks) addCopyButton(code);
  const hljs = await loadHighlighter().catch((error) => console.warn(error));
  if (!hljs) return;
  for (const code of blocks) {
    const language = /\blanguage-(\S+)/.exec(code.className)?.[1];
    if (code.isConnected && (!language || hljs.getLanguage(language))) {
      hljs.highlightElement(code);
    }
  }
}

function addCopyButton(code) {
  const pre = code.parentElement;
  const block = document.createElement("div");
  block.className = "code-block";
  pre.replaceWith(block);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    button.textContent = (await copyText(code.textContent)) ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  block.append(button, pre);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // no clipboard API (plain http off localhost): the older way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}
