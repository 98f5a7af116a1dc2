"""CLIP finetuning (SPEC §4): the recipe, the per-region contextual shift, the optimizer groups and
schedule, bad input refused before any work, exact resume after a kill, two processes like one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import PROJECT_ROOT
from runtime.synthetic_data import write_synthetic_dataset
from scan_model.clip_towers import set_activation
from scan_model.finetune.config import TrainConfigError, finetune_recipe, set_value
from scan_model.finetune.model import ContextualShiftClip
from scan_model.finetune.solver import build_optimizer, lr_factor, takes_weight_decay
from scan_model.loading import load_model
from safetensors.torch import load_file

# Small and quick: batch 8 over 24-pixel-or-larger regions of 96x128 scenes, 0.2 s per step on 2 cores.
QUICK = ["--config", "tiny", "--batch-size", "8", "--set", "log_period=1", "--set", "min_region_pixels=64",
         "--device", "cpu", "--no-progress"]
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
    write_synthetic_dataset(root, images=12, size=(96, 128), seed=3)
    return root


@pytest.fixture(scope="module")
def towers():
    cfg = finetune_recipe("tiny")
    model = ContextualShiftClip.from_scan_model(load_model(None, "tiny", seed=0).model, cfg.shift, cfg.activation)
    model.lock_text()
    return model


def _finetune_subprocess(args, cache):
    command = [sys.executable, "-m", "cli", "finetune-clip", *map(str, args)]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2", "XDG_CACHE_HOME": str(cache)})


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- the recipe and the model -------------------------------------------------------------------


def test_recipes_hold_the_official_numbers():
    official = finetune_recipe("vitl")
    s = official.solver
    assert (s.lr, tuple(s.betas), s.eps, s.weight_decay, s.warmup_steps, s.epochs, s.batch_size) == \
        (5e-6, (0.9, 0.98), 1e-6, 0.2, 100, 10, 256)
    assert official.shift.replace_ratio == 0.15 and official.shift.replace_layers == (1, 3, 5, 7, 9)
    assert official.activation == "quick_gelu" and official.lock_text and official.seed == 4242
    tiny = finetune_recipe("tiny")
    assert tiny.activation == "gelu" and tiny.shift.replace_layers == (1, 3, 5)
    set_value(tiny, "solver.lr", "2e-4")
    assert tiny.solver.lr == 2e-4
    with pytest.raises(TrainConfigError, match="solver.lr"):
        set_value(tiny, "solver.lrr", "1")
    tiny.shift.replace_layers = (1, 7)
    with pytest.raises(TrainConfigError, match=r"replace_layers \[7\] outside 1..6"):
        tiny.validate(clip_layers=6)


def test_weight_decay_groups_and_locked_towers(towers):
    optimizer = build_optimizer(towers, finetune_recipe("tiny").solver)
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    names = {id(p): n for n, p in towers.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "clip_model.visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "clip_model.visual.conv1.weight" in decayed and "clip_model.visual.proj" in decayed
    assert {"clip_model.logit_scale", "clip_model.visual.class_embedding",
            "clip_model.visual.ln_pre.weight", "clip_model.visual.transformer.resblocks.0.attn.in_proj_bias"} <= plain
    trainable = decayed | plain
    assert not any(n.startswith("original_clip_visual.") for n in trainable), "the original tower is frozen"
    assert not any(n.startswith(("clip_model.transformer.", "clip_model.token_embedding")) for n in trainable)
    assert all(n.startswith("clip_model.visual.") for n in trainable - {"clip_model.logit_scale"})
    assert not takes_weight_decay("visual.ln_post.weight", torch.zeros(3, 3))


def test_warmup_then_cosine_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_each_region_is_shifted_with_its_own_images_tokens(towers):
    torch.manual_seed(0)
    n, patches = 3, towers.clip_cfg.num_patches
    regions, images = torch.randn(n, 3, 224, 224), torch.randn(n, 3, 224, 224)
    masks = torch.zeros(n, 224, 224)
    masks[:, 64:160, 48:176] = 1  # 48 of 196 patches are foreground, so 22 of 148 are replaced
    keys = torch.stack([torch.randperm(patches) for _ in range(n * 3)]).view(n, 3, patches)
    with torch.no_grad():
        together = towers.encode_regions(regions, masks, images, keys)
        alone = torch.cat([towers.encode_regions(regions[i:i + 1], masks[i:i + 1], images[i:i + 1], keys[i:i + 1])
                           for i in range(n)])
        swapped = towers.encode_regions(regions, masks, images.flip(0), keys)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert (together[0] - swapped[0]).abs().max() > 1e-4, "another full image changes a region's features"
    torch.testing.assert_close(together[1], swapped[1], rtol=1e-5, atol=1e-6)  # its own image is still index 1


def test_quick_gelu_is_an_activation_choice_with_the_same_weights(towers):
    visual = towers.clip_model.visual
    x = torch.randn(2, 196 + 1, visual.conv1.out_channels)
    block = visual.transformer.resblocks[0]
    keys = set(block.state_dict())
    with torch.no_grad():
        exact = block(x)
        set_activation(block, "quick_gelu")
        quick = block(x)
        set_activation(block, "gelu")
        again = block(x)
    assert set(block.state_dict()) == keys
    assert (exact - quick).abs().max() > 1e-5 and torch.equal(exact, again)
    with pytest.raises(ValueError, match="quick_gelu"):
        set_activation(block, "relu")


# -- runs -----------------------------------------------------------------------------------------


def test_bad_input_is_one_line_before_any_work(synth, tmp_path):
    out = tmp_path / "run"
    line = _one_error_line(_cli("finetune-clip", *QUICK, "--dataset", synth, "--out", out, "--set", "shift.ratio=1"))
    assert "shift.ratio" in line and "shift.replace_ratio" in line
    line = _one_error_line(_cli("finetune-clip", *QUICK, "--dataset", synth, "--out", out, "--batch-size", "5000"))
    assert "fewer than one batch of 5000" in line
    line = _one_error_line(_cli("finetune-clip", *QUICK, "--dataset", synth, "--out", out, "--csv", synth / "x.csv"))
    assert "--full-images" in line
    line = _one_error_line(_cli("finetune-clip", *QUICK, "--dataset", synth, "--out", out, "--init", tmp_path / "no.pt"))
    assert "no.pt" in line and "not found" in line
    assert "nothing to resume" in _one_error_line(
        _cli("finetune-clip", *QUICK, "--dataset", synth, "--out", out, "--resume"))
    assert not out.exists(), "nothing is written when the input is refused"


def test_kill_and_resume_equals_an_uninterrupted_run_and_zero_shot_rises(synth, tmp_path):
    common = [*QUICK, "--dataset", synth, "--max-steps", 6]
    straight = tmp_path / "straight"
    done = _finetune_subprocess([*common, "--out", straight, "--set", "checkpoint_period=4"], tmp_path / "cache")
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]

    killed = tmp_path / "killed"
    proc = _finetune_subprocess([*common, "--out", killed, "--set", "checkpoint_period=2"], tmp_path / "cache")
    deadline = time.time() + 600
    while not (killed / "last_checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "clip_final.safetensors").exists(), "the run finished before it was killed"
    resumed = _finetune_subprocess([*common, "--out", killed, "--set", "checkpoint_period=2", "--resume"],
                                   tmp_path / "cache")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]

    a, b = _log(straight), _log(killed)
    assert a[-1]["parameter_sha256_by_rank"] == b[-1]["parameter_sha256_by_rank"]
    losses_a = [r["loss"] for r in a if "loss" in r]
    assert losses_a == [r["loss"] for r in b if "loss" in r] and len(losses_a) == 6
    # The zero-shot check ran before the first step and at the end; finetuning helped.
    checks = [r["zeroshot"] for r in a if "zeroshot" in r]
    assert checks[0]["step"] == 0 and checks[-1]["step"] == 6 and checks[0]["regions"] > 0
    assert checks[-1]["top1"] > checks[0]["top1"]
    final = load_file(str(straight / "clip_final.safetensors"))
    assert any(k.startswith("clip_model.visual.") for k in final)
    assert any(k.startswith("original_clip_visual.") for k in final)
    line = _one_error_line(_cli("finetune-clip", *common, "--out", killed, "--lr", "1", "--resume"))
    assert "solver.lr" in line


def test_two_processes_keep_identical_parameters_and_match_one(synth, tmp_path):
    args = [*QUICK, "--dataset", synth, "--max-steps", 3, "--set", "zeroshot_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cli", "finetune-clip", *map(str, args), "--out", str(two)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    result = subprocess.run([sys.executable, "-m", "cli", "finetune-clip", *map(str, args), "--out", str(one)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    final = _log(two)[-1]
    hashes = final["parameter_sha256_by_rank"]
    assert final["world_size"] == 2 and hashes[0] == hashes[1]
    loss_one = [r["loss"] for r in _log(one) if "loss" in r]
    loss_two = [r["loss"] for r in _log(two) if "loss" in r]
    assert len(loss_one) == len(loss_two) == 3
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    a, b = load_file(str(one / "clip_final.safetensors")), load_file(str(two / "clip_final.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, f"one and two processes differ by {worst}"


def test_finetunes_from_an_ov_seg_csv(synth, tmp_path):
    """Regions written as ov-seg files (background fill, `<full image stem>_<k>.png`) train like the dataset's."""
    from PIL import Image

    from runtime.datasets import open_dataset
    from scan_model.finetune.region_data import dataset_regions, region_crop

    records = dataset_regions(open_dataset(synth, split="train"), min_pixels=64)
    crops = tmp_path / "crops"
    crops.mkdir()
    rows = ["filepath\ttitle"]
    for k, record in enumerate(records):
        name = f"{Path(record.image).stem}_{k}.png"
        Image.fromarray(region_crop(record)).save(crops / name)
        rows.append(f"crops/{name}\t{record.text}")
    csv = tmp_path / "regions.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = _cli("finetune-clip", *QUICK, "--dataset", synth, "--csv", csv, "--full-images", synth / "images" / "train",
                  "--out", out, "--max-steps", 2, "--set", "zeroshot_every=0")
    assert result.exit_code == 0, result.output[-2000:]
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "clip_final.safetensors").is_file()
    (crops / f"{Path(records[0].image).stem}_0.png").unlink()
    line = _one_error_line(_cli("finetune-clip", *QUICK, "--dataset", synth, "--csv", csv, "--full-images",
                                synth / "images" / "train", "--out", tmp_path / "other"))
    assert "line 2" in line and "_0.png" in line
