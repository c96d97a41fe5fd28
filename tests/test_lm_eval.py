"""lm-evaluation-harness, the real client, against the server: `local-completions` with the
server's own tokenizer endpoints (auto-detected, so no Hugging Face tokenizer is downloaded).

Its accuracy must equal the accuracy computed directly from llama-cpp-python on the same items:
multiple choice ranked by the summed log-probabilities of each answer's tokens, and greedy
generation scored by exact match.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_cpp import Llama

from tests.conftest import ROOT, LiveServer, log_softmax, reference_llama

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
DATA = ROOT / "tests" / "data" / "lm_eval"
MC_TEXT = "Question: {question}\nAnswer:"
GEN_TEXT = "Q: {question}\nA:"
MAX_GEN = 8

TASKS = """
task: ggserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
---
task: ggserve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
  temperature: 0
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


def docs(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]


def run_harness(server: LiveServer, tmp: Path) -> dict[str, Any]:
    for name, text in zip(("mc", "gen"), TASKS.split("---"), strict=True):
        (tmp / f"{name}.yaml").write_text(text.format(data=DATA, max_gen=MAX_GEN))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"model={MODEL},base_url={server.url}/v1/completions,"
            "num_concurrent=1,max_retries=1,max_length=2048",
            "--tasks", "ggserve_mc,ggserve_gen", "--include_path", str(tmp),
            "--output_path", str(tmp / "out")]
    done = subprocess.run(args, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Using remote tokenizer" in done.stderr or "remote" in done.stderr
    (results,) = (tmp / "out").rglob("results_*.json")
    return json.loads(results.read_text())["results"]  # type: ignore[no-any-return]


def reference_mc(llm: Llama) -> float:
    """Accuracy by summed answer-token log-probabilities, split as the harness splits."""
    def tok(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=True)

    correct = 0
    for doc in docs("mc.jsonl"):
        context = MC_TEXT.format(**doc)
        scores = []
        for choice in doc["choices"]:
            whole, ctx = tok(context + " " + choice), tok(context)
            dist = log_softmax(llm, whole)
            scores.append(sum(dist[p - 1, whole[p]] for p in range(len(ctx), len(whole))))
        correct += int(np.argmax(scores)) == doc["answer"]
    return correct / len(docs("mc.jsonl"))


def reference_gen(llm: Llama) -> float:
    """Exact match of greedy answers (up to a newline), as the task's filters score them."""
    def norm(text: str) -> str:
        return text.lower().translate(str.maketrans("", "", string.punctuation))

    correct = 0
    for doc in docs("gen.jsonl"):
        tokens = llm.tokenize(GEN_TEXT.format(**doc).encode(), add_bos=False, special=True)
        out = b""
        for _ in range(MAX_GEN):
            token = int(np.argmax(log_softmax(llm, tokens)[-1]))
            if llm.token_eos() == token:
                break
            tokens.append(token)
            out += llm.detokenize([token])
            if b"\n" in out:
                break
        answer = out.decode(errors="replace").split("\n")[0].lstrip()
        correct += norm(answer) == norm(doc["answer"])
    return correct / len(docs("gen.jsonl"))


def test_lm_eval_accuracy_equals_llama_cpp_logprobs(server: LiveServer, tmp_path: Path,
                                                    smollm2_path: Path) -> None:
    results = run_harness(server, tmp_path)
    llm = reference_llama(smollm2_path, n_ctx=512, logits_all=True, flash_attn=True)
    assert results["ggserve_mc"]["acc,none"] == pytest.approx(reference_mc(llm))
    assert results["ggserve_gen"]["exact_match,strip"] == pytest.approx(reference_gen(llm))
    # not a vacuous comparison: the model gets some right and some wrong
    assert results["ggserve_mc"]["acc,none"] > 0
