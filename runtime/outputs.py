"""Writing segmentation outputs atomically (temporary sibling, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .visualize import label_image, overlay


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` and rename onto `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
