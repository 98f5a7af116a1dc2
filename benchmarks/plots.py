"""`scan bench` plots (matplotlib, Agg): stacked per-stage bars per backend, and one line plot per sweep.

Figures are drawn without pyplot, so no GUI backend and no global state is touched; files are
written atomically.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from runtime.errors import ScanError
from runtime.files import atomic_write

from .report import stage_order


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ScanError("--plot needs matplotlib: pip install 'scan-deploy[export]' (or matplotlib)")


def sweep_plot_path(plot: Path, sweep: str) -> Path:
    return plot.with_name(f"{plot.stem}_{sweep}.png")


def _save(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def stage_bars(result: dict, path: Path) -> None:
    """One bar per backend, its height the mean seconds per image, split into the stages."""
    from matplotlib.figure import Figure

    backends = result["backends"]
    names = list(backends)
    figure = Figure(figsize=(max(4.0, 1.4 * len(names) + 2), 4.5))
    axes = figure.subplots()
    bottom = [0.0] * len(names)
    for stage in stage_order(backends):
        heights = [backends[n]["stages"].get(stage, {}).get("mean", 0.0) for n in names]
        axes.bar(names, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes.set_ylabel("seconds per image (mean)")
    axes.set_title(f"{result['model']['name']}: stages per backend")
    axes.legend(fontsize="small")
    _save(figure, path)


def sweep_lines(name: str, sweep: dict, path: Path) -> None:
    """Mean seconds against the swept value, one line per backend (text cost beside it for the vocab sweep)."""
    from matplotlib.figure import Figure

    values = sweep["values"]
    numeric = all(isinstance(v, (int, float)) for v in values)
    x = values if numeric else list(range(len(values)))
    with_text = name == "vocab"
    figure = Figure(figsize=(10 if with_text else 6, 4.5))
    axes = figure.subplots(1, 2) if with_text else [figure.subplots()]
    for backend, rows in sweep["backends"].items():
        (line,) = axes[0].plot(x, [r["mean_s"] for r in rows], marker="o", label=backend)
        if with_text:
            colour = line.get_color()
            axes[1].plot(x, [r["text_cold_s"] for r in rows], marker="o", color=colour, label=f"{backend} cold")
            if any(r["text_warm_s"] is not None for r in rows):
                axes[1].plot(x, [r["text_warm_s"] for r in rows], marker="x", linestyle="--", color=colour,
                             label=f"{backend} warm")
    for ax in axes:
        ax.set_xlabel(name.replace("_", " "))
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
        ax.legend(fontsize="small")
    axes[0].set_ylabel("region stage, s per call" if name == "proposals" else "s per image (mean)")
    axes[0].set_title(f"sweep: {name}")
    if with_text:
        axes[1].set_ylabel("vocabulary set-up (s)")
        axes[1].set_yscale("log")
    _save(figure, path)


def write_plots(result: dict, plot: Path) -> list[Path]:
    """The stage plot at `plot` and `<stem>_<sweep>.png` beside it for each sweep; the paths written."""
    stage_bars(result, plot)
    written = [plot]
    for name, sweep in result["sweeps"].items():
        target = sweep_plot_path(plot, name)
        sweep_lines(name, sweep, target)
        written.append(target)
    return written
