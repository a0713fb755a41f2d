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

METRICS = ("throughput", "mean_aoi", "peak_aoi", "p_age_violation", "p_report_violation")


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
        uniform = torch.rand(size, R, N, generator=generator, device=device)
        generated = uniform < q
        if scheme == "threshold_aloha":
            coin = torch.rand(size, R, N, generator=generator, device=device)
            gains = torch.rand(size, R, N, generator=generator, device=device).log_().neg_()
            ages, decoded, prev = _threshold_aloha_chunk(scenario, age, generated, coin, gains)
            ages, decoded, prev = (x.permute(1, 2, 0) for x in (ages, decoded, prev))
        else:
            # given u < q, u/q is uniform: u < q·p is "generated, then sent with probability p"
            active = uniform < q * scenario.transmit_prob
            rx_snr = torch.zeros(size, R, N, device=device)
            # Rayleigh power gains h ~ Exp(1) by inversion, drawn only for the active nodes
            rx_snr[active] = torch.rand(int(active.sum()), generator=generator, device=device).log_().mul_(-scenario.snr)
            decoded = decode(rx_snr, scheme, scenario.threshold, scenario.csi_residual, scenario.max_sic_stages)
            ages, prev = _age_scan(age, decoded.permute(1, 2, 0).contiguous())
            decoded = decoded.permute(1, 2, 0)
        age = ages[..., -1].contiguous()
        if done >= 0:  # after warm-up: accumulate
            acc["age_sum"] += ages.sum(-1, dtype=torch.float64)
            acc["over"] += (ages > scenario.deadline).sum(-1, dtype=torch.float64)
            acc["deliveries"] += decoded.sum(-1, dtype=torch.float64)
            acc["peak_sum"] += (prev * decoded).sum(-1, dtype=torch.float64)
            acc["generated"] += generated.sum(0, dtype=torch.float64)
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


def _age_scan(age: torch.Tensor, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ(t) = 1 if node delivers in slot t else Δ(t−1) + 1, for a whole chunk at once.

    ``decoded`` is ``[R, N, C]`` (slots last, contiguous, so the scan runs along memory). Returns
    (Δ(t), Δ(t−1)) for every slot of the chunk, both ``[R, N, C]``.
    """
    # with L(t) the last delivery slot ≤ t, Δ(t) = t − L(t) + 1; before the chunk's first delivery
    # L sits, virtually, at slot −Δ(−1) (the age carried over from the previous chunk)
    t = torch.arange(decoded.shape[-1], device=decoded.device, dtype=age.dtype)
    last = torch.cummax(torch.where(decoded, t, -age.unsqueeze(-1)), dim=-1).values
    ages = t - last + 1
    prev = torch.cat([age.unsqueeze(-1), ages[..., :-1]], dim=-1)
    return ages, prev


def _threshold_aloha_chunk(scenario: Scenario, age: torch.Tensor, generated, coin, gains):
    """Age-dependent access: a node with a new report transmits w.p. τ only while Δ_i(t−1) ≥ Γ.

    Activity depends on the state, so slots are stepped one by one (vectorized over R × N).
    """
    ages, decoded_all, prev_all = [], [], []
    for t in range(generated.shape[0]):
        active = generated[t] & (age >= scenario.gamma_threshold) & (coin[t] < scenario.tau)
        decoded = decode(torch.where(active, scenario.snr * gains[t], 0.0), "aloha", scenario.threshold)
        prev_all.append(age)
        age = torch.where(decoded, 1, age + 1)
        ages.append(age)
        decoded_all.append(decoded)
    return torch.stack(ages), torch.stack(decoded_all), torch.stack(prev_all)
