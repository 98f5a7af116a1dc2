"""`scan bench` results as markdown tables: the summary, stages, text costs and each sweep."""

from __future__ import annotations

STAGES = ("preprocess", "image_encoder", "mask_decoder", "clip_adapter", "ensemble", "postprocess")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _s(value) -> str:
    if value is None:
        return "-"
    return f"{value:#.3g}" if value < 100 else f"{value:.0f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.0f} MB"


def _agreement(value) -> str:
    return "-" if value is None else f"{100 * value['mean']:.2f}% (min {100 * value['min']:.2f}%)"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def stage_order(backends: dict) -> list[str]:
    seen = list(dict.fromkeys(k for b in backends.values() for k in b["stages"]))
    return [s for s in STAGES if s in seen] + [s for s in seen if s not in STAGES]


def markdown(result: dict) -> str:
    backends = result["backends"]
    inputs = result["inputs"]
    sizes = ", ".join(sorted({f"{i['height']}x{i['width']}" for i in inputs["images"]}))
    lines = [
        f"## scan bench: {result['model']['name']}, {result['model']['weights']}",
        "",
        f"{len(inputs['images'])} image(s) at {sizes}{' (after the test resize)' if inputs['resize'] else ''}, "
        f"vocabulary {inputs['vocabulary']['name']} ({inputs['vocabulary']['size']} names), {result['runs']} rounds "
        f"after {result['warmup']} warm-up call(s), threads: {result['threads']['onnxruntime_intra_op']}; "
        f"{result['machine']['cpu']}, {result['machine']['logical_cores']} logical cores{_features(result['machine'])}.",
        "",
    ]
    rows = [[name, b["precision"], _s(b["end_to_end"]["p50"]), _s(b["end_to_end"]["p90"]), _s(b["end_to_end"]["mean"]),
             f"{b['images_per_s']:.3g}", _ratio(result["ratios"][name]), _mb(b["peak_rss_bytes"]),
             _agreement(b["label_agreement"])] for name, b in backends.items()]
    lines += _table(["backend", "precision", "p50 (s)", "p90 (s)", "mean (s)", "images/s", "speed-up vs eager",
                     "peak RSS", "label agreement with eager"], rows)
    lines += ["", "Stages (mean s per image):", ""]
    lines += _table(["stage", *backends], [[stage, *(_s(b["stages"].get(stage, {}).get("mean")) for b in backends.values())]
                                           for stage in stage_order(backends)])
    lines += ["", "Text (vocabulary set-up, s):", ""]
    lines += _table(["backend", "cold", "warm", "encoder calls cold / warm"],
                    [[name, _s(b["text"]["cold_s"]), _s(b["text"]["warm_s"]),
                      f"{_count(b['text']['cold_encoder_calls'])} / {_count(b['text']['warm_encoder_calls'])}"]
                     for name, b in backends.items()])
    for name, sweep in result["sweeps"].items():
        lines += ["", f"Sweep {name} ({sweep['measures']}; mean):", ""]
        lines += _table([name, *sweep["backends"]], [[str(v), *(_s(rows[i]["mean_s"]) for rows in sweep["backends"].values())]
                                                     for i, v in enumerate(sweep["values"])])
    compute = result.get("compute")  # absent in results from before it was recorded
    if compute:
        rates = compute["gemm"]["gflop_per_s"]
        lines += ["", f"Compute (GFLOP/s; a {compute['gemm']['size']}-cube MatMul in OpenVINO: fp32 {_s(rates['fp32'])}, "
                      f"bf16 {_s(rates['bf16'])}, int8 {_s(rates['int8'])}; the region stage at "
                      f"{compute['region_stage']['tower_gflop_per_crop']:.1f} GFLOP per crop):", ""]
        lines += _table(["backend", "region stage GFLOP/s", "share of the int8 rate"],
                        [[name, _s(r["gflop_per_s"]), "-" if r["share_of_int8_rate"] is None
                          else f"{100 * r['share_of_int8_rate']:.0f}%"]
                         for name, r in compute["region_stage"]["backends"].items()])
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _count(value) -> str:
    return "-" if value is None else str(value)


def _features(machine: dict) -> str:
    """'; AVX-512, VNNI, BF16 (no AMX)': the CPU features that decide the CPU backends' speed."""
    features = machine.get("cpu_features")  # absent in results from before it was recorded
    if not features:
        return ""
    have = [name for name, on in features.items() if on]
    lacks = [name for name, on in features.items() if not on]
    return f"; {', '.join(have) or 'no vector extensions'}" + (f" (no {', no '.join(lacks)})" if lacks else "")

