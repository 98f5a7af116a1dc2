"""The region classifier side by side: our batched form against the official code's structure.

Both run in one process on the same image, masks and weights: ours computes boxes and crops
as one batched gather and sends crops through the CLIP tower in bounded batches; the
"official structure" slices and resizes each mask in a Python loop and runs the tower on one
crop at a time (as adapter.py / utils.py do). Only the structure is reproduced, for timing.

    python -m benchmarks.region_stage --preset vitb --size 640x640 --json benchmarks/results/region_stage_vitb.json

`--vocab` reads names, a .txt/.json file or a preset through the CLI's parser (`runtime.vocab`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import parse_size, report

import torch
import torch.nn.functional as F


def _official_structure(model, image, mask_probs, classifier, shift_tokens):
    """Per-mask loop: threshold, box, slice, mean fill, normalise, bicubic, one CLIP call per crop."""
    from scan_model.clip_towers import patch_foreground, region_clip_forward
    from scan_model.regions import mask_boxes

    inf = model.cfg.inference
    size = model.cfg.clip.vision["image_size"]
    binary = mask_probs > inf.mask_threshold
    boxes, valid = mask_boxes(binary)
    mean, std, fill = model.clip_mean, model.clip_std, model.clip_fill
    features = []
    for q in valid.nonzero().flatten().tolist():
        x0, y0, x1, y1 = boxes[q].tolist()
        m = binary[q, y0:y1, x0:x1].float()
        crop = image[:, y0:y1, x0:x1] * m + (1 - m) * fill
        crop = (crop - mean) / std
        region = F.interpolate(crop[None], (size, size), mode="bicubic", align_corners=False)
        rmask = F.interpolate(m[None, None], (size, size), mode="nearest")
        fg = patch_foreground(rmask, model.cfg.clip.vision["patch_size"])
        features.append(region_clip_forward(model.clip.visual, region, fg, shift_tokens, inf.replace_layers, inf.replace_ratio))
    feats = torch.cat(features)
    return 100.0 * F.normalize(feats, dim=-1) @ classifier.t()


DEFAULT_VOCAB = "cup,table,wall,cat"


def measure(preset: str, size: tuple[int, int], runs: int, threads: int, seed: int = 0, vocab=DEFAULT_VOCAB) -> dict:
    from runtime.synthetic import synthetic_scene
    from runtime.vocab import parse_vocabulary
    from scan_model.ensemble import upsample_masks
    from scan_model.loading import load_model

    names = parse_vocabulary(vocab)

    torch.set_num_threads(threads)
    model = load_model(None, preset, device="cpu", seed=seed).model
    image = torch.from_numpy(synthetic_scene(*size, seed=seed).copy()).permute(2, 0, 1).float()
    with torch.no_grad():
        feats = model.encode_image(image[None])
        classifier = model.text_classifier(model.encode_text(names))
        decoded = model.decode(feats, classifier)
        probs = upsample_masks(decoded.mask_logits, feats.padded_size, feats.image_size)[0].sigmoid()
        shift = feats.global_clip.layer_cls[0]
        ours_fn = lambda: model.classify_regions(image, probs, classifier, shift)  # noqa: E731
        official_fn = lambda: _official_structure(model, image, probs, classifier, shift)  # noqa: E731
        ours_out, official_out = ours_fn(), official_fn()  # warm-up, and a correctness check
        diff = float((ours_out.clip_logits[ours_out.valid] - official_out).abs().max())
        times = {"ours_batched": [], "official_structure": []}
        for _ in range(runs):  # interleaved, so both see the same machine load
            for name, fn in (("ours_batched", ours_fn), ("official_structure", official_fn)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset,
        "input_hw": list(size),
        "threads": threads,
        "vocabulary_size": len(names),
        "valid_regions": int(ours_out.valid.sum()),
        "runs_s": times,
        "median_s": medians,
        "ratio_official_over_ours": medians["official_structure"] / medians["ours_batched"],
        "max_abs_logit_difference": diff,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="320x480")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", default=DEFAULT_VOCAB, help="names, a .txt/.json file or a preset (ade150, ...)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    height, width = parse_size(args.size)
    result = measure(args.preset, (height, width), args.runs, args.threads, vocab=args.vocab)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
