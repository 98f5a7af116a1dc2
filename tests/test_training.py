"""Training: the recipe as data, the official parameter groups and schedule, bad input refused
before any work, exact resume after a kill, and two-process DistributedDataParallel on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import PROJECT_ROOT
from runtime.synthetic_data import write_synthetic_dataset
from scan_model.loading import load_model
from scan_model.official_config import read_yaml
from scan_model.training.config import TrainConfigError, recipe, recipe_from_official, set_value
from scan_model.training.solver import SolverConfig, lr_factor, parameter_groups
from scan_model.training.trainer import freeze_clip

OFFICIAL_CONFIGS = PROJECT_ROOT.parent / "shared" / "data" / "official_configs"
# Small and quick: 128-pixel crops, batch 2, few points; 0.3-0.5 s per iteration on 2 cores.
QUICK = ["--config", "tiny", "--set", "augment.crop_size=128,128", "--set", "augment.min_sizes=96,128,160",
         "--set", "loss.num_points=512", "--set", "log_period=1", "--num-workers", "0", "--device", "cpu",
         "--no-progress"]
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, images=12, size=(128, 128), seed=5)
    return root


def _train_subprocess(args, env=None, **kwargs):
    command = [sys.executable, "-m", "cli", "train", *map(str, args)]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}, **kwargs)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_data_synth_command(tmp_path):
    out = tmp_path / "synth"
    result = _cli("data", "synth", "--out", out, "--images", 4, "--size", "64x96", "--seed", 2)
    assert result.exit_code == 0, result.output
    assert "train 3" in result.stderr and "val 1" in result.stderr
    from runtime.datasets import open_dataset

    image, label = open_dataset(out, split="val").read(0)
    assert image.shape == (64, 96, 3) and label.shape == (64, 96)
    assert "HxW" in _one_error_line(_cli("data", "synth", "--out", tmp_path / "other", "--size", "big"))


# -- the recipe ---------------------------------------------------------------------------------------


def test_official_yaml_gives_the_official_recipe():
    cfg = recipe_from_official(recipe("vitb"), read_yaml(OFFICIAL_CONFIGS / "scan_vitB.yaml"))
    assert cfg.solver.base_lr == 6e-5 and cfg.solver.max_iter == 120000 and cfg.solver.ims_per_batch == 32
    assert cfg.solver.warmup_iters == 1500 and cfg.solver.warmup_factor == 1e-6 and cfg.solver.clip_grad_norm == 0.01
    assert cfg.augment.min_sizes == tuple(range(320, 1281, 64)) and cfg.augment.crop_size == (640, 640)
    assert cfg.loss.num_points == 12544 and cfg.loss.no_object_weight == 0.1 and cfg.loss.class_weight == 2.0
    tiny = recipe("tiny")
    assert tiny.solver.max_iter == 300 and tiny.augment.crop_size == (256, 256) and tiny.ensemble_weight == 0.0


def test_overrides_are_typed_and_unknown_keys_named():
    cfg = recipe("tiny")
    set_value(cfg, "solver.base_lr", "1e-3")
    set_value(cfg, "augment.crop_size", "320,320")
    set_value(cfg, "loss.deep_supervision", "false")
    assert cfg.solver.base_lr == 1e-3 and cfg.augment.crop_size == (320, 320) and cfg.loss.deep_supervision is False
    with pytest.raises(TrainConfigError, match="solver.base_lrr.*solver.base_lr"):
        set_value(cfg, "solver.base_lrr", "1")
    with pytest.raises(TrainConfigError, match="expected int"):
        set_value(cfg, "solver.max_iter", "lots")
    with pytest.raises(TrainConfigError, match="unknown"):
        set_value(cfg, "solver", "1")  # a section, not a value


def test_parameter_groups_follow_the_official_rules():
    model = load_model(None, "tiny").model
    freeze_clip(model)
    groups = {g["name"]: g for g in parameter_groups(model, SolverConfig(base_lr=1.0, weight_decay=0.01,
                                                                         backbone_multiplier=0.5))}
    assert not [n for n in groups if n.startswith(("clip.", "original_clip."))], "frozen towers are not optimised"
    assert len(groups) == sum(1 for p in model.parameters() if p.requires_grad)
    bias_tables = [g for n, g in groups.items() if n.endswith("relative_position_bias_table")]
    assert bias_tables and all(g["weight_decay"] == 0.0 and g["lr"] == 0.5 for g in bias_tables)
    assert groups["mask_decoder.query_feat.weight"]["weight_decay"] == 0.0  # nn.Embedding
    assert groups["mask_decoder.decoder_norm.weight"]["weight_decay"] == 0.0  # norm layer
    assert groups["pixel_decoder.transformer.level_embed"]["weight_decay"] == 0.01  # a bare Parameter keeps decay
    assert groups["calibration.cls_weight"]["weight_decay"] == 0.01
    assert groups["non_object_embedding"]["weight_decay"] == 0.01 and groups["non_object_embedding"]["lr"] == 1.0
    assert groups["backbone.patch_embed.proj.weight"]["lr"] == 0.5


def test_warmup_then_poly_schedule():
    cfg = SolverConfig(max_iter=100, warmup_iters=10, warmup_factor=1e-6, poly_power=0.9)
    assert lr_factor(0, cfg) == pytest.approx(1e-6)
    assert lr_factor(5, cfg) == pytest.approx((1e-6 * 0.5 + 0.5) * 0.95**0.9)
    assert lr_factor(10, cfg) == pytest.approx(0.9**0.9)
    assert lr_factor(100, cfg) == 0.0


def test_training_predictions_are_the_inference_ones_with_gradients():
    """The final set equals `decode` (the inference path); each aux set equals calibrating it alone;
    gradients reach the trained parts and never the frozen CLIP towers."""
    import torch.nn.functional as F

    model = load_model(None, "tiny").model.eval()
    image = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        classifier = model.text_classifier(model.encode_text(["sky", "grass", "ball"]))
        features = model.encode_image(image)
        decoded = model.decode(features, classifier)
    freeze_clip(model)
    predictions = model.predict_for_training(image, model.text_classifier(classifier[:-1]))
    assert len(predictions) == 1 + model.cfg.mask_decoder.num_layers
    torch.testing.assert_close(predictions[0].query_embeddings, decoded.class_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predictions[0].mask_logits, decoded.mask_logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for aux, pred in zip(decoded.aux, predictions[1:]):
            refined = model.calibration.calibrate(aux.query_embeddings, features.clip_context,
                                                  features.global_clip.final_cls)
            expected = 100.0 * F.normalize(refined, dim=-1) @ classifier.t()
            torch.testing.assert_close(pred.query_embeddings, expected, rtol=1e-4, atol=1e-4)
    sum(p.query_embeddings.sum() + p.mask_logits.sum() for p in predictions).backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.calibration.cls_weight.grad is not None and model.non_object_embedding.grad is not None
    assert all(p.grad is None for p in [*model.clip.parameters(), *model.original_clip.parameters()])


def test_backbone_starts_from_an_imagenet_swin_checkpoint(tmp_path):
    """Microsoft's Swin .pth layout (classifier head, final norm, attention masks) loads into the backbone."""
    source = load_model(None, "tiny", seed=7).model.backbone.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith(("norm0", "norm1", "norm2", "norm3"))}
    state.update({"head.weight": torch.zeros(1000, 256), "norm.weight": torch.ones(256),
                  "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    path = tmp_path / "swin_22k.pth"
    torch.save({"model": state}, path)
    model = load_model(None, "tiny", seed=0, backbone_weights=path).model
    own = model.backbone.state_dict()
    assert torch.equal(own["layers.1.blocks.0.attn.qkv.weight"], source["layers.1.blocks.0.attn.qkv.weight"])
    from scan_model.checkpoint import CheckpointError

    del state["patch_embed.proj.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="1 missing: patch_embed.proj.weight"):
        load_model(None, "tiny", backbone_weights=path)
    (tmp_path / "swin.pkl").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_model(None, "tiny", backbone_weights=tmp_path / "swin.pkl")


def test_crops_are_padded_with_the_datasets_own_ignore_value(tmp_path):
    from runtime.datasets import open_dataset, write_label
    from scan_model.training.augment import AugmentConfig
    from scan_model.training.data import AugmentedSamples

    root = tmp_path / "wide"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(300)], "ignore_label": 65535}))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "a.png")
    write_label(root / "annotations" / "a.png", np.full((32, 32), 299), 65535)
    samples = AugmentedSamples(open_dataset(root), AugmentConfig(min_sizes=(32,), crop_size=(64, 64)), seed=0)
    sample = samples[(0, 0)]
    assert sample["labels"].tolist() == [299]  # the padding is not a class
    assert int(sample["masks"].sum()) == 32 * 32


# -- bad input, refused before any work -----------------------------------------------------------------


def test_bad_input_is_one_line_before_training(synth, tmp_path):
    out = tmp_path / "run"
    line = _one_error_line(_cli("train", *QUICK, "--dataset", synth, "--out", out, "--set", "solver.lrr=1"))
    assert "solver.lrr" in line and "solver.base_lr" in line
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "annotations").mkdir()
    (empty / "classes.json").write_text('["a", "b"]')
    assert "no" in _one_error_line(_cli("train", *QUICK, "--dataset", empty, "--out", out)).lower()
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "images").mkdir(parents=True)
    (unlabelled / "annotations").mkdir()
    (unlabelled / "classes.json").write_text('["a", "b"]')
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(unlabelled / "images" / "lonely.png")
    assert "lonely" in _one_error_line(_cli("train", *QUICK, "--dataset", unlabelled, "--out", out))
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "annotations").mkdir()
    (bad / "classes.json").write_text('["a", "b"]')
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "images" / "x.png")
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(bad / "annotations" / "x.png")
    line = _one_error_line(_cli("train", *QUICK, "--dataset", bad, "--out", out))
    assert "x.png" in line and "7" in line
    assert "nothing to resume" in _one_error_line(_cli("train", *QUICK, "--dataset", synth, "--out", out, "--resume"))
    assert not out.exists(), "nothing is written when the input is refused"


# -- runs -----------------------------------------------------------------------------------------------


def test_kill_and_resume_equals_an_uninterrupted_run(synth, tmp_path):
    common = [*QUICK, "--dataset", synth, "--max-iter", 5]
    straight = tmp_path / "straight"
    done = _train_subprocess([*common, "--out", straight, "--checkpoint-period", 3])
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]

    killed = tmp_path / "killed"
    proc = _train_subprocess([*common, "--out", killed, "--checkpoint-period", 2])
    deadline = time.time() + 600
    while not (killed / "last_checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "model_final.safetensors").exists(), "the run finished before it was killed"
    stopped_at = int((killed / "last_checkpoint").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < 5
    resumed = _train_subprocess([*common, "--out", killed, "--checkpoint-period", 2, "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]

    a, b = _log(straight), _log(killed)
    assert a[-1]["parameter_sha256_by_rank"] == b[-1]["parameter_sha256_by_rank"]
    losses_a = [r["loss"] for r in a if "loss" in r]
    losses_b = [r["loss"] for r in b if "loss" in r]
    assert losses_a == losses_b and len(losses_a) == 5, "the log holds each iteration once, with the same losses"
    # A resumed run refuses changes that would alter its trajectory.
    line = _one_error_line(_cli("train", *common, "--out", killed, "--lr", "1", "--resume"))
    assert "solver.base_lr" in line
    # Without the original flags the recorded recipe applies (here: all 5 iterations are done).
    line = _one_error_line(_cli("train", "--config", "tiny", "--dataset", synth, "--out", killed, "--resume"))
    assert "already completed 5 iterations" in line


def test_two_processes_keep_identical_parameters_and_evaluate_like_one(synth, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli", "train", *map(str, QUICK), "--dataset", str(synth), "--out", str(out), "--max-iter", "5",
               "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    final = _log(out)[-1]
    hashes = final["parameter_sha256_by_rank"]
    assert final["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    checkpoint = out / "model_final.safetensors"

    single = tmp_path / "single.json"
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", str(synth), "--json", str(single),
            "--device", "cpu", "--no-progress"]
    assert _cli(*args).exit_code == 0
    double = tmp_path / "double.json"
    args[args.index(str(single))] = str(double)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli", *args]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for key in ("mIoU", "fwIoU", "mACC", "pACC", "per_class", "pixels"):
        assert one[key] == two[key], key
    assert one["pixels"] > 0 and torch.isfinite(torch.tensor(one["mIoU"]))
