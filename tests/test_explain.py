"""The numbers behind ``vlprompt explain``: transport plans recomputed by hand, and the picture drawn from them."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlprompt import ot
from vlprompt.inference.predictor import Predictor
from vlprompt.cli import main
from vlprompt.engine import save_prompts
from vlprompt.inference.explain import explain, render
from vlprompt.methods import build_method

CLASSES = ["cat", "golden retriever", "bird"]


def photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def trained_like(tiny_clip, name: str, **options):
    """A tiny method whose prompts are moved away from their initial values (as training would)."""
    torch.manual_seed(0)
    method = build_method(name, tiny_clip, CLASSES, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in method.prompt_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return method


def features(method, image):
    """The method's own image views and class side for one image, as in its forward pass."""
    predictor = Predictor(method)
    x = predictor.load_image(image).unsqueeze(0)
    with torch.no_grad():
        return predictor, x, method.encode_views(x), method.encode_classes()


# ------------------------------------------------------------------------------------ ALIGN
@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_align_heat_maps_are_the_token_plans_computed_by_hand(tiny_clip, mode):
    # per-problem stopping with a tight tolerance: every (view, prompt) problem can be solved on its own
    method = trained_like(tiny_clip, "align", n_text_prompts=2, n_visual_prompts=2, text_depth=2, mode=mode,
                          sinkhorn_stop="per_problem", sinkhorn_iters=2000)
    image = photo()
    predictor, x, views, text = features(method, image)
    e = explain(predictor, image, CLASSES, "golden retriever")
    k = 1
    assert e.kind == "align" and e.classname == "golden retriever" and e.class_index == k

    m_views, n_prompts, grid = 2, 2, (4, 4)
    tokens = views.tokens  # (M, T, D): 16 patches then 2 visual prompt outputs per view
    n_tokens = tokens.shape[1]
    assert n_tokens == 18 and views.patch_slice == slice(0, 16)
    mask = (text.reference_mask if mode == "reference" else text.paper_mask)[k]  # (N, L)
    assert e.heatmaps.shape == (m_views, n_prompts, mask.shape[-1], *grid)
    for m in range(m_views):
        for n in range(n_prompts):
            real = mask[n].nonzero().flatten()
            r = F.normalize(tokens[m].float(), dim=-1)  # (T, D)
            s = F.normalize(text.tokens[k, n, real].float(), dim=-1)  # (L_real, D)
            cost = torch.stack([torch.stack([1 - r[o] @ s[j] for j in range(len(real))]) for o in range(n_tokens)])
            plan = ot.sinkhorn(cost, eps=0.1, max_iter=2000, stop="per_problem")  # (T, L_real)
            for j, position in enumerate(real.tolist()):
                expected = plan[:16, j].reshape(grid)  # the plan column over the patch rows, on the patch grid
                torch.testing.assert_close(e.heatmaps[m, n, position], expected, rtol=0, atol=1e-6)
            assert float(e.heatmaps[m, n][~mask[n]].abs().max()) == 0.0  # tokens outside the set carry nothing
            # uniform marginals: every patch row of the plan holds 1/T of the mass
            torch.testing.assert_close(e.patch_marginal[m, n], torch.full(grid, 1 / n_tokens), rtol=0, atol=1e-6)
            assert float(e.token_similarity[m, n]) == pytest.approx(float((plan * (1 - cost)).sum()), abs=1e-5)

    # the token similarity is the method's, and the prompt-level plan gives the method's logit
    with torch.no_grad():
        stop = "per_problem"
        token = method._token_similarity(views, text, 1, stop)[0, k]
    torch.testing.assert_close(e.token_similarity, token, rtol=0, atol=1e-5)
    scale = float(tiny_clip.logit_scale)
    if mode == "reference":
        logit = scale * float((e.prompt_plan * e.prompt_similarity).sum())
    else:
        logit = scale * (1 - float((e.prompt_plan * e.prompt_cost).sum()))
    assert logit == pytest.approx(float(e.logits[k]), abs=1e-4)
    torch.testing.assert_close(e.prompt_plan.sum(), torch.tensor(1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(e.logits, predictor.predict(image, CLASSES).logits[0], rtol=0, atol=1e-5)


def test_align_reference_stopping_is_the_methods(tiny_clip):
    """The default (original code's) stopping rule: all M·N problems of a pair share one criterion."""
    method = trained_like(tiny_clip, "align", n_text_prompts=2, n_visual_prompts=2, text_depth=2)
    image = photo(1)
    predictor, x, views, text = features(method, image)
    e = explain(predictor, image, CLASSES, "cat")
    mask = text.reference_mask[0]  # the same positions for every prompt of the class (the original's slice)
    real = mask[0].nonzero().flatten()
    r = F.normalize(views.tokens.float(), dim=-1)  # (M, T, D)
    s = F.normalize(text.tokens[0][:, real].float(), dim=-1)  # (N, L_real, D)
    cost = 1 - torch.einsum("mtd,nld->mntl", r, s)
    plans = ot.sinkhorn(cost, eps=0.1, max_iter=100, stop="reference")  # (M, N, T, L_real)
    expected = plans[:, :, :16].permute(0, 1, 3, 2).reshape(2, 2, len(real), 4, 4)
    torch.testing.assert_close(e.heatmaps[:, :, real], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(e.logits, predictor.predict(image, CLASSES).logits[0], rtol=0, atol=1e-5)
    assert e.token_labels[0][:len(real)] == ["<start>", "a*", "photo*", "of", "a", "cat"]
    assert e.token_labels[1][1:3] == ["x*", "x*"]


def test_the_picture_shows_exactly_the_heat_maps(tiny_clip, tmp_path):
    method = trained_like(tiny_clip, "align", n_text_prompts=2, n_visual_prompts=2, text_depth=2)
    predictor = Predictor(method)
    e = explain(predictor, photo(), CLASSES)  # the predicted class
    assert e.class_index == int(e.logits.argmax())
    out = tmp_path / "plans" / "explain.png"
    figure = render(e, out)
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > 300 and picture.size[1] > 300
    cells = {ax.get_label(): ax for ax in figure.axes if ax.get_label().startswith("heat ")}
    mask = e.token_mask
    assert len(cells) == 2 * int(mask.sum())  # one cell per (view, prompt, real token)
    for label, ax in cells.items():
        m, n, position = map(int, label.split()[1:])
        assert bool(mask[n, position])
        drawn = np.asarray(ax.images[1].get_array())
        np.testing.assert_array_equal(drawn, e.heatmaps[m, n, position].numpy())
        assert ax.get_title() == e.token_labels[n][position]


def test_explain_cli_writes_the_png_from_a_prompts_file(tiny_clip, tmp_path, capsys):
    method = trained_like(tiny_clip, "align", n_text_prompts=2, n_visual_prompts=2, text_depth=2)
    prompts = tmp_path / "align.safetensors"
    save_prompts(str(prompts), method.prompt_state_dict(),
                 {"method": "align", "options": method.options, "backbone": "tiny", "classnames": CLASSES,
                  "template": "a photo of a {}."})
    image = tmp_path / "photo.png"
    photo().save(image)
    out = tmp_path / "explain.png"
    capsys.readouterr()
    assert main(["explain", "--run", str(prompts), "--image", str(image), "--class", "bird", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "class 'bird'" in printed and "prompt-level plan" in printed and out.stat().st_size > 0
    assert main(["explain", "--run", str(prompts), "--image", str(image), "--classes", "cat,dog", "--class", "bird",
                 "--out", str(out)]) == 2
    assert "'bird' is not in the class list" in capsys.readouterr().err
    assert json.loads(json.dumps(method.options)) == method.options  # the header stays plain JSON


# ------------------------------------------------------------------------------------ PLOT and the rest
def test_plot_heat_maps_are_the_patch_prompt_plan(tiny_clip, tmp_path):
    method = trained_like(tiny_clip, "plot", n_text_prompts=3, text_n_ctx=4)
    image = photo(2)
    predictor, x, views, text = features(method, image)
    e = explain(predictor, image, CLASSES, "bird")
    patches = F.normalize(views.patch_tokens[0].float(), dim=-1)  # (16, D)
    h = F.normalize(text.features[2].float(), dim=-1)  # (N, D)
    cost = 1 - patches @ h.T
    plan = ot.sinkhorn(cost, eps=0.1, max_iter=100, stop="reference")
    assert e.kind == "plot" and e.heatmaps.shape == (1, 1, 3, 4, 4) and e.prompt_plan is None
    torch.testing.assert_close(e.heatmaps[0, 0], plan.T.reshape(3, 4, 4), rtol=0, atol=1e-6)
    scale = float(tiny_clip.logit_scale)
    assert scale * float(e.token_similarity) == pytest.approx(float(e.logits[2]), abs=1e-4)
    render(e, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_plot_heat_maps_on_a_resnet_lie_on_its_spatial_grid(tmp_path):
    from vlprompt.weights import load_clip

    method = trained_like(load_clip("tiny-rn"), "plot", n_text_prompts=2, text_n_ctx=4)
    predictor, x, views, text = features(method, photo(3))
    e = explain(predictor, photo(3), CLASSES, "cat")
    cost = 1 - F.normalize(views.patch_tokens[0].float(), dim=-1) @ F.normalize(text.features[0].float(), dim=-1).T
    plan = ot.sinkhorn(cost, eps=0.1, max_iter=100, stop="reference")  # (4 positions, 2 prompts)
    assert e.grid == (2, 2) and e.heatmaps.shape == (1, 1, 2, 2, 2)
    torch.testing.assert_close(e.heatmaps[0, 0], plan.T.reshape(2, 2, 2), rtol=0, atol=1e-6)
    render(e, tmp_path / "plot_rn.png")
    assert (tmp_path / "plot_rn.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_other_methods_show_the_similarity_per_prompt(tiny_clip, tmp_path, name):
    method = trained_like(tiny_clip, name)
    predictor = Predictor(method)
    e = explain(predictor, photo(), CLASSES, "cat")
    assert e.kind == "similarity" and e.token_plans is None and e.heatmaps is None
    scale = float(tiny_clip.logit_scale)
    assert scale * float(e.prompt_similarity.sum()) == pytest.approx(float(e.logits[0]), abs=1e-4)
    figure = render(e, tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    bars = [patch.get_height() for patch in figure.axes[1].patches]
    assert bars == pytest.approx(e.prompt_similarity.flatten().tolist())
