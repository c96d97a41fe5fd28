"""How a loaded model's llama.cpp context is configured, and creating it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import llama_cpp as lc

from server.engine.llama.gguf import KV_TYPES
from server.engine.llama.native import NativeModel
from server.engine.llama.prompt_cache import PromptCacheConfig
from server.errors import EngineFailure

_ROPE_SCALING = {"none": 0, "linear": 1, "yarn": 2}
_FLASH_ATTN = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}


@dataclass(frozen=True)
class ContextConfig:
    """How a model's llama.cpp context is sized and tuned."""

    n_ctx: int  # tokens one request may hold (prompt + output)
    parallel: int  # sequences decoded together
    batch_tokens: int
    threads: int
    rope: dict[str, Any]
    stop: tuple[str, ...] = ()
    kv_cells: int = 0  # KV budget in tokens for all sequences; at least n_ctx
    max_waiting: int = 256  # requests queued for a slot before new ones get a 503
    # One KV cache shared by all sequences (n > 1 shares the prompt's cells), or one stream
    # per sequence (attention spans only the sequence's own cells: faster prefill; n > 1
    # copies the prompt's stream).
    kv_unified: bool = False
    flash_attn: str = "auto"
    backend_sampling: bool = False  # sampler chains in the decode graph where requests allow
    # Filler rows in the gaps between running sequences, so that separate KV streams decode in
    # one pass over the weights (batch.fill_gaps): the widest gap worth filling (0: none).
    gap_fill: float = 0.0
    cache_type_k: str = "f16"  # the KV cache's types (gguf.KV_TYPES)
    cache_type_v: str = "f16"
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)  # RAM, disk


def context_params(config: ContextConfig) -> Any:
    """llama_context_params with what every context of the model shares: threads, RoPE and
    flash attention; the caller sizes it."""
    params = lc.llama_context_default_params()
    params.n_threads = params.n_threads_batch = config.threads
    params.flash_attn_type = _FLASH_ATTN[config.flash_attn]
    params.type_k = KV_TYPES[config.cache_type_k][0]
    params.type_v = KV_TYPES[config.cache_type_v][0]
    params.no_perf = True
    for key, value in config.rope.items():
        setattr(params, key, _ROPE_SCALING[value] if key == "rope_scaling_type" else value)
    return params


def create_context(model: NativeModel, params: Any, what: str) -> Any:
    """The context, or EngineFailure saying llama.cpp could not create `what`."""
    ctx = lc.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise EngineFailure(f"llama.cpp could not create {what}")
    return ctx
