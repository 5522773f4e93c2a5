"""benchmarks/distributed.py's summary of the issue's targets: ratios and prediction errors from a run's rows."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.scripts import load_benchmark

NAMES = {"decode_1": "1 stream", "decode_8": "8 streams", "fast_1": "1 stream, fast steps", "ttft": "TTFT 2048"}


@pytest.fixture(scope="module")
def distributed():
    return load_benchmark("distributed")


def row(link: str, strategy: str, mine: dict[str, list[float]], base: dict[str, list[float]], pred: dict) -> dict:
    """One plan's round as ``measure`` leaves it: medians, the runs measured in turn with the one process's."""
    median = {k: sorted(v)[len(v) // 2] for k, v in mine.items()}
    base_median = {k: sorted(v)[len(v) // 2] for k, v in base.items()}
    return {
        "link": link,
        "dtype": "q4",
        "strategy": strategy,
        **median,
        "runs": mine,
        "paired": True,
        "base": {**base_median, "runs": base},
        "pred": pred,
    }


def plans_of(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    plans: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        plans.setdefault((r["link"], r["dtype"], r["strategy"]), []).append(r)
    return plans


def test_each_target_is_judged_on_the_median_of_its_pairs_and_each_prediction_on_its_error(distributed) -> None:
    base = {"decode_1": [10.0, 10.0, 10.0], "decode_8": [20.0, 20.0, 20.0], "ttft": [40.0, 40.0, 40.0]}
    pipeline = row(
        "unshaped",
        "pipeline",
        {"decode_1": [9.5, 9.0, 8.0], "decode_8": [36.0, 34.0, 40.0], "ttft": [24.0, 28.0, 20.0]},
        base,
        {"decode_1": 9.0, "decode_8": 34.0, "ttft": 26.0},  # 0%, 0%, +4%
    )
    tensor = row("unshaped", "tensor", {"decode_1": [15.0, 17.0, 16.5]}, base, {"decode_1": 20.0})  # +21%
    lines = distributed.target_lines(plans_of([pipeline, tensor]), NAMES)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("  targets, unshaped q4: ")
    assert "pipeline 8 streams 1.80x (>= 1.7): met" in line
    assert "pipeline TTFT 2048 0.60x (<= 0.65): met" in line
    assert "pipeline 1 stream 0.90x (>= 0.9): met" in line
    assert "tensor 1 stream 1.65x (>= 1.6): met" in line
    assert "predictions within 20%: 3 of 4 (off: tensor 1 stream +21%)" in line


def test_a_target_missed_says_so_and_shaped_links_are_judged_only_on_their_predictions(distributed) -> None:
    base = {"decode_1": [10.0, 10.0]}
    slow = row("unshaped", "tensor", {"decode_1": [15.0, 15.5]}, base, {})
    shaped = row("100mbit", "tensor", {"decode_1": [8.0, 8.0]}, base, {"decode_1": 8.4})
    lines = distributed.target_lines(plans_of([slow, shaped]), NAMES)
    assert lines == [
        "  targets, unshaped q4: tensor 1 stream 1.52x (>= 1.6): NOT met",
        "  targets, 100mbit q4: predictions within 20%: 1 of 1",
    ]
