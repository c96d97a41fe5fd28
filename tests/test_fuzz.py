"""Schemathesis fuzzes the OpenAPI schema against the real server and the default model:
no 5xx, every response as the schema says. Bounded here (FUZZ_EXAMPLES per operation);
`make fuzz` runs longer."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import LiveServer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LiveServer]:
    # Small output caps keep each fuzzed generation short.
    live = LiveServer(["--parallel", "4"], env={"GGSERVE_MAX_TOKENS_LIMIT": "8",
                                                "GGSERVE_REQUEST_TIMEOUT_S": "60"})
    yield live
    live.stop()


@pytest.mark.slow
def test_api_conforms_to_its_schema(fuzz_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions",
                                              "/v1/models", "/health", "/ready", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            if isinstance(case.body, dict) and case.body.get("stream") is True:
                case.body["stream"] = False  # SSE is covered by the streaming tests
            case.call_and_validate(checks=CHECKS)

        fuzz()
    assert LiveServer.metric(fuzz_server, "ggserve:http_requests_total",
                             endpoint="/v1/chat/completions", status="5xx") == 0
