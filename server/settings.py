"""Server settings: environment variables (GGSERVE_*) and CLI flags, validated at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.durations import parse_duration

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_threads() -> int:
    # llama.cpp decodes fastest with one thread per physical core; on small machines that is
    # every core we are allowed to use.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load_keys(keys: list[str], key_file: Path | None) -> frozenset[str]:
    """`keys` and those in `key_file` (one per line, # comments)."""
    found = set(keys)
    if key_file is not None:
        for line in key_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.add(line.strip())
    return frozenset(found)


class Settings(BaseSettings):
    """Everything the server needs to start; each field is also `GGSERVE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="GGSERVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models_file: Path = PROJECT_ROOT / "models.yaml"
    templates_dir: Path = PROJECT_ROOT / "templates"
    models_dir: Path = PROJECT_ROOT / "models"
    default_model: str | None = None
    preload: list[str] = Field(default_factory=list)
    parallel: int = Field(4, ge=1, le=256, description="sequences decoded together per model")
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="KV budget per model in tokens (default n_ctx * parallel)")
    kv_unified: bool = Field(
        False, description="one KV cache for all sequences instead of one stream each")
    batch_tokens: int = Field(512, ge=16, description="tokens per llama_decode step")
    # llama.cpp's backend sampling: a request's sampler chain runs inside the decode graph (on
    # the GPU) instead of on the host, where the request allows it (no grammar, no
    # log-probabilities). "auto": on where layers are offloaded to a GPU. Off by default: on an
    # H100 with a 32K vocabulary the chain's graph nodes cost more decode time than the host
    # chain they replace (docs/benchmarks.md, "Backend sampling").
    backend_sampling: Literal["auto", "on", "off"] = "off"
    # Filler rows: with a KV stream per sequence, llama.cpp decodes only consecutive sequence ids
    # in one pass over the weights, so running sequences 0 and 2 take two passes. A filler token
    # in 1 (removed after the decode) makes it one. "auto": any gap where every layer is on a
    # GPU (a pass costs about a whole step, a row next to nothing), a gap of one sequence on the
    # CPU (a row costs about a pass's fixed part); "on": any gap (docs/benchmarks.md, "Gaps
    # between running sequences").
    gap_fill: Literal["auto", "on", "off"] = "auto"
    threads: int = Field(default_factory=_default_threads, ge=1)
    # The prompt cache (README "Prompt cache"): a slot's KV, when a new request takes the slot,
    # is saved as llama.cpp sequence state in host RAM (least recently used out first) and, with
    # a directory, on disk across restarts; a later prompt that starts alike restores it
    # instead of reading it again. Per loaded model, outside memory_budget.
    prompt_cache_mb: int = Field(2048, ge=0, description="host RAM per model for evicted "
                                 "prefixes, MiB (0: off)")
    prompt_cache_min_tokens: int = Field(256, ge=1, description="shortest prefix worth saving")
    prompt_cache_dir: Path | None = None
    prompt_cache_disk_mb: int = Field(16384, ge=0, description="disk per model, MiB")
    # Speculative decoding (README "Speculative decoding"): "registry" as each models.yaml entry
    # says (`draft`, `speculative`); "ngram" also turns prompt lookup on for every entry that
    # has no `speculative` of its own; "off" for none.
    speculative: Literal["registry", "ngram", "off"] = "registry"
    cpu_repack: Literal["auto", "on", "off"] = "auto"
    # llama.cpp's flash attention ("auto": where the backend has it, as llama-server). On the
    # CPU it accumulates in f16: log-probabilities move by up to ~0.1 against "off".
    flash_attn: Literal["auto", "on", "off"] = "auto"
    max_waiting: int = Field(256, ge=1, description="queued requests per model before 503")
    # --- residency: models load on first use and stay while they fit ---
    keep_alive: float = Field(-1.0, description="seconds an idle model stays loaded (-1: forever)")
    memory_budget: int | None = Field(
        None, ge=0, description="bytes of RAM for loaded models (default 80% of the machine's)")
    vram_budget: int | None = Field(
        None, ge=0, description="bytes of VRAM for loaded models (default: free VRAM at start)")
    max_loaded_models: int = Field(0, ge=0, description="most models loaded at once (0: any)")
    # --- limits on what one request may ask ---
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_tokens_limit: int | None = Field(None, ge=1, description="cap on max_tokens")
    # A reply without max_tokens (nor a registry default) stops here or at the context's end,
    # whichever is first. vLLM, llama-server and Ollama run to the context's end, which with a
    # large n_ctx and a model that never emits its end token (json_object whitespace) means
    # the request timeout. 4096 leaves room for a reasoning model's thinking and takes
    # minutes, not ten, even on a CPU.
    default_max_tokens: int = Field(4096, ge=1, description="max_tokens when a request sets none")
    max_n: int = Field(16, ge=1)
    max_messages: int = Field(1024, ge=1)
    request_timeout_s: float = Field(600.0, gt=0, description="longest a generation may run")
    # --- security ---
    api_keys: list[str] = Field(default_factory=list, repr=False)
    api_key_file: Path | None = None
    # Admin keys (also user keys) may load, unload, reload and download models; with API keys
    # set and no admin key nobody may. With no key of either kind the server is open to all.
    admin_keys: list[str] = Field(default_factory=list, repr=False)
    admin_key_file: Path | None = None
    metrics_require_key: bool = False
    # /metrics also serves the load under vLLM's names (vllm:num_requests_waiting, ...),
    # which the Gateway API Inference Extension's endpoint picker reads by default.
    metrics_vllm_names: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    ui: bool = True  # the chat page at /
    # --- shutdown: on SIGTERM /ready turns 503 for drain_s, then running streams get up to
    # shutdown_timeout_s to finish ---
    drain_s: float = Field(0.0, ge=0)
    shutdown_timeout_s: float = Field(30.0, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _batch_holds_every_sequence(self) -> Settings:
        if self.parallel > self.batch_tokens:
            raise ValueError(
                f"parallel ({self.parallel}) is larger than batch_tokens ({self.batch_tokens}): "
                "every running sequence needs a row in each decode step; lower --parallel or "
                "raise GGSERVE_BATCH_TOKENS")
        return self

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value) if isinstance(value, int | float | str) else -1.0
