"""The system model as vectorized torch code: receivers, and a streaming Monte Carlo simulator.

Every transmission is an event (node = r·N + n, slot in the chunk), R independent replications ×
N nodes side by side. Statistics are accumulated per (replication, node) chunk by chunk, so memory
does not grow with the number of slots; the same code runs on a GPU.
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


def _report_events(q: torch.Tensor, R: int, size: int, attempt_prob: float, generator: torch.Generator):
    """Report slots of every (replication, node) in a chunk, and which of them are transmitted.

    The slots are drawn as Geometric(q_i) gaps (a Bernoulli process, memoryless across chunks), so
    random numbers scale with the reports, not with slots × nodes. Returns (reports per node,
    transmitted events as (node = r·N + n, slot), ordered by node, then slot).
    """
    N, device = len(q), q.device
    q_max = float(q.max())
    mean = size * q_max
    width = size if q_max > 0.5 else min(size, int(mean + 6 * math.sqrt(mean + 1) + 16))
    # gap = ⌊log u / log(1 − q)⌋ + 1; the scale is 0 for q = 1 (every slot) and ∞ for q = 0 (never)
    scale = (-1.0 / torch.log1p(-q.float())).view(1, N, 1)
    while True:
        u = torch.rand(R, N, width, generator=generator, device=device).clamp_(min=1e-12)
        # float32 counts exactly below 2^24; past the chunk end precision no longer matters
        times = u.log_().neg_().mul_(scale).floor_().add_(1).clamp_(max=size + 1).cumsum_(-1).sub_(1)
        if width == size or bool((times[..., -1] >= size - 1).all()):
            break
        width = size  # the stream ran short of the chunk (very rare): draw it at full width
    generated = times < size
    sent = generated
    if attempt_prob < 1:
        sent = generated & (torch.rand(R, N, width, generator=generator, device=device) < attempt_prob)
    event = sent.view(-1).nonzero().squeeze(1)  # increasing: ordered by node, then slot
    slot = times.view(-1).index_select(0, event).to(torch.int64)
    return generated.sum(-1, dtype=torch.float64).view(-1), event.div(width, rounding_mode="floor"), slot


def _received(count: int, scenario: Scenario, generator: torch.Generator, device) -> torch.Tensor:
    """Received SNR ρh of ``count`` transmissions, Rayleigh power gains h ~ Exp(1) by inversion (float32).

    h = −log(1 − u) with u ∈ [0, 1) stays finite: u = 0 has probability 2⁻²⁴ per draw, about one
    event per 5000-slot chunk in a hundred, and an infinite power would poison the SIC running sums.
    """
    return torch.rand(count, generator=generator, device=device, dtype=torch.float32).neg_().log1p_().mul_(-scenario.snr)


def _chunk_stats(d_node: torch.Tensor, d_slot: torch.Tensor, age: torch.Tensor, size: int, deadline: int, generated: torch.Tensor):
    """(age after the chunk, per-node statistics) from the deliveries, given in (node, slot) order.

    Between deliveries at L and e the ages are 1 … e − L; L is the node's previous delivery
    (−Δ at the chunk start, as if delivered there).
    """
    R, N = age.shape
    start = -age.view(-1).to(torch.int64)
    first = torch.ones_like(d_node, dtype=torch.bool)
    first[1:] = d_node[1:] != d_node[:-1]
    previous = torch.empty_like(d_slot)
    previous[1:] = d_slot[:-1]
    last_before = torch.where(first, start.index_select(0, d_node), previous)
    final_left = start.scatter_reduce(0, d_node, d_slot, reduce="amax")
    age_sum, over = _interval_stats(last_before, d_slot, deadline)
    tail_sum, tail_over = _interval_stats(final_left, torch.full_like(final_left, size), deadline)

    def per_node(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(R * N, dtype=torch.float64, device=age.device).index_add_(0, d_node, values.double())

    stats = {
        "age_sum": per_node(age_sum) + tail_sum,
        "over": per_node(over) + tail_over,
        "deliveries": per_node(torch.ones_like(age_sum)),
        "peak_sum": per_node(d_slot - last_before),  # the age just before the reset
        "generated": generated,
    }
    return (size - final_left).to(torch.int32).view(R, N), {k: v.view(R, N) for k, v in stats.items()}


def _one_shot_chunk(scenario: Scenario, scheme: str, age: torch.Tensor, size: int, q: torch.Tensor, generator: torch.Generator):
    """``size`` slots of the one-shot schemes, event by event (a report is sent in its slot w.p. p)."""
    R, N = age.shape
    generated, node, slot = _report_events(q, R, size, scenario.transmit_prob, generator)
    rx = _received(len(node), scenario, generator, age.device)
    slot_key = node.div(N, rounding_mode="floor").mul_(size).add_(slot)
    delivered = _decode_events(slot_key, rx, scheme, scenario, R * size).nonzero().squeeze(1)
    return _chunk_stats(node.index_select(0, delivered), slot.index_select(0, delivered), age, size, scenario.deadline, generated)


def _decode_events(slot_key: torch.Tensor, rx: torch.Tensor, scheme: str, scenario: Scenario, slots: int) -> torch.Tensor:
    """Decode transmissions given as events (slot key < ``slots``, float32 received SNR); returns decoded per event.

    ALOHA and capture need only per-slot counts and sums. SIC needs each slot's packets in decreasing
    power: one sort on (slot, −power) makes every slot a contiguous segment, and the stage sums
    become segment-relative cumulative sums — no table as wide as the largest collision.
    """
    gamma = scenario.threshold
    if scheme == "aloha":
        count = torch.bincount(slot_key, minlength=slots)
        return (count.index_select(0, slot_key) == 1) & (rx >= gamma)
    x = rx.double()
    total = torch.zeros(slots, dtype=torch.float64, device=rx.device).index_add_(0, slot_key, x).index_select(0, slot_key)
    if scheme == "capture":
        return x >= gamma * (1 + total - x)
    if scheme != "sic":
        raise ValueError(f"no receiver for scheme {scheme!r}")
    # positive float32 bit patterns order like the values; equal powers may go in either order (same sums)
    power_rank = (2**31 - 1) - rx.contiguous().view(torch.int32).to(torch.int64)
    order = torch.argsort(slot_key * 2**31 + power_rank, stable=True)  # stable sorts int64 faster here (measured)
    xs, total = x.index_select(0, order), total.index_select(0, order)
    key = slot_key.index_select(0, order)
    new_slot = torch.ones_like(key, dtype=torch.bool)
    new_slot[1:] = key[1:] != key[:-1]
    starts = new_slot.nonzero().squeeze(1)
    segment = new_slot.cumsum(0).sub_(1)
    cumulative = xs.cumsum(0)
    exclusive = cumulative - xs
    stronger = exclusive - exclusive.index_select(0, starts).index_select(0, segment)  # Σ_{l<m} x_(l)
    weaker = total - stronger - xs  # Σ_{l>m} x_(l)
    failed = xs < gamma * (1 + weaker + scenario.csi_residual * stronger)
    failures = failed.cumsum(0)
    before_slot = (failures - failed.long()).index_select(0, starts).index_select(0, segment)
    decoded = failures == before_slot  # SIC stops at the first failure
    if scenario.max_sic_stages is not None:
        stage = torch.arange(len(key), device=key.device) - starts.index_select(0, segment)
        decoded &= stage < scenario.max_sic_stages
    return torch.empty_like(decoded).scatter_(0, order, decoded)


def _threshold_aloha_chunk(scenario: Scenario, age: torch.Tensor, size: int, generator: torch.Generator):
    """Age-dependent access: a node with a new report transmits w.p. τ only while Δ_i(t−1) ≥ Γ.

    Event by event, like the one-shot schemes: the candidate attempts (report and coin < τ) are drawn
    first; an attempt at t is real iff t − L ≥ Γ, L the node's previous delivery, and a slot delivers
    iff it holds exactly one real attempt whose SNR clears γ. Deliveries decide which later attempts
    are real, so they are found as the fixed point of "deliveries → real attempts → deliveries",
    iterated from "no delivery". Each pass settles at least the earliest slot still wrong (the
    system is causal), so the iteration ends, at the exact slot-by-slot outcome, in a few passes.
    """
    R, N = age.shape
    device = age.device
    q = torch.tensor(scenario.event_probs, device=device)
    generated, node, slot = _report_events(q, R, size, scenario.tau, generator)
    clears = _received(len(node), scenario, generator, device) >= scenario.threshold
    slot_key = node.div(N, rounding_mode="floor").mul_(size).add_(slot)
    start = (-age.view(-1).to(torch.int64)).index_select(0, node)
    delivered = threshold_deliveries(node, slot, slot_key, clears, start, scenario.gamma_threshold, R * size)
    delivered = delivered.nonzero().squeeze(1)
    return _chunk_stats(node.index_select(0, delivered), slot.index_select(0, delivered), age, size, scenario.deadline, generated)


def threshold_deliveries(node, slot, slot_key, clears, start, gamma_threshold: int, slots: int) -> torch.Tensor:
    """Which candidate attempts (given in (node, slot) order) deliver under threshold ALOHA.

    ``start`` is each attempt's node's −Δ at the chunk start; ``clears`` whether its SNR clears γ.
    """
    span = int(slot.max()) + 2 if len(slot) else 1
    node_base = node * span  # node-major offsets turn a running max into a per-node one
    delivered = torch.zeros_like(clears)
    while True:
        marked = node_base + torch.where(delivered, slot + 1, 0)
        previous = torch.cat([marked.new_full((1,), -1), torch.cummax(marked, 0).values[:-1]]) - node_base
        last = torch.where(previous >= 1, previous - 1, start)  # L: the node's previous delivery
        real = slot - last >= gamma_threshold
        count = torch.zeros(slots, dtype=torch.int32, device=slot.device).index_add_(0, slot_key, real.int())
        now = real & clears & (count.index_select(0, slot_key) == 1)
        if torch.equal(now, delivered):
            return delivered
        delivered = now
