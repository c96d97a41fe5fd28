"""What a grammar costs the scheduler thread, per token, on the real model (no server).

Samples the json_schema request of bench/isolation.py (temperature 0.7, top-k 40, top-p 0.9,
min-p 0.05) for --seeds x --tokens tokens with
SequenceSampler on one llama.cpp context (the default model, 2 threads) and times its parts:
a token (`sample`, refusals included), a refusal the best candidates decide
(`_sample_from_prefix`), one only the whole vocabulary decides (`resolve`: in the server it runs
on a worker thread), the one-token check (`_allowed`). `--plain` times a sequence without a
grammar for comparison. `--digest` prints a hash of the tokens picked under several chains
(plain, penalties, logit bias, no top-k, greedy): equal digests from two checkouts
(`--checkout DIR`) mean they sample alike.

    .venv/bin/python bench/grammar_cost.py [--plain] [--digest] [--checkout /tmp/base]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("sample", "_sample_from_prefix", "resolve", "_allowed")
CHAINS: dict[str, dict[str, Any]] = {
    "plain": {}, "penalties": {"repeat_penalty": 1.3},
    "bias": {"logit_bias": {198: 2.0, 28: -1.0}}, "no top-k": {"top_k": 0, "min_p": 0.0},
    "greedy": {"temperature": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="whose server/ to import")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--plain", action="store_true", help="no grammar")
    parser.add_argument("--digest", action="store_true")
    args = parser.parse_args()
    sys.path[:0] = [str(args.checkout), str(ROOT)]

    from bench.isolation import SCHEMA
    from bench.servers import default_model_file
    from server.engine.base import Grammar, SamplingParams
    from server.engine.llama.native import NativeModel, init_backend
    from server.engine.llama.sampling import SequenceSampler, parse_grammar
    from server.grammar.json_schema import json_schema_grammar
    from tests.engine.test_sampling import Context

    init_backend()
    model = NativeModel(default_model_file(), n_gpu_layers=0, repack=False)
    prompt = model.tokenize("<|im_start|>user\nDescribe a person.<|im_end|>\n"
                            "<|im_start|>assistant\n", parse_special=True)
    ctx = Context(model)

    def run(params: dict[str, Any], seed: int, grammar: bool) -> list[int]:
        g = parse_grammar(model.vocab, Grammar(json_schema_grammar(SCHEMA))) if grammar else None
        sampler = SequenceSampler(SamplingParams(**{"temperature": 0.7, "top_p": 0.9,
                                                    "top_k": 40, "min_p": 0.05, **params}),
                                  model.n_vocab, seed, g)
        try:
            return ctx.generate(sampler, prompt, args.tokens)
        finally:
            sampler.close()

    if args.digest:
        for name, params in CHAINS.items():
            tokens = [run(params, seed, True) for seed in range(args.seeds)]
            print(f"{name:10} {hashlib.sha1(str(tokens).encode()).hexdigest()[:12]}")
        return
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent[name] += time.perf_counter() - began
                calls[name] += 1
        return wrapper

    for name in PARTS:
        if hasattr(SequenceSampler, name):
            setattr(SequenceSampler, name, timed(name, getattr(SequenceSampler, name)))
    for seed in range(args.seeds):
        run({}, seed, not args.plain)
    print(f"{'part':22} {'calls':>6} {'µs per call':>12} {'ms in all':>10}")
    for name in PARTS:
        if calls[name]:
            print(f"{name:22} {calls[name]:6} {spent[name] / calls[name] * 1e6:12.1f} "
                  f"{spent[name] * 1e3:10.1f}")
    if calls["resolve"]:  # in the server that part runs on a worker thread
        print(f"on the scheduler thread, a token takes "
              f"{(spent['sample'] - spent['resolve']) / calls['sample'] * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
