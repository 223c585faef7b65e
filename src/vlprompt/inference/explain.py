"""What did the model match? The transport plans and similarities behind one image's logit for one class.

:func:`explain` returns the numbers (an :class:`Explanation`), :func:`render` draws them into a PNG:

* ALIGN (``matching="ot"``): for every image view m and text prompt n of the class, the token-level plan T̂_mn
  between the image's tokens (patches, and the visual prompt outputs when they take part) and the prompt's word
  tokens. Column l of T̂_mn, restricted to the patch rows and reshaped to the patch grid, is the heat map of word
  token l; with uniform marginals each patch row of the full plan sums to 1/T (T image tokens). The prompt-level
  plan (M × N) is drawn as a small matrix.
* PLOT (``matching="plot"``): the plan between the patches and the N prompt features of the class (one heat map
  per prompt); there is no prompt-level plan.
* every other method: the image–text cosine similarity per (view, prompt) of the class, as a bar chart.

The plans are recomputed from the method's own features with the method's OT settings (ε, iterations, stopping
rule, token sets), for one image and one class; the logits come from the method itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt import ot
from vlprompt.errors import ConfigError


@dataclass
class Explanation:
    """The numbers behind one image's logit for one class.

    Attributes:
        kind: ``"align"`` (token- and prompt-level OT), ``"plot"`` (PLOT's patch–prompt OT) or ``"similarity"``.
        method: the method's name.
        classnames: the K candidate classes; ``classname`` / ``class_index`` the one explained.
        logits: ``(K,)`` the method's logits for the image; ``probs``: their softmax.
        image: ``(3, S, S)`` the pre-processed image; ``display``: ``(S, S, 3)`` the same in [0, 1] for drawing.
        grid: the patch grid ``(gh, gw)``.
        prompt_similarity: ``(M, N)`` cos(z_m, h_n) between the image's view m and prompt n of the class
            (PLOT: M = 1 global image feature).
        token_plans: ``(M, N, T, L)`` token-level plans (ALIGN: T image tokens × L text positions of prompt n;
            PLOT: M = N = 1, T = the patches, L = the class's prompts). None for ``"similarity"``.
        patch_rows: which of the T image tokens are patches (the rest are visual prompt outputs).
        token_mask: ``(N, L)`` True for the text tokens that carry mass (padding and unused positions False).
        token_labels: for each prompt n, a label for each of its L positions (``*`` marks learned context).
        token_similarity: ``(M, N)`` S_mn = Σ T̂ ⊙ ⟨r, s⟩ of the class (PLOT: ``(1, 1)``, its logit / scale).
        prompt_cost: ``(M, N)`` the prompt-level cost of the class (ALIGN only).
        prompt_plan: ``(M, N)`` the prompt-level plan of the class (ALIGN only).
    """

    kind: str
    method: str
    classnames: list[str]
    classname: str
    class_index: int
    logits: torch.Tensor
    probs: torch.Tensor
    image: torch.Tensor
    display: torch.Tensor
    grid: tuple[int, int]
    prompt_similarity: torch.Tensor
    token_plans: torch.Tensor | None = None
    patch_rows: slice | None = None
    token_mask: torch.Tensor | None = None
    token_labels: list[list[str]] | None = None
    token_similarity: torch.Tensor | None = None
    prompt_cost: torch.Tensor | None = None
    prompt_plan: torch.Tensor | None = None

    @property
    def heatmaps(self) -> torch.Tensor | None:
        """``(M, N, L, gh, gw)``: plan column l over the patch rows, on the patch grid — what each cell shows."""
        if self.token_plans is None:
            return None
        m, n, _, length = self.token_plans.shape
        patches = self.token_plans[:, :, self.patch_rows, :]  # (M, N, P, L)
        return patches.permute(0, 1, 3, 2).reshape(m, n, length, *self.grid)

    @property
    def patch_marginal(self) -> torch.Tensor | None:
        """``(M, N, gh, gw)``: Σ_l T̂[o, l] for every patch o (1/T for uniform marginals, T image tokens)."""
        heat = self.heatmaps
        return None if heat is None else heat.sum(dim=2)


# --------------------------------------------------------------------------------------------- numbers


@torch.no_grad()
def explain(predictor, image, classnames: Sequence[str] | None = None, classname: str | None = None) -> Explanation:
    """Explain the logit of ``image`` for ``classname`` among ``classnames``.

    Args:
        predictor: a :class:`~vlprompt.inference.predictor.Predictor` (from :func:`vlprompt.load`).
        image: a path, PIL image or pre-processed ``(3, S, S)`` tensor.
        classnames: the candidate classes (default: the training classes).
        classname: the class to explain (default: the predicted one); must be one of ``classnames``.
    """
    from vlprompt.methods.align import Align

    names = predictor.check_classnames(classnames)
    method = predictor.method
    x = predictor.load_image(image).unsqueeze(0).to(predictor.device)
    side = predictor.class_side(names)
    with predictor._autocast():
        logits = method(x, side).float()[0].cpu()
    if classname is None:
        index = int(logits.argmax())
    elif classname in names:
        index = names.index(classname)
    else:
        raise ConfigError(f"class {classname!r} is not in the class list ({', '.join(names[:10])}"
                          f"{', …' if len(names) > 10 else ''})")
    clip = method.clip
    mean = torch.tensor(clip.image_mean).view(3, 1, 1)
    std = torch.tensor(clip.image_std).view(3, 1, 1)
    common = dict(method=method.name, classnames=names, classname=names[index], class_index=index, logits=logits,
                  probs=logits.softmax(-1), image=x[0].cpu(),
                  display=(x[0].cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0),
                  grid=clip.token_grid if clip.has_image_tokens else (1, 1))
    if not isinstance(method, Align):
        scale = float(clip.logit_scale)
        return Explanation(kind="similarity", prompt_similarity=(logits[index] / scale).view(1, 1), **common)
    with predictor._autocast():
        views = method.encode_views(x)
    matching = method.config.matching
    if matching == "ot":
        return Explanation(kind="align", **common, **_align_plans(method, views, side, index))
    if matching == "plot":
        return Explanation(kind="plot", **common, **_plot_plans(method, views, side, index))
    z = F.normalize(views.features.float(), dim=-1)  # (M, D)
    h = F.normalize(side.features.float()[index], dim=-1)  # (N, D)
    return Explanation(kind="similarity", prompt_similarity=(z @ h.T).cpu(), **common)


def _align_plans(method, views, text, k: int) -> dict:
    """ALIGN's two levels for image 0 and class k, with the method's settings (see ``Align.match``)."""
    c = method.config
    stop = c.sinkhorn_stop or ("reference" if c.mode == "reference" else "per_problem")
    dim = views.features.shape[-1]
    z = F.normalize(views.features.float(), dim=-1).view(1, -1, dim)  # (1, M, D)
    h = F.normalize(text.features.float(), dim=-1)  # (K, N, D)
    sigma = torch.einsum("bmd,knd->bkmn", z, h)  # (1, K, M, N)

    # Token level for class k: cost 1 - <r_o, s_l> over the image tokens and the prompt's real word tokens.
    if c.visual_token_set == "patches":
        tokens, patch_rows = views.patch_tokens, slice(0, views.patch_tokens.shape[1])
    else:
        tokens, patch_rows = views.tokens, views.patch_slice
    r = F.normalize(tokens.float(), dim=-1)  # (M, T, D): one image, M views
    s = F.normalize(text.tokens.float()[k], dim=-1)  # (N, L, D)
    token_set = c.text_token_set or c.mode
    mask = (text.reference_mask if token_set == "reference" else text.paper_mask)[k]  # (N, L)
    m, n = r.shape[0], s.shape[0]
    cost = 1 - torch.einsum("mtd,nld->mntl", r, s)  # (M, N, T, L)
    plans = ot.sinkhorn(cost, col_mask=mask.expand(m, n, -1), eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop)
    similarity = (plans * (1 - cost)).sum(dim=(-2, -1))  # (M, N)

    # Prompt level over all classes (the reference stopping rule looks at the whole batch, as in the method).
    token = method._token_similarity(views, text, 1, stop) if c.beta != 0 else torch.zeros_like(sigma)
    if c.mode == "reference":
        prompt_cost = (1 - sigma) + c.beta * token
    elif c.cost_form == "convex":
        prompt_cost = (1 - c.beta) * (1 - sigma) + c.beta * (1 - token)
    else:
        prompt_cost = (1 - sigma) + c.beta * (1 - token)
    prompt_plan = ot.prompt_level_ot(prompt_cost, eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop)
    return dict(prompt_similarity=sigma[0, k].cpu(), token_plans=plans.cpu(), patch_rows=patch_rows,
                token_mask=mask.cpu(), token_labels=_token_labels(method, k, s.shape[1]),
                token_similarity=similarity.cpu(), prompt_cost=prompt_cost[0, k].cpu(),
                prompt_plan=prompt_plan[0, k].cpu())


def _plot_plans(method, views, text, k: int) -> dict:
    """PLOT: the plan between the patch tokens and the N prompt features of class k."""
    c = method.config
    patches = F.normalize(views.patch_tokens.float()[0], dim=-1)  # (P, D)
    h = F.normalize(text.features.float()[k], dim=-1)  # (N, D)
    cost = 1 - patches @ h.T  # (P, N)
    plan = ot.sinkhorn(cost, eps=c.eps, max_iter=c.sinkhorn_iters, stop=c.sinkhorn_stop or "reference")
    z = F.normalize(views.features.float()[:1], dim=-1)
    count = h.shape[0]
    return dict(prompt_similarity=(z @ h.T).cpu(), token_plans=plan.view(1, 1, *plan.shape).cpu(),
                patch_rows=slice(0, patches.shape[0]), token_mask=torch.ones(1, count, dtype=torch.bool),
                token_labels=[[f"prompt {i}" for i in range(count)]],
                token_similarity=(plan * (1 - cost)).sum().view(1, 1).cpu())


def _token_labels(method, k: int, length: int) -> list[list[str]]:
    """A readable label for each of the ``length`` text positions of every prompt of class k."""
    prompts = method.text
    n_prompts = prompts.n_prompts
    ids = prompts.token_ids[k * n_prompts:(k + 1) * n_prompts, :length].tolist()
    eot = prompts.eot.view(-1, n_prompts)[k].tolist()
    order = None
    if prompts.class_position != "end" and prompts.n_ctx:
        order = prompts._position_index()[0, k * n_prompts:(k + 1) * n_prompts, :length, 0].tolist()
    labels = []
    for n in range(n_prompts):
        row = []
        for position, token in enumerate(ids[n]):
            if position == 0:
                row.append("<start>")
            elif position == eot[n]:
                row.append("<end>")
            elif position > eot[n]:
                row.append("")
            else:
                row.append(_decode(method.clip.tokenizer, token) + ("*" if position <= prompts.n_ctx else ""))
        labels.append([row[i] for i in order[n]] if order else row)
    return labels


def _decode(tokenizer, token: int) -> str:
    for decode in (getattr(tokenizer, "decode", None), getattr(getattr(tokenizer, "tokenizer", None), "decode", None)):
        if decode is not None:
            try:
                return str(decode([token])).strip()
            except Exception:  # noqa: BLE001 - a label is cosmetic: fall back to the id
                continue
    return str(token)


# --------------------------------------------------------------------------------------------- picture


def render(explanation: Explanation, out: str | os.PathLike | None = None, *, max_classes: int = 10):
    """Draw ``explanation`` (matplotlib, no display needed) and save it as PNG at ``out`` if given.

    ALIGN/PLOT: a top row with the image, the prompt-level plan (ALIGN) and the class probabilities, then a grid
    with one row per (view m, prompt n) and one column per word-token position; each cell overlays
    ``explanation.heatmaps[m, n, l]`` on the image (one colour scale for the whole grid). Each heat-map axis is
    labelled ``"heat m n l"`` (``Axes.get_label()``) and its second image holds exactly those values. Other
    methods: bars of the per-prompt similarity and of the class probabilities. Returns the figure.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("drawing an explanation needs matplotlib: pip install 'vlprompt[plot]' (explain() "
                          "itself returns the numbers without it)") from None

    e = explanation
    top = min(max_classes, len(e.classnames))
    if e.kind == "similarity":
        figure = Figure(figsize=(9, 3.2))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.4, 1.4]})
        _draw_image(axes[0], e)
        values = e.prompt_similarity.flatten().tolist()
        m, n = e.prompt_similarity.shape
        axes[1].bar(range(len(values)), values, color="tab:blue")
        axes[1].set_xticks(range(len(values)), [f"v{i // n} p{i % n}" if m * n > 1 else e.classname
                                                for i in range(len(values))], rotation=45, fontsize=7)
        axes[1].set_title(f"image–text cosine per prompt\n({e.classname})", fontsize=9)
        _draw_probabilities(axes[2], e, top)
    else:
        heat = e.heatmaps
        m, n, length = heat.shape[:3]
        columns = [l for l in range(length) if bool(e.token_mask[:, l].any())]
        rows = m * n
        width = max(len(columns), 3)
        figure = Figure(figsize=(1.25 * width + 0.8, 1.3 * rows + 2.6))
        FigureCanvasAgg(figure)
        grid = figure.add_gridspec(rows + 1, width, height_ratios=[1.8] + [1] * rows, hspace=0.55, wspace=0.15)
        _draw_image(figure.add_subplot(grid[0, 0]), e)
        if e.prompt_plan is not None:
            _draw_matrix(figure.add_subplot(grid[0, 1]), e.prompt_plan, "prompt-level plan")
        _draw_probabilities(figure.add_subplot(grid[0, 2:] if width > 3 else grid[0, 2]), e, top)
        vmax = float(heat.max()) or 1.0
        size = e.display.shape[0]
        for row in range(rows):
            view, prompt = divmod(row, n)
            for column, position in enumerate(columns):
                ax = figure.add_subplot(grid[row + 1, column])
                ax.set_xticks([])
                ax.set_yticks([])
                if column == 0:
                    ax.set_ylabel(f"view {view}\nprompt {prompt}" if e.kind == "align" else "patches", fontsize=7)
                if not bool(e.token_mask[prompt, position]):
                    ax.axis("off")
                    continue
                ax.set_label(f"heat {view} {prompt} {position}")
                ax.imshow(e.display.numpy(), extent=(0, size, size, 0))
                ax.imshow(heat[view, prompt, position].numpy(), extent=(0, size, size, 0), cmap="inferno",
                          alpha=0.6, vmin=0.0, vmax=vmax, interpolation="nearest")
                ax.set_title(e.token_labels[prompt][position], fontsize=7)
        figure.suptitle(f"{e.method}: token-level transport plans for class '{e.classname}' "
                        f"(p = {float(e.probs[e.class_index]):.2f})", fontsize=10)
    if out is not None:
        folder = os.path.dirname(os.path.abspath(os.fspath(out)))
        os.makedirs(folder, exist_ok=True)
        figure.savefig(os.fspath(out), dpi=100, format="png")
    return figure


def _draw_image(ax, e: Explanation) -> None:
    ax.imshow(e.display.numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{e.classname}\n(p = {float(e.probs[e.class_index]):.2f})", fontsize=8)


def _draw_matrix(ax, matrix: torch.Tensor, title: str) -> None:
    ax.imshow(matrix.numpy(), cmap="Blues", vmin=0.0, vmax=2 * max(float(matrix.max()), 1e-12))
    rows, columns = matrix.shape
    for i in range(rows):
        for j in range(columns):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(columns), [f"p{j}" for j in range(columns)], fontsize=6)
    ax.set_yticks(range(rows), [f"v{i}" for i in range(rows)], fontsize=6)
    ax.set_title(title, fontsize=8)


def _draw_probabilities(ax, e: Explanation, top: int) -> None:
    values, indices = e.probs.topk(top)
    labels = [e.classnames[i] for i in indices.tolist()]
    colours = ["tab:orange" if i == e.class_index else "tab:gray" for i in indices.tolist()]
    ax.barh(range(top)[::-1], values.tolist(), color=colours)
    ax.set_yticks(range(top)[::-1], labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_title("class probabilities", fontsize=8)


__all__ = ["Explanation", "explain", "render"]
