"""Family and reasoning detection on llama.cpp's corpus of real chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.chat.families import GENERIC, detect_family, prompt_family
from server.chat.families.reasoning import Reasoning, reasoning_for
from server.chat.tools import plan_tools

CORPUS = Path(__file__).parents[2] / "data" / "chat_templates"


def template(name: str) -> str:
    return (CORPUS / f"{name}.jinja").read_text()


@pytest.mark.parametrize(("name", "family"), [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes"),
    ("Qwen-Qwen3-0.6B", "hermes"),
    ("Qwen-QwQ-32B", "hermes"),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "hermes"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
    ("Qwen3-Coder", "qwen3_coder"),
    ("Qwen3.5-4B", "qwen3_coder"),
    ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "qwen3_coder"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3"),
    ("meta-llama-Llama-3.3-70B-Instruct", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "mistral_args"),
    ("unsloth-mistral-Devstral-Small-2507", "mistral_args"),
    ("mistralai-Ministral-3-14B-Reasoning-2512", "mistral_args"),
    # formats of their own: the generic family describes Hermes-style calls to them
    ("meetkai-functionary-medium-v3.1", "generic"),
    ("GLM-4.6", "generic"),
    ("MiniMax-M3", "generic"),
    ("google-gemma-2-2b-it", "generic"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "generic"),
])
def test_family_from_the_template(name: str, family: str) -> None:
    assert detect_family(template(name)).name == family
    assert prompt_family(template(name)).name == family  # each renders `tools` itself


def test_every_corpus_template_gets_a_family() -> None:
    names = {detect_family(path.read_text()).name for path in CORPUS.glob("*.jinja")}
    assert names == {"hermes", "qwen3_coder", "llama3", "mistral", "mistral_args", "generic"}


def test_a_template_without_tools_gets_the_described_generic_family() -> None:
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% endfor %}<tool_call>")
    assert detect_family(chatml).name == "hermes"
    assert prompt_family(chatml) is GENERIC
    assert prompt_family(None) is GENERIC


def test_the_plan_uses_the_family_grammar_and_trigger() -> None:
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    llama = plan_tools(tools, "auto", None, template("meta-llama-Llama-3.1-8B-Instruct"))
    assert llama is not None and llama.family.name == "llama3"
    assert llama.trigger_pattern.startswith("^") and "parameters" in llama.gbnf
    nemo = plan_tools(tools, "required", None, template("mistralai-Mistral-Nemo-Instruct-2407"))
    assert nemo is not None and (nemo.lazy, nemo.trigger_pattern) == (False, "")
    assert "[TOOL_CALLS]" in nemo.gbnf


def test_reasoning_from_the_template() -> None:
    qwen3 = template("Qwen-Qwen3-0.6B")
    assert reasoning_for(qwen3, (), None) == Reasoning("</think>", "<think>")
    assert reasoning_for(template("Qwen-Qwen2.5-7B-Instruct"), (), None) is None
    assert reasoning_for(template("mistralai-Ministral-3-14B-Reasoning-2512"), (), None) == \
        Reasoning("[/THINK]", "[THINK]")
    assert reasoning_for(None, (), "\n### Answer:\n") == Reasoning("\n### Answer:\n")


class Segment:
    def __init__(self, text: str) -> None:
        self.text = text


def test_a_prompt_that_opens_the_rationale() -> None:
    r1 = template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    opened = (Segment("User: Hi"), Segment("Assistant:<think>\n"))  # the prompt opens it
    assert reasoning_for(r1, opened, None) == Reasoning("</think>")
    closed = (Segment("<|im_start|>assistant\n<think>\n\n</think>\n\n"),)
    assert reasoning_for(template("Qwen-Qwen3-0.6B"), closed, None) == \
        Reasoning("</think>", "<think>")
