"""The llama.cpp engine: registry models load on first use (downloaded if need be) and stay
resident while they fit the memory budget; the least recently used idle one makes room.

Each loaded model has its own Scheduler thread (an embedding model: an Embedder thread). A
model with requests running is never unloaded; an idle one unloads after its keep_alive, when
the budget needs its memory, when an admin unloads it, or when a registry reload changes its
entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server import hub
from server.chat.template import Prompt
from server.engine.base import (
    MAY_DOWNLOAD,
    Embeddings,
    Event,
    GenerationRequest,
    GenerationStream,
    ModelInfo,
    ModelStatus,
    Ranking,
    TokenizerInfo,
)
from server.engine.devices import Gpu, Placement, gpu_present, gpus, place
from server.engine.llama import vocab
from server.engine.llama.embedder import Embedder
from server.engine.llama.gguf import GGUFInfo, read_gguf
from server.engine.llama.loader import GIB, Resident, load_resident
from server.engine.llama.native import (
    build_has_amx,
    gpu_offload_supported,
    init_backend,
    repack_enabled,
    system_info,
)
from server.engine.rpc import worker_devices
from server.errors import (
    EmbeddingModelOnly,
    ModelLoadFailed,
    ModelNotDownloaded,
    ModelNotFound,
    NotAnEmbeddingModel,
    NotAReranker,
    ServerOverloaded,
)
from server.metrics import Metrics
from server.registry import ModelSpec, Registry
from server.settings import Settings

log = logging.getLogger("server.engine")

# Without an n_ctx in its entry a model gets its training context, capped here: KV memory grows
# with n_ctx * parallel, and 32K-context models would otherwise reserve gigabytes on a laptop.
DEFAULT_CTX_CAP = 8192

@dataclass
class _Pending:
    state: str  # "downloading" or "loading"
    downloaded: int | None = None
    size: int | None = None


class LlamaEngine:
    """Serves registry models with llama.cpp within a RAM/VRAM budget."""

    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self._resident: dict[str, Resident] = {}
        self._pending: dict[str, _Pending] = {}
        self._errors: dict[str, str] = {}
        # download sizes asked of the hub, by repo/file (None: not known, or being asked)
        self._remote_sizes: dict[str, int | None] = {}
        self._asking: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._budget_lock = asyncio.Lock()  # one load at a time claims memory
        self._gpus: list[Gpu] = []
        self.ram_budget = 0
        self.vram_budget = 0

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(init_backend)
        self._gpus = await asyncio.to_thread(gpus) if gpu_offload_supported() else []
        self.ram_budget = self.settings.memory_budget or int(_total_ram() * 0.8)
        self.vram_budget = self.settings.vram_budget if self.settings.vram_budget is not None \
            else sum(g.free for g in self._gpus)
        self._log_backend()
        for model in dict.fromkeys([self.registry.default, *self.settings.preload]):
            try:
                await self.load(model)
            except Exception as exc:  # the server still serves the other models
                log.error("model %s could not be loaded at start: %s", model, exc)

    def _log_backend(self) -> None:
        repack = repack_enabled(self.settings.cpu_repack)
        where = ", ".join(f"{g.name} ({g.description}, {g.free / GIB:.1f} of "
                          f"{g.total / GIB:.1f} GiB free)" for g in self._gpus)
        log.info("llama.cpp backend: %s; CPU weight repacking %s%s; memory budget %.1f GiB RAM"
                 "%s", f"GPU offload to {where}" if self._gpus else "CPU only",
                 "on" if repack else "off",
                 " (this build has AMX kernels, whose repacking crashes)" if build_has_amx()
                 and not repack else "", self.ram_budget / GIB,
                 f", {self.vram_budget / GIB:.1f} GiB VRAM" if self._gpus else "")
        if not self._gpus and gpu_present():
            log.warning("this host has an NVIDIA GPU but llama.cpp was built without CUDA: "
                        "models run on the CPU. Reinstall llama-cpp-python with "
                        "CMAKE_ARGS=\"-DGGML_CUDA=on\" (see README, GPU)")
        log.debug("llama.cpp system info: %s", system_info())

    async def stop(self) -> None:
        for resident in list(self._resident.values()):
            await self._unload(resident)

    # ---- what the API asks ----------------------------------------------------------------

    def loaded(self) -> list[str]:
        return list(self._resident)

    def overloaded(self) -> bool:
        """True when some model's queue is full (new requests to it would get a 503)."""
        return any(r.worker.waiting >= r.worker.config.max_waiting
                   for r in self._resident.values())

    async def model_info(self, model: str) -> ModelInfo:
        async with self._using(model) as resident:
            return resident.info

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        if self.registry.get(request.model).embedding:
            raise EmbeddingModelOnly(request.model)
        resident = await self._acquire(request.model)
        try:
            if isinstance(resident.worker, Embedder):  # its registry entry changed meanwhile
                raise EmbeddingModelOnly(request.model)
            stream = await resident.worker.submit(request)
        except BaseException:
            self._release(resident, request.keep_alive)
            raise
        return _Tracked(stream, lambda: self._release(resident, request.keep_alive))

    async def embed(self, model: str, inputs: list[list[int]] | list[str]) -> Embeddings:
        if not self.registry.get(model).embedding:
            raise NotAnEmbeddingModel(model)
        async with self._using(model) as resident:
            if not isinstance(resident.worker, Embedder):  # its registry entry changed meanwhile
                raise NotAnEmbeddingModel(model)
            return await resident.worker.embed(inputs)

    async def rerank(self, model: str, query: str, documents: list[str]) -> Ranking:
        if not self.registry.get(model).embedding:
            raise NotAReranker(model)
        async with self._using(model) as resident:
            if not isinstance(resident.worker, Embedder):  # its registry entry changed meanwhile
                raise NotAReranker(model)
            return await resident.worker.rerank(query, documents)

    async def tokenize(self, model: str, prompt: Prompt, add_special: bool) -> list[int]:
        async with self._using(model) as resident:  # a long prompt takes a while: off the loop
            if add_special:
                return await asyncio.to_thread(resident.worker.tokenize, prompt)
            return (await asyncio.to_thread(vocab.read_prompt, resident.worker.model, prompt,
                                            False))[0]

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        async with self._using(model) as resident:
            return vocab.detokenize(resident.worker.model, tokens)

    async def token_texts(self, model: str, tokens: list[int]) -> list[str]:
        async with self._using(model) as resident:
            return vocab.token_texts(resident.worker.model, tokens)

    async def tokenizer_info(self, model: str) -> TokenizerInfo:
        async with self._using(model) as resident:
            return resident.tokenizer

    def status(self, model: str) -> ModelStatus:
        spec = self.registry.get(model)
        if (resident := self._resident.get(spec.id)) is not None:
            p = resident.placement
            failure = resident.worker.failure
            return ModelStatus("failed" if failure else "loaded", error=failure,
                               n_ctx=resident.info.n_ctx, device=resident.device,
                               gpu_layers=p.gpu_layers, n_layer=p.n_layer, memory_ram=p.ram,
                               memory_vram=p.vram, size=self._at_rest(spec).size)
        if (pending := self._pending.get(spec.id)) is not None:
            return ModelStatus(pending.state, downloaded=pending.downloaded,  # type: ignore[arg-type]
                               download_size=pending.size, n_ctx=spec.n_ctx)
        if spec.id in self._errors:
            return ModelStatus("failed", error=self._errors[spec.id], n_ctx=spec.n_ctx,
                               size=self._at_rest(spec).size)
        return self._at_rest(spec)

    def _at_rest(self, spec: ModelSpec) -> ModelStatus:
        """A model that is not loaded: its file on disk and its size, or a download (its size
        once the hub has said) or a missing file (why, as `error`)."""
        try:
            path = self.registry.local_file(spec)
        except ModelLoadFailed as exc:
            return ModelStatus("not_downloaded", error=str(exc), n_ctx=spec.n_ctx)
        if path.is_file():
            return ModelStatus("on_disk", n_ctx=spec.n_ctx, size=path.stat().st_size)
        return ModelStatus("not_downloaded", n_ctx=spec.n_ctx, size=self._download_size(spec))

    def _download_size(self, spec: ModelSpec) -> int | None:
        """The size of `spec`'s download, asked of the hub once in the background."""
        if spec.repo is None:
            return None
        key = f"{spec.repo}/{spec.file_name}"
        if key not in self._remote_sizes:
            self._remote_sizes[key] = None
            with contextlib.suppress(RuntimeError):  # no running loop: stays unknown
                task = asyncio.get_running_loop().create_task(self._ask_size(spec, key))
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
        return self._remote_sizes[key]

    async def _ask_size(self, spec: ModelSpec, key: str) -> None:
        self._remote_sizes[key] = await asyncio.to_thread(
            hub.remote_size, str(spec.repo), spec.file_name)

    async def load(self, model: str) -> ModelStatus:
        async with self._using(model):
            pass
        return self.status(model)

    async def unload(self, model: str) -> ModelStatus:
        spec = self.registry.get(model)
        resident = self._resident.get(spec.id)
        if resident is not None:
            if resident.active:
                resident.stale = True  # goes when its last request ends
            else:
                await self._unload(resident)
        return self.status(model)

    async def use_registry(self, registry: Registry) -> None:
        self.registry = registry
        for resident in list(self._resident.values()):
            if _base_spec(registry, resident.spec) != resident.spec:
                resident.stale = True
                if not resident.active:
                    await self._unload(resident)
        self._errors.clear()

    # ---- residency ------------------------------------------------------------------------

    async def _acquire(self, model: str) -> Resident:
        """The loaded model for `model`, loading it first if need be; counts a user of it."""
        spec = self.registry.get(model)
        resident = self._resident.get(spec.id)
        if resident is None:
            async with self._locks.setdefault(spec.id, asyncio.Lock()):
                resident = self._resident.get(spec.id) or await self._load(spec)
        resident.active += 1
        if resident.expiry is not None:
            resident.expiry.cancel()
            resident.expiry = None
        return resident

    @asynccontextmanager
    async def _using(self, model: str) -> AsyncIterator[Resident]:
        """The loaded model for `model` while the caller works with it."""
        resident = await self._acquire(model)
        try:
            yield resident
        finally:
            self._release(resident, None)

    def _release(self, resident: Resident, keep_alive: float | None) -> None:
        resident.active -= 1
        resident.last_used = time.monotonic()
        if resident.active or resident not in self._resident.values():
            return
        if keep_alive is None:
            keep_alive = resident.spec.keep_alive
        if keep_alive is None:
            keep_alive = self.settings.keep_alive
        if resident.stale or keep_alive == 0:  # unless a request takes it first
            asyncio.get_running_loop().create_task(self._unload_if_idle(resident))
        elif keep_alive > 0:
            resident.expiry = asyncio.get_running_loop().call_later(
                keep_alive, lambda: asyncio.ensure_future(self._unload_if_idle(resident)))

    async def _unload_if_idle(self, resident: Resident) -> None:
        if not resident.active:
            await self._unload(resident)

    async def _unload(self, resident: Resident) -> None:
        if self._resident.get(resident.spec.id) is not resident:
            return
        del self._resident[resident.spec.id]
        if resident.expiry is not None:
            resident.expiry.cancel()
        await asyncio.to_thread(resident.worker.close)
        resident.adapters.free()  # after the context that used them, before their model
        await asyncio.to_thread(resident.worker.model.close)
        self.metrics.forget(resident.spec.id)  # its waiting gauge reads the closed queue
        self.metrics.models_loaded.set(len(self._resident))
        log.info("model %s unloaded", resident.spec.id)

    async def _load(self, spec: ModelSpec) -> Resident:
        self._errors.pop(spec.id, None)
        try:
            path = self.registry.local_file(spec)
            if spec.repo and not path.is_file():
                if not MAY_DOWNLOAD.get():
                    raise ModelNotDownloaded(spec.id)
                await self._download(spec, path)
            self._pending[spec.id] = _Pending("loading")
            gguf = (await asyncio.to_thread(read_gguf, path)).with_cache(
                spec.cache_type_k, spec.cache_type_v)
            gguf = await self._with_adapters(spec, gguf)
            gguf = await self._with_draft(spec, gguf)
            workers = await asyncio.to_thread(worker_devices, spec.rpc) if spec.rpc else []
            async with self._budget_lock:
                n_ctx = spec.n_ctx or min(gguf.n_ctx_train or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)
                plan = self._place(spec, gguf, n_ctx, workers)
                await self._make_room(spec, plan)
                resident = await asyncio.to_thread(
                    load_resident, spec, path, plan, n_ctx, gguf, [*workers, *self._gpus],
                    self.registry, self.settings, self.metrics)
                self._resident[spec.id] = resident
            self.metrics.models_loaded.set(len(self._resident))
            return resident
        except ModelLoadFailed as exc:
            self._errors[spec.id] = exc.message
            raise
        finally:
            self._pending.pop(spec.id, None)

    async def _with_draft(self, spec: ModelSpec, gguf: GGUFInfo) -> GGUFInfo:
        """`gguf` with the draft model of `spec` counted (its weights and KV load with it), so
        that the budgets and the GPU plan include it; a missing draft file is the loader's to
        report."""
        if spec.draft is None or spec.embedding or self.settings.speculative == "off":
            return gguf
        path = self.registry.local_file(self.registry.get(spec.draft))
        if not path.is_file():
            return gguf
        draft = await asyncio.to_thread(read_gguf, path)
        return gguf.with_draft(draft.with_cache(spec.cache_type_k, spec.cache_type_v))

    async def _with_adapters(self, spec: ModelSpec, gguf: GGUFInfo) -> GGUFInfo:
        """`gguf` with the LoRA adapters of `spec` counted (those from a repo downloaded
        first), so that the budget and the GPU plan include them."""
        adapters = []
        for adapter in spec.lora:
            file = self.registry.lora_file(adapter)
            if adapter.repo and not file.is_file():
                if not MAY_DOWNLOAD.get():
                    raise ModelNotDownloaded(spec.id)
                log.info("downloading %s/%s (LoRA adapter %s of %s)", adapter.repo,
                         adapter.file, adapter.name, spec.id)
                await asyncio.to_thread(hub.download, str(adapter.repo), str(adapter.file), file)
            if not file.is_file():
                raise ModelLoadFailed(f"model '{spec.id}': LoRA adapter '{adapter.name}': GGUF "
                                      f"file not found: {file}")
            adapters.append(await asyncio.to_thread(read_gguf, file, gguf.n_layer))
        return gguf.with_adapters(adapters)

    async def _download(self, spec: ModelSpec, path: Path) -> None:
        pending = self._pending[spec.id] = _Pending("downloading")

        def progress(done: int, size: int | None) -> None:
            pending.downloaded, pending.size = done, size

        log.info("downloading %s/%s for model %s", spec.repo, spec.file_name, spec.id)
        await asyncio.to_thread(hub.download, str(spec.repo), spec.file_name, path, progress)

    def _place(self, spec: ModelSpec, gguf: GGUFInfo, n_ctx: int,
               workers: list[Gpu]) -> Placement:
        rooms = [w.free for w in workers] + self._gpu_rooms()
        # An embedding model's inputs share one cache of n_ctx cells.
        cells = n_ctx if spec.embedding else n_ctx * self.settings.parallel
        try:
            return place(gguf, spec.n_gpu_layers if rooms else 0, cells, rooms,
                         split=spec.tensor_split, mode=spec.split_mode,
                         main_gpu=spec.main_gpu, remote=len(workers))
        except ValueError as exc:  # a tensor_split or main_gpu that does not fit the devices
            raise ModelLoadFailed(f"model '{spec.id}': {exc}") from None

    def _gpu_rooms(self) -> list[int]:
        """Each GPU's part of the VRAM budget (in proportion to its free memory at start),
        less what the loaded models hold there."""
        free = sum(g.free for g in self._gpus) or 1
        return [self.vram_budget * g.free // free
                - sum(r.placement.on_gpu(i) for r in self._resident.values())
                for i, g in enumerate(self._gpus)]

    async def _make_room(self, spec: ModelSpec, plan: Placement) -> None:
        """Unload idle models, least recently used first, until `plan` fits the budget."""
        if plan.ram > self.ram_budget:
            raise ModelLoadFailed(
                f"model '{spec.id}' needs {plan.ram / GIB:.2f} GiB of RAM, more than the memory "
                f"budget of {self.ram_budget / GIB:.2f} GiB: raise GGSERVE_MEMORY_BUDGET, lower "
                "its n_ctx or pick a smaller quant")

        def crowded() -> bool:
            used = self._resident.values()
            return (sum(r.placement.ram for r in used) + plan.ram > self.ram_budget
                    or (plan.vram > 0 and
                        sum(r.placement.vram for r in used) + plan.vram > self.vram_budget)
                    or any(plan.on_gpu(i) > room for i, room in enumerate(self._gpu_rooms()))
                    or 0 < self.settings.max_loaded_models <= len(self._resident))

        while crowded():
            if not self._resident:
                raise ModelLoadFailed(
                    f"model '{spec.id}' needs {plan.vram / GIB:.2f} GiB of VRAM, more than the "
                    f"budget of {self.vram_budget / GIB:.2f} GiB: set n_gpu_layers to 'auto' or "
                    "fewer layers, or lower its n_ctx")
            idle = sorted((r for r in self._resident.values() if not r.active),
                          key=lambda r: r.last_used)
            if not idle:
                busy = ", ".join(self._resident)
                raise ServerOverloaded(
                    f"model '{spec.id}' does not fit beside the loaded models, which are all "
                    f"serving requests ({busy}); retry shortly")
            log.info("unloading %s (least recently used) to make room for %s", idle[0].spec.id,
                     spec.id)
            await self._unload(idle[0])


class _Tracked:
    """A generation stream that tells the engine when its request is over."""

    def __init__(self, stream: GenerationStream, on_end: Any) -> None:
        self._stream = stream
        self._on_end = on_end

    def _end(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    def cancel(self) -> None:
        self._stream.cancel()
        self._end()

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for event in self._stream:
                yield event
        finally:
            self._end()


def _base_spec(registry: Registry, spec: ModelSpec) -> ModelSpec | None:
    try:
        return registry.get(spec.id)
    except ModelNotFound:
        return None


def _total_ram() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 8 * GIB  # pragma: no cover - not Linux
