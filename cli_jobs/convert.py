"""`scan convert`: an official SCAN.pth into our safetensors + JSON config."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ScanError

from .common import require_torch, say


def run_convert(checkpoint: Path, config: str, out: Path) -> Path:
    require_torch("scan convert")
    from scan_model.checkpoint import save_checkpoint
    from scan_model.loading import load_model

    if checkpoint.suffix == ".safetensors":
        raise ScanError(f"{checkpoint} is already in our format")
    loaded = load_model(checkpoint, config, device="cpu")
    path = save_checkpoint(loaded.model, loaded.cfg, out)
    report = loaded.report
    ignored = f"; ignored {', '.join(report.ignored)}" if report and report.ignored else ""
    say(f"converted {checkpoint} -> {path} (+ {path.with_suffix('.json').name}): all keys matched{ignored}")
    return path
