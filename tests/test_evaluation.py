"""`scan eval`: the eager model and its bundle give the same metrics on the same data; the
report carries every metric and SG-IoU where a synonym map exists; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from runtime.datasets import SegmentationDataset
from runtime.evaluation import evaluate, report
from runtime.metrics import ConfusionMatrix
from runtime.result import SegmentationResult
from runtime.settings import InferenceSettings
from runtime.synthetic_data import write_synthetic_dataset

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "data"
    write_synthetic_dataset(root, images=8, size=(96, 128), seed=3)
    return root


def test_bundle_and_eager_agree_on_the_same_data(small_val, tiny_bundle, tmp_path):
    """The bundle holds the `tiny` preset with seed-0 weights; `--config tiny` rebuilds the same model."""
    eager, deployed = tmp_path / "eager.json", tmp_path / "bundle.json"
    common = ["--dataset", small_val, "--no-resize", "--no-progress"]
    result = _cli("eval", "--config", "tiny", "--device", "cpu", "--json", eager, *common)
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.stdout
    result = _cli("eval", "--bundle", tiny_bundle.path, "--backend", "onnxruntime", "--json", deployed, *common)
    assert result.exit_code == 0, result.output
    a, b = json.loads(eager.read_text()), json.loads(deployed.read_text())
    assert a["images"] == b["images"] == 2 and a["pixels"] == b["pixels"] > 0
    assert abs(a["mIoU"] - b["mIoU"]) <= 0.1 and abs(a["pACC"] - b["pACC"]) <= 0.1
    assert a["backend"] == "eager" and b["backend"] == "onnxruntime-fp32"
    assert len(a["per_class"]) == 10 and "sg_iou" not in a  # no synonym map for a generic dataset


class _Oracle:
    """A segmenter that answers with a fixed label map: evaluation without a model."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def set_vocabulary(self, names):
        self.names = names

    def segment(self, image, settings=None):
        answer = self.answers[self.calls]
        self.calls += 1
        return SegmentationResult(answer, list(self.names), None, {}, answer.shape, 0)


def test_ranks_split_the_images_and_their_matrices_sum_to_the_whole(small_val):
    from runtime.datasets import open_dataset

    dataset = open_dataset(small_val, split="train")
    labels = [dataset.read(i)[1] for i in range(len(dataset))]
    answers = [np.where(label == 255, 0, label) for label in labels]  # perfect except on ignored pixels
    whole = evaluate(_Oracle(answers), dataset, InferenceSettings()).matrix
    parts = ConfusionMatrix(len(dataset.class_names), dataset.ignore_label)
    for rank in range(3):
        mine = [answers[i] for i in range(rank, len(dataset), 3)]
        parts.merge(evaluate(_Oracle(mine), dataset, InferenceSettings(), rank=rank, world=3).matrix)
    assert np.array_equal(parts.matrix, whole.matrix)
    result = report(whole, dataset, InferenceSettings())
    assert result["mIoU"] == pytest.approx(100.0) and result["pACC"] == pytest.approx(100.0)


def test_sg_iou_is_reported_for_a_benchmark_with_a_synonym_map(tmp_path):
    dataset = SegmentationDataset(name="ade847_val", root=tmp_path, class_names=[f"c{i}" for i in range(847)],
                                  ignore_label=65535, split="val", items=[(tmp_path / "a", tmp_path / "b")],
                                  benchmark="ade847")
    matrix = ConfusionMatrix(847, 65535)
    matrix.update(np.array([[0, 1], [2, 0]]), np.array([[0, 1], [2, 65535]]))
    result = report(matrix, dataset, InferenceSettings())
    assert "sg_iou" in result and result["sg_iou"]["SG-mIoU"] == pytest.approx(result["mIoU"])


def test_eval_errors_are_one_line(small_val, tmp_path):
    result = _cli("eval", "--dataset", tmp_path / "nowhere", "--config", "tiny")
    assert result.exit_code == 2 and "generic layout" in result.stderr.lower()
    result = _cli("eval", "--dataset", "ade150", "--data-root", tmp_path, "--config", "tiny")
    assert result.exit_code == 2 and "ADEChallengeData2016" in result.stderr and "--data-root" in result.stderr
    result = _cli("eval", "--dataset", small_val)
    assert result.exit_code == 2 and "--checkpoint" in result.stderr
