"""The system model as vectorized torch code: receivers, and a streaming Monte Carlo simulator.

Shapes: ``[C, R, N]`` = slots in a chunk × independent replications × nodes. Statistics are
accumulated per (replication, node) chunk by chunk, so memory does not grow with the number of
slots; the same code runs on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import stats

from pipelines.iiot_sic_aloha.data import Scenario


def decode(rx_snr: torch.Tensor, scheme: str, threshold: float, residual: float = 0.0, max_stages: int | None = None) -> torch.Tensor:
    """Which packets the access point decodes in one slot.

    ``rx_snr[..., N]`` holds received SNRs x_i = ρ h_i of active nodes and 0 for silent ones.

    - ``aloha`` (collision channel): decoded iff exactly one node is active and x ≥ γ.
    - ``capture`` (no SIC): node i decoded iff x_i / (1 + Σ_{j≠i} x_j) ≥ γ.
    - ``sic``: in decreasing power order, stage m succeeds iff
      SINR_m = x_(m) / (1 + Σ_{l>m} x_(l) + ε Σ_{l<m} x_(l)) ≥ γ; the first failure stops SIC.
    """
    active = rx_snr > 0
    if scheme == "aloha":
        return active & (active.sum(-1, keepdim=True) == 1) & (rx_snr >= threshold)
    total = rx_snr.sum(-1, keepdim=True)
    if scheme == "capture":
        return active & (rx_snr >= threshold * (1 + total - rx_snr))
    if scheme != "sic":
        raise ValueError(f"no receiver for scheme {scheme!r}")
    ordered, order = rx_snr.sort(-1, descending=True)
    cumulative = ordered.cumsum(-1)
    weaker = total - cumulative  # Σ_{l>m} x_(l)
    cancelled = cumulative - ordered  # Σ_{l<m} x_(l)
    stage_ok = (ordered > 0) & (ordered >= threshold * (1 + weaker + residual * cancelled))
    decoded_sorted = stage_ok.to(torch.int8).cumprod(-1).bool()  # SIC stops at the first failure
    if max_stages is not None:
        decoded_sorted[..., max_stages:] = False
    return torch.zeros_like(decoded_sorted).scatter(-1, order, decoded_sorted)


@dataclass
class SimulationResult:
    """Per-replication estimates (arrays of length R) and per-node AoI (R × N)."""

    per_replication: dict[str, np.ndarray]
    per_node_aoi: np.ndarray
    slots: int

    def summary(self, confidence: float = 0.99) -> dict[str, tuple[float, float]]:
        """``{metric: (mean, half-width of the confidence interval over replications)}``."""
        return {name: mean_ci(values, confidence) for name, values in self.per_replication.items()}

    def per_node(self, confidence: float = 0.99) -> list[tuple[float, float]]:
        return [mean_ci(self.per_node_aoi[:, i], confidence) for i in range(self.per_node_aoi.shape[1])]


def mean_ci(values: np.ndarray, confidence: float = 0.99) -> tuple[float, float]:
    """Mean and Student-t half-width over independent replications."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or not np.all(np.isfinite(values)):
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def simulate(
    scenario: Scenario,
    scheme: str,
    slots: int,
    replications: int = 8,
    warmup: int = 1000,
    chunk_slots: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Monte Carlo over ``slots`` measured slots (after ``warmup``) × ``replications`` × nodes."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    R, N = replications, scenario.num_nodes
    q = torch.tensor(scenario.event_probs, device=device)
    age = torch.ones(R, N, dtype=torch.int32, device=device)
    if scheme == "threshold_aloha":
        # spread initial ages over [1, 2.7N]: synchronised ages push threshold ALOHA into its congested state
        age = torch.randint(1, max(2, int(2.7 * N)) + 1, (R, N), generator=generator, device=device, dtype=torch.int32)
    acc = {name: torch.zeros(R, N, dtype=torch.float64, device=device) for name in ("age_sum", "over", "deliveries", "peak_sum", "generated")}

    done = -warmup
    while done < slots:
        size = min(chunk_slots, slots - done) if done >= 0 else min(chunk_slots, -done)
        if scheme == "threshold_aloha":
            age, stats = _threshold_aloha_chunk(scenario, age, size, generator)
        else:
            age, stats = _one_shot_chunk(scenario, scheme, age, size, q, generator)
        if done >= 0:  # after warm-up: accumulate
            for name, value in stats.items():
                acc[name] += value
            if progress is not None:
                progress(size)
        done += size

    acc = {k: v.cpu().numpy() for k, v in acc.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        per_node_aoi = acc["age_sum"] / slots
        peak = np.where(acc["deliveries"] > 0, acc["peak_sum"] / np.maximum(acc["deliveries"], 1), np.nan)
        per_replication = {
            "throughput": acc["deliveries"].sum(1) / slots,
            "mean_aoi": per_node_aoi.mean(1),
            "peak_aoi": np.nanmean(peak, 1) if np.isfinite(peak).any() else np.full(R, np.nan),
            "p_age_violation": (acc["over"] / slots).mean(1),
            "p_report_violation": 1 - acc["deliveries"].sum(1) / np.maximum(acc["generated"].sum(1), 1),
        }
    return SimulationResult(per_replication, per_node_aoi, slots)


def _triangle(n: torch.Tensor) -> torch.Tensor:
    return n * (n + 1) / 2


def _interval_stats(left: torch.Tensor, end: torch.Tensor, deadline: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of ages and #slots with age > D over slots [max(L, 0), e), where the age at slot t is t − L + 1."""
    left, end = left.double(), end.double()
    start = left.clamp(min=0)
    age_sum = _triangle(end - left) - _triangle(start - left)
    over = (end - torch.maximum(start, left + deadline)).clamp(min=0)
    return age_sum, over


def _one_shot_chunk(scenario: Scenario, scheme: str, age: torch.Tensor, size: int, q: torch.Tensor, generator: torch.Generator):
    """``size`` slots of the one-shot schemes, event by event.

    Report slots of each (replication, node) are drawn as Geometric(q_i) gaps (a Bernoulli process,
    memoryless across chunks), so random numbers scale with the reports, not with slots × nodes.
    The receiver sees the slots as a dense [R, size, N] SNR table; the AoI statistics follow from
    the delivery slots alone: between deliveries at L and e the ages are 1 … e − L.
    """
    R, N = age.shape
    device = age.device
    q_max = float(q.max())
    mean = size * q_max
    width = size if q_max > 0.5 else min(size, int(mean + 6 * math.sqrt(mean + 1) + 16))
    while True:
        u = torch.rand(R, N, width, generator=generator, device=device).clamp_(min=1e-12)
        log_keep = torch.log1p(-q).view(1, N, 1)
        gaps = torch.where(q.view(1, N, 1) >= 1, 1.0, torch.floor(u.log() / log_keep) + 1)
        gaps = torch.where(q.view(1, N, 1) <= 0, float(size + 1), gaps).clamp_(max=size + 1)
        times = gaps.cumsum(-1).sub_(1).to(torch.int64)  # report slots, increasing along the last dim
        if width == size or bool((times[..., -1] >= size - 1).all()):
            break
        width = size  # the stream ran short of the chunk (very rare): draw it at full width
    generated = times < size
    active = generated
    if scenario.transmit_prob < 1:
        active = generated & (torch.rand(R, N, width, generator=generator, device=device) < scenario.transmit_prob)

    r_idx, n_idx, m_idx = active.nonzero(as_tuple=True)
    # Rayleigh power gains h ~ Exp(1) by inversion, one per transmitted report
    rx = torch.rand(len(r_idx), generator=generator, device=device).log_().mul_(-scenario.snr)
    delivered = torch.zeros_like(active)
    delivered[r_idx, n_idx, m_idx] = _decode_events(r_idx * size + times[r_idx, n_idx, m_idx], rx, scheme, scenario)

    # L: the last delivery slot before each report (−Δ at the chunk start, as if delivered there)
    start = -age.to(torch.int64).unsqueeze(-1)
    last_incl = torch.cummax(torch.where(delivered, times, start), dim=-1).values
    final_left = last_incl[..., -1]
    d_r, d_n, d_m = delivered.nonzero(as_tuple=True)
    last_before = torch.where(d_m > 0, last_incl[d_r, d_n, (d_m - 1).clamp(min=0)], start[d_r, d_n, 0])
    delivery_slot = times[d_r, d_n, d_m]
    age_sum, over = _interval_stats(last_before, delivery_slot, scenario.deadline)
    tail_sum, tail_over = _interval_stats(final_left, torch.full_like(final_left, size), scenario.deadline)
    node = d_r * N + d_n

    def per_node(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(R * N, dtype=torch.float64, device=device).index_add_(0, node, values.double()).view(R, N)

    stats = {
        "age_sum": per_node(age_sum) + tail_sum,
        "over": per_node(over) + tail_over,
        "deliveries": per_node(torch.ones_like(age_sum)),
        "peak_sum": per_node(delivery_slot - last_before),  # the age just before the reset
        "generated": generated.sum(-1, dtype=torch.float64),
    }
    return (size - final_left).to(torch.int32), stats


def _decode_events(slot_key: torch.Tensor, rx: torch.Tensor, scheme: str, scenario: Scenario) -> torch.Tensor:
    """Decode transmissions given as events (slot key, received SNR); returns decoded per event.

    Receivers are symmetric in the order of the colliders, so each busy slot becomes one row of a
    table as wide as the largest collision, not as wide as N: most slots hold one or two packets.
    """
    small = len(slot_key) == 0 or int(slot_key.max()) < 2**31  # int32 sorts faster
    order = torch.argsort(slot_key.to(torch.int32) if small else slot_key, stable=True)
    key = slot_key[order]
    _, row, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(key), device=key.device) - first[row]
    table = torch.zeros(len(counts), int(counts.max()) if len(counts) else 1, device=rx.device)
    table[row, column] = rx[order]
    decoded_table = decode(table, scheme, scenario.threshold, scenario.csi_residual, scenario.max_sic_stages)
    decoded = torch.empty_like(rx, dtype=torch.bool)
    decoded[order] = decoded_table[row, column]
    return decoded


def _threshold_aloha_chunk(scenario: Scenario, age: torch.Tensor, size: int, generator: torch.Generator):
    """Age-dependent access: a node with a new report transmits w.p. τ only while Δ_i(t−1) ≥ Γ.

    Activity depends on the state, so slots are stepped one by one (vectorized over R × N).
    """
    R, N = age.shape
    device = age.device
    q = torch.tensor(scenario.event_probs, device=device)
    generated = torch.rand(size, R, N, generator=generator, device=device) < q
    coin = torch.rand(size, R, N, generator=generator, device=device)
    gains = torch.rand(size, R, N, generator=generator, device=device).log_().neg_()
    stats = {name: torch.zeros(R, N, dtype=torch.float64, device=device) for name in ("age_sum", "over", "deliveries", "peak_sum")}
    for t in range(size):
        active = generated[t] & (age >= scenario.gamma_threshold) & (coin[t] < scenario.tau)
        decoded = decode(torch.where(active, scenario.snr * gains[t], 0.0), "aloha", scenario.threshold)
        stats["peak_sum"] += torch.where(decoded, age, 0)
        age = torch.where(decoded, 1, age + 1)
        stats["age_sum"] += age
        stats["over"] += age > scenario.deadline
        stats["deliveries"] += decoded
    stats["generated"] = generated.sum(0, dtype=torch.float64)
    return age, stats
