"""Anthropic request bodies: Messages and token counting."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from exo_lab.api.schema import NonNegativeInt, Part, PositiveInt, RequestModel, StopList, fail

TEXT_ONLY = "this model takes text only"


class Block(Part):
    """A content block: ``text``, ``tool_use`` (assistant), ``tool_result`` (user); ``thinking`` is skipped."""

    type: str
    text: Any = None
    id: str | None = None
    name: Any = None
    input: Any = None
    tool_use_id: Any = None
    content: Any = None
    is_error: bool | None = None


def check_text_blocks(blocks: list[Block], at: str) -> None:
    """Raise unless every block is text (or skipped reasoning)."""
    for i, block in enumerate(blocks):
        if block.type == "text":
            if not isinstance(block.text, str):
                raise fail("{param}: Field required (a string).", f"{at}.{i}.text")
        elif block.type not in ("thinking", "redacted_thinking"):
            raise fail(
                f"{{param}}: content blocks of type {block.type!r} are not supported: {TEXT_ONLY}.", f"{at}.{i}.type"
            )


class AnthropicMessage(Part):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks(self) -> AnthropicMessage:
        if isinstance(self.content, str):
            return self
        for i, block in enumerate(self.content):
            at = f"content.{i}"
            if block.type == "tool_use" and self.role == "assistant":
                if not isinstance(block.name, str):
                    raise fail("{param}: Field required.", f"{at}.name", "missing_required_parameter")
                if not isinstance(block.input if block.input is not None else {}, dict):
                    raise fail("{param}: Input should be a valid dictionary.", f"{at}.input", "invalid_type")
            elif block.type == "tool_result" and self.role == "user":
                if not isinstance(block.tool_use_id, str):
                    raise fail("{param}: Field required.", f"{at}.tool_use_id", "missing_required_parameter")
                if not isinstance(block.content, str | None):
                    if not isinstance(block.content, list):
                        raise fail(
                            "{param}: Input should be a valid string or a list of text blocks.",
                            f"{at}.content",
                            "invalid_type",
                        )
                    if not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in block.content):
                        raise fail("{param}: each content block must be an object with a 'type'.", f"{at}.content")
                    check_text_blocks([Block.model_validate(b) for b in block.content], f"{at}.content")
            else:
                check_text_blocks([block], "content")
        return self


class AnthropicTool(Part):
    """A client tool: ``name``, ``description``, ``input_schema``."""

    name: Annotated[str, Field(min_length=1)]
    type: Literal["custom"] | None = None
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    @model_validator(mode="before")
    @classmethod
    def _server_tools(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise fail(
                f"{{param}}: server tools ({data['type']!r}) are not available here; define client tools "
                "with 'name' and 'input_schema'.",
                "type",
            )
        return data

    def to_chat(self) -> dict[str, Any]:
        """As an OpenAI function tool (what chat templates take)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


class AnthropicToolChoice(Part):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class ThinkingConfig(Part):
    """``{"type": "enabled", "budget_tokens"}``, ``{"type": "adaptive"}`` or ``{"type": "disabled"}``.

    The budget is not enforced: a thinking model here thinks until it closes its reasoning itself."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: PositiveInt | None = None
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise fail("{param}: Field required.", "budget_tokens", "missing_required_parameter")
        return self

    @property
    def enabled(self) -> bool:
        return self.type != "disabled"


class CountTokensRequest(RequestModel):
    """``POST /v1/messages/count_tokens``: the conversation and tools of a Messages request."""

    style: ClassVar[str] = "anthropic"

    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[Block] | None = None
    tools: list[AnthropicTool] | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _system(self) -> CountTokensRequest:
        if isinstance(self.system, list):
            check_text_blocks(self.system, "system")
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        return ("auto" if self.tools else "none"), None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: NonNegativeInt | None = None
    stop_sequences: StopList | None = None
    stream: bool | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _choice(self) -> MessagesRequest:
        self.tool_mode()
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """``(mode, name)`` as for OpenAI: ``auto``, ``required`` (Anthropic's ``any``), ``function``, ``none``."""
        choice = self.tool_choice
        if choice is None:
            return super().tool_mode()
        names = [t.name for t in self.tools or ()]
        if choice.type in ("any", "tool") and not names:
            raise fail(f"tool_choice: '{choice.type}' needs tools.", "tool_choice")
        if choice.type == "tool":
            if choice.name not in names:
                raise fail(f"tool_choice.name: {choice.name!r} is not among the tools.", "tool_choice.name")
            return "function", choice.name
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type], None
