"""The bundle: manifest, files, text caches, atomic replacement and bad destinations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from export.bundle import MANIFEST, BundleError, check_destination, sha256_file, write_bundle
from export.onnx_export import ExportError, Shape
from runtime.manifest import SCHEMA_VERSION, TensorSpec, read_manifest
from runtime.vocab import VocabularyError, benchmark_vocabularies, parse_vocabulary
from scan_model.loading import load_model

SMALL = dict(example=Shape(64, 96, 3, 2), checks=(Shape(96, 64, 5, 3),), pieces=("text_encoder",))
# Filesystem behaviour (atomic replacement, interruption, permissions) needs no graph: a bundle
# of no pieces still goes through the temporary folder, the manifest, the tokenizer and the rename.
NO_PIECES = dict(pieces=())


class _InterruptedNames(list):
    """Class names whose reading raises Ctrl-C: an export interrupted while it writes text caches."""

    def __iter__(self):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def model():
    return load_model(None, "tiny", seed=0).model


def test_bundle_contents(model, tmp_path):
    out = tmp_path / "bundle"
    voc = benchmark_vocabularies()["voc20"]
    manifest = write_bundle(model, out, "abc", {"voc20": voc}, **SMALL)
    on_disk = read_manifest(out)
    assert on_disk == manifest and json.loads((out / MANIFEST).read_text()) == manifest.to_dict()
    assert on_disk.schema_version == SCHEMA_VERSION and on_disk.model.checkpoint_sha256 == "abc"
    piece = on_disk.pieces["text_encoder"]
    assert piece.sha256 == sha256_file(out / piece.file) and piece.bytes == (out / piece.file).stat().st_size
    assert piece.inputs[0] == TensorSpec("tokens", "int64", ["prompts", "sequence"])  # cut to the longest prompt
    assert len(piece.parity) == 2 and all(v <= 1e-3 for p in piece.parity for v in p.max_rel.values())
    cache = on_disk.text_caches["voc20"]
    assert cache.classes == len(voc) and cache.sha256 == sha256_file(out / cache.file)
    with np.load(out / cache.file) as data:
        assert list(data["names"]) == voc
        expected = model.encode_text(voc).numpy()
        assert np.abs(data["embeddings"] - expected).max() < 1e-6
    assert (out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert cache.file.startswith(f"text_cache/{piece.sha256[:16]}-vild-")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_bundle_is_reproducible(model, tmp_path):
    a = write_bundle(model, tmp_path / "a", None, {}, precision="fp16", **SMALL)
    b = write_bundle(model, tmp_path / "b", None, {}, precision="fp16", **SMALL)
    for name in (MANIFEST, "text_encoder.onnx", "text_encoder.fp16.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a == b


def test_failed_export_keeps_previous_bundle(model, tmp_path):
    out = tmp_path / "bundle"
    write_bundle(model, out, "first", {}, **NO_PIECES)
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(ExportError, match="differs from eager"):
        write_bundle(model, out, "second", {}, tolerance=-1.0, **SMALL)  # every parity check fails
    assert (out / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bad_destinations(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / MANIFEST).write_text("{}")
    with pytest.raises(BundleError, match="inside the existing bundle"):
        check_destination(bundle / "nested")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        check_destination(other)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(BundleError, match="is a file"):
        check_destination(afile / "bundle")


def test_unknown_vocabulary_preset():
    with pytest.raises(VocabularyError, match="unknown vocabulary preset"):
        parse_vocabulary("ade999")
    assert parse_vocabulary("ade150")[0] == "wall"


def test_cli_export_errors(tmp_path):
    runner = CliRunner()
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / MANIFEST).write_text("{}")
    for args, needle in (
        (["--preset", "tiny", "--out", str(bundle / "inner")], "inside the existing bundle"),
        (["--preset", "tiny", "--out", str(tmp_path / "x"), "--vocab", "pc4590"], "unknown vocabulary preset"),
        (["--out", str(tmp_path / "y")], "--preset"),
    ):
        result = runner.invoke(app, ["export", *args])
        assert result.exit_code == 2 and needle in result.stderr, result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bundle_folder_is_not_private(model, tmp_path):
    import os
    import stat

    out = tmp_path / "bundle"
    write_bundle(model, out, None, {}, **NO_PIECES)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_export_refuses_unwritable_folders_and_wrong_checkpoints(official_dev, tmp_path):
    import os

    import torch

    runner = CliRunner()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # As root every folder is writable; /proc refuses new folders for everyone.
    target = locked / "bundle" if not os.access(locked, os.W_OK) else __import__("pathlib").Path("/proc/scan-bundle")
    result = runner.invoke(app, ["export", "--preset", "tiny", "--out", str(target)])
    assert result.exit_code == 2 and ("permission denied" in result.stderr or "writable" in result.stderr), result.output
    state = dict(official_dev.state_dict)
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(50, 64)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--checkpoint", str(bad), "--config", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "query_feat" in result.stderr and "(50, 64)" in result.stderr, result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_interrupted_export_keeps_previous_bundle(model, tmp_path):
    """Ctrl-C while the new bundle is being written (here: in its text caches) leaves the old one."""
    out = tmp_path / "bundle"
    write_bundle(model, out, "first", {}, **NO_PIECES)
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_bundle(model, out, "second", {"custom": _InterruptedNames(["cat"])}, **NO_PIECES)
    assert (out / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
