"""The bookkeeping of a decode step built ahead: which rows took part, the next inputs, the shared vector."""

from __future__ import annotations

import mlx.core as mx

from exo_lab.engine.lookahead import Step


class Row:
    """A batch row (compared by identity, as the worker's rows are)."""


def step_of(rows: list[Row], tokens: list[int], flags: list[int], admit: int) -> Step:
    return Step(rows, mx.array([*tokens, *flags, admit], mx.int32))


def test_every_row_carried_takes_its_token_as_the_next_input():
    rows = [Row(), Row(), Row()]
    step = step_of(rows, [11, 12, 13], [0, 0, 0], 5)
    assert step.carried(rows) == [0, 1, 2]
    assert step.inputs_for(rows, [1, 2, 3]).tolist() == [11, 12, 13]
    assert step.split(step.shared.tolist()) == ([11, 12, 13], [0, 0, 0], 5)


def test_rows_that_left_are_skipped_and_rows_that_joined_take_the_batchs_inputs():
    a, b, c, new = Row(), Row(), Row(), Row()
    step = step_of([a, b, c], [11, 12, 13], [0, 1, 0], 7)
    now = [a, c, new]  # b left when the step before landed; new joined after this step was built
    assert step.carried(now) == [0, 2]
    assert step.inputs_for(now, [99, 98, 42]).tolist() == [11, 13, 42]
    tokens, flags, admit = step.split(step.shared.tolist())
    assert (tokens, flags, admit) == ([11, 12, 13], [0, 1, 0], 7)


def test_a_batch_of_only_new_rows_takes_the_batchs_inputs():
    old, new = Row(), Row()
    step = step_of([old], [11], [0], 0)
    assert step.carried([new]) == []
    assert step.inputs_for([new], [42]).tolist() == [42]
    assert step.inputs_for([], []).tolist() == []


def test_a_lone_rank_has_a_spare_core_with_two_and_measures_its_build_share(tmp_path):
    from exo_lab.cluster.machine import cpu_count
    from exo_lab.engine.lookahead import build_share, has_spare_core, pays
    from exo_lab.engine.shard import ShardSpec, load_shard
    from exo_lab.models import synthetic

    group = mx.distributed.init()
    assert has_spare_core(group) == (cpu_count() >= 2)
    path = synthetic.create(tmp_path / "tiny", "tiny")
    shard, _ = load_shard(path, ShardSpec(0, 4, 4))
    share = build_share(shard)
    assert 0.0 < share < 1.0  # building is part of a step, never all of it
    assert not pays(group, None)  # more than one stage: never ahead
