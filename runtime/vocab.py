"""Vocabularies: comma-separated names, a .txt/.json file of names, or a benchmark preset."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import ScanError


class VocabularyError(ScanError, ValueError):
    """A vocabulary that cannot be used; the message says how to fix it."""


@lru_cache(maxsize=1)
def benchmark_vocabularies() -> dict[str, list[str]]:
    """The six benchmark vocabularies (trainId order, names stripped as the official code does)."""
    text = resources.files("runtime").joinpath("data/vocabularies.json").read_text()
    return {name: list(names) for name, names in json.loads(text).items()}


def parse_vocabulary(spec: str | list[str]) -> list[str]:
    """Class names from a preset name, a file, a comma-separated string or a list.

    Names are stripped (as the official code strips `stuff_classes`). Empty vocabularies
    and duplicate names are refused: a duplicate would make two classes indistinguishable.
    """
    if isinstance(spec, (list, tuple)):
        names = [str(n) for n in spec]
        source = "vocabulary list"
    else:
        text = str(spec).strip()
        presets = benchmark_vocabularies()
        path = Path(text)
        if text in presets:
            names, source = presets[text], f"preset {text}"
        elif path.suffix.lower() in (".txt", ".json"):
            if not path.is_file():
                raise VocabularyError(f"vocabulary file not found: {path}")
            names, source = _read_names(path), str(path)
        elif _looks_like_preset(text):
            raise VocabularyError(
                f"unknown vocabulary preset {text!r}; known presets: {', '.join(presets)} "
                "(pass a file or comma-separated names otherwise)"
            )
        else:
            names, source = text.split(","), "--vocab"
    names = [n.strip() for n in names]
    if not any(names):
        raise VocabularyError(
            f"empty vocabulary from {source}: pass class names (comma-separated, a .txt/.json file) "
            f"or a preset ({', '.join(benchmark_vocabularies())})"
        )
    if "" in names:
        raise VocabularyError(f"empty class name at position {names.index('')} in {source}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise VocabularyError(
                f"duplicate class name {name!r} at positions {seen[name]} and {i} in {source}: each name must be unique"
            )
        seen[name] = i
    return names


def _looks_like_preset(text: str) -> bool:
    """A single token shaped like a benchmark preset name (ade150, pc59, ...) but not one of them."""
    return re.fullmatch(r"(ade|pc|voc|coco)\d+", text) is not None


def _read_names(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VocabularyError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise VocabularyError(f"{path} must hold a JSON list of class-name strings")
    return data
