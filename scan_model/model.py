"""SCAN assembled from its parts (SPEC §1, data flow in DESIGN.md).

The forward pass is split the way deployment splits it: `encode_image` (Swin, pixel
decoder, original CLIP), `decode` (masked decoder, calibration, in-vocabulary logits),
`classify_regions` (crops through the finetuned CLIP with the contextual shift) and
`semantic_inference` (ensemble and semantic map). `forward` chains them for one image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.settings import InferenceSettings

from .calibration import SemanticCalibration
from .clip_towers import GlobalClipOutput, build_clip, build_visual, global_clip_forward, patch_foreground, region_clip_forward
from .config import ScanConfig
from .ensemble import ensemble_class_scores, semantic_map, upsample_masks
from .mask_decoder import MaskPrediction, OpenVocabMaskDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderOutput
from .regions import CLIP_MEAN_255, RegionBatch, clip_pixel_stats, prepare_regions
from .swin import SwinBackbone
from .text import VILD_TEMPLATES, encode_class_names

# Cosine logits are scaled by a constant 100; CLIP's logit_scale is not used (SPEC §1.8).
LOGIT_SCALE = 100.0


@dataclass
class ImageFeatures:
    """Everything the decoder and the region classifier need from one padded image batch."""

    pixel: PixelDecoderOutput
    global_clip: GlobalClipOutput
    clip_context: Tensor  # (B, 3*G*G, E) frequency-filtered CLIP tokens after the MLP
    padded_size: tuple[int, int]
    image_size: tuple[int, int]


@dataclass
class DecodedMasks:
    """Mask proposals and their in-vocabulary classification."""

    query_embeddings: Tensor  # (B, Q, E) calibrated, L2-normalised
    class_logits: Tensor  # (B, Q, K+1) 100 * cosine with the text classifier
    mask_logits: Tensor  # (B, Q, H/4, W/4) over the padded image
    raw_query_embeddings: Tensor  # (B, Q, E) decoder output before calibration
    aux: list[MaskPrediction] = field(default_factory=list)


@dataclass
class RegionClassification:
    clip_logits: Tensor  # (Q, K+1); rows of invalid queries are zero
    valid: Tensor  # (Q,) bool
    regions: RegionBatch
    image_features: Tensor  # (Nv, E) unnormalised region-CLIP features


@dataclass
class ScanOutput:
    sem_seg: Tensor  # (K, H, W) scores at the (resized) input size
    class_scores: Tensor  # (Q, K) ensembled per-query probabilities
    mask_probs: Tensor  # (Q, H, W)
    decoded: DecodedMasks
    regions: RegionClassification


class ScanModel(nn.Module):
    """The SCAN reference model. Build with a `ScanConfig` (see `presets.py`)."""

    def __init__(self, cfg: ScanConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = SwinBackbone(cfg.swin)
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder)
        self.mask_decoder = OpenVocabMaskDecoder(cfg.mask_decoder)
        self.calibration = SemanticCalibration(cfg.calibration)
        # Finetuned ("contextual-shifted") CLIP: its visual tower classifies regions, its
        # text tower (locked during finetuning) encodes the vocabulary.
        self.clip = build_clip(cfg.clip)
        # Frozen original CLIP vision tower: layer taps and CLS tokens of the whole image.
        self.original_clip = build_visual(cfg.clip)
        text_width = cfg.clip.text["width"]
        self.non_object_embedding = nn.Parameter(torch.randn(1, cfg.clip.embed_dim) * text_width**-0.5)
        inf = cfg.inference
        # The official code normalises with float32(mean) * 255 (its pixel_mean buffers) but
        # fills region backgrounds with 255 * mean computed in float64; both are kept so the
        # crops match bit for bit (the fill then normalises to ~1e-7, not exactly 0).
        clip_mean, clip_std = clip_pixel_stats()
        for name, values in (
            ("pixel_mean", torch.tensor(inf.pixel_mean, dtype=torch.float32)),
            ("pixel_std", torch.tensor(inf.pixel_std, dtype=torch.float32)),
            ("clip_mean", clip_mean),
            ("clip_std", clip_std),
            ("clip_fill", torch.tensor(CLIP_MEAN_255, dtype=torch.float32)),
        ):
            self.register_buffer(name, values.reshape(3, 1, 1), persistent=False)

    # -- text ---------------------------------------------------------------------------
    def templates(self) -> list[str]:
        if self.cfg.inference.templates != "vild":
            raise ValueError(f"unknown template set {self.cfg.inference.templates!r}; only 'vild' is implemented")
        return list(VILD_TEMPLATES)

    @torch.no_grad()
    def encode_text(self, names: list[str], batch_size: int = 256) -> Tensor:
        """(K, E) template-averaged, normalised class embeddings."""
        return encode_class_names(self.clip, names, self.templates(), batch_size=batch_size)

    def text_classifier(self, class_embeddings: Tensor) -> Tensor:
        """Append the normalised non-object embedding: (K, E) -> (K+1, E)."""
        non_object = F.normalize(self.non_object_embedding, dim=-1)
        return torch.cat([class_embeddings, non_object.to(class_embeddings.dtype)], dim=0)

    # -- image --------------------------------------------------------------------------
    def normalise_and_pad(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) float RGB in 0..255 -> Swin input and CLIP input, zero-padded to /32.

        Padding comes *after* normalisation, as detectron2's ImageList does (SPEC §1.2).
        """
        div = self.cfg.inference.size_divisibility
        height, width = image.shape[-2:]
        pad_h = (height + div - 1) // div * div - height
        pad_w = (width + div - 1) // div * div - width
        swin = F.pad((image - self.pixel_mean) / self.pixel_std, (0, pad_w, 0, pad_h))
        clip = F.pad((image - self.clip_mean) / self.clip_std, (0, pad_w, 0, pad_h))
        return swin, clip

    def clip_input(self, clip_padded: Tensor) -> Tensor:
        """Nearest-neighbour squash of the padded CLIP-normalised image (SPEC §1.3, B6)."""
        size = self.cfg.clip.vision["image_size"]
        return F.interpolate(clip_padded, size=(size, size), mode="nearest")

    def encode_image(self, image: Tensor) -> ImageFeatures:
        """(B, 3, H, W) float RGB 0..255 -> everything the decoders need from the image."""
        swin_input, clip_padded = self.normalise_and_pad(image)
        pixel, global_clip, context = self.encode_normalised(swin_input, self.clip_input(clip_padded))
        return ImageFeatures(
            pixel=pixel,
            global_clip=global_clip,
            clip_context=context,
            padded_size=(swin_input.shape[-2], swin_input.shape[-1]),
            image_size=(image.shape[-2], image.shape[-1]),
        )

    def encode_normalised(self, swin_input: Tensor, clip_image: Tensor) -> tuple[PixelDecoderOutput, GlobalClipOutput, Tensor]:
        """The image encoder proper, on already normalised inputs (the export boundary).

        swin_input: (B, 3, H, W) Swin-normalised, padded to /32; clip_image: (B, 3, S, S) CLIP input.
        """
        pixel = self.pixel_decoder(self.backbone(swin_input))
        global_clip = global_clip_forward(
            self.original_clip,
            clip_image,
            tap_layers=self.cfg.clip_tap_layers,
            cls_layers=self.cfg.inference.replace_layers,
        )
        return pixel, global_clip, self.calibration.clip_context(global_clip.layer_tokens)

    def decode(self, features: ImageFeatures, text_classifier: Tensor) -> DecodedMasks:
        out = self.mask_decoder(features.pixel.multi_scale_features, features.pixel.mask_features)
        refined = self.calibration.calibrate(out.query_embeddings, features.clip_context, features.global_clip.final_cls)
        embeddings = F.normalize(refined, dim=-1)
        logits = LOGIT_SCALE * embeddings @ text_classifier.t()
        return DecodedMasks(embeddings, logits, out.mask_logits, out.query_embeddings, out.aux)

    def predict_for_training(self, image: Tensor, text_classifier: Tensor) -> list[MaskPrediction]:
        """Class logits and mask logits of every decoder prediction, for the training losses (SPEC §3.2).

        image: (B, 3, H, W) float RGB 0..255, already padded by the data pipeline.
        text_classifier: (K+1, E), from `text_classifier` (so gradients reach the non-object
        embedding). Returns the final prediction first, then the decoder's earlier predictions
        (deep supervision); each has `query_embeddings` replaced by (B, Q, K+1) class logits.
        The same calibration refines every prediction, as the official training forward does.
        Both CLIP towers are frozen: the original CLIP runs without building a graph.
        """
        swin_input, clip_padded = self.normalise_and_pad(image)
        with torch.no_grad():
            global_clip = global_clip_forward(
                self.original_clip, self.clip_input(clip_padded),
                tap_layers=self.cfg.clip_tap_layers, cls_layers=self.cfg.inference.replace_layers,
            )
        context = self.calibration.clip_context(global_clip.layer_tokens)
        features = self.backbone(swin_input)
        # Under mixed precision the pixel decoder still runs in fp32, as the official one does.
        with torch.autocast(swin_input.device.type, enabled=False):
            pixel = self.pixel_decoder({name: f.float() for name, f in features.items()})
        out = self.mask_decoder(pixel.multi_scale_features, pixel.mask_features)
        sets = [MaskPrediction(out.query_embeddings, out.mask_logits), *out.aux]
        # Calibration treats every query on its own (cross-attention to the CLIP context, then
        # per-query layers), so all sets go through it as one batch of S*Q queries: the same
        # values as one call per set, in far fewer and larger matrix products.
        queries = torch.cat([pred.query_embeddings for pred in sets], dim=1)
        refined = self.calibration.calibrate(queries, context, global_clip.final_cls)
        logits = LOGIT_SCALE * F.normalize(refined, dim=-1) @ text_classifier.t()
        chunks = logits.split([pred.query_embeddings.shape[1] for pred in sets], dim=1)
        return [MaskPrediction(chunk, pred.mask_logits) for chunk, pred in zip(chunks, sets)]

    # -- region classifier -----------------------------------------------------------------
    def classify_regions(
        self, image: Tensor, mask_probs: Tensor, text_classifier: Tensor, shift_tokens: Tensor, rng=None,
        settings: InferenceSettings | None = None,
    ) -> RegionClassification:
        """Crop every non-empty mask, classify it with the finetuned CLIP (SPEC §1.11-§1.12).

        Args:
            image: (3, H, W) float 0..255, the resized unpadded image.
            mask_probs: (Q, H, W) sigmoid mask probabilities.
            text_classifier: (K+1, E).
            shift_tokens: (len(replace_layers), C) original-CLIP CLS tokens of the image.
            settings: threshold and contextual-shift settings of this call (default: the config's).
        """
        inf = self.cfg.inference
        settings = settings or inf.settings()
        batch = prepare_regions(
            image,
            mask_probs,
            settings.mask_threshold,
            self.clip_mean.flatten(),
            self.clip_std.flatten(),
            size=self.cfg.clip.vision["image_size"],
            chunk_size=_crop_chunk(mask_probs.shape[-2:], self.cfg.clip.vision["image_size"]),
            fill=self.clip_fill.flatten(),
        )
        patch = self.cfg.clip.vision["patch_size"]
        features = []
        # Crops go through the CLIP tower in bounded batches: peak memory does not grow
        # with the number of valid masks.
        for start in range(0, batch.regions.shape[0], inf.region_batch_size):
            stop = start + inf.region_batch_size
            foreground = patch_foreground(batch.region_masks[start:stop], patch)
            features.append(
                region_clip_forward(
                    self.clip.visual,
                    batch.regions[start:stop],
                    foreground,
                    shift_tokens,
                    inf.replace_layers,
                    settings.replace_ratio,
                    rule=settings.shift_rule,
                    rng=rng,
                    seed=settings.shift_seed,
                )
            )
        embed_dim = self.cfg.clip.embed_dim
        image_features = torch.cat(features) if features else mask_probs.new_zeros(0, embed_dim)
        logits = LOGIT_SCALE * F.normalize(image_features, dim=-1) @ text_classifier.t()
        full = logits.new_zeros(mask_probs.shape[0], text_classifier.shape[0])
        full[batch.valid] = logits
        return RegionClassification(full, batch.valid, batch, image_features)

    def semantic_inference(
        self, class_logits: Tensor, regions: RegionClassification, mask_probs: Tensor, settings: InferenceSettings | None = None
    ) -> tuple[Tensor, Tensor]:
        settings = settings or self.cfg.inference.settings()
        scores = ensemble_class_scores(
            class_logits, regions.clip_logits, regions.valid, settings.ensemble_weight, log_branch=settings.log_ensemble
        )
        return semantic_map(scores, mask_probs), scores

    def forward(
        self, image: Tensor, text_classifier: Tensor, rng=None, timings: dict | None = None,
        settings: InferenceSettings | None = None,
    ) -> ScanOutput:
        """One image: (1, 3, H, W) float RGB 0..255 (already resized) -> `ScanOutput`.

        Inference; gradients are tracked unless the caller disables them (the segmenters run
        it under `torch.no_grad`). Training uses `predict_for_training`.

        `rng` (a `random.Random`) drives the official contextual-shift rule; `timings`, when
        given, receives the wall time of each stage in seconds; `settings` are this call's
        threshold, ensemble and shift settings (default: the config's).
        """
        settings = settings or self.cfg.inference.settings()
        if image.shape[0] != 1:
            # The official region classifier takes batch 0's CLIP tokens for every region (B4).
            raise ValueError(f"ScanModel.forward takes one image at a time, got a batch of {image.shape[0]}")
        clock = _StageClock(timings)
        features = self.encode_image(image)
        clock.lap("image_encoder")
        decoded = self.decode(features, text_classifier)
        mask_logits = upsample_masks(decoded.mask_logits, features.padded_size, features.image_size)[0]
        mask_probs = mask_logits.sigmoid()
        clock.lap("mask_decoder")
        shift_tokens = features.global_clip.layer_cls[0]
        regions = self.classify_regions(image[0], mask_probs, text_classifier, shift_tokens, rng=rng, settings=settings)
        clock.lap("clip_adapter")
        sem_seg, scores = self.semantic_inference(decoded.class_logits[0], regions, mask_probs, settings)
        clock.lap("ensemble")
        return ScanOutput(sem_seg, scores, mask_probs, decoded, regions)


# Bytes of gather intermediates per crop chunk. The batched crop is memory-bound: chunks that
# stay in cache run ~2x faster than one large batch on CPU, and peak memory stays bounded.
_CROP_CHUNK_BYTES = 16 << 20


def _crop_chunk(image_size, crop_size: int) -> int:
    """Masks per crop chunk: the separable gather holds ~3 channels x 4 taps x size x long side floats."""
    per_region = 3 * 4 * crop_size * max(int(image_size[0]), int(image_size[1])) * 4
    return max(1, _CROP_CHUNK_BYTES // per_region)


class _StageClock:
    """Records wall time between laps into a dict (synchronising CUDA so times are real)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now
