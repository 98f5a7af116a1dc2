"""Checks shared by the jobs: inputs are validated before anything is written."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from runtime.errors import ScanError
from runtime.images import ImageError, load_image


class OutputError(ScanError):
    """An output path that cannot be written; the message says why."""


def say(message: str) -> None:
    print(message, file=sys.stderr)


def require_torch(command: str) -> None:
    """A clear line instead of an ImportError when a command needs the PyTorch extras."""
    missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
    if missing:
        raise ScanError(
            f"{command} runs the PyTorch model, and {', '.join(missing)} is not installed: "
            "pip install 'scan-deploy[export]' (or run a bundle with --bundle, which needs no PyTorch)"
        )


def check_output_dir(out: Path) -> None:
    """Create `out` if needed and make sure we can write there, before any work starts."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")


def check_images(paths: list[Path], out: Path) -> None:
    """Every image decodes, no two share an output name, and no output would overwrite an input."""
    if not paths:
        raise ImageError("no images given")
    stems: dict[str, Path] = {}
    for path in paths:
        load_image(path)  # raises ImageError naming the file
        if path.stem in stems:
            raise ImageError(f"{stems[path.stem]} and {path} would write the same outputs ({path.stem}.png): rename one")
        stems[path.stem] = path
        for suffix in (".png", "_overlay.png", ".npz"):
            target = out / f"{path.stem}{suffix}"
            if target.exists() and target.resolve() == path.resolve():
                raise ImageError(f"output {target} would overwrite the input image {path}: choose another --out")
