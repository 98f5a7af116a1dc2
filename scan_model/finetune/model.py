"""The contextual-shifted CLIP in its finetuning form (SPEC §4.2), built from a SCAN model's towers.

`clip_model` is the whole open_clip CLIP whose visual tower is trained on masked region crops;
`original_clip_visual` is the frozen tower that runs on each region's full image and gives,
after every listed block, the CLS token that replaces a random share of the region's
background tokens. The attribute names are those of the official training checkpoint
(`module.clip_model.*`, `module.original_clip_visual.*`), so our files read like its files.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..clip_towers import (
    ClipConfig,
    _count_floor_table,
    contextual_shift_key,
    global_clip_forward,
    patch_foreground,
    ranked_shift_selection,
    region_clip_forward,
    set_activation,
)
from .config import ShiftConfig

# Everything of the text tower: what `--lock-text` freezes (logit_scale stays trainable).
TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")


class ContextualShiftClip(nn.Module):
    def __init__(self, clip_model: nn.Module, original_visual: nn.Module, clip_cfg: ClipConfig,
                 shift: ShiftConfig, activation: str = "gelu"):
        super().__init__()
        self.clip_model = set_activation(clip_model, activation)
        self.original_clip_visual = set_activation(original_visual, activation).requires_grad_(False).eval()
        self.clip_cfg, self.shift = clip_cfg, shift
        # counts[c] = int(ratio * c): how many of c background patches are replaced (official floor).
        self.register_buffer("shift_counts", _count_floor_table(clip_cfg.num_patches, shift.replace_ratio),
                             persistent=False)

    @classmethod
    def from_scan_model(cls, model: nn.Module, shift: ShiftConfig, activation: str) -> "ContextualShiftClip":
        """Copies of a SCAN model's two CLIP towers (its other parts are not needed here)."""
        return cls(copy.deepcopy(model.clip), copy.deepcopy(model.original_clip), model.cfg.clip, shift, activation)

    def lock_text(self) -> None:
        for name in TEXT_PARTS:  # modules and bare parameters alike
            getattr(self.clip_model, name).requires_grad_(False)

    def train(self, mode: bool = True) -> "ContextualShiftClip":
        super().train(mode)
        self.original_clip_visual.eval()  # frozen, always in inference mode
        return self

    @torch.no_grad()
    def shift_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) full images -> (L, B, C): the original tower's CLS token after each listed block."""
        layers = self.shift.replace_layers
        cls = global_clip_forward(self.original_clip_visual, images, tap_layers=(), cls_layers=layers).layer_cls
        return cls.transpose(0, 1)

    def encode_regions(self, regions: Tensor, masks: Tensor, images: Tensor, shift_keys: Tensor | None = None,
                       key_seed: int = 0) -> Tensor:
        """Region features (N, E), not normalised; region j takes the CLS tokens of images[j].

        regions: (N, 3, S, S) CLIP-normalised crops; masks: (N, S, S) 0/1 foreground;
        images: (N, 3, S, S) each region's full image. shift_keys: (N, L, P) int64, one random
        permutation of the patches per region and listed layer: the patches replaced are the
        background ones ranked first, so the sets are uniform random draws of the official size,
        drawn by the data pipeline (reproducible for any process count). None: the fixed
        deterministic key of inference (`key_seed`), for evaluation.
        """
        foreground = patch_foreground(masks[:, None].to(regions.dtype), self.clip_cfg.patch_size)
        tokens = self.shift_tokens(images)
        layers, ratio = self.shift.replace_layers, self.shift.replace_ratio
        visual = self.clip_model.visual
        if shift_keys is None:
            key = contextual_shift_key(foreground.shape[1], key_seed).to(regions.device)
            return region_clip_forward(visual, regions, foreground, tokens, layers, ratio, shift_key=key)
        selection = ranked_shift_selection(~foreground, self.shift_counts, shift_keys.transpose(0, 1))
        return region_clip_forward(visual, regions, foreground, tokens, layers, ratio, selection=selection)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.clip_model.encode_text(tokens)

    def forward(self, regions: Tensor, masks: Tensor, images: Tensor, tokens: Tensor,
                shift_keys: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_regions(regions, masks, images, shift_keys), self.encode_text(tokens)

    def clip_state_dict(self) -> dict[str, Tensor]:
        """The file layout of the official training checkpoint, without DDP's `module.` prefix."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
