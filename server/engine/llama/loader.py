"""Loading one registry model into a Resident: its llama_model, its worker (a Scheduler, or an
Embedder for an embedding model) with its context, and the memory it is accounted for."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.base import ModelInfo, TokenizerInfo
from server.engine.devices import SPLIT_MODES, Gpu, Placement
from server.engine.llama.context import ContextConfig
from server.engine.llama.draft import load_draft
from server.engine.llama.embedder import Embedder
from server.engine.llama.gguf import GGUFInfo
from server.engine.llama.lora import Adapters, load_adapters
from server.engine.llama.native import NativeModel, repack_enabled
from server.engine.llama.prompt_cache import PromptCacheConfig
from server.engine.llama.scheduler import Scheduler
from server.engine.llama.speculative import Speculation
from server.engine.llama.vocab import special_texts, tokenizer_info
from server.errors import ModelLoadFailed
from server.metrics import Metrics
from server.registry import ModelSpec, Registry, RopeSpec, SpeculativeSpec
from server.settings import Settings

log = logging.getLogger("server.engine")
GIB = 1 << 30


@dataclass(eq=False)
class Resident:
    """A loaded model: its worker thread's owner, what it takes, and who is using it."""

    spec: ModelSpec
    worker: Scheduler | Embedder
    info: ModelInfo
    placement: Placement
    device: str
    tokenizer: TokenizerInfo
    active: int = 0  # requests admitted and not finished
    last_used: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    stale: bool = False  # its registry entry changed: unload once idle
    adapters: Adapters = field(default_factory=Adapters)  # its LoRA adapters (registry `lora`)


def load_resident(spec: ModelSpec, path: Path, plan: Placement, n_ctx: int, gguf: GGUFInfo,
                  devices: Sequence[Gpu], registry: Registry, settings: Settings,
                  metrics: Metrics) -> Resident:
    """Load `spec` from `path` as `plan` places it on `devices` (RPC workers', then this
    host's GPUs; blocking: run it in a worker thread)."""
    device = "+".join(d.name for d, used in zip(devices, plan.devices, strict=False)
                      if used) or "cpu"
    if spec.cache_type_v != "f16" and settings.flash_attn == "off":
        raise ModelLoadFailed(f"model '{spec.id}': a {spec.cache_type_v} V cache needs flash "
                              "attention, which GGSERVE_FLASH_ATTN=off turns off: use auto or "
                              "on, or cache_type_v: f16")
    log.info("loading model %s from %s (%d of %d layers on %s)", spec.id, path,
             plan.gpu_layers, plan.n_layer, device)
    model = NativeModel(
        path, n_gpu_layers=plan.offloaded, repack=repack_enabled(settings.cpu_repack),
        # The default device list is this host's GPUs: RPC workers' devices must be named.
        devices=[d.handle for d in devices] if plan.remote else (),
        split_mode=SPLIT_MODES[spec.split_mode], main_gpu=spec.main_gpu,
        tensor_split=plan.split if len(plan.split) > 1 else ())
    if model.n_ctx_train and n_ctx > model.n_ctx_train and spec.rope == RopeSpec():
        log.warning("model %s: n_ctx %d is beyond its training context %d and no RoPE "
                    "scaling is set in models.yaml; output may degrade past %d tokens",
                    spec.id, n_ctx, model.n_ctx_train, model.n_ctx_train)
    config = ContextConfig(
        n_ctx=n_ctx, parallel=settings.parallel, batch_tokens=settings.batch_tokens,
        threads=settings.threads, rope=_rope_params(spec), stop=spec.stop,
        # Separate streams are n_ctx each; only a shared cache can hold less than that.
        kv_cells=(settings.kv_unified and settings.kv_cache_tokens)
        or n_ctx * settings.parallel,
        max_waiting=settings.max_waiting, kv_unified=settings.kv_unified,
        flash_attn=settings.flash_attn,
        cache_type_k=spec.cache_type_k, cache_type_v=spec.cache_type_v,
        prompt_cache=PromptCacheConfig(
            ram_bytes=settings.prompt_cache_mb << 20,
            min_tokens=settings.prompt_cache_min_tokens, disk_dir=settings.prompt_cache_dir,
            disk_bytes=settings.prompt_cache_disk_mb << 20),
        backend_sampling=settings.backend_sampling == "on" or (
            settings.backend_sampling == "auto" and plan.gpu_layers > 0),
        gap_fill=_gap_fill(settings.gap_fill, plan.all_on_gpu))
    speculation = None
    adapters = Adapters()
    try:
        adapters = load_adapters(model, spec.lora, [registry.lora_file(a) for a in spec.lora])
        speculation = None if spec.embedding else \
            _speculation(spec, model, plan.gpu_layers > 0, registry, settings)
        worker = Embedder(model, config, spec.pooling, spec.id, metrics) if spec.embedding \
            else Scheduler(model, config, spec.id, metrics, speculation, adapters)
    except Exception:
        if speculation is not None and speculation.draft is not None:
            speculation.draft.close()
        adapters.free()
        model.close()
        raise
    info = ModelInfo(
        id=spec.id, n_ctx=n_ctx,
        chat_template=None if spec.chat_template_off else (
            registry.template_source(spec) or model.meta("tokenizer.chat_template")),
        bos_token=model.token_text(model.bos), eos_token=model.token_text(model.eos),
        special_tokens=special_texts(model))
    log.info("model %s ready on %s: context %d tokens per request, %s, "
             "%.2f GiB RAM + %.2f GiB VRAM", spec.id, device, n_ctx,
             f"embeddings with {worker.pooling} pooling" if isinstance(worker, Embedder)
             else f"{config.parallel} in parallel", plan.ram / GIB, plan.vram / GIB)
    memory = metrics.model_memory
    kv = gguf.kv_bytes_per_token * worker.kv_cells  # in the cache types of the entry
    gpu_share = plan.gpu_layers / max(plan.n_layer, 1)
    offloaded = sum(plan.devices)  # this host's GPUs and RPC workers (not this host's memory)
    kv_gpu = int(kv * gpu_share * plan.vram / offloaded) if offloaded else 0
    memory.labels(spec.id, "weights", "cpu").set(
        max(gguf.weights_bytes - (offloaded - int(kv * gpu_share)), 0))
    memory.labels(spec.id, "kv_cache", "cpu").set(int(kv * (1 - gpu_share)))
    if plan.vram:
        memory.labels(spec.id, "weights", "gpu").set(max(plan.vram - kv_gpu, 0))
        memory.labels(spec.id, "kv_cache", "gpu").set(kv_gpu)
    return Resident(spec, worker, info, plan, device, tokenizer_info(model), adapters=adapters)


def _speculation(spec: ModelSpec, model: NativeModel, on_gpu: bool, registry: Registry,
                 settings: Settings) -> Speculation | None:
    """How `spec` speculates (registry fields and --speculative), its draft model loaded on
    the device the model is on, checked against the model's vocabulary."""
    if settings.speculative == "off":
        return None
    config = spec.speculative or (SpeculativeSpec(ngram=True)
                                  if settings.speculative == "ngram" else None)
    if spec.draft is None:
        return None if config is None else Speculation(config)
    draft_spec = registry.get(spec.draft)
    path = registry.local_file(draft_spec)
    if not path.is_file():
        raise ModelLoadFailed(f"the draft model '{spec.draft}' of '{spec.id}' is not "
                              f"downloaded ({path}): ggserve pull {spec.draft}")
    layers = draft_spec.n_gpu_layers if on_gpu else 0
    log.info("loading draft model %s for %s from %s", draft_spec.id, spec.id, path)
    draft = load_draft(path, model, -1 if layers == "auto" else layers,
                       repack_enabled(settings.cpu_repack))
    return Speculation(config or SpeculativeSpec(), draft)


def _gap_fill(setting: str, all_on_gpu: bool) -> float:
    """The widest gap between running sequences worth filler rows (batch.fill_gaps): any where
    every layer is on a GPU (a row costs next to nothing beside a pass over the weights), one
    sequence on a CPU (a row costs about as much as a pass's fixed part)."""
    if setting == "off":
        return 0.0
    return math.inf if setting == "on" or all_on_gpu else 1.0


def _rope_params(spec: ModelSpec) -> dict[str, Any]:
    """The registry's RoPE overrides as llama_context_params fields."""
    rope = spec.rope
    fields = {
        "rope_scaling_type": rope.scaling,
        "rope_freq_base": rope.freq_base,
        "rope_freq_scale": rope.freq_scale,
        "yarn_ext_factor": rope.yarn_ext_factor,
        "yarn_attn_factor": rope.yarn_attn_factor,
        "yarn_beta_fast": rope.yarn_beta_fast,
        "yarn_beta_slow": rope.yarn_beta_slow,
        "yarn_orig_ctx": rope.yarn_orig_ctx,
    }
    return {key: value for key, value in fields.items() if value is not None}
