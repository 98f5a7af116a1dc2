"""Read the official detectron2-style YAML configs as plain data (never executed).

The official `scan_vit{B,L}.yaml` set `INPUT.MIN_SIZE_TRAIN` with a
`!!python/object/apply:eval` tag. We never evaluate YAML: the one expression the official
files use is mapped to the value it stands for, anything else is refused. Keys that only
matter to detectron2 (anchor generators, ROI heads, solvers, ...) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .calibration import CalibrationConfig
from .clip_towers import clip_config
from .config import ConfigError, InferenceConfig, ScanConfig
from .mask_decoder import MaskDecoderConfig
from .pixel_decoder import PixelDecoderConfig
from .presets import PRESETS, preset
from .swin import SwinConfig


# The only eval expression of the official configs, and what it evaluates to.
_KNOWN_EVALS = {"[int(x*0.1*640)forxinrange(5,21)]": [int(x * 0.1 * 640) for x in range(5, 21)]}


class _OfficialLoader(yaml.SafeLoader):
    """SafeLoader that understands the official configs' single eval tag."""


def _construct_eval(loader: yaml.SafeLoader, node: yaml.Node):
    args = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else [loader.construct_scalar(node)]
    expression = "".join(str(args[0]).split()) if args else ""
    if expression in _KNOWN_EVALS:
        return list(_KNOWN_EVALS[expression])
    raise ConfigError(
        f"refusing to evaluate YAML expression {args!r} (line {node.start_mark.line + 1}): configs are read as data; "
        "replace the !!python/object/apply:eval tag with the literal value"
    )


_OfficialLoader.add_constructor("tag:yaml.org,2002:python/object/apply:eval", _construct_eval)


def read_yaml(path: str | Path) -> dict:
    """Load an official YAML as a dict, following `_BASE_` the way detectron2 does."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_OfficialLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a YAML mapping")
    base = data.pop("_BASE_", None)
    if base:
        merged = read_yaml(path.parent / base)
        _merge(merged, data)
        data = merged
    return data


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def get_dotted(tree: dict, dotted: str, default=None):
    """tree["A"]["B"] for "A.B", or `default` where a level is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


_UNSUPPORTED = {
    # key: value the official configs use (anything else changes the model in ways we do not implement)
    "MODEL.SWIN.APE": False,
    "MODEL.MASK_FORMER.PRE_NORM": False,
    "MODEL.SEM_SEG_HEAD.NORM": "GN",
    "MODEL.CLIP_ADAPTER.MASK_FILL": "mean",
    "MODEL.CLIP_ADAPTER.MASK_MATTING": False,
    "MODEL.CLIP_ADAPTER.MASK_EXPAND_RATIO": 1.0,
    "MODEL.CLIP_ADAPTER.REGION_RESIZED": True,
    "MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE": True,
    "MODEL.CLIP_ADAPTER.TEXT_TEMPLATES": "vild",
}
_NAMES = {"ViT-B-16": "vitb", "ViT-L-14": "vitl", "SCAN-tiny-16": "tiny"}


def config_from_official(data: dict, source: str = "config") -> ScanConfig:
    """Translate an official config tree into a `ScanConfig` (validated)."""
    arch = get_dotted(data, "MODEL.META_ARCHITECTURE")
    if arch not in ("SCAN", "SCANDEMO"):
        raise ConfigError(f"{source}: MODEL.META_ARCHITECTURE is {arch!r}, expected 'SCAN' (is this a SCAN config?)")
    for key, official in _UNSUPPORTED.items():
        value = get_dotted(data, key, official)
        if value != official:
            raise ConfigError(f"{source}: {key} = {value!r} is not supported (the official SCAN configs use {official!r})")

    clip_name = get_dotted(data, "MODEL.CLIP_ADAPTER.CLIP_MODEL_NAME", "ViT-B-16")
    try:
        clip = clip_config(clip_name)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None

    g = lambda key, default=None: get_dotted(data, key, default)  # noqa: E731
    swin = SwinConfig(
        embed_dim=g("MODEL.SWIN.EMBED_DIM", 96),
        depths=tuple(g("MODEL.SWIN.DEPTHS", (2, 2, 6, 2))),
        num_heads=tuple(g("MODEL.SWIN.NUM_HEADS", (3, 6, 12, 24))),
        window_size=g("MODEL.SWIN.WINDOW_SIZE", 7),
        patch_size=g("MODEL.SWIN.PATCH_SIZE", 4),
        mlp_ratio=float(g("MODEL.SWIN.MLP_RATIO", 4.0)),
        qkv_bias=bool(g("MODEL.SWIN.QKV_BIAS", True)),
        drop_path_rate=float(g("MODEL.SWIN.DROP_PATH_RATE", 0.3)),
    )
    conv_dim = g("MODEL.SEM_SEG_HEAD.CONVS_DIM", 256)
    mask_dim = g("MODEL.SEM_SEG_HEAD.MASK_DIM", 256)
    heads = g("MODEL.MASK_FORMER.NHEADS", 8)
    pixel_decoder = PixelDecoderConfig(
        in_channels=tuple(swin.embed_dim * 2**i for i in range(4)),
        conv_dim=conv_dim,
        mask_dim=mask_dim,
        num_encoder_layers=g("MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 6),
        num_heads=heads,
        num_points=g("MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 4),
    )
    scan_dim = g("MODEL.SCAN_DIM", clip.embed_dim)
    mask_decoder = MaskDecoderConfig(
        in_channels=conv_dim,
        hidden_dim=g("MODEL.MASK_FORMER.HIDDEN_DIM", 256),
        num_queries=g("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 100),
        num_heads=heads,
        ffn_dim=g("MODEL.MASK_FORMER.DIM_FEEDFORWARD", 2048),
        # The official predictor passes DEC_LAYERS through without the usual -1 (fixtures README).
        num_layers=g("MODEL.MASK_FORMER.DEC_LAYERS", 10),
        mask_dim=mask_dim,
        embed_dim=g("MODEL.SEM_SEG_HEAD.EMBEDDING_DIM", scan_dim),
        embed_hidden_dim=g("MODEL.SEM_SEG_HEAD.EMBED_HIDDEN_DIM", 1024),
        embed_layers=g("MODEL.SEM_SEG_HEAD.EMBED_LAYERS", 2),
    )
    calibration = CalibrationConfig(
        clip_width=g("MODEL.CLIP_VISION_DIM", clip.width),
        embed_dim=scan_dim,
        grid_size=g("MODEL.PATCH_SIZE", clip.grid_size),
        sigmas=tuple(float(s) for s in g("MODEL.FREQUENCY_SIGMA", (9, 7, 3))),
    )
    inference = InferenceConfig(
        mask_threshold=float(g("MODEL.CLIP_ADAPTER.MASK_THR", 0.4)),
        ensemble_weight=float(g("MODEL.CLIP_ADAPTER.CLIP_ENSEMBLE_WEIGHT", 0.7)),
        replace_ratio=float(g("MODEL.CLIP_ADAPTER.REPLACE_RATIO", 0.15)),
        replace_layers=tuple(g("MODEL.CLIP_ADAPTER.REPLACE_LAYER", (1, 3, 5))),
        min_size_test=g("INPUT.MIN_SIZE_TEST", 640),
        max_size_test=g("INPUT.MAX_SIZE_TEST", 2560),
        size_divisibility=g("MODEL.MASK_FORMER.SIZE_DIVISIBILITY", 32),
        pixel_mean=tuple(float(v) for v in g("MODEL.PIXEL_MEAN", (123.675, 116.28, 103.53))),
        pixel_std=tuple(float(v) for v in g("MODEL.PIXEL_STD", (58.395, 57.12, 57.375))),
    )
    cfg = ScanConfig(
        name=_NAMES.get(clip.model_name, "custom"),
        swin=swin,
        pixel_decoder=pixel_decoder,
        mask_decoder=mask_decoder,
        calibration=calibration,
        clip=clip,
        clip_tap_layers=tuple(g("MODEL.SELECT_ORI_CLIP_ID", (6, 9, 12))),
        inference=inference,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def load_config(spec: str | Path) -> ScanConfig:
    """A preset name (`tiny`, `vitb`, `vitl`), an official YAML, or one of our JSON configs."""
    text = str(spec)
    if text in PRESETS:
        return preset(text)
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        return config_from_official(read_yaml(path), source=str(path))
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = ScanConfig.from_dict(json.loads(path.read_text()))
            cfg.validate()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cfg
    raise ConfigError(
        f"cannot read config {text!r}: give a preset ({', '.join(PRESETS)}), an official .yaml or a .json written by scan"
    )
