"""The baselines on frozen image features (linear probe, CLIP-Adapter, Tip-Adapter(-F)) and the feature cache,
each checked against an independent recomputation."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest_data import colour_patch_tree
from vlprompt.engine import build_config
from vlprompt.engine.features import CachedFeatures, FeatureDataset
from vlprompt.methods import build_method
from vlprompt.methods.linear_probe import UNSEEN, fit_logistic, search_c
from vlprompt.methods.tip_adapter import search_grid
from vlprompt.experiments.protocols import run_experiment
from vlprompt.experiments.report import base2new_table

CLASSES = ["cat", "dog", "bird"]


def random_features(views, n, dim, labels, seed=0, val=6):
    generator = torch.Generator().manual_seed(seed)
    return CachedFeatures(train=torch.randn(views, n, dim, generator=generator),
                          train_labels=torch.tensor(labels),
                          val=torch.randn(val, dim, generator=generator),
                          val_labels=torch.arange(val) % 3, record={})


# --------------------------------------------------------------------------------------------- Tip-Adapter


def test_tip_adapter_logits_are_the_cache_model_computed_by_hand(tiny_clip):
    torch.manual_seed(0)
    features = random_features(3, 6, tiny_clip.embed_dim, [0, 0, 1, 1, 2, 2])
    tip = build_method("tip_adapter", tiny_clip, CLASSES, alpha=1.7, beta=5.5)
    tip.prepare_features(features)
    x = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tip(x)
        text = F.normalize(tiny_clip.encode_text(tiny_clip.tokenize([f"a photo of a {c}." for c in CLASSES]))
                           .features.float(), dim=-1)
    scale = float(tiny_clip.logit_scale)
    for b in range(4):
        f = x[b] / x[b].norm()
        for k in range(3):
            expected = scale * float(f @ text[k])
            for n in range(6):
                key = features.train[:, n].mean(0)  # the mean of the augmented views, then normalised
                key = key / key.norm()
                if features.train_labels[n] == k:
                    expected += 1.7 * math.exp(-5.5 * (1 - float(f @ key)))
            assert float(logits[b, k]) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # Another class set: trained classes keep their cache column, an unseen one is scored by zero-shot CLIP only.
    tip.set_classnames(["bird", "zebra", "cat"])
    with torch.no_grad():
        mapped = tip(x)
        zero_shot = scale * F.normalize(x, dim=-1) @ F.normalize(tiny_clip.encode_text(tiny_clip.tokenize(
            [f"a photo of a {c}." for c in ["bird", "zebra", "cat"]])).features.float(), dim=-1).T
    cache = (logits - scale * F.normalize(x, dim=-1) @ text.T)  # the cache term per trained class
    torch.testing.assert_close(mapped[:, 1], zero_shot[:, 1])
    torch.testing.assert_close(mapped[:, [0, 2]] - zero_shot[:, [0, 2]], cache[:, [2, 0]], rtol=1e-4, atol=1e-4)


def test_tip_adapter_search_picks_the_first_best_alpha_beta_on_validation(tiny_clip):
    features = random_features(2, 6, tiny_clip.embed_dim, [0, 0, 1, 1, 2, 2], seed=3, val=30)
    tip = build_method("tip_adapter", tiny_clip, CLASSES, search_scale=[9.0, 4.0], search_steps=[7, 5])
    tip.prepare_features(features)
    record = tip.fit_features(features)
    betas, alphas = search_grid(9.0, 7), search_grid(4.0, 5)
    assert betas[0] == pytest.approx(0.1) and betas[1] == pytest.approx(0.1 + 8.9 / 7) and len(alphas) == 5
    best, chosen = -1, None
    for beta in betas:  # β-major, strictly better replaces: the original's loop
        for alpha in alphas:
            tip.alpha.fill_(alpha), tip.beta.fill_(beta)
            with torch.no_grad():
                correct = int((tip(features.val).argmax(-1) == features.val_labels).sum())
            if correct > best:
                best, chosen = correct, (alpha, beta)
    assert (record["alpha"], record["beta"]) == pytest.approx(chosen)
    assert record["val_accuracy"] == pytest.approx(100 * best / 30)


def test_tip_adapter_f_trains_only_the_keys_and_plain_tip_adapter_matches_it_before_training(tiny_clip):
    features = random_features(2, 6, tiny_clip.embed_dim, [0, 0, 1, 1, 2, 2])
    plain, finetuned = (build_method(n, tiny_clip, CLASSES) for n in ("tip_adapter", "tip_adapter_f"))
    for method in (plain, finetuned):
        method.prepare_features(features)
    assert [n for n, _ in finetuned.trainable_parameters()] == ["cache_keys"]
    batch = FeatureDataset(features.train, features.train_labels)
    x, y = torch.stack([batch[i][0] for i in range(6)]), features.train_labels
    torch.testing.assert_close(plain(x), finetuned(x))
    loss, _ = finetuned.training_loss(x, y)
    loss.backward()
    assert finetuned.cache_keys.grad.abs().sum() > 0 and finetuned.alpha.grad is None


# --------------------------------------------------------------------------------------------- CLIP-Adapter


def test_clip_adapter_logits_are_the_residual_mix_of_the_bottleneck(tiny_clip):
    torch.manual_seed(0)
    adapter = build_method("clip_adapter", tiny_clip, CLASSES)
    assert adapter.options["ratio"] == 0.2 and adapter.adapter[0].weight.shape == (tiny_clip.embed_dim // 4,
                                                                                    tiny_clip.embed_dim)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = tiny_clip.encode_image(images).features.float()
        w1, w2 = adapter.adapter[0].weight, adapter.adapter[2].weight
        x = torch.clamp(torch.clamp(f @ w1.T, min=0) @ w2.T, min=0)
        mixed = 0.2 * x + 0.8 * f  # the raw (not normalised) feature is mixed, then normalised
        text = adapter.text_features()
        expected = tiny_clip.logit_scale * (mixed / mixed.norm(dim=-1, keepdim=True)) @ text.T
        torch.testing.assert_close(adapter(images), expected, rtol=1e-5, atol=1e-5)
        # the same from the cached feature
        torch.testing.assert_close(adapter(f), expected, rtol=1e-5, atol=1e-5)
        # ratio 0 is zero-shot CLIP
        zero = build_method("clip_adapter", tiny_clip, CLASSES, ratio=0.0)
        zero_shot = build_method("zeroshot", tiny_clip, CLASSES)
        torch.testing.assert_close(zero(images), zero_shot(images), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- linear probe


def test_logistic_fit_is_the_optimum_of_sklearns_objective():
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(30, 5, generator=generator), dim=-1)
    y = torch.arange(30) % 3
    c = 2.0
    weight, bias = fit_logistic(x, y, 3, c)
    # ½‖W‖² + c Σ CE: its gradient vanishes at the optimum (recomputed in float64 by autograd here).
    w, b = weight.double().requires_grad_(), bias.double().requires_grad_()
    objective = 0.5 * (w ** 2).sum() + c * F.cross_entropy(x.double() @ w.T + b, y, reduction="sum")
    objective.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3
    # weaker regularisation fits the training set at least as well
    loose, _ = fit_logistic(x, y, 3, 1e4)
    assert loose.norm() > weight.norm()


def coop_search(accuracy, grid, steps):
    """CoOp's lpclip search written out independently: grid, then bisection in log10 between peak/10, peak·10."""
    accs = [accuracy(c) for c in grid]
    peak = grid[accs.index(max(accs))]
    c_left, c_right = peak * 0.1, peak * 10
    acc_left, acc_right = accuracy(c_left), accuracy(c_right)
    for _ in range(steps):
        if acc_left < acc_right:
            c_left = math.pow(10, 0.5 * (math.log10(c_right) + math.log10(c_left)))
            acc_left = accuracy(c_left)
        else:
            c_right = math.pow(10, 0.5 * (math.log10(c_right) + math.log10(c_left)))
            acc_right = accuracy(c_right)
    return c_left if acc_left > acc_right else c_right


@pytest.mark.parametrize("peak", [2.3, -3.7, 5.2])
def test_regularisation_search_follows_validation_accuracy(peak):
    def accuracy(c):  # a validation curve peaked at c = 10**peak
        return 90 - abs(math.log10(c) - peak)

    grid = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    chosen, trace = search_c(accuracy, grid, 8)
    assert chosen == pytest.approx(coop_search(accuracy, grid, 8))
    assert [c for c, _ in trace[:7]] == grid and all(a == accuracy(c) for c, a in trace)
    assert abs(math.log10(chosen) - peak) < 2 / 2 ** 7  # the bisection closes in on the best c


def test_probe_chooses_c_by_validation_accuracy_not_training_fit(tiny_clip):
    # Training labels follow feature 0, validation labels follow feature 1: the fit that scores best on val wins.
    generator = torch.Generator().manual_seed(5)
    dim = tiny_clip.embed_dim
    train = torch.randn(1, 40, dim, generator=generator)
    val = torch.randn(40, dim, generator=generator)
    features = CachedFeatures(train=train, train_labels=(train[0, :, 0] > 0).long(), val=val,
                              val_labels=(val[:, 1] > 0).long(), record={})
    probe = build_method("linear_probe", tiny_clip, ["a", "b"], c_grid=[10.0, 1e-3], search_steps=2)
    record = probe.fit_features(features)
    normalised_train, normalised_val = F.normalize(train[0], dim=-1), F.normalize(val, dim=-1)
    for step in record["search"]:  # each c is scored on the validation features
        weight, bias = fit_logistic(normalised_train, features.train_labels, 2, step["c"])
        expected = 100 * float(((normalised_val @ weight.T + bias).argmax(-1) == features.val_labels).float().mean())
        assert step["val_accuracy"] == pytest.approx(expected, abs=1e-4)
    best = max(record["search"], key=lambda s: s["val_accuracy"])["val_accuracy"]
    assert [s["val_accuracy"] for s in record["search"] if s["c"] == record["c"]][-1] == best
    weight, bias = fit_logistic(normalised_train, features.train_labels, 2, record["c"])
    torch.testing.assert_close(probe.weight.data, weight)


def test_probe_maps_class_subsets_and_refuses_unseen_classes(tiny_clip):
    probe = build_method("linear_probe", tiny_clip, CLASSES)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(3, tiny_clip.embed_dim))
        probe.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.randn(2, tiny_clip.embed_dim)
    full = probe(x)
    probe.set_classnames(["bird", "cat"])  # a subset (ImageNet → ImageNet-A/R): the rows of those classes
    assert probe.unavailable_reason(["bird", "cat"]) is None
    torch.testing.assert_close(probe(x), full[:, [2, 0]])
    assert probe.unavailable_reason(["bird", "zebra"]) == UNSEEN


# --------------------------------------------------------------------------------------------- engine and protocols


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    colours = {"blue": (30, 30, 220), "red": (220, 30, 30), "green": (30, 200, 30), "white": (240, 240, 240)}
    colour_patch_tree(root, colours, train=4, test=2, seed=1)
    spare = colour_patch_tree(root / "spare", colours, train=2, test=0, seed=2)
    shutil.move(str(spare / "train"), str(root / "val"))
    return root


def run(tmp_path, tree, method, protocol="few_shot", extra=()):
    overrides = ["backbone.name=tiny", "backbone.pretrained=null", "device=cpu", "progress=false",
                 f"data.root={tree}", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output={tmp_path / 'runs'}", "data.batch_size=4", "method.options.views=2",
                 "optim.epochs=2", *extra]
    if method == "linear_probe":
        overrides = [o for o in overrides if not o.startswith(("method.options.views", "optim.epochs"))]
    cfg = build_config(method=method, protocol=protocol, dataset="custom_folder", shots=4, overrides=overrides)
    return cfg, run_experiment(cfg)


def test_features_are_cached_in_the_run_folder_and_read_back(tmp_path, tree):
    cfg, results = run(tmp_path, tree, "tip_adapter_f")
    from vlprompt.engine.runs import run_dir

    folder = run_dir(cfg)
    record = json.load(open(os.path.join(folder, "features.json")))
    assert record["views"] == 2 and record["augmented"] and record["train_images"] == 16
    assert record["val_images"] == 8 and record["file"] == "features.safetensors"
    assert results["training"]["features"] == record and results["training"]["epochs"] == 2
    assert set(results["training"]["feature_fit"]) >= {"alpha", "beta"}
    from safetensors.torch import load_file

    stored = load_file(os.path.join(folder, "features.safetensors"))
    assert stored["train"].shape == (2, 16, 32) and not torch.equal(stored["train"][0], stored["train"][1])
    # A resumed run (here: results removed) reads the features back and keeps its trained keys.
    os.remove(os.path.join(folder, "results.json"))
    again = run_experiment(cfg)
    assert again["metrics"] == results["metrics"]
    # The saved state holds the whole cache: `vlprompt eval` (no features) gives the run's accuracy.
    from vlprompt.cli import main

    assert main(["eval", folder, "--quiet"]) == 0
    assert json.load(open(os.path.join(folder, "eval", "custom_folder-all.json")))["correct"] == \
        results["evaluations"]["test"]["correct"]


def test_linear_probe_in_base_to_new_reports_base_only(tmp_path, tree, capsys):
    cfg, results = run(tmp_path, tree, "linear_probe", protocol="base2new")
    # `vlprompt eval` rebuilds the probe for its training classes: base evaluates again, new is one clear error
    from vlprompt.cli import main
    from vlprompt.engine.runs import run_dir

    assert main(["eval", run_dir(cfg), "--classes", "base", "--quiet"]) == 0
    assert f"accuracy {results['metrics']['base']:.2f}%" in capsys.readouterr().out
    assert main(["eval", run_dir(cfg), "--classes", "new", "--quiet"]) == 2
    assert UNSEEN in capsys.readouterr().err
    assert results["metrics"]["new"] is None and results["metrics"]["hm"] is None
    assert results["metrics"]["base"] > 0 and results["not_available"] == {"new": UNSEEN}
    assert results["training"]["epochs"] == 0 and results["training"]["feature_fit"]["c"] > 0
    table = base2new_table([results])
    assert "n/a" in table.markdown() and UNSEEN in table.markdown()


@pytest.mark.parametrize("method", ["clip_adapter", "tip_adapter"])
def test_adapters_score_new_classes_in_base_to_new(tmp_path, tree, method):
    _, results = run(tmp_path, tree, method, protocol="base2new")
    assert all(results["metrics"][k] is not None for k in ("base", "new", "hm"))
