"""Running a bundle piece with OpenVINO's CPU plugin, which reads the bundle's ONNX files as they are.

Compiled models are kept in the user cache, one folder per piece file, OpenVINO version, CPU
and compile settings (the way TensorRT engines are kept per GPU and TensorRT version):

    <cache root>/openvino/<piece sha256[:16]>-ov<version>-<cpu key>-<precision>-t<threads>/
        <piece>.blob    `CompiledModel.export_model()`
        <piece>.json    what it was compiled from and with, and the blob's sha256

A blob whose hash, size or record does not match, or that OpenVINO refuses to import, is never
used: it is compiled again and replaced (written atomically, so a reader never sees half a blob).

bf16 runs only where the CPU has it natively (`runtime.cpu`); on other CPUs OpenVINO would emulate
it, slower than f32. A piece that OpenVINO cannot compile or run in bf16 falls back, and the
runner records and reports it: first bf16 with OpenVINO's "snippets" subgraph fusion disabled (a
known bf16 compile failure of the mask decoder, "Cannot initialize brgemm descriptor"), then f32.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cpu import CpuInfo, cpu_info
from .errors import ScanError
from .files import atomic_write, user_cache_root

PRECISIONS = ("fp32", "bf16", "int8")  # what a Segmenter may ask of OpenVINO
HINTS = {"fp32": "f32", "bf16": "bf16"}  # OpenVINO's inference precision; int8 files carry their own quantisation
RECORD_VERSION = 1


class OpenVinoError(ScanError):
    """OpenVINO is missing, or cannot compile or run a piece; the message says what to do."""


@dataclass(frozen=True)
class CompileSettings:
    """What a compiled model depends on besides the piece file; part of its cache key."""

    precision: str  # "f32" or "bf16": OpenVINO's inference precision hint
    threads: int  # 0: OpenVINO's default (all cores)
    snippets: bool = True  # False: SNIPPETS_MODE=DISABLE (the bf16 fallback)

    def config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if not self.snippets:
            config["SNIPPETS_MODE"] = "DISABLE"
        return config

    def label(self) -> str:
        return f"{self.precision}{'' if self.snippets else '-nosnippets'}-t{self.threads}"


def openvino_version() -> str:
    import openvino

    return openvino.get_version().split("-")[0]


def openvino_message(exc: Exception) -> str:
    """The line of an OpenVINO error that says what went wrong (its first lines name source files)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith("Exception from ")]
    return ((telling or lines or [type(exc).__name__])[-1])[:300]


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise OpenVinoError("openvino is not installed: pip install openvino (or --backend onnxruntime)") from None
    return openvino


def resolve_precision(precision: str, cpu: CpuInfo) -> tuple[str, str | None]:
    """(the precision to run, a note when it differs from the one asked): bf16 needs native BF16."""
    if precision not in PRECISIONS:
        raise OpenVinoError(f"precision {precision!r} with openvino: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not cpu.native_bf16:
        return "fp32", (f"{cpu.model} has no native BF16 (AVX512-BF16 or AMX): OpenVINO would emulate it, slower "
                        "than f32, so the pieces run f32")
    return precision, None


def compile_hint(precision: str, cpu: CpuInfo, quantised: bool = False, bf16_refused: bool = False) -> str:
    """OpenVINO's compile hint ("bf16" or "fp32") for one file in a run at `precision` (after
    `resolve_precision`): bf16 runs every piece bf16; int8 runs the int8 files and the other pieces
    bf16 where the CPU is native, f32 elsewhere; a fp32 file whose bf16 check failed at export
    (`bf16_refused`) runs f32."""
    wants_bf16 = precision == "bf16" or (precision == "int8" and cpu.native_bf16)
    return "bf16" if wants_bf16 and (quantised or not bf16_refused) else "fp32"


def piece_hint(name: str, piece, precision: str, cpu: CpuInfo) -> tuple[str, str | None]:
    """`compile_hint` for one piece (a `runtime.manifest.Piece`) of a bundle, and a note where the
    export's numeric gate kept it from bf16."""
    quantised = precision == "int8" and piece.int8 is not None
    check = piece.bf16_check()
    refused = check is not None and not check.passed
    hint = compile_hint(precision, cpu, quantised, refused)
    if hint == "fp32" and refused and compile_hint(precision, cpu, quantised) == "bf16":
        worst = min(check.min_cosine, key=check.min_cosine.get)
        return hint, (f"{name}: runs f32, not bf16: at export its {worst} kept a cosine of "
                      f"{check.min_cosine[worst]:.4f} to fp32 in bf16, under the gate's {check.required_cosine}")
    return hint, None


class OpenVinoRunner:
    """One piece compiled by OpenVINO for the CPU: numpy feeds in, numpy outputs out.

    Args:
        name: the piece's name (for messages and file names).
        path: its ONNX file; `sha256` is the manifest's hash of it (the cache key).
        precision: the compile hint, "fp32" or "bf16" (`piece_hint`): what runs outside the
            quantised products of an int8 file, and everything in any other file.
        quantised: the file is an int8 piece (reported as "int8").
        threads: inference threads (None: all cores).
        cache_dir: root of the compiled-model cache (default: the user cache folder); False: no cache.
        report: where the fallback and cache lines go.
    """

    def __init__(self, name: str, path: Path, sha256: str, precision: str = "fp32", threads: int | None = None,
                 cache_dir: Path | None | bool = None, cpu: CpuInfo | None = None, report=None,
                 quantised: bool = False):
        ov = _import_openvino()
        if threads is not None and threads < 1:
            raise OpenVinoError(f"threads must be at least 1, got {threads}")
        self.name, self.path, self.sha256 = name, Path(path), sha256
        self.cpu = cpu or cpu_info()
        self.report = report or (lambda line: None)
        if precision not in HINTS:
            raise OpenVinoError(f"compile precision {precision!r}: choose one of {', '.join(HINTS)}")
        self.quantised = quantised
        self.settings = CompileSettings(HINTS[precision], threads or 0)
        self.fallback: str | None = None  # what was given up, and why (never silent)
        self.from_cache = False
        self._core = ov.Core()
        self._cache_root = None if cache_dir is False else Path(cache_dir or user_cache_root()) / "openvino"
        self._asked = self.settings
        self._use_recorded_fallback()
        self._compile_with_fallback()

    # -- compiling -------------------------------------------------------------------------------
    def _compile_with_fallback(self) -> None:
        while True:
            try:
                self._load(self.settings)
                return
            except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line texts
                self._fall_back(exc, "compile")

    def _fallback_record(self) -> Path | None:
        folder = self._folder(self._asked)
        return None if folder is None else folder / f"{self.name}.fallback.json"

    def _use_recorded_fallback(self) -> None:
        """Start from the setting an earlier run fell back to, so the failure is not met again."""
        path = self._fallback_record()
        if path is None or not path.is_file():
            return
        try:
            record = json.loads(path.read_text())
            settings = CompileSettings(**record["settings"])
            note = str(record["note"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # unreadable: the fallback is found again, and the record rewritten
        if settings.threads != self._asked.threads or settings.precision not in ("bf16", "f32"):
            return
        self.settings, self.fallback = settings, f"{note} (recorded by an earlier run)"
        self.report(f"warning: {self.fallback}")

    def _fall_back(self, exc: Exception, stage: str) -> None:
        """Move to the next setting after a failure in bf16, or raise where there is none."""
        first = openvino_message(exc)
        if self.settings.precision == "bf16" and self.settings.snippets:
            nxt, why = CompileSettings("bf16", self.settings.threads, snippets=False), "bf16 without snippets"
        elif self.settings.precision == "bf16":
            nxt, why = CompileSettings("f32", self.settings.threads), "f32"
        else:
            raise OpenVinoError(f"{self.name}: OpenVINO cannot {stage} {self.path.name} ({first}): "
                                "run it with --backend onnxruntime") from exc
        note = f"{self.name}: OpenVINO failed to {stage} in {self.settings.label()} ({first}); running {why}"
        self.fallback = note if self.fallback is None else f"{self.fallback}; {note}"
        self.report(f"warning: {note}")
        self.settings = nxt
        path = self._fallback_record()
        if path is not None:
            record = json.dumps({"settings": asdict(nxt), "note": self.fallback})
            try:
                atomic_write(path, lambda tmp: tmp.write_text(record))
            except OSError:
                pass  # not recorded: the next start meets the failure again and falls back again

    def _folder(self, settings: CompileSettings) -> Path | None:
        if self._cache_root is None:
            return None
        key = f"{self.sha256[:16]}-ov{openvino_version()}-{self.cpu.key()}-{settings.label()}"
        return self._cache_root / key

    def _record(self, settings: CompileSettings, blob: bytes) -> dict:
        return {"version": RECORD_VERSION, "piece": self.name, "piece_sha256": self.sha256,
                "openvino": openvino_version(), "cpu": self.cpu.model, "cpu_key": self.cpu.key(),
                "settings": asdict(settings), "blob_sha256": hashlib.sha256(blob).hexdigest(), "blob_bytes": len(blob)}

    def _load(self, settings: CompileSettings) -> None:
        folder = self._folder(settings)
        if folder is not None and self._import_cached(folder, settings):
            return
        self.compiled = self._core.compile_model(os.fspath(self.path), "CPU", settings.config())
        self.from_cache = False
        self._bind()
        if folder is not None:
            self._store(folder, settings)

    def _import_cached(self, folder: Path, settings: CompileSettings) -> bool:
        blob_path, record_path = folder / f"{self.name}.blob", folder / f"{self.name}.json"
        if not blob_path.is_file():
            return False
        problem = None
        try:
            blob = blob_path.read_bytes()
            record = json.loads(record_path.read_text())
            if record != self._record(settings, blob):
                problem = "its record does not match the blob or these settings"
            else:
                self.compiled = self._core.import_model(blob, "CPU", settings.config())
        except Exception as exc:  # unreadable files, bad JSON, or OpenVINO refusing the blob
            problem = openvino_message(exc)
        if problem:
            self.report(f"warning: {self.name}: ignoring the damaged compiled-model cache entry {blob_path} "
                        f"({problem}); compiling again")
            return False
        self.from_cache = True
        self._bind()
        return True

    def _store(self, folder: Path, settings: CompileSettings) -> None:
        exported = self.compiled.export_model()
        blob = exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported)
        try:
            atomic_write(folder / f"{self.name}.blob", lambda tmp: tmp.write_bytes(blob))
            record = json.dumps(self._record(settings, blob), indent=1)
            atomic_write(folder / f"{self.name}.json", lambda tmp: tmp.write_text(record))
        except OSError as exc:  # a read-only cache costs start-up time, never the run
            self.report(f"warning: {self.name}: cannot cache the compiled model in {folder} "
                        f"({exc.strerror or exc}); the next start compiles again")

    def _bind(self) -> None:
        self._request = self.compiled.create_infer_request()
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]

    # -- running ---------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """What runs: "bf16", "fp32", or "int8" for an int8 file."""
        if self.quantised:
            return "int8"
        return "bf16" if self.settings.precision == "bf16" else "fp32"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Shapes are dynamic, so OpenVINO compiles kernels for a new shape on its first run: a bf16
        # failure can appear here, and falls back like a compile failure.
        while True:
            try:
                results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
                return {name: np.asarray(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}
            except Exception as exc:
                if self.settings.precision != "bf16":
                    raise OpenVinoError(f"{self.name}: OpenVINO failed to run ({openvino_message(exc)}): "
                                        "run it with --backend onnxruntime") from exc
                self._fall_back(exc, "run")
                self._compile_with_fallback()
