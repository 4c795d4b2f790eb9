"""``benchmarks/bench_basic.py``: the projection arithmetic, and one run of the script's pieces at a tiny shape
(a check of the script itself, not of speed)."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_basic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_basic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_is_depth_times_layer_plus_head_and_embeddings(bench):
    seconds = {
        "layer/s1": 2.0,
        "layer/s2": 3.0,
        "head/s1": 4.0,
        "head/s2": 6.0,
        "embed/s2": 1.0,
        "sds/s1": 10.0,
        "sds/s2": 12.0,
        "rows8/s1": 1.0,
        "rows8/s2": 2.0,
        "capture": 0.5,
        "das": 0.25,
    }
    proj = bench.project(seconds, num_layers=10, rows=[8])
    # stage 1: lm = 10 x 2 + 4 = 24; BASIC = sds + k = 5 captures + das
    assert proj["s1"]["lm_s"] == 24.0
    assert proj["s1"]["exact"] == pytest.approx((24 + 10 + 5 * 0.5 + 0.25) / 24)
    assert proj["s1"]["rows8"] == pytest.approx((24 + 1 + 5 * 0.5 + 0.25) / 24)
    # stage 2 adds the embedding backward to the step
    assert proj["s2"]["lm_s"] == 10 * 3.0 + 6.0 + 1.0
    assert proj["s2"]["exact"] == pytest.approx((37 + 12 + 2.5 + 0.25) / 37)


def test_one_run_at_a_tiny_shape_times_every_piece(bench):
    args = types.SimpleNamespace(
        dtype="float32", text=16, chunk=64, rows=[8], repeat=1, no_warmup=True, threads=0
    )
    result = bench.run_one("tiny", args)
    expected = {"layer/s1", "layer/s2", "head/s1", "head/s2", "embed/s2", "sds/s1", "sds/s2"}
    expected |= {"rows8/s1", "rows8/s2", "capture", "das"}
    assert set(result["seconds"]) == expected
    assert all(math.isfinite(s) and s > 0 for s in result["seconds"].values())
    proj = bench.project(result["seconds"], bench.SHAPES["tiny"]["num_hidden_layers"], [8])
    assert all(proj[stage]["exact"] > 1.0 and proj[stage]["rows8"] > 1.0 for stage in ("s1", "s2"))
