"""Class embeddings for a vocabulary (SPEC.md §1.9), torch-free.

Names are looked up in this order: the in-memory index, the bundle's text caches, a persistent
user cache, and only what is still missing goes through the bundle's `text_encoder` piece.

User cache layout (one folder per text encoder and template set, so a new encoder or changed
templates can never serve stale features):

    <cache root>/text/<encoder16>-<set>-<templates8>/
        .lock                 filelock: held while checking what is missing, encoding, writing
        <sha256[:32]>.shard   a batch of names; the file name is the hash of its bytes

A shard is MAGIC, a uint32 header length, a JSON header {encoder, templates, dim, names} and
the float32 (K, E) rows. Shards are written once, atomically, and never modified, so readers
need no lock; a file whose bytes do not hash to its name, or whose header does not match its
folder, is damaged and is ignored (and deleted by the next writer). Few large shards rather
than a file per name: a warm 150-name vocabulary is one read and one hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

from .errors import BundleError, ScanError
from .files import atomic_write, sha256_file, user_cache_root
from .manifest import Manifest
from .tokenizer import length_batches

MAGIC = b"SCANTXT1"
SUFFIX = ".shard"
FLUSH_NAMES = 1024  # names per shard while filling: a killed fill loses at most this much work
SORT_PROMPTS = 4096  # prompts sorted by length together before batching (about 2.5 MB of tokens)
MAX_SHARDS = 32  # beyond this many shards a writer merges them, so a warm start stays a few reads


class TextCacheWarning(UserWarning):
    """The user text cache could not be used as intended; results are still correct."""


_warned: set[str] = set()  # one warning per problem per process, not one per call


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, TextCacheWarning, stacklevel=3)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # left in place: readers check every shard anyway
        pass


class TextEmbedder:
    """(K, E) unit-norm class embeddings, row k for names[k]; `encoder_calls` counts encoder runs."""

    def __init__(
        self,
        bundle_root: Path,
        manifest: Manifest,
        tokenize: Callable[[list[str]], np.ndarray],
        encode_tokens: Callable[[np.ndarray], np.ndarray],
        cache_dir: Path | None = None,
        batch_size: int = 256,
        template_set: str = "vild",
    ):
        piece = manifest.pieces.get("text_encoder")
        if piece is None:
            raise BundleError("the bundle has no text_encoder piece: re-export it with `scan export` (all pieces)")
        if template_set not in manifest.templates:
            raise BundleError(f"the bundle has no template set {template_set!r}: re-export it with `scan export`")
        if batch_size < 1:
            raise ScanError(f"text batch size must be at least 1, got {batch_size}")
        self.bundle_root = Path(bundle_root)
        self.templates = list(manifest.templates[template_set])
        self.encoder = piece.sha256[:16]
        templates_hash = hashlib.sha256("\n".join(self.templates).encode()).hexdigest()[:8]
        self.key = f"{template_set}-{templates_hash}"
        self.folder = Path(cache_dir or user_cache_root()) / "text" / f"{self.encoder}-{self.key}"
        self.tokenize, self.encode_tokens, self.batch_size = tokenize, encode_tokens, batch_size
        self.encoder_calls = 0
        self.prompts_encoded = 0
        out = next((o for o in piece.outputs if o.name == "text_features"), None)
        tokens = next((i for i in piece.inputs if i.name == "tokens"), None)
        # Bundles from before the cut have a fixed 77-token axis: they get full rows.
        self.cut_to_longest = bool(tokens and len(tokens.shape) == 2 and not isinstance(tokens.shape[1], int))
        self.dim: int | None = out.shape[-1] if out and out.shape and isinstance(out.shape[-1], int) else None
        # Bundle caches made by this encoder with these templates, loaded one at a time on a miss.
        self._bundle_caches = [
            c for c in manifest.text_caches.values() if c.encoder == self.encoder and c.templates == template_set
        ]
        self._known: dict[str, np.ndarray] = {}  # name -> (E,) row
        self._shards_read: set[str] = set()  # valid shards already in _known
        self._writable = True

    # ------------------------------------------------------------------------------------------
    def embeddings(self, names: list[str]) -> np.ndarray:
        names = list(names)
        if not names:
            raise ScanError("empty vocabulary: pass at least one class name (or a preset such as ade150)")
        bad = next((n for n in names if not isinstance(n, str) or not n.strip()), None)
        if bad is not None:
            raise ScanError(f"class name {bad!r} is not a non-empty string: pass text class names")
        if self._missing(names):
            self._from_bundle(names)
        if self._missing(names):
            self._read_shards(delete_damaged=False)  # unlocked: shards are immutable once renamed in
        missing = self._missing(names)
        if missing:
            self._fill(missing)
        return np.stack([self._known[n] for n in names]).astype(np.float32, copy=False)

    def _missing(self, names: list[str]) -> list[str]:
        return list(dict.fromkeys(n for n in names if n not in self._known))

    # -- bundle caches -------------------------------------------------------------------------
    def _from_bundle(self, names: list[str]) -> None:
        while self._bundle_caches and self._missing(names):
            cache = self._bundle_caches.pop(0)
            path = self.bundle_root / cache.file
            try:
                problem = None
                if path.stat().st_size != cache.bytes or sha256_file(path) != cache.sha256:
                    problem = "size or sha256 differs from the manifest"
                else:
                    with np.load(path, allow_pickle=False) as data:
                        rows, table = data["embeddings"], [str(n) for n in data["names"]]
                    problem = self._check_rows(rows, table, cache.classes)
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                problem = str(exc) or type(exc).__name__
            if problem:
                _warn_once(f"bundle:{path}", f"ignoring bundle text cache {path} ({problem}): "
                           "class names are encoded instead; copy the bundle again to restore it")
                continue
            self._add(table, rows)

    # -- user cache ----------------------------------------------------------------------------
    def _fill(self, missing: list[str]) -> None:
        lock = None
        if self._writable:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                lock = FileLock(self.folder / ".lock")
                lock.acquire()  # no timeout: the holder is encoding; a dead holder's flock is freed
            except OSError as exc:
                lock = None
                self._unwritable(exc)
        if lock is None:  # unwritable cache: encode, keep in memory only
            self._encode(missing)
            return
        try:
            # Another process may have written the names while we waited for the lock.
            self._read_shards(delete_damaged=True)
            missing = [n for n in missing if n not in self._known]
            if missing:
                self._encode(missing)
                self._compact()
        finally:
            lock.release()

    def _unwritable(self, exc: OSError) -> None:
        self._writable = False
        _warn_once(f"ro:{self.folder}", f"text cache {self.folder} is not writable ({exc.strerror or exc}): "
                   "embeddings are kept in memory only; pass a writable cache folder to keep them")

    def _shard_files(self) -> list[Path]:
        try:
            return sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))
        except OSError:
            return []

    def _read_shards(self, delete_damaged: bool) -> None:
        for path in self._shard_files():
            if path.name in self._shards_read:
                continue
            try:
                parsed = self._parse_shard(path.stem, path.read_bytes())
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except OSError as exc:
                parsed = str(exc)
            if isinstance(parsed, str):
                _warn_once(f"bad:{path}", f"ignoring damaged text cache entry {path} ({parsed}); "
                           "its names are encoded again")
                if delete_damaged and self._writable:
                    _remove(path)
                continue
            self._shards_read.add(path.name)
            self._add(*parsed)

    def _parse_shard(self, stem: str, content: bytes) -> tuple[list[str], np.ndarray] | str:
        """(names, rows) of a valid shard, else a string that says what is wrong."""
        if hashlib.sha256(content).hexdigest()[:32] != stem:
            return "checksum mismatch"
        if not content.startswith(MAGIC) or len(content) < len(MAGIC) + 4:
            return "not a text cache shard"
        (size,) = struct.unpack_from("<I", content, len(MAGIC))
        start = len(MAGIC) + 4 + size
        try:
            header = json.loads(content[len(MAGIC) + 4 : start].decode("utf-8"))
            names, dim = [str(n) for n in header["names"]], int(header["dim"])
            key = (header["encoder"], header["templates"])
        except (ValueError, KeyError, TypeError):
            return "unreadable header"
        if key != (self.encoder, self.key):
            return f"made for encoder {key[0]} and templates {key[1]}, not this folder"
        if dim < 1 or len(content) - start != len(names) * dim * 4:
            return "wrong size"
        rows = np.frombuffer(content, dtype="<f4", offset=start).reshape(len(names), dim)
        return self._check_rows(rows, names, len(names)) or (names, rows)

    def _check_rows(self, rows: np.ndarray, names: list[str], classes: int) -> str | None:
        if rows.ndim != 2 or rows.shape[0] != len(names) or len(names) != classes:
            return f"{len(names)} names for rows of shape {rows.shape}, {classes} expected"
        if self.dim is not None and rows.shape[1] != self.dim:
            return f"embedding size {rows.shape[1]}, the text encoder gives {self.dim}"
        if len(set(names)) != len(names):
            return "duplicate names"
        if not np.isfinite(rows).all() or not np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3):
            return "rows are not finite unit vectors"
        return None

    def _add(self, names: list[str], rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        self.dim = self.dim or rows.shape[1]
        for name, row in zip(names, rows):
            self._known.setdefault(name, row)

    def _write_shard(self, names: list[str], rows: np.ndarray) -> str | None:
        """Write one shard atomically; its file name, or None when the cache is not writable."""
        if not self._writable:
            return None
        header = json.dumps({"encoder": self.encoder, "templates": self.key, "dim": int(rows.shape[1]),
                             "names": names}).encode("utf-8")
        content = MAGIC + struct.pack("<I", len(header)) + header + rows.astype("<f4").tobytes()
        name = hashlib.sha256(content).hexdigest()[:32] + SUFFIX
        try:
            atomic_write(self.folder / name, lambda tmp: tmp.write_bytes(content))
        except OSError as exc:
            self._unwritable(exc)
            return None
        self._shards_read.add(name)
        return name

    def _compact(self) -> None:
        """Merge all shards into one when there are many (called with the lock held)."""
        files = self._shard_files()
        if len(files) <= MAX_SHARDS or not self._writable:
            return
        merged: dict[str, np.ndarray] = {}
        for path in files:
            try:
                parsed = self._parse_shard(path.stem, path.read_bytes())
            except OSError as exc:
                parsed = str(exc)
            if not isinstance(parsed, str):
                self._add(*parsed)
                for name, row in zip(*parsed):
                    merged.setdefault(name, row)
        if not merged:
            return
        kept = self._write_shard(list(merged), np.stack(list(merged.values())))
        if kept:  # the merged shard is in place, so the parts can go
            for path in files:
                if path.name != kept:
                    _remove(path)
            self._shards_read = {kept}

    # -- encoding ------------------------------------------------------------------------------
    def _encode(self, names: list[str]) -> None:
        """Encode in groups of whole names, at most `batch_size` prompts per encoder call.

        A group holds about SORT_PROMPTS prompts: they are sorted by length across the whole
        group before batching, so each batch is cut to a length close to its prompts' own (in
        groups of one batch, a single long name would set the length of the batch). Only one
        group's prompts, tokens and per-prompt features exist at a time, so memory is bounded,
        not the vocabulary's; finished rows go to disk every FLUSH_NAMES names (when the cache
        is writable).
        """
        t = len(self.templates)
        group = max(1, max(self.batch_size, SORT_PROMPTS) // t)
        pending: list[str] = []
        for start in range(0, len(names), group):
            chunk = names[start : start + group]
            # Template-major, as scan_model.text.prompts: index i*len(chunk)+k is templates[i](chunk[k]).
            prompts = [template.format(name) for template in self.templates for name in chunk]
            features = self._run(np.ascontiguousarray(self.tokenize(prompts), dtype=np.int64)).astype(np.float64)
            features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
            mean = features.reshape(t, len(chunk), -1).mean(axis=0)
            rows = (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)
            self._add(chunk, rows)
            pending += chunk
            if self._writable and (len(pending) >= FLUSH_NAMES or start + group >= len(names)):
                self._write_shard(pending, np.stack([self._known[n] for n in pending]))
                pending = []

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        """(n, E) features of n token rows, in batches of at most `batch_size` prompts: sorted by
        length and cut to each batch's longest prompt where the piece takes any length (exact)."""
        if self.cut_to_longest:
            batches = length_batches(tokens, self.batch_size)
        else:
            batches = ((np.arange(i, min(i + self.batch_size, len(tokens))), tokens[i : i + self.batch_size])
                       for i in range(0, len(tokens), self.batch_size))
        features = None
        for rows, batch in batches:
            out = np.asarray(self.encode_tokens(batch))
            self.encoder_calls += 1
            self.prompts_encoded += len(rows)
            if out.ndim != 2 or out.shape[0] != len(rows) or (self.dim and out.shape[1] != self.dim):
                raise BundleError(f"text encoder gave shape {out.shape} for {len(rows)} prompts: "
                                  "the text_encoder piece is broken; re-export the bundle")
            if not np.isfinite(out).all():
                raise BundleError("text encoder gave non-finite features: re-export the bundle, or use fp32 for text")
            if features is None:
                features = np.empty((len(tokens), out.shape[1]), dtype=out.dtype)
            features[rows] = out
        return features
