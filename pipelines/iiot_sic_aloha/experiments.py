"""One grid point of each iiot_sic_aloha experiment (the grids and tables are in conf/iiot_sic_aloha.yaml).

The reproduce children are ordinary ``lightyard train`` runs of one scenario; here are only ``speed_point``
(one bench point: the vectorized simulator against the per-slot reference in the same run) and ``claims``,
what the sweep's tables cannot say: the paper's claim, analysis inside the simulation's CI, the 3×3 figure."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from omegaconf import DictConfig

from common.hardware import resolve_accelerator
from common.tables import markdown_table
from common.tracking import Tracker, pyplot
from pipelines.iiot_sic_aloha.data import scenario_from_config
from pipelines.iiot_sic_aloha.model import simulate
from pipelines.iiot_sic_aloha.reference import simulate_reference

# the sweep's axes (a child has exactly one of them in its point) and the variants compared at every point:
# label → (scheme, ε is the imperfect one)
AXES = {"sim.num_nodes": "number of nodes N", "sim.event_prob": "event-generation probability q", "sim.snr_db": "mean SNR ρ (dB)"}
VARIANTS = {
    "slotted ALOHA": ("aloha", False),
    "capture, no SIC": ("capture", False),
    "SIC, perfect CSI": ("sic", False),
    "SIC, imperfect CSI": ("sic", True),
    "threshold ALOHA": ("threshold_aloha", False),
}
METRICS = ("mean_aoi", "throughput", "p_age_violation", "p_report_violation")
PLOTTED = (
    ("mean_aoi", "average AoI (slots)", "log"),
    ("throughput", "throughput (packets/slot)", "linear"),
    ("p_age_violation", "P(Δ > D)", "linear"),
)


def speed_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Node-slots per second of ``bench.scheme``: vectorized simulator vs the per-slot Python reference, same model, same run."""
    b, scenario, scheme = cfg.bench, scenario_from_config(cfg.sim), str(cfg.bench.scheme)
    device = resolve_accelerator(str(cfg.trainer.accelerator))
    run = {"warmup": 0, "chunk_slots": cfg.sim.chunk_slots, "seed": cfg.seed, "device": device, "streams": cfg.sim.streams}
    simulate(scenario, scheme, 1000, b.replications, **run)  # warm-up (kernels, caches)
    # interleaved repeats, the fastest of each: the runs least disturbed by other load on the machine
    reference_time = vector_time = math.inf
    for _ in range(b.repeats):
        start = time.perf_counter()
        simulate_reference(scenario, scheme, b.reference_slots, warmup=0, seed=cfg.seed)
        reference_time = min(reference_time, time.perf_counter() - start)
        start = time.perf_counter()
        simulate(scenario, scheme, b.slots, b.replications, **run)
        vector_time = min(vector_time, time.perf_counter() - start)
    reference_rate = b.reference_slots * scenario.num_nodes / reference_time
    vector_rate = b.slots * b.replications * scenario.num_nodes / vector_time
    threads = min(cfg.sim.streams, torch.get_num_threads()) if device == "cpu" else 0
    if tracker is not None:
        tracker.set_tags({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    return {
        "reference_node_slots_per_s": reference_rate,
        "vectorized_node_slots_per_s": vector_rate,
        "speedup": vector_rate / reference_rate,
        "nodes": float(scenario.num_nodes),
        "streams": float(cfg.sim.streams),
        "threads": float(threads),
    }


def _points(children: list[dict], residual: float) -> list[dict]:
    """One row per (axis, value, variant) from the children: simulation mean, CI half-width, analysis."""
    rows = []
    for child in children:
        (axis,) = [a for a in AXES if a in child]
        imperfect = child["sim.csi_residual"] == residual and residual > 0
        for label, (scheme, wants_imperfect) in VARIANTS.items():
            if wants_imperfect != imperfect or f"{scheme}/mean_aoi" not in child:
                continue
            row = {"axis": axis, "value": child[axis], "variant": label, "exact": child.get(f"{scheme}/analysis_exact", 0.0) == 1.0}
            for metric in METRICS:
                row[metric] = (child[f"{scheme}/{metric}"], child[f"{scheme}/{metric}_ci"], child[f"{scheme}/{metric}_analysis"])
            rows.append(row)
    return rows


def _claim_rows(points: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys((p["axis"], p["value"]) for p in points))
    at = {(p["axis"], p["value"], p["variant"]): p for p in points}
    out = []
    for sic in ("SIC, perfect CSI", "SIC, imperfect CSI"):
        for other in ("slotted ALOHA", "threshold ALOHA"):
            pairs = [(at[(*k, sic)], at[(*k, other)]) for k in keys if (*k, sic) in at and (*k, other) in at]
            wins = {
                "better AoI": sum(a["mean_aoi"][0] < b["mean_aoi"][0] for a, b in pairs),
                "better throughput": sum(a["throughput"][0] > b["throughput"][0] for a, b in pairs),
                "better P(Δ > D)": sum(a["p_age_violation"][0] < b["p_age_violation"][0] for a, b in pairs),
            }
            out.append(
                {
                    "SIC variant": sic,
                    "vs": other,
                    **{k: f"{v}/{len(pairs)}" for k, v in wins.items()},
                    "holds everywhere": bool(pairs) and all(v == len(pairs) for v in wins.values()),
                }
            )
    return out


def _agreement_rows(points: list[dict]) -> list[dict]:
    out = []
    for kind, exact in (("exact", True), ("mean-field (threshold ALOHA)", False)):
        checks = [
            abs(sim - analysis) <= half
            for p in points
            if p["exact"] == exact
            for sim, half, analysis in (p[m] for m in METRICS)
            if np.isfinite(half)
        ]
        if checks:
            out.append({"analysis": kind, "comparisons": len(checks), "inside CI": sum(checks), "fraction": sum(checks) / len(checks)})
    return out


def _figure(points: list[dict], cfg: DictConfig, residual: float):
    plt = pyplot()
    axes = [a for a in AXES if any(p["axis"] == a for p in points)]
    fig, grid = plt.subplots(len(axes), 3, figsize=(14, 3.7 * len(axes)), squeeze=False)
    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r, axis in enumerate(axes):
        for c, (metric, ylabel, scale) in enumerate(PLOTTED):
            ax = grid[r][c]
            for label in VARIANTS:
                pts = sorted((p for p in points if p["axis"] == axis and p["variant"] == label), key=lambda p: p["value"])
                x = [p["value"] for p in pts]
                ax.plot(
                    x, [p[metric][2] for p in pts], color=colors[label], label=label, linestyle="-" if pts and pts[0]["exact"] else "--"
                )
                ax.errorbar(
                    x, [p[metric][0] for p in pts], yerr=[p[metric][1] for p in pts], fmt="o", color=colors[label], markersize=4, capsize=2
                )
            ax.set(xlabel=AXES[axis], ylabel=ylabel, yscale=scale)
            ax.grid(alpha=0.3)
    grid[0][0].legend(fontsize=8)
    fig.suptitle(
        f"SIC-aided slotted ALOHA (γ={cfg.sim.threshold}, D={cfg.sim.deadline}, imperfect CSI ε={residual}): "
        "lines analysis (dashed: mean-field), markers simulation ± CI",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def claims(children: list[dict], cfg: DictConfig, tracker: Tracker | None) -> str:
    """The paper's claim (SIC better than slotted ALOHA and threshold ALOHA on all three metrics, with perfect and
    imperfect CSI) counted over the sweep's points, the analysis inside the simulation's CI, and the 3×3 figure."""
    residual = float(cfg.reproduce.imperfect_csi_residual)
    points = _points(children, residual)
    confidence = round(100 * cfg.sim.confidence)
    claim = markdown_table(
        _claim_rows(points),
        title="Paper's claim: SIC improves AoI, throughput and deadline violation "
        "over slotted ALOHA and threshold ALOHA (simulation means)",
    )
    agreement = markdown_table(
        _agreement_rows(points), title=f"Analysis inside the simulation's {confidence}% CI (4 metrics per point and variant)"
    )
    parts = [claim, agreement]
    if tracker is not None:
        tracker.log_text(claim, "tables/claims.md")
        tracker.log_text(agreement, "tables/agreement.md")
        import matplotlib.pyplot as plt

        fig = _figure(points, cfg, residual)
        tracker.log_figure(fig, "figures/aoi_throughput_violation.png")
        plt.close(fig)
        parts.append("Figure: figures/aoi_throughput_violation.png on the parent run (lines: analysis; markers: simulation ± CI).")
    return "\n\n".join(parts)
