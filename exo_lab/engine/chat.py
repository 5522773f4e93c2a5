"""Chat messages to prompt tokens, through the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"unsupported content part type {kind!r}: this model takes text only")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def normalise_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts; ``developer`` becomes ``system``."""
    out = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m.get("content"))})
    return out


def chat_prompt_tokens(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Prompt token ids for ``messages`` with the generation prompt appended."""
    msgs = normalise_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
    return list(tokenizer.encode(text))
