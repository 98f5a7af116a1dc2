"""The per-piece parity gate judges ONNX Runtime against eager's own conditioning.

Where mask logits sit within float rounding of zero, the mask decoder's masked attention flips
whole blocks under any change of summation order: eager moves as much under 1e-7 input noise
as ONNX Runtime differs from it. The gate measures that movement (`eager_sensitivity`) and
accepts ONNX Runtime within `max(tolerance, SENSITIVITY_MULTIPLE x sensitivity)`; a wrong graph
must still fail, naming the piece and the output.

The ill-conditioned model is an official-format checkpoint (tests/official_format.py) with the
weights of seed ILL_CONDITIONED_SEED, whose mask decoder moves by more than 1e-3 under rounding
noise at the bundle's third parity shape, so that a fixed 1e-3 tolerance refuses sound graphs there.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from export.onnx_export import (
    SENSITIVITY_MULTIPLE,
    ExportError,
    PieceExport,
    Shape,
    ort_parity,
    parity_gate,
)
from official_format import ILL_CONDITIONED_SEED, OFFICIAL_CONFIG, write_official_checkpoint
from runtime.manifest import ParityRecord
from scan_model.loading import load_model

TOLERANCE = 1e-3  # DESIGN.md: each piece within 1e-3 relative of eager, or a stated multiple of its sensitivity
ILL_SHAPE = Shape(384, 256, 17, 12)  # the bundle's third parity shape, where eager moves beyond the tolerance
SMALL = Shape(64, 96, 3, 2)
VOCAB = "cup,saucer,spoon,coffee,table,wall,plate,person,cat,tree,sky,grass"


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> Path:
    if not OFFICIAL_CONFIG.is_file():
        pytest.skip(f"official config not found at {OFFICIAL_CONFIG} (../shared/fixtures)")
    return write_official_checkpoint(tmp_path_factory.mktemp("official") / "SCAN.pth", ILL_CONDITIONED_SEED)


@pytest.fixture(scope="module")
def official_export(official_checkpoint, tmp_path_factory):
    """`scan export` of the ill-conditioned checkpoint, as the issue's user ran it (a few minutes)."""
    from cli import app

    out = tmp_path_factory.mktemp("official_export") / "bundle"
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(official_checkpoint), "--config", str(OFFICIAL_CONFIG),
                                      "--vocab", VOCAB, "--out", str(out)])
    print(f"scan export: {time.perf_counter() - start:.0f} s\n{result.output}")
    assert result.exit_code == 0, result.output
    return out


def _bundle_piece(bundle: Path, piece: str) -> PieceExport:
    """The record of a graph a bundle holds, for the gate to judge again without exporting it anew."""
    return PieceExport(piece, bundle / f"{piece}.onnx", 0.0, 0, {}, {})


@pytest.fixture(scope="module")
def ill_conditioned(official_checkpoint, official_export):
    """The exported bundle's mask decoder of the official-format checkpoint, compared at the issue's shape."""
    loaded = load_model(official_checkpoint, OFFICIAL_CONFIG, device="cpu")
    assert loaded.report.ok and loaded.source == str(official_checkpoint)
    model = loaded.model
    record = _bundle_piece(official_export, "mask_decoder")
    ort_parity(model, record, [ILL_SHAPE])
    return model, record


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` preset's weights of seed 0, which the session bundle's graphs were exported from."""
    return load_model(None, "tiny", device="cpu", seed=0).model


def _rewrite(record: PieceExport, path: Path, edit) -> PieceExport:
    """A copy of `record` whose graph went through `edit(proto)`, saved at `path`, without parity."""
    proto = onnx.load(str(record.path))
    edit(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return replace(record, path=path, parity=[], exact_outputs=[])


def _wrap_output(proto: onnx.ModelProto, name: str, op: str, *extra: str) -> None:
    """Route graph output `name` through one more node `op(raw, *extra)`; inner consumers keep the raw value."""
    raw = f"{name}__raw"
    for node in proto.graph.node:
        node.input[:] = [raw if value == name else value for value in node.input]
        node.output[:] = [raw if value == name else value for value in node.output]
    proto.graph.node.append(helper.make_node(op, [raw, *extra], [name]))


def _scale_output(name: str, factor: float):
    """Edit: multiply graph output `name` by `factor` (an error of exactly factor - 1, relative)."""

    def edit(proto: onnx.ModelProto) -> None:
        proto.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=np.float32), f"{name}__factor"))
        _wrap_output(proto, name, "Mul", f"{name}__factor")

    return edit


def _scale_initializer(pick, factor: float):
    """Edit: multiply the float initializer chosen by `pick(names)` by `factor` (a corrupted weight)."""

    def edit(proto: onnx.ModelProto) -> None:
        floats = {i.name: i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
        chosen = floats[pick(sorted(floats))]
        chosen.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(chosen) * np.float32(factor), chosen.name))

    return edit


# -- (a) the ill-conditioned official-format checkpoint passes, with both numbers recorded ----------
# The ill-conditioning belongs to the weights: eager moves beyond 1e-3 under float-rounding noise at
# ILL_SHAPE on every CPU. Whether ONNX Runtime's kernels land on the other side of a flipped block
# belongs to the CPU (above 1e-3 on the Intel Xeon where the issue was found, 1.4e-6 on an AMD EPYC),
# so no test rests on ONNX Runtime's own difference being large.
def test_a_fixed_tolerance_refuses_a_graph_that_differs_only_as_much_as_eager_moves_under_rounding(ill_conditioned):
    _, record = ill_conditioned
    (parity,) = record.parity
    print(f"{parity.shape}: ORT {parity.max_rel}, eager sensitivity {parity.eager_sensitivity}")
    assert max(parity.eager_sensitivity.values()) > TOLERANCE
    # A graph whose every output differs from eager exactly as much as eager moves under 1e-7 noise:
    # a sound export on some CPU. The fixed gate refuses it, the sensitivity gate passes it.
    rounding_only = replace(parity, max_rel=dict(parity.eager_sensitivity))
    judged = replace(record, parity=[rounding_only])
    with pytest.raises(ExportError, match=r"mask_decoder: ONNX Runtime differs from eager beyond 0\.001: 384x256 K=17 N=12 "):
        parity_gate(judged, TOLERANCE, multiple=0.0, exact=())
    parity_gate(judged, TOLERANCE)


def test_gate_accepts_the_ill_conditioned_mask_decoder_within_a_multiple_of_its_sensitivity(ill_conditioned):
    _, record = ill_conditioned
    parity_gate(record, TOLERANCE)
    (parity,) = record.parity
    assert set(parity.eager_sensitivity) == set(parity.max_rel) == {"class_logits", "mask_logits"}
    for name, ort in parity.max_rel.items():
        sensitivity = parity.eager_sensitivity[name]
        # Eager moves under rounding noise by as much as ONNX Runtime differs: the model's conditioning.
        assert sensitivity > TOLERANCE and ort <= SENSITIVITY_MULTIPLE * sensitivity, (name, ort, sensitivity)
    # What the bundle writes for this piece (export/bundle.py): the manifest's ParityRecord, both numbers.
    manifest_entry = ParityRecord(**asdict(parity))
    assert manifest_entry.eager_sensitivity == parity.eager_sensitivity and manifest_entry.max_rel == parity.max_rel


@pytest.fixture(scope="module")
def well_conditioned(tiny_bundle, tmp_path_factory):
    return _bundle_piece(tiny_bundle.path, "mask_decoder"), tmp_path_factory.mktemp("well")


# -- (b) a wrong graph still fails, naming the piece, shape and output ---------------------------------
def test_corrupted_weight_fails_the_gate_naming_piece_and_output(tiny, well_conditioned):
    record, folder = well_conditioned
    intact = replace(record, parity=[], exact_outputs=[])
    ort_parity(tiny, intact, [SMALL])
    parity_gate(intact, TOLERANCE)  # the intact graph passes
    # The last 2-D weight in name order; any real weight scaled by 1.5 is a wrong graph.
    broken = _rewrite(record, folder / "broken_weight.onnx", _scale_initializer(lambda names: names[-1], 1.5))
    ort_parity(tiny, broken, [SMALL])
    (parity,) = broken.parity
    print(f"corrupted weight: ORT {parity.max_rel}, eager sensitivity {parity.eager_sensitivity}")
    assert max(parity.max_rel.values()) > SENSITIVITY_MULTIPLE * max(parity.eager_sensitivity.values())
    with pytest.raises(ExportError, match=r"^mask_decoder: ONNX Runtime differs from eager beyond max\(0\.001, 10 x eager "
                                          r"sensitivity\): 64x96 K=3 N=2 (class|mask)_logits: \S+ \(eager sensitivity "):
        parity_gate(broken, TOLERANCE)


def test_wrong_output_of_the_ill_conditioned_piece_still_fails(ill_conditioned, tmp_path):
    """Its wide sensitivity widens the gate only so far: an output off by its whole range fails."""
    model, record = ill_conditioned
    broken = _rewrite(record, tmp_path / "broken.onnx", _scale_output("mask_logits", 2.0))
    ort_parity(model, broken, [ILL_SHAPE])
    assert broken.parity[0].max_rel["mask_logits"] == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ExportError, match=r"mask_decoder: .*384x256 K=17 N=12 mask_logits: \S+e\+00 \(eager sensitivity ") as info:
        parity_gate(broken, TOLERANCE)
    assert "class_logits" not in str(info.value)  # only the output that is wrong is named


# -- (c) a well-conditioned piece gets no slack from its (tiny) sensitivity ---------------------------
def test_well_conditioned_piece_fails_beyond_tolerance_whatever_its_sensitivity(tiny, well_conditioned):
    record, folder = well_conditioned
    off = _rewrite(record, folder / "off_3e-3.onnx", _scale_output("class_logits", 1 + 3e-3))
    ort_parity(tiny, off, [SMALL])
    (parity,) = off.parity
    assert max(parity.eager_sensitivity.values()) < 1e-5  # well-conditioned: rounding moves eager by ~1e-6
    assert parity.max_rel["class_logits"] == pytest.approx(3e-3, rel=0.01)
    with pytest.raises(ExportError, match=r"mask_decoder: .* 64x96 K=3 N=2 class_logits: 3\.0\de-03 \(eager sensitivity \d"):
        parity_gate(off, TOLERANCE)


def test_sensitivity_bound_alone_separates_rounding_from_a_small_error(tiny, well_conditioned):
    """With no fixed tolerance, ONNX Runtime's rounding passes on the measured sensitivity, and an
    error ten times below the tolerance (1e-4) fails: the multiple is tight where the model is."""
    record, folder = well_conditioned
    intact = replace(record, parity=[], exact_outputs=[])
    ort_parity(tiny, intact, [SMALL], tolerance=0.0)
    parity_gate(intact, 0.0)
    off = _rewrite(record, folder / "off_1e-4.onnx", _scale_output("mask_logits", 1 + 1e-4))
    ort_parity(tiny, off, [SMALL], tolerance=0.0)
    assert off.parity[0].max_rel["mask_logits"] > SENSITIVITY_MULTIPLE * off.parity[0].eager_sensitivity["mask_logits"]
    with pytest.raises(ExportError, match=r"beyond max\(0, 10 x eager sensitivity\): 64x96 K=3 N=2 mask_logits: (1\.0\de-04|9\.9\de-05)"):
        parity_gate(off, 0.0)
    parity_gate(off, TOLERANCE)  # and the fixed tolerance stays the floor


def test_bool_outputs_must_match_exactly(tiny, tiny_bundle, tmp_path):
    record = _bundle_piece(tiny_bundle.path, "clip_adapter")
    ort_parity(tiny, record, [SMALL])
    parity_gate(record, TOLERANCE)
    assert record.exact_outputs == ["valid"] and "valid" not in record.parity[0].eager_sensitivity

    broken = _rewrite(record, tmp_path / "flipped.onnx", lambda proto: _wrap_output(proto, "valid", "Not"))
    ort_parity(tiny, broken, [SMALL])
    with pytest.raises(ExportError, match=r"clip_adapter: .*64x96 K=3 N=2 valid: 1\.00e\+00 of flags differ \(must match exactly\)"):
        parity_gate(broken, TOLERANCE)


# -- the whole `scan export`, as the user ran it (a few minutes) ----------------------------------
def test_cli_export_of_ill_conditioned_official_checkpoint(official_export):
    out = official_export
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["pieces"]["mask_decoder"]["parity"]
    assert len(parity) == 3 and ILL_SHAPE.label() in [p["shape"] for p in parity]
    for entry in parity:
        assert set(entry["max_rel"]) == set(entry["eager_sensitivity"]) == {"class_logits", "mask_logits"}
        for name, ort in entry["max_rel"].items():
            assert ort <= max(TOLERANCE, SENSITIVITY_MULTIPLE * entry["eager_sensitivity"][name])
    # The shape where a fixed gate refuses sound graphs is in the record, with eager's own movement
    # there beyond the tolerance (ONNX Runtime's difference there depends on the CPU: see above).
    (ill,) = [p for p in parity if p["shape"] == ILL_SHAPE.label()]
    assert max(ill["eager_sensitivity"].values()) > TOLERANCE
    assert all(ort <= SENSITIVITY_MULTIPLE * ill["eager_sensitivity"][name] or ort <= TOLERANCE
               for name, ort in ill["max_rel"].items())
    for name, piece in manifest["pieces"].items():
        assert all(entry["eager_sensitivity"] for entry in piece["parity"]), name
    # The end-to-end label gate decided, and is recorded.
    checks = manifest["pipeline_check"]["fp32"]
    assert len(checks) == 3 and all(c["label_agreement"] >= c["required"] == 0.999 for c in checks)
