"""The full chain on the embedded default, at test size: synthetic data, `scan train`, `scan finetune-clip`,
`scan fuse`, `scan eval`, then `scan export` and `scan eval --bundle` (README, "CLIP finetuning and fusing").

The export of the fused model costs over two minutes here (the image encoder's export alone takes
about 70 s on 2 cores), so that step runs when SCAN_SLOW_TESTS=1; `make demo` runs the same chain at
full size, and `scan eval --bundle` against eager is tested on the session bundle (test_evaluation.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from scan_model.loading import load_model

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-3000:]
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    data, run, clip, fused = root / "data", root / "train", root / "clip", root / "fused.safetensors"
    _cli("data", "synth", "--out", data, "--images", 12, "--size", "96x128", "--seed", 1)
    _cli("train", "--config", "tiny", "--dataset", data, "--out", run, "--max-iter", 3, "--device", "cpu",
         "--set", "augment.crop_size=96,96", "--set", "augment.min_sizes=96,128", "--set", "loss.num_points=256",
         "--no-progress")
    trained = run / "model_final.safetensors"
    _cli("finetune-clip", "--config", "tiny", "--dataset", data, "--init", trained, "--out", clip, "--max-steps", 3,
         "--batch-size", 8, "--set", "min_region_pixels=64", "--device", "cpu", "--no-progress")
    result = _cli("fuse", "--checkpoint", trained, "--clip", clip / "clip_final.safetensors", "--out", fused,
                  "--ensemble-weight", 0.7)
    assert "original_clip untouched" in result.output
    eager = root / "eager.json"
    _cli("eval", "--checkpoint", fused, "--dataset", data, "--json", eager, "--device", "cpu", "--no-progress")
    return {"root": root, "data": data, "trained": trained, "clip": clip, "fused": fused, "eager": eager}


def test_synth_train_finetune_fuse_eval(chain):
    checks = [json.loads(line)["zeroshot"] for line in (chain["clip"] / "log.jsonl").read_text().splitlines()
              if "zeroshot" in line]
    assert [c["step"] for c in checks] == [0, 3] and checks[0]["regions"] > 0
    fused, trained = load_model(chain["fused"]).model, load_model(chain["trained"]).model
    finetuned = load_file(str(chain["clip"] / "clip_final.safetensors"))
    for name, value in fused.clip.state_dict().items():
        assert torch.equal(value, finetuned[f"clip_model.{name}"]), name
    for name, value in fused.state_dict().items():
        if not name.startswith("clip."):
            assert torch.equal(value, trained.state_dict()[name]), name
    assert fused.cfg.inference.ensemble_weight == 0.7
    result = json.loads(chain["eager"].read_text())
    assert result["settings"]["ensemble_weight"] == 0.7 and result["pixels"] > 0
    assert 0.0 <= result["mIoU"] <= 100.0


@pytest.mark.skipif(os.environ.get("SCAN_SLOW_TESTS") != "1",
                    reason="exports a bundle (over 2 minutes); set SCAN_SLOW_TESTS=1 (make demo runs this step)")
def test_fused_model_exports_and_the_runtime_evaluates_it_like_eager(chain):
    bundle, deployed_json = chain["root"] / "bundle", chain["root"] / "bundle.json"
    _cli("export", "--checkpoint", chain["fused"], "--out", bundle)
    _cli("eval", "--bundle", bundle, "--backend", "onnxruntime", "--dataset", chain["data"], "--json", deployed_json, "--no-progress")
    eager, deployed = json.loads(chain["eager"].read_text()), json.loads(deployed_json.read_text())
    assert deployed["settings"]["ensemble_weight"] == 0.7
    assert eager["pixels"] == deployed["pixels"] > 0
    assert abs(eager["mIoU"] - deployed["mIoU"]) <= 0.1, (eager["mIoU"], deployed["mIoU"])
