"""`scan bench`'s protocol: every backend in one process, on the same inputs, in interleaved rounds.

`run_bench` takes opened backends (`benchmarks.backends`) and returns the result document
that `benchmarks/SCHEMA.md` describes; `benchmarks.report` turns it into tables and plots.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .machine import machine, thread_counts, torch_threads, versions
from .memory import RssSampler
from .rounds import interleaved_rounds
from .stats import stage_summaries, summarise
from .sweeps import run_sweeps

SCHEMA_VERSION = 1


@dataclass
class BenchInputs:
    images: list[np.ndarray]  # (H, W, 3) uint8
    image_names: list[str]
    vocabulary: list[str]
    vocabulary_name: str
    resize: bool  # the official test resize (user images) or the size as given (generated scenes)


@dataclass
class BenchPlan:
    runs: int = 3
    warmup: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    sweeps: dict[str, list] = field(default_factory=dict)  # sweep name -> values, see benchmarks.sweeps


def method(plan: BenchPlan) -> str:
    return (
        f"All backends in one process on the same inputs, {plan.threads} intra-op threads for PyTorch and ONNX Runtime "
        f"(ONNX Runtime inter-op 1); per backend {plan.warmup} untimed warm-up call(s), then {plan.runs} timed rounds in "
        "which every image goes through every backend in turn (interleaved, so drift hits all alike); end-to-end is the "
        "wall time of one segment() call, stages come from the segmenter's own clock (CUDA synchronised); p50/p90/p99 "
        "are numpy linear percentiles over all timed calls, images/s is 1 / mean; peak RSS is the process's resident "
        "memory sampled by a thread while that backend's calls ran; label agreement is the share of pixels labelled "
        "as eager labels them on the same image; text costs are measured after the image runs."
    )


def run_bench(backends: list, inputs: BenchInputs, plan: BenchPlan, model: dict, report=print) -> dict:
    """Measure `backends` (vocabulary set here) on `inputs`; the document of benchmarks/SCHEMA.md."""
    notes: list[str] = []
    with torch_threads(plan.threads):
        for backend in backends:
            backend.set_vocabulary(inputs.vocabulary)
        report(f"bench: {len(inputs.images)} image(s) x {len(backends)} backend(s), {plan.warmup} warm-up, {plan.runs} rounds")
        entries, memory = _measure(backends, inputs, plan, report)
        for backend in backends:
            entries[backend.name]["text"] = vars(backend.text_cost(inputs.vocabulary, "main"))
        sweeps = run_sweeps(backends, inputs, plan, report)
        threads = thread_counts(plan.threads)
    compute = _compute(entries, model, plan, report, notes)
    if "eager" not in entries:
        notes.append("label_agreement is null: it compares with eager, which was not among the backends")
    if inputs.resize:
        notes.append("user images: the model's test resize applied (its min_size_test and max_size_test; officially 640 and 2560)")
    eager_mean = entries["eager"]["end_to_end"]["mean"] if "eager" in entries else None
    ratios = {name: (eager_mean / e["end_to_end"]["mean"] if eager_mean else None) for name, e in entries.items()}
    return {
        "schema_version": SCHEMA_VERSION,
        "method": method(plan),
        "machine": machine(),
        "threads": threads,
        "versions": versions(),
        "model": model,
        "inputs": {
            "images": [{"name": n, "height": int(i.shape[0]), "width": int(i.shape[1])}
                       for n, i in zip(inputs.image_names, inputs.images)],
            "vocabulary": {"name": inputs.vocabulary_name, "size": len(inputs.vocabulary)},
            "resize": inputs.resize,
        },
        "runs": plan.runs,
        "warmup": plan.warmup,
        "seed": plan.seed,
        "memory": memory,
        "backends": entries,
        "ratios": ratios,
        "sweeps": sweeps,
        "compute": compute,
        "notes": notes,
    }


def _compute(entries: dict, model: dict, plan: BenchPlan, report, notes: list[str]) -> dict | None:
    """This machine's fp32, bf16 and int8 matrix-product rates (OpenVINO), measured in this run, and
    the rate each backend's region stage reached: how far each stands from the machine's limits."""
    if any(e["device"] != "cpu" for e in entries.values()) or not model.get("clip_vision"):
        return None
    try:
        from .gemm_rates import gemm_rates, region_rates

        report("bench: the machine's matrix-product rates (OpenVINO, fp32 / bf16 / int8)")
        rates = gemm_rates(plan.threads)
    except ImportError as exc:  # the runtime-only install may lack onnx, which writes the test graphs
        notes.append(f"compute is null: the matrix-product rates need {exc.name}")
        return None
    return {"gemm": rates, "region_stage": region_rates(entries, model["clip_vision"], rates)}


def _measure(backends: list, inputs: BenchInputs, plan: BenchPlan, report) -> tuple[dict, dict]:
    by_name = {b.name: b for b in backends}
    labels: dict[tuple[str, int], np.ndarray] = {}  # the first label map of each backend and image
    gpu_peaks: dict[str, int] = {}

    def call(name: str, index: int):
        result = by_name[name].segment(inputs.images[index])
        labels.setdefault((name, index), result.label_map)
        return result.timings, result.num_regions

    with RssSampler() as rss:
        @contextmanager
        def watch(name: str):
            backend = by_name[name]
            backend.begin_call()
            with rss.attribute(name):
                yield
            gpu = backend.gpu_bytes()
            if gpu is not None:
                gpu_peaks[name] = max(gpu_peaks.get(name, 0), gpu)

        timed = interleaved_rounds(list(by_name), len(inputs.images), call, plan.runs, plan.warmup, around=watch,
                                   report=report)
    entries = {}
    for name, backend in by_name.items():
        samples = timed[name]
        end_to_end = summarise(t.seconds for t in samples)
        entries[name] = {
            "precision": backend.precision,
            "providers": list(backend.providers),
            "device": backend.device,
            "end_to_end": end_to_end,
            "stages": stage_summaries([t.value[0] for t in samples]),
            "images_per_s": 1.0 / end_to_end["mean"],
            "peak_rss_bytes": rss.peaks[name],
            "rss_before_bytes": rss.before[name],
            "gpu_peak_bytes": gpu_peaks.get(name),
            "valid_regions": [t.value[1] for t in samples if t.round == 0],
            "label_agreement": _agreement(labels, name, len(inputs.images)) if "eager" in by_name else None,
        }
    memory = {"rss": rss.source, "gpu": "eager: torch.cuda.max_memory_allocated per call; runtime on a GPU: device "
                                        "memory in use (total - free, all contexts) after each call"}
    return entries, memory


def _agreement(labels: dict, name: str, images: int) -> dict:
    shares = [float(np.mean(labels[(name, i)] == labels[("eager", i)])) for i in range(images)]
    return {"mean": float(np.mean(shares)), "min": float(np.min(shares))}
