"""The torch-free CLIP tokenizer gives exactly open_clip's ids, and fails cleanly on a bad file."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from open_clip import SimpleTokenizer
from open_clip.tokenizer import default_bpe

from conftest import PROJECT_ROOT
from runtime.errors import BundleError
from runtime.tokenizer import ClipTokenizer
from scan_model.text import VILD_TEMPLATES

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer.from_file(default_bpe())


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=77)


def assert_same_ids(ours: ClipTokenizer, reference: SimpleTokenizer, texts: list[str]) -> None:
    got = ours(texts)
    expected = reference(texts).numpy()
    assert got.dtype == np.int64
    assert got.shape == expected.shape == (len(texts), 77)
    differing = [texts[i] for i in np.flatnonzero((got != expected).any(axis=1))]
    assert not differing, f"{len(differing)} texts differ from open_clip, e.g. {differing[:5]!r}"


VOCABULARIES = json.loads((PROJECT_ROOT / "runtime" / "data" / "vocabularies.json").read_text())


@pytest.mark.parametrize("vocabulary", sorted(VOCABULARIES))
def test_benchmark_prompts_match_open_clip(ours, reference, vocabulary):
    names = VOCABULARIES[vocabulary]
    assert names, "empty benchmark vocabulary"
    assert_same_ids(ours, reference, [template.format(name) for template in VILD_TEMPLATES for name in names])


HARD_CASES = [
    # accents, composed and decomposed (ftfy normalises to NFC)
    "café", "cafe\u0301", "Ñandú", "crème brûlée", "Straße", "İstanbul", "ǅemal",
    # punctuation and symbols
    "t-shirt/top", "o'clock", "it's", "they'RE", "a, b; c!", "50% off", "__init__", "#1 @home", "C++",
    # html entities, also double-escaped, and mojibake that ftfy repairs
    # (ftfy unescapes once when the text has no "<", then html.unescape runs twice more)
    "&amp;", "fish &amp;amp; chips", "&amp;amp;amp;", "<b>&amp;amp;</b>", "&lt;tag&gt;", "&#233;t&eacute;", "cafÃ©",
    # whitespace of every kind
    "  leading and trailing  ", "new\nline", "tab\tbed", "cr\r\nlf", "no\u00a0break", "ideo\u3000space",
    "\u200bzero width",
    # case and digits
    "UPPER CASE", "MiXeD CaSe", "1234567890", "3.14 pi", "R2-D2", "½ ²",
    # emoji, CJK and other scripts
    "🐶 dog", "👨‍👩‍👧 family", "🇫🇷", "猫", "东京 tower", "こんにちは", "한국어", "Ελληνικά", "русский", "עברית", "नमस्ते",
    # control characters, lone symbols, the special tokens written as text
    # U+0345 is a combining mark that only a case-insensitive pattern counts as a letter
    "x\u0345x", "bell\x07char", "\x00", "'", "...", "<start_of_text>", "a<end_of_text>b", "<START_OF_TEXT>",
    # nothing at all
    "", "   ", "\n\t",
]


def test_hard_cases_match_open_clip(ours, reference):
    assert_same_ids(ours, reference, HARD_CASES)


def test_random_texts_match_open_clip(ours, reference):
    # A seeded mix of every kind of character above, to reach merges the fixed cases miss.
    pool = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_/&#()[]{}<>%$\t\n") + list(
        "éèêëñüöçßøåæ\u0301\u00a0\u3000猫东京こんにちは한국Ελληνικάрусскийעבריתनमस्ते🐶👨\u200d🇫🇷½²"
    ) + ["&amp;", "&lt;", "'s", "'ll", "<end_of_text>"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    assert_same_ids(ours, reference, texts)


def test_truncation_keeps_eot_last(ours, reference):
    long_texts = [
        " ".join(["word"] * 200),
        "a photo of a " + "very " * 80 + "small cat.",
        "猫" * 100,
        " ".join(str(i) for i in range(100)),
    ]
    for text in long_texts:
        assert len(reference.encode(text)) > 75, "case is not long enough to need truncation"
    got = ours(long_texts)
    assert (got[:, 0] == SOT).all()
    assert (got[:, -1] == EOT).all()
    assert (got != 0).all(), "a truncated row must be full"
    assert_same_ids(ours, reference, long_texts)


def test_exactly_full_row_is_not_cut(ours, reference):
    # 75 text tokens + SOT + EOT fill the row exactly: nothing must be dropped.
    text = " ".join(["word"] * 75)
    assert len(reference.encode(text)) == 75
    row = ours(text)[0]
    assert row[-1] == EOT and row[-2] == row[1] != EOT
    assert_same_ids(ours, reference, [text])


def test_shapes_padding_and_a_single_string(ours):
    row = ours("a photo of a cat.")
    assert row.shape == (1, 77) and row.dtype == np.int64
    length = int(np.count_nonzero(row))
    assert row[0, 0] == SOT and row[0, length - 1] == EOT
    assert (row[0, length:] == 0).all()
    assert ours([]).shape == (0, 77)
    assert ours(("a", "b")).shape == (2, 77)
    np.testing.assert_array_equal(ours(""), [[SOT, EOT] + [0] * 75])


def test_other_context_length_matches_open_clip():
    ours = ClipTokenizer.from_file(default_bpe(), context_length=8)
    reference = SimpleTokenizer(context_length=8)
    texts = ["a photo of a large traffic light in the scene.", "cat", ""]
    got = ours(texts)
    assert got.shape == (3, 8)
    np.testing.assert_array_equal(got, reference(texts).numpy())


@pytest.fixture()
def bpe_dir(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    return folder


def _assert_bundle_error_names(path, *fragments) -> None:
    with pytest.raises(BundleError) as caught:
        ClipTokenizer.from_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert "re-export the bundle" in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_bpe_file(bpe_dir):
    _assert_bundle_error_names(bpe_dir / "bpe_simple_vocab_16e6.txt.gz", "missing")


def test_truncated_gz_file(bpe_dir):
    path = bpe_dir / "bpe_simple_vocab_16e6.txt.gz"
    data = open(default_bpe(), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    _assert_bundle_error_names(path, "damaged")


def test_garbage_file(bpe_dir):
    path = bpe_dir / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(b"this is not gzip at all\n" * 100)
    _assert_bundle_error_names(path, "damaged")


def test_gz_with_too_few_merges(bpe_dir):
    path = bpe_dir / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    path.write_bytes(gzip.compress("\n".join(lines[:1000]).encode("utf-8")))
    _assert_bundle_error_names(path, "damaged", "merge")


def test_gz_with_malformed_merge_line(bpe_dir):
    path = bpe_dir / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    lines[500] = "only-one-symbol"
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    _assert_bundle_error_names(path, "damaged")


def test_runtime_tokenizer_does_not_import_torch(reference):
    # A fresh interpreter: this test process has torch loaded already.
    script = (
        "import json, sys\n"
        "from runtime.tokenizer import ClipTokenizer\n"
        "ids = ClipTokenizer.from_file(sys.argv[1])('a photo of a café.')[0].tolist()\n"
        "heavy = [m for m in ('torch', 'open_clip', 'scan_model', 'export') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'ids': ids}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, default_bpe()], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout)
    assert report["heavy"] == []
    assert report["ids"] == reference("a photo of a café.")[0].tolist()
