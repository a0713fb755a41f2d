"""Exact analysis of the model (derivations: README.md of this pipeline, equation numbers below).

All one-shot schemes reduce to ``E[D_k]``, the mean number of packets decoded when k nodes are
active; everything else follows from the Poisson-binomial number of interferers and from the
Bernoulli delivery process of each node.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from pipelines.iiot_sic_aloha.data import Scenario


def sic_tail_probability(k: int, m: int, snr: float, threshold: float, residual: float = 0.0) -> float:
    """P(D_k ≥ m) for SIC with γ ≥ 1 and residual ε ≥ 0 (Eq. 5; Eq. 4 is its ε = 0 case).

    With h ~ Exp(1) i.i.d., stage j of a fixed ordered m-tuple succeeds iff
    h_j − γ Σ_{l>j} h_l − γε Σ_{l<j} h_l ≥ γ/ρ + γR, i.e. ``A h ≥ b`` with
    A = I − γU − γεL. If the spectral radius of γ(U + εL) is below 1, A⁻¹ ≥ 0 and
    ∫_{Ah≥b} e^{−1ᵀh} dh = e^{−cᵀb} / (det A · Π c_j) with cᵀ = 1ᵀA⁻¹; averaging over the
    Gamma(k−m, 1) remainder R gives (1 + γΣc)^{−(k−m)}. Otherwise the region is empty (P = 0).
    The k!/(k−m)! ordered tuples are disjoint events because γ ≥ 1.
    """
    if threshold < 1:
        raise ValueError("the SIC closed form needs γ ≥ 1; use decoding_table (Monte Carlo) for γ < 1")
    if m > k:
        return 0.0
    upper = np.triu(np.ones((m, m)), 1)
    lower = np.tril(np.ones((m, m)), -1)
    coupling = threshold * (upper + residual * lower)
    if m > 1 and residual > 0 and max(abs(np.linalg.eigvals(coupling))) >= 1:
        return 0.0  # infeasible: no gains satisfy every stage
    a = np.eye(m) - coupling
    c = np.ones(m) @ np.linalg.inv(a)
    total = c.sum()
    log_p = (
        math.lgamma(k + 1)
        - math.lgamma(k - m + 1)
        - (threshold / snr) * total
        - (k - m) * math.log1p(threshold * total)
        - math.log(np.linalg.det(a))
        - np.log(c).sum()
    )
    return math.exp(log_p)


@lru_cache(maxsize=256)
def decoding_table(
    scheme: str,
    max_k: int,
    snr: float,
    threshold: float,
    residual: float = 0.0,
    max_stages: int | None = None,
    mc_draws: int = 200_000,
    seed: int = 0,
) -> tuple[tuple[float, ...], bool]:
    """(E[D_k] for k = 0 … max_k, exact?) for one receiver.

    Exact: ALOHA (Eq. 2), capture (Eq. 3, linearity of expectation holds for every γ), SIC with γ ≥ 1
    (Eq. 5). SIC with γ < 1 has no closed form here: Monte Carlo with ``mc_draws`` draws per k.
    """
    if scheme in {"aloha", "threshold_aloha"}:
        return (0.0, math.exp(-threshold / snr)) + (0.0,) * (max_k - 1), True
    if scheme == "capture":
        return tuple(k * math.exp(-threshold / snr) * (1 + threshold) ** (-(k - 1)) if k else 0.0 for k in range(max_k + 1)), True
    if scheme != "sic":
        raise ValueError(f"unknown scheme {scheme!r}")
    stages = max_stages or max_k
    if threshold >= 1:
        return tuple(
            sum(sic_tail_probability(k, m, snr, threshold, residual) for m in range(1, min(k, stages) + 1)) for k in range(max_k + 1)
        ), True
    import torch

    from pipelines.iiot_sic_aloha.model import decode

    generator = torch.Generator().manual_seed(seed)
    table = [0.0]
    for k in range(1, max_k + 1):
        gains = torch.empty(mc_draws, k, dtype=torch.float64).exponential_(generator=generator)
        table.append(decode(snr * gains, "sic", threshold, residual, max_stages).sum(-1).double().mean().item())
    return tuple(table), False


def poisson_binomial(probs: np.ndarray) -> np.ndarray:
    """pmf of the number of successes among independent Bernoulli(p_j): c_k ← c_k(1−p) + c_{k−1}p."""
    pmf = np.zeros(len(probs) + 1)
    pmf[0] = 1.0
    for p in probs:
        pmf[1:] = pmf[1:] * (1 - p) + pmf[:-1] * p
        pmf[0] *= 1 - p
    return pmf


def analyze(scenario: Scenario, scheme: str, mc_draws: int = 200_000) -> dict:
    """Throughput, mean and peak AoI, age- and report-level deadline violation (network and per node)."""
    if scheme == "threshold_aloha":
        return threshold_aloha_mean_field(scenario)
    n = scenario.num_nodes
    table, exact = decoding_table(scheme, n, scenario.snr, scenario.threshold, scenario.csi_residual, scenario.max_sic_stages, mc_draws)
    expected = np.asarray(table)
    p_decode = np.divide(expected, np.arange(n + 1), out=np.zeros(n + 1), where=np.arange(n + 1) > 0)  # P_dec(k)
    activity = np.asarray(scenario.activity)
    if scenario.homogeneous:
        interferers = poisson_binomial(activity[1:])
        pi = np.full(n, interferers @ p_decode[1:])  # Eq. 6: π = Σ_k P(K_{−i}=k) P_dec(k+1)
    else:
        pi = np.array([poisson_binomial(np.delete(activity, i)) @ p_decode[1:] for i in range(n)])
    success = activity * pi  # s_i
    with np.errstate(divide="ignore"):
        aoi = 1 / success  # Eq. 7: Δ̄_i = E[Y(Y+1)/2]/E[Y] = 1/s_i; mean peak AoI E[Y] = 1/s_i too
    q = np.asarray(scenario.event_probs)
    return {
        "throughput": float(success.sum()),
        "mean_aoi": float(aoi.mean()),
        "peak_aoi": float(aoi.mean()),
        "p_age_violation": float(((1 - success) ** scenario.deadline).mean()),  # Eq. 8
        "p_report_violation": float(1 - (q * scenario.transmit_prob * pi).sum() / q.sum()) if q.sum() else 1.0,  # Eq. 9
        "per_node_aoi": aoi.tolist(),
        "exact": exact,
    }


def leave_one_out_products(x: np.ndarray) -> np.ndarray:
    """Π_{j≠i} x_j for every i from prefix and suffix products: no division (an x_j may be 0), O(N) not O(N²)."""
    left = np.concatenate(([1.0], np.cumprod(x[:-1])))
    right = np.concatenate((np.cumprod(x[::-1][:-1])[::-1], [1.0]))
    return left * right


def threshold_aloha_mean_field(scenario: Scenario, iterations: int = 500) -> dict:
    """Threshold ALOHA under event-driven traffic: a decoupling (mean-field) approximation.

    Activity depends on each node's age, so the exact chain is over all N ages. Decoupled: node i
    waits Γ−1 slots after a delivery, then succeeds each slot w.p. σ_i = q_i τ e^{−γ/ρ} Π_{j≠i}(1−α_j);
    α_j = q_j τ · P(node j eligible) is solved as a fixed point. Inter-delivery Y = Γ − 1 + Geom(σ).
    """
    q = np.asarray(scenario.event_probs)
    gamma_age, tau = scenario.gamma_threshold, scenario.tau
    capture = math.exp(-scenario.threshold / scenario.snr)
    alpha = q * tau * 0.2
    for _ in range(iterations):
        others = leave_one_out_products(1 - alpha)
        sigma = np.maximum(q * tau * capture * others, 1e-300)
        mean_y = gamma_age - 1 + 1 / sigma
        alpha = 0.5 * alpha + 0.5 * q * tau * (1 / sigma) / mean_y
    mean_sq_y = (1 - sigma) / sigma**2 + mean_y**2
    aoi = (mean_sq_y + mean_y) / (2 * mean_y)
    d = scenario.deadline
    if d >= gamma_age - 1:
        over = (1 - sigma) ** (d - gamma_age + 1) / sigma
    else:
        over = gamma_age - 1 - d + 1 / sigma
    return {
        "throughput": float((1 / mean_y).sum()),
        "mean_aoi": float(aoi.mean()),
        "peak_aoi": float(mean_y.mean()),
        "p_age_violation": float((over / mean_y).mean()),
        "p_report_violation": float(1 - (1 / mean_y).sum() / q.sum()) if q.sum() else 1.0,
        "per_node_aoi": aoi.tolist(),
        "exact": False,
    }


def best_transmit_probability(scenario: Scenario, scheme: str, grid: int = 101) -> tuple[float, float]:
    """p ∈ (0, 1] minimising the analytical mean AoI (refined by a golden-section search)."""

    def aoi(p: float) -> float:
        return analyze(scenario.with_(transmit_prob=p), scheme)["mean_aoi"]

    candidates = np.linspace(1 / grid, 1.0, grid)
    values = [aoi(p) for p in candidates]
    i = int(np.argmin(values))
    lo, hi = candidates[max(i - 1, 0)], candidates[min(i + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if aoi(a) < aoi(b) else (a, hi)
    p = (lo + hi) / 2
    return (p, aoi(p)) if aoi(p) <= values[i] else (float(candidates[i]), float(values[i]))


def best_age_threshold(scenario: Scenario, thresholds: list[int], taus: list[float]) -> tuple[int, float, float]:
    """(Γ, τ, mean AoI) minimising the mean-field mean AoI of threshold ALOHA over a grid."""
    best = min(
        (
            (g, t, threshold_aloha_mean_field(scenario.with_(age_threshold=g, threshold_tx_prob=t))["mean_aoi"])
            for g in thresholds
            for t in taus
        ),
        key=lambda item: item[2],
    )
    return best
