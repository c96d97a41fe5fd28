"""The llama.cpp engine: loads registry models on demand, one Scheduler per loaded model."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server.engine.base import GenerationRequest, GenerationStream, ModelInfo
from server.engine.native import (
    NativeModel,
    build_has_amx,
    gpu_offload_supported,
    init_backend,
    repack_enabled,
    system_info,
)
from server.engine.scheduler import ContextConfig, Scheduler
from server.metrics import Metrics
from server.registry import ModelSpec, Registry, RopeSpec
from server.settings import Settings

log = logging.getLogger("server.engine")

# Without an n_ctx in its entry a model gets its training context, capped here: KV memory grows
# with n_ctx * parallel, and 32K-context models would otherwise reserve gigabytes on a laptop.
DEFAULT_CTX_CAP = 8192


class LlamaEngine:
    """Serves registry models with llama.cpp; every model has its own scheduler thread."""

    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self._loaded: dict[str, tuple[Scheduler, ModelInfo]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        await asyncio.to_thread(init_backend)
        backend = "GPU offload" if gpu_offload_supported() else "CPU only"
        repack = repack_enabled(self.settings.cpu_repack)
        log.info("llama.cpp backend: %s; CPU weight repacking %s%s", backend,
                 "on" if repack else "off",
                 " (this build has AMX kernels, whose repacking crashes)" if build_has_amx()
                 and not repack else "")
        log.debug("llama.cpp system info: %s", system_info())
        for model in dict.fromkeys([self.registry.default, *self.settings.preload]):
            await self._load(model)

    async def stop(self) -> None:
        loaded, self._loaded = self._loaded, {}
        for scheduler, _ in loaded.values():
            await asyncio.to_thread(scheduler.close)
            await asyncio.to_thread(scheduler.model.close)

    def loaded(self) -> list[str]:
        return list(self._loaded)

    async def model_info(self, model: str) -> ModelInfo:
        return (await self._load(model))[1]

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        scheduler, _ = await self._load(request.model)
        return scheduler.submit(request, asyncio.get_running_loop())

    async def _load(self, model: str) -> tuple[Scheduler, ModelInfo]:
        spec = self.registry.get(model)
        if model in self._loaded:
            return self._loaded[model]
        async with self._locks.setdefault(model, asyncio.Lock()):
            if model not in self._loaded:
                self._loaded[model] = await asyncio.to_thread(self._load_blocking, spec)
                self.metrics.models_loaded.set(len(self._loaded))
        return self._loaded[model]

    def overloaded(self) -> bool:
        """True when some model's queue is full (new requests to it would get a 503)."""
        return any(s.waiting >= s.config.max_waiting for s, _ in self._loaded.values())

    def _load_blocking(self, spec: ModelSpec) -> tuple[Scheduler, ModelInfo]:
        path = self.registry.local_file(spec)
        log.info("loading model %s from %s", spec.id, path)
        model = NativeModel(path, n_gpu_layers=spec.n_gpu_layers,
                            repack=repack_enabled(self.settings.cpu_repack))
        n_ctx = spec.n_ctx or min(model.n_ctx_train or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)
        if model.n_ctx_train and n_ctx > model.n_ctx_train and spec.rope == RopeSpec():
            log.warning("model %s: n_ctx %d is beyond its training context %d and no RoPE "
                        "scaling is set in models.yaml; output may degrade past %d tokens",
                        spec.id, n_ctx, model.n_ctx_train, model.n_ctx_train)
        config = ContextConfig(
            n_ctx=n_ctx, parallel=self.settings.parallel, batch_tokens=self.settings.batch_tokens,
            threads=self.settings.threads, rope=_rope_params(spec), stop=spec.stop,
            # Separate streams are n_ctx each; only a shared cache can hold less than that.
            kv_cells=(self.settings.kv_unified and self.settings.kv_cache_tokens)
            or n_ctx * self.settings.parallel,
            max_waiting=self.settings.max_waiting, kv_unified=self.settings.kv_unified)
        try:
            scheduler = Scheduler(model, config, spec.id, self.metrics)
        except Exception:
            model.close()
            raise
        info = ModelInfo(
            id=spec.id, n_ctx=n_ctx,
            chat_template=None if spec.chat_template_off else (
                self.registry.template_source(spec) or model.meta("tokenizer.chat_template")),
            bos_token=model.token_text(model.bos), eos_token=model.token_text(model.eos))
        log.info("model %s ready: context %d tokens per request, %d in parallel", spec.id,
                 n_ctx, config.parallel)
        device = "gpu" if gpu_offload_supported() and spec.n_gpu_layers != 0 else "cpu"
        memory = self.metrics.model_memory
        memory.labels(spec.id, "weights", device).set(model.weights_bytes)
        memory.labels(spec.id, "kv_cache", device).set(
            model.kv_bytes_per_token * scheduler.kv_cells)
        return scheduler, info


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
