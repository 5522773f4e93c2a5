"""A generation job: what a coordinator sends every rank of an instance (``POST /generate``).

The coordinator (:class:`~exo_lab.instance.Instance`) builds a :class:`Job` from a request and
sends ``job.to_json()``; each shard worker (:mod:`exo_lab.engine.worker`) reads it back with
:meth:`Job.from_json`, which checks every field, so the compute loop never meets a malformed job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from exo_lab.engine.sampling import SamplingParams

MAX_LOGPROBS = 20


class JobError(ValueError):
    """A job is malformed; the message says which field and why."""


@dataclass(frozen=True)
class Job:
    """One request for the ranks, numbered: the ranks admit jobs in the order of ``seq``."""

    seq: int  #: 1, 2, ... per set of workers
    prompt: tuple[int, ...]  #: token ids
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    grammar: dict[str, str] | None = None  #: the constraint the output follows (``SchemaGrammar.to_json()``)
    logprobs: int | None = None  #: alternatives to report per token (0-20), None for none
    embed: bool = False  #: the prompt's embedding instead of a generation (rank 0's final chunk has it)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise JobError(problem)

    def problem(self) -> str | None:
        """What makes this job unusable, or None."""
        if not _is_int(self.seq) or self.seq < 1:
            return "a job needs a positive integer seq"
        if not self.prompt or not all(_is_int(t) and t >= 0 for t in self.prompt):
            return "prompt must be a non-empty list of token ids"
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            return "max_tokens must be a positive integer"
        if not all(isinstance(s, str) for s in self.stop):
            return "stop must be a list of strings"
        if not isinstance(self.ignore_eos, bool):
            return "ignore_eos must be true or false"
        if self.grammar is not None and not (
            isinstance(self.grammar, dict)
            and isinstance(self.grammar.get("grammar"), str)
            and all(isinstance(self.grammar.get(k, ""), str) for k in ("schema", "prefix", "suffix", "empty"))
        ):
            return "grammar must be a constraint object (SchemaGrammar.to_json())"
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            return f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, or absent"
        if not isinstance(self.embed, bool):
            return "embed must be true or false"
        return None

    def to_json(self) -> dict[str, Any]:
        extra = {"embed": True} if self.embed else {}
        return {
            **extra,
            "seq": self.seq,
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            "sampling": self.sampling.to_json(),
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "grammar": self.grammar,
            "logprobs": self.logprobs,
        }

    @classmethod
    def from_json(cls, data: Any) -> Job:
        """The job in ``data`` (what :meth:`to_json` wrote); :class:`JobError` says what is wrong with it."""
        if not isinstance(data, dict):
            raise JobError("a job is a JSON object")
        prompt, stop = data.get("prompt"), data.get("stop") or []
        if not isinstance(prompt, list):
            raise JobError("prompt must be a non-empty list of token ids")
        if not isinstance(stop, list):
            raise JobError("stop must be a list of strings")
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, dict):
            raise JobError("sampling must be an object")
        try:
            params = SamplingParams(**sampling)
        except (TypeError, ValueError) as exc:
            raise JobError(f"bad sampling parameters: {exc}") from exc
        # seq and max_tokens may be missing or of any type here: __post_init__ checks them (JobError)
        return cls(
            cast(int, data.get("seq")),
            tuple(prompt),
            cast(int, data.get("max_tokens")),
            params,
            tuple(stop),
            data.get("ignore_eos", False),
            data.get("grammar"),
            data.get("logprobs"),
            data.get("embed", False),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
