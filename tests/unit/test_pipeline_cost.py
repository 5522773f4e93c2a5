"""The group schedule in the cost model and in the ranks' admission: a pipeline runs at its slowest stage's pace."""

from __future__ import annotations

import math

import pytest

from exo_lab.engine.pipeline import GroupSchedule, prefill_chunks
from exo_lab.placement.cost import NodeRates, pipelined_round_s, rows_extra_s, streamed_prefill_s
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
    row, again, rows = r.decode_row_costs("float32", False, 4.0)
    assert row == pytest.approx(2 / per_row) and rows == 0 and again == math.inf  # every row in one pass
    assert row < r.prefill_flops("float32", False)
    fast8 = {**profile, "matmul_gflops": {"float32_m1": 9.0, "float32_m8": 400.0, "float32_m512": 48.0}}
    assert NodeRates.from_profile("n", fast8).decode_row_costs("float32", False, 4.0)[0] == pytest.approx(48e9)
    old = {**profile, "matmul_gflops": {"float32_m1": 9.0, "float32_m512": 48.0}}  # a profile from before M=8
    assert NodeRates.from_profile("n", old).decode_row_costs("float32", False, 4.0)[:2] == (
        pytest.approx(48e9),
        math.inf,
    )


def test_a_kernel_of_four_rows_a_pass_costs_a_pass_for_every_four_rows():
    """exo_lab's q4 kernel unpacks each weight once for up to 4 rows (``decode_rows_per_pass``): M rows cost
    ``ceil(M / 4)`` passes and M rows' products, fitted to the profile's M=1 and M=8 products."""
    profile = {
        "hostname": "h",
        "cpu_count": 1,
        "memory_bandwidth_gb_per_s": 20.0,
        "matmul_gflops": {"q4_m1": 40.0, "q4_m8": 100.0, "q4_m512": 1000.0},
        "matmul_weight_read_gb_per_s": {"q4_m1": 10.0},
        "decode_rows_per_pass": {"q4": 4},
    }
    r = NodeRates.from_profile("n", profile)
    bpw = 0.625
    t1, t8 = bpw / 10e9, 16 / 100e9  # seconds a weight: one row (its read), eight rows (two passes)
    row, again, rows = r.decode_row_costs("q4", False, bpw)
    c, p = 2 / row, 2 / again
    assert rows == 4 and c == pytest.approx((t8 - 2 * t1) / 6) and p + c == pytest.approx(t1)
    assert rows_extra_s(8, c, p, 4) == pytest.approx(t8 - t1)  # what the M=8 product measured
    assert rows_extra_s(4, c, p, 4) == pytest.approx(3 * c)  # one pass: 4 rows cost less than half of 8
    assert rows_extra_s(5, c, p, 4) == pytest.approx(4 * c + p)
    assert rows_extra_s(5, c) == pytest.approx(4 * c)  # a kernel of one pass
    # a stored quantized checkpoint computes with MLX's kernels: one pass as far as the model knows
    assert r.decode_row_costs("q4", True, bpw)[2] == 0
    # a pipeline's groups of 4 rows each take one pass; 8 rows in one step two
    stages, rows_s, passes = [t1, t1], [c, c], [p, p]
    assert pipelined_round_s(stages, rows_s, 0.0, 8, None, passes, 4) == pytest.approx(2 * (t1 + 3 * c))
    assert pipelined_round_s([t1], [c], 0.0, 8, None, [p], 4) == pytest.approx(t8)
