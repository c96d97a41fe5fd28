"""The tokens a reranker reads for one query-document pair, as llama-server's
format_prompt_rerank builds them (tools/server/server-common.cpp)."""

from __future__ import annotations

import re

import llama_cpp as lc

from server.chat.template import Segment
from server.engine.llama.native import NativeModel
from server.engine.llama.vocab import read_prompt
from server.errors import InvalidRequest

# The key llama_model_chat_template(model, "rerank") reads.
RERANK_TEMPLATE = "tokenizer.chat_template.rerank"
_SLOTS = re.compile(r"(\{query\}|\{document\})")


def pair_tokens(model: NativeModel, query: str, document: str) -> list[int]:
    """The GGUF's rerank template (Qwen3-Reranker's) with `{query}` and `{document}` filled
    in, else [BOS] query [EOS] [SEP] document [EOS] with each marker the vocabulary asks for
    (BERT and XLM-RoBERTa cross-encoders: `<s> query </s></s> document </s>`).

    The client's text is never read as special tokens (llama-server parses the template's
    filled-in text whole, so a document holding `<|im_end|>` would end the prompt there).
    """
    template = model.meta(RERANK_TEMPLATE)
    if template is not None:
        texts = {"{query}": query, "{document}": document}
        prompt = tuple(Segment(texts[part], special=False) if part in texts
                       else Segment(part, special=True)
                       for part in _SLOTS.split(template) if part)
        return read_prompt(model, prompt, add_bos=False)[0]
    vocab = model.vocab
    sep = int(lc.llama_vocab_sep(vocab))
    eos = model.eos if model.eos != lc.LLAMA_TOKEN_NULL else sep
    end = [eos] if lc.llama_vocab_get_add_eos(vocab) else []
    tokens = [model.bos] if model.add_bos else []
    tokens += model.tokenize(query, parse_special=False) + end
    if lc.llama_vocab_get_add_sep(vocab):
        tokens.append(sep)
    return tokens + model.tokenize(document, parse_special=False) + end


def check_pair(tokens: list[int], index: int, n_ctx: int) -> list[int]:
    """`tokens` when a context of `n_ctx` holds them; else InvalidRequest naming document
    `index`."""
    if not tokens:
        raise InvalidRequest(f"Document {index} and the query are both empty; send some text.",
                             param="documents")
    if len(tokens) > n_ctx:
        raise InvalidRequest(
            f"Document {index} with the query is {len(tokens)} tokens; this reranker reads at "
            f"most {n_ctx} tokens per pair. Shorten the query or the document.",
            param="documents", code="context_length_exceeded")
    return tokens
