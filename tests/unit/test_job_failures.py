"""One bad job fails alone: a sampler or a grammar that raises ends that generation with an error, while the
others in the same batch go on exactly as they would have, in the Engine and in a rank's lock-step batch.

The failures are real code paths: a grammar whose closer breaks mid-generation (a test subclass of
``SchemaGrammar``), a grammar that cannot be built (a prefix no UTF-8 can hold), a sampler that raises.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import pytest

from exo_lab.engine.generation import GenerationRequest
from exo_lab.engine.guided import SchemaGrammar, json_object
from exo_lab.engine.json_closer import JsonCloser, State
from exo_lab.engine.lockstep import FAILED, Batch, Layout, Lockstep
from exo_lab.engine.sampling import SamplingParams
from exo_lab.engine.shard import ShardSpec, load_shard

PROMPTS = [[(i * 31) % 8000 + 3 for i in range(20)], [(i * 17) % 8000 + 5 for i in range(9)], list(range(5, 40))]

#: set by a test: every TrippingCloser then raises
trip = threading.Event()


@dataclass(frozen=True)
class TrippingCloser(JsonCloser):
    """A closer that breaks once :data:`trip` is set (the grammar of a generation already under way)."""

    def feed(self, state: State | None, data: bytes) -> State | None:
        if trip.is_set():
            raise RuntimeError("the grammar broke mid-generation")
        return super().feed(state, data)


@dataclass(frozen=True)
class TrippingGrammar(SchemaGrammar):
    def closer(self) -> JsonCloser:
        return TrippingCloser(self.prefix.encode(), self.suffix.encode(), self.empty.encode())


def any_object(cls: type[SchemaGrammar] = SchemaGrammar, prefix: str = "") -> SchemaGrammar:
    g = json_object()
    return cls(g.schema, g.grammar, prefix, g.suffix, g.empty)


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.tokens]


# ------------------------------------------------------------------------------------ the Engine


def test_a_grammar_that_breaks_mid_generation_fails_that_generation_alone(engine):
    prompt = engine.chat_tokens([{"role": "user", "content": "Say something."}])
    alone = tokens(engine.submit(GenerationRequest(tuple(prompt), 40, ignore_eos=True)))
    trip.clear()
    try:
        steady = engine.submit(GenerationRequest(tuple(prompt), 40, ignore_eos=True))
        doomed = engine.submit(
            GenerationRequest(tuple(prompt), 30, ignore_eos=True, grammar=any_object(TrippingGrammar))
        )
        unbuildable = engine.submit(GenerationRequest(tuple(prompt), 30, grammar=any_object(prefix="\ud800")))
        first = next(iter(doomed))  # under way: its grammar breaks from the next step on
        trip.set()
        rest = list(doomed)
        assert first.finish_reason is None and rest[-1].finish_reason == "error"
        assert "the grammar broke mid-generation" in (rest[-1].error or "")
        failed = list(unbuildable)
        assert failed[-1].finish_reason == "error" and "UnicodeEncodeError" in (failed[-1].error or "")
        chunks = list(steady)
        assert chunks[-1].finish_reason == "length" and tokens(chunks) == alone  # as if the others were not there
    finally:
        trip.clear()
    after = list(engine.submit(GenerationRequest(tuple(prompt), 40, ignore_eos=True)))
    assert after[-1].finish_reason == "length" and tokens(after) == alone


# ------------------------------------------------------------------------------------ a rank's batch


@pytest.fixture(scope="module")
def lockstep(tiny_model) -> Lockstep:
    cfg = json.loads((tiny_model / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    shard, _ = load_shard(tiny_model, ShardSpec(0, n, n))
    return Lockstep(shard, mx.distributed.init(), Layout(0, ((0,),)), cfg["hidden_size"], mx.float32, 64)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def run(ls: Lockstep, samplers, steps: int, errors=(None, None, None)) -> tuple[list[list[int]], dict[int, str]]:
    """Decode the three prompts together for ``steps``; each row's tokens (until it fails) and why rows failed."""
    batch = Batch()
    for prompt, sampler, error in zip(PROMPTS, samplers, errors):
        batch.add(ls.prefill(prompt), prompt[-1], sampler, greedy=False, error=error)
    rows, outs, why = [0, 1, 2], [[], [], []], {}
    for _ in range(steps):
        step = ls.step(batch)
        assert step is not None
        values = cast("list[int]", step.tolist())
        failed = [i for i, t in enumerate(values) if t == FAILED]
        for i, message in ls.share_errors(failed).items():
            why[rows[i]] = message
        keep = [i for i, t in enumerate(values) if t != FAILED]
        for i in keep:
            outs[rows[i]].append(values[i])
        rows = [rows[i] for i in keep]
        batch.keep(keep)
        batch.inputs = [values[i] for i in keep]
    return outs, why


def test_a_row_whose_sampler_raises_fails_alone_in_a_ranks_batch(lockstep):
    alone, why = run(lockstep, [greedy] * 3, 8)
    assert why == {} and all(len(t) == 8 for t in alone)
    calls = {"n": 0}

    def breaks_at_the_fourth_token(logprobs: mx.array) -> mx.array:
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("this sampler gives up")
        return greedy(logprobs)

    outs, why = run(lockstep, [greedy, breaks_at_the_fourth_token, greedy], 8)
    assert why == {1: "ValueError: this sampler gives up"}
    assert outs == [alone[0], alone[1][:3], alone[2]]


def test_a_row_that_could_not_be_set_up_fails_at_its_first_step(lockstep):
    alone, _ = run(lockstep, [greedy] * 3, 4)
    outs, why = run(lockstep, [greedy] * 3, 4, errors=(None, None, "UnicodeEncodeError: " + "é" * 500))
    assert outs == [alone[0], alone[1], []]
    assert why[2].startswith("UnicodeEncodeError: é") and len(why[2].encode()) <= 400


def test_sampling_params_out_of_the_samplers_range_are_refused():
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
            SamplingParams(1.0, seed=seed)  # type: ignore[arg-type]
    assert SamplingParams(1.0, seed=2**64 - 1).seed == 2**64 - 1
