"""The single-node benchmark runs end to end in its tiny configuration (no speed asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "single_node.py"
SMOKE = ["--presets", "tiny", "--variants", "fp32", "--pp", "64", "--tg", "8", "--repeat", "1"]


@pytest.mark.slow
def test_single_node_benchmark_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "EXO_LAB_MODELS_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *SMOKE], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    number = r"\d+\.\d+"
    assert re.search(rf"^tiny-fp32: ratio gen +exo/mlx_lm +in-proc {number} .*API {number}", out, re.M), out
    assert re.search(rf"^tiny-fp32: ratio prompt +exo/mlx_lm +in-proc {number} +API {number}", out, re.M), out
    assert re.search(rf"^tiny-fp32: BLAS gain .*prompt {number}x +gen {number}x", out, re.M), out
    assert "target: exo_lab / mlx_lm >= 0.97" in out
    assert (tmp_path / "models" / "bench" / "tiny-fp32" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("where", [[], ["--instance", "pipeline"]], ids=["one-process", "instance"])
def test_concurrency_benchmark_smoke(tmp_path: Path, where: list[str]) -> None:
    script = SCRIPT.parent / "concurrency.py"
    env = {**os.environ, "EXO_LAB_MODELS_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [sys.executable, str(script), "--preset", "tiny", "--streams", "3", "--tokens", "4", "--repeat", "1", *where],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert re.search(r"^ratio 3 streams / 1 stream = \d+\.\d+x", proc.stdout, re.M), proc.stdout
    assert ("distributed instance (pipeline" in proc.stdout) == bool(where)


@pytest.mark.slow
def test_prefix_cache_benchmark_smoke(tmp_path: Path) -> None:
    script = SCRIPT.parent / "prefix_cache.py"
    env = {**os.environ, "EXO_LAB_MODELS_DIR": str(tmp_path / "models")}
    args = ["--model", "synthetic:tiny", "--turns", "2", "--system", "128", "--reply", "4"]
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert re.search(r"^ +2 +\d+ +[1-9]\d* .* \d+\.\dx$", proc.stdout, re.M), proc.stdout  # turn 2 hit the cache
    assert re.search(r"^TTFT off/on from turn 2: geometric mean \d+\.\dx", proc.stdout, re.M), proc.stdout


@pytest.mark.slow
def test_weight_formats_benchmark_reports_the_decode_an_instance_would_do(tmp_path: Path) -> None:
    """Each format is decoded in lock step and a step ahead (the same tokens, or the script fails), and its decode
    figure, and so its fraction of the bandwidth limit, is the one exo_lab's one-process instance would use."""
    script = SCRIPT.parent / "weight_formats.py"
    out = tmp_path / "formats.json"
    args = ["--preset", "tiny", "--formats", "float32,q4", "--pp", "32", "--tg", "8", "--repeat", "1"]
    args += ["--no-llama-cpp", "--models-dir", str(tmp_path / "models"), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert [r["format"] for r in doc["rows"]] == ["float32", "q4"]
    for row, run in zip(doc["rows"], doc["runs"], strict=True):
        assert run["fmt"] == row["format"] and run["lock_tps"] > 0 and run["ahead_tps"] > 0
        chosen = run["ahead_tps"] if run["ahead"] else run["lock_tps"]
        assert row["decode_tps"] == chosen and row["steps_ahead"] == float(run["ahead"])
        assert row["fraction_of_limit"] == pytest.approx(row["decode_tps"] / row["limit_tps"])
    assert re.search(r"^q4 +\d+\.\d\d[* ] +\d+\.\d\d +\d+\.\d\d ", proc.stdout, re.M), proc.stdout
