"""The two CLIP vision towers of SCAN, built from open_clip, with a hand-written ViT forward.

SCAN holds two open_clip ViTs (SPEC.md §2.4):
- ``clip_adapter.clip_model``: a full open_clip ``CLIP`` whose visual tower is the finetuned
  region classifier ("contextual-shifted CLIP") and whose text tower encodes the prompts;
- ``clip_adapter.original_clip``: a standalone, frozen datacomp vision tower run on the whole image.

Both use exact ``nn.GELU`` (not QuickGELU, SPEC.md §4.5 / B5) and load the official weights with
``strict=True``. The ViT forward is written here from open_clip's submodules so that layer taps
(SPEC.md §1.3) and the contextual shift (SPEC.md §1.12) can happen between blocks. The shift has
two selection rules: ``"official"`` (per-region ``random.sample``, a reference mode with a Python
loop) and ``"deterministic"`` (a fixed-key ranking, batched and exportable, EXPORT_NOTES.md §3.7).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, VisionTransformer
from torch import Tensor, nn

from runtime.settings import SHIFT_RULES, shift_counts, shift_key

# Our own copy of the model configs (open_clip's model_configs/*.json for the official names, the
# fixture README for SCAN-tiny-16). open_clip's global registry is never mutated.
_MODEL_CONFIGS: dict[str, dict] = {
    "ViT-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
    "SCAN-tiny-16": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "layers": 6, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

# The datacomp_xl_s13b_b90k checkpoints SCAN starts from (SPEC.md §1.1), for error messages: the
# user downloads one of these files and passes its local path to `load_open_clip_weights`.
PRETRAINED_FILES: dict[str, str] = {
    "ViT-B-16": "hf://laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K/open_clip_pytorch_model.bin "
    "(or open_clip_model.safetensors)",
    "ViT-L-14": "hf://laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K/open_clip_pytorch_model.bin "
    "(or open_clip_model.safetensors)",
}



@dataclass
class ClipConfig:
    """An open_clip CLIP config: ``vision`` / ``text`` are open_clip's vision_cfg / text_cfg dicts."""

    model_name: str = "ViT-B-16"
    embed_dim: int = 512
    vision: dict = field(default_factory=lambda: copy.deepcopy(_MODEL_CONFIGS["ViT-B-16"]["vision_cfg"]))
    text: dict = field(default_factory=lambda: copy.deepcopy(_MODEL_CONFIGS["ViT-B-16"]["text_cfg"]))

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]

    @property
    def patch_size(self) -> int:
        return self.vision["patch_size"]

    @property
    def grid_size(self) -> int:
        """Side of the patch-token grid (SCAN's MODEL.PATCH_SIZE, SPEC.md §1.1)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def width(self) -> int:
        """Vision width (SCAN's CLIP_VISION_DIM)."""
        return self.vision["width"]

    @property
    def layers(self) -> int:
        return self.vision["layers"]

    @property
    def heads(self) -> int:
        return self.width // self.vision.get("head_width", 64)

    @property
    def mlp_ratio(self) -> float:
        return self.vision.get("mlp_ratio", 4.0)

    @property
    def text_width(self) -> int:
        return self.text["width"]


def clip_config(name: str) -> ClipConfig:
    """The config of a known CLIP model; ``"ViT-L/14"`` style names are accepted."""
    key = name.replace("/", "-")
    if key not in _MODEL_CONFIGS:
        raise ValueError(f"unknown CLIP model name {name!r}; known names: {', '.join(_MODEL_CONFIGS)}")
    cfg = copy.deepcopy(_MODEL_CONFIGS[key])
    return ClipConfig(model_name=key, embed_dim=cfg["embed_dim"], vision=cfg["vision_cfg"], text=cfg["text_cfg"])


def build_clip(cfg: ClipConfig) -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` (both towers, nn.GELU), in eval mode.

    Its state dict has exactly the keys of the official ``clip_adapter.clip_model.*`` (no logit_bias,
    the text ``attn_mask`` is a non-persistent buffer).
    """
    model = open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.CLIPVisionCfg(**cfg.vision),
        text_cfg=open_clip.CLIPTextCfg(**cfg.text),
        quick_gelu=False,  # SPEC.md §4.5: SCAN evaluates with exact GELU
    )
    return model.eval()


def build_visual(cfg: ClipConfig) -> VisionTransformer:
    """A standalone open_clip vision tower (the frozen ``original_clip``), random init, eval mode."""
    visual = VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.embed_dim,
        act_layer=nn.GELU,
        norm_layer=LayerNorm,
    )
    return visual.eval()


ACTIVATIONS = ("gelu", "quick_gelu")


def set_activation(module: nn.Module, activation: str) -> nn.Module:
    """Put ``activation`` into every transformer MLP of ``module`` (in place; returns it).

    SPEC.md §4.5: the official finetuning runs with QuickGELU (``x * sigmoid(1.702 x)``, open_clip's
    ``--force-quick-gelu``) while SCAN evaluates the same weights with exact GELU. Activations
    hold no parameters, so the state dict is the same either way.
    """
    from open_clip.transformer import QuickGELU

    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    make = QuickGELU if activation == "quick_gelu" else nn.GELU
    for block in module.modules():
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = make()
    return module


def load_open_clip_weights(path: str | Path) -> dict[str, Tensor]:
    """Read a LOCAL open_clip checkpoint (.safetensors, or .pt/.bin via ``torch.load(weights_only=True)``).

    A top-level ``'state_dict'`` entry and a DDP ``'module.'`` key prefix are unwrapped. Nothing is
    downloaded; see ``PRETRAINED_FILES`` for the files SCAN starts from.
    """
    path = Path(path)
    if not path.is_file():
        known = "; ".join(f"{k}: {v}" for k, v in PRETRAINED_FILES.items())
        raise FileNotFoundError(
            f"open_clip checkpoint {str(path)!r} not found (nothing is downloaded); expected e.g. {known}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# ViT forward, written from open_clip's submodules so that we can act between blocks.


def _embed(visual: VisionTransformer, image: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 1 + G*G, C) tokens after ln_pre (layer index 0), batch-first."""
    x = visual.conv1(image)  # (B, C, G, G)
    x = x.flatten(2).transpose(1, 2)  # (B, G*G, C), row-major patches
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def _block(visual: VisionTransformer, index: int, x: Tensor) -> Tensor:
    """Block ``index`` (0-based) on batch-first tokens, whatever layout the open_clip Transformer uses."""
    block = visual.transformer.resblocks[index]
    if getattr(visual.transformer, "batch_first", True):
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _cls_block(visual: VisionTransformer, index: int, x: Tensor) -> Tensor:
    """Block ``index`` for the CLS token alone: (B, T, C) -> (B, 1, C).

    The same value as ``_block(...)[:, :1]``: the CLS query still attends to every token, and
    everything else in a block is per token. The patch outputs of a tower's last block are
    never read (the head takes the CLS token), so skipping them saves about 10/12 of that
    block's matrix products, some 7% of a 12-block tower, on every backend.
    """
    block = visual.transformer.resblocks[index]
    sequence_first = not getattr(visual.transformer, "batch_first", True)
    normed = block.ln_1(x)
    query = normed[:, :1]
    if sequence_first:
        query, normed = query.transpose(0, 1), normed.transpose(0, 1)
    attended = block.attention(q_x=query, k_x=normed, v_x=normed)
    if sequence_first:
        attended = attended.transpose(0, 1)
    cls = x[:, :1] + block.ls_1(attended)
    return cls + block.ls_2(block.mlp(block.ln_2(cls)))


def _head(visual: VisionTransformer, x: Tensor) -> Tensor:
    """ln_post(CLS) @ proj, not normalised. ln_post is per token, so pooling first is the same value."""
    return visual.ln_post(x[:, 0]) @ visual.proj


def _check_layers(name: str, layers: Sequence[int], lo: int, hi: int) -> None:
    bad = [k for k in layers if not lo <= k <= hi]
    if bad:
        raise ValueError(f"{name} {bad} outside {lo}..{hi} (layer k = output of block k, 0 = after ln_pre)")


@dataclass
class GlobalClipOutput:
    """What the original-CLIP branch gives to SCAN (SPEC.md §1.3), batch-first.

    layer_tokens: per requested tap layer, (B, G*G, C) patch tokens (CLS excluded), raw residual stream.
    layer_cls: (B, n_cls_layers, C) CLS token after each requested block (the contextual-shift sources).
    final_cls: (B, E) ln_post(CLS) @ proj, NOT normalised.
    """

    layer_tokens: list[Tensor]
    layer_cls: Tensor
    final_cls: Tensor


def global_clip_forward(
    visual: VisionTransformer, image: Tensor, tap_layers: Sequence[int], cls_layers: Sequence[int]
) -> GlobalClipOutput:
    """Run the original CLIP on the whole image and collect taps.

    Args:
        visual: an open_clip VisionTransformer (``build_visual``).
        image: (B, 3, S, S) CLIP-normalised image (S = image_size, 224).
        tap_layers: layers whose patch tokens are returned; k = output of block k (1-based), 0 = after ln_pre.
        cls_layers: layers whose CLS token is returned, same indexing; ``layer_cls[:, i]`` is
            layer ``cls_layers[i]``.
    """
    depth = len(visual.transformer.resblocks)
    _check_layers("tap_layers", tap_layers, 0, depth)
    _check_layers("cls_layers", cls_layers, 0, depth)
    wanted = set(tap_layers) | set(cls_layers)
    x = _embed(visual, image)
    states = {0: x} if 0 in wanted else {}
    for i in range(depth):
        x = _block(visual, i, x)
        if i + 1 in wanted:
            states[i + 1] = x
    tokens = [states[k][:, 1:] for k in tap_layers]
    if len(cls_layers) > 0:
        cls = torch.stack([states[k][:, 0] for k in cls_layers], dim=1)
    else:
        cls = x.new_zeros((x.shape[0], 0, x.shape[2]))
    return GlobalClipOutput(layer_tokens=tokens, layer_cls=cls, final_cls=_head(visual, x))


# --------------------------------------------------------------------------------------------
# Contextual shift (SPEC.md §1.12)


def patch_foreground(region_masks: Tensor, patch_size: int) -> Tensor:
    """(N, 1, S, S) binary float masks -> (N, G*G) bool, a patch is foreground if ANY pixel is.

    The official ``ceil(AvgPool2d(patch)(m.half()))`` (SPEC.md §1.12 step 2, B8) is, for masks in
    {0, 1}, the same as a max pool, which exports as MaxPool and needs no fp16 (EXPORT_NOTES.md §3.6).
    """
    pooled = F.max_pool2d(region_masks, kernel_size=patch_size, stride=patch_size)
    return pooled.flatten(1) > 0


def contextual_shift_key(num_patches: int, seed: int = 0) -> Tensor:
    """The fixed selection key of the deterministic rule: a permutation of the patches, int64 (P,).

    The same numbers as the runtime's (`runtime.settings.shift_key`, numpy), so the eager model
    and a deployed bundle replace the same patches. Pass it to ``region_clip_forward(shift_key=...)``
    when exporting (keep it as a buffer or an input).
    """
    return torch.from_numpy(shift_key(num_patches, seed))


def _count_floor_table(num_patches: int, ratio: float) -> Tensor:
    """int64 (P+1,): entry c = int(ratio * c), Python's float64 floor, exactly as the official code.

    A float32 ``floor(ratio * count)`` in the graph differs for some ratios (e.g. 0.29 * 100), so the
    official counts are tabulated from Python floats (`runtime.settings.shift_counts`); exported
    graphs take the table as an input, so the ratio is a per-call setting.
    """
    return torch.tensor(shift_counts(num_patches, ratio), dtype=torch.int64)


def ranked_shift_selection(background: Tensor, counts: Tensor, keys: Tensor) -> Tensor:
    """The background patches whose key ranks below ``counts[n_background]`` among the region's.

    Exactly that many per region, never a foreground patch; batched, no TopK / NonZero / loops.
    With one key (P,) for every region this is the deterministic rule; with a fresh random
    permutation per layer and region, (R, N, P), it draws uniform random subsets of the official
    rule's size, as ``random.sample`` does (EXPORT_NOTES.md §3.7).

    Args:
        background: (N, P) bool, True for background patches.
        counts: (P+1,) int64, ``counts[c]`` patches to replace out of c background ones.
        keys: (P,) or (R, N, P) int64 permutations of 0..P-1.
    Returns:
        (N, P) bool for a (P,) key, else (R, N, P) bool.
    """
    bg = background.to(torch.float32)
    # earlier[..., q, p] = 1 if patch q comes before patch p in key order; rank = number of the
    # region's background patches that come before p (exact in float32 for P < 2**24).
    earlier = (keys[..., :, None] < keys[..., None, :]).to(torch.float32)
    if keys.dim() == 1:
        rank = bg @ earlier
    else:
        rank = (bg[:, None, :] @ earlier).squeeze(-2)
    k = counts.to(background.device)[background.to(torch.int64).sum(dim=1)].to(torch.float32)  # (N,)
    return background & (rank < k[:, None])


def deterministic_shift_selection(background: Tensor, ratio: float, shift_key: Tensor) -> Tensor:
    """Which background patches the deterministic rule overwrites: (N, P) bool (see `ranked_shift_selection`)."""
    table = _count_floor_table(background.shape[1], ratio).to(background.device)
    return ranked_shift_selection(background, table, shift_key.to(background.device))


def official_shift_selection(background: Tensor, ratio: float, rng: random.Random) -> Tensor:
    """The official selection: per region ``rng.sample(background indices, int(ratio * count))``.

    Reference mode only (a Python loop over regions with data-dependent indices, SPEC.md §7 item 18).
    The candidate list is in ascending patch order, as ``torch.nonzero`` gives it.
    """
    selection = torch.zeros(background.shape, dtype=torch.bool)
    for j, row in enumerate(background.cpu()):
        candidates = torch.nonzero(row).flatten().tolist()
        chosen = rng.sample(candidates, int(ratio * len(candidates)))
        selection[j, chosen] = True
    return selection.to(background.device)


def region_clip_forward(
    visual: VisionTransformer,
    regions: Tensor,
    foreground: Tensor,
    shift_tokens: Tensor,
    replace_layers: Sequence[int],
    replace_ratio: float,
    rule: str = "deterministic",
    rng: random.Random | None = None,
    seed: int = 0,
    shift_key: Tensor | None = None,
    selection: Tensor | None = None,
) -> Tensor:
    """The region classifier: the finetuned CLIP with the contextual shift (SPEC.md §1.11 step 8, §1.12).

    After block d (1-based) for d in ``replace_layers``, a ``replace_ratio`` fraction (floored) of each
    region's background patch tokens is overwritten by ``shift_tokens`` of that layer. The CLS token
    and foreground patches are never touched; nothing is masked in attention.

    Args:
        visual: the region tower (``build_clip(cfg).visual``).
        regions: (N, 3, S, S) CLIP-normalised region crops.
        foreground: (N, G*G) bool (``patch_foreground``).
        shift_tokens: (len(replace_layers), C): the ORIGINAL CLIP's CLS token after block d, batch
            index 0, for each d in ``replace_layers`` (SPEC.md B4: one image per batch); or
            (len(replace_layers), N, C), a token per region: the finetuning form of SPEC.md §4.2,
            where each region gets the CLS tokens of its own full image.
        replace_layers: blocks after which the shift happens.
        replace_ratio: fraction of background tokens replaced.
        rule: ``"deterministic"`` (fixed key ranking, the same selection at every layer) or
            ``"official"`` (``rng.sample`` per region, drawn afresh at every listed layer).
        rng: Python RNG of the official rule; ``random.Random(seed)`` when None (never the global one).
        seed: seed of the deterministic key (when ``shift_key`` is None) or of the default ``rng``.
        shift_key: (G*G,) precomputed ``contextual_shift_key``.
        selection: (len(replace_layers), N, G*G) bool, the patches to overwrite at each listed layer,
            computed by the caller (the exported graph: ``ranked_shift_selection`` of its inputs);
            overrides ``rule``, ``replace_ratio`` and ``shift_key``.
    Returns:
        (N, E) region features, not normalised.
    """
    if rule not in SHIFT_RULES:
        raise ValueError(f"unknown contextual-shift rule {rule!r}; known: {', '.join(SHIFT_RULES)}")
    depth = len(visual.transformer.resblocks)
    _check_layers("replace_layers", replace_layers, 1, depth)
    if shift_tokens.shape[0] != len(replace_layers):
        raise ValueError(f"shift_tokens has {shift_tokens.shape[0]} rows for {len(replace_layers)} replace_layers")

    shift_at = {d: i for i, d in enumerate(replace_layers)}
    background = ~foreground
    fixed = None
    if selection is None and replace_ratio > 0 and rule == "deterministic":
        if shift_key is None:
            if torch.compiler.is_exporting():
                raise ValueError("pass shift_key=contextual_shift_key(G*G, seed) or a selection when exporting")
            shift_key = contextual_shift_key(foreground.shape[1], seed)
        fixed = deterministic_shift_selection(background, replace_ratio, shift_key)[..., None]
    if rule == "official" and rng is None:
        rng = random.Random(seed)
    shifting = selection is not None or replace_ratio > 0

    x = _embed(visual, regions)
    for i in range(depth - 1):
        x = _block(visual, i, x)
        d = i + 1
        if shifting and d in shift_at:
            if selection is not None:
                chosen = selection[shift_at[d]][..., None]
            elif rule == "official":
                chosen = official_shift_selection(background, replace_ratio, rng)[..., None]
            else:
                chosen = fixed
            token = shift_tokens[shift_at[d]].to(x.dtype)
            if token.dim() == 2:  # one token per region
                token = token[:, None, :]
            patches = torch.where(chosen, token, x[:, 1:])
            x = torch.cat([x[:, :1], patches], dim=1)
    # Only the last block's CLS token is read. A shift after that block changes nothing, but
    # the official rule still draws its sample there so that its RNG stream stays the official one.
    if shifting and depth in shift_at and selection is None and rule == "official":
        official_shift_selection(background, replace_ratio, rng)
    return _head(visual, _cls_block(visual, depth - 1, x))
