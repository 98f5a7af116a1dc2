"""Sweeps of `scan bench`: one quantity varied, every backend measured at each value.

Each sweep uses the run's protocol (warm-up, interleaved rounds) and returns
{"values": [...], "measures": what a row's times are, "backends": {name: [row per value]}}.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from runtime.synthetic import synthetic_scene
from runtime.vocab import benchmark_vocabularies

from .rounds import interleaved_rounds
from .stats import summarise

SWEEPS = ("image_size", "vocab", "proposals", "batch")


def run_sweeps(backends: list, inputs, plan, report=print) -> dict:
    functions = {"image_size": sweep_image_size, "vocab": sweep_vocab, "proposals": sweep_proposals, "batch": sweep_batch}
    out = {}
    for name, values in plan.sweeps.items():
        report(f"sweep {name}: {', '.join(map(str, values))}")
        out[name] = functions[name](backends, inputs, plan, values, report)
    return out


def _row(value, seconds: list[float], per: int = 1) -> dict:
    summary = summarise(s / per for s in seconds)
    return {"value": value, "mean_s": summary["mean"], "p50_s": summary["p50"], "p90_s": summary["p90"]}


def _rounds(backends: list, inputs: int, call, plan) -> dict:
    return interleaved_rounds([b.name for b in backends], inputs, call, plan.runs, plan.warmup)


@contextmanager
def _own_size(backends: list):
    """Images at the size asked for: the official resize off for the block."""
    previous = [b.segmenter.resize for b in backends]
    for b in backends:
        b.segmenter.resize = False
    try:
        yield
    finally:
        for b, resize in zip(backends, previous):
            b.segmenter.resize = resize


def sweep_image_size(backends: list, inputs, plan, values: list[tuple[int, int]], report=print) -> dict:
    """End to end and per stage at each HxW, on a generated scene fed without the official resize."""
    by_name = {b.name: b for b in backends}
    rows: dict[str, list] = {b.name: [] for b in backends}
    with _own_size(backends):
        for height, width in values:
            image = synthetic_scene(height, width, seed=plan.seed)
            timed = _rounds(backends, 1, lambda name, i: by_name[name].segment(image).timings, plan)
            for name, samples in timed.items():
                row = _row(f"{height}x{width}", [t.seconds for t in samples])
                stages = list(dict.fromkeys(k for t in samples for k in t.value))
                row["stages"] = {k: float(np.mean([t.value.get(k, 0.0) for t in samples])) for k in stages}
                rows[name].append(row)
    return {"values": [f"{h}x{w}" for h, w in values], "measures": "seconds per image, end to end, on a generated scene of that size (stages: mean s)",
            "backends": rows}


def sweep_vocab(backends: list, inputs, plan, values: list[int], report=print) -> dict:
    """The first n names of ade847: text cost cold and warm, then seconds per image with that vocabulary."""
    ade847 = benchmark_vocabularies()["ade847"]
    by_name = {b.name: b for b in backends}
    rows: dict[str, list] = {b.name: [] for b in backends}
    try:
        for n in values:
            names = ade847[:n]
            text = {b.name: b.text_cost(names, f"sweep-{n}") for b in backends}
            for b in backends:
                b.set_vocabulary(names)
            timed = _rounds(backends, len(inputs.images), lambda name, i: by_name[name].segment(inputs.images[i]), plan)
            for name, samples in timed.items():
                cost = text[name]
                rows[name].append({**_row(n, [t.seconds for t in samples]), "text_cold_s": cost.cold_s,
                                   "text_warm_s": cost.warm_s, "cold_encoder_calls": cost.cold_encoder_calls,
                                   "warm_encoder_calls": cost.warm_encoder_calls})
    finally:
        for b in backends:
            b.set_vocabulary(inputs.vocabulary)
    return {"values": list(values), "measures": "seconds per image with the first n ade847 names; text cold/warm s",
            "backends": rows}


def sweep_proposals(backends: list, inputs, plan, values: list[int], report=print) -> dict:
    """The region stage (CLIP adapter) alone with exactly N valid proposals, on the first image as given.

    The N proposals are those with the highest mask probability; where fewer than N pass the
    mask threshold, the threshold of these calls is lowered just enough that all N do (the
    crops go through CLIP at a fixed size, so the cost depends on N, not on mask shapes).
    """
    image = inputs.images[0]
    stages = {b.name: b.region_stage(image) for b in backends}
    queries = min(len(s.row_max) for s in stages.values())
    if max(values) > queries:
        raise ValueError(f"proposal counts up to {max(values)} asked, the model has {queries} proposals")
    thresholds = {b.name: b.segmenter.settings.mask_threshold for b in backends}
    rows: dict[str, list] = {b.name: [] for b in backends}
    for n in values:
        plans = {}
        for name, stage in stages.items():
            chosen = np.sort(np.argsort(-stage.row_max, kind="stable")[:n])
            plans[name] = (chosen, min(thresholds[name], float(stage.row_max[chosen].min()) * 0.999))
        timed = _rounds(backends, 1, lambda name, i: stages[name].run(*plans[name]), plan)
        for name, samples in timed.items():
            rows[name].append({**_row(n, [t.seconds for t in samples]), "valid": samples[-1].value,
                               "mask_threshold": plans[name][1]})
    return {"values": list(values), "measures": "seconds of the region stage (CLIP adapter) per call", "backends": rows}


def sweep_batch(backends: list, inputs, plan, values: list[int], report=print) -> dict:
    """B images per call (`segment_batch`; the eager model loops): seconds per image."""
    by_name = {b.name: b for b in backends}
    rows: dict[str, list] = {b.name: [] for b in backends}
    for size in values:
        batch = [inputs.images[i % len(inputs.images)] for i in range(size)]
        timed = _rounds(backends, 1, lambda name, i: by_name[name].segment_batch(batch), plan)
        for name, samples in timed.items():
            rows[name].append(_row(size, [t.seconds for t in samples], per=size))
    return {"values": list(values), "measures": "seconds per image with B images per call", "backends": rows}
