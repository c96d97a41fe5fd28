"""The engine interface the API layer talks to, and the types that cross it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from typing_extensions import TypeIs

from server.chat.template import Prompt

if TYPE_CHECKING:
    from server.registry import Registry

FinishReason = Literal["stop", "length"]

# Whether the caller may have a model's GGUF downloaded (the API's admin scope). A context
# variable rather than an argument: every engine call that names a model may load it, and only
# the download step asks.
MAY_DOWNLOAD: ContextVar[bool] = ContextVar("may_download", default=True)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; temperature 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar the output must follow; with `trigger_pattern` it is lazy: it applies
    from where that regex (matched against all output so far; group 1 marks the start) hits."""

    gbnf: str
    trigger_pattern: str | None = None
    param: str = "response_format"  # the request field it came from, for errors


TokenIds = tuple[int, ...]


def is_token_ids(prompt: Prompt | TokenIds) -> TypeIs[TokenIds]:
    return bool(prompt) and isinstance(prompt[0], int)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue `n` times; `max_tokens` None means up to the context's end.

    A prompt of token ids is read as it is (no BOS added); `max_tokens` 0 only reads it.
    """

    model: str
    prompt: Prompt | TokenIds
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    # With max_tokens None: stop after this many tokens or at the context's end, whichever
    # comes first (a server default, which never makes a request overflow the context).
    default_max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_tokens: TokenIds = ()
    n: int = 1
    keep_alive: float | None = None  # seconds the model stays loaded after this request
    logprobs: int | None = None  # each output token's log-probability and this many runners-up
    echo: bool = False  # send the prompt's tokens back (PromptTokens)
    prompt_logprobs: int | None = None  # with echo: the prompt tokens' log-probabilities too
    grammar: Grammar | None = None
    # False: the client reads the reply whole, so the engine may hand over its text in one
    # piece at the end (after the first text, which times the first token) instead of waking
    # the event loop for every token.
    stream: bool = True
    # Control tokens whose text the output keeps (a tool-call format's `[TOOL_CALLS]`,
    # `<|python_tag|>`), as llama-server's preserved_tokens; other control tokens add no text.
    preserved: tuple[str, ...] = ()
    adapter: str | None = None  # a LoRA adapter of `model` (its registry `lora` name)

    @property
    def served_model(self) -> str:
        """The model as the client named it: `model`, or `model:adapter`."""
        return self.model if self.adapter is None else f"{self.model}:{self.adapter}"


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model (log-softmax of the raw logits) and
    the most likely tokens at its position; `piece` is its bytes, special tokens as text."""

    token: int
    piece: bytes
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New output text of choice `index` (never a partial UTF-8 character or stop string)."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this text came from, when asked


@dataclass(frozen=True)
class PromptTokens:
    """Sent once before any text when a request asks for `echo`: the tokens the model read."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    reason: FinishReason
    stop: str | None = None  # the stop string that ended the choice, if one did


@dataclass(frozen=True)
class Usage:
    """Sent once, last: exact token counts of the whole request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = TextDelta | ChoiceFinished | Usage | PromptTokens


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to know about a loaded model to build prompts."""

    id: str
    n_ctx: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    # The texts llama.cpp reads as special (control) tokens when it parses special-token
    # text: the renderer keeps client text that contains one of them unparsed.
    special_tokens: tuple[str, ...] = ()


# on_disk: not loaded, its file is here; not_downloaded: not loaded, a download (or a missing
# file) stands between it and serving
ModelState = Literal["on_disk", "not_downloaded", "downloading", "loading", "loaded", "failed"]


@dataclass(frozen=True)
class ModelStatus:
    """Where a registry model stands: on disk or not, loading, loaded (and where), or failed."""

    state: ModelState
    error: str | None = None  # why the last load failed
    downloaded: int | None = None  # bytes so far, while downloading
    download_size: int | None = None
    n_ctx: int | None = None
    device: str = "cpu"  # "cpu", or the GPU backend's name (e.g. "CUDA0")
    gpu_layers: int = 0
    n_layer: int = 0
    memory_ram: int = 0  # bytes this model takes, when loaded
    memory_vram: int = 0
    size: int | None = None  # bytes of its GGUF on disk, or of the download (None: unknown)


@dataclass(frozen=True)
class Embeddings:
    """One unit-length (L2-normalised) vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Ranking:
    """A reranker's relevance score of each document for the query, in document order (raw
    classifier outputs, as llama-server returns them: higher is more relevant)."""

    scores: list[float]
    prompt_tokens: int


@dataclass(frozen=True)
class InfillTokens:
    """A code model's fill-in-the-middle token ids (llama_vocab_fim_*): prefix, suffix and
    middle markers, the repository and file separators where it has them, and the BOS the
    vocabulary puts before a prompt (None: it adds none)."""

    prefix: int
    suffix: int
    middle: int
    repo: int | None = None
    file_sep: int | None = None
    bos: int | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded model's vocabulary: its kind and special tokens as text (None: it has none)."""

    vocab_type: str  # llama.cpp's: "spm", "bpe", "wpm", "ugm", ...
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos: bool  # the vocabulary asks for a BOS before every prompt
    infill: InfillTokens | None = None  # None: the model has no FIM tokens (no /infill)


class GenerationStream(Protocol):
    """The events of one admitted request; `cancel()` stops its generation at the next step."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """What the API layer may ask of an engine: start, stop, describe models, generate."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def loaded(self) -> list[str]: ...

    def overloaded(self) -> bool: ...

    async def model_info(self, model: str) -> ModelInfo: ...

    def status(self, model: str) -> ModelStatus:
        """Where registry entry `model` stands now."""
        ...

    async def load(self, model: str) -> ModelStatus:
        """Load `model` now (downloading it first if needed)."""
        ...

    async def unload(self, model: str) -> ModelStatus:
        """Unload `model` now, or once its running requests finish."""
        ...

    async def use_registry(self, registry: Registry) -> None:
        """Serve from `registry` from now on; loaded models it changed or dropped unload."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Admit `request` (raising typed errors before any output) and return its events."""
        ...

    async def embed(self, model: str, inputs: list[list[int]] | list[str]) -> Embeddings:
        """Embed each input (text, or token ids used as they are) with embedding model `model`."""
        ...

    async def rerank(self, model: str, query: str, documents: list[str]) -> Ranking:
        """Score each document's relevance to `query` with reranker `model` (an embedding
        entry with rank pooling); NotAReranker for any other model."""
        ...

    async def tokenize(self, model: str, prompt: Prompt, add_special: bool) -> list[int]:
        """`prompt`'s tokens; with `add_special`, exactly what the model reads for it (the BOS
        its vocabulary asks for; an embedding model's BOS/EOS)."""
        ...

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of `tokens`, special tokens as their text; UnknownToken for a bad id."""
        ...

    async def token_texts(self, model: str, tokens: list[int]) -> list[str]:
        """Each token's entry in the vocabulary (as HF's convert_ids_to_tokens gives them)."""
        ...

    async def tokenizer_info(self, model: str) -> TokenizerInfo:
        """`model`'s vocabulary facts (loading it first if need be)."""
        ...
