"""A thinking model's reasoning, told apart from its answer as the text streams.

Two ways of writing it are read:

- think tags (Qwen3, DeepSeek-R1, GLM, ...): ``<think>reasoning</think>answer``. The chat template may
  open the block itself (the prompt ends with ``<think>``: DeepSeek-R1, Qwen3 thinking models), or the
  model writes the opening tag first;
- gpt-oss's harmony channels: ``<|channel|>analysis<|message|>reasoning<|end|><|start|>assistant
  <|channel|>final<|message|>answer``: the ``analysis`` channel is reasoning, the others are the answer.

:class:`ReasoningSplitter` takes text pieces as generated and gives back ``(kind, text)`` pieces,
``kind`` being :data:`REASONING` or :data:`ANSWER`; text that may begin a marker is held back until
it is known, and markers are never shown. Tool calls are looked for in the answer only
(:func:`exo_lab.api.events.events`), so a model that thinks first still calls tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REASONING, ANSWER = "reasoning", "answer"
THINK_START, THINK_END = "<think>", "</think>"
HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|start|>", "<|constrain|>")


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model marks its reasoning: ``tags`` (``start``...``end``) or ``harmony`` channels."""

    kind: str  # "tags" or "harmony"
    start: str = THINK_START
    end: str = THINK_END


HARMONY = ReasoningFormat("harmony", "<|channel|>analysis<|message|>", "<|end|>")


def reasoning_format(tokenizer: Any) -> ReasoningFormat | None:
    """The way ``tokenizer``'s model writes reasoning, or None for a model that does not think."""
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else ""
    if "<|channel|>" in template:
        return HARMONY
    if getattr(tokenizer, "has_thinking", False):  # mlx_lm's wrapper reads the tags from the vocabulary
        start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
        if isinstance(start, str) and isinstance(end, str):
            return ReasoningFormat("tags", start, end)
    if THINK_START in template and THINK_END in template:
        return ReasoningFormat("tags")
    return None


def prompt_opens_reasoning(fmt: ReasoningFormat, prompt_text: str) -> bool:
    """Whether a prompt (its decoded tail) leaves the model inside a reasoning block (the template opened it)."""
    if fmt.kind != "tags":
        return False
    at = prompt_text.rfind(fmt.start)
    return at >= 0 and fmt.end not in prompt_text[at:]


def _partial(buf: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``buf`` may begin one of ``markers``."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:n]):
                best = n
                break
    return best


class ReasoningSplitter:
    """Feed generated text; get back ``(kind, text)`` pieces, reasoning and answer (see the module docstring)."""

    def __init__(self, fmt: ReasoningFormat, opened: bool = False) -> None:
        self.fmt = fmt
        self._buf = ""
        if fmt.kind == "harmony":
            self.state = "header"  # reading a message header (up to <|message|>): its channel
            self._channel = ANSWER
        else:
            self.state = REASONING if opened else "before"  # before: the answer, unless the output opens a block
        self._trim = False  # drop whitespace at the start of the answer after a reasoning block
        self._trim_reasoning = True  # and at the start of the reasoning

    @property
    def reasoning(self) -> bool:
        """Whether the text fed last was reasoning."""
        return self.state == REASONING or (self.fmt.kind == "harmony" and self._channel == REASONING)

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        if self.fmt.kind == "harmony":
            self._harmony(out, final=False)
        else:
            self._tags(out, final=False)
        return self._merge(out)

    def finish(self) -> list[tuple[str, str]]:
        """The end of generation: whatever is still held back."""
        out: list[tuple[str, str]] = []
        if self.fmt.kind == "harmony":
            self._harmony(out, final=True)
        else:
            self._tags(out, final=True)
        return self._merge(out)

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str) -> None:
        if kind == REASONING and self._trim_reasoning:
            text = text.lstrip()
            if not text:
                return
            self._trim_reasoning = False
        if kind == ANSWER and self._trim:
            text = text.lstrip()
            if not text:
                return
            self._trim = False
        if text:
            out.append((kind, text))

    @staticmethod
    def _merge(out: list[tuple[str, str]]) -> list[tuple[str, str]]:
        merged: list[tuple[str, str]] = []
        for kind, text in out:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + text)
            else:
                merged.append((kind, text))
        return merged

    def _tags(self, out: list[tuple[str, str]], final: bool) -> None:
        start, end = self.fmt.start, self.fmt.end
        while self._buf:
            if self.state == "before":
                head = self._buf.lstrip()
                if not head:
                    if final:
                        self._emit(out, ANSWER, self._buf)
                        self._buf = ""
                    return
                if head.startswith(start):
                    self._buf, self.state = head[len(start) :], REASONING
                    continue
                if start.startswith(head) and not final:
                    return  # may still become the opening tag
                self.state = ANSWER
                continue
            if self.state == REASONING:
                i = self._buf.find(end)
                if i >= 0:
                    self._emit(out, REASONING, self._buf[:i])
                    self._buf, self.state, self._trim = self._buf[i + len(end) :], ANSWER, True
                    continue
                keep = 0 if final else _partial(self._buf, (end,))
                self._emit(out, REASONING, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return
            self._emit(out, ANSWER, self._buf)
            self._buf = ""
            return

    def _harmony(self, out: list[tuple[str, str]], final: bool) -> None:
        while self._buf:
            if self.state == "header":
                i = self._buf.find("<|message|>")
                if i < 0:
                    if final or not any(
                        m.startswith(self._buf[: len(m)]) or m in self._buf for m in ("<|channel|>", "<|start|>")
                    ):
                        # no header after all (markers stripped, or plain text): the answer
                        self.state = "message"
                        continue
                    return
                header = self._buf[:i]
                self._buf = self._buf[i + len("<|message|>") :]
                channel = header.split("<|channel|>")[-1].split("<|")[0].strip().split(" ")[0]
                was = self._channel
                self._channel = REASONING if channel == "analysis" else ANSWER
                if was == REASONING and self._channel == ANSWER:
                    self._trim = True
                self.state = "message"
                continue
            ends = [(j, m) for m in HARMONY_MARKERS if m != "<|message|>" and (j := self._buf.find(m)) >= 0]
            if ends:
                j, marker = min(ends)
                self._emit(out, self._channel, self._buf[:j])
                self._buf = self._buf[j:] if marker in ("<|channel|>", "<|start|>") else self._buf[j + len(marker) :]
                if marker in ("<|channel|>", "<|start|>", "<|end|>", "<|call|>", "<|return|>"):
                    self.state = "header" if marker in ("<|channel|>", "<|start|>") else "between"
                if self.state == "between":
                    self.state = "header"
                continue
            keep = 0 if final else _partial(self._buf, HARMONY_MARKERS)
            self._emit(out, self._channel, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return


@dataclass(frozen=True)
class ReasoningParsing:
    """How one request's reasoning is found: the model's format, and whether the prompt opened a block."""

    format: ReasoningFormat
    opened: bool = False

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.format, self.opened)


def reasoning_setup(tokenizer: Any, prompt: tuple[int, ...] | list[int]) -> ReasoningParsing | None:
    """How reasoning is told apart in a request's output (None for a model that does not think)."""
    fmt = reasoning_format(tokenizer)
    if fmt is None:
        return None
    opened = False
    if fmt.kind == "tags" and prompt:
        try:
            tail = tokenizer.decode(list(prompt[-16:]))
        except Exception:  # a tokenizer that cannot decode: the output says whether it thinks
            tail = ""
        opened = prompt_opens_reasoning(fmt, tail if isinstance(tail, str) else "")
    return ReasoningParsing(fmt, opened)
