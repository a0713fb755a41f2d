"""The bench's grid point and the reproduce report's heatmap panels (grids and tables: conf/input_iba.yaml).

The reproduce children are ordinary ``lightyard train`` runs, one attribution method each (the classifier of a seed
is trained once and shared through the cache). ``speed_point`` times every method on the same images in one run, and
InputIBA on ``bench.images`` images at once (one bottleneck per image, one optimisation) against one image at a time,
with the heatmaps of both compared."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from common.hardware import resolve_accelerator, timed
from common.tracking import Tracker
from pipelines.input_iba.data import load_task, normalize
from pipelines.input_iba.model import METHODS, Explainer, LatentHook, LatentStats, estimate_stats
from pipelines.input_iba.module import (
    InputIBAExperiment,
    attribute_all,
    attribution_images,
    classifier_stage,
    latent_batches,
    panel_figure,
    settings,
)


def classifier_speedup(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, device: torch.device) -> float:
    """One forward and backward of the classifier on the bench images at once against one image at a time (fastest of
    ``repeats`` interleaved rounds): the issue's reference figure, the gain a method gets where each image alone is a
    batch of one. InputIBA's images are not: each already runs ``iba.copies`` noise copies and the WGAN's latent
    samples per step (README)."""

    def step(i: int, batch: int) -> None:
        inputs = x[i : i + batch].detach().requires_grad_(True)
        model(inputs).gather(1, y[i : i + batch, None]).sum().backward()

    def run(batch: int) -> None:
        for i in range(0, len(x), batch):
            step(i, batch)

    was_training = model.training
    model.eval()
    try:
        run(len(x)), run(1)  # warm-up
        best = {len(x): float("inf"), 1: float("inf")}
        for _ in range(max(repeats, 1)):
            for batch in best:
                best[batch] = min(best[batch], timed(lambda b=batch: run(b), device)[0])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return best[1] / best[len(x)]


def speed_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Seconds per image of each method; InputIBA batched vs one by one (fastest of ``bench.repeats`` interleaved
    rounds), their images/s ratio and the largest heatmap difference (target ≥ 5× on CPU, ≥ 10× on a GPU, atol 1e-4)."""
    InputIBAExperiment.check_config(cfg)
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    task = load_task(cfg)
    model, _ = classifier_stage(cfg, task, device)
    images, y, _, ids = attribution_images(cfg, task, model, device, count=int(cfg.bench.images))
    y = y.to(device)
    x = normalize(images.to(device), cfg.data.mean, cfg.data.std)
    hook = LatentHook(model, cfg.iba.layer)
    stats = estimate_stats(latent_batches(hook, task.estimation.images, cfg, device), cfg.iba.min_std)
    hook.remove()
    explainer = Explainer(model, cfg.iba.layer, stats, settings(cfg), seed=int(cfg.seed))
    n = len(x)
    out: dict[str, float] = {}
    try:
        for method in METHODS[:-1]:
            attribute_all(explainer, method, x[:1], y[:1], ids[:1], 1)  # warm-up
            seconds, _ = timed(lambda m=method: attribute_all(explainer, m, x, y, ids, n), device)
            out[f"{method}_s_per_image"] = seconds / n
        best = {"batched": float("inf"), "loop": float("inf")}
        maps = {}
        for _ in range(int(cfg.bench.repeats)):
            for mode, batch in (("batched", n), ("loop", 1)):
                seconds, maps[mode] = timed(lambda b=batch: attribute_all(explainer, "input_iba", x, y, ids, b), device)
                best[mode] = min(best[mode], seconds)
    finally:
        explainer.close()
    out["classifier_speedup"] = classifier_speedup(model, x, y, int(cfg.bench.repeats), device)
    k = min(int(cfg.bench.float64_images), n)
    if k:  # the same comparison in float64, where float32's batch-size-dependent rounding cannot be amplified (README)
        exact = Explainer(
            copy.deepcopy(model).double(),
            cfg.iba.layer,
            LatentStats(stats.mean.double(), stats.std.double(), stats.active.double()),
            settings(cfg),
            seed=int(cfg.seed),
        )
        try:
            together = attribute_all(exact, "input_iba", x[:k].double(), y[:k], ids[:k], k)
            alone = attribute_all(exact, "input_iba", x[:k].double(), y[:k], ids[:k], 1)
        finally:
            exact.close()
        out["max_abs_heatmap_difference_float64"] = float((together - alone).abs().max())
    out.update(
        input_iba_batched_s_per_image=best["batched"] / n,
        input_iba_loop_s_per_image=best["loop"] / n,
        batched_speedup=best["loop"] / best["batched"],
        max_abs_heatmap_difference=float((maps["batched"] - maps["loop"]).abs().max()),
        bench_images=float(n),
        torch_threads=float(torch.get_num_threads()),
    )
    print(
        f"InputIBA on {n} images: batched {n / best['batched']:.2f} img/s, one by one {n / best['loop']:.2f} img/s "
        f"({out['batched_speedup']:.2f}×; the classifier's forward+backward alone {out['classifier_speedup']:.2f}×), max |Δheatmap| {out['max_abs_heatmap_difference']:.2e} in float32, "
        f"{out.get('max_abs_heatmap_difference_float64', float('nan')):.2e} in float64 ({k} images)",
        flush=True,
    )
    return out


def heatmap_panels(children: list[dict], cfg: DictConfig, tracker: Tracker) -> str:
    """One panel (image, evidence, every method) from the children of the first seed, logged to the parent run."""
    if not children:
        return ""
    seed = min(c.get("seed", 0) for c in children)
    maps, first = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for child in sorted((c for c in children if c.get("seed", 0) == seed), key=lambda c: c["_index"]):
            try:
                path = tracker.client.download_artifacts(child["_run_id"], "heatmaps.pt", tmp)
            except Exception:
                continue
            saved = torch.load(path, weights_only=True)
            first = first or saved
            maps.update(saved["heatmaps"])
            Path(path).unlink()  # the next child's file has the same name
    if first is None:
        return ""
    order = [m for m in METHODS if m in maps]
    fig = panel_figure(
        first["images"],
        first["evidence"],
        {m: maps[m] for m in order},
        f"{first.get('dataset') or cfg.experiment or cfg.data.name}, classifier seed {seed}",
    )
    tracker.log_figure(fig, "figures/heatmaps.png")
    return f"Figure: figures/heatmaps.png on the parent run (image{', evidence' if first['evidence'] is not None else ''}, {', '.join(order)}; seed {seed})."
