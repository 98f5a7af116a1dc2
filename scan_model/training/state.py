"""Training checkpoints: the model in our safetensors format, plus what an exact resume needs.

A checkpoint is a folder `checkpoints/iter_0000300/` holding `model.safetensors` (+ its JSON
config, loadable by every other command) and `state.safetensors`: optimizer moments, the
scheduler position, every rank's RNG state, the iteration and the training config. The folder
is built under a temporary name and renamed, and `last_checkpoint` (one line, replaced
atomically) names the newest one, so a run killed at any moment leaves a usable checkpoint.
Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import ScanError
from runtime.files import atomic_write

from ..checkpoint import read_safetensors

LAST = "last_checkpoint"
CHECKPOINTS = "checkpoints"
STATE_FORMAT = "scan-deploy-train-state/1"
MODEL = "model.safetensors"


class ResumeError(ScanError):
    """A run that cannot be resumed; the message says why and what to do."""


@dataclass
class TrainingState:
    iteration: int  # iterations completed
    optimizer: dict
    scheduler: dict
    rng: list[torch.Tensor]  # the CPU RNG state of every rank, by rank
    cuda_rng: list[torch.Tensor | None]
    train_config: dict
    dataset: dict


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(out: Path, write_model: Callable[[Path], object], state: TrainingState, keep: int) -> Path:
    """Write checkpoint folder `iter_N` and point `last_checkpoint` at it; prune old folders.

    `write_model(path)` writes the model's safetensors file at `path` (`model.safetensors`).
    """
    from safetensors.torch import save_file

    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.iteration)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_model(tmp / MODEL)
        tensors, meta = _flatten_state(state)
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": STATE_FORMAT, "state": json.dumps(meta)})
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(Path(out) / LAST, lambda p: p.write_text(final.name + "\n"))
    periodic = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))
    for old in periodic[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_point(out: Path, resume: bool, log: str, what: str) -> tuple[dict | None, TrainingState | None]:
    """The model tensors and state a run in `out` continues from, or (None, None) for a new run.

    Refuses an `out` that is not a folder, `--resume` with nothing to resume, and a new run over
    an existing one (`log` is the run's log file name, `what` names the kind of run).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ScanError(f"--out {out} exists and is not a folder")
    folder = latest(out) if out.is_dir() else None
    if resume:
        if folder is None:
            raise ResumeError(f"nothing to resume in {out}: no {LAST}; drop --resume to start a new run")
        return load(folder)
    if folder is not None or (out / log).exists():
        raise ScanError(f"{out} already holds a {what}: pass --resume to continue it, or choose another --out")
    return None, None


def latest(out: Path) -> Path | None:
    """The folder `last_checkpoint` names, or None when the run has none yet."""
    pointer = Path(out) / LAST
    if not pointer.is_file():
        return None
    folder = Path(out) / CHECKPOINTS / pointer.read_text().strip()
    if not (folder / MODEL).is_file() or not (folder / "state.safetensors").is_file():
        raise ResumeError(f"{pointer} names {folder}, which is missing or incomplete: delete {pointer} to start over")
    return folder


def load(folder: Path) -> tuple[dict[str, torch.Tensor], TrainingState]:
    """The model tensors and the training state of checkpoint `folder`."""
    from safetensors import safe_open

    with safe_open(str(folder / "state.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != STATE_FORMAT:
            raise ResumeError(f"{folder}/state.safetensors is not a scan training state ({metadata.get('format')!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return read_safetensors(folder / MODEL), _unflatten_state(tensors, json.loads(metadata["state"]))


def _flatten_state(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    moments = {}
    for index, values in state.optimizer["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                key = f"optimizer.{index}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                entry[name] = key
            else:
                entry[name] = {"value": value}
        moments[str(index)] = entry
    for rank, rng in enumerate(state.rng):
        tensors[f"rng.cpu.{rank}"] = rng.cpu()
    for rank, rng in enumerate(state.cuda_rng):
        if rng is not None:
            tensors[f"rng.cuda.{rank}"] = rng.cpu()
    meta = {
        "iteration": state.iteration,
        "optimizer": {"state": moments, "param_groups": state.optimizer["param_groups"]},
        "scheduler": state.scheduler,
        "ranks": len(state.rng),
        "train_config": state.train_config,
        "dataset": state.dataset,
    }
    return tensors, meta


def _unflatten_state(tensors: dict[str, torch.Tensor], meta: dict) -> TrainingState:
    optimizer_state = {}
    for index, entry in meta["optimizer"]["state"].items():
        optimizer_state[int(index)] = {
            name: (tensors[ref] if isinstance(ref, str) else ref["value"]) for name, ref in entry.items()
        }
    ranks = meta["ranks"]
    return TrainingState(
        iteration=meta["iteration"],
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
        scheduler=meta["scheduler"],
        rng=[tensors[f"rng.cpu.{r}"] for r in range(ranks)],
        cuda_rng=[tensors.get(f"rng.cuda.{r}") for r in range(ranks)],
        train_config=meta["train_config"],
        dataset=meta["dataset"],
    )
