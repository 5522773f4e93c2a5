"""Chat messages to prompt tokens, through the model's own chat template.

Tools (OpenAI-style function definitions) go to the template as ``tools``
when the template renders them. For a template that does not, the tools are
described in a system message in the Hermes format (``<tool_call>{"name",
"arguments"}</tool_call>``), earlier tool calls are written back in that
format, and tool results become ``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"


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
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise ValueError(f"a {part.get('type')} part's 'text' must be a string")
                parts.append(text)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"unsupported content part type {kind!r}: this model takes text only")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` with ``arguments`` as objects (what chat templates expect)."""
    if not isinstance(calls, list):
        raise ValueError("'tool_calls' must be an array")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError("each tool call needs a 'function' with a 'name'")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # keep the text; the template writes it as is
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def normalise_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"role", "content"}`` dicts (plus ``tool_calls`` / ``tool_call_id``); ``developer`` becomes ``system``."""
    out = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}; expected one of {', '.join(ROLES)}")
        msg: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": message_text(m.get("content")),
        }
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"])
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    return out


def template_renders_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def hermes_system_text(tools: Sequence[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"], ensure_ascii=False)
    return (
        f'{HERMES_START}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n{HERMES_END}'
    )


def _inline_tools(msgs: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools, tool calls and tool results written as plain messages (for templates without tools)."""
    out: list[dict[str, Any]] = []
    if tools:
        intro = hermes_system_text(tools)
        if msgs and msgs[0]["role"] == "system":
            out.append({"role": "system", "content": msgs[0]["content"] + "\n\n" + intro})
            msgs = msgs[1:]
        else:
            out.append({"role": "system", "content": intro})
    for m in msgs:
        if m.get("tool_calls"):
            calls = "\n".join(hermes_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_prompt_tokens(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt token ids for ``messages`` (and ``tools``) with the generation prompt appended.

    ``template_kwargs`` go to the chat template as variables (``enable_thinking``, ``reasoning_effort``).
    """
    msgs = normalise_messages(messages)
    kwargs: dict[str, Any] = dict(template_kwargs or {})
    if tools:
        if template_renders_tools(tokenizer):
            kwargs["tools"] = list(tools)
        else:
            msgs = _inline_tools(msgs, tools)
    elif any(m.get("tool_calls") or m["role"] == "tool" for m in msgs) and not template_renders_tools(tokenizer):
        msgs = _inline_tools(msgs, [])
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
    return list(tokenizer.encode(text))
