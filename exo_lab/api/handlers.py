"""The POST routes of the OpenAI and Anthropic families: each a request schema and a family's mapping."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from exo_lab.api import anthropic, common, openai_chat, openai_completions, openai_responses
from exo_lab.api.base import ApiHandler, GenerationHandler
from exo_lab.api.errors import ApiError
from exo_lab.api.events import Final, TextDelta, collect, events
from exo_lab.api.schema.anthropic import CountTokensRequest, MessagesRequest
from exo_lab.api.schema.openai import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from exo_lab.engine.generation import Generation


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


class CompletionsHandler(GenerationHandler):
    """``POST /v1/completions`` (legacy): each prompt one choice, generated together (see
    :mod:`exo_lab.api.openai_completions`)."""

    schema = CompletionRequest

    def initialize(self, **kwargs) -> None:
        super().initialize(**kwargs)
        self.generations: list[Generation] = []

    def on_connection_close(self) -> None:
        super().on_connection_close()
        for gen in self.generations:
            gen.cancel()

    async def post(self) -> None:
        try:
            if await self.forwarded():
                return
            c = openai_completions.parse_request(self.body(), self.registry)
            for choice in c.choices:
                self.generations.append(common.submit(c.backend, choice.request))
        except ApiError as err:
            for gen in self.generations:
                gen.cancel()
            self.send_api_error(err)
            return
        if self.client_gone:
            self.on_connection_close()
        if not c.stream:
            outs = await asyncio.gather(*(collect(events(g)) for g in self.generations))
            if self.client_gone:
                return
            failed = next((o.final.error for o in outs if o.final.error), None)
            if failed:
                self.send_api_error(c.failure(failed))
                return
            choices = [
                openai_completions.choice_json(c, ch, o.text, o.logprobs, o.final.finish_reason)
                for ch, o in zip(c.choices, outs)
            ]
            self.send_json(c.body(choices, openai_completions.usage_of([o.final.usage for o in outs])))
            return
        self.start_sse()
        usages = []
        for ch, gen in zip(c.choices, self.generations):
            offset = 0
            if c.echo:
                lp = c.logprobs_of(ch, [], 0, True)
                piece = {"text": ch.prompt_text, "index": ch.index, "logprobs": lp, "finish_reason": None}
                if not await self.send_sse(c.body([piece], None)):
                    return
                offset = len(ch.prompt_text)
            async with aclosing(events(gen)) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        lp = c.logprobs_of(ch, list(event.logprobs), offset, False)
                        offset += len(event.text)
                        piece = {"text": event.text, "index": ch.index, "logprobs": lp, "finish_reason": None}
                        if not await self.send_sse(c.body([piece], None)):
                            return
                    elif isinstance(event, Final):
                        if event.error:
                            await self.send_sse(c.failure(event.error).openai())
                            self.finish()
                            return
                        usages.append(event.usage)
                        finish = openai_chat.openai_finish_reason(event.finish_reason)
                        piece = {"text": "", "index": ch.index, "logprobs": None, "finish_reason": finish}
                        if not await self.send_sse(c.body([piece], None)):
                            return
        if c.include_usage:
            await self.send_sse(c.body([], openai_completions.usage_of(usages)))
        await self.send_sse("[DONE]")
        if not self.client_gone:
            self.finish()
