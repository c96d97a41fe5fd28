"""Every Prometheus collector, declared once, on a registry owned by the app (no module state).

Labels are bounded: a registry model id, a route template, a finish reason, a status class;
never prompt text, a user, or a model name a client made up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "ggserve:"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)


# A step is a few ms on a GPU and tens of ms on a small CPU; host work is tens of µs.
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0)


class Metrics:
    """The server's collectors; `render()` gives the Prometheus text exposition."""

    def __init__(self, vllm_names: bool = False) -> None:
        self.registry = CollectorRegistry()
        # A scrape and a scheduler's gauge refresh exclude each other: the KV gauges of one
        # scrape (and the vLLM-named usage summed from them) come from the same moment.
        self.snapshot = threading.Lock()
        r = self.registry
        self.http_requests = Counter(
            f"{PREFIX}http_requests", "HTTP requests by route and status class",
            ["endpoint", "status"], registry=r)
        self.requests = Counter(
            f"{PREFIX}requests", "Generation requests by model, endpoint and outcome "
            "(ok, client_error, server_error, cancelled)", ["model", "endpoint", "outcome"],
            registry=r)
        self.request_success = Counter(
            f"{PREFIX}request_success", "Finished choices by finish reason",
            ["model", "finished_reason"], registry=r)
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Tokens generated", ["model"], registry=r)
        self.requests_running = Gauge(
            f"{PREFIX}num_requests_running", "Generation requests in progress", ["model"],
            registry=r)
        self.sequences_running = Gauge(
            f"{PREFIX}num_sequences_running", "Sequences in the model's decode batch",
            ["model"], registry=r)
        self.requests_waiting = Gauge(
            f"{PREFIX}num_requests_waiting", "Admitted requests waiting for a batch slot",
            ["model"], registry=r)
        self.decode_calls = Counter(
            f"{PREFIX}decode_calls", "llama_decode calls (batch steps)", ["model"], registry=r)
        self.prompt_tokens_cached = Counter(
            f"{PREFIX}prompt_tokens_cached", "Prompt tokens whose KV was reused (prefix cache)",
            ["model"], registry=r)
        self.prompt_cache_restores = Counter(
            f"{PREFIX}prompt_cache_restores", "Prefixes restored from the prompt cache (host RAM "
            "or disk) instead of read again", ["model"], registry=r)
        self.prompt_cache_restored_tokens = Counter(
            f"{PREFIX}prompt_cache_restored_tokens", "Prompt tokens restored from the prompt "
            "cache", ["model"], registry=r)
        self.prompt_cache_bytes = Gauge(
            f"{PREFIX}prompt_cache_bytes", "Sequence states the prompt cache holds, by store "
            "(ram, disk)", ["model", "store"], registry=r)
        self.kv_cache_tokens = Gauge(
            f"{PREFIX}kv_cache_tokens", "KV cache cells held by running requests",
            ["model"], registry=r)
        self.kv_cache_usage = Gauge(
            f"{PREFIX}kv_cache_usage_perc", "KV cache use: cells held by running requests, 0 "
            "to 1 of the budget", ["model"], registry=r)
        self.kv_cache_capacity = Gauge(
            f"{PREFIX}kv_cache_capacity_tokens", "The model's KV cache budget, in cells",
            ["model"], registry=r)
        self.kv_cache_prefix_tokens = Gauge(
            f"{PREFIX}kv_cache_prefix_tokens", "KV cache cells idle sequences keep for prefix "
            "reuse (freed when running requests need them)", ["model"], registry=r)
        self.decode_throughput = Gauge(
            f"{PREFIX}decode_tokens_per_second", "Tokens sampled per second over the last 5 s",
            ["model"], registry=r)
        self.models_loaded = Gauge(
            f"{PREFIX}models_loaded", "Models resident in memory", registry=r)
        self.model_memory = Gauge(
            f"{PREFIX}model_memory_bytes", "Memory a loaded model holds, by part (weights, "
            "kv_cache) and device (cpu, gpu)", ["model", "part", "device"], registry=r)
        self.queue_wait = Histogram(
            f"{PREFIX}request_queue_time_seconds", "Time from arrival to a batch slot",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Time between output pieces of a choice",
            ["model"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
                                0.2, 0.3, 0.5, 0.75, 1.0, 2.5), registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time from request to first output text",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Time from request to last output",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_length = Histogram(
            f"{PREFIX}request_prompt_tokens", "Prompt length per request", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r)
        self.output_length = Histogram(
            f"{PREFIX}request_generation_tokens", "Generated tokens per request", ["model"],
            buckets=_TOKEN_BUCKETS, registry=r)

        self.step_decode_time = Histogram(
            f"{PREFIX}step_decode_seconds", "llama_decode time of one scheduler step",
            ["model"], buckets=_STEP_BUCKETS, registry=r)
        self.step_host_time = Histogram(
            f"{PREFIX}step_host_seconds", "Host work of one scheduler step outside llama_decode "
            "(batch filling, sampling, detokenization, stop strings, hand-off)", ["model"],
            buckets=_STEP_BUCKETS, registry=r)
        self.step_sequences = Histogram(
            f"{PREFIX}step_sequences", "Sequences sampled in one scheduler step", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step_batch_tokens = Histogram(
            f"{PREFIX}step_batch_tokens", "Tokens in one llama_decode batch", ["model"],
            buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=r)
        self.step_split = Counter(
            f"{PREFIX}step_split", "Steps llama.cpp split into several passes over the weights "
            "(ubatches)", ["model"], registry=r)
        self.grammar_rejections = Counter(
            f"{PREFIX}grammar_rejections", "Sampled tokens a grammar refused (each costs a "
            "filtered resample)", ["model"], registry=r)
        # Speculative decoding: accepted / drafted is the acceptance rate, by where the drafts
        # came from (ngram: prompt lookup; draft: the draft model).
        self.spec_draft_tokens = Counter(
            f"{PREFIX}spec_draft_tokens", "Draft tokens the model verified (speculative "
            "decoding)", ["model", "method"], registry=r)
        self.spec_accepted_tokens = Counter(
            f"{PREFIX}spec_accepted_tokens", "Draft tokens the model accepted (speculative "
            "decoding)", ["model", "method"], registry=r)

        # LoRA adapters by loaded model, for lora_requests_info (SchedulerMetrics sets a
        # model's from its scheduler thread; a scrape reads them).
        self.lora: dict[str, LoraActivity] = {}
        self.registry.register(_LoraInfo(self, f"{PREFIX}lora_requests_info"))
        if vllm_names:
            self.registry.register(_VllmNames(self))

    def render(self) -> bytes:
        with self.snapshot:
            return generate_latest(self.registry)

    def forget(self, model: str) -> None:
        """Drop an unloaded model's gauges (a stale budget would skew the vLLM-named usage)."""
        gauges = (self.sequences_running, self.requests_waiting, self.kv_cache_tokens,
                  self.kv_cache_usage, self.kv_cache_capacity, self.kv_cache_prefix_tokens,
                  self.decode_throughput)
        series = [(gauge, (model,)) for gauge in gauges] + [
            (self.model_memory, (model, part, device))
            for part in ("weights", "kv_cache") for device in ("cpu", "gpu")] + [
            (self.prompt_cache_bytes, (model, store)) for store in ("ram", "disk")]
        for gauge, labels in series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self.lora.pop(model, None)


def _total(gauge: Gauge) -> float:
    return sum(sample.value for family in gauge.collect() for sample in family.samples)


class _VllmNames(Collector):
    """The server's load under the names vLLM exports, which the Gateway API Inference
    Extension's endpoint picker reads by default: one series per server, summed over its
    models (README "Model-aware routing on Kubernetes")."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        held, budget = _total(m.kv_cache_tokens), _total(m.kv_cache_capacity)
        usage = held / budget if budget else 0.0
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a batch "
                                "slot (ggserve:num_requests_waiting, all models)",
                                value=_total(m.requests_waiting))
        yield GaugeMetricFamily("vllm:num_requests_running", "Sequences in the decode batches "
                                "(ggserve:num_sequences_running, all models)",
                                value=_total(m.sequences_running))
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # new, old
            yield GaugeMetricFamily(name, "KV cache cells held by running requests, 0 to 1 of "
                                    "the budget (all models)", value=usage)
        yield from _LoraInfo(m, "vllm:lora_requests_info").collect()


@dataclass(frozen=True)
class LoraActivity:
    """One loaded model's LoRA adapters: how many, and those that running and waiting requests
    use, by the names clients send (`model:adapter`)."""

    loaded: int
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()


class _LoraInfo(Collector):
    """vLLM's lora_requests_info, which the Gateway API Inference Extension's picker reads for
    adapter affinity: `max_lora` (adapters that can be active at once: every loaded adapter,
    since all stay resident), the adapters of running and of waiting requests (comma
    separated); the value is the time of the scrape."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name

    def collect(self) -> Iterator[Metric]:
        models = list(self._metrics.lora.values())
        info = GaugeMetricFamily(self._name, "LoRA adapters: how many can be active, and those "
                                 "of running and waiting requests", labels=[
                                     "max_lora", "running_lora_adapters",
                                     "waiting_lora_adapters"])
        running = sorted(set().union(*(m.running for m in models)))
        waiting = sorted(set().union(*(m.waiting for m in models)))
        info.add_metric([str(sum(m.loaded for m in models)), ",".join(running),
                         ",".join(waiting)], time.time())
        yield info


class SchedulerMetrics:
    """One model's scheduler collectors, bound to its label; used by the scheduler thread."""

    WINDOW = 5.0  # seconds of decode steps behind the throughput gauge

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.queue_wait = metrics.queue_wait.labels(model)
        self._decode_calls = metrics.decode_calls.labels(model)
        self._running = metrics.sequences_running.labels(model)
        self._waiting = metrics.requests_waiting.labels(model)
        self._kv_tokens = metrics.kv_cache_tokens.labels(model)
        self._kv_usage = metrics.kv_cache_usage.labels(model)
        self._kv_capacity = metrics.kv_cache_capacity.labels(model)
        self._kv_prefix = metrics.kv_cache_prefix_tokens.labels(model)
        self._throughput = metrics.decode_throughput.labels(model)
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_total = 0  # the sum of the window's counts, kept as it moves
        self._decode_time = metrics.step_decode_time.labels(model)
        self._host_time = metrics.step_host_time.labels(model)
        self._sequences = metrics.step_sequences.labels(model)
        self._batch_tokens = metrics.step_batch_tokens.labels(model)
        self._split = metrics.step_split.labels(model)
        self.grammar_rejections = metrics.grammar_rejections.labels(model)
        self._model, self._lora = model, metrics.lora
        self._cache_restores = metrics.prompt_cache_restores.labels(model)
        self._cache_restored = metrics.prompt_cache_restored_tokens.labels(model)
        self._cache_ram = metrics.prompt_cache_bytes.labels(model, "ram")
        self._cache_disk = metrics.prompt_cache_bytes.labels(model, "disk")
        self._cache_seen = (0, 0)  # restores and tokens already counted
        self._snapshot = metrics.snapshot

    def stepped(self, sampled: int, tokens: int, decode_s: float, host_s: float,
                passes: int, emitted: int | None = None) -> None:
        """One llama_decode of `tokens` tokens in `passes` ubatches that sampled `sampled`
        sequences, which gained `emitted` tokens (more with speculation; default `sampled`);
        `host_s` is the step's time outside llama_decode."""
        self._decode_calls.inc()
        emitted = sampled if emitted is None else emitted
        self._recent.append((time.monotonic(), emitted))
        self._recent_total += emitted
        self._decode_time.observe(decode_s)
        self._host_time.observe(host_s)
        self._sequences.observe(sampled)
        self._batch_tokens.observe(tokens)
        if passes > 1:
            self._split.inc()

    def report_adapters(self, loaded: int, running: Iterable[str | None],
                        waiting: Iterable[str | None]) -> None:
        """The model's `loaded` LoRA adapters, and those that running and waiting requests
        name (None: the base model, not reported)."""
        def served(names: Iterable[str | None]) -> frozenset[str]:
            return frozenset(f"{self._model}:{n}" for n in names if n is not None)

        if loaded:
            self._lora[self._model] = LoraActivity(loaded, served(running), served(waiting))

    def track_waiting(self, waiting: Callable[[], int]) -> None:
        """Read the queue length when scraped: it moves on the event loop, between steps,
        and must agree with what /ready says at the same moment."""
        self._waiting.set_function(waiting)

    def report_cache(self, restores: int, tokens: int, ram: int, disk: int) -> None:
        """The prompt cache's totals so far and the bytes it holds."""
        self._cache_restores.inc(restores - self._cache_seen[0])
        self._cache_restored.inc(tokens - self._cache_seen[1])
        self._cache_seen = (restores, tokens)
        self._cache_ram.set(ram)
        self._cache_disk.set(disk)

    def report(self, running: int, kv_tokens: int, kv_capacity: int, prefix_tokens: int) -> None:
        """`kv_tokens` cells of `kv_capacity` held by running requests; `prefix_tokens` kept
        by idle sequences for reuse, which a new request frees when it needs the room."""
        with self._snapshot:
            self._running.set(running)
            self._kv_tokens.set(kv_tokens)
            self._kv_usage.set(kv_tokens / kv_capacity if kv_capacity else 0.0)
            self._kv_capacity.set(kv_capacity)
            self._kv_prefix.set(prefix_tokens)
        horizon = time.monotonic() - self.WINDOW
        while self._recent and self._recent[0][0] < horizon:
            self._recent_total -= self._recent.popleft()[1]
        rate = self._recent_total / self.WINDOW
        self._throughput.set(rate if running else 0.0)
