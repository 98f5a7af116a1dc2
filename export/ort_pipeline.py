"""The whole SCAN pipeline assembled from ONNX Runtime sessions, for checking an export.

A verification tool (tests, benchmarks/export_report.py), not the runtime: normalisation,
upsampling and the ensemble reuse the eager code, so that a comparison with eager isolates
the graphs. The torch-free pipeline belongs to `runtime/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scan_model.ensemble import ensemble_class_scores, semantic_map, upsample_masks
from scan_model.text import VILD_TEMPLATES, prompts, tokenize


def sessions(files: dict[str, Path], fp16: bool = False) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if fp16:  # ORT 1.32's CPU NCHWc rewrite crashes on fp16 graphs
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for name, path in files.items()}


def onnx_classifier(model, session, names: list[str]) -> torch.Tensor:
    """Template-ensembled text classifier from the text_encoder piece (plus the non-object row)."""
    tokens = tokenize(prompts(names, VILD_TEMPLATES)).numpy()
    features = np.concatenate([session.run(None, {"tokens": chunk})[0] for chunk in np.array_split(tokens, 4)])
    per_template = F.normalize(torch.from_numpy(features).view(len(VILD_TEMPLATES), len(names), -1), dim=-1)
    return model.text_classifier(F.normalize(per_template.mean(0), dim=-1))


@torch.no_grad()
def encode_and_decode(model, sessions, image: torch.Tensor, classifier: torch.Tensor):
    """Image encoder and mask decoder: (class logits [Q,K+1], mask probabilities [Q,H,W], shift tokens)."""
    swin, clip_padded = model.normalise_and_pad(image)
    clip_image = model.clip_input(clip_padded)
    enc = sessions["image_encoder"].run(None, {"image": swin.numpy(), "clip_image": clip_image.numpy()})
    mask_features, f0, f1, f2, context, global_cls, shift_tokens = enc
    class_logits, mask_logits = sessions["mask_decoder"].run(None, {
        "mask_features": mask_features, "features_0": f0, "features_1": f1, "features_2": f2,
        "clip_context": context, "global_cls": global_cls, "text_classifier": classifier.numpy(),
    })
    probs = upsample_masks(torch.from_numpy(mask_logits), tuple(swin.shape[-2:]), tuple(image.shape[-2:]))[0].sigmoid()
    return torch.from_numpy(class_logits[0]), probs, shift_tokens[0]


@torch.no_grad()
def classify_and_merge(model, sessions, image, classifier, class_logits, probs, shift_tokens) -> torch.Tensor:
    """CLIP adapter on the masks with a non-empty thresholded area, ensemble, sem_seg [K,H,W]."""
    thr = model.cfg.inference.mask_threshold
    keep = (probs > thr).flatten(1).any(1)
    region_logits = torch.zeros(probs.shape[0], classifier.shape[0])
    if keep.any():
        logits, valid = sessions["clip_adapter"].run(None, {
            "image": image[0].numpy(), "mask_probs": probs[keep].numpy(), "mask_threshold": np.array(thr, np.float32),
            "shift_tokens": shift_tokens, "text_classifier": classifier.numpy(),
        })
        assert valid.all()
        region_logits[keep] = torch.from_numpy(logits)
    inf = model.cfg.inference
    scores = ensemble_class_scores(class_logits, region_logits, keep, inf.ensemble_weight, log_branch=inf.log_ensemble)
    return semantic_map(scores, probs)


def onnx_pipeline(model, sessions, image: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    class_logits, probs, shift_tokens = encode_and_decode(model, sessions, image, classifier)
    return classify_and_merge(model, sessions, image, classifier, class_logits, probs, shift_tokens)


PIPELINE_AGREEMENT = {"fp32": 0.999, "fp16": 0.99}  # DESIGN.md: identical labels, fp32 / fp16


def pipeline_check(model, records: dict, shapes: list, variants: tuple[str, ...], vocabulary: list[str]) -> dict[str, list[dict]]:
    """Label maps of the assembled pipeline against eager on drawn scenes, one per shape and variant.

    Uses the eager text classifier, so the check isolates the image pieces and their glue;
    eager runs once per scene and serves every variant (fp32, fp16).
    """
    from scan_model.synthetic import synthetic_scene

    runners = {
        v: sessions({name: (r.fp16 if v == "fp16" else r).path for name, r in records.items()}, fp16=v == "fp16")
        for v in variants
    }
    with torch.no_grad():
        classifier = model.text_classifier(model.encode_text(vocabulary))
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for shape in shapes:
        image = torch.from_numpy(synthetic_scene(shape.height, shape.width, seed=3).copy()).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            eager = model(image, classifier).sem_seg.argmax(0)
        for v in variants:
            ours = onnx_pipeline(model, runners[v], image, classifier)
            results[v].append({"image": f"drawn scene {shape.height}x{shape.width}", "classes": len(vocabulary),
                               "label_agreement": float((eager == ours.argmax(0)).double().mean()),
                               "required": PIPELINE_AGREEMENT[v]})
    return results
