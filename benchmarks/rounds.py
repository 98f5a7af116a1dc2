"""The timing loop every `scan bench` measurement shares: warm-up, then interleaved rounds.

Backends alternate within a round (each input goes through every backend in turn), so slow
drift of the machine (thermal state, other load, page cache) falls on all backends alike.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Timed:
    round: int  # 0-based timed round
    index: int  # which input
    seconds: float
    value: Any  # what the call returned


def interleaved_rounds(backends: list[str], inputs: int, call: Callable[[str, int], Any], runs: int, warmup: int,
                       around: Callable[[str], Any] | None = None, report=None) -> dict[str, list[Timed]]:
    """`warmup` untimed calls per backend (cycling through the inputs), then `runs` timed rounds.

    `call(backend, index)` does the work; `around(backend)` gives a context manager wrapped
    around every call, warm-ups included (memory sampling); its cost is outside the timed span.
    """
    around = around or (lambda name: nullcontext())
    for name in backends:
        for i in range(warmup):
            with around(name):
                call(name, i % inputs)
    timed: dict[str, list[Timed]] = {name: [] for name in backends}
    for round_ in range(runs):
        if report:
            report(f"round {round_ + 1}/{runs}")
        for index in range(inputs):
            for name in backends:
                with around(name):
                    start = time.perf_counter()
                    value = call(name, index)
                    seconds = time.perf_counter() - start
                timed[name].append(Timed(round_, index, seconds, value))
    return timed
