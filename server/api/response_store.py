"""Recent Responses API responses, kept in memory so that `previous_response_id` continues a
conversation and GET/DELETE /v1/responses/{id} find them (as openai-agents and Codex CLI use).

Bounded, least recently used first out: at most MAX_RESPONSES responses and about MAX_CHARS
characters of their text. Nothing survives a restart, and each replica keeps its own: behind a
load balancer, send the whole conversation as `input` (or pin clients to a replica).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.api.protocol.openai_chat import ChatMessage
from server.api.protocol.openai_responses_output import Response
from server.errors import ServerError

MAX_RESPONSES = 1024
MAX_CHARS = 64 * 2**20


class ResponseNotFound(ServerError):
    """No stored response has this id: never stored (`store: false`), evicted, or deleted."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        what = "Previous response" if param == "previous_response_id" else "Response"
        super().__init__(
            f"{what} with id '{response_id}' not found. This server keeps the last "
            f"{MAX_RESPONSES} stored responses in memory only: send the whole conversation "
            "as input instead.", param=param)
        self.code = "previous_response_not_found" if param else "response_not_found"


@dataclass(frozen=True)
class StoredResponse:
    response: Response
    # The conversation up to and including this response, without its instructions (which a
    # next turn does not inherit). Messages are shared with earlier turns, never changed.
    history: tuple[ChatMessage, ...]
    size: int  # characters of what this turn added


class ResponseStore:
    """An LRU of stored responses by id."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_chars: int = MAX_CHARS) -> None:
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._max_responses = max_responses
        self._max_chars = max_chars
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response `response_id` (now the most recently used); ResponseNotFound
        names `param` otherwise."""
        entry = self._entries.get(response_id)
        if entry is None:
            raise ResponseNotFound(response_id, param)
        self._entries.move_to_end(response_id)
        return entry

    def put(self, response: Response, earlier: tuple[ChatMessage, ...],
            added: tuple[ChatMessage, ...]) -> None:
        """Keep `response`, whose conversation is `earlier` followed by `added` (its input and
        output), evicting the least recently used over the bounds."""
        size = len(response.model_dump_json()) + sum(len(m.model_dump_json()) for m in added)
        self.delete(response.id)
        self._entries[response.id] = StoredResponse(response, (*earlier, *added), size)
        self._chars += size
        while len(self._entries) > self._max_responses or \
                (self._chars > self._max_chars and len(self._entries) > 1):
            _, evicted = self._entries.popitem(last=False)
            self._chars -= evicted.size

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._chars -= entry.size
        return entry is not None
