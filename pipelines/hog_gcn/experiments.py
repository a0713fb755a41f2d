"""One grid point of each hog_gcn experiment (the grids, tables and figures are in conf/hog_gcn.yaml):
``fit_point`` trains one model on one split of one graph, ``bench_point`` times the models on one
graph size, ``claims`` checks the paper's claim on the homophily sweep from the children's metrics."""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import DictConfig

from common.config import flatten, with_values
from common.hardware import resolve_accelerator
from common.memory import read_peak_rss, reset_peak_rss, run_isolated
from common.report import mean_std
from common.tables import markdown_table
from common.tracking import Tracker, notice
from pipelines.hog_gcn.data import build_graph, csbm, edge_homophily
from pipelines.hog_gcn.model import dense_bytes
from pipelines.hog_gcn.module import fit_split, make_model, optimizer, split_epochs, training_loss


_GRAPHS: dict[str, tuple] = {}  # graphs built in this process, by their data settings (children share them)


def fit_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """``model.name`` on split ``data.split`` of the configured graph: test accuracy at the best validation epoch."""
    key = repr((sorted(flatten(cfg.data, "data.").items()), cfg.seed, cfg.paths.cache_dir))
    if key not in _GRAPHS:
        graph = build_graph(cfg)
        _GRAPHS.clear()
        _GRAPHS[key] = graph, edge_homophily(graph.edge_index, graph.y)
    graph, homophily = _GRAPHS[key]
    result = fit_split(cfg, graph, cfg.data.split)
    return {**result, "edge_homophily": homophily, "nodes": float(graph.num_nodes), "edges": float(graph.edge_index.shape[1] // 2)}


def claims(children: list[dict], cfg: DictConfig, tracker: Tracker | None) -> str:
    """The paper's claim on the sweep: HOG-GCN beats GCN at the lowest homophily (beyond GCN's std), and
    stays within 2 points of the best model at the highest."""
    hs = sorted({c["data.homophily"] for c in children})
    models = sorted({c["model.name"] for c in children})
    if len(hs) < 2 or not {"hog_gcn", "gcn"} <= set(models):
        return ""

    def acc(model: str, h: float) -> tuple[float, float, int]:
        return mean_std([100 * c["test_acc"] for c in children if c["model.name"] == model and c["data.homophily"] == h])

    low, high = hs[0], hs[-1]
    hog_low, gcn_low = acc("hog_gcn", low), acc("gcn", low)
    best_high = max(acc(m, high)[0] for m in models)
    rows = [
        {
            "claim": "HOG-GCN beats GCN at the lowest homophily",
            "h": low,
            "HOG-GCN": f"{hog_low[0]:.1f}",
            "other": f"GCN {gcn_low[0]:.1f} ± {gcn_low[1]:.1f}",
            "holds": hog_low[0] > gcn_low[0] + gcn_low[1],
        },
        {
            "claim": "HOG-GCN within 2 points of the best at the highest homophily",
            "h": high,
            "HOG-GCN": f"{acc('hog_gcn', high)[0]:.1f}",
            "other": f"best {best_high:.1f}",
            "holds": acc("hog_gcn", high)[0] >= best_high - 2,
        },
    ]
    table = markdown_table(rows, title="The paper's claim on the sweep")
    if tracker is not None:
        tracker.log_text(table, "tables/claims.md")
    return table


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
    return {
        "epoch s": statistics.median(times[1:]),
        "build s": build,
        "peak MB": _peak_mb(device),
        "peak above start MB": _peak_mb(device) - baseline,
        "edges used": support,
    }


def bench_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Epoch time and peak memory of GCN, sparse and dense HOG-GCN on one CSBM graph of ``bench.n`` nodes
    (mean degree ``bench.degree``), same process; the ratios to GCN are within this run."""
    b = cfg.bench
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    base = with_values(cfg, {"model.hidden": b.hidden, "model.hog.hidden": [b.hidden], "model.hog.mlp_hidden": b.hidden})
    n = int(b.n)
    graph = csbm(n, cfg.data.classes, b.degree, cfg.data.homophily, cfg.data.features, cfg.data.signal, cfg.seed)
    graph.train_mask, graph.val_mask, graph.test_mask = (graph[k][:, 0] for k in ("train_mask", "val_mask", "test_mask"))
    graph = graph.to(device)
    out: dict[str, float] = {}
    variants = {
        "gcn": {"model.name": "gcn"},
        "hog_sparse": {"model.name": "hog_gcn"},
        "hog_dense": {"model.name": "hog_gcn", "model.hog.dense": True},
    }
    for name, values in variants.items():
        if name == "hog_dense" and dense_bytes(n, 2) > b.dense_budget_gb * 2**30:
            notice(
                f"n={n}: dense HOG-GCN skipped (needs ≥ {dense_bytes(n, 2) / 2**30:.1f} GiB > bench.dense_budget_gb={b.dense_budget_gb})"
            )
            continue
        result = _time_epochs(with_values(base, values), graph, device, b.epochs)
        out.update(
            {f"{name}_epoch_s": result["epoch s"], f"{name}_peak_mb": result["peak above start MB"], f"{name}_build_s": result["build s"]}
        )
        if name != "gcn":
            out[f"{name}_x_gcn_time"] = result["epoch s"] / out["gcn_epoch_s"]
            out[f"{name}_x_gcn_memory"] = result["peak above start MB"] / max(out["gcn_peak_mb"], 1e-9)
            out["support_edges"] = float(result["edges used"])
        print(f"n={n} {name}: {result['epoch s']:.3g} s/epoch, peak {result['peak above start MB']:.0f} MB", flush=True)
    return out


def overhead_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Steps/s of the Lightning loop (HogGCNModule under a Trainer: logging, callbacks, the loops) against the hand
    loop of the same steps (``split_epochs``, reproduce's loop), step by step in turn (``InterleavedSteps``) for
    ``bench.repeats`` fits after a warm-up; each side's speed is its median step (loop after loop, one run's ratio
    swung 0.84–0.94)."""
    import lightning.pytorch as pl

    from common.callbacks import InterleavedSteps
    from common.hardware import trainer_kwargs
    from pipelines.hog_gcn.data import GraphDataModule
    from pipelines.hog_gcn.module import HogGCNModule

    cfg = with_values(cfg, dict(cfg.bench.overhead_graphs[cfg.bench.graph]))  # names checked in module.check_model
    graph = build_graph(cfg).to(resolve_accelerator(str(cfg.trainer.accelerator)))  # the hand loop on Lightning's device
    kwargs, _ = trainer_kwargs(cfg.trainer)
    kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(InterleavedSteps.SAME_STEP)
    rounds = []
    for _ in range(int(cfg.bench.repeats) + 1):  # the first round warms up (allocator, kernels, imports)
        hand = split_epochs(cfg, graph, cfg.data.split)
        next(hand)  # the hand model is built
        rounds.append(InterleavedSteps(hand))
        pl.Trainer(**kwargs, callbacks=[rounds[-1]]).fit(HogGCNModule(cfg), datamodule=GraphDataModule(cfg))
    return {
        **InterleavedSteps.summary(rounds[1:]),
        "torch_threads": float(torch.get_num_threads()),
        "nodes": float(graph.num_nodes),
        "features": float(graph.num_features),
    }
