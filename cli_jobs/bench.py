"""`scan bench`: check every input, get the bundle(s) and the eager model, run the harness, write results.

Nothing is exported or timed before every input has passed `bench_checks.check_options`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from runtime.files import atomic_write
from runtime.vocab import benchmark_vocabularies

from .bench_checks import BenchOptions, Checked, check_options
from .common import say

__all__ = ["BenchOptions", "run_bench_job"]


def _models(opts: BenchOptions, checked: Checked) -> tuple[dict, object]:
    """The bundle of each precision (exported once into the cache for a preset or checkpoint) and the eager model."""
    from .bench_models import cached_bundle, eager_model_for_bundle

    loaded = None

    def cpu_model():
        nonlocal loaded
        if loaded is None:
            from scan_model.loading import load_model

            loaded = load_model(opts.checkpoint, opts.config or opts.preset, device="cpu", seed=opts.seed)
        return loaded.model

    names = checked.names
    if checked.source == "bundle":
        bundles = {n.variant: opts.bundle for n in names}
    else:  # one export holding the fp32 pieces and every extra precision asked for
        precision = ",".join(sorted({n.variant for n in names if n.variant != "fp32"})) or "fp32"
        folder = cached_bundle(checked.config, checked.weights, precision, checked.digest, cpu_model, say)
        bundles = {n.variant: folder for n in names}
    if not any(n.kind == "eager" for n in names):
        return bundles, None
    if checked.source != "bundle":
        return bundles, cpu_model().to(opts.device)
    loaded = eager_model_for_bundle(opts.bundle, checked.manifest, opts.checkpoint, opts.config, opts.seed, opts.device)
    if checked.digest is None:  # the seed is known now: eager's weights were checked against the bundle's
        checked.weights = f"random weights (seed {opts.seed})"
    return bundles, loaded.model


def run_bench_job(opts: BenchOptions) -> dict:
    from benchmarks.backends import EagerBackend, RuntimeBackend
    from benchmarks.bench import BenchInputs, BenchPlan, run_bench
    from runtime.synthetic import synthetic_scene

    checked = check_options(opts)
    bundles, eager_model = _models(opts, checked)
    resize = bool(checked.images)  # user images get the official resize; a generated scene keeps its size
    height, width = checked.size
    images = checked.images or [synthetic_scene(height, width, seed=opts.seed)]
    image_names = [p.name for p in checked.image_files] or [f"scene-{height}x{width}-seed{opts.seed}"]
    vocabulary_name = str(opts.vocab) if str(opts.vocab) in benchmark_vocabularies() else "custom"
    inputs = BenchInputs(images, image_names, checked.vocabulary, vocabulary_name, resize)
    plan = BenchPlan(runs=opts.runs, warmup=opts.warmup, threads=checked.threads, seed=opts.seed, sweeps=checked.sweeps)
    model = {"name": checked.config["name"], "source": checked.source, "weights": checked.weights,
             "bundles": {n.name: str(bundles[n.variant]) for n in checked.names if n.kind != "eager"},
             "clip_vision": checked.config.get("clip", {}).get("vision")}
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as cache_root:  # text caches of this run only
        backends = [
            EagerBackend(eager_model, resize, opts.seed) if n.kind == "eager"
            else RuntimeBackend(n, bundles[n.variant], checked.threads, resize, Path(cache_root), report=say)
            for n in checked.names
        ]
        result = run_bench(backends, inputs, plan, model, report=say)
        del backends  # sessions closed before their cache folder goes
    _write_outputs(result, opts)
    return result


def _write_outputs(result: dict, opts: BenchOptions) -> None:
    from benchmarks.report import markdown

    text = markdown(result)
    print(text)
    if opts.json is not None:
        atomic_write(opts.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        say(f"results: {opts.json}")
    if opts.markdown is not None:
        atomic_write(opts.markdown, lambda tmp: tmp.write_text(text))
        say(f"tables: {opts.markdown}")
    if opts.plot is not None:
        from benchmarks.plots import write_plots

        for path in write_plots(result, opts.plot):
            say(f"plot: {path}")
