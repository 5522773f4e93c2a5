"""The POST routes of the OpenAI and Anthropic families: each a request schema and a family's mapping."""

from __future__ import annotations

from exo_lab.api import anthropic, openai_chat, openai_responses
from exo_lab.api.base import ApiHandler, GenerationHandler
from exo_lab.api.errors import ApiError
from exo_lab.api.schema.anthropic import CountTokensRequest, MessagesRequest
from exo_lab.api.schema.openai import ChatCompletionRequest, ResponsesRequest


class ChatCompletionsHandler(GenerationHandler):
    """``POST /v1/chat/completions``."""

    schema = ChatCompletionRequest
    parse = staticmethod(openai_chat.parse_request)


class ResponsesHandler(GenerationHandler):
    """``POST /v1/responses``."""

    schema = ResponsesRequest
    parse = staticmethod(openai_responses.parse_request)


class MessagesHandler(GenerationHandler):
    """``POST /v1/messages``."""

    family = "anthropic"
    schema = MessagesRequest
    parse = staticmethod(anthropic.parse_request)


class CountTokensHandler(ApiHandler):
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}`` for a Messages request."""

    family = "anthropic"
    schema = CountTokensRequest

    def post(self) -> None:
        try:
            answer = anthropic.count_tokens(self.body(), self.registry)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(answer)
