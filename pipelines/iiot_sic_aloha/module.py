"""``lightyard train iiot_sic_aloha``: simulate every scheme, set the analysis beside it, tune, log."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from common.config import ConfigError
from common.experiment import NonGradientExperiment
from common.hardware import resolve_accelerator
from common.tracking import Tracker, pyplot
from pipelines.iiot_sic_aloha.analysis import (
    analyze,
    best_age_threshold,
    best_transmit_probability,
)
from pipelines.iiot_sic_aloha.data import Scenario, check_schemes, scenario_from_config
from pipelines.iiot_sic_aloha.model import SimulationResult, simulate

LABELS = {"aloha": "slotted ALOHA", "capture": "capture, no SIC", "sic": "SIC", "threshold_aloha": "threshold ALOHA"}


def run_simulation(cfg: DictConfig, scenario: Scenario, scheme: str, slots: int, replications: int, seed: int) -> SimulationResult:
    """The vectorized simulator with a progress bar, on the configured device."""
    device = resolve_accelerator(str(cfg.trainer.accelerator))
    with tqdm(total=slots, desc=scheme, unit="slot", leave=False, disable=not cfg.trainer.enable_progress_bar) as bar:
        return simulate(
            scenario, scheme, slots, replications, cfg.sim.warmup, cfg.sim.chunk_slots, seed, device, bar.update, cfg.sim.streams
        )


def comparison_rows(scheme: str, analysis: dict, result: SimulationResult, confidence: float) -> list[dict]:
    rows = []
    for metric, (mean, half) in result.summary(confidence).items():
        exact = analysis[metric]
        rows.append(
            {
                "scheme": LABELS[scheme],
                "metric": metric,
                "simulation": mean,
                f"±{int(confidence * 100)}% CI": half,
                "analysis": exact,
                "inside CI": bool(abs(mean - exact) <= half) if np.isfinite(half) else None,
                "analysis kind": "exact" if analysis["exact"] else ("mean-field" if scheme == "threshold_aloha" else "Monte Carlo table"),
            }
        )
    return rows


def tuning_rows(scenario: Scenario, schemes: list[str], tune: DictConfig) -> list[dict]:
    """Transmit probability (and Γ, τ of threshold ALOHA) minimising the analytical mean AoI."""
    rows = []
    n = scenario.num_nodes
    for scheme in schemes:
        if scheme == "threshold_aloha":
            gammas = sorted({max(1, round(f * n)) for f in tune.age_threshold_factors})
            taus = sorted({min(1.0, f / n) for f in tune.tx_prob_factors})
            g, tau, aoi = best_age_threshold(scenario, gammas, taus)
            rows.append(
                {
                    "scheme": LABELS[scheme],
                    "tuned": f"Γ={g}, τ={tau:.3g}",
                    "mean AoI (analysis)": aoi,
                    "at config": analyze(scenario, scheme)["mean_aoi"],
                }
            )
        else:
            p, aoi = best_transmit_probability(scenario, scheme)
            rows.append(
                {
                    "scheme": LABELS[scheme],
                    "tuned": f"p={p:.3g}",
                    "mean AoI (analysis)": aoi,
                    "at config": analyze(scenario, scheme)["mean_aoi"],
                }
            )
    return rows


def per_node_figure(scenario: Scenario, results: dict[str, tuple[dict, SimulationResult]], confidence: float):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * scenario.num_nodes), 3.6))
    nodes = np.arange(scenario.num_nodes)
    width = 0.8 / len(results)
    for i, (scheme, (analysis, result)) in enumerate(results.items()):
        sim = result.per_node(confidence)
        ax.bar(nodes + i * width, [m for m, _ in sim], width, yerr=[h for _, h in sim], label=f"{LABELS[scheme]} (sim)", alpha=0.7)
        ax.scatter(nodes + i * width, analysis["per_node_aoi"], marker="_", color="k", s=80, zorder=3)
    ax.set(xlabel="node", ylabel="average AoI (slots)", yscale="log", title="Per-node average AoI: bars simulation, ticks analysis")
    ax.legend(fontsize=7)
    return fig


class SicAlohaExperiment(NonGradientExperiment):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        scenario_from_config(cfg.sim)  # what ranges alone cannot say (one q per node); the ranges are conf's checks
        check_schemes(cfg.sim.schemes)
        check_schemes([cfg.bench.scheme], "bench.scheme (a bench point's, from bench.schemes)")
        if cfg.sim.streams > cfg.sim.replications:  # (the simulator would run fewer, the run's params say otherwise)
            raise ConfigError(
                f"sim.streams={cfg.sim.streams} exceeds sim.replications={cfg.sim.replications}: a stream runs whole replications; give at most {cfg.sim.replications}"
            )

    def run(self, tracker: Tracker) -> dict[str, float]:
        cfg = self.cfg
        self.check_config(cfg)
        scenario = scenario_from_config(cfg.sim)
        schemes = list(cfg.sim.schemes)
        metrics: dict[str, float] = {}
        rows, results = [], {}
        for i, scheme in enumerate(schemes):
            analysis = analyze(scenario, scheme, cfg.analysis.mc_draws)
            result = run_simulation(cfg, scenario, scheme, cfg.sim.slots, cfg.sim.replications, cfg.seed + i)
            results[scheme] = (analysis, result)
            rows += comparison_rows(scheme, analysis, result, cfg.sim.confidence)
            for metric, (mean, half) in result.summary(cfg.sim.confidence).items():
                metrics[f"{scheme}/{metric}"] = mean
                metrics[f"{scheme}/{metric}_ci"] = half
                metrics[f"{scheme}/{metric}_analysis"] = analysis[metric]
            metrics[f"{scheme}/analysis_exact"] = float(analysis["exact"])  # 0: Monte Carlo table or mean-field
        table = tracker.log_table(rows, "tables/simulation_vs_analysis.md", title="Simulation (mean ± CI over replications) vs analysis")
        print(table)
        tracker.log_figure(per_node_figure(scenario, results, cfg.sim.confidence), "figures/per_node_aoi.png")
        if cfg.tune.enabled:
            tuned = tuning_rows(scenario, schemes, cfg.tune)
            print(tracker.log_table(tuned, "tables/tuning.md", title="AoI-minimising access parameters (analysis)"))
            for row, scheme in zip(tuned, schemes):
                metrics[f"{scheme}/tuned_mean_aoi"] = row["mean AoI (analysis)"]
        inside = [r["inside CI"] for r in rows if r["inside CI"] is not None and r["analysis kind"] == "exact"]
        if inside:
            metrics["agreement/fraction_inside_ci"] = sum(inside) / len(inside)
        return metrics
