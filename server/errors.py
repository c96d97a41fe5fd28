"""Typed errors shared by every layer; `api/errors.py` maps them to HTTP in one place."""

from __future__ import annotations

from collections.abc import Iterable


class ServerError(Exception):
    """Base of every error this server reports to a client."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServerError):
    """The request is well-formed JSON but asks for something this server cannot do."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = code


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested output does not fit the model's context window."""

    def __init__(self, *, n_prompt_tokens: int, n_ctx: int, max_tokens: int | None) -> None:
        if max_tokens is None:
            message = (
                f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
                f"{n_prompt_tokens} tokens. Shorten the prompt."
            )
            param = "messages"
        else:
            message = (
                f"This model's maximum context length is {n_ctx} tokens, but you requested "
                f"{n_prompt_tokens + max_tokens} tokens ({n_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens."
            )
            param = "max_tokens"
        super().__init__(message, param=param, code="context_length_exceeded")
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class PromptRenderError(InvalidRequest):
    """The model's chat template refused or failed to render the messages."""


class NotAnEmbeddingModel(InvalidRequest):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' is not an embedding model: mark its entry `embedding: true` "
            "in models.yaml to serve /v1/embeddings from it.", param="model")


class EmbeddingModelOnly(InvalidRequest):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' is an embedding model (`embedding: true` in models.yaml): it "
            "serves /v1/embeddings (a reranker: /v1/rerank), not chat or text completions.",
            param="model")


class NotAReranker(InvalidRequest):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' is not a reranker: /v1/rerank needs a reranker GGUF (a "
            "classification head) whose models.yaml entry says `embedding: true` and "
            "`pooling: rank`.", param="model")


class RerankerOnly(InvalidRequest):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' is a reranker (rank pooling): it scores query-document pairs "
            "on /v1/rerank and has no embeddings to return.", param="model")


class NoInfillTokens(InvalidRequest):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' cannot fill in the middle: its vocabulary has no FIM prefix, "
            "suffix and middle tokens. /infill needs a code model trained for it (Qwen2.5-Coder, "
            "CodeLlama, StarCoder2, CodeGemma, ...).", param="model")


class InputTooLong(InvalidRequest):
    """One embedding input does not fit the model's context window."""

    def __init__(self, *, index: int, n_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"Input {index} has {n_tokens} tokens; this model embeds at most {n_ctx} tokens "
            "per input. Shorten or split it.", param="input", code="context_length_exceeded")


class UnknownToken(InvalidRequest):
    """A token id outside the model's vocabulary."""

    def __init__(self, token: int, n_vocab: int, *, param: str) -> None:
        super().__init__(f"Token id {token} is not in this model's vocabulary (ids 0 to "
                         f"{n_vocab - 1}).", param=param)


class AuthenticationFailed(ServerError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class AdminKeyRequired(ServerError):
    """A valid key without the admin scope asked for an admin operation."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "admin_key_required"


class ModelNotDownloaded(ServerError):
    """A request without the admin scope named a model whose GGUF is not on disk yet."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_downloaded"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' is not downloaded yet, and downloads need an admin key: ask an "
            f"admin to pull it (POST /models/load with an admin key, or `ggserve pull`).",
            param="model")


class CrossOriginRefused(ServerError):
    """A browser page from another origin asked for an admin operation."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "cross_origin_refused"


class UnsupportedMediaType(ServerError):
    status_code = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class ModelNotFound(ServerError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model '{model}' does not exist. Available models: {', '.join(available)}.",
            param="model",
        )


class AdapterNotFound(ModelNotFound):
    """`model` names a registry entry and a LoRA adapter it does not have."""

    def __init__(self, model: str, base: str, adapters: Iterable[str]) -> None:
        """`adapters`: the names `base` has, listed as the models a request names."""
        served = ", ".join(f"{base}:{name}" for name in adapters)
        ServerError.__init__(
            self, f"The model '{model}' does not exist: '{base}' has no LoRA adapter "
            f"'{model.removeprefix(base + ':')}'. Its adapters: {served}.", param="model")


class ModelLoadFailed(ServerError):
    """A registry entry exists but llama.cpp could not load its file."""

    status_code = 503
    error_type = "server_error"
    code = "model_load_failed"


class EngineFailure(ServerError):
    """llama.cpp failed while generating (a decode error); the request cannot finish."""

    status_code = 500
    error_type = "server_error"


class ClientDisconnected(ServerError):
    """The client went away before its (non-streamed) reply was ready; nobody reads this."""

    status_code = 499  # nginx's "client closed request"
    error_type = "client_disconnected"


class RequestTimedOut(ServerError):
    status_code = 504
    error_type = "server_error"
    code = "request_timeout"


class ServerOverloaded(ServerError):
    """The model's queue is full; the client should retry after `retry_after` seconds."""

    status_code = 503
    error_type = "server_error"
    code = "server_overloaded"
    retry_after = 1


class ServerShuttingDown(ServerError):
    status_code = 503
    error_type = "server_error"
    code = "shutting_down"


class RegistryError(Exception):
    """models.yaml is invalid; the message names the file, the entry and the field."""
