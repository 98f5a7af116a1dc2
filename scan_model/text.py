"""Text side of SCAN: VILD prompt templates, CLIP tokenisation and the text classifier (SPEC.md §1.9).

The class features are a constant per vocabulary (SPEC.md §7 item 22): compute them once with
``encode_class_names`` and feed the (K+1, E) ``text_classifier`` to the model. Unlike the official
adapter there is no per-name cache here, so changed weights never give stale features.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.tokenizer import length_batches

# VILD_PROMPT of the official text_template.py, verbatim and in order (some lack the period).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def _tokenizer() -> open_clip.SimpleTokenizer:
    # open_clip's bundled BPE vocabulary (bpe_simple_vocab_16e6); building it takes a moment, so once.
    return open_clip.SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(texts: str | Sequence[str]) -> Tensor:
    """CLIP BPE token ids, int64 (n, 77): SOT + tokens + EOT, zero-padded, truncated keeping EOT.

    Text is cleaned as open_clip does (ftfy, html unescape, whitespace collapse, lower case).
    """
    if isinstance(texts, str):
        texts = [texts]
    return _tokenizer()(list(texts))


def prompts(names: Sequence[str], templates: Sequence[str] = VILD_TEMPLATES) -> list[str]:
    """All prompts, template-major: index t * K + k is ``templates[t].format(names[k])``."""
    return [template.format(name) for template in templates for name in names]


def encode_tokens(clip_model: open_clip.CLIP, tokens: Tensor) -> Tensor:
    """``clip_model.encode_text`` for token rows of any length L <= 77 (unnormalised (n, E)).

    The text tower is causal and pools at EOT (the largest id), so rows cut after their longest
    prompt's EOT give the same features as the 77-token rows; only the positional embedding and the
    causal mask are sliced to L. This is what the ``text_encoder`` piece exports, with L dynamic.
    """
    if getattr(clip_model, "text_pool_type", "argmax") != "argmax":  # other pools may read later positions
        return clip_model.encode_text(F.pad(tokens, (0, CONTEXT_LENGTH - tokens.shape[1])))
    length = tokens.shape[1]
    cast = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast) + clip_model.positional_embedding[:length].to(cast)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])
    x = clip_model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = clip_model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Module) else x @ projection


@torch.no_grad()
def encode_prompts(
    clip_model: open_clip.CLIP,
    names: Sequence[str],
    templates: Sequence[str] = VILD_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """Per-template text features, NOT normalised: (T, K, E) = ``encode_text`` of each prompt.

    Prompts of all names and templates are sorted by length and encoded in batches of at most
    ``batch_size``, each cut to its longest prompt (``runtime.tokenizer.length_batches``, the
    runtime's rule too): exact, and several times faster than 77 positions for class names.
    """
    tokens = tokenize(prompts(names, templates))
    device = next(clip_model.parameters()).device
    features = None
    for rows, batch in length_batches(tokens.numpy(), batch_size):
        out = encode_tokens(clip_model, torch.from_numpy(batch).to(device))
        if features is None:
            features = out.new_empty((tokens.shape[0], out.shape[1]))
        features[torch.from_numpy(rows).to(device)] = out
    return features.view(len(templates), len(names), -1)


def encode_class_names(
    clip_model: open_clip.CLIP,
    names: Sequence[str],
    templates: Sequence[str] = VILD_TEMPLATES,
    batch_size: int = 256,
) -> Tensor:
    """Prompt-ensembled class features (K, E), unit norm (SPEC.md §1.9).

    Per template: encode_text, L2-normalise; then mean over templates and L2-normalise again.
    Names are used verbatim (the official model strips them before this point).
    """
    per_template = F.normalize(encode_prompts(clip_model, names, templates, batch_size), dim=-1)
    return F.normalize(per_template.mean(dim=0), dim=-1)


def text_classifier(class_features: Tensor, non_object_embedding: Tensor) -> Tensor:
    """(K, E) class features + (1, E) ``clip_adapter.non_object_embedding`` -> (K+1, E).

    The non-object row is L2-normalised and appended last (SPEC.md §1.9).
    """
    non_object = F.normalize(non_object_embedding, dim=-1).to(class_features)
    return torch.cat([class_features, non_object], dim=0)
