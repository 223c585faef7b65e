"""The toy world's pretraining targets (captions true of several scenes) and its downstream suite of datasets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlprompt.data import build_dataset
from vlprompt.toyworld.materialize import generate_split
from vlprompt.toyworld.pretrain import caption_match_loss
from vlprompt.toyworld.render import generate
from vlprompt.toyworld.world import (
    CAPTION_TEMPLATES,
    COLOR_NAMES,
    DATASETS,
    POSITIONS,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZES,
    TEXTURES,
    caption_matches,
    captions_of,
    sample_templates,
)

VOCABULARY = {"color": COLOR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "texture": TEXTURES}


def _named_values(text: str) -> dict[str, str]:
    """The attribute values a caption names, read from its words (independently of the templates)."""
    padded = " " + text.rstrip(".").replace(",", "") + " "
    found = {}
    for attribute, values in VOCABULARY.items():
        named = [v for v in values if f" {v} " in padded]
        assert len(named) <= 1, (text, named)
        if named:
            found[attribute] = named[0]
    return found


def test_caption_matches_agree_with_the_words_of_each_caption():
    rng = np.random.default_rng(0)
    n = 120
    attributes = {name: rng.integers(len(values), size=n) for name, values in VOCABULARY.items()}
    templates = sample_templates(n, rng)
    captions = captions_of(attributes, templates)
    matches = caption_matches(attributes, templates)
    for i, j in itertools.product(range(n), range(n)):
        scene_i = {a: VOCABULARY[a][attributes[a][i]] for a in VOCABULARY}
        true_of_i = all(scene_i[a] == v for a, v in _named_values(captions[j]).items())
        assert matches[i, j] == true_of_i, (captions[j], scene_i)
    assert matches.diagonal().all()
    assert 1.5 < matches.sum(axis=1).mean() < n / 2  # several true captions per image, far from all of them
    assert {k for k, _ in enumerate(CAPTION_TEMPLATES)} == set(templates.tolist())  # every template drawn


def _clip_loss(logits):
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_caption_match_loss_is_clip_loss_with_one_positive_and_spreads_over_true_pairs():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    identity = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(caption_match_loss(logits, identity), _clip_loss(logits))

    matches = identity.clone()
    matches[0, 3] = True  # caption 3 is also true of image 0
    log_rows, log_columns = F.log_softmax(logits, dim=1), F.log_softmax(logits, dim=0)
    expected_rows = [-(log_rows[0, 0] + log_rows[0, 3]) / 2] + [-log_rows[i, i] for i in range(1, 6)]
    expected_columns = [-log_columns[j, j] for j in range(6)]
    expected_columns[3] = -(log_columns[0, 3] + log_columns[3, 3]) / 2
    expected = (torch.stack(expected_rows).mean() + torch.stack(expected_columns).mean()) / 2
    assert torch.allclose(caption_match_loss(logits, matches), expected)

    # The one-positive loss pushes the true pair (0, 3) apart; the caption-match loss pulls it together.
    for loss, sign in ((_clip_loss, 1), (lambda x: caption_match_loss(x, matches), -1)):
        x = logits.clone().requires_grad_(True)
        loss(x).backward()
        assert sign * x.grad[0, 3] > 0


@pytest.mark.parametrize("name", ["toy_patterns", "toy_layouts", "toy_signs", "toy_color_textures_dusk", "toy_objects"])
def test_suite_labels_fix_the_attributes_their_class_names_say(name):
    dataset = DATASETS[name]
    labels = np.arange(len(dataset.classnames))
    fixed = dataset.attributes(labels)
    assert set(fixed) == set(dataset.label_attributes)
    sizes = [len(VOCABULARY[a]) for a in dataset.label_attributes]
    assert len(dataset.classnames) == np.prod(sizes) == len(set(dataset.classnames))
    for label, classname in enumerate(dataset.classnames):
        words = f" {classname} "
        for attribute in dataset.label_attributes:
            value = VOCABULARY[attribute][fixed[attribute][label]]
            value = SHAPE_SYNONYMS[value] if name == "toy_signs" and attribute == "shape" else value
            assert f" {value} " in words, (classname, attribute, value)
    _, generated = generate_split(name, "test", 2, seed=0)
    assert generated.tolist() == np.repeat(labels, 2).tolist()


def test_toy_signs_names_its_shapes_with_words_pretraining_never_saw():
    pretraining_words = {
        word
        for template, _ in CAPTION_TEMPLATES
        for values in itertools.product(*VOCABULARY.values())
        for word in template.format(**dict(zip(VOCABULARY, values))).rstrip(".").replace(",", "").split()
        if values[0] == COLOR_NAMES[0]  # every word appears with the first color too; keeps this fast
    }
    assert set(SHAPE_SYNONYMS.values()).isdisjoint(pretraining_words)
    assert set(SHAPE_SYNONYMS) == set(SHAPES) <= pretraining_words


def test_suite_datasets_build_from_the_registry(tmp_path):
    for name in ("toy_patterns", "toy_signs"):
        splits = build_dataset(name, str(tmp_path), n_train_per_class=1, n_val_per_class=1, n_test_per_class=1)
        assert tuple(splits.classnames) == DATASETS[name].classnames
        assert len(splits.train) == len(DATASETS[name].classnames)


def test_dusk_domain_is_the_photo_darkened_under_a_blue_cast():
    photo, _ = generate(16, 9, "photo")
    dusk, _ = generate(16, 9, "dusk")  # same scenes: dusk draws the photo's random numbers first
    p, q = photo.astype(float), dusk.astype(float)
    gain = (q.mean(axis=(1, 2)) - 12.0) / p.mean(axis=(1, 2))  # (16, 3) per image and channel
    cast = np.array([0.38, 0.46, 0.85])
    assert ((gain > cast * 0.85 - 0.02) & (gain < cast * 1.1 + 0.02)).all(), gain
    ratio = gain / cast  # one brightness per image, shared by the channels
    assert np.allclose(ratio, ratio.mean(axis=1, keepdims=True), atol=0.02)
    residual = q - (p * cast * ratio.mean(axis=1)[:, None, None, None] + 12.0)
    assert 3.0 < residual.std() < 8.0  # the low-light noise (std 5), nothing else


def test_fit_probe_separates_blobs_and_its_penalty_shrinks_the_weights():
    from vlprompt.toyworld.zeroshot import fit_probe

    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=generator, dtype=torch.float64), dim=1)

    def blobs(n):
        labels = torch.arange(3).repeat_interleave(n)
        return centres[labels] + 0.3 * torch.randn(3 * n, 16, generator=generator, dtype=torch.float64), labels

    (train, train_labels), (test, test_labels) = blobs(16), blobs(50)
    loose, tight = (fit_probe(train, train_labels, 3, penalty) for penalty in (1e-6, 1e-1))
    with torch.no_grad():
        assert (loose(test).argmax(1) == test_labels).double().mean() >= 0.95
        assert tight.weight.norm() < loose.weight.norm() / 3
