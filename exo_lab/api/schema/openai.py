"""OpenAI request bodies: Chat Completions and Responses."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from exo_lab.api.schema import (
    Int,
    LogitBias,
    MinP,
    NonNegativeInt,
    Part,
    Penalty,
    PositiveInt,
    RepetitionPenalty,
    RequestModel,
    Seed,
    Stops4,
    TopLogprobs,
    fail,
)
from exo_lab.engine.chat import ROLES

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
JsonSchema = dict[str, Any]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


# ------------------------------------------------------------------------------------ tools


class FunctionDef(Part):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: JsonSchema | None = None


class ChatTool(Part):
    """``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Annotated[str, WithJsonSchema({"const": "function"})] = "function"
    function: FunctionDef | None = None

    @model_validator(mode="after")
    def _function(self) -> ChatTool:
        if self.type != "function":
            raise fail("'{param}' must be an object with type 'function'.")
        if self.function is None:
            raise fail("'{param}' is required and must be a string.", "function.name", "missing_required_parameter")
        return self

    def to_json(self) -> dict[str, Any]:
        """As a chat template takes it."""
        assert self.function is not None
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(Part):
    name: str


class ToolChoiceObject(Part):
    """``{"type": "function", "function": {"name"}}`` (Chat) or ``{"type": "function", "name"}`` (Responses)."""

    type: Literal["function"] = "function"
    function: NamedFunction | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoiceObject:
        if self.chosen is None:
            raise fail("'{param}' must name a function: {'type': 'function', 'function': {'name': ...}}.")
        return self

    @property
    def chosen(self) -> str | None:
        return self.function.name if self.function is not None else self.name


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceObject


def tool_mode(choice: ToolChoice | None, names: list[str]) -> tuple[str, str | None]:
    """``(mode, name)``: ``none``, ``auto``, ``required`` or ``function`` (with its name); raises for a
    choice the tools cannot meet."""
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice == "required" and not names:
            raise fail("'tool_choice' is 'required' but no tools were given.", "tool_choice")
        return choice, None
    if choice.chosen not in names:
        raise fail(f"'tool_choice' names {choice.chosen!r}, which is not among the tools.", "tool_choice")
    return "function", choice.chosen


# ------------------------------------------------------------------------------------ chat


class TextPart(Part):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class ChatMessage(Part):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart | str] | None = None
    tool_calls: list[dict[str, Any]] | Any = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise fail("Missing required parameter: '{param}'.", "content", "missing_required_parameter")
        if self.tool_calls is not None and (self.role != "assistant" or not isinstance(self.tool_calls, list)):
            raise fail("'{param}' must be an array, on an assistant message.", "tool_calls")
        return self


class JsonSchemaFormat(Part):
    name: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise fail("'{param}' must be an object with a 'schema'.", "json_schema")
        return self


class StreamOptions(Part):
    include_usage: bool | None = None


class ChatCompletionRequest(RequestModel):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    n: Int | None = None
    max_completion_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: NonNegativeInt | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    #: vLLM-style extensions: min-p sampling and a multiplicative repetition penalty
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: Stops4 = ()
    #: how much a thinking model thinks (``none`` turns thinking off); goes to the chat template
    reasoning_effort: ReasoningEffort | None = None
    #: vLLM-style extension: variables for the chat template (``enable_thinking``, ...)
    chat_template_kwargs: dict[str, Any] | None = None
    #: vLLM-style extension: generate exactly the token limit
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise fail("Only n=1 is supported: ask for several completions with several requests.")
        return n

    @model_validator(mode="after")
    def _together(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise fail("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise fail("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
        self.tool_mode()
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """``(mode, forced function name)``, see :func:`tool_mode`."""
        return tool_mode(self.tool_choice, [t.function.name for t in self.tools or () if t.function is not None])


# ------------------------------------------------------------------------------------ legacy completions

#: a prompt: text, token ids, or a list of either (one choice each)
CompletionPrompt = str | list[str] | list[Int] | list[list[Int]]
#: the most prompts one legacy completion request may hold
MAX_PROMPTS = 16


class CompletionRequest(RequestModel):
    """``POST /v1/completions`` (legacy): ``prompt`` continued as it is, no chat template."""

    model: str
    prompt: CompletionPrompt
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: NonNegativeInt | None = None
    n: Int | None = None
    best_of: Int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    stop: Stops4 = ()
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    suffix: str | None = None
    ignore_eos: bool | None = None
    user: str | None = None

    @field_validator("n", "best_of")
    @classmethod
    def _one(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise fail("Only 1 is supported: ask for several completions with several requests.")
        return n

    @model_validator(mode="after")
    def _together(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise fail("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if self.suffix:
            raise fail("'suffix' (fill-in-the-middle) is not supported by this server.", "suffix")
        prompts = self.prompts()
        if not prompts or any(p == "" or p == [] for p in prompts):
            raise fail("'prompt' must not be empty.", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise fail(f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(prompts)}.", "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ embeddings

#: the most inputs one embeddings request may hold
MAX_INPUTS = 256


class EmbeddingsRequest(RequestModel):
    """``POST /v1/embeddings``: each input's mean-pooled last hidden state."""

    model: str
    input: CompletionPrompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _inputs(self) -> EmbeddingsRequest:
        inputs = self.inputs()
        if not inputs or any(i == "" or i == [] for i in inputs):
            raise fail("'input' must not be empty (nor hold an empty string).", "input")
        if len(inputs) > MAX_INPUTS:
            raise fail(f"'input' holds at most {MAX_INPUTS} items, got {len(inputs)}.", "input")
        return self

    def inputs(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ responses


class ResponsesPart(Part):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text(self) -> ResponsesPart:
        if self.type != "refusal" and self.text is None:
            raise fail("'{param}' must be a string.", "text", "invalid_type")
        return self

    @property
    def value(self) -> str:
        return (self.text or "") if self.type != "refusal" else (self.refusal or "")


ResponsesContent = str | list[ResponsesPart]


class InputItem(Part):
    """A message, an earlier ``function_call`` or its ``function_call_output``, or ``reasoning`` (skipped)."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: ResponsesContent | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: ResponsesContent | None = None

    @model_validator(mode="after")
    def _fields(self) -> InputItem:
        if self.type == "message":
            if self.role is None:
                raise fail("Missing required parameter: '{param}'.", "role", "missing_required_parameter")
            if self.content is None:
                raise fail("Missing required parameter: '{param}'.", "content", "missing_required_parameter")
        elif self.type == "function_call" and self.name is None:
            raise fail("'{param}' needs 'name' and 'arguments' strings.")
        elif self.type == "function_call_output" and self.output is None:
            raise fail("'{param}' must be a string.", "output", "invalid_type")
        return self


class ResponsesTool(Part):
    """``{"type": "function", "name", "description", "parameters", "strict"}``: the caller runs it."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None

    def to_chat(self) -> dict[str, Any]:
        """As a Chat Completions tool (what chat templates take)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description or "", "parameters": self.parameters},
        }


class TextFormat(Part):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(Part):
    format: TextFormat | None = None


class ReasoningOptions(Part):
    """``{"effort", "summary"}``: how much a thinking model thinks (``none`` turns thinking off)."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(RequestModel):
    """``POST /v1/responses``."""

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = None
    previous_response_id: Any = None
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoice | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    metadata: dict[str, Any] | Any = None
    user: Any = None

    @model_validator(mode="after")
    def _together(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise fail(
                "This server does not store responses, so 'previous_response_id' cannot be used: "
                "send the whole conversation in 'input'.",
                "previous_response_id",
            )
        self.tool_mode()
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """``(mode, forced function name)``, see :func:`tool_mode`."""
        return tool_mode(self.tool_choice, [t.name for t in self.tools or ()])
