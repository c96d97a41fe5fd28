"""A model's LoRA adapters (its registry `lora`): loaded with the model, put on its context one
at a time, freed when it unloads; and which adapter's requests a scheduler step decodes.

llama.cpp applies adapters per context (llama_set_adapters_lora), so one llama_decode runs
under one adapter set: each step belongs to one group of requests, those naming the same
adapter (None: the base model), and requests of the same group batch together. Changing the
context's set makes llama.cpp re-reserve its compute graphs before the next decode
(llama_context::set_adapters_lora sets sched_need_reserve; sched_reserve rebuilds the worst-case
prompt and token graphs) and loses graph reuse: about 0.5 ms on a 2-layer model and 4-5 ms on
SmolLM2-135M (30 layers) on a 2-core CPU, beside a 23-26 ms step of 4 sequences there
(bench/lora_switch.py). So the set
changes only when the group does, and a group keeps the context for up to TURN_STEPS steps
while others wait, then the next group with work takes it, in a fixed order: none starves.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc

from server.engine.llama.kv import file_identity
from server.engine.llama.native import NativeModel, failure_reason, native_errors
from server.errors import ModelLoadFailed
from server.registry import LoraSpec

log = logging.getLogger("server.engine")

# Steps a group decodes before a waiting group takes the context: a switch then costs a quarter
# of what it would every step (see above), and the others wait at most 4 steps per group.
TURN_STEPS = 4


@dataclass(frozen=True)
class Adapter:
    """One loaded adapter: its registry name, llama.cpp handle and scale."""

    name: str
    ptr: Any
    scale: float
    # What KV computed under it depends on, for the prefix caches (slots and saved states,
    # which may outlive the process): the name, the file's identity and the scale.
    tag: str = ""


class Adapters:
    """A model's loaded adapters and the one its context has on; used by its scheduler thread
    (load and free: by the loader and the manager, while no thread decodes)."""

    def __init__(self, adapters: Sequence[Adapter] = ()) -> None:
        self._by_name = {a.name: a for a in adapters}
        self.current: str | None = None  # what the context has on (None: no adapter)
        self.switches = 0

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def tag(self, name: str | None) -> str | None:
        """The prefix-cache tag of KV computed under adapter `name` (None: the base model)."""
        return None if name is None else self._by_name[name].tag

    def apply(self, ctx: Any, name: str | None) -> bool:
        """Put adapter `name` (None: none) on `ctx` unless it is on already; whether it
        changed (the next decode re-reserves the context's graphs)."""
        if name == self.current:
            return False
        if name is None:
            lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            adapter = self._by_name[name]
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(adapter.ptr)
            scales = (ctypes.c_float * 1)(adapter.scale)
            lc.llama_set_adapters_lora(ctx, handles, 1, scales)
        self.current = name
        self.switches += 1
        return True

    def free(self) -> None:
        """Free every adapter; only once no context that used them remains."""
        for adapter in self._by_name.values():
            lc.llama_adapter_lora_free(adapter.ptr)
        self._by_name.clear()


def load_adapters(model: NativeModel, specs: Sequence[LoraSpec],
                  files: Sequence[Path]) -> Adapters:
    """Load each adapter GGUF onto `model` (each tensor beside its base tensor: on the GPU
    where that layer is offloaded); ModelLoadFailed names the adapter and llama.cpp's reason."""
    loaded: list[Adapter] = []
    try:
        for spec, file in zip(specs, files, strict=True):
            if not file.is_file():
                raise ModelLoadFailed(f"LoRA adapter '{spec.name}': file not found: {file}")
            tag = f"{spec.name}|{file_identity(file)}|{spec.scale}"
            loaded.append(Adapter(spec.name, _load_one(model, spec.name, file), spec.scale, tag))
            log.info("LoRA adapter %s loaded from %s (scale %g)", spec.name, file, spec.scale)
    except BaseException:
        Adapters(loaded).free()
        raise
    return Adapters(loaded)


def _load_one(model: NativeModel, name: str, file: Path) -> Any:
    with native_errors() as errors:
        ptr = lc.llama_adapter_lora_init(model.ptr, str(file).encode())
    if not ptr:
        raise ModelLoadFailed(f"LoRA adapter '{name}' ({file.name}) does not fit this model: "
                              f"{failure_reason(errors)}")
    if lc.llama_adapter_get_alora_n_invocation_tokens(ptr):
        lc.llama_adapter_lora_free(ptr)
        raise ModelLoadFailed(f"LoRA adapter '{name}' ({file.name}) is an activated LoRA "
                              "(aLoRA), which this server does not serve")
    return ptr


def _order(group: str | None) -> tuple[bool, str]:
    return group is not None, group or ""  # the base model first, then adapters by name


class Turns:
    """Which group (an adapter's name; None: the base model) the next step decodes: the current
    one while it alone has work, or for up to `length` steps while others wait; then the next
    group with work after it in a fixed order (round robin)."""

    def __init__(self, length: int = TURN_STEPS) -> None:
        self.length = length
        self.current: str | None = None
        self.steps = 0  # steps the current group has had in its turn

    def next(self, active: Collection[str | None]) -> str | None:
        """The group of the next step, of the groups with work in `active`."""
        if not active:
            return self.current
        if self.current in active and (len(active) == 1 or self.steps < self.length):
            self.steps += 1
            return self.current
        ranked = sorted(active, key=_order)
        after = [g for g in ranked if _order(g) > _order(self.current)]
        self.current, self.steps = (after or ranked)[0], 1
        return self.current
