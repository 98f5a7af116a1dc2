"""`scan fuse`: put a finetuned CLIP into a segmentation checkpoint (the official replace_clip step, SPEC §3.5)."""

from __future__ import annotations

from pathlib import Path

from .common import require_torch, say


def run_fuse(checkpoint: Path, clip: Path, out: Path, config: str | None, ensemble_weight: float | None):
    """Fuse, then print the report; a zero ensemble weight gets a reminder, since it leaves the CLIP unused."""
    require_torch("scan fuse")
    from scan_model.finetune.fuse import fuse_checkpoint

    report = fuse_checkpoint(checkpoint, clip, out, config=config, ensemble_weight=ensemble_weight)
    for line in report.lines():
        say(f"fuse: {line}")
    if report.ensemble_weight == 0:
        say("fuse: the ensemble weight is 0, so the fused CLIP is not used at inference until --ensemble-weight "
            "(e.g. 0.7) is passed here or to scan eval / scan segment")
    say(f"fuse: wrote {out}")
    return report
