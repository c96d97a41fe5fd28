"""The rerank API's wire objects (POST /v1/rerank, /rerank): Jina's and Cohere's shape, as
llama-server and vLLM serve it. Documents are strings or `{"text": ...}` objects; results come
most relevant first, `top_n` of them, each with its document unless `return_documents` is
false (Jina's default, and vLLM's: documents included)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api.protocol.common import RequestBody

MAX_DOCUMENTS = 1000  # Cohere's limit per request


class RerankDocument(BaseModel):
    """A document as Cohere's and Jina's APIs send and return it; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    text: str


class RerankRequest(RequestBody):
    model: str
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=0, strict=True)  # None or 0: every document
    return_documents: bool = Field(True, strict=True)

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> Any:
        """One message for every wrong shape (not one per member of the union)."""
        if not isinstance(value, list) or not all(
                isinstance(d, str) or (isinstance(d, dict) and isinstance(d.get("text"), str))
                for d in value):
            raise ValueError('expected a list of strings or of {"text": string} objects')
        if not value:
            raise ValueError("send at least one document")
        if len(value) > MAX_DOCUMENTS:
            raise ValueError(f"at most {MAX_DOCUMENTS} documents per request")
        return value

    def texts(self) -> list[str]:
        """Each document's text, in request order."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int  # the document's position in the request
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
