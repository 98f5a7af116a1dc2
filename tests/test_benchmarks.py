"""The benchmark harnesses run, and their built-in correctness checks hold (timings are not asserted).

`scan bench` (which superseded the eager and runtime-vs-eager scripts) is tested in test_bench.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import region_stage
from runtime.vocab import benchmark_vocabularies


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


def test_region_stage_reads_vocabularies_like_the_cli():
    # A preset name is the preset's names, not one class called "voc20".
    result = region_stage.measure("tiny", (64, 96), runs=1, threads=1, vocab="voc20")
    assert result["vocabulary_size"] == len(benchmark_vocabularies()["voc20"])
