"""The benchmark harnesses run, and their built-in correctness checks hold (timings are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import eager, region_stage


@pytest.fixture(autouse=True)
def keep_thread_count():
    # The harnesses set torch's (process-wide) thread count; restore it for the other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_region_stage_batched_equals_official_structure(tmp_path):
    result = region_stage.measure("tiny", (64, 96), runs=1, threads=1)
    assert result["valid_regions"] > 0
    assert result["max_abs_logit_difference"] < 1e-3  # 100 * cosine logits
    assert set(result["median_s"]) == {"ours_batched", "official_structure"}


def test_eager_benchmark_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert eager.main(["--preset", "tiny", "--size", "64x96", "--runs", "1", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["input_hw"] == [64, 96] and len(data["runs_s"]) == 1
    assert {"image_encoder", "clip_adapter"} <= set(data["stages_s"])
