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
# The seed whose random weights make the mask decoder ill-conditioned at the bundle's export
# shape (320x480 K=10 N=8): masked-attention blocks sit at sigmoid 0.5, so float rounding
# flips them. Before the gate measured that conditioning, `scan export` refused this model
# ("mask_decoder: ONNX Runtime differs from eager beyond 0.001: 320x480 K=10 N=8 class_logits:
# 9.38e-03; ... mask_logits: 1.73e-02"); eager moves by the same 9.4e-3 / 1.7e-2 under 1e-7 noise.
# Found by a search over seeds 0-39 (eager flips blocks under noise somewhere for 3, 5, 8, 20, 31).
# Whether ORT lands beyond 1e-3 also depends on eager's own thread count (seed 3 at 384x256 and
# seed 20 at 256x384 do with one thread count and not the other); seed 8 does with 1 and 2 threads.
ILL_CONDITIONED_SEED = 8
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
