"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'640' -> (640, 640); '480x640' -> (480, 640); anything else is a one-line ScanError naming `flag`."""
    from runtime.errors import ScanError

    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ScanError(f"{flag} {text!r}: give S or HxW in pixels (e.g. 640 or 480x640)")
    return (values[0], values[-1])


def report(result: dict, path: Path | None) -> None:
    """Print a result as JSON and, when asked, write it to `path`."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
