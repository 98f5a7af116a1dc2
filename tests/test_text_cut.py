"""The text tower cut to the longest prompt of each batch is exact (eager model and runtime).

CLIP's text tower is causal and pools at EOT, so the positions after a prompt's EOT never reach
its feature. The runtime and the eager model sort prompts by length, batch them and cut each
batch to its longest prompt (`runtime.tokenizer.length_batches`); these tests compare that with
the 77-token rows for every prompt of the six benchmark vocabularies, and for prompts of 76 and
more tokens, and check that a bundle from before the cut (a fixed 77-token graph) still works.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from runtime.files import sha256_file
from runtime.manifest import MANIFEST
from runtime.segmenter import Segmenter
from runtime.tokenizer import ClipTokenizer, length_batches, prompt_lengths
from runtime.vocab import benchmark_vocabularies
from scan_model.text import VILD_TEMPLATES, encode_prompts, tokenize

ROUNDING = 1e-5  # relative: fp32 rounding of a different matmul shape (measured ~7e-7)


@pytest.fixture(scope="module")
def all_prompts() -> list[str]:
    names = list(dict.fromkeys(n for vocabulary in benchmark_vocabularies().values() for n in vocabulary))
    return [template.format(name) for template in VILD_TEMPLATES for name in names]


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle) -> ClipTokenizer:
    spec = tiny_bundle.manifest.tokenizer
    return ClipTokenizer.from_file(tiny_bundle.path / spec.bpe.file, spec.context_length, spec.sot, spec.eot)


def _long_name(tokenizer: ClipTokenizer, prompt_tokens: int) -> str:
    """A class name whose 'a photo of a {}.' prompt has `prompt_tokens` tokens with SOT and EOT before
    the tokenizer's cut (prompts beyond 77 are cut to 77, keeping EOT)."""
    words = []
    while len(tokenizer._encode(f"a photo of a {' '.join(words)}.")) + 2 < prompt_tokens:
        words.append("cat")
    return " ".join(words)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def test_length_batches_keep_every_id_of_every_benchmark_prompt(all_prompts, tokenizer):
    tokens = tokenizer(all_prompts)
    seen = np.zeros(len(tokens), dtype=int)
    batches = list(length_batches(tokens, 256))
    for rows, cut in batches:
        seen[rows] += 1
        length = cut.shape[1]
        np.testing.assert_array_equal(cut, tokens[rows, :length])  # the ids of the 77-token rows
        assert not tokens[rows, length:].any()  # and only padding was dropped
        assert length == prompt_lengths(tokens[rows]).max()
    assert (seen == 1).all()
    widths = [cut.shape[1] for _, cut in batches]
    print(f"{len(all_prompts)} prompts in {len(batches)} batches of widths {min(widths)}..{max(widths)} (not 77)")
    assert widths == sorted(widths) and max(widths) < 77


def test_eager_cut_embeddings_equal_the_77_token_path_for_every_benchmark_prompt(tiny_model, all_prompts):
    clip = tiny_model.clip
    names = [p for p in all_prompts]  # each prompt as its own "name" with the identity template
    with torch.no_grad():
        cut = encode_prompts(clip, names, templates=("{}",), batch_size=512)[0].numpy()
        full = torch.cat([clip.encode_text(t) for t in torch.split(tokenize(names), 512)]).numpy()
    print(f"eager, {len(names)} prompts: cut vs 77 tokens {_relative(cut, full):.1e}")
    assert _relative(cut, full) <= ROUNDING


def test_runtime_cut_embeddings_equal_the_77_token_path_through_the_same_graph(tiny_bundle, all_prompts, tokenizer):
    session = ort.InferenceSession(os.fspath(tiny_bundle.path / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert [str(d) for d in session.get_inputs()[0].shape][1] == "sequence"  # the piece takes any length
    tokens = tokenizer(all_prompts)
    cut = np.empty((len(tokens), tiny_bundle.manifest.pieces["text_encoder"].outputs[0].shape[-1]), dtype=np.float32)
    for rows, batch in length_batches(tokens, 512):
        cut[rows] = session.run(None, {"tokens": batch})[0]
    full = np.concatenate([session.run(None, {"tokens": tokens[i : i + 512]})[0] for i in range(0, len(tokens), 512)])
    print(f"runtime, {len(tokens)} prompts: cut vs 77 tokens {_relative(cut, full):.1e}")
    assert _relative(cut, full) <= ROUNDING


@pytest.mark.parametrize("prompt_tokens", [76, 77, 90])
def test_prompts_of_76_and_more_tokens(tiny_model, tiny_bundle, tokenizer, prompt_tokens):
    name = _long_name(tokenizer, prompt_tokens)
    prompts = [f"a photo of a {name}.", "a photo of a cat."]
    tokens = tokenizer(prompts)
    assert prompt_lengths(tokens)[0] == min(prompt_tokens, 77) and tokens[0, min(prompt_tokens, 77) - 1] == 49407
    np.testing.assert_array_equal(tokens, tokenize(prompts).numpy())  # the runtime's ids are open_clip's
    with torch.no_grad():
        cut = encode_prompts(tiny_model.clip, prompts, templates=("{}",))[0].numpy()
        full = tiny_model.clip.encode_text(tokenize(prompts)).numpy()
    assert _relative(cut, full) <= ROUNDING
    session = ort.InferenceSession(os.fspath(tiny_bundle.path / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    rows = {}
    for index, batch in length_batches(tokens, 1):  # each prompt alone, cut to its own length
        rows[int(index[0])] = session.run(None, {"tokens": batch})[0][0]
    assert _relative(np.stack([rows[0], rows[1]]), full) <= ROUNDING


def test_a_bundle_with_a_fixed_77_token_text_encoder_still_works(tiny_bundle, tmp_path):
    """Bundles exported before the cut: their text encoder takes (M, 77) only, and gets full rows."""
    old = tmp_path / "old_bundle"
    shutil.copytree(tiny_bundle.path, old, copy_function=os.link)
    piece = old / "text_encoder.onnx"
    proto = onnx.load(os.fspath(piece))
    proto.graph.input[0].type.tensor_type.shape.dim[1].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 77
    piece.unlink()  # a hard link to the session bundle's file: replace, never write through
    onnx.save(proto, os.fspath(piece))
    manifest = json.loads((old / MANIFEST).read_text())
    entry = manifest["pieces"]["text_encoder"]
    entry.update(sha256=sha256_file(piece), bytes=piece.stat().st_size)
    entry["inputs"][0]["shape"] = [entry["inputs"][0]["shape"][0], 77]
    (old / MANIFEST).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    names = ["potted plant", "tv monitor", "a name long enough to need many more tokens than the others"]
    runs = {}
    for label, root in (("old", old), ("new", tiny_bundle.path)):
        segmenter = Segmenter(root, backend="onnxruntime", resize=False, cache_dir=tmp_path / f"cache_{label}")
        segmenter.set_vocabulary(names)
        runs[label] = (segmenter._text.cut_to_longest, segmenter._classifier)
    assert runs["old"][0] is False and runs["new"][0] is True
    assert _relative(runs["old"][1], runs["new"][1]) <= ROUNDING
