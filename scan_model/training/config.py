"""The training recipe as data: solver, augmentation, losses and the loop's own settings.

`recipe(model_name)` gives the official recipe for `vitb`/`vitl` (SPEC §3) and CPU-sized
defaults for `tiny`; an official YAML's SOLVER/INPUT/MASK_FORMER keys override it
(`recipe_from_official`), and every field can be overridden on the command line with a
dotted key (`solver.base_lr=1e-4`), checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

from runtime.errors import ScanError

from ..official_config import get_dotted
from .augment import AugmentConfig
from .criterion import LossConfig


class TrainConfigError(ScanError, ValueError):
    """A training setting that does not exist or has a bad value; the message names it."""


@dataclass
class SolverConfig:
    """AdamW with the official parameter groups, warm-up then poly decay (SPEC §3.4)."""

    base_lr: float = 6e-5
    weight_decay: float = 0.01
    weight_decay_norm: float = 0.0  # every parameter of a normalisation layer
    weight_decay_embed: float = 0.0  # nn.Embedding weights (decoder queries, level embedding)
    backbone_multiplier: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_iter: int = 120_000
    warmup_iters: int = 1500
    warmup_factor: float = 1e-6
    poly_power: float = 0.9
    clip_grad_norm: float = 0.01  # full-model L2 norm; 0 turns clipping off
    ims_per_batch: int = 32  # global batch, split evenly over the processes
    amp: bool = True  # mixed precision on CUDA only (the official recipe trains in fp32)


@dataclass
class TrainConfig:
    solver: SolverConfig = field(default_factory=SolverConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    checkpoint_period: int = 5000
    keep_checkpoints: int = 2  # the newest N periodic checkpoints are kept; the final one always
    log_period: int = 20
    num_workers: int = 2
    # Written into the trained checkpoint's inference settings when set. `tiny` sets 0 (the
    # in-vocabulary classifier alone): its CLIP towers are random until `scan finetune-clip`.
    ensemble_weight: float | None = None
    # Also written into the checkpoint: the test resize's short side (the official 640 suits
    # the official training scales; `tiny` trains around 256 and is tested there).
    test_min_size: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        config = cls()
        for key, value in _flatten(data):
            set_value(config, key, value)
        return config

    def validate(self) -> None:
        s, a, loss = self.solver, self.augment, self.loss
        checks = [
            (s.base_lr > 0, f"solver.base_lr must be positive, got {s.base_lr}"),
            (s.max_iter >= 1, f"solver.max_iter must be at least 1, got {s.max_iter}"),
            (s.ims_per_batch >= 1, f"solver.ims_per_batch must be at least 1, got {s.ims_per_batch}"),
            (0 <= s.warmup_iters, f"solver.warmup_iters must be >= 0, got {s.warmup_iters}"),
            (0 < s.warmup_factor <= 1, f"solver.warmup_factor must be in (0, 1], got {s.warmup_factor}"),
            (s.clip_grad_norm >= 0, f"solver.clip_grad_norm must be >= 0, got {s.clip_grad_norm}"),
            (loss.num_points >= 1, f"loss.num_points must be at least 1, got {loss.num_points}"),
            (0 <= loss.importance_sample_ratio <= 1, "loss.importance_sample_ratio must be in [0, 1]"),
            (loss.oversample_ratio >= 1, "loss.oversample_ratio must be at least 1"),
            (self.checkpoint_period >= 1, "checkpoint_period must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (all(m % 32 == 0 for m in a.crop_size), f"augment.crop_size {tuple(a.crop_size)} must be multiples of 32"),
            (len(a.min_sizes) > 0, "augment.min_sizes is empty"),
            (self.ensemble_weight is None or 0 <= self.ensemble_weight <= 1, "ensemble_weight must be in [0, 1]"),
            (self.test_min_size is None or self.test_min_size >= 32, "test_min_size must be at least 32"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise TrainConfigError("bad training config: " + "; ".join(problems))


def recipe(model_name: str) -> TrainConfig:
    """The official recipe (`vitb`, `vitl`, SPEC §3), or CPU-sized defaults for `tiny`."""
    config = TrainConfig()
    if model_name == "tiny":
        # A few hundred iterations take minutes on 2 CPU cores: 256-pixel crops, batch 2,
        # a short warm-up and a larger learning rate (the official 6e-5 is tuned for 120k iterations).
        config.solver = SolverConfig(base_lr=3e-4, max_iter=300, warmup_iters=20, ims_per_batch=2)
        config.augment = AugmentConfig(min_sizes=tuple(range(192, 385, 32)), max_size=1024, crop_size=(256, 256))
        config.loss = LossConfig(num_points=3136)
        config.checkpoint_period = 100
        config.log_period = 10
        config.num_workers = 0  # on 2 cores a loader process slows each iteration by ~1.5x
        config.ensemble_weight = 0.0
        config.test_min_size = 256
    return config


def recipe_from_official(base: TrainConfig, data: dict) -> TrainConfig:
    """Override `base` with the training keys of an official YAML (already read into a dict)."""
    mapping = {
        "SOLVER.BASE_LR": "solver.base_lr", "SOLVER.WEIGHT_DECAY": "solver.weight_decay",
        "SOLVER.WEIGHT_DECAY_NORM": "solver.weight_decay_norm", "SOLVER.WEIGHT_DECAY_EMBED": "solver.weight_decay_embed",
        "SOLVER.BACKBONE_MULTIPLIER": "solver.backbone_multiplier", "SOLVER.MAX_ITER": "solver.max_iter",
        "SOLVER.WARMUP_ITERS": "solver.warmup_iters", "SOLVER.WARMUP_FACTOR": "solver.warmup_factor",
        "SOLVER.IMS_PER_BATCH": "solver.ims_per_batch", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": "solver.clip_grad_norm",
        "SOLVER.CHECKPOINT_PERIOD": "checkpoint_period", "SEED": "seed",
        "INPUT.MIN_SIZE_TRAIN": "augment.min_sizes", "INPUT.MAX_SIZE_TRAIN": "augment.max_size",
        "INPUT.CROP.SIZE": "augment.crop_size", "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": "augment.single_category_max_area",
        "INPUT.COLOR_AUG_SSD": "augment.color_jitter",
        "MODEL.MASK_FORMER.CLASS_WEIGHT": "loss.class_weight", "MODEL.MASK_FORMER.MASK_WEIGHT": "loss.mask_weight",
        "MODEL.MASK_FORMER.DICE_WEIGHT": "loss.dice_weight", "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": "loss.no_object_weight",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": "loss.num_points", "MODEL.MASK_FORMER.OVERSAMPLE_RATIO": "loss.oversample_ratio",
        "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": "loss.importance_sample_ratio",
        "MODEL.MASK_FORMER.DEEP_SUPERVISION": "loss.deep_supervision",
    }
    config = TrainConfig.from_dict(base.to_dict())
    for official, ours in mapping.items():
        value = get_dotted(data, official)
        if value is None:
            continue
        if official == "INPUT.CROP.SIZE" and isinstance(value, str):  # "(640, 640)" in the YAML
            value = [int(v) for v in value.strip("()[] ").split(",") if v.strip()]
        if official == "INPUT.MIN_SIZE_TRAIN" and isinstance(value, int):
            value = [value]
        if official == "SEED" and value < 0:
            continue  # the official -1 means a time-derived seed; we stay deterministic
        set_value(config, ours, value)
    if get_dotted(data, "SOLVER.CLIP_GRADIENTS.ENABLED") is False:
        config.solver.clip_grad_norm = 0.0
    return config


def resumed_config(cls, saved: dict, overrides: list[tuple[str, str]], resumable: tuple[str, ...]):
    """The recorded config (`cls.from_dict(saved)`) of a run being resumed.

    Settings given again on the command line must agree with it, except those in `resumable`
    (they do not change what the steps compute), which apply.
    """
    from .state import ResumeError

    recorded = cls.from_dict(saved)
    changed = []
    for key, value in overrides:
        probe = cls.from_dict(saved)
        set_value(probe, key, value)
        before, after = dict(_flatten(recorded.to_dict())), dict(_flatten(probe.to_dict()))
        if key in resumable:
            set_value(recorded, key, value)
        elif before.get(key) != after.get(key):
            changed.append(f"{key}: {_shown(before.get(key))} -> {_shown(after.get(key))}")
    if changed:
        raise ResumeError(f"--resume continues the recorded run, but these settings differ: {', '.join(changed)}; "
                          "start a new run in another --out to change them")
    recorded.validate()
    return recorded


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def keys(config: TrainConfig) -> list[str]:
    """Every dotted key that `set_value` accepts."""
    return [key for key, _ in _flatten(config.to_dict())]


def set_value(config: TrainConfig, dotted: str, value) -> None:
    """Set `dotted` (e.g. "solver.base_lr") to `value` (a string from the command line, or typed)."""
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown(dotted, config)
        node = getattr(node, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)} or \
            dataclasses.is_dataclass(getattr(node, name)):
        raise _unknown(dotted, config)
    hint = typing.get_type_hints(type(node))[name]
    setattr(node, name, _coerce(dotted, value, hint))


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """["solver.base_lr=1e-4", ...] -> [(key, text)], refusing items without '='."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"bad --set {item!r}: write KEY=VALUE, e.g. solver.base_lr=1e-4")
        pairs.append((key.strip(), text.strip()))
    return pairs


def _unknown(dotted: str, config: TrainConfig) -> TrainConfigError:
    known = keys(config)
    prefix = dotted.split(".")[0]
    near = [k for k in known if k.startswith(prefix + ".")] or known
    return TrainConfigError(f"unknown training setting {dotted!r}; known: {', '.join(near)}")


def _coerce(dotted: str, value, hint):
    """Turn `value` (maybe command-line text) into the field's type, or say what was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if isinstance(value, str) and (origin is tuple or hint in (bool,)):
            value = json.loads(value if origin is not tuple else "[" + value.strip("()[] ") + "]")
        if origin is tuple:
            items = list(value)
            inner = args[0] if args else float
            return tuple(inner(v) for v in items)
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            return float(value)
        return hint(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        kind = getattr(hint, "__name__", str(hint))
        raise TrainConfigError(f"bad value {value!r} for {dotted}: expected {kind}") from None


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value
