"""Writing segmentation outputs atomically (temporary sibling, then rename)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_write
from .visualize import label_image, overlay

__all__ = ["atomic_write", "write_outputs"]


def write_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray,
    label_map: np.ndarray,
    classes: list[str],
    sem_seg: np.ndarray | None = None,
) -> list[Path]:
    """`<stem>.png` (class indices), `<stem>_overlay.png` and, with scores, `<stem>.npz`."""
    written = []
    label_path = out_dir / f"{stem}.png"
    atomic_write(label_path, lambda tmp: label_image(label_map, len(classes)).save(tmp, format="PNG"))
    written.append(label_path)
    overlay_path = out_dir / f"{stem}_overlay.png"
    atomic_write(overlay_path, lambda tmp: overlay(image, label_map, classes).save(tmp, format="PNG"))
    written.append(overlay_path)
    if sem_seg is not None:
        npz_path = out_dir / f"{stem}.npz"

        def save_npz(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, sem_seg=sem_seg.astype(np.float32), classes=np.asarray(classes))

        atomic_write(npz_path, save_npz)
        written.append(npz_path)
    return written
