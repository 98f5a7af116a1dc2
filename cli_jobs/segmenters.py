"""The segmenter a command runs: the torch-free runtime for --bundle, else the eager PyTorch model."""

from __future__ import annotations

from runtime.errors import ScanError

from .common import require_torch, say


def open_segmenter(bundle, checkpoint, config, backend: str | None, precision: str | None, threads, resize: bool, device: str,
                   seed: int, command: str):
    """The runtime's `Segmenter` for --bundle, else the eager model's; the model's name; a note for the user."""
    if bundle is not None:
        if checkpoint is not None or config is not None:
            raise ScanError("pass either --bundle, or --checkpoint/--config for the PyTorch model, not both")
        if device not in ("auto", "cpu"):
            raise ScanError("--device applies to the PyTorch model; with --bundle choose --backend (and ONNX Runtime providers)")
        from runtime.segmenter import Segmenter

        segmenter = Segmenter(bundle, backend=backend, precision=precision, threads=threads,
                              resize=resize, report=say)
        chosen = f"runtime: {segmenter.backend} {segmenter.precision} ({'; '.join(segmenter.notes)})" if segmenter.notes else None
        return segmenter, segmenter.manifest.model.name, chosen
    if backend is not None or precision is not None:
        raise ScanError("--backend and --precision apply to --bundle; the PyTorch model runs with --device")
    if checkpoint is None and config is None:
        raise ScanError("pass --bundle, or --checkpoint (with --config for an official SCAN.pth), or --config PRESET for random weights")
    require_torch(f"{command} --checkpoint/--config")
    from scan_model.loading import load_model
    from scan_model.segmenter import EagerSegmenter

    loaded = load_model(checkpoint, config, device=device, seed=seed)
    note = None
    if checkpoint is None:
        note = f"note: no checkpoint given, running {loaded.source}; the segmentation is not meaningful"
    return EagerSegmenter(loaded.model, resize=resize, seed=seed), loaded.cfg.name, note
