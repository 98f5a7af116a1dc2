"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W)."""
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def report(result: dict, path: Path | None) -> None:
    """Print a result as JSON and, when asked, write it to `path`."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
