"""``lightyard reproduce hog_gcn`` (homophily sweep on CSBM graphs, or Table 2 on the real benchmarks)
and ``lightyard bench hog_gcn`` (epoch time and peak memory, sparse vs dense HOG-GCN vs GCN)."""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import DictConfig

from common.config import ConfigError, with_values
from common.memory import read_peak_rss, reset_peak_rss, run_isolated
from common.tables import markdown_table
from common.tracking import Tracker, pyplot
from pipelines.hog_gcn.data import REAL, csbm, edge_homophily, load_real
from pipelines.hog_gcn.model import dense_bytes
from pipelines.hog_gcn.module import fit_split, make_model, optimizer, training_loss

NAMES = {"hog_gcn": "HOG-GCN", "gpr_gnn": "GPR-GNN", "h2gcn": "H2GCN", "gcn": "GCN", "gat": "GAT", "mlp": "MLP"}
# Table 2 of the paper: accuracy %, mean over the ten 48/32/20 splits (± std for HOG-GCN)
PAPER = {
    "hog_gcn": {"texas": "85.17 ± 4.40", "wisconsin": "86.67 ± 3.36", "cornell": "84.32 ± 4.32", "actor": "36.82 ± 0.84",
                "cora": "87.04 ± 1.10", "citeseer": "76.15 ± 1.88", "pubmed": "88.79 ± 0.40"},
    "gpr_gnn": {"texas": "84.59", "wisconsin": "83.92", "cornell": "82.97", "actor": "36.47", "cora": "86.70", "citeseer": "75.12", "pubmed": "87.38"},
    "h2gcn": {"texas": "79.73", "wisconsin": "82.55", "cornell": "78.38", "actor": "36.71", "cora": "86.48", "citeseer": "75.56", "pubmed": "88.77"},
    "gcn": {"texas": "54.05", "wisconsin": "50.39", "cornell": "53.78", "actor": "28.78", "cora": "86.48", "citeseer": "73.58", "pubmed": "87.34"},
    "mlp": {"texas": "81.08", "wisconsin": "85.49", "cornell": "83.24", "actor": "36.58", "cora": "71.29", "citeseer": "66.96", "pubmed": "86.48"},
}


def _over_splits(cfg: DictConfig, graph, splits: int) -> tuple[float, float, float]:
    """(mean, std) of test accuracy at best validation over the splits, in %, and seconds per split."""
    runs = [fit_split(cfg, graph, s) for s in range(splits)]
    acc = [100 * r["test_acc"] for r in runs]
    return statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0, statistics.mean(r["seconds"] for r in runs)


def reproduce(cfg: DictConfig, tracker: Tracker) -> None:
    if cfg.reproduce.data == "generated":
        _reproduce_generated(cfg, tracker)
    elif cfg.reproduce.data == "real":
        _reproduce_real(cfg, tracker)
    else:
        raise ConfigError(f"reproduce.data must be generated or real, got '{cfg.reproduce.data}'")


def _reproduce_generated(cfg: DictConfig, tracker: Tracker) -> None:
    d, r = cfg.data, cfg.reproduce
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in r.models}
    rows, measured = [], []
    for h in r.homophily:
        graph = csbm(d.nodes, d.classes, d.degree, float(h), d.features, d.signal, cfg.seed)
        measured.append(edge_homophily(graph.edge_index, graph.y))
        row = {"target h": float(h), "measured h": measured[-1]}
        for m in r.models:
            mean, std, seconds = _over_splits(with_values(cfg, {"model.name": m}), graph, r.splits)
            results[m].append((mean, std))
            row[NAMES[m]] = f"{mean:.1f} ± {std:.1f}"
            tracker.log_metrics({f"acc/{m}": mean}, step=int(round(100 * float(h))))
            print(f"h={h} {NAMES[m]:8s} {mean:5.1f} ± {std:4.1f}  ({seconds:.1f} s/split)", flush=True)
        rows.append(row)
    title = f"Test accuracy % at best validation, mean ± std over {r.splits} splits (48/32/20), CSBM n={d.nodes}, C={d.classes}, degree {d.degree}"
    print(tracker.log_table(rows, "tables/homophily_sweep.md", title=title))
    tracker.log_figure(_sweep_figure(measured, results), "figures/accuracy_vs_homophily.png")
    low, high = rows[0], rows[-1]
    best_high = max(results[m][-1][0] for m in r.models)
    claim = [{"claim": "HOG-GCN beats GCN at the lowest homophily", "h": low["measured h"], "HOG-GCN": low.get("HOG-GCN"), "GCN": low.get("GCN"),
              "holds": results["hog_gcn"][0][0] > results["gcn"][0][0] + results["gcn"][0][1] if "gcn" in results and "hog_gcn" in results else None},
             {"claim": "HOG-GCN within 2 points of the best at the highest homophily", "h": high["measured h"], "HOG-GCN": high.get("HOG-GCN"),
              "best": f"{best_high:.1f}", "holds": results["hog_gcn"][-1][0] >= best_high - 2 if "hog_gcn" in results else None}]
    print(tracker.log_table(claim, "tables/claims.md", title="The paper's claim on the sweep"))


def _sweep_figure(measured, results):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, values in results.items():
        mean = [v[0] for v in values]
        std = [v[1] for v in values]
        ax.errorbar(measured, mean, yerr=std, marker="o", capsize=3, label=NAMES[m], linewidth=2.5 if m == "hog_gcn" else 1.2)
    ax.set(xlabel="edge homophily", ylabel="test accuracy % (mean ± std over splits)", title="Accuracy vs homophily (CSBM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _reproduce_real(cfg: DictConfig, tracker: Tracker) -> None:
    r = cfg.reproduce
    if not r.root:
        raise ConfigError("reproduce data=real needs root=<folder> (for example ../shared/data/graphs)")
    table: dict[str, dict[str, str]] = {m: {} for m in r.models}
    found = []
    for name in r.datasets:
        if name not in REAL:
            raise ConfigError(f"unknown dataset '{name}' in reproduce.datasets; valid: {', '.join(REAL)}")
        try:
            graph = load_real(name, r.root, cfg.paths.cache_dir)
        except ConfigError as err:
            print(f"skipped {name}: {err}", flush=True)
            continue
        found.append(name)
        settings = r.settings.get(name, {})
        print(f"{name}: {graph.num_nodes} nodes, {graph.edge_index.shape[1] // 2} edges, edge homophily "
              f"{edge_homophily(graph.edge_index, graph.y):.2f}", flush=True)
        for m in r.models:
            run_cfg = with_values(cfg, {"model.name": m, **{f"optim.{k}": v for k, v in settings.items()}})
            mean, std, seconds = _over_splits(run_cfg, graph, min(r.splits, graph.train_mask.shape[1]))
            table[m][name] = f"{mean:.2f} ± {std:.2f}"
            tracker.log_metrics({f"acc/{name}/{m}": mean})
            print(f"  {NAMES[m]:8s} {mean:6.2f} ± {std:5.2f}  ({seconds:.1f} s/split)", flush=True)
    rows = []
    for m in r.models:
        rows.append({"method": NAMES[m], **{n: table[m].get(n) for n in found}})
        if m in PAPER:
            rows.append({"method": f"  paper {NAMES[m]}", **{n: PAPER[m].get(n) for n in found}})
    print(tracker.log_table(rows, "tables/table2.md", title="Table 2 layout: accuracy %, mean ± std over the ten Geom-GCN splits (ours) beside the paper"))


# -- bench --------------------------------------------------------------------------------------
def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return read_peak_rss() / 2**20


def _reset_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak_rss()
    return read_peak_rss() / 2**20


def _time_epochs(cfg: DictConfig, graph, device: torch.device, epochs: int) -> dict[str, float]:
    """On CPU in a fresh process (see common.memory.run_isolated), so that peak RSS is this model's own."""
    if device.type == "cpu":
        return run_isolated(_time_epochs_here, cfg, graph, device, epochs)
    return _time_epochs_here(cfg, graph, device, epochs)


def _time_epochs_here(cfg: DictConfig, graph, device: torch.device, epochs: int) -> dict[str, float]:
    baseline = _reset_peak(device)
    start = time.perf_counter()
    model = make_model(cfg, graph).to(device)
    build = time.perf_counter() - start
    opt = optimizer(cfg, model)
    generator = torch.Generator().manual_seed(0)
    times = []
    for epoch in range(epochs + 1):  # the first epoch warms up (allocations, caches)
        start = time.perf_counter()
        opt.zero_grad()
        training_loss(model, graph, epoch, cfg, generator)["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    support = getattr(model, "support_edges", graph.edge_index.shape[1] + graph.num_nodes)
    return {"epoch s": statistics.median(times[1:]), "build s": build, "peak MB": _peak_mb(device),
            "peak above start MB": _peak_mb(device) - baseline, "edges used": support}


def bench(cfg: DictConfig, tracker: Tracker) -> None:
    """Epoch time and peak memory on CSBM graphs (mean degree ``bench.degree``), ratios to GCN in the same run."""
    b = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu")
    budget = b.dense_budget_gb * 2**30
    base = with_values(cfg, {"model.hidden": b.hidden, "model.hog.hidden": [b.hidden], "model.hog.mlp_hidden": b.hidden})
    rows = []
    for n in b.sizes:
        graph = csbm(int(n), cfg.data.classes, b.degree, cfg.data.homophily, cfg.data.features, cfg.data.signal, cfg.seed)
        graph.train_mask, graph.val_mask, graph.test_mask = (graph[k][:, 0] for k in ("train_mask", "val_mask", "test_mask"))
        graph = graph.to(device)
        gcn = _time_epochs(with_values(base, {"model.name": "gcn"}), graph, device, b.epochs)
        variants = [("GCN", gcn), ("HOG-GCN sparse", _time_epochs(with_values(base, {"model.name": "hog_gcn"}), graph, device, b.epochs))]
        need = dense_bytes(int(n), 2)
        if need <= budget:
            variants.append(("HOG-GCN dense", _time_epochs(with_values(base, {"model.name": "hog_gcn", "model.hog.dense": True}), graph, device, b.epochs)))
        else:
            variants.append(("HOG-GCN dense", {"skipped": f"needs ≥ {need / 2**30:.1f} GiB > budget {b.dense_budget_gb} GiB"}))
        for name, result in variants:
            row = {"nodes": int(n), "model": name, **result}
            if "epoch s" in result:
                row["× GCN time"] = result["epoch s"] / gcn["epoch s"]
                row["× GCN memory"] = result["peak above start MB"] / max(gcn["peak above start MB"], 1e-9)
                tracker.log_metrics({f"bench/{name.replace(' ', '_')}/epoch_s": result["epoch s"]}, step=int(n))
            rows.append(row)
            print(markdown_table([row]), flush=True)
    title = (f"Training epoch (forward, backward, Adam step) on CSBM graphs, mean degree {b.degree}, hidden {b.hidden}, {device.type}"
             f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; target: sparse HOG-GCN on 100k nodes within 5× of GCN's epoch")
    print(tracker.log_table(rows, "tables/bench.md", title=title))
