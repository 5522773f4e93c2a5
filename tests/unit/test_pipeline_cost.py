"""The group schedule in the cost model and in the ranks' admission: a pipeline runs at its slowest stage's pace."""

from __future__ import annotations

import pytest

from exo_lab.engine.pipeline import GroupSchedule, prefill_chunks
from exo_lab.placement.cost import NodeRates, pipelined_round_s, streamed_prefill_s
from exo_lab.placement.planner import _split_layers


def test_one_sequence_crosses_every_stage_and_many_are_bounded_by_the_slowest():
    stages, rows = [0.4, 0.6], [0.01, 0.02]
    assert pipelined_round_s(stages, rows, 0.001, 1) == pytest.approx(1.0 + 2 * 0.001)
    # 8 sequences in 2 groups of 4: each tick the slowest stage with 4 rows, every group a token per 2 ticks
    assert pipelined_round_s(stages, rows, 0.001, 8) == pytest.approx(2 * (0.6 + 3 * 0.02 + 0.001))
    # one stage: the plain batched step
    assert pipelined_round_s([1.0], [0.1], 0.0, 8) == pytest.approx(1.7)
    # two balanced stages: twice one process's throughput when each row costs its compute, the same when reading
    # the weights is all (each group reads them again)
    assert 8 / pipelined_round_s([0.05, 0.05], [0.05, 0.05], 0.0, 8) == pytest.approx(2 * 8 / 0.8)
    assert pipelined_round_s([0.5, 0.5], [0.0, 0.0], 0.0, 8) == pytest.approx(pipelined_round_s([1.0], [0.0], 0.0, 8))
    # stages on one machine read slower while the others compute too: only in ticks where more than one works
    bus = [0.1, 0.2]
    assert pipelined_round_s(stages, rows, 0.001, 1, bus) == pytest.approx(1.0 + 2 * 0.001)
    assert pipelined_round_s(stages, rows, 0.001, 8, bus) == pytest.approx(2 * (0.6 + 0.2 + 3 * 0.02 + 0.001))


def test_a_streamed_prompt_costs_the_first_chunk_through_all_stages_then_the_slowest_per_chunk():
    assert streamed_prefill_s([4.0, 4.0], [0.0, 0.0], 1) == pytest.approx(8.0)
    assert streamed_prefill_s([4.0, 4.0], [0.0, 0.0], 4) == pytest.approx(5.0)  # 0.625 of one process
    assert prefill_chunks(2048, 512) == [(0, 512), (512, 512), (1024, 512), (1536, 511)]


def test_the_last_stage_gets_fewer_layers_for_its_head():
    assert _split_layers(16, [1.0, 1.0], [16, 16]) == [8, 8]
    assert _split_layers(16, [1.0, 1.0], [16, 16], [0.0, 4.3]) == [10, 6]


def test_rows_join_the_landing_group_keeping_the_groups_balanced():
    sched = GroupSchedule(2, 0)
    assert sched.room(8, 16) == 4  # 8 arrive at once: half now, half when the other group lands
    sched.landing().rows.extend(range(4))
    sched.tick += 1
    assert sched.room(4, 16) == 4
    sched.landing().rows.extend(range(4))
    assert sched.room(10, 8) == 0  # max_batch in all
    assert sched.room(10, 10) == 1  # 2 places left: 1 to this group, the other to the next
    assert GroupSchedule(1, 0).room(8, 16) == 8  # one stage: everyone joins at once


def test_a_decode_batch_row_costs_what_the_profile_measured_between_one_and_eight_rows():
    profile = {
        "hostname": "h",
        "cpu_count": 1,
        "memory_bandwidth_gb_per_s": 20.0,
        "matmul_gflops": {"float32_m1": 9.0, "float32_m8": 16.0, "float32_m512": 48.0},
        "matmul_weight_read_gb_per_s": {"float32_m1": 18.0},
    }
    r = NodeRates.from_profile("n", profile)
    # one row reads 4 bytes a weight at 18 GB/s; eight rows take 16 FLOP a weight at 16 GFLOP/s
    per_row = (16 / 16e9 - 4 / 18e9) / 7
    assert r.decode_row_flops("float32", False, 4.0) == pytest.approx(2 / per_row)
    assert r.decode_row_flops("float32", False, 4.0) < r.prefill_flops("float32", False)
    fast8 = {**profile, "matmul_gflops": {"float32_m1": 9.0, "float32_m8": 400.0, "float32_m512": 48.0}}
    assert NodeRates.from_profile("n", fast8).decode_row_flops("float32", False, 4.0) == pytest.approx(48e9)
    old = {**profile, "matmul_gflops": {"float32_m1": 9.0, "float32_m512": 48.0}}  # a profile from before M=8
    assert NodeRates.from_profile("n", old).decode_row_flops("float32", False, 4.0) == pytest.approx(48e9)
