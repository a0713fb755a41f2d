"""The system model as vectorized torch code: receivers, and a streaming Monte Carlo simulator.

Every transmission is an event (node = r·N + n, slot in the chunk), R independent replications ×
N nodes side by side. Statistics are accumulated per (replication, node) chunk by chunk, so memory
does not grow with the number of slots; the same code runs on a GPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    streams: int = 1,
) -> SimulationResult:
    """Monte Carlo over ``slots`` measured slots (after ``warmup``) × ``replications`` × nodes.

    The replications are split over ``streams`` independent random streams (stream s seeded with
    seed + 1000003·s) that run side by side, one CPU thread each: the result depends on the seed and
    the number of streams, never on the machine.
    """
    device = torch.device(device)
    streams = max(1, min(streams, replications))
    sizes = [len(part) for part in np.array_split(np.arange(replications), streams)]

    stop = threading.Event()  # set when the main thread is stopped (a signal): the streams end at their next chunk

    def run(stream: int) -> dict[str, np.ndarray]:
        report = progress if stream == 0 else None  # the streams keep pace: one bar is enough
        return _simulate_stream(scenario, scheme, slots, sizes[stream], warmup, chunk_slots, seed + 1000003 * stream, device, report, stop)

    if streams == 1 or device.type != "cpu":
        parts = [run(s) for s in range(streams)]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel across streams, not inside their small kernels
        pool = ThreadPoolExecutor(min(streams, threads))
        try:
            parts = list(pool.map(run, range(streams)))
        except BaseException:  # (a `with` block would wait for every stream to finish its slots first)
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)
    acc = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    with np.errstate(divide="ignore", invalid="ignore"):
        per_node_aoi = acc["age_sum"] / slots
        peak = np.where(acc["deliveries"] > 0, acc["peak_sum"] / np.maximum(acc["deliveries"], 1), np.nan)
        per_replication = {
            "throughput": acc["deliveries"].sum(1) / slots,
            "mean_aoi": per_node_aoi.mean(1),
            "peak_aoi": np.nanmean(peak, 1) if np.isfinite(peak).any() else np.full(replications, np.nan),
            "p_age_violation": (acc["over"] / slots).mean(1),
            "p_report_violation": 1 - acc["deliveries"].sum(1) / np.maximum(acc["generated"].sum(1), 1),
        }
    return SimulationResult(per_replication, per_node_aoi, slots)


def _simulate_stream(
    scenario: Scenario,
    scheme: str,
    slots: int,
    R: int,
    warmup: int,
    chunk_slots: int,
    seed: int,
    device: torch.device,
    progress: Callable[[int], None] | None,
    stop: threading.Event | None = None,
) -> dict[str, np.ndarray]:
    """One stream: R replications chunk by chunk; per (replication, node) sums over the measured slots. Ends early
    (with an exception) once ``stop`` is set."""
    stream = RandomStream(seed, device)
    N = scenario.num_nodes
    q = torch.tensor(scenario.event_probs, device=device)
    age = torch.ones(R, N, dtype=torch.int32, device=device)
    if scheme == "threshold_aloha":
        # spread initial ages over [1, 2.7N]: synchronised ages push threshold ALOHA into its congested state
        age = stream.integers(1, max(2, int(2.7 * N)), (R, N))
    acc = {
        name: torch.zeros(R, N, dtype=torch.float64, device=device) for name in ("age_sum", "over", "deliveries", "peak_sum", "generated")
    }
    done = -warmup
    while done < slots:
        if stop is not None and stop.is_set():
            raise InterruptedError("simulation stream stopped")
        size = min(chunk_slots, slots - done) if done >= 0 else min(chunk_slots, -done)
        if scheme == "threshold_aloha":
            age, stats = _threshold_aloha_chunk(scenario, age, size, q, stream)
        else:
            age, stats = _one_shot_chunk(scenario, scheme, age, size, q, stream)
        if done >= 0:  # after warm-up: accumulate
            for name, value in stats.items():
                acc[name] += value
            if progress is not None:
                progress(size)
        done += size
    return {name: value.cpu().numpy() for name, value in acc.items()}


class RandomStream:
    """One seeded random stream: numpy's PCG64 on CPU (its float32 draws take half the time of
    torch's CPU Mersenne Twister here, measured), torch's generator on other devices."""

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.numpy = np.random.default_rng(seed) if self.device.type == "cpu" else None
        self.torch = None if self.numpy is not None else torch.Generator(device=self.device).manual_seed(seed)

    def uniform(self, *shape: int) -> torch.Tensor:
        """float32 in [0, 1)."""
        if self.numpy is not None:
            return torch.from_numpy(self.numpy.random(shape, dtype=np.float32))
        return torch.rand(shape, generator=self.torch, device=self.device)

    def binomial(self, count: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """float64 draws of Binomial(count, prob), elementwise."""
        if self.numpy is not None:
            return torch.from_numpy(self.numpy.binomial(count.numpy(), prob.double().numpy()).astype(np.float64))
        return torch.binomial(count.double(), prob.double(), generator=self.torch)

    def integers(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        """int32 uniform on low … high."""
        if self.numpy is not None:
            return torch.from_numpy(self.numpy.integers(low, high, shape, dtype=np.int32, endpoint=True))
        return torch.randint(low, high + 1, shape, generator=self.torch, device=self.device, dtype=torch.int32)


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the true entries of a 1-D mask; numpy's on CPU, where torch's nonzero is ~6× slower (measured)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def _report_events(q: torch.Tensor, R: int, size: int, attempt_prob: float, stream: RandomStream):
    """Reports of every (replication, node) in a chunk, and the transmissions among them.

    A node transmits in a slot w.p. a_i = q_i p (a report, and the coin < p). Those slots are drawn
    as Geometric(a_i) gaps, a Bernoulli process memoryless across chunks, so random numbers scale
    with transmissions, not with slots × nodes. Reports that are not sent only count (for the
    report-violation probability): each other slot holds one w.p. q_i(1 − p)/(1 − a_i).
    Returns (reports per node; node = r·N + n, slot and slot key r·size + slot of every
    transmission, ordered by node, then slot).
    """
    N, device = len(q), q.device
    sent_prob = (q * attempt_prob).repeat(R)
    a_max = float(sent_prob.max())
    mean = size * a_max
    width = size if a_max > 0.5 else min(size, int(mean + 6 * math.sqrt(mean + 1) + 16))
    # gap = ⌊log u / log(1 − a)⌋ + 1; the scale is 0 for a = 1 (every slot) and ∞ for a = 0 (never)
    scale = (-1.0 / torch.log1p(-sent_prob.float())).view(R * N, 1)
    while True:
        u = stream.uniform(R * N, width).clamp_(min=1e-12)
        # float32 counts exactly below 2^24; past the chunk end precision no longer matters
        times = u.log_().neg_().mul_(scale).floor_().add_(1).clamp_(max=size + 1).cumsum_(-1).sub_(1)
        if width == size or bool((times[:, -1] >= size - 1).all()):
            break
        width = size  # the stream ran short of the chunk (very rare): draw it at full width
    sent = times < size
    per_node = sent.sum(-1)
    slot = times.view(-1).index_select(0, _flatnonzero(sent.view(-1))).long()
    # node of each event: +1 where each node after the first begins (several at once past empty nodes), summed up
    begins = per_node.cumsum(0)[:-1]
    node = torch.zeros(len(slot) + 1, dtype=torch.int64, device=device).index_add_(0, begins, torch.ones_like(begins)).cumsum_(0)[:-1]
    replication_offset = torch.arange(R, device=device).repeat_interleave(N) * size
    slot_key = slot + replication_offset.index_select(0, node)
    generated = per_node.double()
    if attempt_prob < 1:
        unsent = (q * (1 - attempt_prob) / (1 - q * attempt_prob)).clamp(max=1).repeat(R)
        generated += stream.binomial(size - per_node, unsent)
    return generated, node, slot, slot_key


def _received(count: int, scenario: Scenario, stream: RandomStream) -> torch.Tensor:
    """Received SNR ρh of ``count`` transmissions, Rayleigh power gains h ~ Exp(1) by inversion (float32).

    h = −log(1 − u) with u ∈ [0, 1) stays finite: u = 0 (probability 2⁻²⁴ per draw, once in some
    17 million transmissions) would otherwise give an infinite power and poison the SIC sums.
    """
    return stream.uniform(count).neg_().log1p_().mul_(-scenario.snr)


def _triangle(n: torch.Tensor) -> torch.Tensor:
    return n * (n + 1) * 0.5


def _chunk_stats(
    node: torch.Tensor, slot: torch.Tensor, delivered: torch.Tensor, age: torch.Tensor, size: int, deadline: int, generated: torch.Tensor
):
    """(age after the chunk, per-node statistics) from the transmissions, in (node, slot) order, that delivered.

    A delivery at e closes the interval begun at the node's previous delivery L; the ages in it run
    1 … e − L (age at slot t: t − L + 1), adding T(e − L) = (e − L)(e − L + 1)/2 to the age sum and
    max(0, e − L − D) slots over the deadline. A node's first interval begins before the chunk
    (L = −Δ, Δ its age at the chunk start) and counts only from slot 0; its last is open at the end.
    """
    R, N = age.shape
    won = _flatnonzero(delivered)
    d_node, d_slot = node.index_select(0, won), slot.index_select(0, won)
    start = -age.view(-1).double()
    first = torch.ones_like(d_node, dtype=torch.bool)
    first[1:] = d_node[1:] != d_node[:-1]
    heads = _flatnonzero(first)  # each delivering node's first delivery
    tails = torch.empty_like(heads)  # and its last
    tails[:-1] = heads[1:] - 1
    tails[-1:] = len(d_slot) - 1
    owners = d_node.index_select(0, heads)
    e = d_slot.double()
    gap = torch.empty_like(e)
    gap[1:] = e[1:] - e[:-1]
    gap[heads] = e.index_select(0, heads) - start.index_select(0, owners)
    age_sum = _segment_sums(_triangle(gap), heads, tails, owners, R * N)
    over = _segment_sums((gap - deadline).clamp_(min=0), heads, tails, owners, R * N)
    # the first interval counts from slot 0 only: T(Δ) of ages before it, and at most e slots over D
    first_over = (gap.index_select(0, heads) - deadline).clamp_(min=0)
    age_sum[owners] -= _triangle(-start.index_select(0, owners))
    over[owners] -= first_over - first_over.minimum(e.index_select(0, heads))
    # the open interval from each node's last delivery (or −Δ) to the chunk end
    last = start.clone()
    last[owners] = e.index_select(0, tails)
    open_gap = size - last
    age_sum += _triangle(open_gap) - _triangle((-last).clamp_(min=0))
    over += (open_gap - deadline).clamp_(min=0).minimum(size - last.clamp(min=0))
    deliveries = torch.zeros_like(start)
    deliveries[owners] = (tails - heads + 1).double()
    stats = {
        "age_sum": age_sum,
        "over": over,
        "deliveries": deliveries,
        "peak_sum": last - start,  # Σ of the ages just before each reset: the gaps telescope
        "generated": generated,
    }
    return (size - last).to(torch.int32).view(R, N), {k: v.view(R, N) for k, v in stats.items()}


def _segment_sums(values: torch.Tensor, heads: torch.Tensor, tails: torch.Tensor, owners: torch.Tensor, count: int) -> torch.Tensor:
    """Per-node sums of values stored node by node (segments [head, tail]), zero for absent nodes."""
    cumulative = values.cumsum(0)
    sums = cumulative.index_select(0, tails) - cumulative.index_select(0, heads) + values.index_select(0, heads)
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_put_((owners,), sums)


def _one_shot_chunk(scenario: Scenario, scheme: str, age: torch.Tensor, size: int, q: torch.Tensor, stream: RandomStream):
    """``size`` slots of the one-shot schemes, event by event (a report is sent in its slot w.p. p)."""
    R = age.shape[0]
    generated, node, slot, slot_key = _report_events(q, R, size, scenario.transmit_prob, stream)
    rx = _received(len(node), scenario, stream)
    delivered = _decode_events(slot_key, rx, scheme, scenario, R * size)
    return _chunk_stats(node, slot, delivered, age, size, scenario.deadline, generated)


def _decode_events(slot_key: torch.Tensor, rx: torch.Tensor, scheme: str, scenario: Scenario, slots: int) -> torch.Tensor:
    """Decode transmissions given as events (slot key < ``slots``, float32 received SNR); returns decoded per event.

    ALOHA and capture need only per-slot counts and sums; SIC runs in stages (``_sic_stages``).
    """
    gamma = scenario.threshold
    if scheme == "aloha":
        count = torch.bincount(slot_key, minlength=slots)
        return (count.index_select(0, slot_key) == 1) & (rx >= gamma)
    x = rx.double()
    total = torch.zeros(slots, dtype=torch.float64, device=rx.device).index_add_(0, slot_key, x)
    if scheme == "capture":
        return x >= gamma * (1 + total.index_select(0, slot_key) - x)
    if scheme != "sic":
        raise ValueError(f"no receiver for scheme {scheme!r}")
    return _sic_stages(slot_key, x, total, scenario, slots)


def _sic_stages(slot_key: torch.Tensor, x: torch.Tensor, total: torch.Tensor, scenario: Scenario, slots: int) -> torch.Tensor:
    """SIC without sorting. A stage decodes, in every slot still in play, each packet whose SINR
    against the packets not yet cancelled clears γ: x_i ≥ γ(1 + T − x_i + εC), T the slot's power
    not yet cancelled, C the power cancelled. The SINR grows with x_i, so a stage decodes the
    strongest packets left, and with ε ≤ 1 cancelling one never raises another's requirement:
    decoding a stage's packets together equals decoding them one by one in power order, and a slot
    leaves play exactly where one-by-one SIC stops. Under a stage limit K_max a stage keeps only the
    strongest of them (equal powers: the first event), so stages count SIC stages.
    """
    gamma, residual, limit = scenario.threshold, scenario.csi_residual, scenario.max_sic_stages
    decoded = torch.zeros_like(x, dtype=torch.bool)
    cancelled = torch.zeros_like(total) if residual else None
    in_play = None  # positions of the packets still in play; None: all
    remaining = total.index_select(0, slot_key)  # T of each packet's slot
    stage = 0
    while len(x) and (limit is None or stage < limit):
        stage += 1
        # x ≥ γ(1 + T − x + εC)  ⟺  T + εC − x(1 + γ)/γ ≤ −1
        slack = remaining.sub(x, alpha=(1 + gamma) / gamma)
        if residual:
            slack.add_(cancelled.index_select(0, slot_key), alpha=residual)
        passed = slack <= -1
        if limit is not None:
            passed &= _strongest_per_slot(slot_key, x, passed, slots)
        won = _flatnonzero(passed)
        if not len(won):
            break
        won_key, won_x = slot_key.index_select(0, won), x.index_select(0, won)
        decoded.index_fill_(0, won if in_play is None else in_play.index_select(0, won), True)
        total.index_add_(0, won_key, won_x, alpha=-1)
        if residual:
            cancelled.index_add_(0, won_key, won_x)
        touched = torch.zeros(slots, dtype=torch.bool, device=x.device).index_fill_(0, won_key, True)
        stay = _flatnonzero(touched.index_select(0, slot_key) & ~passed)  # the rest of the slots that decoded
        in_play = stay if in_play is None else in_play.index_select(0, stay)
        slot_key, x = slot_key.index_select(0, stay), x.index_select(0, stay)
        remaining = total.index_select(0, slot_key)
    return decoded


def _strongest_per_slot(slot_key: torch.Tensor, x: torch.Tensor, candidate: torch.Tensor, slots: int) -> torch.Tensor:
    """Marks, per slot, the strongest candidate (equal powers: the first)."""
    first = torch.arange(len(x), 0, -1, device=x.device)  # larger for earlier events
    key = torch.where(candidate, (x.float().view(torch.int32).long() << 32) | first, -1)
    best = torch.full((slots,), -1, dtype=torch.int64, device=x.device).scatter_reduce_(0, slot_key, key, "amax")
    return candidate & (key == best.index_select(0, slot_key))


def _threshold_aloha_chunk(scenario: Scenario, age: torch.Tensor, size: int, q: torch.Tensor, stream: RandomStream):
    """Age-dependent access: a node with a new report transmits w.p. τ only while Δ_i(t−1) ≥ Γ.

    Event by event, like the one-shot schemes: the candidate attempts (report and coin < τ) are drawn
    first; an attempt at t is real iff t − L ≥ Γ, L the node's previous delivery, and a slot delivers
    iff it holds exactly one real attempt whose SNR clears γ (``threshold_deliveries``).
    """
    R = age.shape[0]
    generated, node, slot, slot_key = _report_events(q, R, size, scenario.tau, stream)
    clears = _received(len(node), scenario, stream) >= scenario.threshold
    start = (-age.view(-1).long()).index_select(0, node)
    delivered = threshold_deliveries(node, slot, slot_key, clears, start, scenario.gamma_threshold, R * size)
    return _chunk_stats(node, slot, delivered, age, size, scenario.deadline, generated)


def threshold_deliveries(node, slot, slot_key, clears, start, gamma_threshold: int, slots: int) -> torch.Tensor:
    """Which candidate attempts (given in (node, slot) order) deliver under threshold ALOHA.

    ``start`` is each attempt's node's −Δ at the chunk start; ``clears`` whether its SNR clears γ.
    Deliveries decide which later attempts are real, so they are found as the fixed point of
    "deliveries → real attempts → deliveries", iterated from "no delivery". Each pass settles at
    least the earliest slot still wrong (the system is causal), so the iteration ends, at the exact
    slot-by-slot outcome, in a few passes.

    L comes from one running max over the codes node·span + Γ + L that deliveries carry (other
    attempts carry 0): span exceeds every slot + Γ, so the codes of earlier nodes stay below any
    bound node·span + t − Γ + Γ. The chunk start, L = −Δ, is checked on its own.
    """
    if not len(slot):
        return torch.zeros_like(clears)
    span = int(slot.max()) + gamma_threshold + 1
    dtype = torch.int32 if (int(node.max()) + 1) * span < 2**31 else torch.int64
    as_delivery = node.to(dtype) * span + gamma_threshold + slot.to(dtype)
    real_below = as_delivery - gamma_threshold  # real iff L ≤ t − Γ
    real_from_start = start <= slot - gamma_threshold
    real = real_from_start.clone()
    delivered = torch.zeros_like(clears)
    while True:
        running = torch.cummax(as_delivery * delivered, 0).values
        torch.le(running[:-1], real_below[1:], out=real[1:]).logical_and_(real_from_start[1:])
        count = torch.zeros(slots, dtype=torch.int32, device=slot.device).index_add_(0, slot_key, real.int())
        now = real & clears & (count.index_select(0, slot_key) == 1)
        if torch.equal(now, delivered):
            return delivered
        delivered = now
