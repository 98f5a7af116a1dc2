"""runtime.text: class embeddings from bundle caches, the user cache and the ONNX text encoder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime import text as rt
from runtime.errors import ScanError
from runtime.files import sha256_file
from runtime.manifest import (
    FileRecord, InferenceDefaults, Manifest, ModelInfo, Piece, Preprocess, TensorSpec, TextCache, Tokenizer,
)
from runtime.text import TextCacheWarning, TextEmbedder
from runtime.vocab import benchmark_vocabularies

TESTS = Path(__file__).resolve().parent
ADE = benchmark_vocabularies()["ade150"]
VILD = [
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
]
T = len(VILD)


# -- helpers (also used by the child processes of the concurrency test) ---------------------------
def make_manifest(encoder_sha: str, dim: int, caches: dict[str, TextCache] | None = None) -> Manifest:
    """A hand-built manifest: only the fields the text side reads carry real values."""
    spec = lambda name, dtype, shape: TensorSpec(name, dtype, shape)  # noqa: E731
    piece = Piece("text_encoder.onnx", encoder_sha, 0, "fp32", 18, 0, [spec("tokens", "int64", ["prompts", 77])],
                  [spec("text_features", "float32", ["prompts", dim])], [], 1e-3)
    return Manifest(
        schema_version=2,
        model=ModelInfo("tiny", {}, None),
        preprocess=Preprocess([0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3, 224, 32, 640, 2560),
        inference=InferenceDefaults(0.4, 0.7, 0.15, [1], "ranked", 0, False, 100.0, 100, 196),
        non_object_embedding=[0.0] * dim,
        pieces={"text_encoder": piece},
        tokenizer=Tokenizer(FileRecord("tokenizer/bpe.txt.gz", "0" * 64, 0), 77, 49406, 49407),
        templates={"vild": list(VILD)},
        text_caches=caches or {},
    )


def clip_tokenize(texts: list[str]) -> np.ndarray:
    """The runtime's torch-free tokenizer on open_clip's BPE file; open_clip's own if it is not there."""
    tokenizer = getattr(clip_tokenize, "tokenizer", None)
    if tokenizer is None:
        try:
            from runtime.tokenizer import ClipTokenizer

            bpe = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
            tokenizer = ClipTokenizer.from_file(bpe)
        except ImportError:
            import open_clip

            simple = open_clip.SimpleTokenizer(context_length=77)
            tokenizer = lambda texts: simple(texts).numpy()  # noqa: E731
        clip_tokenize.tokenizer = tokenizer
    return tokenizer(texts)


class OrtEncoder:
    """The exported text_encoder piece run by ONNX Runtime; counts calls and prompts independently."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.calls = self.prompts = 0
        self.largest = 0

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and 2 <= tokens.shape[1] <= 77  # cut to the batch's longest prompt
        self.calls += 1
        self.prompts += len(tokens)
        self.largest = max(self.largest, len(tokens))
        return self.session.run(["text_features"], {"tokens": tokens})[0]


def child(args_file: str) -> None:
    """One of the processes that fill the same cache at once (run with `python this_file child args.json`)."""
    args = json.loads(Path(args_file).read_text())
    encoder = OrtEncoder(Path(args["onnx"]))
    embedder = TextEmbedder(Path(args["bundle"]), make_manifest(args["sha"], args["dim"]), clip_tokenize, encoder,
                            cache_dir=Path(args["cache"]))
    clip_tokenize(["warm up"])  # load the BPE before the start signal, so both really start together
    Path(args["ready"]).touch()
    deadline = time.monotonic() + 120
    while not Path(args["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    rows = embedder.embeddings(args["names"])
    np.save(args["out"], rows)
    Path(args["out"] + ".json").write_text(json.dumps({"calls": encoder.calls, "prompts": encoder.prompts}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and its text_encoder piece exported once (~10 s)."""
    import torch

    from export.onnx_export import Shape, export_piece
    from scan_model.loading import load_model

    torch.set_num_threads(2)
    model = load_model(None, "tiny", seed=0).model.eval()
    folder = tmp_path_factory.mktemp("bundle")
    export_piece(model, "text_encoder", folder / "text_encoder.onnx", Shape(64, 96, 3, 4))
    onnx = folder / "text_encoder.onnx"

    def eager(names):
        with torch.no_grad():
            return model.encode_text(list(names)).numpy()

    sha = sha256_file(onnx)
    dim = int(eager(["cat"]).shape[1])
    return type("Tiny", (), {"model": model, "onnx": onnx, "bundle": folder, "sha": sha, "dim": dim, "eager": eager})


def embedder(tiny, cache: Path, caches=None, encoder=None, **kw) -> TextEmbedder:
    encoder = encoder or OrtEncoder(tiny.onnx)
    emb = TextEmbedder(tiny.bundle, make_manifest(tiny.sha, tiny.dim, caches), clip_tokenize, encoder,
                       cache_dir=cache, **kw)
    emb.counter = encoder
    return emb


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.shard"))


def shard_names(path: Path) -> list[str]:
    content = path.read_bytes()
    (size,) = struct.unpack_from("<I", content, len(rt.MAGIC))
    return json.loads(content[len(rt.MAGIC) + 4 : len(rt.MAGIC) + 4 + size])["names"]


def unit_rows(rows: np.ndarray) -> bool:
    return rows.dtype == np.float32 and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


# -- correctness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [256, 5])  # 5 < 14 templates: one name's prompts span several calls
def test_matches_eager_encode_text(tiny, tmp_path, batch_size):
    names = ADE[:20] + ["building, edifice", "a name {with} braces"]
    emb = embedder(tiny, tmp_path, batch_size=batch_size)
    rows = emb.embeddings(names)
    assert rows.shape == (len(names), tiny.dim) and unit_rows(rows)
    assert np.abs(rows - tiny.eager(names)).max() < 1e-5
    assert emb.counter.prompts == len(names) * T and emb.counter.largest <= batch_size
    assert emb.encoder_calls == emb.counter.calls


def test_empty_vocabulary_is_a_one_line_scan_error(tiny, tmp_path):
    with pytest.raises(ScanError, match="empty vocabulary") as info:
        embedder(tiny, tmp_path).embeddings([])
    assert "\n" not in str(info.value)


def test_rows_follow_the_order_of_names_and_repeats_are_free(tiny, tmp_path):
    emb = embedder(tiny, tmp_path)
    first = emb.embeddings(["cat", "dog", "car"])
    calls = emb.encoder_calls
    again = emb.embeddings(["car", "cat", "dog", "cat"])
    assert emb.encoder_calls == calls  # in-memory index
    np.testing.assert_array_equal(again, first[[2, 0, 1, 0]])


# -- bundle caches -------------------------------------------------------------------------------
def write_bundle_cache(tiny, name: str, names: list[str], encoder: str | None = None) -> TextCache:
    folder = tiny.bundle / "text_cache"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.npz"
    np.savez(path, names=np.asarray(names), embeddings=tiny.eager(names).astype(np.float32))
    return TextCache(f"text_cache/{path.name}", sha256_file(path), path.stat().st_size,
                     encoder=encoder or tiny.sha[:16], templates="vild", classes=len(names))


def test_bundle_cache_names_cost_no_encoder_calls(tiny, tmp_path):
    cache = write_bundle_cache(tiny, "voc20", ADE[:20])
    emb = embedder(tiny, tmp_path, {"voc20": cache})
    rows = emb.embeddings(ADE[10:20])
    assert emb.encoder_calls == 0
    assert np.abs(rows - tiny.eager(ADE[10:20])).max() < 1e-5
    emb.embeddings(ADE[:22])  # two names the bundle lacks: only those are encoded
    assert emb.counter.prompts == 2 * T
    (shard,) = shards(emb.folder)
    assert shard_names(shard) == ADE[20:22]  # bundle names are not copied into the user cache


def test_bundle_cache_of_another_encoder_or_damaged_is_not_used(tiny, tmp_path):
    other = write_bundle_cache(tiny, "other", ADE[:5], encoder="0123456789abcdef")
    damaged = write_bundle_cache(tiny, "damaged", ADE[5:10])
    emb = embedder(tiny, tmp_path, {"other": other, "damaged": damaged})
    (tiny.bundle / damaged.file).write_bytes(b"not an npz")
    with pytest.warns(TextCacheWarning, match="ignoring bundle text cache"):
        rows = emb.embeddings(ADE[:10])
    assert emb.counter.prompts == 10 * T
    assert np.abs(rows - tiny.eager(ADE[:10])).max() < 1e-5


def test_bundle_caches_load_lazily(tiny, tmp_path):
    first = write_bundle_cache(tiny, "first", ADE[:5])
    second = write_bundle_cache(tiny, "second", ADE[5:10])
    (tiny.bundle / second.file).unlink()  # never needed, so never opened: no warning
    emb = embedder(tiny, tmp_path, {"first": first, "second": second})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextCacheWarning)
        emb.embeddings(ADE[:5])
    assert emb.encoder_calls == 0


def test_bundle_written_by_export_serves_its_vocabulary_without_the_encoder(tiny, tmp_path):
    from export.bundle import write_bundle
    from export.onnx_export import Shape
    from runtime.manifest import read_manifest

    voc = benchmark_vocabularies()["voc20"]
    out = tmp_path / "bundle"
    write_bundle(tiny.model, out, None, {"voc20": voc}, example=Shape(64, 96, 3, 2), checks=(Shape(96, 64, 5, 3),),
                 pieces=("text_encoder",), report=lambda *a, **k: None)
    manifest = read_manifest(out)
    encoder = OrtEncoder(out / manifest.pieces["text_encoder"].file)
    emb = TextEmbedder(out, manifest, clip_tokenize, encoder, cache_dir=tmp_path / "cache")
    rows = emb.embeddings(voc[::-1])
    assert emb.encoder_calls == 0
    assert np.abs(rows - tiny.eager(voc[::-1])).max() < 1e-5
    emb.embeddings(["zebra"])  # not in the bundle: the bundle's own encoder runs
    assert encoder.prompts == T


# -- user cache ----------------------------------------------------------------------------------
def test_only_missing_names_are_encoded_and_persist_across_instances(tiny, tmp_path):
    first = embedder(tiny, tmp_path)
    rows = first.embeddings(ADE[:10])
    assert first.counter.prompts == 10 * T
    second = embedder(tiny, tmp_path)
    more = second.embeddings(ADE[:15])
    assert second.counter.prompts == 5 * T  # only the five new names
    np.testing.assert_array_equal(more[:10], rows)
    third = embedder(tiny, tmp_path)
    np.testing.assert_array_equal(third.embeddings(ADE[:15]), more)
    assert third.encoder_calls == 0
    folder = third.folder
    assert folder.parent == tmp_path / "text" and folder.name.startswith(f"{tiny.sha[:16]}-vild-")
    assert len(shards(folder)) == 2


def test_changed_templates_use_another_cache_folder(tiny, tmp_path):
    emb = embedder(tiny, tmp_path)
    emb.embeddings(["cat"])
    manifest = make_manifest(tiny.sha, tiny.dim)
    manifest.templates["vild"] = VILD[:3]
    changed = TextEmbedder(tiny.bundle, manifest, clip_tokenize, OrtEncoder(tiny.onnx), cache_dir=tmp_path)
    changed.embeddings(["cat"])
    assert changed.folder != emb.folder and changed.encoder_calls == 1


def shard_bytes(encoder: str, key: str, names: list[str], rows: np.ndarray) -> bytes:
    header = json.dumps({"encoder": encoder, "templates": key, "dim": rows.shape[1], "names": names}).encode()
    return rt.MAGIC + struct.pack("<I", len(header)) + header + rows.astype("<f4").tobytes()


def put_named(folder: Path, content: bytes) -> Path:
    """A file named by the hash of its content, as the cache names shards."""
    path = folder / (hashlib.sha256(content).hexdigest()[:32] + rt.SUFFIX)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "garbage named by its hash", "wrong key", "wrong shape",
                                    "not unit rows"])
def test_damaged_entry_is_ignored_recomputed_and_rewritten(tiny, tmp_path, damage):
    names = ADE[:6]
    good = embedder(tiny, tmp_path)
    reference = good.embeddings(names)
    folder = good.folder
    (shard,) = shards(folder)
    content = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        shard.write_bytes(os.urandom(len(content)))
    else:
        shard.unlink()
        if damage == "garbage named by its hash":
            shard = put_named(folder, os.urandom(1000))
        elif damage == "wrong key":  # a valid shard of another encoder, copied into this folder
            shard = put_named(folder, shard_bytes("f" * 16, good.key, names, reference))
        elif damage == "wrong shape":
            shard = put_named(folder, shard_bytes(good.encoder, good.key, names,
                                                  np.ones((6, tiny.dim + 1)) / np.sqrt(tiny.dim + 1)))
        else:
            shard = put_named(folder, shard_bytes(good.encoder, good.key, names, 3 * reference))
    again = embedder(tiny, tmp_path)
    with pytest.warns(TextCacheWarning, match="damaged text cache entry"):
        rows = again.embeddings(names)
    assert again.counter.prompts == 6 * T  # nothing of the damaged entry was used
    assert np.abs(rows - reference).max() < 1e-6
    # The damaged file is gone; the one shard left is valid (a truncated or overwritten file is
    # rewritten under its own name, since the same rows give the same bytes).
    (fresh,) = shards(folder)
    assert hashlib.sha256(fresh.read_bytes()).hexdigest()[:32] == fresh.stem
    assert fresh == shard or not shard.exists()
    assert shard_names(fresh) == names
    third = embedder(tiny, tmp_path)
    np.testing.assert_array_equal(third.embeddings(names), rows)
    assert third.encoder_calls == 0


def test_two_processes_filling_one_cache_encode_each_name_once(tiny, tmp_path):
    names = ADE[:40]
    cache, procs, outs = tmp_path / "cache", [], []
    for i in range(2):
        out = str(tmp_path / f"out{i}.npy")
        args = {"onnx": str(tiny.onnx), "bundle": str(tiny.bundle), "sha": tiny.sha, "dim": tiny.dim,
                "cache": str(cache), "names": names, "ready": str(tmp_path / f"ready{i}"),
                "go": str(tmp_path / "go"), "out": out}
        (tmp_path / f"args{i}.json").write_text(json.dumps(args))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "child", str(tmp_path / f"args{i}.json")], env=env,
                                      stderr=subprocess.PIPE, text=True))
        outs.append(out)
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "children did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()  # both are waiting: they ask for the names at the same moment
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    reference = tiny.eager(names)
    counts = [json.loads(Path(o + ".json").read_text()) for o in outs]
    for out in outs:
        assert np.abs(np.load(out) - reference).max() < 1e-5
    # The lock makes the second process wait, then read the first one's shard.
    assert sum(c["prompts"] for c in counts) == len(names) * T, counts
    assert sorted(c["calls"] for c in counts)[0] == 0
    folder = next((cache / "text").iterdir())
    assert len(shards(folder)) == 1 and not list(folder.glob("*.tmp"))
    check = embedder(tiny, cache)
    assert np.abs(check.embeddings(names) - reference).max() < 1e-5 and check.encoder_calls == 0


def test_cache_folder_that_cannot_be_created_keeps_going_in_memory(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    emb = embedder(tiny, blocker / "cache")
    with pytest.warns(TextCacheWarning, match="not writable") as record:
        rows = emb.embeddings(ADE[:3])
        emb.embeddings(ADE[3:5])
    assert len([w for w in record if issubclass(w.category, TextCacheWarning)]) == 1  # warned once
    assert np.abs(rows - tiny.eager(ADE[:3])).max() < 1e-5
    calls = emb.encoder_calls
    emb.embeddings(ADE[:5])
    assert emb.encoder_calls == calls


def test_cache_that_cannot_be_locked_is_still_read(tiny, tmp_path):
    filled = embedder(tiny, tmp_path)
    rows = filled.embeddings(ADE[:8])
    lock = filled.folder / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # opening the lock fails even for root, as in a read-only folder
    emb = embedder(tiny, tmp_path)
    np.testing.assert_array_equal(emb.embeddings(ADE[:8]), rows)
    assert emb.encoder_calls == 0
    with pytest.warns(TextCacheWarning, match="not writable"):
        new = emb.embeddings(["zebra crossing"])
    assert np.abs(new - tiny.eager(["zebra crossing"])).max() < 1e-5
    assert len(shards(filled.folder)) == 1  # nothing written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write a read-only folder")
def test_read_only_cache_folder(tiny, tmp_path):
    filled = embedder(tiny, tmp_path)
    rows = filled.embeddings(ADE[:4])
    os.chmod(filled.folder, 0o555)
    try:
        emb = embedder(tiny, tmp_path)
        with pytest.warns(TextCacheWarning, match="not writable"):
            both = emb.embeddings(ADE[:6])
        np.testing.assert_array_equal(both[:4], rows)
        assert emb.counter.prompts == 2 * T
    finally:
        os.chmod(filled.folder, 0o755)


# -- large vocabularies --------------------------------------------------------------------------
# Stand-ins for the tokenizer and the text encoder, so 5000 x 14 prompts take a second: plain
# deterministic numpy functions (not mocks of a library) with the shapes of the real ones.
FAKE_DIM = 32
_W = np.random.default_rng(0).standard_normal((77, FAKE_DIM))


def fake_tokenize(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), 77), np.int64)
    for i, text in enumerate(texts):
        codes = np.frombuffer(text.encode()[:77], np.uint8)
        out[i, : len(codes)] = codes
    return out


class FakeEncoder:
    def __init__(self):
        self.calls = self.prompts = self.largest = 0

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.prompts += len(tokens)
        self.largest = max(self.largest, len(tokens))
        return np.sin(tokens / 7.0 + 0.1) @ _W


def fake_reference(name: str) -> np.ndarray:
    features = FakeEncoder()(fake_tokenize([t.format(name) for t in VILD]))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    mean = features.mean(0)
    return mean / np.linalg.norm(mean)


def fake_embedder(tmp_path: Path, encoder=None) -> TextEmbedder:
    return TextEmbedder(tmp_path, make_manifest("ab" * 32, FAKE_DIM), fake_tokenize, encoder or FakeEncoder(),
                        cache_dir=tmp_path)


def test_5000_names_in_bounded_memory(tmp_path):
    names = [f"class number {i}" for i in range(5000)]
    encoder = FakeEncoder()
    emb = fake_embedder(tmp_path, encoder)
    tracemalloc.start()
    rows = emb.embeddings(names)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows.shape == (5000, FAKE_DIM) and unit_rows(rows)
    assert encoder.prompts == 5000 * T and encoder.largest <= 256
    # All 70000 prompts at once would be 43 MB of tokens alone; batches keep it to the result's size.
    assert peak < 8 * 2**20, peak
    for k in (0, 1234, 4999):
        assert np.abs(rows[k] - fake_reference(names[k])).max() < 1e-6
    assert len(shards(emb.folder)) == -(-5000 // rt.FLUSH_NAMES)
    warm = fake_embedder(tmp_path)
    np.testing.assert_array_equal(warm.embeddings(names), rows)
    assert warm.encoder_calls == 0


def test_many_small_fills_are_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "MAX_SHARDS", 3)
    emb = fake_embedder(tmp_path)
    for i in range(5):
        emb.embeddings([f"name {i}"])
    assert len(shards(emb.folder)) <= 3
    warm = fake_embedder(tmp_path)
    rows = warm.embeddings([f"name {i}" for i in range(5)])
    assert warm.encoder_calls == 0
    assert np.abs(rows[4] - fake_reference("name 4")).max() < 1e-6


# -- timing --------------------------------------------------------------------------------------
def test_warm_ade150_is_much_faster_than_encoding(tiny, tmp_path):
    start = time.perf_counter()
    cold = embedder(tiny, tmp_path).embeddings(ADE)
    cold_s = time.perf_counter() - start
    warm_times = []
    for _ in range(5):
        start = time.perf_counter()
        warm = embedder(tiny, tmp_path, encoder=FakeEncoder())  # a new instance reads the disk cache
        rows = warm.embeddings(ADE)
        warm_times.append(time.perf_counter() - start)
        assert warm.encoder_calls == 0
    np.testing.assert_array_equal(rows, cold)
    warm_s = min(warm_times)
    print(f"\nade150 tiny text encoder: cold {cold_s * 1e3:.1f} ms, warm (new instance, disk) {warm_s * 1e3:.2f} ms, "
          f"ratio {cold_s / warm_s:.0f}x")
    assert warm_s * 100 <= cold_s


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2])
