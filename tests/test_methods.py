"""Methods: special cases of ALIGN hold numerically, parameter counts, training, precision, class-set switching."""

import pytest
import torch
import torch.nn.functional as F

from conftest_methods import cached_features, perturb
from vlprompt import ot
from vlprompt.weights import load_clip
from vlprompt.errors import ConfigError
from vlprompt.methods import available, build_method

CLASSES = ["dog", "sea lion", "golden retriever", "cat"]
NEW_CLASSES = ["fire truck", "tabby cat", "banana"]


def copy_prompts(source, target):
    target.load_prompt_state_dict(source.prompt_state_dict())


def test_align_with_one_prompt_per_side_is_maple(tiny_clip, images):
    maple = build_method("maple", tiny_clip, CLASSES)
    perturb(maple)
    align = build_method("align", tiny_clip, CLASSES, n_text_prompts=1, n_visual_prompts=1, text_depth=3)
    copy_prompts(maple, align)
    with torch.no_grad():
        assert torch.allclose(align(images), maple(images), atol=1e-5)


def test_align_without_visual_prompts_and_beta_zero_is_coop(tiny_clip, images):
    coop = build_method("coop", tiny_clip, CLASSES)
    perturb(coop)
    align = build_method("align", tiny_clip, CLASSES, n_text_prompts=1, n_visual_prompts=0, beta=0.0,
                         text_depth=1, text_n_ctx=16, text_ctx_init=None)
    copy_prompts(coop, align)
    with torch.no_grad():
        assert torch.allclose(align(images), coop(images), atol=1e-5)


def test_coop_with_word_init_equals_zero_shot_with_that_template(tiny_clip, images):
    coop = build_method("coop", tiny_clip, CLASSES, text_n_ctx=4, text_ctx_init="a photo of a")
    zeroshot = build_method("zeroshot", tiny_clip, CLASSES, template="a photo of a {}.")
    with torch.no_grad():
        expected = tiny_clip.logit_scale * F.normalize(tiny_clip.encode_image(images).features, dim=-1) @ \
            F.normalize(tiny_clip.encode_text(tiny_clip.tokenize([f"a photo of a {c}." for c in CLASSES])).features,
                        dim=-1).T
        assert torch.allclose(zeroshot(images), expected, atol=1e-4)
        assert torch.allclose(coop(images), zeroshot(images), atol=1e-5)


def test_zero_shot_template_ensemble_averages_normalised_features(tiny_clip, images):
    templates = ["a photo of a {}.", "art of the {}.", "{} texture."]
    method = build_method("zeroshot", tiny_clip, CLASSES, templates=templates)
    with torch.no_grad():
        feats = torch.stack([F.normalize(tiny_clip.encode_text(
            tiny_clip.tokenize([t.format(c) for c in CLASSES])).features, dim=-1) for t in templates])
        classes = F.normalize(feats.mean(0), dim=-1)
        expected = tiny_clip.logit_scale * F.normalize(tiny_clip.encode_image(images).features, dim=-1) @ classes.T
        assert torch.allclose(method(images), expected, atol=1e-4)


def test_align_reference_logits_follow_the_original_formula(tiny_clip, images):
    """Recompute the reference-mode ALIGN logit by hand, one (image, class) pair at a time."""
    align = build_method("align", tiny_clip, CLASSES[:2], n_text_prompts=2, n_visual_prompts=2, text_depth=2)
    perturb(align)
    with torch.no_grad():
        logits = align(images)
        text = align.encode_classes()
        views = align.encode_views(images)
        z = F.normalize(views.features, dim=-1).view(3, 2, -1)
        r = F.normalize(views.tokens, dim=-1).view(3, 2, *views.tokens.shape[1:])
        h = F.normalize(text.features, dim=-1)
        s = F.normalize(text.tokens, dim=-1)
        for j in range(3):
            for k in range(2):
                sigma = z[j] @ h[k].T  # (M, N)
                token = torch.zeros(2, 2)
                for m in range(2):
                    for n in range(2):
                        tokens_n = s[k, n][text.reference_mask[k, n]]
                        sim = r[j, m] @ tokens_n.T
                        plan = ot.sinkhorn(1 - sim, eps=0.1, stop="reference")
                        token[m, n] = (plan * sim).sum()
                plan = ot.sinkhorn(1 - sigma + token, eps=0.1, stop="reference")
                expected = tiny_clip.logit_scale * (plan * sigma).sum()
                assert torch.isclose(logits[j, k], expected, atol=1e-4), (j, k)


def test_align_paper_mode_gives_gradient_to_token_features_reference_does_not(tiny_clip, images):
    labels = torch.tensor([0, 1, 0])
    grads = {}
    for mode in ("reference", "paper"):
        align = build_method("align", tiny_clip, CLASSES[:2], n_text_prompts=2, n_visual_prompts=2, text_depth=1,
                             mode=mode)
        loss, _ = align.training_loss(images, labels)
        loss.backward()
        grads[mode] = align.text.ctx.grad.clone()
    assert grads["paper"].abs().sum() > 0 and grads["reference"].abs().sum() > 0
    assert not torch.allclose(grads["paper"], grads["reference"])


def test_text_token_sets(tiny_clip):
    align = build_method("align", tiny_clip, ["dog", "sea lion"], n_text_prompts=2, n_visual_prompts=2,
                         text_depth=1)
    text = align.encode_classes()
    # prompt 0 reads "a photo of a dog." -> [SOS, a, photo, of, a, dog, ., EOT]: reference set = rows 0..5
    assert text.reference_mask[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    # prompt 1 reads "X X dog." but uses prompt 0's slice: [SOS, X, X, dog, ., EOT]
    assert text.reference_mask[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]
    # paper set: learnable rows and the class-name rows only
    assert text.paper_mask[0, 0].nonzero().flatten().tolist() == [1, 2, 5]
    assert text.paper_mask[1, 1].nonzero().flatten().tolist() == [1, 2, 3, 4]  # "X X sea lion."


def test_trainable_parameter_counts_on_vit_b16():
    clip = load_clip("ViT-B-16", pretrained=None)
    counts = {name: sum(p.numel() for _, p in build_method(name, clip, CLASSES).trainable_parameters())
              for name in ("maple", "align")}
    assert counts == {"maple": 3_555_072, "align": 3_582_720}
    assert not any(p.requires_grad for p in clip.parameters())


@pytest.mark.parametrize("name", [n for n in available() if n != "zeroshot"])
def test_one_training_step_reduces_loss_and_only_prompts_get_gradients(tiny_clip, images, name):
    torch.manual_seed(0)
    method = build_method(name, tiny_clip, CLASSES)
    labels = torch.tensor([0, 1, 2])
    if method.feature_needs is not None:  # a method on cached features builds its state from them first (a cache)
        method.prepare_features(cached_features(tiny_clip, images, labels))
    params = [p for _, p in method.trainable_parameters()]
    assert params, f"{name} has nothing to train"
    loss, logits = method.training_loss(images, labels)
    assert logits.shape == (3, len(CLASSES))
    loss.backward()
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(1e-2 * p.grad / norm)
    method.eval()  # no dropout noise in the comparison
    with torch.no_grad():
        after = F.cross_entropy(method(images), labels)
        method.train()
        method.eval()
    assert after < loss.detach(), f"{name}: {loss.item():.5f} -> {after.item():.5f}"


def test_zeroshot_has_nothing_to_train(tiny_clip):
    assert list(build_method("zeroshot", tiny_clip, CLASSES).trainable_parameters()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", available())
def test_no_nan_under_autocast(tiny_clip, images, name, dtype):
    method = build_method(name, tiny_clip, CLASSES)
    with torch.autocast("cpu", dtype=dtype):
        loss, logits = method.training_loss(images, torch.tensor([0, 1, 2]))
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    if any(True for _ in method.trainable_parameters()):
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for _, p in method.trainable_parameters() if p.grad is not None)


@pytest.mark.parametrize("name", available())
def test_changing_the_class_set_keeps_learned_prompts(tiny_clip, images, name):
    method = build_method(name, tiny_clip, CLASSES)
    if method.unavailable_reason(NEW_CLASSES):
        pytest.skip(f"{name}: {method.unavailable_reason(NEW_CLASSES)} (its protocols report those as n/a)")
    perturb(method)
    before = method.prompt_state_dict()
    method.set_classnames(NEW_CLASSES)
    method.eval()
    with torch.no_grad():
        logits = method(images)
    assert logits.shape == (3, len(NEW_CLASSES))
    after = method.prompt_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = build_method(name, tiny_clip, NEW_CLASSES)
    copy_prompts(method, fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(images), logits, atol=1e-5)


def test_bad_method_configs_are_clear_errors(tiny_clip):
    with pytest.raises(ConfigError, match="n_visual_prompts == n_text_prompts"):
        build_method("align", tiny_clip, CLASSES, n_visual_prompts=2, n_text_prompts=4)
    with pytest.raises(ConfigError, match="unknown option"):
        build_method("coop", tiny_clip, CLASSES, n_ctxx=3)
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("coopp", tiny_clip, CLASSES)
    with pytest.raises(ConfigError, match="mode must be one of"):
        build_method("align", tiny_clip, CLASSES, mode="other")
    with pytest.raises(ConfigError, match="csc"):
        build_method("coop", tiny_clip, CLASSES, csc=True).set_classnames(NEW_CLASSES)


def test_independent_mode_allows_m_different_from_n(tiny_clip, images):
    align = build_method("align", tiny_clip, CLASSES, n_text_prompts=3, n_visual_prompts=2, coupling="independent",
                         visual_depth=2, text_depth=2)
    assert align(images).shape == (3, len(CLASSES))
    text_only = build_method("align", tiny_clip, CLASSES, n_text_prompts=2, n_visual_prompts=0, text_depth=1)
    frozen_text = build_method("align", tiny_clip, CLASSES, n_text_prompts=0, n_visual_prompts=2,
                               coupling="independent", visual_depth=1)
    assert text_only(images).shape == frozen_text(images).shape == (3, len(CLASSES))


def test_plot_runs_on_a_resnet_and_visual_prompts_do_not():
    """PLOT's original backbone is RN50: its local features are the attention pool's spatial outputs."""
    clip = load_clip("tiny-rn")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    plot = build_method("plot", clip, CLASSES, n_text_prompts=3)
    labels = torch.tensor([0, 1, 2])
    loss, logits = plot.training_loss(images, labels)
    loss.backward()
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()
    assert plot.text.ctx.grad is not None and plot.text.ctx.grad.abs().sum() > 0
    # The logit is 100·Σ T ⊙ cos between the 4 local features and the 3 prompt features (reference Sinkhorn).
    with torch.no_grad():
        local = F.normalize(clip.encode_image(images).tokens.float(), dim=-1)  # (3, 4, D)
        h = F.normalize(plot.encode_classes().features.float(), dim=-1)  # (K, 3, D)
        cos = torch.einsum("bpd,knd->bkpn", local, h)
        plan = ot.sinkhorn(1 - cos, eps=0.1, max_iter=100, stop="reference", group_dims=2)
        expected = clip.logit_scale * (plan * cos).sum((-2, -1))
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-4)


def test_on_a_resnet_methods_without_visual_prompts_run_and_the_others_say_why_not():
    clip = load_clip("tiny-rn")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    needs_vit = {"align", "aple", "ivlp", "maple", "promptsrc", "upt", "vpt", "vpt_shallow"}
    for name in available():
        if name in needs_vit:
            with pytest.raises(ConfigError, match="visual prompts need a ViT image tower"):
                build_method(name, clip, CLASSES)
        else:
            with torch.no_grad():
                assert torch.isfinite(build_method(name, clip, CLASSES)(images)).all()
    assert needs_vit < set(available())


@pytest.mark.parametrize("tower", ["eva02", "vit_map"])
def test_every_method_trains_on_timm_vit_towers(timm_clips, tower):
    """EVA-02 (rotary embeddings) and SigLIP-style (MAP pooling) towers take every method, visual prompts too."""
    clip = timm_clips[tower]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 3])
    for name in available():
        torch.manual_seed(0)
        method = build_method(name, clip, CLASSES)
        loss, logits = method.training_loss(images, labels)
        assert logits.shape == (2, len(CLASSES)) and torch.isfinite(loss), name
        params = [p for _, p in method.trainable_parameters()]
        if params:
            loss.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
            assert all(p.grad is None for p in clip.parameters()), name
