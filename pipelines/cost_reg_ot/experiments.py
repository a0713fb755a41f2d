"""``lightyard reproduce cost_reg_ot`` and ``lightyard bench cost_reg_ot``."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from common.config import ConfigError, with_values
from common.tables import markdown_table
from common.tracking import Tracker, pyplot
from pipelines.cost_reg_ot.data import PairedData, build_pair, load_scot, multiomics_pair, planted_pair, preprocess
from pipelines.cost_reg_ot.model import gromov_baseline, solve
from pipelines.cost_reg_ot.module import evaluate

# the real pairs of ../shared/data/singlecell in SCOT's layout: (folder, X, Y, X labels, Y labels, normalise rows)
REAL = {
    "scGEM": ("scGEM", "scGEM_expression.csv", "scGEM_methylation.csv", "scGEM_typeExpression.txt", "scGEM_typeMethylation.txt", False),
    "SNARE-seq": ("SNARE", "SNAREseq_atac_feat.npy", "SNAREseq_rna_feat.npy", "SNAREseq_atac_types.txt", "SNAREseq_rna_types.txt", True),
}


def _datasets(cfg: DictConfig) -> list[PairedData]:
    d = cfg.data
    pairs = [preprocess(planted_pair(d.n, d.informative, d.nuisance, d.dy, d.extra_nonzeros, d.clusters, d.noise, cfg.seed), True, False, True),
             preprocess(multiomics_pair(d.n, d.latent, d.dx, d.dy, d.clusters, 0.1, cfg.seed), True, False, True)]
    if cfg.reproduce.real_root:
        for name, (folder, xf, yf, xl, yl, rows) in REAL.items():
            pair = load_scot(Path(cfg.reproduce.real_root) / folder, xf, yf, xl, yl, name)
            pairs.append(preprocess(pair, True, rows, True))
    return pairs


def reproduce(cfg: DictConfig, tracker: Tracker) -> None:
    """FOSCTTM, label transfer and sparsity for none / ℓ1 / ℓ1,2 / low-rank against entropic GW and GW."""
    s = cfg.solver
    rows, maps, truth = [], {}, None
    for data in _datasets(cfg):
        if data.true_map is not None:
            truth = data.true_map.abs()
        for regularizer, lam in cfg.reproduce.lams.items():
            sol = solve(data.X, data.Y, eps=s.eps, regularizer=regularizer, lam=float(lam), rank=cfg.reproduce.rank,
                        max_iter=s.max_iter, tol=s.tol, patience=s.patience, sinkhorn_iter=s.sinkhorn_iter)
            label = f"cost-reg. OT, {regularizer}" + (f" λ={lam}" if lam else "") + (f" r={cfg.reproduce.rank}" if regularizer == "lowrank" else "")
            rows.append({"data": data.name, "method": label, **evaluate(data, sol.P, sol.M, cfg.evaluation.knn),
                         "iterations": sol.iterations, "seconds": sol.seconds})
            if data.true_map is not None:
                maps[label] = sol.M.abs()
        for method in ("entropic_gw", "gw"):
            P, seconds = gromov_baseline(data.X, data.Y, method, eps=cfg.reproduce.gw_eps)
            rows.append({"data": data.name, "method": f"{method} (POT" + (f", ε={cfg.reproduce.gw_eps})" if method == "entropic_gw" else ")"),
                         **evaluate(data, P, None, cfg.evaluation.knn), "seconds": seconds})
        print(f"done: {data.name}", flush=True)
    table = tracker.log_table(rows, "tables/reproduce.md", title="Cost-regularized OT vs GW (FOSCTTM ↓, label transfer ↑)")
    tracker.log_figure(_heatmaps(truth, maps), "figures/recovered_maps.png")
    print(table)
    if cfg.reproduce.real_root and cfg.reproduce.reference_scgem.penalties:
        _reference_scgem(cfg, tracker)


# the reference code's scGEM notebook: share of exactly-zero entries of M after 100 iterations
REFERENCE_ZEROS = {("none", 0.0): 5.88, ("l12", 7.5): 67.6, ("l1", 1.5): 71.4, ("l1", 2.0): 84.2}


def _reference_scgem(cfg: DictConfig, tracker: Tracker) -> None:
    """scGEM in the reference code's setting (centred, unscaled; ε, iterations, Sinkhorn threshold and
    λ from its config): sparsity of M against its notebook, and label transfer per outer iteration."""
    r = cfg.reproduce.reference_scgem
    folder, xf, yf, xl, yl, _ = REAL["scGEM"]
    data = preprocess(load_scot(Path(cfg.reproduce.real_root) / folder, xf, yf, xl, yl, "scGEM"), True, False, False)
    rows, curves = [], {}
    for regularizer, lam in r.penalties:
        curve = curves.setdefault(f"{regularizer} λ={lam}" if lam else regularizer, [])
        sol = solve(data.X, data.Y, eps=r.eps, regularizer=regularizer, lam=float(lam), max_iter=r.iterations, tol=0.0,
                    patience=r.iterations, sinkhorn_iter=r.sinkhorn_iter, sinkhorn_tol=r.sinkhorn_tol,
                    on_iteration=lambda M, P: curve.append(evaluate(data, P, None, cfg.evaluation.knn)["label_transfer"]))
        metrics = evaluate(data, sol.P, sol.M, cfg.evaluation.knn)
        rows.append({"penalty": regularizer, "λ": float(lam), "zero entries of M %": 100 * metrics["zero_fraction"],
                     "reference notebook %": REFERENCE_ZEROS.get((regularizer, float(lam))), "FOSCTTM": metrics["foscttm"],
                     "label transfer": metrics["label_transfer"], "seconds": sol.seconds})
        print(markdown_table(rows[-1:]), flush=True)
    print(tracker.log_table(rows, "tables/scgem_reference_setting.md",
                            title=f"scGEM, reference-code setting (centred, unscaled, ε={r.eps}, {r.iterations} iterations)"))
    tracker.log_figure(_curves(curves), "figures/scgem_label_transfer_per_iteration.png")


def _curves(curves: dict[str, list[float]]):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set(xlabel="outer iteration", ylabel="label transfer (5-NN)", title="scGEM: label transfer per iteration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _heatmaps(truth, maps):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 2.8))
    for ax, (title, matrix) in zip(axes, [("planted |M*|", truth), *maps.items()]):
        ax.imshow(matrix.numpy(), cmap="viridis")
        ax.set(title=title, xlabel="source feature", ylabel="target feature")
        ax.title.set_fontsize(8)
    fig.suptitle("Recovered maps on the planted pair (informative source features: the first columns)", fontsize=9)
    fig.tight_layout()
    return fig


def bench(cfg: DictConfig, tracker: Tracker) -> None:
    """Time to the objective tolerance, cost-regularized OT vs POT's entropic GW, same data, same run."""
    s = cfg.solver
    if cfg.data.source not in ("planted", "multiomics"):
        raise ConfigError(f"bench generates its pairs: data.source must be planted or multiomics, got '{cfg.data.source}'")
    rows = []
    for n in cfg.bench.sizes:
        data = build_pair(with_values(cfg, {"data.n": int(n)}))
        start = time.perf_counter()
        sol = solve(data.X, data.Y, eps=s.eps, regularizer="none", max_iter=s.max_iter, tol=cfg.bench.tol, patience=s.patience)
        ours = time.perf_counter() - start
        P, theirs = gromov_baseline(data.X, data.Y, "entropic_gw", eps=cfg.reproduce.gw_eps, tol=cfg.bench.tol)
        rows.append({"data": data.name, "n": int(n), "cost-reg. OT s": ours, "entropic GW s": theirs, "speed-up": theirs / ours,
                     "FOSCTTM ours": evaluate(data, sol.P, None, 5)["foscttm"], "FOSCTTM entropic GW": evaluate(data, P, None, 5)["foscttm"]})
        tracker.log_metrics({"bench/speedup": theirs / ours}, step=int(n))
        print(markdown_table(rows[-1:]), flush=True)
    print(tracker.log_table(rows, "tables/bench.md", title="Time to tolerance (target: faster than entropic GW at every n, FOSCTTM equal or better)"))
