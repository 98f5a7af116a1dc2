"""`scan demo`: the product's main job on the embedded default, with nothing downloaded.

1. `scan data synth`: a seeded synthetic dataset (train and val splits);
2. `scan train`: the `tiny` preset, briefly, on its train split;
3. `scan finetune-clip` and `scan fuse`: the region CLIP finetuned on the train split's
   ground-truth regions (zero-shot accuracy checked on the val split's), then put into the
   trained model with the CLIP ensemble on (weight 0.7);
4. `scan eval`: untrained, trained, trained with its unfinetuned CLIP in the ensemble, and fused;
5. `scan export`: the fused model to a bundle (fp32 pieces, each gated against eager);
6. `scan eval --bundle` and `scan segment --bundle`: the torch-free runtime on the same data;
7. `scan bench`: eager PyTorch against ONNX Runtime and OpenVINO (and INT8 pieces when the bundle has them)
   on two val images.

The trained bundle gets no INT8 pieces: on the gate's drawn scenes, which lie outside what `tiny`
learned, the INT8 `tiny` flips 1-5% of the labels depending on the training run, around the gate's
98% threshold (README, "Training and evaluation").
Every step reuses what an earlier run left in OUT (delete a folder to redo its step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.files import atomic_write
from runtime.manifest import MANIFEST, read_manifest

from .common import check_output_dir, require_torch, say

DEMO_IMAGES = 48
DEMO_SIZE = (256, 256)  # height, width of the synthetic images
DEMO_ITERATIONS = 300
DEMO_ENSEMBLE_WEIGHT = 0.7  # the official CLIP ensemble weight, switched on by the fuse step


def run_demo(out: Path, preset: str = "tiny", seed: int = 0, bundle: Path | None = None, runs: int = 3,
             train_iters: int = DEMO_ITERATIONS, images: int = DEMO_IMAGES) -> list[Path]:
    """Run the whole chain; returns the files written. `bundle` skips training and export."""
    require_torch("scan demo")
    from runtime.synthetic_data import write_synthetic_dataset

    from .bench import BenchOptions, run_bench_job
    from .evaluate import EvalOptions, run_eval
    from .export import ExportOptions, run_export
    from .segment import SegmentOptions, run_segment
    from .train import TrainOptions, run_train

    check_output_dir(out)
    data = out / "data"
    if (data / "synthetic.json").is_file():
        say(f"demo 1/7: reusing the synthetic dataset in {data}")
    else:
        say(f"demo 1/7: writing a synthetic dataset ({images} images of {DEMO_SIZE[0]}x{DEMO_SIZE[1]}) to {data}")
        write_synthetic_dataset(data, images=images, size=DEMO_SIZE, seed=seed)
    evals: dict[str, dict] = {}
    checkpoint = None
    if bundle is None:
        run = out / "train"
        trained = run / "model_final.safetensors"
        if trained.is_file():
            say(f"demo 2/7: reusing the trained model {trained}")
        else:
            say(f"demo 2/7: training {preset} for {train_iters} iterations on {data} (a few minutes on 2 cores)")
            shutil.rmtree(run, ignore_errors=True)
            run_train(TrainOptions(config=preset, dataset=str(data), out=run, max_iter=train_iters, seed=seed,
                                   device="cpu"))
        checkpoint = _finetune_and_fuse(out, preset, data, trained, seed)
        say("demo 4/7: scan eval of the untrained, trained and fused models on the val split")
        # Same settings as the trained model's: its own image size, in-vocabulary classifier only.
        evals["untrained"] = run_eval(EvalOptions(dataset=str(data), config=preset, seed=seed, device="cpu",
                                                  ensemble_weight=0.0, resize=False, json=out / "eval_untrained.json"))
        evals["trained"] = run_eval(EvalOptions(dataset=str(data), checkpoint=trained, device="cpu",
                                                json=out / "eval_trained.json"))
        evals["trained + unfinetuned CLIP"] = run_eval(EvalOptions(
            dataset=str(data), checkpoint=trained, device="cpu", ensemble_weight=DEMO_ENSEMBLE_WEIGHT,
            json=out / "eval_trained_clip_ensemble.json"))
        evals["fused"] = run_eval(EvalOptions(dataset=str(data), checkpoint=checkpoint, device="cpu",
                                              json=out / "eval_fused.json"))
        bundle = out / "bundle"
        if (bundle / MANIFEST).is_file():
            say(f"demo 5/7: reusing the bundle in {bundle} (delete it to export again)")
        else:
            say(f"demo 5/7: exporting the fused model to {bundle}")
            run_export(ExportOptions(out=bundle, checkpoint=checkpoint))
    say("demo 6/7: the torch-free runtime on the same data: scan eval --bundle, scan segment --bundle")
    evals["bundle"] = run_eval(EvalOptions(dataset=str(data), bundle=bundle, json=out / "eval_bundle.json"))
    images = sorted((data / "images" / "val").iterdir())[:2]
    inputs = out / "input"
    check_output_dir(inputs)
    for image in images:
        shutil.copyfile(image, inputs / image.name)
    classes = ",".join(json.loads((data / "classes.json").read_text())["classes"])
    written = run_segment(SegmentOptions(images=[inputs / p.name for p in images], vocab=classes, out=out,
                                         bundle=bundle, save_logits=True))
    backends = "eager,onnxruntime,openvino" + (",onnxruntime-int8" if _has_int8(bundle) else "")
    say(f"demo 7/7: scan bench of {backends} on the same images")
    reports = [out / "bench.json", out / "bench.md", out / "bench.png"]
    run_bench_job(BenchOptions(backends=backends, bundle=bundle, checkpoint=checkpoint,
                               images=inputs, vocab=classes, runs=runs, warmup=1, seed=seed, json=reports[0],
                               markdown=reports[1], plot=reports[2]))
    summary = out / "demo_summary.json"
    atomic_write(summary, lambda tmp: tmp.write_text(json.dumps(
        {name: {k: result[k] for k in ("mIoU", "fwIoU", "mACC", "pACC")} for name, result in evals.items()},
        indent=1) + "\n"))
    say("demo: mIoU on the val split: " + ", ".join(f"{n} {r['mIoU']:.1f}" for n, r in evals.items()))
    files = [*(inputs / p.name for p in images), *written, *reports, summary]
    say(f"demo: wrote {', '.join(str(p) for p in files)}")
    return files


def _finetune_and_fuse(out: Path, preset: str, data: Path, trained: Path, seed: int) -> Path:
    """Finetune the trained model's region CLIP and fuse it back; returns the fused checkpoint."""
    from .finetune import FinetuneOptions, run_finetune
    from .fuse import run_fuse

    run = out / "finetune_clip"
    clip = run / "clip_final.safetensors"
    if clip.is_file():
        say(f"demo 3/7: reusing the finetuned CLIP {clip}")
    else:
        say(f"demo 3/7: finetuning the region CLIP of {trained} on the ground-truth regions of {data}")
        shutil.rmtree(run, ignore_errors=True)
        run_finetune(FinetuneOptions(config=preset, dataset=str(data), out=run, init=trained, seed=seed,
                                     device="cpu"))
    fused = out / "fused.safetensors"
    if not fused.is_file():
        run_fuse(checkpoint=trained, clip=clip, out=fused, config=None, ensemble_weight=DEMO_ENSEMBLE_WEIGHT)
    return fused


def _has_int8(bundle: Path) -> bool:
    return any(piece.int8 is not None for piece in read_manifest(bundle).pieces.values())
