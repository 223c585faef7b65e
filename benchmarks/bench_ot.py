"""Speed of the token-level optimal transport at ALIGN's shapes.

Compares, on the same inputs and in one run:
  * vlprompt's batched ``token_level_ot`` (similarities, Sinkhorn and contraction for all (image, class) pairs);
  * the original ALIGN/PLOT code path: a Python loop over (image j, class k) pairs, each computing its token
    similarities and running the plain-kernel Sinkhorn on its M·N problems (``stop="reference"`` semantics);
  * a per-problem Python loop: one call per OT problem (image j, class k, view m, prompt n), each computing its
    ``(P, L_k)`` similarities and running the original code's Sinkhorn on that single problem;
  * the solvers alone on precomputed costs: the original loop's Sinkhorn per pair against vlprompt's ``sinkhorn``
    with ``stop="reference"`` (same iterations, same plans), and POT's batched solver
    ``ot.batch.solve_batch(method="log_sinkhorn")`` against vlprompt's ``sinkhorn`` with its default
    ``stop="per_problem"``, both with marginal tolerance 1e-6 and at most 100 iterations; and POT's single-problem
    ``ot.sinkhorn`` called once per problem in a Python loop (same tolerance), against the same;
  * the prompt-level OT: B·K problems of M x N (4 x 4) costs, where the time is per-operation overhead (kernel
    launches on a GPU) rather than arithmetic: the original code's one plain-kernel call on all of them
    (``stop="reference"``) against ``prompt_level_ot`` with the same rule, and POT's batched solver against
    ``prompt_level_ot`` with its default ``stop="per_problem"`` (tol 1e-6).

Features are random but CLIP-like (token cosines around 0.25 ± 0.13), text token sets are ragged (6 to 20 tokens,
padded to 20 with zero mass). Times are wall-clock medians of ``--repeats`` runs after one warm-up; the
per-problem loops (tens of thousands of calls, linear in their count by construction) run once, without a warm-up
beyond their first problems.

    python benchmarks/bench_ot.py            # B in {4, 32} x K in {10, 100}
    python benchmarks/bench_ot.py --quick    # B = 4, K = 10 only, one repeat
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from vlprompt.ot import prompt_level_ot, sinkhorn, token_level_ot

M = N = 4  # visual and textual prompts
P = 198  # image tokens: 196 patches + 2 prompt outputs
L = 20  # longest text token set
D = 512
EPS = 0.1


def clip_like_features(n_images, n_classes, device, seed=0):
    """Unit token features ``(B, M, P, D)``, ``(K, N, L, D)`` and the text mask ``(K, N, L)``.

    Tokens share a common direction plus low-rank and isotropic noise, which gives cosines like CLIP's token
    outputs (mean ~0.25, std ~0.13) rather than the near-orthogonal ones of isotropic random vectors.
    """
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=generator)
    common /= common.norm()
    basis = torch.linalg.qr(torch.randn(D, 32, generator=generator))[0]

    def tokens(*shape):
        x = (0.6 * common + torch.randn(*shape, 32, generator=generator) / math.sqrt(32) @ basis.T
             + 0.3 * torch.randn(*shape, D, generator=generator) / math.sqrt(D))
        return x / x.norm(dim=-1, keepdim=True)

    image = tokens(n_images, M, P)
    text = tokens(n_classes, N, L)
    lengths = torch.randint(6, L + 1, (n_classes,), generator=generator)
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, :].expand(n_classes, N, L).contiguous()
    return image.to(device), text.to(device), mask.to(device)


def original_sinkhorn(kernel, u, v, max_iter=100, thresh=1e-2):
    """The Sinkhorn of the ALIGN/PLOT code (trainers/mmp.py), verbatim apart from names."""
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(kernel.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        err = (r - r0).abs().mean()
        if err.item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * kernel


def text_lengths(mask):
    """Real tokens per class (the same for its N prompts): ``[L_k]``."""
    return mask[:, 0].sum(-1).tolist()


def pair_similarities(image, text, mask):
    """Per (j, k) pair, the ``(M·N, P, L_k)`` token similarities over the real tokens, as the original code
    computes them."""
    lengths = text_lengths(mask)
    return [[torch.einsum("mpd,nld->mnpl", image[j], text[k, :, :lengths[k]]).reshape(M * N, P, lengths[k])
             for k in range(text.shape[0])] for j in range(image.shape[0])]


def original_call(cost):
    """One call of the original code's Sinkhorn on costs ``(n, P, Q)`` with uniform marginals: plans ``(n, P, Q)``."""
    u = torch.full(cost.shape[:2], 1.0 / cost.shape[1], device=cost.device)
    v = torch.full((cost.shape[0], cost.shape[2]), 1.0 / cost.shape[2], device=cost.device)
    with torch.no_grad():
        return original_sinkhorn(torch.exp(-cost / EPS), u, v)


def original_pair(sim):
    """The original code's Sinkhorn for one (j, k) pair: plans ``(M·N, P, L_k)``."""
    return original_call(1.0 - sim)


def original_loop(image, text, mask):
    """Token similarity ``(B, K, M, N)`` as the original code computes it: a Python loop over (j, k) pairs."""
    out = torch.empty(image.shape[0], text.shape[0], M, N, device=image.device)
    for j, row in enumerate(pair_similarities(image, text, mask)):
        for k, sim in enumerate(row):
            out[j, k] = (original_pair(sim) * sim).sum((1, 2)).view(M, N)
    return out


def per_problem_loop(image, text, mask):
    """Token similarity ``(B, K, M, N)`` with one Python-level call per OT problem (the original Sinkhorn, batch 1)."""
    lengths = text_lengths(mask)
    out = torch.empty(image.shape[0], text.shape[0], M, N, device=image.device)
    for j in range(image.shape[0]):
        for k in range(text.shape[0]):
            for m in range(M):
                for n in range(N):
                    sim = (image[j, m] @ text[k, n, :lengths[k]].T).unsqueeze(0)  # (1, P, L_k)
                    out[j, k, m, n] = (original_pair(sim) * sim).sum()
    return out


def pot_per_problem(pot, costs, lengths):
    """POT's single-problem ``ot.sinkhorn`` once per problem; ``costs`` is ``(B, K, M, N, P, L)``, padded."""
    a = torch.full((P,), 1.0 / P, device=costs.device)
    weights = {length: torch.full((length,), 1.0 / length, device=costs.device) for length in set(lengths)}
    for j in range(costs.shape[0]):
        for k in range(costs.shape[1]):
            b = weights[lengths[k]]
            for m in range(M):
                for n in range(N):
                    pot.sinkhorn(a, b, costs[j, k, m, n, :, :lengths[k]], EPS, numItermax=100, stopThr=1e-6)


def prompt_level_costs(image, text):
    """``(B, K, M, N)`` costs ``1 - cos`` between the views' and the prompts' mean token features (CLIP-like
    global features), the prompt-level cost of ALIGN with beta = 0."""
    z = torch.nn.functional.normalize(image.mean(2), dim=-1)  # (B, M, D)
    h = torch.nn.functional.normalize(text.mean(2), dim=-1)  # (K, N, D)
    return (1 - torch.einsum("bmd,knd->bkmn", z, h)).contiguous()


def original_prompt_level(cost):
    """The original code's prompt-level OT: one plain-kernel Sinkhorn call on all B·K problems."""
    return original_call(cost.view(-1, M, N))


def timed(fn, repeats, device, warmup=True):
    """Median wall-clock seconds of ``repeats`` calls (after one warm-up call if ``warmup``), and the last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B = 4, K = 10 only, one repeat")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-pot", action="store_true", help="skip POT's batched solver")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    configs = [(4, 10)] if args.quick else [(4, 10), (4, 100), (32, 10), (32, 100)]
    try:
        import ot.batch as pot_batch
    except ImportError:
        pot_batch = None
    if args.no_pot:
        pot_batch = None

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"shapes: M = N = {M}, P = {P}, L <= {L} (ragged), D = {D}, eps = {EPS}; median of {repeats}", flush=True)
    end_to_end, solver_only, prompt_level = [], [], []
    for n_images, n_classes in configs:
        image, text, mask = clip_like_features(n_images, n_classes, device)
        problems = n_images * n_classes * M * N

        # 1. Token-level OT end to end: similarities, Sinkhorn, contraction Σ T ⊙ ⟨r, s⟩.
        t_loop, loop = timed(lambda: original_loop(image, text, mask), repeats, device)
        t_ref, ours_ref = timed(lambda: token_level_ot(image, text, mask, stop="reference").similarity,
                                repeats, device)
        t_pp, _ = timed(lambda: token_level_ot(image, text, mask).similarity, repeats, device)
        t_problem, problem_loop = timed(lambda: per_problem_loop(image, text, mask), 1, device,
                                         warmup=False)
        end_to_end.append(f"| {n_images} | {n_classes} | {problems} | {t_problem:.3f} s | {t_loop:.3f} s | "
                          f"{t_ref:.3f} s | {t_problem / t_ref:.1f}x | {t_loop / t_ref:.1f}x | {t_pp:.3f} s | "
                          f"{t_problem / t_pp:.1f}x |")
        print(end_to_end[-1], f"max |S_ours - S_loop| = {(ours_ref - loop).abs().max().item():.1e}, "
              f"max |S_ours - S_per_problem| = {(ours_ref - problem_loop).abs().max().item():.1e}", flush=True)
        del loop, ours_ref, problem_loop

        # 2. Solver only, on precomputed costs: per-pair tensors for the loop; one padded tensor
        # (B, K, M, N, P, L) with zero-mass padding for vlprompt and POT.
        pairs = pair_similarities(image, text, mask)
        t_loop, _ = timed(lambda: [[original_pair(sim) for sim in row] for row in pairs], repeats, device)
        pairs = None  # free before the padded cost tensor is built
        cost = (1 - torch.einsum("bmpd,knld->bkmnpl", image, text)).contiguous()
        col_mask = mask[None, :, None]
        t_ref, _ = timed(lambda: sinkhorn(cost, col_mask=col_mask, eps=EPS, stop="reference", group_dims=2),
                         repeats, device)
        t_pp, ours_plan = timed(lambda: sinkhorn(cost, col_mask=col_mask, eps=EPS), repeats, device)
        if pot_batch is not None:
            import ot as pot

            t_pot_loop, _ = timed(lambda: pot_per_problem(pot, cost, text_lengths(mask)), 1, device,
                                  warmup=False)
            weights = mask.float() / mask.sum(-1, keepdim=True)
            b = weights[None, :, None].expand(n_images, n_classes, M, N, L).reshape(-1, L).contiguous()
            a = torch.full((problems, P), 1.0 / P, device=device)

            def pot_batched():
                return pot_batch.solve_batch(cost.view(-1, P, L), EPS, a, b, max_iter=100, tol=1e-6,
                                             method="log_sinkhorn", grad="detach")
            t_pot, pot_result = timed(pot_batched, repeats, device)
            pot_cell = f"{t_pot:.3f} s ({pot_result.log['n_iter'] + 1} it.)"
            pot_ratio = f"{t_pot / t_pp:.1f}x"
            pot_diff = (pot_result.plan - ours_plan.view(-1, P, L)).abs().max().item()
            del pot_result, a, b
        else:
            pot_cell, pot_ratio, pot_diff, t_pot_loop = "n/a", "n/a", float("nan"), float("nan")
        cost = ours_plan = None
        solver_only.append(f"| {n_images} | {n_classes} | {t_loop:.3f} s | {t_ref:.3f} s | {t_loop / t_ref:.1f}x | "
                           f"{pot_cell} | {t_pp:.3f} s | {pot_ratio} | {t_pot_loop:.3f} s | "
                           f"{t_pot_loop / t_pp:.1f}x |")
        print(solver_only[-1], f"max |plan_ours - plan_POT| = {pot_diff:.1e}", flush=True)

        # 3. Prompt-level OT: B·K small problems, overhead-bound (more repeats: each call takes milliseconds).
        cost = prompt_level_costs(image, text)
        many = max(repeats, 20)
        t_orig, orig_plan = timed(lambda: original_prompt_level(cost), many, device)
        t_ref, ours_plan = timed(lambda: prompt_level_ot(cost, stop="reference"), many, device)
        t_pp, ours_pp = timed(lambda: prompt_level_ot(cost), many, device)
        cells = f"{t_orig * 1e3:.2f} ms | {t_ref * 1e3:.2f} ms | {t_orig / t_ref:.1f}x | "
        if pot_batch is not None:
            uniform_a = torch.full((n_images * n_classes, M), 1.0 / M, device=device)
            uniform_b = torch.full((n_images * n_classes, N), 1.0 / N, device=device)
            t_pot, pot_result = timed(lambda: pot_batch.solve_batch(cost.view(-1, M, N), EPS, uniform_a, uniform_b,
                                                                    max_iter=100, tol=1e-6, method="log_sinkhorn",
                                                                    grad="detach"), many, device)
            cells += (f"{t_pot * 1e3:.2f} ms ({pot_result.log['n_iter'] + 1} it.) | {t_pp * 1e3:.2f} ms | "
                      f"{t_pot / t_pp:.1f}x |")
            pot_diff = (pot_result.plan - ours_pp.view(-1, M, N)).abs().max().item()
        else:
            cells += f"n/a | {t_pp * 1e3:.2f} ms | n/a |"
            pot_diff = float("nan")
        prompt_level.append(f"| {n_images} | {n_classes} | {n_images * n_classes} | " + cells)
        print(prompt_level[-1], f"max |plan_ours - plan_original| = "
              f"{(ours_plan - orig_plan.view_as(ours_plan)).abs().max().item():.1e}, "
              f"max |plan_ours - plan_POT| = {pot_diff:.1e}", flush=True)
        cost = None

    print("\nToken-level OT, end to end (similarities + Sinkhorn + contraction):\n")
    print("| B | K | problems | per-problem loop | original per-pair loop | vlprompt, stop=reference | "
          "speed-up vs per-problem loop | speed-up vs per-pair loop | vlprompt, per_problem | "
          "speed-up (per_problem) vs per-problem loop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(end_to_end))
    print("\nSinkhorn only, on precomputed costs:\n")
    print("| B | K | original per-pair loop | vlprompt, stop=reference | speed-up | POT solve_batch, tol 1e-6 | "
          "vlprompt, per_problem, tol 1e-6 | speed-up vs POT batched | POT ot.sinkhorn per problem, tol 1e-6 | "
          "speed-up vs POT per problem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(solver_only))
    print("\nPrompt-level OT (B·K problems of 4 x 4, overhead-bound):\n")
    print("| B | K | problems | original (one plain-kernel call) | vlprompt, stop=reference | speed-up | "
          "POT solve_batch, tol 1e-6 | vlprompt, per_problem, tol 1e-6 | speed-up vs POT batched |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(prompt_level))
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
