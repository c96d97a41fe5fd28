"""The five target models as their cards say: Alfred's NTK-YaRN RoPE (checked on the real
llama.cpp), each seed's sampling defaults, and OpenChat's Interleaved model."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import llama_cpp as lc
import numpy as np
import pytest

from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.loader import _rope_params
from server.engine.llama.native import NativeModel, init_backend, repack_enabled
from server.errors import ModelLoadFailed, RegistryError
from server.registry import ModelSpec, Registry, RopeSpec
from server.settings import Settings
from tests.gguf_factory import Shape, write_gguf

# Alfred-40B-1023's card: Falcon-40B (RoPE base 10,000, head dim 64) from 2,048 to 8,192 tokens.
BASE, SCALE, HEAD_DIM = 10_000.0, 4.0, 64
ALFRED_BASE = BASE * (SCALE + 1) ** (HEAD_DIM / (HEAD_DIM - 2))  # 52,664.4
ALFRED_M = 1 + 0.1 * math.log(SCALE)  # 1.1386
# Falcon-40B's attention in miniature: head dim 64, grouped K/V heads.
FALCON = Shape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_ctx_train=2048)
TOKENS = list(range(10, 42))


@pytest.fixture(scope="module")
def registry() -> Registry:
    settings = Settings()
    return Registry.load(settings.models_file, settings.templates_dir, settings.models_dir)


def test_alfred_rope_is_the_cards_ntk_yarn(registry: Registry) -> None:
    rope = registry.get("alfred-40b-1023").rope
    assert round(ALFRED_BASE, 1) == 52664.4
    assert round(ALFRED_M, 4) == 1.1386
    assert rope.freq_base == pytest.approx(ALFRED_BASE, rel=1e-7)
    assert rope.yarn_attn_factor == pytest.approx(ALFRED_M, rel=1e-7)
    # Nothing else may move the frequencies: no scaling type (freq_scale stays 1), no YaRN ramp.
    assert (rope.scaling, rope.yarn_ext_factor, rope.freq_scale) == ("none", 0.0, None)
    assert _rope_params(registry.get("alfred-40b-1023")) == {
        "rope_scaling_type": "none", "rope_freq_base": rope.freq_base,
        "yarn_ext_factor": 0.0, "yarn_attn_factor": rope.yarn_attn_factor}


@pytest.mark.parametrize(("model", "expected"), [
    # The card's `do_sample=True, top_k=3`; transformers' defaults for the rest.
    ("alfred-40b-1023", ("transformers", 1.0, 3, 1.0, 0.0)),
    # generate(temperature=0.75, top_p=0.95, do_sample=True): transformers' top_k 50.
    ("stablelm-3b-4e1t", ("transformers", 0.75, 50, 0.95, 0.0)),
    ("pearl-7b-slerp", ("transformers", 0.7, 50, 0.95, 0.0)),
    # Silent cards (or silent fields): llama.cpp's own defaults.
    ("openchat-3.5-0106", ("llama.cpp", 0.8, 40, 0.95, 0.05)),
    ("memphis-cot-3b", ("llama.cpp", 0.5, 40, 0.8, 0.05)),
    ("memphis-cot-3b-reasoning", ("llama.cpp", 0.5, 40, 0.8, 0.05)),
])
def test_seed_sampling_is_what_the_card_states(registry: Registry, model: str,
                                               expected: tuple[Any, ...]) -> None:
    s = registry.get(model).sampling
    assert (s.base, s.temperature, s.top_k, s.top_p, s.min_p) == expected
    assert (s.repeat_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)


def test_a_base_fills_only_the_fields_an_entry_leaves_out(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  t:\n    path: m.gguf\n"
                    "    sampling: {base: transformers, top_k: 3}\n"
                    "  l:\n    path: m.gguf\n    sampling: {temperature: 0.2}\n")
    registry = Registry.load(path, Settings().templates_dir, tmp_path / "models")
    t, ll = registry.get("t").sampling, registry.get("l").sampling
    assert (t.temperature, t.top_k, t.top_p, t.min_p) == (1.0, 3, 1.0, 0.0)
    assert (ll.base, ll.temperature, ll.top_k, ll.top_p, ll.min_p) == \
        ("llama.cpp", 0.2, 40, 0.95, 0.05)
    path.write_text("models:\n  t:\n    path: m.gguf\n    sampling: {base: vllm}\n")
    with pytest.raises(RegistryError, match=r"model 't': field 'sampling.base'"):
        Registry.load(path, Settings().templates_dir, tmp_path / "models")


def test_openchat_is_the_interleaved_model_built_locally(registry: Registry) -> None:
    spec = registry.get("openchat-3.5-0106")
    assert spec.convert == "Pretergeek/OpenChat-3.5-0106_8.99B_40Layers-Interleaved"
    assert spec.repo is None  # nothing to download: no GGUF of it is published
    assert spec.file_name == "OpenChat-3.5-0106_8.99B_40Layers-Interleaved.Q4_K_M.gguf"
    assert (spec.template, spec.stop) == ("openchat", ("<|end_of_turn|>",))


def test_a_missing_converted_file_says_how_to_build_it(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  oc:\n    convert: Org/Model-9B\n    file: Model-9B.{quant}.gguf\n"
                    "    quant: Q4_K_M\n    quants: [Q4_K_M, f16]\n")
    registry = Registry.load(path, Settings().templates_dir, tmp_path / "models")  # no error yet
    target = tmp_path / "models" / "Org--Model-9B" / "Model-9B.Q4_K_M.gguf"
    with pytest.raises(ModelLoadFailed) as err:
        registry.local_file(registry.get("oc"))
    f16 = target.with_name("Model-9B.f16.gguf")
    assert err.value.status_code == 503
    assert err.value.message == (
        f"field 'convert': GGUF file not found: {target}. Org/Model-9B publishes no GGUF; build "
        "it with llama.cpp's converter (README, \"Converting a model\"): "
        f"hf download Org/Model-9B --local-dir {target.parent}/hf && "
        f"python llama.cpp/convert_hf_to_gguf.py {target.parent}/hf --outtype f16 --outfile {f16}"
        f" && llama-quantize {f16} {target} Q4_K_M")
    with pytest.raises(ModelLoadFailed, match="--outfile " + str(f16) + "$"):
        registry.local_file(registry.get("oc:f16"))  # f16 needs no llama-quantize step
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert registry.local_file(registry.get("oc")) == target
    path.write_text("models:\n  oc:\n    convert: Org/Model-9B\n")
    with pytest.raises(RegistryError, match="'convert' needs 'file'"):
        Registry.load(path, Settings().templates_dir, tmp_path / "models")


# ---- On the real llama.cpp: the registry's rope settings through the engine's context path.

@pytest.fixture(scope="module")
def falcon(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Falcon; the same with Alfred's base in the GGUF; the same with its query and key
    projections scaled by m (what the attention factor must be equivalent to)."""
    folder = tmp_path_factory.mktemp("falcon")
    plain = write_gguf(folder / "plain.gguf", "falcon", shape=FALCON, seed=7)
    based = write_gguf(folder / "based.gguf", "falcon", shape=FALCON, seed=7,
                       rope_freq_base=ALFRED_BASE)
    scaled = folder / "scaled.gguf"
    shutil.copy(plain, scaled)
    reader = gguf.GGUFReader(scaled, "r+")
    # attn_qkv rows: Q (n_embd), K (n_embd_kv), then V; RoPE is linear, so rope(m q) = m rope(q).
    qk_rows = FALCON.n_embd + FALCON.n_embd_kv
    for tensor in reader.tensors:
        if tensor.name.endswith("attn_qkv.weight"):
            tensor.data[:qk_rows] *= np.float32(ALFRED_M)
    del reader  # flushes the memory map
    return {"plain": plain, "based": based, "scaled": scaled}


@pytest.fixture(scope="module")
def load() -> Iterator[Any]:
    init_backend()
    models: list[NativeModel] = []

    def logits(path: Path, rope: RopeSpec) -> np.ndarray[Any, Any]:
        """Every position's logits for TOKENS, with `rope` applied as the engine applies it."""
        model = NativeModel(path, n_gpu_layers=0, repack=repack_enabled("auto"))
        models.append(model)
        spec = ModelSpec(id="tiny-alfred", path=str(path), rope=rope)
        config = ContextConfig(n_ctx=64, parallel=1, batch_tokens=64, threads=2,
                               rope=_rope_params(spec))
        params = context_params(config)
        params.n_ctx = params.n_batch = params.n_ubatch = config.n_ctx
        ctx = create_context(model, params, "the test context")
        batch = lc.llama_batch_init(len(TOKENS), 0, 1)
        try:
            for i, token in enumerate(TOKENS):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = len(TOKENS)
            assert lc.llama_decode(ctx, batch) == 0
            rows = [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), (model.n_vocab,))
                    for i in range(len(TOKENS))]
            return np.array(rows, dtype=np.float64)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    yield logits
    for model in models:
        model.close()


def test_llama_cpp_applies_alfreds_base_and_attention_factor(
        falcon: dict[str, Path], load: Any, registry: Registry,
        caplog: pytest.LogCaptureFixture) -> None:
    alfred = registry.get("alfred-40b-1023").rope
    base_only = RopeSpec(scaling="none", freq_base=alfred.freq_base)
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        full = load(falcon["plain"], alfred)
    context_log = [r.getMessage() for r in caplog.records if r.name == "llama.cpp"]
    assert any(line.endswith("freq_base             = 52664.4") for line in context_log)
    assert any(line.endswith("freq_scale            = 1") for line in context_log)
    # llama.cpp logs no attention factor unless it computes one itself (YaRN): it must not.
    assert not any("yarn_attn_factor" in line for line in context_log)

    plain = load(falcon["plain"], RopeSpec())
    base = load(falcon["plain"], base_only)
    # The override is exactly the base: the same as a GGUF trained with that base.
    np.testing.assert_allclose(base, load(falcon["based"], RopeSpec()), rtol=0, atol=1e-6)
    # The factor is exactly q and k each scaled by m, and nothing else (float32 rounding apart:
    # about 5e-5 here, against about 2e-2 for either change).
    np.testing.assert_allclose(full, load(falcon["scaled"], base_only), rtol=0, atol=1e-3)
    # Each changes the model: base vs un-scaled, factor vs base only.
    assert np.abs(base - plain).max() > 5e-3
    assert np.abs(full - base).max() > 5e-3
