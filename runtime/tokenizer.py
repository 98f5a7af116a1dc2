"""CLIP byte-level BPE tokenizer without torch: the same ids as open_clip's ``SimpleTokenizer``.

The deployed runtime encodes a user vocabulary with the bundled text encoder, so it needs the
exact token ids the model was exported against. This is an independent implementation of the
CLIP tokenizer ("lower" cleaning, 77-token context) using only numpy, ``ftfy`` and ``regex``.

Pipeline of one text: clean it (ftfy, html unescape twice, whitespace collapse, lower case),
split it into words with the CLIP pattern, spell each word's UTF-8 bytes with printable
stand-in characters, merge symbol pairs by BPE rank, then map the final symbols to ids.
"""

from __future__ import annotations

import gzip
import html
import zlib
from pathlib import Path
from typing import Sequence

import ftfy
import numpy as np
import regex

from runtime.errors import BundleError

# The BPE vocabulary is 256 byte symbols, the same 256 with an end-of-word mark, the merges and
# two special tokens: 49408 ids in all, so only the first 49152 - 256 - 2 merge lines are used.
MERGE_COUNT = 49152 - 256 - 2
END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# Words are the special tokens (open_clip matches them literally in user text, so do we),
# English contractions, runs of letters, single digits, and runs of other non-space symbols.
WORD_PATTERN = regex.compile(
    "|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _byte_symbols() -> dict[int, str]:
    """One printable character per byte value, in vocabulary order.

    Bytes that are visible Latin-1 characters stand for themselves; the others (controls,
    space, soft hyphen...) get characters from U+0100 up, so BPE never sees whitespace.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    hidden = [b for b in range(256) if b not in visible]
    symbols = {b: chr(b) for b in visible}
    symbols.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return symbols  # insertion order is the id order of the 256 base symbols


BYTE_SYMBOLS = _byte_symbols()


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: repair mojibake, unescape html (twice), collapse spaces, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Texts to CLIP token ids: SOT, BPE ids, EOT, zero padding, truncated keeping EOT last."""

    def __init__(
        self, merges: Sequence[tuple[str, str]], context_length: int = 77, sot: int = 49406, eot: int = 49407
    ):
        """Build from the merge pairs, best first.

        Args:
            merges: the BPE merge pairs in rank order (normally the first ``MERGE_COUNT``).
            context_length: length of every output row, SOT and EOT included (at least 2).
            sot: id of the start-of-text token, first in every row.
            eot: id of the end-of-text token, right after the last text token.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        self.context_length = context_length
        self.sot = sot
        self.eot = eot
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        base = list(BYTE_SYMBOLS.values())
        vocab = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges]
        # Later entries win on a clash, as in a dict built from the vocabulary list.
        self._ids = {symbol: i for i, symbol in enumerate(vocab)}
        # Word -> ids; the special tokens bypass BPE. Vocabularies repeat the same words a lot.
        self._word_cache: dict[str, tuple[int, ...]] = {SPECIAL_TOKENS[0]: (sot,), SPECIAL_TOKENS[1]: (eot,)}

    @classmethod
    def from_file(
        cls, bpe_path: str | Path, context_length: int = 77, sot: int = 49406, eot: int = 49407
    ) -> "ClipTokenizer":
        """Load the merges from a gzipped ``bpe_simple_vocab_16e6.txt.gz``.

        Args:
            bpe_path: the gzipped merges file (a header line, then one "left right" pair a line).
            context_length: length of every output row, SOT and EOT included.
            sot: id of the start-of-text token.
            eot: id of the end-of-text token.

        Raises:
            BundleError: the file is missing, unreadable, not gzip, truncated or has too few merges.
        """
        path = Path(bpe_path)
        fix = "re-export the bundle"
        if not path.is_file():
            raise BundleError(f"tokenizer file {path} is missing; {fix}")
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise BundleError(f"tokenizer file {path} is damaged ({reason}); {fix}") from None
        merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]  # line 0 is the header
        if len(merges) < MERGE_COUNT or any(len(pair) != 2 for pair in merges):
            raise BundleError(
                f"tokenizer file {path} is damaged (expected {MERGE_COUNT} merge pairs after the header); {fix}"
            )
        return cls(merges, context_length=context_length, sot=sot, eot=eot)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids of each text, int64 (n, context_length); a single string gives one row.

        Args:
            texts: one text or a sequence of texts.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in zip(rows, texts):
            ids = [self.sot, *self._encode(text), self.eot]
            if len(ids) > self.context_length:
                # Cut, but keep EOT: the text encoder pools its feature at the EOT position.
                ids = ids[: self.context_length - 1] + [self.eot]
            row[: len(ids)] = ids
        return rows

    def _encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            cached = self._word_cache.get(word)
            if cached is None:
                cached = self._word_cache[word] = self._bpe(word)
            ids.extend(cached)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one word: merge its byte symbols by rank until no known pair is left."""
        symbols = [BYTE_SYMBOLS[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD  # the last symbol carries the end-of-word mark
        ranks = self._ranks
        while len(symbols) > 1:
            ranked = [(ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in ranks]
            if not ranked:
                break
            _, (left, right) = min(ranked)
            # Merge every occurrence of the best pair, left to right, without overlaps.
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self._ids[s] for s in symbols)


def prompt_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens per row up to and including EOT (the largest id, so its position is the argmax)."""
    return np.asarray(tokens).argmax(axis=1) + 1


def length_batches(tokens: np.ndarray, batch_size: int):
    """Rows grouped by prompt length, each group cut to its longest prompt.

    CLIP's text tower is causal and pools at EOT, so the positions after a prompt's EOT never
    reach its feature: dropping them is exact, and short prompts no longer pay for 77 positions.
    Yields (row indices into `tokens`, their tokens cut to the batch's longest prompt), at most
    `batch_size` rows each, shortest first; the order is stable, so the result is deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    tokens = np.asarray(tokens)
    lengths = prompt_lengths(tokens)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, order.size, batch_size):
        rows = order[start : start + batch_size]
        yield rows, np.ascontiguousarray(tokens[rows, : int(lengths[rows].max())])
