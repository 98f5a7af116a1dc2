"""The model side of `scan bench`: bundles exported once into a cache, and the eager model of a bundle.

A preset or checkpoint is exported into `<user cache>/bundles/<name>-<key>/`, the key a hash of
everything the export depends on (config, weights, precision, scan-deploy version, manifest
schema, the int8 method), and reused while its manifest reads. For a user's `--bundle` the eager model is rebuilt
from the manifest's config and checked against the bundle (its recorded non-object embedding),
so eager and the runtime always run the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from runtime.errors import ScanError
from runtime.files import sha256_file, user_cache_root
from runtime.manifest import SCHEMA_VERSION, Manifest, read_manifest


def scan_deploy_version() -> str:
    try:
        return importlib.metadata.version("scan-deploy")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_key(config: dict, weights: str, precision: str) -> str:
    """16 hex digits naming one export: the same inputs always give the same key."""
    payload = {"config": config, "weights": weights, "precision": precision, "scan_deploy": scan_deploy_version(),
               "manifest_schema": SCHEMA_VERSION}
    if "int8" in precision.split(","):
        from export.int8 import DYNAMIC_METHOD, DYNAMIC_PIECES, METHOD

        # int8 pieces quantised another way are another export
        payload["int8_method"] = [METHOD, DYNAMIC_METHOD, list(DYNAMIC_PIECES)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def bundle_cache_folder(config: dict, weights: str, precision: str) -> Path:
    return user_cache_root() / "bundles" / f"{config['name']}-{export_key(config, weights, precision)}"


def _readable(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except ScanError:
        return False
    return True


def cached_bundle(config: dict, weights: str, precision: str, checkpoint_sha256: str | None, load_model, report) -> Path:
    """The cached export of this model at `precision`, exported now (under a file lock) if absent.

    `load_model()` gives the CPU model; it is called only when an export is needed.
    """
    folder = bundle_cache_folder(config, weights, precision)
    if _readable(folder):
        report(f"reusing the bundle exported earlier: {folder}")
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # two benches of one model export it once
        if not _readable(folder):
            from export.bundle import write_bundle

            report(f"exporting {config['name']} ({weights}, {precision}) once into {folder}")
            write_bundle(load_model(), folder, checkpoint_sha256, {}, precision=precision, report=report)
    return folder


def eager_model_for_bundle(bundle: Path, manifest: Manifest, checkpoint: Path | None, config: str | None,
                           seed: int, device: str):
    """The eager model with the bundle's weights: its checkpoint, or its config with seeded random weights.

    Refused with one line when the weights cannot be the bundle's (a checkpoint of another hash,
    another seed, a bundle of real weights without its checkpoint).
    """
    from scan_model.loading import load_model

    recorded = manifest.model.checkpoint_sha256
    if checkpoint is None and recorded is not None:
        raise ScanError(f"the eager backend needs the weights of bundle {bundle}: pass --checkpoint with the file it was "
                        f"exported from (sha256 {recorded[:12]}...), or drop eager from --backends")
    if checkpoint is not None:
        if recorded is None:
            raise ScanError(f"bundle {bundle} holds random weights, so --checkpoint does not apply: drop it (eager is "
                            "rebuilt from the bundle's config and --seed)")
        if sha256_file(checkpoint) != recorded:
            raise ScanError(f"--checkpoint {checkpoint} is not the checkpoint bundle {bundle} was exported from "
                            "(sha256 differs): pass that file")
    with tempfile.TemporaryDirectory() as tmp:
        spec = config
        if spec is None:  # the manifest's config, as one of our JSON configs
            spec = Path(tmp) / "config.json"
            spec.write_text(json.dumps(manifest.model.config))
        loaded = load_model(checkpoint, spec, device=device, seed=seed)
    _check_same_weights(loaded.model, manifest, bundle, seed if checkpoint is None else None)
    return loaded


def _check_same_weights(model, manifest: Manifest, bundle: Path, seed: int | None) -> None:
    import torch

    ours = torch.nn.functional.normalize(model.non_object_embedding.detach().float().cpu(), dim=-1)[0].numpy()
    theirs = np.asarray(manifest.non_object_embedding, dtype=np.float32)
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, atol=1e-6):
        fix = (f"pass the --seed it was exported with (random weights; --seed {seed} gives others)" if seed is not None
               else "pass the --config it was exported with")
        raise ScanError(f"the eager model rebuilt for bundle {bundle} has other weights than the bundle: {fix}, "
                        "or drop eager from --backends")
