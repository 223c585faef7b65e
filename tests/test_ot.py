"""Tests of the optimal-transport core: agreement with POT, padding, numerics, stopping rules, gradients, and
the token-/prompt-level wrappers against naive loops."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt import ot as vot

pot = pytest.importorskip("ot")
try:
    import ot.batch as pot_batch
except ImportError:  # POT < 0.9.6
    pot_batch = None

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TIGHT = dict(tol=1e-7, max_iter=5000)  # run our fp32 solver to convergence


def pot_plan(cost, a=None, b=None, eps=0.1):
    """One problem solved by POT in float64 to (near) machine precision."""
    cost = cost.double().numpy()
    a = np.full(cost.shape[0], 1 / cost.shape[0]) if a is None else a.double().numpy()
    b = np.full(cost.shape[1], 1 / cost.shape[1]) if b is None else b.double().numpy()
    a, b = a / a.sum(), b / b.sum()  # fp32 marginals renormalised in fp64, or POT cannot balance them below 1e-8
    plan, log = pot.sinkhorn(a, b, cost, eps, numItermax=20_000, stopThr=1e-11, log=True)
    assert log["err"][-1] < 1e-11, "POT did not converge: choose an easier test problem"
    return torch.from_numpy(plan)


def clip_like_costs(*batch, rows, cols, seed=0, dim=64):
    """Costs 1 - cos between CLIP-like unit vectors (cosines ~0.25 ± 0.15), shape (*batch, rows, cols)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=generator)

    def unit(*shape):
        x = 0.6 * common / common.norm() + torch.randn(*shape, dim, generator=generator) / math.sqrt(dim)
        return x / x.norm(dim=-1, keepdim=True)

    return 1 - unit(*batch, rows) @ unit(*batch, cols).transpose(-1, -2)


def original_sinkhorn(kernel, u, v, max_iter=100, thresh=1e-2):
    """The original ALIGN/PLOT Sinkhorn (plain kernel), returning the plan and the number of iterations."""
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for iteration in range(1, max_iter + 1):
        r0 = r
        r = u / torch.matmul(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(kernel.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * kernel, iteration


# ------------------------------------------------------------------------------------------- vs POT
@pytest.mark.parametrize("eps", [0.1, 0.05, 0.01])
def test_matches_pot_problem_by_problem(eps):
    generator = torch.Generator().manual_seed(1)
    cost = 2 * torch.rand(2, 2, 9, 7, generator=generator)
    a = torch.rand(2, 2, 9, generator=generator) + 0.1
    b = torch.rand(2, 2, 7, generator=generator) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    # (Non-uniform marginals at eps = 0.01 make some of these problems need ~10^5 iterations, in POT as well.)
    for weights in [(None, None), (a, b)] if eps > 0.01 else [(None, None)]:
        plan = vot.sinkhorn(cost, *weights, eps=eps, **TIGHT)
        assert plan.dtype == torch.float32 and plan.shape == cost.shape
        for i in range(2):
            for j in range(2):
                problem = [w if w is None else w[i, j] for w in weights]
                expected = pot_plan(cost[i, j], *problem, eps=eps)
                assert torch.allclose(plan[i, j].double(), expected, atol=1e-6, rtol=0), (i, j)


@pytest.mark.skipif(pot_batch is None, reason="POT without ot.batch")
def test_matches_pot_batch_solver():
    cost = clip_like_costs(24, rows=30, cols=12, seed=2).double()
    expected = pot_batch.solve_batch(cost, 0.1, max_iter=20_000, tol=1e-12, method="log_sinkhorn",
                                     grad="detach").plan
    plan = vot.sinkhorn(cost.float(), eps=0.1, **TIGHT)
    assert (plan.double() - expected).abs().max() < 1e-6
    # In fp64 our solver agrees to fp64 precision.
    plan64 = vot.sinkhorn(cost, eps=0.1, tol=1e-13, max_iter=5000)
    assert plan64.dtype == torch.float64 and (plan64 - expected).abs().max() < 1e-10


def ragged_batch(seed=3, extreme=True):
    """Problems of different sizes padded to (7, 9) with zero mass; the padding holds garbage costs."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(7, 9), (3, 9), (7, 2), (1, 5), (4, 1), (5, 6)]
    cost = 2 * torch.rand(len(sizes), 7, 9, generator=generator)
    row_mask = torch.zeros(len(sizes), 7, dtype=torch.bool)
    col_mask = torch.zeros(len(sizes), 9, dtype=torch.bool)
    for i, (p, q) in enumerate(sizes):
        row_mask[i, :p], col_mask[i, :q] = True, True
    cost = torch.where(row_mask[:, :, None] & col_mask[:, None, :], cost, 50.0)  # garbage outside
    if extreme:
        cost[0, 6, 8] = -30.0  # real entries can be anything finite too
    return sizes, cost, row_mask, col_mask


def test_ragged_problems_match_unpadded_pot():
    sizes, cost, row_mask, col_mask = ragged_batch()
    a = row_mask.float() / row_mask.sum(-1, keepdim=True)
    b = col_mask.float() / col_mask.sum(-1, keepdim=True)
    plan = vot.sinkhorn(cost, a, b, eps=0.1, **TIGHT)
    masked = vot.sinkhorn(cost, row_mask=row_mask, col_mask=col_mask, eps=0.1, **TIGHT)
    assert torch.equal(plan, masked)
    for i, (p, q) in enumerate(sizes):
        expected = pot_plan(cost[i, :p, :q], eps=0.1)
        assert torch.allclose(plan[i, :p, :q].double(), expected, atol=1e-6, rtol=0), i
        assert (plan[i, p:] == 0).all() and (plan[i, :, q:] == 0).all(), "padding must get exactly zero mass"


@pytest.mark.parametrize("stop", ["per_problem", "reference"])
def test_padded_plan_equals_unpadded_plan(stop):
    cost = clip_like_costs(5, rows=12, cols=8, seed=4)
    padded = torch.cat([cost, torch.full((5, 12, 3), 0.3)], dim=2)  # three padded text tokens, cheap
    padded = torch.cat([padded, torch.full((5, 2, 11), 10.0)], dim=1)  # two padded rows, far too expensive
    col_mask, row_mask = torch.arange(11) < 8, torch.arange(14) < 12
    expected = vot.sinkhorn(cost, eps=0.1, stop=stop, return_info=True)
    result = vot.sinkhorn(padded, row_mask=row_mask, col_mask=col_mask, eps=0.1, stop=stop, return_info=True)
    assert (result.plan[..., 8:] == 0).all() and (result.plan[..., 12:, :] == 0).all()
    assert torch.allclose(result.plan[..., :12, :8], expected.plan, atol=1e-7, rtol=1e-5)
    if stop == "reference":
        assert torch.equal(result.n_iter, expected.n_iter)


def test_marginals_are_satisfied():
    sizes, cost, row_mask, col_mask = ragged_batch(seed=5, extreme=False)
    result = vot.sinkhorn(cost, row_mask=row_mask, col_mask=col_mask, eps=0.05, max_iter=2000, return_info=True)
    a = row_mask.float() / row_mask.sum(-1, keepdim=True)
    b = col_mask.float() / col_mask.sum(-1, keepdim=True)
    assert (result.plan.sum(-1) - a).abs().sum(-1).max() < 2e-6
    assert (result.plan.sum(-2) - b).abs().sum(-1).max() < 1e-6
    assert (result.marginal_error < 2e-6).all()
    assert result.n_iter.shape == (len(sizes),) and (result.n_iter < 2000).all()
    single = [i for i, (p, q) in enumerate(sizes) if p == 1 or q == 1]
    assert (result.n_iter[single] >= 1).all()


def test_single_row_or_column_is_the_product_of_the_marginals():
    cost = torch.rand(2, 3, 1, 5)
    b = torch.rand(2, 3, 5)
    a = b.sum(-1, keepdim=True)
    result = vot.sinkhorn(cost, a, b, return_info=True)
    assert torch.equal(result.plan[..., 0, :], b)
    assert torch.equal(vot.sinkhorn(cost.transpose(-1, -2), b, a).squeeze(-1), b)
    assert (result.n_iter == 0).all()
    plan = vot.prompt_level_ot(torch.rand(2, 3, 4, 1))
    assert torch.equal(plan, torch.full((2, 3, 4, 1), 0.25))
    assert torch.equal(vot.prompt_level_ot(torch.rand(2, 3, 1, 1)), torch.ones(2, 3, 1, 1))


# ----------------------------------------------------------------------------------------- numerics
def hard_costs(seed=0):
    """Costs in [0, 2] with exact 0s and 2s, a row and a column far from everything (exp(-C/eps) underflows)."""
    generator = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(4, 20, 6, generator=generator)
    cost[:, 0] = 2.0
    cost[:, :, 0] = 2.0
    cost[:, 1, 1:] = 0.0
    cost[0] = 2.0 * (torch.arange(6) % 2)[None, :].float().expand(20, 6)
    return cost


@pytest.mark.parametrize("eps", [0.1, 0.05, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_and_accurate_for_hard_costs_in_any_dtype(eps, dtype):
    cost = hard_costs().to(dtype)
    result = vot.sinkhorn(cost, eps=eps, max_iter=2000, return_info=True)
    assert result.plan.dtype == torch.float32
    assert torch.isfinite(result.plan).all() and (result.plan >= 0).all()
    assert (result.marginal_error < 5e-6).all()
    # Against our fp64 solve of the same (rounded) costs, itself checked against POT above.
    expected = vot.sinkhorn(cost.double(), eps=eps, tol=1e-12, max_iter=20_000)
    assert torch.allclose(result.plan.double(), expected, atol=1e-5, rtol=0)
    # The default 100 iterations may stop early at small eps, but never leave the finite range.
    assert torch.isfinite(vot.sinkhorn(cost, eps=eps)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_does_not_change_the_result(dtype):
    cost = clip_like_costs(3, 2, rows=10, cols=6, seed=7)
    expected = vot.sinkhorn(cost, eps=0.05)
    with torch.autocast("cpu", dtype=dtype):
        plan = vot.sinkhorn(cost, eps=0.05)
        image = torch.randn(2, 2, 10, 16)
        text = torch.randn(3, 2, 5, 16)
        token = vot.token_level_ot(image, text, eps=0.05)
    assert plan.dtype == torch.float32 and torch.equal(plan, expected)
    assert token.similarity.dtype == torch.float32
    assert torch.allclose(token.similarity, vot.token_level_ot(image, text, eps=0.05).similarity)


def test_original_fp16_kernel_breaks_where_ours_does_not():
    """The original code builds exp(-C/eps) in the model's fp16: for costs above ~1.66 at eps = 0.1 whole rows
    underflow to 0, r = a / 0 = inf and the plan is NaN (the code then returns None: the crash path)."""
    cost = hard_costs()[1:]
    a, b = torch.full((3, 20), 1 / 20), torch.full((3, 6), 1 / 6)
    with torch.no_grad():
        plan_fp16, _ = original_sinkhorn(torch.exp(-cost.half() / 0.1), a.half(), b.half())
    assert not torch.isfinite(plan_fp16).all()
    ours = vot.sinkhorn(cost.half(), eps=0.1, max_iter=1000)
    assert torch.isfinite(ours).all()
    for i in range(3):
        assert torch.allclose(ours[i].double(), pot_plan(cost[i].half().float(), eps=0.1), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- stopping rules
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_reference_stop_reproduces_the_original_code(seed, eps):
    cost = clip_like_costs(8, 16, rows=40, cols=12, seed=seed)
    expected, iterations = original_sinkhorn(torch.exp(-cost / eps).view(-1, 40, 12), torch.full((128, 40), 1 / 40),
                                             torch.full((128, 12), 1 / 12))
    result = vot.sinkhorn(cost, eps=eps, stop="reference", return_info=True)
    assert (result.n_iter == iterations).all()
    assert torch.allclose(result.plan.view(-1, 40, 12), expected, atol=1e-7, rtol=1e-5)


def test_reference_stop_per_group_equals_separate_original_calls():
    cost = clip_like_costs(3, 4, 6, rows=25, cols=10, seed=8)
    result = vot.sinkhorn(cost, eps=0.1, stop="reference", group_dims=2, return_info=True)
    for i in range(3):
        for j in range(4):
            expected, iterations = original_sinkhorn(torch.exp(-cost[i, j] / 0.1), torch.full((6, 25), 1 / 25),
                                                     torch.full((6, 10), 1 / 10))
            assert (result.n_iter[i, j] == iterations).all()
            assert torch.allclose(result.plan[i, j], expected, atol=1e-7, rtol=1e-5)


def test_per_problem_stop_freezes_each_problem():
    cost = clip_like_costs(6, rows=30, cols=10, seed=9)
    cost[0] = 1.0  # the constant cost converges at once
    batch = vot.sinkhorn(cost, eps=0.05, return_info=True)
    assert batch.n_iter[0] <= 2 < batch.n_iter[1:].min()
    assert (batch.marginal_error < 1e-6).all()
    for i in range(6):  # a problem's result does not depend on the others in the batch
        alone = vot.sinkhorn(cost[i], eps=0.05, return_info=True)
        assert alone.n_iter == batch.n_iter[i]
        assert torch.allclose(alone.plan, batch.plan[i], atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("stop", ["per_problem", "reference"])
@pytest.mark.parametrize("differentiable", [False, True])
def test_running_ahead_of_the_host_gives_the_same_iterates(monkeypatch, stop, differentiable):
    """On CUDA small batches queue the next iteration before the host has read the convergence and absorption
    flags, and drop it when the flags say stop or absorb first: forced on here, nothing may change."""
    generator = torch.Generator().manual_seed(21)
    cost = torch.rand(6, 3, 17, 9, generator=generator) * 2
    row_mask = torch.rand(6, 3, 17, generator=generator) > 0.2
    col_mask = torch.rand(6, 3, 9, generator=generator) > 0.3
    row_mask[..., 0] = col_mask[..., 0] = True
    absorptions = []
    absorb = vot._Sinkhorn.absorb
    monkeypatch.setattr(vot._Sinkhorn, "absorb", lambda self, state: absorptions.append(1) or absorb(self, state))

    def solve():
        result = vot.sinkhorn(cost.double().requires_grad_(differentiable), row_mask=row_mask, col_mask=col_mask,
                              eps=0.005, stop=stop, differentiable=differentiable, return_info=True)
        return result.plan.detach(), result.n_iter

    in_step = solve()
    monkeypatch.setattr(vot, "_runs_ahead", lambda log_kernel_t: True)
    ahead = solve()
    assert len(absorptions) >= 2 * 3  # the case to test: absorptions between iterations, both times
    assert torch.equal(ahead[1], in_step[1]) and torch.equal(ahead[0], in_step[0])


# ------------------------------------------------------------------------------------------ gradients
def test_default_plan_has_no_gradient_but_the_contraction_does():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 8, 16, generator=generator).requires_grad_()
    texts = torch.randn(4, 5, 16, generator=generator).requires_grad_()
    sim = features @ texts.transpose(1, 2)
    plan = vot.sinkhorn(1 - sim, eps=0.1)
    assert not plan.requires_grad
    (plan * sim).sum().backward()
    # float32 products accumulated in another order: compare with an absolute tolerance for near-zero entries
    assert torch.allclose(features.grad, plan @ texts.detach(), atol=1e-6)
    assert torch.allclose(texts.grad, plan.transpose(1, 2) @ features.detach(), atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_differentiable_plan_passes_gradcheck(padded):
    cost = (2 * torch.rand(2, 5, 4, dtype=torch.float64)).requires_grad_()
    col_mask = torch.tensor([True, True, True, not padded])
    weights = torch.rand(2, 5, 4, dtype=torch.float64)

    def objective(c):
        plan = vot.sinkhorn(c, col_mask=col_mask, eps=0.3, tol=0.0, max_iter=60, differentiable=True)
        return (plan * weights).sum((-2, -1))

    assert torch.autograd.gradcheck(objective, (cost,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_differentiable_gradient_matches_the_envelope_value_gradient():
    """At convergence, d/dC of the entropic OT value ⟨T, C⟩ - eps·H(T) is T itself (envelope theorem)."""
    cost = clip_like_costs(3, rows=8, cols=6, seed=10).double().requires_grad_()
    plan = vot.sinkhorn(cost, eps=0.2, tol=1e-14, max_iter=5000, differentiable=True)
    value = (plan * cost).sum() + 0.2 * (plan * (plan.log() - 1)).sum()
    (grad,) = torch.autograd.grad(value, cost)
    assert torch.allclose(grad, plan.detach(), atol=1e-9)


# --------------------------------------------------------------------------------------- token level
def token_features(n_images=2, n_classes=3, views=2, prompts=3, patches=11, length=6, dim=16, seed=11):
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n_images, views, patches, dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n_classes, prompts, length, dim, generator=generator), dim=-1)
    lengths = torch.randint(1, length + 1, (n_classes, prompts), generator=generator)
    text_mask = torch.arange(length) < lengths[..., None]
    return image, text, text_mask


@pytest.mark.parametrize("stop", ["per_problem", "reference"])
def test_token_level_equals_naive_double_loop(stop):
    image, text, text_mask = token_features()
    image_mask = torch.ones(image.shape[:3], dtype=torch.bool)
    image_mask[1, 0, 7:] = False
    result = vot.token_level_ot(image, text, text_mask, image_mask, eps=0.1, stop=stop)
    assert result.similarity.shape == result.distance.shape == (2, 3, 2, 3)
    for j in range(2):
        for k in range(3):
            # One call per (image, class) pair, as the original code; its M·N problems padded within the call.
            sim = torch.einsum("mpd,nld->mnpl", image[j], text[k])
            cost = 1 - sim
            masks = dict(row_mask=image_mask[j][:, None], col_mask=text_mask[k][None])
            plan = vot.sinkhorn(cost, eps=0.1, stop=stop, group_dims=0, **masks)
            assert torch.allclose(result.similarity[j, k], (plan * sim).sum((-2, -1)), atol=1e-6)
            assert torch.allclose(result.distance[j, k], (plan * cost).sum((-2, -1)), atol=1e-6)
            for m in range(2):
                for n in range(3):
                    rows, cols = image_mask[j, m], text_mask[k, n]
                    alone = vot.sinkhorn(cost[m, n][rows][:, cols], eps=0.1, stop="per_problem")
                    if stop == "per_problem":
                        unpadded = (alone * sim[m, n][rows][:, cols]).sum()
                        assert torch.allclose(result.similarity[j, k, m, n], unpadded, atol=1e-6)
    assert torch.allclose(result.distance, 1 - result.similarity, atol=1e-5)


def test_token_level_chunking_does_not_change_the_result(monkeypatch):
    image, text, text_mask = token_features(n_classes=5, seed=12)
    full = vot.token_level_ot(image, text, text_mask, chunk_size=5)
    monkeypatch.setattr(vot, "TOKEN_BLOCK_BYTES", 1)  # the memory budget alone forces one class per chunk
    assert torch.allclose(vot.token_level_ot(image, text, text_mask).similarity, full.similarity, atol=1e-6)
    monkeypatch.undo()
    for chunk in (1, 2, None):
        chunked = vot.token_level_ot(image, text, text_mask, chunk_size=chunk)
        assert torch.allclose(chunked.similarity, full.similarity, atol=1e-6, rtol=0)
        reference = vot.token_level_ot(image, text, text_mask, chunk_size=chunk, stop="reference")
        assert torch.allclose(reference.similarity,
                              vot.token_level_ot(image, text, text_mask, chunk_size=5, stop="reference").similarity,
                              atol=1e-6, rtol=0)


def test_token_level_gradients():
    image, text, text_mask = token_features(seed=13)
    image = image.double().requires_grad_()
    text = text.double().requires_grad_()
    result = vot.token_level_ot(image, text, text_mask, eps=0.2)
    assert result.similarity.dtype == torch.float64
    result.similarity.sum().backward()
    # Envelope semantics: the gradient is the contraction's with the plan held fixed.
    image_grad, text_grad = image.grad.clone(), text.grad.clone()
    image.grad = text.grad = None
    sim = torch.einsum("jmpd,knld->jkmnpl", image, text)
    plan = vot.sinkhorn(1 - sim.detach(), col_mask=text_mask[None, :, None], eps=0.2)
    (plan * sim).sum().backward()
    assert torch.allclose(image_grad, image.grad) and torch.allclose(text_grad, text.grad)

    def similarity(i, t):
        mask = text_mask[:2, :2, :3]
        return vot.token_level_ot(i, t, mask, eps=0.5, tol=0.0, max_iter=40, differentiable=True).similarity

    text_mask[:2, :2, 0] = True
    small = (image[:1, :1, :4].detach().requires_grad_(), text[:2, :2, :3].detach().requires_grad_())
    assert torch.autograd.gradcheck(similarity, small, eps=1e-6, atol=1e-6, fast_mode=True)


def test_token_level_validates_masks():
    image, text, text_mask = token_features()
    with pytest.raises(ValueError, match="text_mask must have shape"):
        vot.token_level_ot(image, text, text_mask[:, :1])
    text_mask[0, 0] = False
    with pytest.raises(ValueError, match="without any real token"):
        vot.token_level_ot(image, text, text_mask)


# -------------------------------------------------------------------------------------- prompt level
def test_prompt_level_ot_and_transport_score():
    generator = torch.Generator().manual_seed(14)
    sigma = torch.rand(3, 5, 4, 2, generator=generator)
    cost = 1 - sigma
    plan = vot.prompt_level_ot(cost, eps=0.1, tol=1e-7, max_iter=1000)
    assert plan.shape == (3, 5, 4, 2)
    assert torch.allclose(plan.sum(-1), torch.full((3, 5, 4), 1 / 4), atol=1e-6)
    assert torch.allclose(plan.sum(-2), torch.full((3, 5, 2), 1 / 2), atol=1e-6)
    score = vot.transport_score(plan, sigma)
    assert score.shape == (3, 5)
    assert torch.allclose(score, torch.einsum("bkmn,bkmn->bk", plan, sigma))
    expected = pot_plan(cost[1, 2], eps=0.1)
    assert torch.allclose(plan[1, 2].double(), expected, atol=1e-6)
    views = torch.tensor([0.1, 0.2, 0.3, 0.4])
    weighted = vot.prompt_level_ot(cost, views, eps=0.1, tol=1e-7, max_iter=1000)
    assert torch.allclose(weighted.sum(-1), views.expand(3, 5, 4), atol=1e-6)


def test_invalid_arguments():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="stop must be one of"):
        vot.sinkhorn(cost, stop="batch")
    with pytest.raises(ValueError, match="eps must be positive"):
        vot.sinkhorn(cost, eps=0)
    with pytest.raises(ValueError, match="same total mass"):
        vot.sinkhorn(cost, a=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="positive mass"):
        vot.sinkhorn(cost, row_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(B, K, M, N\)"):
        vot.prompt_level_ot(cost)


# ----------------------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-3, 3), eps=st.sampled_from([0.1, 0.05]))
def test_plan_is_invariant_to_row_and_column_offsets(seed, shift, eps):
    """⟨T, C + u 1ᵀ + 1 vᵀ⟩ differs from ⟨T, C⟩ by a constant on the feasible set: the plan cannot change."""
    generator = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(3, 6, 5, generator=generator)
    u, v = torch.rand(3, 6, 1, generator=generator), torch.rand(3, 1, 5, generator=generator)
    plan = vot.sinkhorn(cost, eps=eps, **TIGHT)
    assert torch.allclose(vot.sinkhorn(cost + shift, eps=eps, **TIGHT), plan, atol=2e-7)
    assert torch.allclose(vot.sinkhorn(cost + u + v, eps=eps, **TIGHT), plan, atol=2e-7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(2, 9), cols=st.integers(2, 9))
def test_plan_is_equivariant_to_permutations(seed, rows, cols):
    generator = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(rows, cols, generator=generator)
    a = torch.rand(rows, generator=generator) + 0.05
    b = torch.rand(cols, generator=generator) + 0.05
    a, b = a / a.sum(), b / b.sum()
    row_order, col_order = torch.randperm(rows, generator=generator), torch.randperm(cols, generator=generator)
    plan = vot.sinkhorn(cost, a, b, eps=0.1, **TIGHT)
    permuted = vot.sinkhorn(cost[row_order][:, col_order], a[row_order], b[col_order], eps=0.1, **TIGHT)
    assert torch.allclose(permuted, plan[row_order][:, col_order], atol=2e-7)


# ------------------------------------------------------------------------------------------------ GPU
@CUDA
def test_cuda_matches_cpu_and_survives_autocast():
    cost = clip_like_costs(4, 8, rows=50, cols=12, seed=15)
    expected = vot.sinkhorn(cost, eps=0.05, **TIGHT)
    with torch.autocast("cuda", dtype=torch.float16):
        plan = vot.sinkhorn(cost.cuda().half(), eps=0.05, **TIGHT)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    assert torch.allclose(plan.cpu(), vot.sinkhorn(cost.half(), eps=0.05, **TIGHT), atol=1e-6)
    assert torch.allclose(vot.sinkhorn(cost.cuda(), eps=0.05, **TIGHT).cpu(), expected, atol=1e-6)
    reference = vot.sinkhorn(cost.cuda(), eps=0.1, stop="reference", return_info=True)
    assert torch.equal(reference.n_iter.cpu(), vot.sinkhorn(cost, eps=0.1, stop="reference", return_info=True).n_iter)
    assert vot._runs_ahead(torch.empty(640, 20, 198, device="cuda"))  # the path these small batches took
    image, text, text_mask = token_features()
    on_gpu = vot.token_level_ot(image.cuda(), text.cuda(), text_mask.cuda())
    assert torch.allclose(on_gpu.similarity.cpu(), vot.token_level_ot(image, text, text_mask).similarity, atol=1e-5)
