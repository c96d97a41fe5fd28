"""POST /v1/rerank and /rerank (and llama-server's /reranking aliases): a reranker's relevance
score for each document against a query, most relevant first."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.protocol.common import ERROR_RESPONSES
from server.api.protocol.rerank import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from server.api.serving import metered_call
from server.engine.base import Engine, Ranking
from server.metrics import Metrics

router = APIRouter()
log = logging.getLogger("server.requests")


@router.post("/v1/rerank", responses=ERROR_RESPONSES, response_model_exclude_none=True)
@router.post("/rerank", responses=ERROR_RESPONSES, response_model_exclude_none=True)
@router.post("/v1/reranking", include_in_schema=False, response_model_exclude_none=True)
@router.post("/reranking", include_in_schema=False, response_model_exclude_none=True)
async def rerank(body: RerankRequest, engine: EngineDep, registry: RegistryDep,
                 metrics: MetricsDep, settings: SettingsDep) -> RerankResponse:
    """Score every document against the query with a reranker model (`pooling: rank`)."""
    spec = registry.get(body.model)
    documents = body.texts()
    ranking = await _scored(engine, metrics, spec.id, body.query, documents,
                            settings.request_timeout_s)
    order = sorted(range(len(documents)), key=lambda i: -ranking.scores[i])  # ties: in order
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}", model=spec.id,
        results=[RerankResult(index=i, relevance_score=ranking.scores[i],
                              document=RerankDocument(text=documents[i])
                              if body.return_documents else None)
                 for i in order[:body.top_n or None]],
        usage=RerankUsage(prompt_tokens=ranking.prompt_tokens,
                          total_tokens=ranking.prompt_tokens))


async def _scored(engine: Engine, metrics: Metrics, model: str, query: str,
                  documents: list[str], timeout_s: float) -> Ranking:
    """The engine's ranking, counted and logged as the embeddings endpoint counts its work."""
    ranking = await metered_call(engine.rerank(model, query, documents), metrics=metrics,
                                 model=model, endpoint="rerank", timeout_s=timeout_s,
                                 what="documents", count=len(documents))
    metrics.prompt_tokens.labels(model).inc(ranking.prompt_tokens)
    return ranking
