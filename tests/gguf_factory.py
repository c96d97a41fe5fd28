"""Small random-weight GGUF models that the real llama.cpp loads and generates with.

One writer per architecture: ``llama`` (also Mistral-style, with n_head_kv < n_head for
GQA), ``stablelm`` (StableLM-3B-4E1T: LayerNorm with biases, partial rotary) and ``falcon``
(Falcon-40B style: fused QKV, GQA and the second attention norm ``attn_norm_2``; llama.cpp
picks the 40B code path only from that tensor's presence, there is no metadata key for it).
One more, ``bert``, is an encoder for embedding tests (not in ``ARCHS``: it cannot generate):
non-causal attention, learned positions, post-norm layers with biases, CLS pooling, and the
same vocabulary read as a WordPiece (``bert``) tokenizer; with ``reranker=True`` it is a
cross-encoder as llama.cpp runs BGE/ms-marco rerankers: rank pooling, the classification head
(``cls``: dense + tanh, ``cls.output``: one score) and ``<s> query </s></s> doc </s>`` pairs
(add_eos, add_sep). ``tensors`` replaces chosen random weights (f32 files), so a test can
predict what a model computes.

The vocabulary (``tokenizer``) is one of ``TOKENIZERS``, with the token types that converted
models carry: ``llama``, a SentencePiece tokenizer (Llama/Mistral/OpenChat): ``<unk> <s> </s>``,
then the caller's special tokens (CONTROL) and user-defined tokens (USER_DEFINED), then the 256
byte-fallback tokens, then word pieces, so any text tokenizes and English text gives a sensible
number of tokens; ``gpt2``, a byte-level BPE (GPT-NeoX/StableLM/Memphis): ``<|endoftext|>``,
the caller's tokens, the 256 byte symbols and merges that build the same words; ``falcon``, the
same BPE behind Falcon's pre-tokenizer and its leading ``>>TITLE<<``... control tokens, with
``<|endoftext|>`` at id 11 as in Falcon's own vocabulary. Note that llama.cpp
also marks some special tokens end-of-generation by their text alone ("<|im_end|>",
"<|endoftext|>", "<end_of_turn>", "<|eot_id|>", ...), whatever ``eos_token`` says.

Tensors are generated and written one at a time, so real shapes (``SHAPES["mistral-7b"]``)
need about one tensor of memory; matrices are f32, f16, or random q8_0 / q4_0 blocks
written directly (a Falcon-40B f16 file would be ~80 GB)::

    python -m tests.gguf_factory --arch llama --shape mistral-7b --dtype f16 out.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

__all__ = ["ARCHS", "DTYPES", "ENCODER_ARCHS", "SHAPES", "TOKENIZERS", "Shape",
           "bpe_vocabulary", "main", "vocabulary", "write_gguf", "write_lora"]


@dataclass(frozen=True)
class Shape:
    """The hyperparameters that size a model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv


SHAPES: dict[str, Shape] = {
    "tiny": Shape(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128),
    "stablelm-3b": Shape(n_layer=32, n_embd=2560, n_head=32, n_head_kv=32, n_ff=6912),
    "mistral-7b": Shape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
                        n_ctx_train=32768),
    "falcon-40b": Shape(n_layer=60, n_embd=8192, n_head=128, n_head_kv=8, n_ff=32768,
                        n_ctx_train=2048),
}

ARCHS = ("llama", "stablelm", "falcon")
TOKENIZERS = ("llama", "gpt2", "falcon")
# Falcon's first tokens, all control tokens; its <|endoftext|> follows at id 11.
_FALCON_CONTROLS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
                    ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<",
                    ">>MIDDLE<<")
ENCODER_ARCHS = ("bert",)
# Matrix types: plain floats, or ggml blocks (written directly as random blocks, so that a
# big model can be written quantized without an f16 copy on disk first).
DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    # llama-quantize's Q4_K_M mix: Q4_K, with Q6_K for the output matrix and for attn_v and
    # ffn_down in the layers `_more_bits` picks (see _matrix_type)
    "q4_k_m": (gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}
WEIGHT_STD = 0.02
NORM_EPS = 1e-5

_T = gguf.MODEL_TENSOR

# Common English words; each becomes "▁word" plus its "▁"-prefixes, so that llama.cpp's
# SPM merges (which only join pairs whose concatenation is in the vocabulary) reach it.
_WORD_TEXT = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final
gave green quick develop ocean warm free minute strong special mind behind clear tail produce
fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane age dry wonder laugh
thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among hello model token server request response answer user assistant
The A An In It This That What How Why When Where Who I We You He She They Hello Yes No
"""
_WORDS = _WORD_TEXT.split()


def _add_tokens(tokens: list[str], types: list[gguf.TokenType], special_tokens: Sequence[str],
                user_defined_tokens: Sequence[str]) -> None:
    for texts, kind in ((special_tokens, gguf.TokenType.CONTROL),
                        (user_defined_tokens, gguf.TokenType.USER_DEFINED)):
        for text in texts:
            if not text:
                raise ValueError("special tokens must not be empty")
            if text not in tokens:
                tokens.append(text)
                types.append(kind)


def vocabulary(
    special_tokens: Sequence[str] = (), user_defined_tokens: Sequence[str] = (),
) -> tuple[list[str], list[float], list[gguf.TokenType]]:
    """The tokens, scores and token types of the SentencePiece-style vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    _add_tokens(tokens, types, special_tokens, user_defined_tokens)
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
    scores = [0.0] * len(tokens)

    pieces = ["▁", *(chr(c) for c in range(0x21, 0x7F))]
    for word in _WORDS:
        pieces += ["▁" + word[:n] for n in range(1, len(word) + 1)]
    seen = set(tokens)
    rank = 0
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        rank += 1
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _pad_vocabulary(tokens: list[str], scores: list[float], types: list[gguf.TokenType],
                    size: int) -> None:
    """Grow a SentencePiece vocabulary to `size` tokens (a real model's vocabulary size).

    The extra pieces are "▁" + every lowercase string of 1, 2, 3, ... letters in order, so
    each one's prefixes are tokens too and SentencePiece merges reach all of them.
    """
    seen, frontier, lowest = set(tokens), [""], min(scores)
    while len(tokens) < size:
        frontier = [s + c for s in frontier for c in "abcdefghijklmnopqrstuvwxyz"]
        for piece in ("▁" + s for s in frontier):
            if len(tokens) == size:
                break
            if piece not in seen:
                tokens.append(piece)
                lowest -= 1.0
                scores.append(lowest)
                types.append(gguf.TokenType.NORMAL)


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: each byte as a printable character ("Ġ" is the space)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = chr(256 + extra), extra + 1
    return [symbols[b] for b in range(256)]


def bpe_vocabulary(
    special_tokens: Sequence[str] = (), user_defined_tokens: Sequence[str] = (),
    falcon: bool = False,
) -> tuple[list[str], list[gguf.TokenType], list[str]]:
    """The tokens, token types and merges of the byte-level BPE vocabulary."""
    tokens = [*(_FALCON_CONTROLS if falcon else ()), "<|endoftext|>"]
    types = [gguf.TokenType.CONTROL] * len(tokens)
    _add_tokens(tokens, types, special_tokens, user_defined_tokens)
    bytes_ = _byte_symbols()
    tokens += bytes_
    types += [gguf.TokenType.NORMAL] * 256
    seen, merges = set(tokens), []
    # Space-prefixed words first: their merges rank before those of bare words, so " the"
    # becomes "Ġthe" rather than "Ġ" + "the".
    for form in [*("Ġ" + w for w in _WORDS), *_WORDS]:
        for n in range(2, len(form) + 1):
            if form[:n] not in seen:
                seen.add(form[:n])
                tokens.append(form[:n])
                types.append(gguf.TokenType.NORMAL)
                merges.append(f"{form[:n - 1]} {form[n - 1]}")
    return tokens, types, merges


def _tensor_specs(arch: str, shape: Shape, n_vocab: int,
                  reranker: bool = False) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order; numpy shape is ggml's reversed."""
    e, kv, ff = shape.n_embd, shape.n_embd_kv, shape.n_ff

    def name(t: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
        if t not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]:
            raise AssertionError(f"{arch} has no tensor {t}")
        base = gguf.TENSOR_NAMES[t]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    if arch == "bert":
        yield name(_T.TOKEN_EMBD, "weight"), (n_vocab, e)
        yield name(_T.TOKEN_TYPES, "weight"), (2, e)  # segment A/B
        yield name(_T.POS_EMBD, "weight"), (shape.n_ctx_train, e)
        yield name(_T.TOKEN_EMBD_NORM, "weight"), (e,)
        yield name(_T.TOKEN_EMBD_NORM, "bias"), (e,)
        for i in range(shape.n_layer):
            for t, rows, cols in ((_T.ATTN_Q, e, e), (_T.ATTN_K, kv, e), (_T.ATTN_V, kv, e),
                                  (_T.ATTN_OUT, e, e), (_T.FFN_UP, ff, e), (_T.FFN_DOWN, e, ff)):
                yield name(t, "weight", i), (rows, cols)
                yield name(t, "bias", i), (rows,)
            for t in (_T.ATTN_OUT_NORM, _T.LAYER_OUT_NORM):
                yield name(t, "weight", i), (e,)
                yield name(t, "bias", i), (e,)
        if reranker:  # llama.cpp's classification head: tanh(cls @ h + b), then cls.output
            for t, rows in ((_T.CLS, e), (_T.CLS_OUT, 1)):
                yield name(t, "weight"), (rows, e)
                yield name(t, "bias"), (rows,)
        return
    biased_norms = arch != "llama"  # LayerNorm with bias for stablelm and falcon
    yield name(_T.TOKEN_EMBD, "weight"), (n_vocab, e)
    yield name(_T.OUTPUT_NORM, "weight"), (e,)
    if biased_norms:
        yield name(_T.OUTPUT_NORM, "bias"), (e,)
    yield name(_T.OUTPUT, "weight"), (n_vocab, e)
    for i in range(shape.n_layer):
        yield name(_T.ATTN_NORM, "weight", i), (e,)
        if biased_norms:
            yield name(_T.ATTN_NORM, "bias", i), (e,)
        if arch == "falcon":
            yield name(_T.ATTN_NORM_2, "weight", i), (e,)
            yield name(_T.ATTN_NORM_2, "bias", i), (e,)
            yield name(_T.ATTN_QKV, "weight", i), (e + 2 * kv, e)
        else:
            yield name(_T.ATTN_Q, "weight", i), (e, e)
            yield name(_T.ATTN_K, "weight", i), (kv, e)
            yield name(_T.ATTN_V, "weight", i), (kv, e)
        yield name(_T.ATTN_OUT, "weight", i), (e, e)
        if arch != "falcon":
            yield name(_T.FFN_NORM, "weight", i), (e,)
            if biased_norms:
                yield name(_T.FFN_NORM, "bias", i), (e,)
            yield name(_T.FFN_GATE, "weight", i), (ff, e)
        yield name(_T.FFN_UP, "weight", i), (ff, e)
        yield name(_T.FFN_DOWN, "weight", i), (e, ff)


def _add_hparams(w: gguf.GGUFWriter, arch: str, shape: Shape, rope_freq_base: float,
                 reranker: bool = False) -> None:
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(rope_freq_base)
    if arch == "llama":
        w.add_layer_norm_rms_eps(NORM_EPS)
    else:
        w.add_layer_norm_eps(NORM_EPS)
    if arch == "bert":
        w.add_causal_attention(False)
        w.add_token_type_count(2)
        w.add_pooling_type(gguf.PoolingType.RANK if reranker else gguf.PoolingType.CLS)
    if arch == "stablelm":  # StableLM-3B-4E1T rotates a quarter of each head
        w.add_rope_dimension_count(max(2, shape.head_dim // 4 // 2 * 2))
    else:  # llama.cpp requires n_rot == head_dim for llama and falcon
        w.add_rope_dimension_count(shape.head_dim)


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama-quantize's use_more_bits: the layers a K-quant mix gives more bits."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _matrix_type(name: str, dtype: str, n_layer: int) -> gguf.GGMLQuantizationType:
    """The type of matrix `name` in a `dtype` file (Q4_K_M mixes two, as llama-quantize does)."""
    qtype = DTYPES[dtype][0]
    if dtype != "q4_k_m":
        return qtype
    if name == "output.weight":
        return gguf.GGMLQuantizationType.Q6_K
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        layer = int(name.split(".")[1])
        if _more_bits(layer, n_layer):
            return gguf.GGMLQuantizationType.Q6_K
    return qtype


def _matrix_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1])) * shape[-1] // block * size


def _random_matrix(
    rng: np.random.Generator, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> np.ndarray:
    """Random weights of about WEIGHT_STD, cheap enough for billions of them."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        data = rng.standard_normal(shape, dtype=np.float32)
        data *= WEIGHT_STD
        return data
    if qtype == Q.F16:
        # Random sign and mantissa, exponent 2**-7 or 2**-6: |w| in [0.0078, 0.031).
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        bits &= 0x87FF
        bits |= 0x2000
        return bits.view(np.float16)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    blocks = rng.integers(0, 1 << 8, size=(n_blocks, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit quants:
        # w = d * scale * q - dmin * min, q in 0..15, scale and min in 0..63 (std of
        # scale * q about 200, mean about 236: dmin = 7.5 d centres it).
        d = WEIGHT_STD / 200
        blocks[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(7.5 * d).tobytes(), dtype=np.uint8)
        return blocks.reshape(*shape[:-1], shape[-1] // block * size)
    if qtype == Q.Q6_K:
        # 128 + 64 bytes of 6-bit quants (offset 32), 16 int8 scales, then d (f16):
        # w = d * scale * (q - 32), std of scale * (q - 32) about 74 * 18.5.
        blocks[:, 208:210] = np.frombuffer(np.float16(WEIGHT_STD / 1370).tobytes(),
                                           dtype=np.uint8)
        return blocks.reshape(*shape[:-1], shape[-1] // block * size)
    # Q8_0 / Q4_0 blocks: an f16 scale, then 32 int8 (or 32 4-bit, offset 8) quants.
    q_std = 256 / 12**0.5 if qtype == Q.Q8_0 else 16 / 12**0.5
    blocks[:, :2] = np.frombuffer(np.float16(WEIGHT_STD / q_std).tobytes(), dtype=np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // block * size)


def write_gguf(
    path: Path,
    arch: str,
    *,
    shape: Shape = SHAPES["tiny"],
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    add_bos: bool = True,
    eos_token: str | None = None,
    seed: int = 0,
    dtype: str = "f32",
    rope_freq_base: float = 10000.0,
    tokenizer: str = "llama",
    user_defined_tokens: Sequence[str] = (),
    name: str | None = None,
    vocab_size: int | None = None,
    reranker: bool = False,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a random-weight GGUF model to `path` (streamed tensor by tensor); return it."""
    tensors = tensors or {}
    if reranker and arch != "bert":
        raise ValueError("a reranker is a bert cross-encoder: arch 'bert'")
    if tensors and dtype != "f32":
        raise ValueError("chosen tensors go in f32 files only")
    if arch not in ARCHS + ENCODER_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS + ENCODER_ARCHS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise ValueError(f"n_embd must divide by n_head and n_head by n_head_kv: {shape}")
    qtype, file_type = DTYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape.n_embd % block or shape.n_ff % block:
        raise ValueError(f"{dtype} needs n_embd and n_ff to be multiples of {block}: {shape}")
    if tokenizer not in TOKENIZERS or (arch == "bert" and tokenizer != "llama"):
        raise ValueError(f"unknown tokenizer {tokenizer!r} for {arch}; expected one of "
                         f"{TOKENIZERS[:1] if arch == 'bert' else TOKENIZERS}")
    scores: list[float] | None = None
    merges: list[str] | None = None
    if tokenizer == "llama":
        tokens, scores, types = vocabulary(special_tokens, user_defined_tokens)
        if vocab_size is not None:
            _pad_vocabulary(tokens, scores, types, vocab_size)
        bos, eos_token = 1, eos_token or "</s>"
    else:
        tokens, types, merges = bpe_vocabulary(special_tokens, user_defined_tokens,
                                               falcon=tokenizer == "falcon")
        bos, eos_token = tokens.index("<|endoftext|>"), eos_token or "<|endoftext|>"
    if arch == "bert":  # WordPiece has no byte fallback: llama.cpp aborts on BYTE tokens
        types = [gguf.TokenType.NORMAL if t == gguf.TokenType.BYTE else t for t in types]
    if eos_token not in tokens or types[tokens.index(eos_token)] == gguf.TokenType.NORMAL:
        raise ValueError(f"eos_token {eos_token!r} is not a control or special token")

    path = Path(path)
    specs = list(_tensor_specs(arch, shape, len(tokens), reranker))
    for tensor_name, np_shape in specs:
        if tensor_name in tensors and tensors[tensor_name].shape != np_shape:
            raise ValueError(f"{tensor_name} has shape {np_shape}, not "
                             f"{tensors[tensor_name].shape}")
    unknown = set(tensors) - {tensor_name for tensor_name, _ in specs}
    if unknown:
        raise ValueError(f"no such tensors in a {arch} model: {sorted(unknown)}")

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name or f"random-{arch}")  # llama.cpp sets some token attributes by name
    w.add_file_type(file_type)
    _add_hparams(w, arch, shape, rope_freq_base, reranker)
    w.add_tokenizer_model("bert" if arch == "bert" else "llama" if tokenizer == "llama"
                          else "gpt2")
    if tokenizer != "llama":
        w.add_tokenizer_pre("falcon" if tokenizer == "falcon" else "gpt-2")
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_token_types(types)
    if tokenizer == "llama":
        w.add_unk_token_id(0)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(tokens.index(eos_token))
    if arch == "bert":  # WordPiece: [CLS] text [SEP], here <s> text </s>
        w.add_sep_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(reranker)
    if reranker:
        w.add_add_sep_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    f32 = np.dtype(np.float32)
    for tensor_name, np_shape in specs:
        if len(np_shape) == 1:  # norms and biases stay f32
            w.add_tensor_info(tensor_name, np_shape, f32, np_shape[0] * f32.itemsize)
        else:
            mtype = _matrix_type(tensor_name, dtype, shape.n_layer)
            w.add_tensor_info(tensor_name, np_shape, f32, _matrix_nbytes(np_shape, mtype),
                              raw_dtype=mtype)

    rng = np.random.default_rng(seed)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tensor_name, np_shape in specs:  # one tensor in memory at a time
            if tensor_name in tensors:
                w.write_tensor_data(np.ascontiguousarray(tensors[tensor_name], np.float32))
            elif len(np_shape) > 1:
                w.write_tensor_data(_random_matrix(
                    rng, np_shape, _matrix_type(tensor_name, dtype, shape.n_layer)))
            elif tensor_name.endswith(".bias"):
                w.write_tensor_data(np.zeros(np_shape, dtype=np.float32))
            else:
                w.write_tensor_data(np.ones(np_shape, dtype=np.float32))
    finally:
        w.close()
    return path


def write_lora(path: Path, arch: str, weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
               *, alpha: float = 0.0, dtype: str = "f32") -> Path:
    """Write a LoRA adapter GGUF as llama.cpp's convert_lora_to_gguf.py does; return `path`.

    `weights` maps a base tensor's name (``output.weight``, ``blk.0.attn_q.weight``) to its
    (A, B) in PEFT's layout: A of numpy shape (rank, n_in), B of (n_out, rank), for a base
    matrix of numpy shape (n_out, n_in). llama.cpp then computes ``W x + s * B (A x)`` with
    ``s = scale * alpha / rank`` (``scale`` from llama_set_adapters_lora; alpha 0: ``scale``).
    """
    types = {"f32": np.float32, "f16": np.float16}
    if dtype not in types:
        raise ValueError(f"unknown adapter dtype {dtype!r}; expected one of {tuple(types)}")
    w = gguf.GGUFWriter(Path(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, (a, b) in weights.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: A must be (rank, n_in) and B (n_out, rank); got "
                             f"{a.shape} and {b.shape}")
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, types[dtype]))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, types[dtype]))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return Path(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.gguf_factory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--arch", choices=ARCHS + ENCODER_ARCHS, default="llama")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--n-layer", type=int, help="override the shape's layer count")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--special-token", action="append", default=[], dest="special_tokens",
                        help="a CONTROL token to add (repeatable)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="llama")
    parser.add_argument("--user-defined-token", action="append", default=[],
                        dest="user_defined_tokens", help="a USER_DEFINED token (repeatable)")
    parser.add_argument("--eos-token")
    parser.add_argument("--vocab-size", type=int,
                        help="pad the llama tokenizer's vocabulary to this many tokens")
    parser.add_argument("--chat-template-file", type=Path)
    parser.add_argument("--rope-freq-base", type=float, default=10000.0)
    parser.add_argument("--reranker", action="store_true",
                        help="with --arch bert: a cross-encoder reranker (rank pooling)")
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    if args.n_layer is not None:
        shape = dataclasses.replace(shape, n_layer=args.n_layer)
    template = args.chat_template_file.read_text() if args.chat_template_file else None
    path = write_gguf(args.out, args.arch, shape=shape, special_tokens=args.special_tokens,
                      chat_template=template, eos_token=args.eos_token, seed=args.seed,
                      dtype=args.dtype, rope_freq_base=args.rope_freq_base,
                      tokenizer=args.tokenizer, user_defined_tokens=args.user_defined_tokens,
                      vocab_size=args.vocab_size, reranker=args.reranker)
    print(f"{path}: {args.arch} {shape} {args.dtype}, {path.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
