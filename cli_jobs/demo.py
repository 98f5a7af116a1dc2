"""`scan demo`: the embedded default, a drawn scene segmented with seeded random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime.files import atomic_write
from runtime.synthetic import synthetic_scene

from .common import check_output_dir, require_torch, say
from .segment import SegmentOptions, run_segment

DEMO_VOCABULARY = ["sky", "grass", "house", "roof", "window", "sun", "ball", "tree"]


def run_demo(out: Path, preset: str, seed: int) -> list[Path]:
    """Draw a scene, segment it with a preset's seeded random weights, write the outputs."""
    require_torch("scan demo")
    check_output_dir(out / "input")
    image_path = out / "input" / "demo.png"
    image = synthetic_scene(seed=seed)
    atomic_write(image_path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    written = run_segment(
        SegmentOptions(images=[image_path], vocab=",".join(DEMO_VOCABULARY), out=out, config=preset, save_logits=True, seed=seed)
    )
    with np.load(written[-1]) as data:
        shape = data["sem_seg"].shape
    say(f"demo: wrote {', '.join(str(p) for p in [image_path, *written])} (sem_seg {shape})")
    return [image_path, *written]
