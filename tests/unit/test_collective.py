"""The message overhead of MLX's ring backend, measured with a real ring rank against a peer never late."""

from __future__ import annotations

import pytest

from exo_lab.cluster.collective import measure_message_overhead


@pytest.mark.slow
def test_a_ring_rank_measures_what_a_message_costs_it():
    got = measure_message_overhead(rounds=50)
    assert got is not None
    assert 1e-6 < got["all_sum_s"] < 0.05  # a real all_sum: MLX's threads, two messages each way
    assert got["message_overhead_s"] == pytest.approx(got["all_sum_s"] / 2)


def test_no_answer_in_time_is_none_not_a_hang():
    assert measure_message_overhead(rounds=50, timeout_s=0.01) is None
