"""Tiny GGUFs with the vocabularies and token types of the target formats, loaded as the
engine loads them (no weight repacking)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.engine.llama.native import NativeModel, init_backend
from tests.gguf_factory import write_gguf

ALFRED_TOKENS = ("<start_system>", "<start_user>", "<start_assistant>", "<end_message>")
VOCABS: dict[str, dict[str, Any]] = {
    # SentencePiece (OpenChat-3.5, Mistral/Pearl): add_space_prefix, BOS.
    "spm": {"arch": "llama", "special_tokens": ["<|end_of_turn|>", "[INST]", "[/INST]"]},
    # Byte-level BPE as GPT-NeoX converts (StableLM, Memphis): ChatML control tokens, and its
    # runs of spaces as user-defined tokens, which llama.cpp splits out even of plain text.
    "bpe": {"arch": "stablelm", "tokenizer": "gpt2", "add_bos": False,
            "special_tokens": ["<|im_start|>", "<|im_end|>"],
            "user_defined_tokens": ["  ", "   ", "    "]},
    # Falcon's BPE and pre-tokenizer with Alfred's control tokens.
    "falcon": {"arch": "falcon", "tokenizer": "falcon", "add_bos": False,
               "special_tokens": ALFRED_TOKENS},
    # Phi-3's name makes llama.cpp strip the whitespace after its special tokens (RSTRIP).
    "phi3": {"arch": "llama", "name": "Phi-3-mini-tiny",
             "special_tokens": ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]},
}


@contextmanager
def vocab_models(directory: Path) -> Iterator[dict[str, NativeModel]]:
    """Each of VOCABS written under `directory` and loaded; closed on exit."""
    init_backend()
    models = {kind: NativeModel(write_gguf(directory / f"{kind}.gguf", **options),
                                n_gpu_layers=0, repack=False)
              for kind, options in VOCABS.items()}
    try:
        yield models
    finally:
        for model in models.values():
            model.close()
