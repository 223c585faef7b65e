"""Batched entropic optimal transport: the Sinkhorn solver and ALIGN's token- and prompt-level OT.

Everything here solves many small problems at once. A cost tensor ``(..., P, Q)`` holds one problem per index of
its leading dimensions; ragged problems (text token sets of different lengths) are padded and their padded rows or
columns get marginal mass 0, which gives them exactly zero mass in the plan and leaves the rest of the plan equal
to that of the unpadded problem.

Numerics. The original ALIGN/PLOT code iterates plain scaling vectors r, c against the kernel ``exp(-C/eps)``
computed in fp16, which underflows for costs above about ``16.6·eps``. Here the scalings act on a *stabilised*
kernel ``K̃ = exp(-C/eps + f_i + g_j)`` whose log-potentials f, g absorb them whenever they leave
``[e^-20, e^20]`` (Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
2019); the first iteration starts from ``f = -max_j(-C_ij/eps)``, so every row of K̃ holds a 1. After a full
iteration every row of the plan sums to at least ``a_i · min_j b_j`` (for unit mass), so no row or column
vanishes, and each iteration is two batched vector-matrix products, several times cheaper than the ``logsumexp``
passes of a log-domain solver and as accurate. Everything runs in fp32 (fp64 for fp64 costs) with autocast
disabled, whatever the input dtype.

Stopping. ``stop="per_problem"`` stops each problem once the L1 error of its row marginals falls below ``tol``
(column marginals are exact after every column update) and freezes it, so that its plan does not depend on the
rest of the batch (up to rounding). ``stop="reference"`` reproduces the original code's criterion, the mean of
``|r - r_prev|`` over all rows of a call below ``1e-2``, with the original's r recovered as ``exp(f)·r``.

Kept as one module (~570 lines) on purpose: the log-domain Sinkhorn, its masks for ragged token sets and the
token- and prompt-level transports built on it are one numerical unit, read and tested together (tests/test_ot.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "SinkhornResult",
    "TokenOTResult",
    "sinkhorn",
    "token_level_ot",
    "prompt_level_ot",
    "transport_score",
]

STOP_RULES = ("per_problem", "reference")
DEFAULT_TOL = {"per_problem": 1e-6, "reference": 1e-2}

# Scalings are absorbed into the log-potentials once they leave [e^-τ, e^τ]: stabilised-kernel entries that
# underflowed fp32 (< 1e-38) then contribute at most e^(2τ)·1e-38 ≈ 1e-21 to any marginal.
_ABSORB_LOG_BOUND = 20.0
# Column sums of the row-normalised kernel below this have lost digits to subnormals (P · 1e-38 / 1e-25 ≈ 1e-11).
_UNRELIABLE_SUM = 1e-25
# Stabilised-kernel entries below this may have lost digits to underflow: absorption recomputes them from the
# potentials instead of rescaling them.
_UNDERFLOWED = 1e-30
# Batches of up to this many kernel entries queue an iteration ahead of the host's convergence check on CUDA.
_RUN_AHEAD_MAX_ENTRIES = 2**26
# Default memory budget for one (B, k, M, N, P, L) block of token similarities in `token_level_ot`.
TOKEN_BLOCK_BYTES = 256 * 2**20


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn` with ``return_info=True``.

    Attributes:
        plan: transport plans ``(..., P, Q)``, fp32 (fp64 for fp64 costs).
        n_iter: iterations each problem ran ``(...)``, int64; 0 for problems with a single row or column, whose
            plan is the product of the marginals.
        marginal_error: ``Σ_i |T 1 - a|_i + Σ_j |Tᵀ 1 - b|_j`` of the returned plan, per problem ``(...)``.
    """

    plan: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor


@dataclass
class TokenOTResult:
    """Output of :func:`token_level_ot`.

    Attributes:
        similarity: ``S = Σ_{o,l} T_ol ⟨r_o, s_l⟩`` per (image j, class k, view m, prompt n) ``(B, K, M, N)``.
        distance: the OT distance ``⟨T, C⟩ = Σ T - S`` ``(B, K, M, N)``; ``1 - S`` when the plan has unit mass.
    """

    similarity: torch.Tensor
    distance: torch.Tensor


# --------------------------------------------------------------------------------------------- Sinkhorn
def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float | None = None,
    stop: str = "per_problem",
    group_dims: int = 0,
    differentiable: bool = False,
    return_info: bool = False,
) -> torch.Tensor | SinkhornResult:
    """Entropic OT plans ``argmin_T ⟨T, C⟩ - eps·H(T)`` s.t. ``T 1 = a``, ``Tᵀ 1 = b``, for a batch of problems.

    Args:
        cost: ``(..., P, Q)``, any number of batch dimensions, any float dtype. Entries of rows/columns without
            mass are ignored but must be finite.
        a: row marginals ``(..., P)`` (broadcast against the batch); default uniform over the real rows.
            May contain zeros (padding). Each problem's ``a`` and ``b`` must have the same positive total mass.
        b: column marginals ``(..., Q)``; default uniform over the real columns.
        row_mask, col_mask: optional boolean ``(..., P)`` / ``(..., Q)``, True for real entries: shorthand for
            zero marginal mass on padded rows/columns (uniform over the real ones when ``a``/``b`` is None).
        eps: entropic regularisation λ (0.1 in ALIGN and PLOT).
        max_iter: iteration limit; one iteration is a row update followed by a column update.
        tol: stopping threshold; default 1e-6 for ``"per_problem"`` (L1 row-marginal error, for unit mass) and
            1e-2 for ``"reference"`` (the original code's threshold on the mean ``|r - r_prev|``).
        stop: ``"per_problem"``: every problem runs until the L1 error of its row marginals, measured on the plan
            before an iteration's row update, is below ``tol``; it then completes that iteration and is frozen.
            The loop ends when all problems are frozen or after ``max_iter`` iterations. A problem's plan does not
            depend on the other problems in the batch (up to rounding). ``"reference"``: the criterion of the
            original ALIGN/PLOT code (start from ``r = c = 1``, ``r = a / (K c)``, ``c = b / (Kᵀ r)``, stop after
            the first iteration whose mean ``|r - r_prev|`` over all rows of the call is below ``tol``), computed
            from the stabilised iterates, so that it gives the same iteration count and plan as the original fp32
            code wherever that code does not underflow. Batching problems that the original solved in separate calls changes the
            batch mean; ``group_dims`` restores the original grouping.
        group_dims: with ``stop="reference"``, the number of leading batch dimensions that index separate calls
            of the original code: the mean ``|r - r_prev|`` is taken per index of these dimensions. 0 (default):
            the whole batch is one call.
        differentiable: if False (default, as the original code) the plan is computed without autograd and
            carries no gradient; gradients reach features only through explicit contractions with it. If True,
            gradients flow through all the iterations.
        return_info: return a :class:`SinkhornResult` instead of the plan.

    Returns:
        The plans ``(..., P, Q)`` in fp32 (fp64 for fp64 costs), or a :class:`SinkhornResult`.
    """
    tol = _checked_tol(stop, eps, max_iter, tol)
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., P, Q), got {tuple(cost.shape)}")
    batch_shape, (n_rows, n_cols) = cost.shape[:-2], cost.shape[-2:]
    if not 0 <= group_dims <= len(batch_shape):
        raise ValueError(f"group_dims must be in [0, {len(batch_shape)}] for cost {tuple(cost.shape)}")
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32

    with _autocast_off(cost.device), torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        given = any(x is not None for x in (a, b, row_mask, col_mask))
        a = _marginal(a, row_mask, (*batch_shape, n_rows), dtype, cost.device)
        b = _marginal(b, col_mask, (*batch_shape, n_cols), dtype, cost.device)
        if given:  # uniform marginals over all rows and columns are valid by construction
            _check_masses(a, b)
        flat_a, flat_b = a.reshape(-1, n_rows), b.reshape(-1, n_cols)
        if n_rows == 1 or n_cols == 1:
            # One row or one column: the constraints alone fix the plan, the other marginal.
            plan = (a.unsqueeze(-1) if n_cols == 1 else b.unsqueeze(-2)).clone()
            n_iter = torch.zeros(batch_shape, dtype=torch.long, device=cost.device)
        else:
            # The solver works on the transposed log-kernel (n, Q, P): with the long P axis contiguous its
            # reductions and vector-matrix products are several times faster.
            log_kernel_t = torch.empty((flat_a.shape[0], n_cols, n_rows), dtype=dtype, device=cost.device)
            log_kernel_t.copy_(cost.reshape(-1, n_rows, n_cols).transpose(1, 2)).div_(-eps)
            group = math.prod(batch_shape[group_dims:]) if stop == "reference" else 1
            plan_t, n_iter = _solve(log_kernel_t, flat_a, flat_b, max_iter, tol, stop == "reference", group,
                                    differentiable)
            plan = plan_t.transpose(1, 2).reshape(cost.shape)
            n_iter = n_iter.view(batch_shape)
        if not return_info:
            return plan
        error = (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)
        return SinkhornResult(plan=plan, n_iter=n_iter, marginal_error=error.detach())


def _checked_tol(stop, eps, max_iter, tol) -> float:
    """Validate the solver options; return the tolerance (the stop rule's default if None)."""
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    return DEFAULT_TOL[stop] if tol is None else tol


def _autocast_off(device: torch.device):
    """Disable autocast so that the solver's arithmetic stays in fp32 inside mixed-precision training."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _marginal(weights, mask, shape, dtype, device) -> torch.Tensor:
    """Marginal of the given shape: ``weights`` (broadcast, zeroed outside ``mask``) or uniform over ``mask``."""
    if weights is None:
        if mask is None:
            return torch.full(shape, 1.0 / shape[-1], dtype=dtype, device=device)
        mask = mask.to(device=device, dtype=dtype).expand(shape)
        return mask / mask.sum(-1, keepdim=True)
    weights = weights.to(device=device, dtype=dtype).expand(shape)
    return weights if mask is None else weights * mask.to(device=device, dtype=dtype)


def _check_masses(a: torch.Tensor, b: torch.Tensor) -> None:
    """Balanced problems only: non-negative marginals with equal, positive masses (one host sync)."""
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    negative, empty, unbalanced = torch.stack([
        (a < 0).any() | (b < 0).any(),
        ~(mass_a > 0).all(),
        ((mass_a - mass_b).abs() > 1e-4 * mass_b).any(),
    ]).tolist()
    if negative:
        raise ValueError("marginals must be non-negative")
    if empty:
        raise ValueError("every problem needs at least one row and one column with positive mass")
    if unbalanced:
        raise ValueError("row and column marginals must have the same total mass in every problem")


def _solve(log_kernel_t, a, b, max_iter, tol, reference, group, differentiable):
    """Sinkhorn on log-kernels ``-Cᵀ/eps`` ``(n, Q, P)`` with marginals ``(n, P)`` and ``(n, Q)``.

    ``group`` consecutive problems share the reference criterion. Returns the transposed plans ``(n, Q, P)`` and
    the iteration counts ``(n,)``.

    The host learns after every iteration whether problems are left and whether a scaling has left
    ``[e^-20, e^20]`` (then the scalings are absorbed before the next iteration). On a GPU, for batches whose
    iterations are short, the next iteration is queued before the host waits for that answer, so that the device
    never idles while the host decides; the queued iteration is dropped when the answer is "stop" or "absorb
    first". The iterates are the same either way.
    """
    solver = _Sinkhorn(log_kernel_t, a, b, tol, reference, group, differentiable)
    state = solver.first_iteration()
    run_ahead = _runs_ahead(log_kernel_t)
    bound = math.exp(_ABSORB_LOG_BOUND)
    for _ in range(1, max_iter):
        ahead = solver.step(state) if run_ahead else None
        any_active, low, high = state.flags.values()
        if not any_active:
            break
        if low < 1 / bound or high > bound:
            state, ahead = solver.absorb(state), None
        state = solver.step(state) if ahead is None else ahead
    return solver.plan_t(state), state.n_iter


def _runs_ahead(log_kernel_t) -> bool:
    """Queue an iteration ahead of the host's check? On CUDA only, and only while an iteration is short: the
    check's round trip (tens of µs) then costs about as much as the iteration; on larger batches the one iteration
    computed in vain at the end would cost more than the waits it saves (2**26 entries are two ~0.1 ms passes on an
    H100: an estimate, not a measurement)."""
    return log_kernel_t.device.type == "cuda" and log_kernel_t.numel() <= _RUN_AHEAD_MAX_ENTRIES


class _HostValues:
    """A small device tensor on its way to the host: on CUDA copied into pinned memory without blocking the host
    (an event marks the copy's end); ``values()`` waits for it and returns the Python numbers."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor

    def values(self) -> list:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class _Iterates(NamedTuple):
    """The loop's state between two iterations. Never modified in place, so that one computed ahead can be
    dropped."""

    r: torch.Tensor  # (n, P) row scalings of the current kernel, 0 on rows without mass
    c: torch.Tensor  # (n, Q) column scalings, 0 on columns without mass
    active: torch.Tensor  # (n,) bool: the problem still iterates
    n_iter: torch.Tensor  # (n,) int64: iterations run
    flags: _HostValues  # [any problem active, smallest scaling, largest scaling], for the host


class _Sinkhorn:
    """Scaling iterations on the stabilised kernel ``K̃ = exp(-C/eps + f_i + g_j)`` of a batch of problems.

    Holds what iterations share: the kernel in both layouts (``(n, Q, P)`` and ``(n, P, Q)``, so that both
    vector-matrix products read contiguous rows), its log-potentials f, g and the marginals. Without autograd the
    kernel is updated in place (CPU allocations of this size cost page faults); with it, every update makes fresh
    tensors that autograd can keep.
    """

    def __init__(self, log_kernel_t, a, b, tol, reference, group, differentiable):
        self.log_kernel_t, self.a, self.b, self.tol, self.reference = log_kernel_t, a, b, tol, reference
        self.inplace = not differentiable
        self.real_rows, self.real_cols = (a > 0).to(a.dtype), (b > 0).to(b.dtype)
        # Rows/columns without mass get the scaling a / (sum + 1) = 0: the plan is exactly 0 there whatever finite
        # cost they hold, and they never enter another row's or column's sum.
        self.row_pad, self.col_pad = 1 - self.real_rows, 1 - self.real_cols
        if reference:
            self.group_rows = self.real_rows.view(-1, group, a.shape[1]).sum((1, 2)).clamp_min(1)

    def first_iteration(self) -> _Iterates:
        """Iteration 1, from ``r = c = 1`` on the real entries as in the original code."""
        a, b, log_kernel_t = self.a, self.b, self.log_kernel_t
        # Against the kernel divided by its row maxima: exp(-C/eps) itself may underflow, this one has a 1 in
        # every row.
        row_max = log_kernel_t.amax(1).detach()  # a shift only: the result does not depend on it
        self._set_kernel(torch.sub(log_kernel_t, row_max[:, None, :]).exp_(), f=-row_max, g=torch.zeros_like(b))
        row_sums = _row_sums(self.kernel_t, self.real_cols)
        r = a / (row_sums + self.row_pad)
        col_sums = _col_sums(self.kernel, r)
        c = b / (col_sums + self.col_pad)
        lost_digits = ((row_sums < _UNRELIABLE_SUM) & (a > 0)).any() | ((col_sums < _UNRELIABLE_SUM) & (b > 0)).any()
        if bool(lost_digits):
            # A column ≳57 e-folds below every row's best match (eps ≪ cost range), or padding far cheaper than
            # the real entries: the scaled sums lost digits to underflow, so take iteration 1 in the log domain.
            f = a.log() - torch.logsumexp(log_kernel_t + self.real_cols.log()[:, :, None], dim=1)
            g = b.log() - torch.logsumexp(log_kernel_t + f[:, None, :], dim=2)
            self._set_kernel(_exp_of_sum(log_kernel_t, f, g), f, g)
            r, c = self.real_rows, self.real_cols
        n_iter = torch.ones(a.shape[0], dtype=torch.long, device=a.device)
        if self.reference:
            step = ((self.scale_f * r - 1).abs() * self.real_rows).sum(1)  # the original's r is exp(f)·r, from 1
            active = ~_group_mean_below(step, self.group_rows, self.tol)
        else:
            active = torch.ones_like(n_iter, dtype=torch.bool)
        return self._iterates(r, c, active, n_iter)

    def step(self, state: _Iterates) -> _Iterates:
        """One iteration (row update, then column update) of the problems still active."""
        a, r, keep = self.a, state.r, state.active[:, None]
        row_sums = _row_sums(self.kernel_t, state.c)
        r_new = a / (row_sums + self.row_pad)
        if self.reference:
            # The change of the original's r = exp(f)·r since the last iteration, summed over the rows.
            done = _group_mean_below((self.scale_f * (r_new - r).abs()).sum(1), self.group_rows, self.tol)
        else:
            # L1 row-marginal error of the current plan, free from the row sums the update needs anyway.
            done = torch.addcmul(a, r, row_sums, value=-1).abs().sum(1) < self.tol
        r = torch.where(keep, r_new, r)
        c = torch.where(keep, self.b / (_col_sums(self.kernel, r) + self.col_pad), state.c)
        return self._iterates(r, c, state.active & ~done, state.n_iter + state.active)

    def absorb(self, state: _Iterates) -> _Iterates:
        """Move the scalings into the kernel and its log-potentials; the iterates' plan ``r K̃ c`` is unchanged.

        Entries that matter are rescaled, exact to rounding; only those that had underflowed are recomputed as
        ``exp(-C/eps + f + g)``, which is exact to ~|f|·1e-7 relative only (a floor of ~1e-5 at eps = 0.01 if used
        for all entries) but cannot make these entries matter. Stopped problems are absorbed too. log 0 = -inf on
        padding is kept out of the gradient.
        """
        r, c, inplace = state.r, state.c, self.inplace
        f = self.f + (r + self.row_pad).log() + self.real_rows.log()
        g = self.g + (c + self.col_pad).log() + self.real_cols.log()
        fresh = _exp_of_sum(self.log_kernel_t, f, g)
        kernel_t = _scaled(self.kernel_t, r, c, inplace)
        kernel_t = torch.where(kernel_t > _UNDERFLOWED, kernel_t, fresh, out=kernel_t if inplace else None)
        self._set_kernel(kernel_t, f, g, reuse=inplace)
        return self._iterates(self.real_rows, self.real_cols, state.active, state.n_iter)

    def plan_t(self, state: _Iterates) -> torch.Tensor:
        """The transposed plans ``r_i K̃_ij c_j`` ``(n, Q, P)``: their marginals are those the iterations measured
        (recomputing ``exp(-C/eps + f + g + log r + log c)`` instead would round the large potentials again, ~1e-6
        relative error at eps = 0.1). Ends the solver when in place."""
        return _scaled(self.kernel_t, state.r, state.c, self.inplace)

    def _set_kernel(self, kernel_t, f, g, reuse=False):
        self.kernel_t, self.f, self.g = kernel_t, f, g
        self.kernel = _transposed(kernel_t, out=self.kernel if reuse else None)
        if self.reference:
            # exp(f) on rows with mass, 0 on padded ones (whose potentials may be anything): the original code's
            # r is this times ours.
            self.scale_f = torch.where(self.a > 0, f, -math.inf).exp()

    def _iterates(self, r, c, active, n_iter) -> _Iterates:
        r_min, r_max = torch.aminmax(r.detach() + self.row_pad)  # two reductions: cheaper than one over a cat
        c_min, c_max = torch.aminmax(c.detach() + self.col_pad)
        flags = torch.stack([active.any().to(r_min.dtype), torch.minimum(r_min, c_min), torch.maximum(r_max, c_max)])
        return _Iterates(r, c, active, n_iter, _HostValues(flags))


def _row_sums(kernel_t, c):
    """``Σ_j K̃_ij c_j`` ``(n, P)`` from ``K̃ᵀ`` ``(n, Q, P)``: a batched vector-matrix product, the fast form."""
    return torch.bmm(c.unsqueeze(1), kernel_t).squeeze(1)


def _col_sums(kernel, r):
    """``Σ_i r_i K̃_ij`` ``(n, Q)`` from ``K̃`` ``(n, P, Q)``."""
    return torch.bmm(r.unsqueeze(1), kernel).squeeze(1)


def _exp_of_sum(log_kernel_t, f, g):
    """``exp(log_kernel_t[n, j, i] + g[n, j] + f[n, i])`` ``(n, Q, P)``."""
    return torch.add(log_kernel_t, g[:, :, None]).add_(f[:, None, :]).exp_()


def _scaled(kernel_t, r, c, inplace):
    """``r_i K̃ᵀ_ji c_j``; in place only without autograd (autograd keeps K̃ for the products that used it)."""
    if inplace:
        return kernel_t.mul_(c[:, :, None]).mul_(r[:, None, :])
    return kernel_t * c[:, :, None] * r[:, None, :]


def _transposed(kernel_t, out=None):
    """The contiguous ``(n, P, Q)`` copy of ``(n, Q, P)``, written into ``out`` if given."""
    if out is None:
        return kernel_t.transpose(1, 2).contiguous()
    return out.copy_(kernel_t.transpose(1, 2))


def _group_mean_below(step, group_rows, tol):
    """Per problem: is the mean step over the real rows of its group below ``tol``? (NaN/inf: no.)"""
    per_group = step.view(group_rows.shape[0], -1).sum(1) / group_rows
    return (per_group < tol).repeat_interleave(step.shape[0] // group_rows.shape[0])


# ---------------------------------------------------------------------------------------- token level
def token_level_ot(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    *,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float | None = None,
    stop: str = "per_problem",
    differentiable: bool = False,
    chunk_size: int | None = None,
) -> TokenOTResult:
    """ALIGN's token-level OT (Eq. 5) between every image view and every class prompt.

    For image j, class k, view m, prompt n the cost is ``C_ol = 1 - ⟨r_o, s_l⟩`` over the real tokens, with
    uniform marginals over the real tokens of each side, and the plan ``T = sinkhorn(C)``.

    Args:
        image_tokens: ``(B, M, P, D)`` token features r, L2-normalised by the caller.
        text_tokens: ``(K, N, L, D)`` token features s, L2-normalised, padded to a common length L.
        text_mask: ``(K, N, L)`` boolean, True for real tokens; default all real.
        image_mask: ``(B, M, P)`` boolean, True for real tokens; default all real.
        eps, max_iter, tol, stop, differentiable: as in :func:`sinkhorn`. With ``stop="reference"`` each
            (image, class) pair is its own call, as in the original code (its M·N problems share the criterion).
        chunk_size: at most this many classes per chunk; default: as many as keep one ``(B, k, M, N, P, L')``
            fp32 block within ``TOKEN_BLOCK_BYTES`` (256 MB). Classes are also grouped by token-set length L'
            (padding is cut away per chunk). Results do not depend on the chunking.

    Returns:
        :class:`TokenOTResult` with ``similarity`` and ``distance`` ``(B, K, M, N)`` (fp32). Gradients reach the
        features through the contraction ``Σ T ⊙ ⟨r, s⟩`` (and through T only if ``differentiable``).
    """
    tol = _checked_tol(stop, eps, max_iter, tol)
    n_images, n_views, n_patches, dim = image_tokens.shape
    n_classes, n_prompts, length, text_dim = text_tokens.shape
    if text_dim != dim:
        raise ValueError(f"feature sizes differ: image tokens {dim}, text tokens {text_dim}")
    device = image_tokens.device
    masks = {"text_mask": (text_mask, text_tokens.shape[:3]), "image_mask": (image_mask, image_tokens.shape[:3])}
    for name, (mask, shape) in masks.items():
        if mask is not None and mask.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
        if mask is not None and not bool(mask.any(-1).all()):
            raise ValueError(f"{name} leaves a token set without any real token")
    # Uniform marginals over the real tokens: (B, M, P) for the images, (K, N, L) for the classes.
    dtype = torch.float64 if image_tokens.dtype == torch.float64 else torch.float32
    image_weights = _marginal(None, image_mask, image_tokens.shape[:3], dtype, device)
    text_weights = _marginal(None, text_mask, text_tokens.shape[:3], dtype, device)

    with _autocast_off(device):
        # Similarities in fp32 (fp64 for fp64 input): the cost is divided by eps, which would amplify fp16
        # rounding 10-100x.
        image_flat = image_tokens.to(dtype).reshape(n_images * n_views * n_patches, dim)
        offset = image_flat.new_full((1,), -1.0 / eps)
        similarities, distances, classes = [], [], []
        for chunk, span in _class_chunks(text_mask, n_classes, length, chunk_size,
                                           4 * image_weights.numel() * n_prompts, device):
            text = text_tokens[chunk, :, :span].to(dtype)
            k = len(chunk)
            # -C/eps = (⟨r_o, s_l⟩ - 1)/eps for all token pairs of the chunk in one matmul, then laid out
            # (B, k, M, N, L, P): problem-major and transposed, as the solver wants it.
            log_kernel_t = torch.addmm(offset, image_flat, text.reshape(k * n_prompts * span, dim).T, alpha=1 / eps)
            log_kernel_t = log_kernel_t.view(n_images, n_views, n_patches, k, n_prompts, span)
            log_kernel_t = log_kernel_t.permute(0, 3, 1, 4, 5, 2).contiguous()
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                shape = (n_images, k, n_views, n_prompts)
                a = image_weights[:, None, :, None, :].expand(*shape, n_patches).reshape(-1, n_patches)
                b = text_weights[None, chunk, None, :, :span].expand(*shape, span).reshape(-1, span)
                # Reference stopping: each (image, class) pair was one call of the original code.
                plan_t, _ = _solve(
                    (log_kernel_t if differentiable else log_kernel_t.detach()).view(-1, span, n_patches),
                    a, b, max_iter, tol, stop == "reference", n_views * n_prompts, differentiable)
            plan_t = plan_t.view_as(log_kernel_t)
            # ⟨T, C⟩ = -eps·⟨T, -C/eps⟩, and S = Σ T ⊙ ⟨r, s⟩ = Σ T - ⟨T, C⟩: the gradient reaches the features
            # through this contraction.
            distance = (plan_t * log_kernel_t).sum((-2, -1)) * -eps
            similarities.append(plan_t.sum((-2, -1)) - distance)
            distances.append(distance)
            classes.append(chunk)
        unsort = torch.cat(classes).argsort()
    return TokenOTResult(similarity=torch.cat(similarities, 1)[:, unsort],
                         distance=torch.cat(distances, 1)[:, unsort])


def _class_chunks(text_mask, n_classes, length, chunk_size, bytes_per_token, device):
    """Chunks of class indices ``(k,)`` on ``device``, each with the token span ``L'`` it is cut to.

    Classes are sorted by span (the last real token's position + 1, over the prompts) and each chunk is cut to
    its longest span. On CPU a chunk holds classes of one span only: the similarity matmul and the solver's
    passes cost in proportion to the padded size, a chunk only ~1 ms of overhead. On GPUs, where the overhead
    (kernel launches) dominates, chunks are as large as the budget allows. A chunk holds at most ``chunk_size``
    classes, by default as many as keep one ``(B, k, M, N, P, L')`` block (``bytes_per_token · L'`` bytes per
    class) within ``TOKEN_BLOCK_BYTES``.
    """
    if text_mask is None:
        spans = torch.full((n_classes,), length)
    else:
        spans = (text_mask.cpu() * torch.arange(1, length + 1)).amax((1, 2))  # (K,)
    order = torch.argsort(spans, stable=True)
    spans = spans[order].tolist()
    chunks, start = [], 0
    while start < n_classes:
        end = start + 1
        while end < n_classes and (spans[end] == spans[start] or device.type != "cpu"):
            limit = chunk_size or max(1, TOKEN_BLOCK_BYTES // (bytes_per_token * spans[end]))
            if end + 1 - start > limit:
                break
            end += 1
        chunks.append((order[start:end].to(device), spans[end - 1]))
        start = end
    return chunks


# --------------------------------------------------------------------------------------- prompt level
def prompt_level_ot(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float | None = None,
    stop: str = "per_problem",
    differentiable: bool = False,
) -> torch.Tensor:
    """ALIGN's prompt-level OT (Eqs. 4, 6): plans between the M image views and the N prompts of each class.

    Args:
        cost: ``(B, K, M, N)`` cost between view m of image j and prompt n of class k.
        a: view weights ``(M,)`` or ``(B, K, M)``; default uniform 1/M.
        b: prompt weights ``(N,)`` or ``(B, K, N)``; default uniform 1/N.
        eps, max_iter, tol, stop, differentiable: as in :func:`sinkhorn`; with ``stop="reference"`` all B·K
            problems form one call, as in the original code.

    Returns:
        Plans ``(B, K, M, N)`` (fp32). With M = 1 or N = 1 the plan is the product of the marginals, exactly.
        Combine with :func:`transport_score`.
    """
    if cost.dim() != 4:
        raise ValueError(f"cost must have shape (B, K, M, N), got {tuple(cost.shape)}")
    return sinkhorn(cost, a, b, eps=eps, max_iter=max_iter, tol=tol, stop=stop, differentiable=differentiable)


def transport_score(plan: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Σ_{m,n} plan ⊙ values`` over the last two dimensions: ``(B, K, M, N)`` → ``(B, K)``.

    With ``values = σ`` (prompt similarities) this is the reference logit divided by the logit scale; with the
    cost it is the OT distance ``⟨T, C⟩``. Gradients flow to ``values`` (and to ``plan`` if it carries any).
    """
    return (plan * values).sum((-2, -1))
