"""The random-weight GGUF factory: files that the real llama.cpp loads, tokenizes and runs."""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest
from llama_cpp.llama_types import CreateCompletionResponse

from tests.conftest import reference_llama
from tests.gguf_factory import ARCHS, SHAPES, main, vocabulary, write_gguf

SPECIALS = ("<end_message>", "<start_user>", "<|end_of_turn|>")
TEMPLATE = "{% for m in messages %}<start_user>{{ m['content'] }}<end_message>{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per architecture, whose EOS is the special token <end_message>."""
    out = tmp_path_factory.mktemp("gguf")
    return {arch: write_gguf(out / f"{arch}.gguf", arch, special_tokens=SPECIALS,
                             eos_token="<end_message>", chat_template=TEMPLATE)
            for arch in ARCHS}


def load(path: Path, n_ctx: int = 256, vocab_only: bool = False) -> closing[llama_cpp.Llama]:
    # Without AMX repacking, which crashes on quantized models on AMX CPUs.
    return closing(reference_llama(path, n_ctx=n_ctx, vocab_only=vocab_only))


def complete(llm: llama_cpp.Llama, max_tokens: int, **kwargs: Any) -> CreateCompletionResponse:
    """Greedy completion of "hello"."""
    out = llm.create_completion("hello", max_tokens=max_tokens, temperature=0, **kwargs)
    assert isinstance(out, dict)
    return out


@pytest.fixture(scope="module")
def vocab(models: dict[str, Path]) -> Iterator[llama_cpp.Llama]:
    with load(models["llama"], vocab_only=True) as llm:
        yield llm


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_generates(models: dict[str, Path], arch: str) -> None:
    with load(models[arch]) as llm:
        out = complete(llm, 8)
        assert llm.metadata["general.architecture"] == arch
        assert llm.metadata[f"{arch}.attention.head_count_kv"] == "2"
        assert llm.metadata["tokenizer.chat_template"] == TEMPLATE
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 2  # <s> ▁hello
    # Random weights may sample byte-fallback tokens that leave a UTF-8 sequence unfinished;
    # llama-cpp-python then samples past max_tokens to complete it.
    assert out["usage"]["completion_tokens"] >= 8


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_bias_forces_the_eos_special_token(models: dict[str, Path], arch: str) -> None:
    with load(models[arch]) as llm:
        eos = llm.token_eos()
        assert eos == vocabulary(SPECIALS)[0].index("<end_message>")
        out = complete(llm, 3, logit_bias={eos: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == ""
    assert out["usage"]["completion_tokens"] == 0


def test_logit_bias_forces_another_special_token(models: dict[str, Path]) -> None:
    with load(models["llama"]) as llm:
        (user,) = llm.tokenize(b"<start_user>", add_bos=False, special=True)
        out = complete(llm, 3, logit_bias={user: 100.0})
        # The last sampled token is never evaluated: the context holds prompt + 2 of them.
        fed = llm.input_ids[: llm.n_tokens].tolist()
        prompt = llm.tokenize(b"hello")
    assert fed == [*prompt, user, user]
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"] == ""  # control tokens do not render


@pytest.mark.parametrize("text", [*SPECIALS, "</s>", "<s>"])
def test_special_tokens_parse_only_when_asked(vocab: llama_cpp.Llama, text: str) -> None:
    token = vocabulary(SPECIALS)[0].index(text)
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == [token]
    plain = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert len(plain) > 1
    assert token not in plain


def test_text_tokenizes_sensibly(vocab: llama_cpp.Llama) -> None:
    assert vocab.tokenize(b"hello world", add_bos=False) == [
        vocab.tokenize(b"hello", add_bos=False)[0], vocab.tokenize(b"world", add_bos=False)[0]]
    sentence = b"The quick brown fox jumps over the lazy dog, and then it went home."
    assert 10 < len(vocab.tokenize(sentence, add_bos=False)) < len(sentence) // 2
    for text in ("日本語", "naïve café 🙂", "tab\tnew\nline"):
        tokens = vocab.tokenize(text.encode(), add_bos=False)
        assert vocab.detokenize(tokens).decode() == " " + text  # SPM adds the space prefix


def test_vocabulary_layout() -> None:
    tokens, scores, types = vocabulary(["<x>", "</s>"])
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<x>"]
    assert tokens[4:260] == [f"<0x{b:02X}>" for b in range(256)]
    assert types[3] == gguf.TokenType.CONTROL
    assert set(types[4:260]) == {gguf.TokenType.BYTE}
    assert len(set(tokens)) == len(tokens)
    assert "▁the" in tokens
    assert scores[260:] == sorted(scores[260:], reverse=True)


def test_tensor_layout(models: dict[str, Path]) -> None:
    def shapes(arch: str) -> dict[str, list[int]]:
        reader = gguf.GGUFReader(models[arch])
        return {t.name: [int(n) for n in t.shape] for t in reader.tensors}

    falcon = shapes("falcon")  # Falcon-40B: llama.cpp keys its second norm on this tensor
    assert falcon["blk.0.attn_norm_2.weight"] == [64]
    assert falcon["blk.1.attn_qkv.weight"] == [64, 64 + 2 * 32]  # ggml order: in, out
    llama = shapes("llama")
    assert llama["blk.0.attn_k.weight"] == [64, 32]  # GQA: 2 of 4 heads
    assert "blk.0.ffn_norm.bias" not in llama
    assert "blk.0.ffn_norm.bias" in shapes("stablelm")


def test_options(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", add_bos=False, dtype="f16")
    with load(path) as llm:
        assert llm.tokenize(b"hello")[0] != llm.token_bos()
        assert llm.token_eos() == 2
        assert "tokenizer.chat_template" not in llm.metadata
        assert complete(llm, 2)["usage"]["completion_tokens"] >= 2
    with pytest.raises(ValueError, match="eos_token"):
        write_gguf(tmp_path / "bad.gguf", "llama", eos_token="<nope>")
    with pytest.raises(ValueError, match="arch"):
        write_gguf(tmp_path / "bad.gguf", "gpt2")


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_matrix_dtypes(tmp_path: Path, dtype: str) -> None:
    path = write_gguf(tmp_path / "m.gguf", "falcon", dtype=dtype)
    with load(path) as llm:
        out = complete(llm, 2)
    assert out["usage"]["completion_tokens"] >= 2


def test_real_shape_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    """A Mistral-7B layer (q4_0, ~120 MB) is written holding about one tensor in memory."""
    shape = dataclasses.replace(SHAPES["mistral-7b"], n_layer=1)
    tracemalloc.start()
    try:
        path = write_gguf(tmp_path / "m.gguf", "llama", shape=shape, dtype="q4_0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    largest = 14336 * 4096 // 32 * 18  # ffn_up in q4_0
    assert path.stat().st_size > 3 * largest
    assert peak < 1.5 * largest
    with load(path, n_ctx=64) as llm:
        assert llm.n_embd() == 4096
        assert complete(llm, 1)["usage"]["completion_tokens"] >= 1


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    main(["--arch", "stablelm", "--shape", "tiny", "--dtype", "f16", "--special-token", "<x>",
          "--eos-token", "<x>", str(out)])
    assert str(out) in capsys.readouterr().out
    with load(out, vocab_only=True) as llm:
        assert llm.token_eos() == 3


@pytest.mark.parametrize("tokenizer", ["gpt2", "falcon"])
def test_byte_level_bpe_vocabularies(tmp_path: Path, tokenizer: str) -> None:
    path = write_gguf(tmp_path / "m.gguf", "falcon", tokenizer=tokenizer, add_bos=False,
                      special_tokens=["<|im_end|>"], user_defined_tokens=["  "])
    with load(path, vocab_only=True) as llm:
        eot = llm.token_eos()
        assert llm.detokenize([eot], special=True) == b"<|endoftext|>"
        assert eot == (11 if tokenizer == "falcon" else 0)  # Falcon's own id
        words = llm.tokenize(b"the world", add_bos=False)
        assert [llm.detokenize([t]) for t in words] == [b"the", b" world"]
        (im_end,) = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
        assert im_end not in llm.tokenize(b"<|im_end|>", add_bos=False, special=False)
        (spaces,) = llm.tokenize(b"  ", add_bos=False)  # user-defined: split even unparsed
        assert llm.tokenize(b"a  b", add_bos=False)[1] == spaces


def test_q4_k_m_has_llama_quantizes_mix_and_sane_logits(tmp_path: Path) -> None:
    """Q4_K everywhere but Q6_K for the output and for attn_v / ffn_down in the layers
    llama-quantize gives more bits (of 8: 0, 3, 6, 7); the random blocks give finite logits
    that are neither flat nor dominated by one token."""
    shape = dataclasses.replace(SHAPES["mistral-7b"], n_layer=8, n_embd=512, n_head=8,
                                n_head_kv=2, n_ff=1024)
    path = write_gguf(tmp_path / "m.gguf", "llama", shape=shape, dtype="q4_k_m",
                      vocab_size=8000)
    Q = gguf.GGMLQuantizationType
    types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    for kind in ("attn_v", "ffn_down"):
        six = [i for i in range(8) if types[f"blk.{i}.{kind}.weight"] == Q.Q6_K]
        assert six == [0, 3, 6, 7], kind
    assert types["blk.3.attn_q.weight"] == Q.Q4_K
    with closing(reference_llama(path, n_ctx=64, logits_all=True)) as llm:
        assert llm.n_vocab() == 8000
        out = complete(llm, 1, logprobs=5)
    top = [float(lp) for lp in out["choices"][0]["logprobs"]["top_logprobs"][0].values()]
    # finite, none near certain, and not flat (8,000 equal tokens: -8.99 each)
    assert all(-30 < lp < -0.05 for lp in top) and top[0] > -8.9, top
