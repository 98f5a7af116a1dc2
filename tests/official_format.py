"""Write checkpoints in the official (detectron2) format, as a new user would bring them.

`write_official_checkpoint` builds the model of the official `tiny` development config with
seeded random weights and saves it as `{"model": state_dict}` under the official key names
(the inverse of `scan_model/checkpoint.py: OFFICIAL_PREFIXES`), including the official
entries we ignore on load (`criterion.empty_weight`, `clip_adapter.pixel_mean/std`), so that
`scan export --checkpoint X.pth --config <official yaml>` reads it exactly like an official file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import OFFICIAL_DEV
from scan_model.checkpoint import OFFICIAL_PREFIXES, official_to_ours
from scan_model.loading import load_model

OFFICIAL_CONFIG = OFFICIAL_DEV / "config.yaml"
# The seed whose random weights make the mask decoder ill-conditioned at one of the bundle's parity
# shapes (384x256 K=17 N=12): masked-attention blocks sit at sigmoid 0.5, so float rounding flips
# them; ONNX Runtime differs from eager by 1.7e-3 / 1.4e-3 (class / mask logits) and eager moves by
# as much under 1e-7 input noise, so a fixed 1e-3 tolerance would refuse a sound export.
# Which seeds and shapes do this depends on the image-encoder features upstream, down to their
# float rounding: seed 8 did at 320x480 until the Swin attention moved to PyTorch's fused kernel
# (issue 12); a screen of eager's sensitivity (seeds 0-80 at 320x480, a few at the other shapes)
# then found seed 31 here (and seeds 3 and 20 close to 1e-3 at 384x256 and 256x384).
ILL_CONDITIONED_SEED = 31
# The official model's training-loss weights: NUM_CLASSES (171) + 1 entries, no-object weight 0.1.
NUM_CLASSES = 171
NO_OBJECT_WEIGHT = 0.1


def ours_to_official(key: str) -> str:
    """The official name of one of our state-dict keys (inverse of `official_to_ours`)."""
    for official, ours in OFFICIAL_PREFIXES:
        if ours.endswith("."):
            if key.startswith(ours):
                name = official + key[len(ours):]
                break
        elif key == ours:
            name = official
            break
    else:
        raise KeyError(f"{key!r} has no official name in OFFICIAL_PREFIXES")
    assert official_to_ours(name) == key, (key, name)
    return name


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under official names, plus the official entries the loader ignores."""
    state = {ours_to_official(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    empty_weight = torch.ones(NUM_CLASSES + 1)
    empty_weight[-1] = NO_OBJECT_WEIGHT
    state["criterion.empty_weight"] = empty_weight
    state["clip_adapter.pixel_mean"] = model.clip_mean.detach().reshape(1, 3, 1, 1).clone()
    state["clip_adapter.pixel_std"] = model.clip_std.detach().reshape(1, 3, 1, 1).clone()
    return state


def write_official_checkpoint(path: str | Path, seed: int, config: str | Path = OFFICIAL_CONFIG) -> Path:
    """Save the seeded random-weight model of `config` at `path` in the official `.pth` format."""
    path = Path(path)
    model = load_model(None, config, device="cpu", seed=seed).model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": official_state_dict(model)}, path)
    return path
