"""Text side: VILD templates, tokenisation and the prompt-ensembled text classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import REL_TOL, rel_diff
from scan_model.clip_towers import build_clip, clip_config
from scan_model.text import (
    VILD_TEMPLATES,
    encode_class_names,
    encode_prompts,
    prompts,
    text_classifier,
    tokenize,
)


@pytest.fixture(scope="module")
def official_clip(official_dev):
    clip = build_clip(clip_config("SCAN-tiny-16"))
    clip.load_state_dict(official_dev.sub_state_dict("clip_adapter.clip_model."), strict=True)
    return clip


def test_templates_verbatim():
    assert len(VILD_TEMPLATES) == 14
    assert VILD_TEMPLATES[0] == "a photo of a {}."
    assert VILD_TEMPLATES[1] == "This is a photo of a {}"  # no period, as in the official list
    assert VILD_TEMPLATES[-1] == "There is a large {} in the scene."
    assert prompts(["cup", "cat"], VILD_TEMPLATES[:2]) == [
        "a photo of a cup.", "a photo of a cat.", "This is a photo of a cup", "This is a photo of a cat",
    ]


def test_tokenize_matches_fixture(official_dev):
    classes = official_dev.classes
    tokens = tokenize(prompts(classes))
    assert tokens.dtype == torch.int64 and tokens.shape == (14 * len(classes), 77)
    assert torch.equal(tokens.view(14, len(classes), 77), official_dev.expected["text.tokens"].long())
    one = tokenize("a photo of a cup.")
    assert one.shape == (1, 77) and one[0, 0] == 49406 and one[0].max() == 49407


def test_tokenize_truncates_keeping_eot():
    tokens = tokenize(["word " * 100])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406 and tokens[0, -1] == 49407


def test_text_features_match_fixture(official_dev, official_clip):
    exp = official_dev.expected
    per_template = encode_prompts(official_clip, official_dev.classes, batch_size=32)  # 140 prompts, 5 batches
    d_pt = rel_diff(per_template, exp["text.per_template_features_unnorm"])
    class_features = encode_class_names(official_clip, official_dev.classes, batch_size=256)
    classifier = text_classifier(class_features, official_dev.state_dict["clip_adapter.non_object_embedding"])
    d_tf = rel_diff(classifier, exp["text_features"])
    print(f"text.per_template_features_unnorm rel_diff {d_pt:.2e}; text_features rel_diff {d_tf:.2e}")
    assert d_pt <= REL_TOL and d_tf <= REL_TOL
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(len(official_dev.classes) + 1))


def test_encode_class_names_is_ensemble_of_normalised_templates():
    torch.manual_seed(0)
    clip = build_clip(clip_config("SCAN-tiny-16"))
    names = ["cup", "saucer", "building, edifice"]
    templates = VILD_TEMPLATES[:3]
    ours = encode_class_names(clip, names, templates, batch_size=2)
    with torch.no_grad():
        direct = torch.stack([clip.encode_text(tokenize([t.format(n) for n in names])) for t in templates])
    expected = F.normalize(F.normalize(direct, dim=-1).mean(0), dim=-1)
    assert ours.shape == (3, 64)
    assert rel_diff(ours, expected) <= 1e-6
    # the batch size only changes how prompts are grouped
    assert rel_diff(encode_class_names(clip, names, templates, batch_size=256), ours) <= 1e-6
