"""Prompts of an exact length in tokens, after the chat template (the bench's requests)."""

from __future__ import annotations

from typing import Any

from exo_lab.bench.results import BenchError
from exo_lab.engine.chat import chat_prompt_tokens

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "curious",
    "engineers",
    "measure",
    "tokens",
    "per",
    "second",
    "across",
    "every",
    "node",
    "of",
    "the",
    "cluster",
    "and",
    "write",
    "down",
    "what",
    "they",
    "see",
    "in",
    "their",
    "notebooks",
]


# ----------------------------------------------------------------------------- prompts


def words(n: int, seed: int = 0) -> str:
    """``n`` words of plain English-like text (the filler of every bench prompt). Each ``seed`` below 512 gives
    a text that differs from the others' from its first word on (another start and stride through the words),
    so that a server's prefix cache cannot serve one request's prompt from another's."""
    size = len(_WORDS)
    start, stride = seed % size, 1 + 2 * ((seed // size) % (size // 2))  # odd strides visit every word
    return " ".join(_WORDS[(start + i * stride) % size] for i in range(n))


def exact_prompt(tokenizer: Any, pp: int, seed: int = 0) -> tuple[list[int], dict[str, Any]]:
    """Prompt token ids of one user message whose chat-templated length is exactly ``pp``.

    Searches the message's length in words (the template's own tokens count); if no text lands
    exactly, the last content token is repeated to fill the gap (``method: "splice"``).
    """

    def tokens(text: str) -> list[int]:
        return chat_prompt_tokens(tokenizer, [{"role": "user", "content": text}])

    def text_of(n: int) -> str:
        return words(n, seed)

    empty = len(tokens(""))
    if empty > pp:
        raise BenchError(f"the chat template alone takes {empty} tokens; use pp >= {empty}")
    lo, hi = 0, 1
    while len(tokens(text_of(hi))) <= pp:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokens(text_of(mid))) <= pp:
            lo = mid
        else:
            hi = mid
    text = text_of(lo)
    ids = tokens(text)
    while len(ids) < pp:  # close the gap with short pieces
        for extra in (" a", " I", ".", ",", "a", " of", "!", "s"):
            trial = tokens(text + extra)
            if len(ids) < len(trial) <= pp:
                text, ids = text + extra, trial
                break
        else:
            break
    info = {"tokens": pp, "template_tokens": empty, "method": "search", "text": text}
    if len(ids) < pp:
        if not text:
            raise BenchError(f"cannot build a {pp}-token prompt with this tokenizer")
        a, b = tokens("x"), tokens("y z")
        suffix = 0
        while suffix < min(len(a), len(b)) and a[-1 - suffix] == b[-1 - suffix]:
            suffix += 1
        cut = len(ids) - suffix
        ids = ids[:cut] + [ids[cut - 1]] * (pp - len(ids)) + ids[cut:]
        info["method"] = "splice"
    return ids, info
