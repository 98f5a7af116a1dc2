"""`Segmenter`: a bundle run with numpy and ONNX Runtime or TensorRT, no PyTorch.

The pipeline is the eager model's (`scan_model.segmenter.EagerSegmenter`), stage for stage:
the official test resize, both normalisations and padding, the CLIP 224 squash (numpy);
the image encoder and mask decoder (graphs); mask upsampling and thresholding (numpy); the
CLIP adapter on the valid proposals only, in chunks that bound memory (graph); the ensemble,
the mask-weighted sum, resize to the input size and a chunked argmax (numpy).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ScanError
from .files import verify_files
from .images import ImageError, load_image, resize_shortest_edge
from .manifest import Manifest, read_manifest
from .postprocess import ensemble_class_scores, labels_from_scores, mask_probabilities
from .preprocess import nearest_square, normalise_and_pad
from .result import SegmentationResult
from .settings import InferenceSettings, benchmark_settings, random_shift_keys, shift_counts, shift_key
from .vocab import parse_vocabulary

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PIECE_NAMES = ("image_encoder", "mask_decoder", "clip_adapter", "text_encoder")
# Bytes of mask probabilities and crop intermediates per CLIP-adapter call: bounds peak memory
# whatever the number of valid proposals and the image size.
_REGION_BUDGET = 64 << 20


class Segmenter:
    """Segment images with an exported bundle.

    Args:
        bundle: the folder `scan export --out` wrote.
        backend: "openvino" (CPU), "onnxruntime" (CPU, or CUDA with onnxruntime-gpu) or "tensorrt"
            (the bundle's engines for this GPU and TensorRT version, built on first use when
            missing). None picks the fastest measured path here (`runtime.choice.default_backend`):
            ONNX Runtime on CUDA where onnxruntime-gpu sees a GPU, else OpenVINO where it is
            installed, else ONNX Runtime; `self.notes` says which and why.
        providers: ONNX Runtime execution providers (default: CUDA where available, then CPU).
        threads: inference threads of ONNX Runtime or OpenVINO, and of the numpy post-processing (mask
            upsampling, labels), which runs here also with `runners` (default: all usable cores).
        precision: "fp32"; "bf16" (OpenVINO on a CPU with native BF16; elsewhere it runs fp32 and
            says so); "fp16" for the bundle's fp16 pieces/engines; "int8" for its int8 pieces (CPU;
            pieces without an int8 variant run fp32). None: bf16 for OpenVINO where the CPU has
            native BF16, else fp32.
        graph_optimization: ONNX Runtime's level: disable, basic, extended or all.
        resize: apply the official test resize (shortest edge 640, long edge at most 2560);
            False feeds images at their own size (padding to /32 still applies).
        verify: "hash" checks every file's size and sha256 against the manifest, "size" only sizes.
        cache_dir: root of the persistent caches, text embeddings and OpenVINO's compiled models
            (default: the user cache folder).
        report: where progress and fallback lines go (engine builds, OpenVINO fallbacks; default
            standard error).
        cpu: the CPU OpenVINO plans for (default: `runtime.cpu.cpu_info()`, this machine's).
        runners: the pieces run elsewhere: a mapping from each piece name to an object whose
            `run(feeds) -> outputs` takes and returns numpy arrays by the piece's tensor names (the
            model repository's orchestrator passes its Triton models); the bundle then needs no
            piece files, and backend/providers/threads/graph_optimization do not apply.
    """

    def __init__(self, bundle: str | Path, backend: str | None = None, providers=None, threads: int | None = None,
                 precision: str | None = None, graph_optimization: str = "all", resize: bool = True, verify: str = "hash",
                 cache_dir: str | Path | None = None, report=None, runners: dict | None = None, cpu=None):
        from .choice import choose

        if runners:  # the pieces run elsewhere: nothing to choose
            backend, precision, self._choice = backend or "onnxruntime", precision or "fp32", []
        else:
            backend, precision, self._choice = choose(backend, precision, cpu)
        if backend not in BACKENDS:
            raise ScanError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ScanError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision == "int8" and backend == "tensorrt":
            raise ScanError("precision int8 is for the CPU: use --backend openvino or onnxruntime, or fp16/fp32 with tensorrt")
        if precision == "bf16" and backend != "openvino" and not runners:
            raise ScanError(f"precision bf16 runs on --backend openvino (CPUs with native BF16), not {backend}")
        if precision == "fp16" and backend == "openvino" and not runners:
            raise ScanError("precision fp16 is for GPUs (--backend tensorrt or onnxruntime with CUDA); "
                            "on the CPU use --backend openvino with bf16, fp32 or int8")
        if verify not in ("hash", "size"):
            raise ScanError(f"verify {verify!r}: choose hash or size")
        self.root = Path(bundle)
        self.manifest: Manifest = read_manifest(self.root)
        self.backend = backend
        self.precision = precision
        self.resize = resize
        self.threads = threads  # the post-processing's; None: every usable CPU
        missing = [p for p in PIECE_NAMES if p not in self.manifest.pieces]
        if missing:
            raise ScanError(f"bundle {self.root} lacks the piece(s) {', '.join(missing)}: export the whole model with `scan export`")
        self.manifest.check_variant(precision)
        files = [] if runners else [f for p in PIECE_NAMES for f in self.manifest.pieces[p].variant(precision, backend).files()]
        verify_files(self.root, [*files, self.manifest.tokenizer.bpe, *self.manifest.text_caches.values()],
                     hashes=verify == "hash")
        if runners and set(runners) != set(PIECE_NAMES):
            raise ScanError(f"runners for {sorted(runners)}: give one for each of {', '.join(PIECE_NAMES)}")
        self._report = report or _to_stderr  # progress and warnings never mix with a caller's stdout
        self.runners = dict(runners) if runners else self._open(backend, providers, threads, graph_optimization,
                                                               self._report, cache_dir, cpu)
        self._text = self._text_embedder(cache_dir)
        inf = self.manifest.inference
        self.settings = InferenceSettings(
            mask_threshold=inf.mask_threshold, ensemble_weight=inf.ensemble_weight, replace_ratio=inf.replace_ratio,
            log_ensemble=inf.log_ensemble, shift_rule=inf.shift_rule, shift_seed=inf.shift_seed,
        )
        self._non_object = np.asarray(self.manifest.non_object_embedding, dtype=np.float32)[None]
        self._classifier: np.ndarray | None = None
        self._shift_rngs: dict[int, np.random.Generator] = {}
        self.classes: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def _open(self, backend, providers, threads, optimization, report, cache_dir, cpu) -> dict:
        if backend == "tensorrt":
            from .trt_engine import open_engines

            return open_engines(self.root, self.manifest, self.precision, report=report)
        pieces = {name: self.manifest.pieces[name].variant(self.precision, backend) for name in PIECE_NAMES}
        if backend == "openvino":
            from .cpu import cpu_info
            from .openvino_backend import OpenVinoRunner, piece_hint, resolve_precision

            cpu = cpu or cpu_info()
            precision, note = resolve_precision(self.precision, cpu)
            if note:
                self._choice.append(note)
                report(f"note: {note}")
            self.precision = precision
            runners = {}
            for name, piece in pieces.items():
                hint, note = piece_hint(name, self.manifest.pieces[name], precision, cpu)
                if note:
                    self._choice.append(note)
                    report(f"note: {note}")
                runners[name] = OpenVinoRunner(name, self.root / piece.file, piece.sha256, hint, threads, cache_dir, cpu,
                                               report, quantised=piece.precision == "int8")
            return runners
        from .onnxruntime_backend import OnnxRuntimeRunner

        return {
            name: OnnxRuntimeRunner(name, self.root / piece.file, providers, threads, optimization, self.precision)
            for name, piece in pieces.items()
        }

    @property
    def notes(self) -> list[str]:
        """How backend and precision were chosen, and every piece that fell back (never silent)."""
        return [*self._choice, *self.fallbacks.values()]

    @property
    def fallbacks(self) -> dict[str, str]:
        """Pieces that run at another precision or setting than asked, and why (OpenVINO)."""
        return {name: r.fallback for name, r in self.runners.items() if getattr(r, "fallback", None)}

    def _text_embedder(self, cache_dir):
        from .text import TextEmbedder
        from .tokenizer import ClipTokenizer

        spec = self.manifest.tokenizer
        tokenizer = ClipTokenizer.from_file(self.root / spec.bpe.file, spec.context_length, spec.sot, spec.eot)
        encoder = self.runners["text_encoder"]
        return TextEmbedder(self.root, self.manifest, tokenizer, lambda tokens: encoder.run({"tokens": tokens})["text_features"],
                            cache_dir=None if cache_dir is None else Path(cache_dir))

    @property
    def text_encoder_calls(self) -> int:
        """How many times the text encoder ran (a warm vocabulary costs none)."""
        return self._text.encoder_calls

    def settings_for(self, benchmark: str) -> InferenceSettings:
        """The official settings of `benchmark` (ade150, ade847, pc59, pc459, voc20) for this model."""
        recorded = self.manifest.inference.benchmark_settings.get(benchmark)
        values = vars(recorded) if recorded is not None else benchmark_settings(self.manifest.model.name, benchmark)
        return self.settings.replace(**(values or {}))

    def set_vocabulary(self, vocabulary) -> list[str]:
        """Names, a preset or a file (see `runtime.vocab.parse_vocabulary`); only unknown names are encoded."""
        names = parse_vocabulary(vocabulary)
        embeddings = self._text.embeddings(names)
        self._classifier = np.ascontiguousarray(np.concatenate([embeddings, self._non_object]).astype(np.float32))
        self.classes = names
        return names

    # -- segmentation --------------------------------------------------------------------------
    def segment(self, image, return_scores: bool = False, settings: InferenceSettings | None = None,
                **overrides) -> SegmentationResult:
        """One image (path, PIL image or HxWx3 uint8 array) -> `SegmentationResult`.

        `settings` (default: the bundle's) with `overrides` (mask_threshold, ensemble_weight,
        replace_ratio, log_ensemble, shift_rule, shift_seed) apply to this call only.
        """
        if self._classifier is None:
            raise ScanError("no vocabulary set: call set_vocabulary(names) first")
        settings = (settings or self.settings).replace(**overrides)
        timings: dict[str, float] = {}
        clock = _Clock(timings)
        array = load_image(image)
        height, width = array.shape[:2]
        pre = self.manifest.preprocess
        if not self.resize and max(height, width) > pre.max_size_test:
            raise ImageError(
                f"image of {width}x{height} exceeds {pre.max_size_test} pixels on its long side; "
                "drop --no-resize (the official test resize) or shrink the image"
            )
        resized = resize_shortest_edge(array, pre.min_size_test, pre.max_size_test) if self.resize else array
        proposals = self._propose(resized, clock)
        label_map, sem_seg, regions, best = self._decide(resized, proposals, settings, (height, width), return_scores, clock)
        return SegmentationResult(label_map, list(self.classes), sem_seg, timings, tuple(resized.shape[:2]), regions, best)

    def _propose(self, resized: np.ndarray, clock: "_Clock") -> "_Proposals":
        """Pre-processing, image encoder and mask decoder: mask probabilities at the resized size."""
        pre = self.manifest.preprocess
        swin = normalise_and_pad(resized, pre.pixel_mean, pre.pixel_std, pre.size_divisibility)
        clip_padded = normalise_and_pad(resized, pre.clip_mean, pre.clip_std, pre.size_divisibility)
        clip_image = nearest_square(clip_padded, pre.clip_image_size)
        clock.lap("preprocess")
        encoded = self.runners["image_encoder"].run({"image": swin, "clip_image": clip_image})
        clock.lap("image_encoder")
        decoded = self.runners["mask_decoder"].run({
            **{k: encoded[k] for k in ("mask_features", "features_0", "features_1", "features_2", "clip_context", "global_cls")},
            "text_classifier": self._classifier,
        })
        # Upsampled and sigmoid in one pass: the (Q, h, w) array is the largest of the pipeline.
        probs = mask_probabilities(decoded["mask_logits"][0], swin.shape[-2:], resized.shape[:2], threads=self.threads)
        clock.lap("mask_decoder")
        return _Proposals(decoded["class_logits"][0], probs, encoded["shift_tokens"][0])

    def segment_batch(self, images, return_scores: bool = False, settings: InferenceSettings | None = None,
                      **overrides) -> list[SegmentationResult]:
        """Several images with the same settings; results in order (one image in memory at a time)."""
        return [self.segment(image, return_scores, settings, **overrides) for image in images]

    def _decide(self, resized: np.ndarray, proposals: "_Proposals", settings: InferenceSettings,
                out_size: tuple[int, int], return_scores: bool, clock: "_Clock"):
        """Valid proposals, CLIP adapter, ensemble, semantic map, resize and argmax:
        (labels, scores, regions, each pixel's label score)."""
        probs = proposals.probs
        valid = probs.reshape(probs.shape[0], -1).max(axis=1) > settings.mask_threshold
        region_logits = self._classify_regions(resized, probs, valid, proposals.shift_tokens, settings)
        clock.lap("clip_adapter")
        scores = ensemble_class_scores(proposals.class_logits, region_logits, valid, settings.ensemble_weight,
                                       log_branch=settings.log_ensemble)
        clock.lap("ensemble")
        best = np.empty(out_size, dtype=np.float32)
        label_map, sem_seg = labels_from_scores(scores, probs, out_size, keep_scores=return_scores, label_scores=best,
                                                threads=self.threads)
        clock.lap("postprocess")
        return label_map, sem_seg, int(valid.sum()), best

    def _classify_regions(self, image: np.ndarray, probs: np.ndarray, valid: np.ndarray, shift_tokens: np.ndarray,
                          settings: InferenceSettings) -> np.ndarray:
        """(Q, K+1) region-CLIP logits; rows of invalid proposals stay zero (the ensemble ignores them)."""
        inf = self.manifest.inference
        logits = np.zeros((probs.shape[0], self._classifier.shape[0]), dtype=np.float32)
        index = np.flatnonzero(valid)
        if index.size == 0:
            return logits
        height, width = probs.shape[-2:]
        per_mask = 4 * height * width + 4 * 3 * 4 * 224 * max(height, width) * 2
        chunk = int(np.clip(_REGION_BUDGET // per_mask, 1, 32))
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        counts = np.asarray(shift_counts(inf.shift_patches, settings.replace_ratio), dtype=np.int64)
        layers = len(inf.replace_layers)
        fixed_key = shift_key(inf.shift_patches, settings.shift_seed)
        rng = self._shift_rngs.setdefault(settings.shift_seed, np.random.default_rng(settings.shift_seed))
        runner = self.runners["clip_adapter"]
        for start in range(0, index.size, chunk):
            rows = index[start : start + chunk]
            if settings.shift_rule == "official":
                keys = random_shift_keys(layers, rows.size, inf.shift_patches, rng)
            else:
                keys = np.ascontiguousarray(np.broadcast_to(fixed_key, (layers, rows.size, inf.shift_patches)))
            out = runner.run({
                "image": chw,
                "mask_probs": np.ascontiguousarray(probs[rows]),
                "mask_threshold": np.asarray(settings.mask_threshold, dtype=np.float32),
                "shift_tokens": shift_tokens,
                "text_classifier": self._classifier,
                "shift_counts": counts,
                "shift_keys": keys,
            })
            logits[rows] = out["region_logits"]
        return logits


@dataclass
class _Proposals:
    class_logits: np.ndarray  # (Q, K+1) calibrated in-vocabulary logits
    probs: np.ndarray  # (Q, h, w) mask probabilities at the resized image size
    shift_tokens: np.ndarray  # (R, C) original-CLIP CLS tokens at the replace layers


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Clock:
    def __init__(self, timings: dict):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now
