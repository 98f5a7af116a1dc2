"""The export pieces: thin wrappers that give parts of `ScanModel` fixed, named tensor contracts.

In the manner of segment-anything's `SamOnnxModel`: not called directly, only exported. Each
wrapper reuses the reference model's own methods, so eager and ONNX share one implementation.
Pre-processing (normalisation, padding to /32, the nearest 224 squash) and post-processing
(softmax ensemble, einsum, resize) are cheap array code in the runtime, outside the graphs.

| piece          | inputs                                                        | outputs                         |
| image_encoder  | image (1,3,H,W) Swin-normalised and padded to /32,             | mask_features, features_0..2,   |
|                | clip_image (1,3,S,S) CLIP-normalised nearest squash            | clip_context, global_cls,       |
|                |                                                                | shift_tokens                    |
| mask_decoder   | image-encoder outputs, text_classifier (K+1,E)                 | class_logits (1,Q,K+1),         |
|                |                                                                | mask_logits (1,Q,H/4,W/4)       |
| clip_adapter   | image (3,h,w) RGB 0..255 unpadded, mask_probs (N,h,w),         | region_logits (N,K+1),          |
|                | mask_threshold (), shift_tokens (R,C), text_classifier (K+1,E),| valid (N,)                      |
|                | shift_counts (P+1,) int64, shift_keys (R,N,P) int64            |                                 |
| text_encoder   | tokens (M,L) int64, L <= 77 the longest prompt's length        | text_features (M,E) unnormalised|
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.settings import random_shift_keys, shift_counts
from scan_model.clip_towers import patch_foreground, ranked_shift_selection, region_clip_forward
from scan_model.model import LOGIT_SCALE, ScanModel
from scan_model.text import encode_tokens
from scan_model.regions import crop_regions, mask_boxes


class ImageEncoderPiece(nn.Module):
    """Swin + pixel decoder, and the original CLIP with its frequency-filtered context."""

    input_names = ("image", "clip_image")
    output_names = ("mask_features", "features_0", "features_1", "features_2", "clip_context", "global_cls", "shift_tokens")

    def __init__(self, model: ScanModel):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, clip_image: Tensor) -> tuple[Tensor, ...]:
        pixel, global_clip, context = self.model.encode_normalised(image, clip_image)
        return (pixel.mask_features, *pixel.multi_scale_features, context, global_clip.final_cls, global_clip.layer_cls)


class MaskDecoderPiece(nn.Module):
    """Masked-attention decoder, SCAN calibration and the in-vocabulary logits."""

    input_names = ("mask_features", "features_0", "features_1", "features_2", "clip_context", "global_cls", "text_classifier")
    output_names = ("class_logits", "mask_logits")

    def __init__(self, model: ScanModel):
        super().__init__()
        self.model = model

    def forward(self, mask_features, features_0, features_1, features_2, clip_context, global_cls, text_classifier):
        model = self.model
        out = model.mask_decoder([features_0, features_1, features_2], mask_features)
        refined = model.calibration.calibrate(out.query_embeddings, clip_context, global_cls)
        logits = LOGIT_SCALE * F.normalize(refined, dim=-1) @ text_classifier.t()
        return logits, out.mask_logits


class ClipAdapterPiece(nn.Module):
    """Boxes, exact bicubic crops and the finetuned CLIP with the contextual shift.

    Takes the N masks the runtime sends (typically only those with a non-empty thresholded mask:
    its cost grows with N, not with the number of queries). `valid` flags empty masks, whose
    logits must be ignored. The contextual shift is set per call: `shift_counts[c]` background
    patches out of c are replaced (the replace ratio, tabulated by `runtime.settings.shift_counts`),
    chosen by rank in `shift_keys` (one fixed permutation repeated for the deterministic rule, a
    fresh permutation per layer and region for the official random rule).
    """

    input_names = ("image", "mask_probs", "mask_threshold", "shift_tokens", "text_classifier", "shift_counts", "shift_keys")
    output_names = ("region_logits", "valid")

    def __init__(self, model: ScanModel):
        super().__init__()
        self.model = model

    def forward(self, image, mask_probs, mask_threshold, shift_tokens, text_classifier, shift_counts, shift_keys):
        model, cfg = self.model, self.model.cfg
        binary = mask_probs > mask_threshold
        boxes, valid = mask_boxes(binary)
        regions, region_masks = crop_regions(
            image, binary, boxes, model.clip_mean.flatten(), model.clip_std.flatten(),
            size=cfg.clip.vision["image_size"], fill=model.clip_fill.flatten(),
        )
        foreground = patch_foreground(region_masks, cfg.clip.vision["patch_size"])
        selection = ranked_shift_selection(~foreground, shift_counts, shift_keys)
        features = region_clip_forward(
            model.clip.visual, regions, foreground, shift_tokens, cfg.inference.replace_layers, 0.0, selection=selection,
        )
        return LOGIT_SCALE * F.normalize(features, dim=-1) @ text_classifier.t(), valid


class TextEncoderPiece(nn.Module):
    """CLIP text tower: token ids -> projected EOT features (normalisation and template mean in the runtime)."""

    input_names = ("tokens",)
    output_names = ("text_features",)

    def __init__(self, model: ScanModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return encode_tokens(self.model.clip, tokens)  # (M, L) with L dynamic: the runtime cuts to the longest prompt


PIECES = {
    "image_encoder": ImageEncoderPiece,
    "mask_decoder": MaskDecoderPiece,
    "clip_adapter": ClipAdapterPiece,
    "text_encoder": TextEncoderPiece,
}


@torch.no_grad()
def example_inputs(model: ScanModel, piece: str, height: int, width: int, classes: int, masks: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs of `piece` for an image of height x width (multiples of 32), K classes and N masks.

    Derived from a real forward of the eager model on a random image, so that, e.g., the mask
    probabilities fed to the CLIP adapter have the structure real ones have.
    """
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, height, width, generator=gen) * 255
    swin, clip_padded = model.normalise_and_pad(image)
    clip_image = model.clip_input(clip_padded)
    if piece == "image_encoder":
        return swin, clip_image
    pixel, global_clip, context = model.encode_normalised(swin, clip_image)
    embed = model.cfg.clip.embed_dim
    text = F.normalize(torch.randn(classes + 1, embed, generator=gen), dim=-1)
    if piece == "mask_decoder":
        return (pixel.mask_features, *pixel.multi_scale_features, context, global_clip.final_cls, text)
    if piece == "clip_adapter":
        out = model.mask_decoder(pixel.multi_scale_features, pixel.mask_features)
        logits = F.interpolate(out.mask_logits, size=(height, width), mode="bilinear", align_corners=False)[0]
        probs = logits.sigmoid()[:masks]
        threshold = torch.tensor(model.cfg.inference.mask_threshold)
        # A non-zero ratio and per-layer, per-region keys exercise the shift whatever the config says.
        patches = model.cfg.clip.grid_size ** 2
        counts = torch.tensor(shift_counts(patches, 0.15), dtype=torch.int64)
        rng = np.random.default_rng(seed)
        keys = torch.from_numpy(random_shift_keys(len(model.cfg.inference.replace_layers), probs.shape[0], patches, rng))
        return image[0], probs, threshold, global_clip.layer_cls[0], text, counts, keys
    if piece == "text_encoder":
        # Prompts of 2..19 tokens after SOT, cut to the longest (as the runtime's length batches are).
        context = model.cfg.clip.text["context_length"]
        tokens = torch.randint(1, 49406, (masks, context), generator=gen)
        tokens[:, 0] = 49406
        ends = torch.randint(2, 20, (masks,), generator=gen)
        tokens[torch.arange(masks), ends] = 49407
        tokens[torch.arange(context)[None] > ends[:, None]] = 0
        return (tokens[:, : int(ends.max()) + 1].contiguous(),)
    raise ValueError(f"unknown piece {piece!r}; pieces: {', '.join(PIECES)}")
