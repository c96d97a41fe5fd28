"""Golden tests: each target model's prompt format, byte for byte as its card shows it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.chat.families.reasoning import Reasoning, ReasoningSplitter
from server.chat.template import prompt_text, render_chat
from server.engine.llama import vocab
from server.engine.llama.native import NativeModel
from server.registry import Registry
from server.settings import Settings
from tests.vocab_models import vocab_models

SYSTEM = {"role": "system", "content": "You are terse."}
Q1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
Q2 = {"role": "user", "content": "And 3+3?"}


@pytest.fixture(scope="module")
def registry() -> Registry:
    s = Settings()
    return Registry.load(s.models_file, s.templates_dir, s.models_dir)


def render(registry: Registry, model: str, messages: list[dict[str, str]]) -> str:
    template = registry.template_source(registry.get(model))
    assert template is not None
    return prompt_text(render_chat(template, messages, bos_token="<s>", eos_token="</s>"))


GOLDEN = {
    "memphis-cot-3b": {
        "single": "### User:\nWhat is 2+2?\n### Assistant:\n",
        "multi": "### User:\nWhat is 2+2?\n### Assistant:\n4\n### User:\nAnd 3+3?\n"
                 "### Assistant:\n",
        "system": "### User:\nYou are terse.\n\nWhat is 2+2?\n### Assistant:\n",
    },
    "memphis-cot-3b-reasoning": {
        "single": "### User:\nWhat is 2+2?\n### Rationale:\n",
        "multi": "### User:\nWhat is 2+2?\n### Answer:\n4\n### User:\nAnd 3+3?\n### Rationale:\n",
        "system": "### User:\nYou are terse.\n\nWhat is 2+2?\n### Rationale:\n",
    },
    "openchat-3.5-0106": {
        "single": "<s>GPT4 Correct User: What is 2+2?<|end_of_turn|>GPT4 Correct Assistant:",
        "multi": "<s>GPT4 Correct User: What is 2+2?<|end_of_turn|>GPT4 Correct Assistant: 4"
                 "<|end_of_turn|>GPT4 Correct User: And 3+3?<|end_of_turn|>"
                 "GPT4 Correct Assistant:",
        "system": "<s>GPT4 Correct System: You are terse.<|end_of_turn|>GPT4 Correct User: "
                  "What is 2+2?<|end_of_turn|>GPT4 Correct Assistant:",
    },
    "alfred-40b-1023": {
        "single": "<start_user>What is 2+2?<end_message><start_assistant>",
        "multi": "<start_user>What is 2+2?<end_message><start_assistant>4<end_message>"
                 "<start_user>And 3+3?<end_message><start_assistant>",
        "system": "<start_system>You are terse.<end_message><start_user>What is 2+2?"
                  "<end_message><start_assistant>",
    },
}
CONVERSATIONS = {"single": [Q1], "multi": [Q1, A1, Q2], "system": [SYSTEM, Q1]}


@pytest.mark.parametrize(("model", "case"), [(m, c) for m in GOLDEN for c in CONVERSATIONS])
def test_format_renders_byte_for_byte(registry: Registry, model: str, case: str) -> None:
    assert render(registry, model, CONVERSATIONS[case]) == GOLDEN[model][case]


# Each target's kind of vocabulary: Memphis is GPT-NeoX's byte-level BPE, OpenChat
# SentencePiece, Alfred Falcon's BPE.
VOCAB_KINDS = {"memphis-cot-3b": "bpe", "memphis-cot-3b-reasoning": "bpe",
               "openchat-3.5-0106": "spm", "alfred-40b-1023": "falcon"}


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NativeModel]]:
    with vocab_models(tmp_path_factory.mktemp("vocabs")) as models:
        yield models


@pytest.mark.parametrize(("model", "case"), [(m, c) for m in GOLDEN for c in CONVERSATIONS])
def test_format_reads_the_tokens_of_its_golden_text(registry: Registry,
                                                    vocabs: dict[str, NativeModel], model: str,
                                                    case: str) -> None:
    """The tokens are the model's tokenizer's on the whole golden text, special tokens parsed
    (not the message tokenized apart, which gives SentencePiece a second space)."""
    vocab_model = vocabs[VOCAB_KINDS[model]]
    template = registry.template_source(registry.get(model))
    assert template is not None
    prompt = render_chat(template, CONVERSATIONS[case], bos_token="<s>", eos_token="</s>",
                         special_tokens=vocab.special_texts(vocab_model))
    tokens, _ = vocab.read_prompt(vocab_model, prompt, add_bos=False)
    assert tokens == vocab_model.tokenize(GOLDEN[model][case], parse_special=True)


def test_memphis_reasoning_history_keeps_a_returned_rationale(registry: Registry) -> None:
    answer = {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}
    assert render(registry, "memphis-cot-3b-reasoning", [Q1, answer, Q2]) == (
        "### User:\nWhat is 2+2?\n### Rationale:\nTwo and two.\n### Answer:\n4\n"
        "### User:\nAnd 3+3?\n### Rationale:\n")


def test_base_model_and_embedded_template_entries(registry: Registry) -> None:
    assert registry.get("stablelm-3b-4e1t").chat_template_off
    assert registry.template_source(registry.get("stablelm-3b-4e1t")) is None
    assert registry.get("pearl-7b-slerp").template is None  # the GGUF's own template
    assert registry.get("alfred-40b-1023").rope.freq_base == pytest.approx(52664.434)


def test_card_defaults_are_in_the_registry(registry: Registry) -> None:
    memphis = registry.get("memphis-cot-3b").sampling
    assert (memphis.temperature, memphis.top_p, memphis.max_tokens) == (0.5, 0.8, 512)
    pearl = registry.get("pearl-7b-slerp").sampling
    assert (pearl.temperature, pearl.top_k, pearl.top_p) == (0.7, 50, 0.95)
    stablelm = registry.get("stablelm-3b-4e1t")
    assert (stablelm.sampling.temperature, stablelm.sampling.top_p, stablelm.n_ctx) == \
        (0.75, 0.95, 4096)
    assert registry.get("alfred-40b-1023").stop == ("<end_message>",)
    assert registry.get("alfred-40b-1023").sampling.top_k == 3
    assert registry.get("openchat-3.5-0106").stop == ("<|end_of_turn|>",)


def test_quant_tags_pick_published_files(registry: Registry) -> None:
    assert registry.get("memphis-cot-3b").file_name == "Memphis-CoT-3B.Q4_K_M.gguf"
    tagged = registry.get("memphis-cot-3b:Q8_0")
    assert (tagged.id, tagged.file_name) == ("memphis-cot-3b:Q8_0", "Memphis-CoT-3B.Q8_0.gguf")
    assert registry.get("stablelm-3b-4e1t:Q5_K_M").file_name == "stablelm-3b-4e1t-Q5_K_M.gguf"
    with pytest.raises(Exception, match="does not exist"):
        registry.get("memphis-cot-3b:Q9_9")


@pytest.mark.parametrize("pieces", [
    ["Two plus two", " is four.\n### Answer:\n4"],
    ["Two plus two is four.\n", "### Ans", "wer:\n", "4"],
    ["Two plus two is four.", "\n### Answer:\n4"],
])
def test_reasoning_split_across_any_piece_boundary(pieces: list[str]) -> None:
    splitter = ReasoningSplitter(Reasoning("\n### Answer:\n"))
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.flush()
    reasoning = "".join(t for k, t in parts if k == "reasoning_content")
    content = "".join(t for k, t in parts if k == "content")
    assert (reasoning, content) == ("Two plus two is four.", "4")
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # rationale first, then answer
