"""Cost-regularized OT across spaces (Sebbouh, Cuturi, Peyré, AISTATS 2024) as plain functions.

Source X ∈ R^{n×dx} with weights a, target Y ∈ R^{m×dy} with weights b, a linear map M ∈ R^{dy×dx}:

    min_M min_{P ∈ Π(a,b)}  ⟨C_M, P⟩ + ε KL(P ‖ abᵀ) + ½‖M‖²_F + λ Ω(M),   C_M[i,j] = −⟨M x_i, y_j⟩.

For fixed P the M-problem is min_M ½‖M − A(P)‖² + λΩ(M) with A(P) = Yᵀ Pᵀ X, so
M = prox_{λΩ}(A(P)). With Ω = 0 this is inner-product Gromov–Wasserstein (see
:func:`gw_inner_product_objective`). Everything is torch (float64), CPU or GPU; Sinkhorn is POT's
log-domain solver through its torch backend, warm-started from the previous iteration's potentials.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import ot
import torch

REGULARIZERS = ("none", "l1", "l12", "ridge", "nuclear", "lowrank")


# -- proximal operators ------------------------------------------------------------------------
def prox(A: torch.Tensor, regularizer: str, lam: float = 0.0, rank: int = 2) -> torch.Tensor:
    """prox_{λΩ}(A) = argmin_M ½‖M − A‖² + λΩ(M).

    none: A · l1: sign(A)·max(|A| − λ, 0) · l12 (group lasso over columns, source features):
    A_{:,k}·max(0, 1 − λ/‖A_{:,k}‖) · ridge (Ω = ½‖M‖²): A/(1+λ) · nuclear (Ω = ‖M‖_*): singular
    values soft-thresholded by λ · lowrank (Ω = indicator of rank ≤ r): truncated SVD.
    """
    if regularizer == "none":
        return A
    if regularizer == "l1":
        return torch.sign(A) * (A.abs() - lam).clamp(min=0)
    if regularizer == "l12":
        norms = A.norm(dim=0, keepdim=True)
        return A * (1 - lam / norms.clamp(min=1e-300)).clamp(min=0)
    if regularizer == "ridge":
        return A / (1 + lam)
    if regularizer in {"nuclear", "lowrank"}:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        if regularizer == "nuclear":
            s = (s - lam).clamp(min=0)
        else:
            s = torch.where(torch.arange(len(s), device=s.device) < rank, s, torch.zeros_like(s))
        return (U * s) @ Vh
    raise ValueError(f"unknown regularizer {regularizer!r}")


def penalty(M: torch.Tensor, regularizer: str, lam: float) -> float:
    """λΩ(M) (0 for the rank constraint when it holds)."""
    if regularizer == "l1":
        return lam * M.abs().sum().item()
    if regularizer == "l12":
        return lam * M.norm(dim=0).sum().item()
    if regularizer == "ridge":
        return 0.5 * lam * (M**2).sum().item()
    if regularizer == "nuclear":
        return lam * torch.linalg.svdvals(M).sum().item()
    return 0.0


# -- the pieces of the objective -----------------------------------------------------------------
def cost_matrix(X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """C_ij = −⟨M x_i, y_j⟩, i.e. −X Mᵀ Yᵀ (n × m)."""
    return -(X @ M.T) @ Y.T


def cross_moment(X: torch.Tensor, Y: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """A(P) = Σ_ij P_ij y_j x_iᵀ = Yᵀ Pᵀ X (dy × dx), as ((Xᵀ P) Y)ᵀ: a GEMM with Pᵀ as its left factor is
    4× slower here (n = 5000, one thread)."""
    return ((X.T @ P) @ Y).T


def scaled_cross_moment(X: torch.Tensor, Y: torch.Tensor, K: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`cross_moment` of P = diag(u) K diag(v) without writing P: Yᵀ diag(v) Kᵀ diag(u) X, one GEMM over K."""
    return (u[:, None] * X).T.mm(K.mm(v[:, None] * Y)).T


def kl_to_product(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    ref = a[:, None] * b[None, :]
    positive = P > 0
    return (P[positive] * (P[positive] / ref[positive]).log()).sum().item() - P.sum().item() + ref.sum().item()


def objective(X, Y, a, b, M, P, eps: float, regularizer: str, lam: float) -> float:
    """⟨C_M, P⟩ + ε KL(P‖abᵀ) + ½‖M‖² + λΩ(M)."""
    return (cost_matrix(X, Y, M) * P).sum().item() + eps * kl_to_product(P, a, b) + 0.5 * (M**2).sum().item() + penalty(M, regularizer, lam)


def objective_from_potentials(A, M_old, M, marginals, a, b, potentials, eps: float, regularizer: str, lam: float) -> float:
    """:func:`objective` at (M, P) for P = Sinkhorn(C_{M_old}) = exp(log u ⊕ log v − C_{M_old}/ε), read off
    A = A(P), the potentials and P's marginals (r, c) instead of two more n × m passes:
    ⟨C_M, P⟩ = −⟨M, A⟩ and ε KL(P‖abᵀ) = ε[r·(log u − log a) + c·(log v − log b) − ΣP + ΣaΣb] + ⟨M_old, A⟩."""
    log_u, log_v = potentials
    r, c = marginals
    row = torch.where(r > 0, r * (log_u - a.log()), 0.0).sum()
    column = torch.where(c > 0, c * (log_v - b.log()), 0.0).sum()
    kl = eps * (row + column - r.sum() + a.sum() * b.sum()) + (M_old * A).sum()
    return (-(M * A).sum() + kl).item() + 0.5 * (M**2).sum().item() + penalty(M, regularizer, lam)


def gw_inner_product_objective(X: torch.Tensor, Y: torch.Tensor, P: torch.Tensor) -> float:
    """Σ_{ijkl} (⟨x_i,x_k⟩ − ⟨y_j,y_l⟩)² P_ij P_kl, computed through POT's square-loss GW."""
    a, b = P.sum(1), P.sum(0)
    constC, hC1, hC2 = ot.gromov.init_matrix(X @ X.T, Y @ Y.T, a, b, "square_loss")
    return float(ot.gromov.gwloss(constC, hC1, hC2, P))


# -- the solvers ---------------------------------------------------------------------------------
@dataclass
class Solution:
    M: torch.Tensor
    P: torch.Tensor
    g: torch.Tensor  # target log-scaling log v (POT's convention), for the out-of-sample map
    eps: float
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    converged: bool = False
    sinkhorn_seconds: float = 0.0  # of `seconds`, the part spent in Sinkhorn (the profile of the bench)
    f: torch.Tensor | None = None  # source log-scaling log u (with g, the plan of a factored solve, see factored_plan)


def sinkhorn(a, b, C, eps: float, warmstart=None, max_iter: int = 2000, tol: float = 1e-6):
    """Entropic OT plan and log-scalings (log u, log v), P = diag(u) e^{−C/ε} diag(v).

    The previous potentials (or row/column minima of C at the start) are absorbed into the cost, so
    the kernel of the reduced cost is near the plan itself and POT's matrix-scaling Sinkhorn runs
    without overflow at small ε — an exp-free mat-vec per iteration instead of the log-domain
    solver's logsumexp (3.6–4.8× faster end to end, README). POT's log-domain solver takes over if
    scaling still fails.
    """
    if warmstart is None:
        f = C.min(1).values
        g = (C - f[:, None]).min(0).values
    else:
        f, g = eps * warmstart[0], eps * warmstart[1]
    reduced = C - f[:, None] - g[None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a numerical failure is detected below and handled by the fallback
        P, log = ot.sinkhorn(a, b, reduced, eps, method="sinkhorn", numItermax=max_iter, stopThr=tol, log=True, warn=False)
    log_u, log_v = log["u"].log() + f / eps, log["v"].log() + g / eps
    # the last scaling step makes P's columns sum to b: a mass off that means the scalings overflowed
    finite = bool(torch.isfinite(P).all()) and bool(torch.isfinite(log_u).all()) and bool(torch.isfinite(log_v).all())
    if finite and abs(float(P.sum()) - float(b.sum())) < 1e-6:
        return P, (log_u, log_v)
    P, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=tol, warmstart=warmstart, log=True, warn=False)
    return P, (log["log_u"], log["log_v"])


def uniform_weights(points: torch.Tensor) -> torch.Tensor:
    """1/n for each of the n rows (all experiments use uniform marginals)."""
    return torch.full((len(points),), 1.0 / len(points), dtype=points.dtype, device=points.device)


def initial_map(dx: int, dy: int, like: torch.Tensor) -> torch.Tensor:
    """All entries 1/max(dx, dy), as the reference code does for scGEM."""
    return torch.full((dy, dx), 1.0 / max(dx, dy), dtype=like.dtype, device=like.device)


def relatively_unchanged(previous: float | None, value: float, tol: float) -> bool:
    """The stopping rule of every solver here (ours and the entropic GW baseline): |Δ objective| ≤ tol·|previous|,
    with |previous| floored at 1e-9: an objective at 0 (a map soft-thresholded to M = 0, the product plan) is a sum
    of O(ε) terms that cancel, whose float64 rounding (~1e-16) a smaller floor would take for progress."""
    return previous is not None and abs(value - previous) <= tol * max(abs(previous), 1e-9)


@dataclass
class Step:
    M: torch.Tensor
    P: torch.Tensor
    potentials: tuple[torch.Tensor, torch.Tensor]
    objective: float
    sinkhorn_seconds: float
    buffer: torch.Tensor | None = None


def exp_gemm(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = exp(left @ right); returns its column sums. On the CPU in blocks of rows that stay in a core's L2 cache
    (~512 KB) while they are exponentiated and summed: one pass over the n × m matrix in memory instead of three
    (GEMM, exp, column sums; at n = 5000, 41 ms instead of 57)."""
    if out.device.type != "cpu":
        return torch.mm(left, right, out=out).exp_().sum(0)
    rows = max(1, 2**19 // (out.shape[1] * out.element_size()))
    sums = out.new_zeros(out.shape[1])
    for i in range(0, out.shape[0], rows):
        sums += torch.mm(left[i : i + rows], right, out=out[i : i + rows]).exp_().sum(0)
    return sums


def map_sinkhorn(
    X, Y, a, b, M, eps: float, warmstart=None, max_iter: int = 2000, tol: float = 1e-6, out=None, momentum: bool = True, plan: bool = True
):
    """:func:`sinkhorn` for the cost C_M = −(X Mᵀ) Yᵀ (with ``momentum=False`` the same iterates as POT's matrix
    scaling there) in fewer passes over the n × m matrix. Returns the plan, the potentials and the plan's (row, column) sums.

    The scalings start at u = 1, not POT's 1/n: every iterate is POT's times n (u) and 1/n (v), the same plan,
    but the potentials no longer drift by ±log n per outer iteration; drifting, they grow large enough that the KL
    term's two large, opposite parts leave rounding noise in an objective near 0 (a map that reached M = 0 then
    never met the relative stopping test).

    The kernel of the reduced cost, exp((f ⊕ g − C_M)/ε) with f, g the previous potentials (row/column minima
    at the start), is one GEMM of (n × (dy+2)) by ((dy+2) × m) factors and an in-place exp, so C_M, the reduced
    cost and POT's row-scaled copy of the kernel are never written; POT's stopping test (every tenth iteration,
    ‖column sums − b‖₂ < tol) reuses the mat-vec the next iteration needs, and the sums come off the last two
    mat-vecs instead of passes over P. Where POT would stop on a numerical error this hands the problem to
    :func:`sinkhorn` (POT, with its log-domain fallback). ``out``, an n × m float tensor (the previous step's
    buffer), receives the kernel and then (``plan=True``) the plan: a fresh 200 MB matrix per call (n = 5000) costs more in page faults
    than the GEMM that fills it.

    ``momentum``: over-relaxed scaling, u ← u^(1−ω)(a/Kv)^ω and v likewise, with OTT-JAX's ``Momentum`` rule
    (Lehmann et al. 2021): plain iterations up to 10, then ω = 2 / (1 + √(1 − ρ)) from the error's decay rate ρ per
    iteration between iterations 5 and 10, raised every ten iterations after where the over-relaxed decay shows ρ was
    underestimated (:func:`refit_omega`); back to plain (ω = 1) for the rest of the solve the first time the error
    rises over ten iterations (from iteration 40 on: the switch itself may raise it for a few), and from iteration
    10's plain iterate if it ever exceeds ten times the error there (diverging, or nan). Stops when both
    marginals are within ``tol`` (plain scaling leaves the rows exact, over-relaxed scaling does not). The same fixed
    point in about a third of the iterations at n = 5000, where the scaling loop is the solver's time.

    ``plan=False``: P is not written; the first element returned is (K, u, v), P = diag(u) K diag(v), from which
    :func:`scaled_cross_moment` reads A(P) (two passes over the n × m matrix fewer per outer iteration)."""
    XM = X @ M.T
    n, m = XM.shape[0], Y.shape[0]
    reuse = out is not None and out.shape == (n, m) and out.dtype == XM.dtype and out.device == XM.device
    K = out if reuse else XM.new_empty(n, m)
    if warmstart is None:
        torch.mm(XM, Y.T, out=K)  # −C
        f = -K.amax(1)  # row minima of C, then column minima of C − f (K is refilled below)
        g = -K.add_(f[:, None]).amax(0)  # (amax: max(0) with its indices took 0.25 s at n = 5000)
    else:
        f, g = eps * warmstart[0], eps * warmstart[1]
    left = torch.cat([XM / eps, f[:, None] / eps, XM.new_ones(n, 1)], 1)
    KTu = exp_gemm(left, torch.cat([Y, Y.new_ones(m, 1), g[:, None] / eps], 1).T, K)
    u, v = XM.new_ones(n), XM.new_ones(m)
    # POT checks every tenth iteration; the over-relaxed loop checks every one (its solves stop after 30–90 iterations,
    # where up to 9 spare iterations a solve showed in the time)
    every, omega, errors, restart = 1 if momentum else 10, 1.0, {}, (u, v, KTu)
    for iteration in range(max(int(max_iter), 1)):
        v = b / KTu if omega == 1.0 else v.pow(1 - omega).mul_((b / KTu).pow_(omega))
        Kv = K @ v
        u = a / Kv if omega == 1.0 else u.pow(1 - omega).mul_((a / Kv).pow_(omega))
        KTu = K.T @ u  # the column sums' mat-vec here, the next v's too
        if iteration % every == 0:
            error = float(torch.maximum(torch.linalg.vector_norm(v * KTu - b), torch.linalg.vector_norm(u * Kv - a)))
            if omega != 1.0 and not error <= 10 * errors[10]:  # over-relaxation diverging (or nan): plain scaling
                omega, momentum, (u, v, KTu) = 1.0, False, restart  # again, from iteration 10's plain iterate
                continue
            if error < tol or not math.isfinite(error):  # a scaling that overflowed stays nan: stop at once
                break
            errors[iteration] = error
            if momentum and iteration == 10:
                rate = min(errors[10] / errors[5], 0.99) if errors[5] > 0 else 0.0
                omega, restart = optimal_omega(rate**0.2), (u, v, KTu)
            elif omega != 1.0 and iteration % 10 == 0 and iteration >= 20:
                if iteration >= 40 and error > errors[iteration - 10]:
                    omega, momentum = 1.0, False  # overshooting: plain from here on (not before 40: the switch's transient)
                elif errors[iteration - 10] > 0:  # (an exact 0 is stored when tol = 0)
                    omega = refit_omega(omega, (error / errors[iteration - 10]) ** 0.1)
    if omega != 1.0:  # end on a plain row scaling, as POT's loop does: exact rows, so the objective read off the
        u = a / Kv  # marginals is as exact as plain scaling's (over-relaxed rows moved it by up to 2e-5 between
        KTu = K.T @ u  # outer iterations at n = 300, and the alternating minimisation's decrease did not show)
    rows, columns = u * Kv, v * KTu
    log_u, log_v = u.log() + f / eps, v.log() + g / eps
    # sinkhorn's checks, on vectors: scalings that over- or underflowed (a zero weight or a zero in Kᵀu or Kv makes
    # a potential infinite, a nan reaches the sums) or that lost the mass go to POT and its log-domain fallback
    finite = math.isfinite(float(rows.sum() + log_u.sum() + log_v.sum()))
    if not (finite and abs(float(columns.sum()) - float(b.sum())) < 1e-6):
        P, potentials = sinkhorn(a, b, cost_matrix(X, Y, M), eps, warmstart, max_iter, tol)
        return P if plan else (P, a.new_ones(n), b.new_ones(m)), potentials, (P.sum(1), P.sum(0))
    return K.mul_(u[:, None]).mul_(v) if plan else (K, u, v), (log_u, log_v), (rows, columns)


def optimal_omega(rate: float) -> float:
    """Lehmann et al.'s over-relaxation for plain Sinkhorn's error decay ``rate`` per iteration (Young's SOR optimum)."""
    return 2 / (1 + math.sqrt(1 - rate))


def refit_omega(omega: float, decay: float) -> float:
    """ω again from the decay per iteration that over-relaxation by ``omega`` shows. Young's relation for SOR,
    (μ + ω − 1)² = ω²ρμ, gives the plain rate ρ back from an over-relaxed rate μ while ω is below the optimum (there μ
    is real and above ω − 1; at or past it |μ| = ω − 1 and ρ cannot be read): a ρ read off iterations 5 to 10, still
    in the warm start's transient, is too low at n = 5000 (ω ≈ 1.5 at iteration 10, ≈ 1.7 after one refit)."""
    if not omega - 1 < decay < 1:
        return omega
    rho = (decay + omega - 1) ** 2 / (omega**2 * decay)  # below 1 in exact arithmetic; rounding may reach it
    return max(omega, optimal_omega(min(rho, 1 - 1e-12)))


def prox_step(
    X, Y, a, b, M, eps, regularizer, lam, rank, warmstart=None, sinkhorn_iter=2000, sinkhorn_tol=1e-6, out=None, momentum=True, plan=True
) -> Step:
    """One outer iteration, the one both :func:`solve` and the LightningModule take: P = Sinkhorn(C_M),
    then M = prox_{λΩ}(A(P)), and the objective at (M, P). ``out``: see :func:`map_sinkhorn`; ``Step.buffer`` is the
    n × m matrix to pass as the next call's ``out``. ``plan=False``: P is not formed (``Step.P`` is None; a pass or two
    over the n × m matrix fewer)."""
    start = time.perf_counter()
    (K, u, v), potentials, marginals = map_sinkhorn(X, Y, a, b, M, eps, warmstart, sinkhorn_iter, sinkhorn_tol, out, momentum, plan=False)
    seconds = time.perf_counter() - start
    A = scaled_cross_moment(X, Y, K, u, v)
    M_next = prox(A, regularizer, lam, rank)
    P = K.mul_(u[:, None]).mul_(v) if plan else None
    return Step(
        M_next, P, potentials, objective_from_potentials(A, M, M_next, marginals, a, b, potentials, eps, regularizer, lam), seconds, K
    )


# -- the factored low-rank path: C = −F Gᵀ never formed -----------------------------------------------
def cost_factors(X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F (n × r), G (m × r) with C_M = −F Gᵀ for M of rank ≤ r: M = U S Vᵀ gives −X Mᵀ Yᵀ = −(X V S)(Y U)ᵀ."""
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return X @ (Vh[:rank].T * s[:rank]), Y @ U[:, :rank]


def chunk_rows(m: int, itemsize: int = 8) -> int:
    """Rows per chunk so that a chunk × m block is ~2 MiB (one core's L2 here), at least 64 rows (10 MiB at m = 20 000,
    where fewer rows were slower): measured at m = 4000, an LSE pass over 64-row chunks took 47 ms against 142 ms over
    1024-row (31 MiB) chunks, one thread."""
    return max(64, (2 << 20) // (itemsize * max(m, 1)))


def _lse(F: torch.Tensor, G: torch.Tensor, w: torch.Tensor, eps: float, chunk: int | None = None) -> torch.Tensor:
    """log Σ_j exp(w_j + ⟨F_i, G_j⟩/ε) for every row i, ``chunk`` rows at a time (memory chunk × m, never n × m).
    ``addmm`` writes w + F Gᵀ/ε in one pass (with ~2 MiB blocks: 1.23 s a pass at n = m = 20 000, against 7.9 s for
    three separate ops over 1024-row blocks, one thread)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a number of rows ≥ 1 (or None: ~2 MiB blocks), got {chunk}")
    chunk = chunk or chunk_rows(len(G), F.element_size())
    Gt, out = G.T.contiguous(), F.new_empty(len(F))
    # written into one output: small per-chunk results kept alive between the chunk × m blocks fragmented the heap
    # (glibc), which grew by a block per chunk — 3.1 GB at n = 20 000, the size of the matrix this path avoids
    for i in range(0, len(F), chunk):
        out[i : i + chunk] = torch.logsumexp(torch.addmm(w, F[i : i + chunk], Gt, alpha=1 / eps), dim=1)
    return out


def factored_sinkhorn(a, b, F, G, eps: float, warmstart=None, max_iter: int = 2000, tol: float = 1e-6, chunk: int | None = None):
    """Log-domain Sinkhorn for the rank-r cost C = −F Gᵀ: log u = log a − LSE_j(log v_j + ⟨F_i,G_j⟩/ε), log v likewise,
    stopped when the row marginal's ℓ1 error is ≤ tol (checked every 10 iterations, like POT). Returns (log u, log v).
    The row LSE of the check is the next iteration's update, so it is computed once (two LSE passes an iteration)."""
    log_a, log_b = a.log(), b.log()
    log_u, log_v = warmstart if warmstart is not None else (torch.zeros_like(a), torch.zeros_like(b))
    rows = _lse(F, G, log_v, eps, chunk)
    for iteration in range(max_iter):
        log_u = log_a - rows
        log_v = log_b - _lse(G, F, log_u, eps, chunk)
        rows = _lse(F, G, log_v, eps, chunk)
        if iteration % 10 == 0 and float((log_u + rows).exp().sub(a).abs().sum()) <= tol:
            break
    return log_u, log_v


def _plan_chunks(F, G, log_u, log_v, eps: float, chunk: int | None = None):
    chunk = chunk or chunk_rows(len(G), F.element_size())
    Gt = G.T.contiguous()
    for i in range(0, len(F), chunk):
        yield i, torch.addmm(log_v, F[i : i + chunk], Gt, alpha=1 / eps).add_(log_u[i : i + chunk, None]).exp_()


def factored_plan(F, G, log_u, log_v, eps: float) -> torch.Tensor:
    """The dense plan P_ij = u_i v_j e^{⟨F_i,G_j⟩/ε} (small problems and tests only)."""
    return (log_u[:, None] + log_v[None, :] + F @ G.T / eps).exp()


def factored_step(
    X, Y, a, b, M, eps, regularizer, lam, rank, warmstart=None, sinkhorn_iter=2000, sinkhorn_tol=1e-6, chunk: int | None = None
) -> Step:
    """:func:`prox_step` for the rank constraint with the factored cost: Sinkhorn, A(P) = Σ_chunks Yᵀ P_Iᵀ X_I and the
    objective in chunks of rows, so memory is O((n + m)·r + chunk·m). With log P_ij = log u_i + log v_j + ⟨M x_i, y_j⟩/ε
    (M the map P was solved for) and r, c the marginals of P: ε KL(P‖abᵀ) = ε(⟨r, log u − log a⟩ + ⟨c, log v − log b⟩
    − ΣP + 1) + ⟨M, A⟩, and ⟨C_{M'}, P⟩ = −⟨M', A⟩ for the new M'."""
    F, G = cost_factors(X, Y, M, rank)
    start = time.perf_counter()
    log_u, log_v = factored_sinkhorn(a, b, F, G, eps, warmstart, sinkhorn_iter, sinkhorn_tol, chunk)  # each pass its own size
    seconds = time.perf_counter() - start
    A, rows, cols = torch.zeros_like(M), torch.zeros_like(a), torch.zeros_like(b)
    chunk = chunk or chunk_rows(len(G), F.element_size())
    for i, P in _plan_chunks(F, G, log_u, log_v, eps, chunk):
        A += ((X[i : i + chunk].T @ P) @ Y).T  # as cross_moment: Pᵀ as a GEMM's left factor is ~4× slower
        rows[i : i + chunk] = P.sum(1)
        cols += P.sum(0)
    new = prox(A, regularizer, lam, rank)
    kl = eps * (float(rows @ (log_u - a.log())) + float(cols @ (log_v - b.log())) - float(rows.sum()) + 1) + float((M * A).sum())
    value = -float((new * A).sum()) + kl + 0.5 * float((new**2).sum()) + penalty(new, regularizer, lam)
    return Step(new, None, (log_u, log_v), value, seconds)


def final_plan(X, Y, a, b, M, eps, potentials, sinkhorn_iter=2000, sinkhorn_tol=1e-6, out=None, momentum=True):
    """One more (warm-started) Sinkhorn so that P and the potentials belong to the final M: the
    out-of-sample map and the evaluation then use one consistent (M, P, v)."""
    return map_sinkhorn(X, Y, a, b, M, eps, potentials, sinkhorn_iter, sinkhorn_tol, out, momentum)[:2]


def solve(
    X,
    Y,
    a=None,
    b=None,
    eps: float = 0.05,
    regularizer: str = "none",
    lam: float = 0.0,
    rank: int = 2,
    max_iter: int = 100,
    tol: float = 1e-5,
    patience: int = 3,
    M0=None,
    sinkhorn_iter: int = 2000,
    sinkhorn_tol: float = 1e-6,
    on_iteration=None,
    factored: bool = False,
    momentum: bool = True,
) -> Solution:
    """The alternating proximal scheme, stopped when the objective's relative change stays below
    ``tol`` for ``patience`` iterations (as the reference code does) or after ``max_iter``.
    ``on_iteration(M, P)``, if given, sees every iterate (convergence curves; the next iteration overwrites P, a
    reused buffer, so copy it to keep it). ``factored`` (rank constraint
    only): the cost is kept as its rank-r factors, P is never formed (``Solution.P`` is None; see factored_plan).
    ``momentum``: see :func:`map_sinkhorn` (the factored path's log-domain Sinkhorn scales plainly). ``sinkhorn_tol``:
    1e-6 by default as POT's calls here; the pipeline's config sets 1e-7, since at 1e-6 the objective's noise can keep
    a relative ``tol`` of 1e-6 from ever being met (README)."""
    if factored and regularizer != "lowrank":
        raise ValueError(f"the factored cost needs the rank constraint (regularizer='lowrank'), got {regularizer!r}")
    a = uniform_weights(X) if a is None else a
    b = uniform_weights(Y) if b is None else b
    M = initial_map(X.shape[1], Y.shape[1], X) if M0 is None else M0
    start, history, calm, potentials, sinkhorn_seconds, buffer = time.perf_counter(), [], 0, None, 0.0, None
    for iteration in range(1, max_iter + 1):
        if factored:
            step = factored_step(X, Y, a, b, M, eps, regularizer, lam, rank, potentials, sinkhorn_iter, sinkhorn_tol)
        else:
            args = (X, Y, a, b, M, eps, regularizer, lam, rank, potentials, sinkhorn_iter, sinkhorn_tol, buffer, momentum)
            step = prox_step(*args, plan=on_iteration is not None)  # P only for on_iteration: two n × m passes fewer
            buffer = step.buffer
        M, potentials, sinkhorn_seconds = step.M, step.potentials, sinkhorn_seconds + step.sinkhorn_seconds
        calm = calm + 1 if relatively_unchanged(history[-1] if history else None, step.objective, tol) else 0
        history.append(step.objective)
        if on_iteration is not None:
            on_iteration(M, step.P)
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"objective became {history[-1]} at iteration {iteration}; increase eps")
        if calm >= patience:
            break
    if factored:
        P, potentials = None, factored_sinkhorn(a, b, *cost_factors(X, Y, M, rank), eps, potentials, sinkhorn_iter, sinkhorn_tol)
    else:
        P, potentials = final_plan(X, Y, a, b, M, eps, potentials, sinkhorn_iter, sinkhorn_tol, buffer, momentum)
    return Solution(
        M, P, potentials[1], eps, history, iteration, time.perf_counter() - start, calm >= patience, sinkhorn_seconds, potentials[0]
    )


def stochastic_step(
    X,
    Y,
    M,
    eps: float,
    regularizer: str,
    lam: float,
    rank: int,
    fused: float,
    batch_size: int,
    step_size: float,
    generator: torch.Generator,
    Xs=None,
    Ys=None,
) -> torch.Tensor:
    """One step of the stochastic fused variant (for inputs too large for full Sinkhorn).

    Draw a minibatch from each side, solve entropic OT on the fused minibatch cost
    (1−η)(−⟨M x, y⟩) + η(−⟨x̃, ỹ⟩) (x̃, ỹ: features both sides share, if any), and take one proximal
    gradient step on ½‖M‖² − ⟨M, A(P_batch)⟩ + λΩ(M): M ← prox_{sλΩ}(M − s(M − A)).
    """
    i = torch.randperm(len(X), generator=generator)[:batch_size].to(X.device)
    j = torch.randperm(len(Y), generator=generator)[:batch_size].to(X.device)
    xb, yb = X[i], Y[j]
    ab, bb = uniform_weights(xb), uniform_weights(yb)
    C = (1 - fused) * cost_matrix(xb, yb, M)
    if fused > 0 and Xs is not None:
        C = C - fused * Xs[i] @ Ys[j].T
    P, _ = sinkhorn(ab, bb, C, eps)
    return prox(M - step_size * (M - cross_moment(xb, yb, P)), regularizer, step_size * lam, rank)


def transport_map(x: torch.Tensor, Y: torch.Tensor, M: torch.Tensor, log_v: torch.Tensor, eps: float) -> torch.Tensor:
    """Out-of-sample prediction T(x) = Σ_j w_j(x) y_j, w_j ∝ exp(log v_j + ⟨M x, y_j⟩/ε).

    ``log_v`` is POT's target log-scaling (P_ij = u_i v_j e^{−C_ij/ε}), i.e. log b_j + g_j/ε in the
    notes' abᵀ-referenced convention; on training points T equals the barycentric projection.
    """
    return torch.softmax(log_v[None, :] + (x @ M.T) @ Y.T / eps, dim=1) @ Y


def barycentric_projection(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """T(x_i) = Σ_j P_ij y_j / a_i for the training points."""
    return (P @ Y) / P.sum(1, keepdim=True)


# -- baselines through POT -----------------------------------------------------------------------
@dataclass
class BaselineResult:
    """A POT baseline's coupling and how it ended. ``failed`` holds the reason (a POT warning, a
    non-finite or non-transport plan); a failed run has no time to tolerance."""

    P: torch.Tensor
    seconds: float
    iterations: int
    objective: float
    converged: bool
    failed: str = ""


def entropic_gw(
    C1,
    C2,
    a,
    b,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    patience: int = 3,
    sinkhorn_iter: int = 2000,
    sinkhorn_tol: float = 1e-6,
    T0=None,
) -> tuple[torch.Tensor, int, float, bool]:
    """POT's entropic GW (projected gradient, Peyré et al. 2016) with its log-domain Sinkhorn inside.

    T ← sinkhorn_log(p, q, ∇GW(T) = 2·tens(T), ε), warm-started from the previous potentials, from T0 (POT's
    default pqᵀ). On centred data pqᵀ is a fixed point: hC1 pqᵀ hC2ᵀ ∝ XXᵀ1 1ᵀYYᵀ = 0, so the gradient is
    constC = f ⊕ g and Sinkhorn returns pqᵀ again (README: the baseline's FOSCTTM near chance).
    ``ot.gromov.entropic_gromov_wasserstein`` hard-codes the scaling Sinkhorn (it fails at the ε of our
    tables: "numerical errors at iteration 0", issue #22) and stops on ‖T − T_prev‖ checked every 10
    iterations; here the loop is POT's, with POT's pieces (init_matrix, gwggrad, gwloss), the stable
    Sinkhorn, and our stopping rule on the objective GW(T) + ε KL(T‖pqᵀ), so both solvers stop alike.
    Returns (T, iterations, objective, converged).
    """
    constC, hC1, hC2 = ot.gromov.init_matrix(C1, C2, a, b, "square_loss")
    T = a[:, None] * b[None, :] if T0 is None else T0
    potentials, previous, calm, value = None, None, 0, math.nan
    for iteration in range(1, max_iter + 1):
        gradient = ot.gromov.gwggrad(constC, hC1, hC2, T)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            T, log = ot.sinkhorn(
                a, b, gradient, eps, method="sinkhorn_log", numItermax=sinkhorn_iter, stopThr=sinkhorn_tol, warmstart=potentials, log=True
            )
        potentials = (log["log_u"], log["log_v"])
        value = float(ot.gromov.gwloss(constC, hC1, hC2, T)) + eps * kl_to_product(T, a, b)
        if caught:  # a failed inner Sinkhorn fails the run (gromov_baseline reads the warning): no point going on
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=2)
            return T, iteration, value, False
        if not math.isfinite(value):
            break
        calm = calm + 1 if relatively_unchanged(previous, value, tol) else 0
        previous = value
        if calm >= patience:
            return T, iteration, value, True
    return T, iteration, value, False


def _gw(C1, C2, a, b, eps, shared, max_iter, tol, patience, sinkhorn_iter, T0):
    P, log = ot.gromov.gromov_wasserstein(C1, C2, a, b, "square_loss", log=True, G0=T0, max_iter=max_iter, tol_rel=tol, tol_abs=tol)
    return P, len(log["loss"]), float(log["gw_dist"]), len(log["loss"]) < max_iter


def _fgw(C1, C2, a, b, eps, shared, max_iter, tol, patience, sinkhorn_iter, T0):
    if shared is None:
        raise ValueError("fused GW needs features shared by both sides")
    P, log = ot.gromov.fused_gromov_wasserstein(
        torch.cdist(shared[0], shared[1]) ** 2,
        C1,
        C2,
        a,
        b,
        "square_loss",
        alpha=0.5,
        G0=T0,
        log=True,
        max_iter=max_iter,
        tol_rel=tol,
        tol_abs=tol,
    )
    return P, len(log["loss"]), float(log["fgw_dist"]), len(log["loss"]) < max_iter


def _egw(C1, C2, a, b, eps, shared, max_iter, tol, patience, sinkhorn_iter, T0):
    return entropic_gw(C1, C2, a, b, eps, max_iter, tol, patience, sinkhorn_iter, T0=T0)


BASELINES = {"gw": _gw, "entropic_gw": _egw, "fgw": _fgw}


def gromov_baseline(
    X,
    Y,
    method: str,
    eps: float = 0.005,
    shared=None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    patience: int = 3,
    sinkhorn_iter: int = 2000,
    T0=None,
) -> BaselineResult:
    """POT's GW / entropic GW (one ε, as given: untuned) / fused GW (α = 0.5) with inner-product similarities.

    Every warning POT raises inside (Sinkhorn numerical errors or no convergence, "Solver failed to
    produce a transport plan") is caught and marks the run failed, as does a plan that is not finite or
    does not carry unit mass; GW and fused GW (conditional gradient) converge when they stop before
    ``max_iter`` on the relative tolerance. ``T0``: the starting coupling (None: POT's pqᵀ).
    """
    a, b = uniform_weights(X), uniform_weights(Y)
    C1, C2 = X @ X.T, Y @ Y.T
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P, iterations, value, converged = BASELINES[method](C1, C2, a, b, eps, shared, max_iter, tol, patience, sinkhorn_iter, T0)
    seconds = time.perf_counter() - start
    failed = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    if not failed and not (bool(torch.isfinite(P).all()) and abs(float(P.sum()) - 1) < 1e-5):
        failed = f"the plan is not finite or has mass {float(P.sum()):.3g}"
    return BaselineResult(P, seconds, iterations, value, converged and not failed, failed)
