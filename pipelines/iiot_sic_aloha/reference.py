"""A straightforward per-slot, per-node Python implementation of the same model.

Written for clarity, not speed: it is the independent reference the vectorized simulator is tested
against, and the baseline of ``lightyard bench iiot_sic_aloha``.
"""

from __future__ import annotations

import random

from pipelines.iiot_sic_aloha.data import Scenario


def decode_one_slot(rx: dict[int, float], scheme: str, threshold: float, residual: float, max_stages: int | None) -> set[int]:
    """Decoded node ids from ``{node: received SNR}`` of the active nodes."""
    if scheme in {"aloha", "threshold_aloha"}:
        return set(rx) if len(rx) == 1 and next(iter(rx.values())) >= threshold else set()
    if scheme == "capture":
        total = sum(rx.values())
        return {i for i, x in rx.items() if x >= threshold * (1 + total - x)}
    order = sorted(rx, key=rx.get, reverse=True)
    decoded: set[int] = set()
    cancelled = 0.0
    for m, node in enumerate(order):
        if max_stages is not None and m >= max_stages:
            break
        weaker = sum(rx[j] for j in order[m + 1 :])
        if rx[node] < threshold * (1 + weaker + residual * cancelled):
            break
        decoded.add(node)
        cancelled += rx[node]
    return decoded


def simulate_reference(scenario: Scenario, scheme: str, slots: int, warmup: int = 1000, seed: int = 0) -> dict[str, float]:
    """One replication; returns the same network metrics as the vectorized simulator."""
    rng = random.Random(seed)
    n = scenario.num_nodes
    if scheme == "threshold_aloha":
        age = [rng.randint(1, max(2, int(2.7 * n))) for _ in range(n)]
    else:
        age = [1] * n
    age_sum = over = deliveries = generated = 0
    peaks: list[list[int]] = [[] for _ in range(n)]
    for t in range(warmup + slots):
        rx = {}
        new_reports = 0
        for i in range(n):
            has_report = rng.random() < scenario.event_probs[i]
            coin, gain = rng.random(), rng.expovariate(1.0)
            new_reports += has_report
            if scheme == "threshold_aloha":
                sends = has_report and age[i] >= scenario.gamma_threshold and coin < scenario.tau
            else:
                sends = has_report and coin < scenario.transmit_prob
            if sends:
                rx[i] = scenario.snr * gain
        decoded = decode_one_slot(rx, scheme, scenario.threshold, scenario.csi_residual, scenario.max_sic_stages)
        measuring = t >= warmup
        for i in range(n):
            if i in decoded:
                if measuring:
                    peaks[i].append(age[i])
                age[i] = 1
            else:
                age[i] += 1
            if measuring:
                age_sum += age[i]
                over += age[i] > scenario.deadline
        if measuring:
            deliveries += len(decoded)
            generated += new_reports
    node_peaks = [sum(p) / len(p) for p in peaks if p]
    return {
        "throughput": deliveries / slots,
        "mean_aoi": age_sum / (slots * n),
        "peak_aoi": sum(node_peaks) / len(node_peaks) if node_peaks else float("nan"),
        "p_age_violation": over / (slots * n),
        "p_report_violation": 1 - deliveries / max(generated, 1),
    }
