"""Put a finetuned CLIP into a segmentation checkpoint: the official `tools/replace_clip.py` (SPEC §3.5).

The segmentation model is trained with the datacomp CLIP; the contextual-shifted CLIP is finetuned
separately (SPEC §4) and only then copied into `clip_adapter.clip_model` (our `model.clip`), visual
and text keys alike. The frozen `original_clip` is never touched. Unlike the official script, which
silently copies whatever keys happen to exist, every shape is checked before anything changes, and
the keys that were ignored or kept are reported, so a CLIP of the wrong architecture cannot slip in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import _READ_ERRORS, CheckpointError, _first_line, read_safetensors, save_checkpoint
from .model import TEXT_PARTS

# The finetuned model's prefix in finetuning checkpoints (official CS_CLIP.pt and ours, SPEC §4.3);
# their other prefix, `original_clip_visual.`, is the frozen tower and is dropped.
FINETUNED_PREFIX = "clip_model."
_SHOWN = 4  # keys named in an error or a report line


class FuseError(CheckpointError):
    """A finetuned CLIP that cannot be put into this segmentation model; the message says why."""


def _tower(key: str) -> str:
    if key.startswith("visual."):
        return "visual"
    return "text" if key.split(".")[0] in TEXT_PARTS else "other"


@dataclass
class FuseReport:
    replaced: list[str] = field(default_factory=list)  # model CLIP keys overwritten from the file
    changed: list[str] = field(default_factory=list)  # replaced keys whose values actually differed
    ignored: list[str] = field(default_factory=list)  # file keys the model's CLIP does not have
    kept: list[str] = field(default_factory=list)  # model CLIP keys the file does not have
    ensemble_weight: float | None = None  # the weight in the written config (None before saving)
    ensemble_weight_given: bool = False  # set by the caller rather than kept from the checkpoint

    def lines(self) -> list[str]:
        """A short human summary, one item per line."""
        towers = {"visual": 0, "text": 0}
        others = []
        for key in self.replaced:
            tower = _tower(key)
            if tower == "other":
                others.append(key)
            else:
                towers[tower] += 1
        parts = [f"visual {towers['visual']}", f"text {towers['text']}"]
        parts += others if len(others) <= 3 else [f"other {len(others)}"]
        lines = [f"replaced {len(self.replaced)} CLIP keys ({', '.join(parts)}), {len(self.changed)} changed; "
                 "original_clip untouched"]
        for label, keys in (("ignored (not in the model's CLIP)", self.ignored), ("kept (not in the file)", self.kept)):
            if keys:
                more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
                lines.append(f"{label}: {len(keys)} key(s): {', '.join(keys[:_SHOWN])}{more}")
        if self.ensemble_weight is not None:
            source = "set here" if self.ensemble_weight_given else "from the checkpoint's config"
            lines.append(f"ensemble weight {self.ensemble_weight:g} ({source})")
        return lines


# -- reading --------------------------------------------------------------------------------------
def read_finetuned_clip(path: str | Path) -> dict[str, Tensor]:
    """The open_clip CLIP state dict held by a finetuned-CLIP file.

    Accepts the official CS_CLIP.pt (`{"state_dict": {"module.clip_model.<k>": ...}, ...}`), our
    finetuning output (`clip_model.<k>` / `original_clip_visual.<k>` in a .safetensors file) and
    a plain open_clip checkpoint (bare CLIP keys). The frozen `original_clip_visual.*` copy is
    dropped: replace_clip only ever takes the finetuned model.
    """
    path = Path(path)
    if not path.is_file():
        raise FuseError(f"finetuned CLIP file not found: {path}")
    if path.suffix == ".safetensors":
        data = read_safetensors(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except _READ_ERRORS as exc:
            raise FuseError(f"cannot read {path} with torch.load(weights_only=True) (files holding pickled code are "
                            f"never loaded; pass a state-dict .pt or a .safetensors): {_first_line(exc)}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    seg_hint = " (it looks like a segmentation checkpoint: pass that as --checkpoint)"
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        hint = seg_hint if isinstance(data, dict) and isinstance(data.get("model"), dict) else ""
        raise FuseError(f"{path} holds no tensors: expected a CLIP state dict (optionally under 'state_dict'){hint}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in tensors.items()}
    if any(k.startswith(FINETUNED_PREFIX) for k in state):
        state = {k[len(FINETUNED_PREFIX):]: v for k, v in state.items() if k.startswith(FINETUNED_PREFIX)}
    if not any(k.startswith("visual.") for k in state):
        hint = seg_hint if any(k.startswith(("clip_adapter.", "clip.visual.")) for k in state) else ""
        raise FuseError(f"{path} is not a CLIP checkpoint: none of its {len(state)} keys starts with 'visual.'{hint}")
    return state


# -- fusing ---------------------------------------------------------------------------------------
def _architecture(state: dict[str, Tensor]) -> str:
    """'width W, L layers' of the visual tower of a CLIP state dict."""
    conv = state.get("visual.conv1.weight")
    width = conv.shape[0] if conv is not None else "?"
    blocks = {m.group(1) for k in state if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    return f"width {width}, {len(blocks)} layers"


def fuse_clip(model: torch.nn.Module, clip_state: dict[str, Tensor]) -> FuseReport:
    """Overwrite `model.clip` with every key of `clip_state` it has (SPEC §3.5); shapes are checked first.

    Keys of the file the model lacks are ignored, model keys the file lacks are kept, both reported;
    a file none of whose visual keys fit is refused, since it would change nothing that matters.
    """
    own = model.clip.state_dict()
    report = FuseReport()
    mismatched = []
    for key, value in clip_state.items():
        if key not in own:
            report.ignored.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(key)
        else:
            report.replaced.append(key)
    model_arch = f"{model.cfg.clip.model_name} with {_architecture(own)}"
    if mismatched:
        order = {k: i for i, k in enumerate(own)}  # the visual tower first, in the model's order
        mismatched.sort(key=lambda k: (_tower(k) != "visual", order[k]))
        mismatched = [f"{k} {tuple(clip_state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        more = f", ... ({len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""
        raise FuseError(
            f"the CLIP does not fit the segmentation model: {len(mismatched)} key(s) of another shape (file vs model): "
            f"{'; '.join(mismatched[:_SHOWN])}{more}. The CLIP file has visual {_architecture(clip_state)}; "
            f"the model's CLIP is {model_arch}: pass a CLIP finetuned from the model's own CLIP"
        )
    if not any(_tower(k) == "visual" for k in report.replaced):
        visual = [k for k in report.ignored if _tower(k) == "visual"]
        example = f", e.g. {visual[0]}" if visual else ""
        raise FuseError(f"none of the CLIP file's {len(visual)} visual keys exist in the model's CLIP ({model_arch})"
                        f"{example}: is this an open_clip CLIP?")
    report.kept = [k for k in own if k not in clip_state]
    merged = dict(own)
    for key in report.replaced:
        new = clip_state[key].to(own[key].dtype)
        if not torch.equal(new, own[key]):
            report.changed.append(key)
        merged[key] = new
    model.clip.load_state_dict(merged, strict=True)
    return report


def _check_out(out: Path, inputs: tuple[Path, ...]) -> None:
    if out.suffix != ".safetensors":
        raise FuseError(f"output {out} must be a .safetensors file (our format, a .json config is written beside it): "
                        f"use {out.with_suffix('.safetensors').name}")
    if out.is_dir():
        raise FuseError(f"output {out} is a folder: pass a file path ending in .safetensors")
    for path in inputs:
        if out.resolve() == path.resolve():
            raise FuseError(f"output {out} would overwrite the input {path}: choose another --out")


def fuse_checkpoint(
    checkpoint: str | Path,
    clip: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    ensemble_weight: float | None = None,
) -> FuseReport:
    """Load the segmentation model, fuse the finetuned CLIP, and save our format at `out`.

    Every check (paths, weight, CLIP file, shapes) runs before the one write, so a failure
    leaves nothing behind.
    """
    from ..loading import load_model

    checkpoint, clip, out = Path(checkpoint), Path(clip), Path(out)
    _check_out(out, (checkpoint, clip))
    if ensemble_weight is not None and not (math.isfinite(ensemble_weight) and 0.0 <= ensemble_weight <= 1.0):
        raise FuseError(f"ensemble weight must be in [0, 1], got {ensemble_weight} (the official value is 0.7)")
    clip_state = read_finetuned_clip(clip)
    loaded = load_model(checkpoint, config, device="cpu")
    report = fuse_clip(loaded.model, clip_state)
    if ensemble_weight is not None:
        loaded.cfg.inference.ensemble_weight = float(ensemble_weight)
    report.ensemble_weight = loaded.cfg.inference.ensemble_weight
    report.ensemble_weight_given = ensemble_weight is not None
    save_checkpoint(loaded.model, loaded.cfg, out)
    return report
