"""The scenario: every parameter of the system model, checked where it enters.

There is no dataset: the simulator generates traffic, fading and decoding from these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from omegaconf import DictConfig

from common.config import ConfigError

SCHEMES = ("aloha", "capture", "sic", "threshold_aloha")


@dataclass(frozen=True)
class Scenario:
    """One setting of the model in ../shared/papers/iiot_sic_aloha.md (notation of the notes)."""

    num_nodes: int  # N
    event_probs: tuple[float, ...]  # q_i, one per node
    transmit_prob: float = 1.0  # p (one-shot rule: sent only in its own slot, with probability p)
    snr: float = 10.0  # ρ, mean received SNR (linear)
    threshold: float = 1.0  # γ, SINR capture threshold (linear)
    csi_residual: float = 0.0  # ε, residual fraction of cancelled power (0 = perfect CSI)
    max_sic_stages: int | None = None  # K_max (None: unlimited)
    deadline: int = 20  # D, slots
    age_threshold: int | None = None  # Γ of threshold ALOHA (None: 2.2 N)
    threshold_tx_prob: float | None = None  # τ of threshold ALOHA (None: min(1, 4.69 / N))

    def __post_init__(self) -> None:
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ConfigError(f"sim.num_nodes must be a whole number ≥ 1, got {self.num_nodes}")
        if len(self.event_probs) != self.num_nodes:
            raise ConfigError(f"sim.event_probs has {len(self.event_probs)} values for {self.num_nodes} nodes; give one per node")
        for name, value in [("sim.event_prob", q) for q in self.event_probs] + [("sim.transmit_prob", self.transmit_prob)]:
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value}")
        if self.threshold_tx_prob is not None and not 0.0 < self.threshold_tx_prob <= 1.0:
            raise ConfigError(f"sim.threshold_tx_prob must be a probability in (0, 1], got {self.threshold_tx_prob}")
        if not self.snr > 0 or math.isinf(self.snr):
            raise ConfigError(f"sim.snr_db gives a non-positive or infinite SNR ({self.snr})")
        if not self.threshold > 0:
            raise ConfigError(f"sim.threshold must be > 0 (linear SINR threshold γ), got {self.threshold}")
        if not 0.0 <= self.csi_residual <= 1.0:
            raise ConfigError(f"sim.csi_residual (ε) must be in [0, 1], got {self.csi_residual}")
        if self.deadline < 0:
            raise ConfigError(f"sim.deadline must be ≥ 0 slots, got {self.deadline}")
        if self.max_sic_stages is not None and self.max_sic_stages < 1:
            raise ConfigError(f"sim.max_sic_stages must be ≥ 1 or null, got {self.max_sic_stages}")
        if self.age_threshold is not None and self.age_threshold < 1:
            raise ConfigError(f"sim.age_threshold must be ≥ 1 slot or null, got {self.age_threshold}")

    @property
    def activity(self) -> tuple[float, ...]:
        """a_i = q_i p: probability that node i transmits in a slot (one-shot schemes)."""
        return tuple(q * self.transmit_prob for q in self.event_probs)

    @property
    def homogeneous(self) -> bool:
        return len(set(self.event_probs)) == 1

    @property
    def gamma_threshold(self) -> int:
        return self.age_threshold if self.age_threshold is not None else max(1, round(2.2 * self.num_nodes))

    @property
    def tau(self) -> float:
        return self.threshold_tx_prob if self.threshold_tx_prob is not None else min(1.0, 4.69 / self.num_nodes)

    def with_(self, **changes) -> Scenario:
        if "num_nodes" in changes and "event_probs" not in changes and self.homogeneous:
            changes["event_probs"] = (self.event_probs[0],) * changes["num_nodes"]
        if "event_prob" in changes:
            changes["event_probs"] = (changes.pop("event_prob"),) * changes.get("num_nodes", self.num_nodes)
        return replace(self, **changes)


def scenario_from_config(sim: DictConfig) -> Scenario:
    """``cfg.sim`` → Scenario (per-node ``event_probs`` win over the homogeneous ``event_prob``)."""
    if not isinstance(sim.num_nodes, int) or sim.num_nodes < 1:
        raise ConfigError(f"sim.num_nodes must be a whole number ≥ 1, got {sim.num_nodes}")
    probs: Sequence[float] = list(sim.event_probs) if sim.event_probs else [sim.event_prob] * sim.num_nodes
    return Scenario(
        num_nodes=sim.num_nodes,
        event_probs=tuple(float(q) for q in probs),
        transmit_prob=float(sim.transmit_prob),
        snr=10 ** (float(sim.snr_db) / 10),
        threshold=float(sim.threshold),
        csi_residual=float(sim.csi_residual),
        max_sic_stages=sim.max_sic_stages,
        deadline=int(sim.deadline),
        age_threshold=sim.age_threshold,
        threshold_tx_prob=sim.threshold_tx_prob,
    )


def check_schemes(schemes: Sequence[str], key: str = "sim.schemes") -> list[str]:
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ConfigError(f"unknown scheme(s) {', '.join(unknown)} in {key}; valid: {', '.join(SCHEMES)}")
    return list(schemes)
