"""Swin Transformer backbone in the Mask2Former "D2SwinTransformer" form (SCAN's image backbone).

Produces the four feature maps res2..res5 (strides 4/8/16/32) that the pixel decoder consumes.
Parameter and buffer names match the official state dict with the ``backbone.`` prefix removed
(SPEC.md §2.1), so official weights load with ``strict=True``.

Unlike the official code, every shape-dependent quantity (padding amounts, window counts, the
shifted-window mask) is computed with integer arithmetic on (symbolic) sizes and tensor
comparisons, so the module exports with dynamic H and W (EXPORT_NOTES.md §3.4, rows 4a-4c of §2).
Feature maps are kept channels-last (B, H, W, C) and windows as (B, nH, nW, ws*ws, C) instead of
flattened tokens and a window-folded batch; the arithmetic, and so the numbers, are the official ones.

Export note (torch 2.14): plain ``torch.export.export`` with dynamic H/W still adds layout guards
(e.g. "window count != 1", "pad != 0") from PyTorch's own contiguity/stride logic. Export under
``torch.fx.experimental._config.patch(backed_size_oblivious=True)``, as ``torch.onnx.export``
(dynamo) does internally, and declare H, W as multiples of 32 (``32 * Dim(...)``; the runtime pads
to /32 anyway): the graph then runs at every size of the declared range (tests/test_swin.py).
With free H, W the export fails: the solver cannot prove ``ws * ceil(H / ws) >= H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SwinConfig:
    """Swin hyper-parameters; defaults are Swin-B as used by SCAN (SPEC.md §1.7)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.3  # stochastic depth, training only, linear 0 -> rate over all blocks


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


def pad_amount(size, multiple: int):
    """How much to pad ``size`` on the far side to reach a multiple of ``multiple`` (int or SymInt)."""
    return (size + multiple - 1) // multiple * multiple - size


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, Hp, Wp, C) with Hp, Wp multiples of ws -> windows (B, Hp/ws, Wp/ws, ws*ws, C).

    Windows keep their (row, col) grid dims instead of being folded into the batch (B*nW) as in the
    official code: reshapes that merge two symbolic sizes make torch.export add "size != 1" guards
    (torch 2.14), which break the exported graph at sizes with a single window row or column. Here
    only static dims are merged, after an explicit contiguous copy.
    """
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.clone(memory_format=torch.contiguous_format).flatten(3, 4)


def window_reverse(windows: Tensor, ws: int) -> Tensor:
    """Inverse of window_partition: (B, nH, nW, ws*ws, C) -> (B, nH*ws, nW*ws, C)."""
    B, nH, nW, _, C = windows.shape
    x = windows.view(B, nH, nW, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.clone(memory_format=torch.contiguous_format).view(B, nH * ws, nW * ws, C)


def relative_position_index(ws: int) -> Tensor:
    """(ws^2, ws^2) int64 index into the ((2ws-1)^2, heads) relative position bias table."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, ws^2)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), >= 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(n_rows, n_cols, ws: int, shift: int, device: torch.device) -> Tensor:
    """Additive attention mask (n_rows, n_cols, ws^2, ws^2) for shifted windows on the padded grid.

    The official code paints 3x3 regions of the padded (Hp, Wp) grid with slice assignments (rows
    [0, Hp-ws), [Hp-ws, Hp-shift), [Hp-shift, Hp), columns alike) and partitions it into windows.
    Here each pixel's region id comes from two comparisons, computed directly in window layout
    (EXPORT_NOTES.md row 4c: no ScatterND, no size guards). Pairs from different regions get -100.
    """
    Hp, Wp = n_rows * ws, n_cols * ws
    ys = torch.arange(Hp, device=device).view(n_rows, ws)  # padded-grid row of (window row, offset)
    xs = torch.arange(Wp, device=device).view(n_cols, ws)
    region_y = (ys >= Hp - ws).long() + (ys >= Hp - shift).long()
    region_x = (xs >= Wp - ws).long() + (xs >= Wp - shift).long()
    region = (region_y[:, None, :, None] * 3 + region_x[None, :, None, :]).flatten(2)  # (n_rows, n_cols, N)
    differ = region[..., None, :] != region[..., :, None]
    return differ.float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent: the official state dict holds it (SPEC.md §2.1).
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, nH, nW, N, C) window tokens; mask: (nH, nW, N, N) additive, or None. Same shape out."""
        C = x.shape[-1]
        heads = self.num_heads
        # (B, nH, nW, N, 3, heads, hd) -> (3, B, nH, nW, heads, N, hd)
        qkv = self.qkv(x).unflatten(-1, (3, heads, C // heads)).permute(4, 0, 1, 2, 5, 3, 6)
        q, k, v = qkv.unbind(0)
        N = q.shape[-2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, heads).permute(2, 0, 1)
        bias = bias if mask is None else bias + mask[:, :, None]  # (heads, N, N) or (nH, nW, heads, N, N)
        if torch.compiler.is_exporting():
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, nH, nW, heads, N, N)
            x = attn @ v
        else:
            x = _fused_attention(q, k, v, bias, self.scale)
        return self.proj(x.transpose(-3, -2).flatten(-2))  # (B, nH, nW, N, C)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v for (..., heads, N, hd) windows with PyTorch's fused kernel.

    The fused CPU kernel wants 4-D inputs and a mask with the same batch: the window grid is
    folded into the batch here. That merge of two symbolic sizes is what torch.export guards
    against, so the exported graph keeps the explicit product above; the two agree to float
    rounding (~1e-7 relative). The fused kernel avoids materialising the (..., N, N) scores
    three times, which made the windowed attention most of the backbone's time on CPU.
    """
    lead, (heads, N, hd) = q.shape[:-3], q.shape[-3:]
    mask = bias.expand(*lead, heads, N, N).reshape(-1, heads, N, N)
    out = F.scaled_dot_product_attention(
        q.reshape(-1, heads, N, hd), k.reshape(-1, heads, N, hd), v.reshape(-1, heads, N, hd), attn_mask=mask, scale=scale
    )
    return out.view(*lead, heads, N, hd)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block on a channels-last (B, H, W, C) map."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path_rate: float):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, H, W, C); mask: (nH, nW, N, N) shift mask of the padded grid (unused if shift == 0).

        The map stays 4-D where the official code keeps (B, H*W, C) tokens: LayerNorm and Linear act
        on the last dim either way, and it keeps the symbolic sizes simple for export.
        """
        ws = self.window_size
        H, W = x.shape[1], x.shape[2]
        shortcut = x
        # Pad after norm1 (padded tokens are exact zeros, as in the official code), always, possibly
        # by 0: a Python conditional on the sizes would specialise an exported graph.
        x = F.pad(self.norm1(x), (0, 0, 0, pad_amount(W, ws), 0, pad_amount(H, ws)))
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), mask if self.shift > 0 else None)
        x = window_reverse(windows, ws)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + drop_path(x[:, :H, :W, :], self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchMerging(nn.Module):
    """2x downsampling: concat the 2x2 neighbours (4C), LayerNorm, Linear 4C -> 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded bottom/right."""
        H, W = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, pad_amount(W, 2), 0, pad_amount(H, 2)))
        # Sub-grid order (0,0), (1,0), (0,1), (1,1): row offset first (SPEC.md §1.7).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path_rates: list[float], downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift, mlp_ratio, qkv_bias,
                      drop_path_rates[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x: (B, H, W, C) -> (stage output (B, H, W, C), merged map (B, ceil(H/2), ceil(W/2), 2C) or None)."""
        ws = self.window_size
        H, W = x.shape[1], x.shape[2]
        # One mask per stage, rebuilt from the current size (official swin.py:448-475).
        mask = shifted_window_mask((H + ws - 1) // ws, (W + ws - 1) // ws, ws, self.shift, x.device)
        mask = mask.to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        merged = self.downsample(x) if self.downsample is not None else None
        return x, merged


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv + LayerNorm; the image is zero-padded right/bottom to the patch size."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C) channels-last map."""
        p = self.patch_size
        x = F.pad(x, (0, pad_amount(x.shape[3], p), 0, pad_amount(x.shape[2], p)))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinBackbone(nn.Module):
    """Swin Transformer returning res2..res5 (NCHW), each after its own output LayerNorm ``norm{i}``."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        n_stages = len(cfg.depths)
        dims = [cfg.embed_dim * 2**i for i in range(n_stages)]
        self.stage_names = [f"res{i + 2}" for i in range(n_stages)]
        self.out_channels = dict(zip(self.stage_names, dims))
        self.strides = {name: cfg.patch_size * 2**i for i, name in enumerate(self.stage_names)}

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        self.layers = nn.ModuleList()
        for i in range(n_stages):
            start = sum(cfg.depths[:i])
            self.layers.append(SwinStage(
                dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias,
                rates[start:start + cfg.depths[i]], downsample=i < n_stages - 1,
            ))
        for i in range(n_stages):
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Training init of the official code: trunc_normal(.02) for Linear weights and bias tables.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W) normalised image, any H, W -> {"res2": (B, C, ceil(H/4), ceil(W/4)), ...}.

        Each later map is ceil(previous / 2) on each side.
        """
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        outs = {}
        for i, (name, stage) in enumerate(zip(self.stage_names, self.layers)):
            out, merged = stage(x)
            outs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
            if merged is not None:
                x = merged
        return outs
