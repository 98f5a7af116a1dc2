"""Summary statistics of timed runs: the percentiles and mean `scan bench` reports."""

from __future__ import annotations

import numpy as np

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99}


def summarise(samples) -> dict:
    """p50, p90, p99 (numpy's linear interpolation), mean and the number of samples.

    With few runs p99 is close to the maximum; the sample count is reported so a reader can tell.
    """
    values = np.asarray(list(samples), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarise")
    summary = {key: float(np.percentile(values, q, method="linear")) for key, q in PERCENTILES.items()}
    summary["mean"] = float(values.mean())
    summary["runs"] = int(values.size)
    return summary


def stage_summaries(timings: list[dict[str, float]]) -> dict[str, dict]:
    """Per stage (in first-seen order) the summary of its times, without the sample count."""
    stages = list(dict.fromkeys(key for entry in timings for key in entry))
    out = {}
    for stage in stages:
        summary = summarise(entry[stage] for entry in timings if stage in entry)
        summary.pop("runs")
        out[stage] = summary
    return out
