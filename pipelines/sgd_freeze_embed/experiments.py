"""One grid point of each sgd_freeze_embed experiment (the grids and tables are in conf/sgd_freeze_embed.yaml).

The reproduce children are ordinary ``lightyard train`` runs of the FineTuneModule (model selection on ID
validation is the report's ``select``); here are only ``memory_point``, one bench point (all optimizers on
one model, ratios within the run), and ``beside_paper``, the average over the tasks next to the paper's."""

from __future__ import annotations

import gc
import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf

from common.config import ConfigError, with_values
from common.freezing import freeze
from common.hardware import resolve_accelerator
from common.models import check_timm_name
from common.memory import MB, memory_ledger, read_peak_rss, reset_peak_rss, run_isolated
from common.tables import markdown_table
from common.tracking import Tracker
from pipelines.sgd_freeze_embed.model import (
    Classifier,
    create_backbone,
    embedding_patterns,
    family,
    make_optimizer,
)

# bench name → (optim.name, momentum)
BENCH_OPTIMIZERS = {
    "adamw": ("adamw", 0.0),
    "sgd_momentum": ("sgd", 0.9),
    "sgd": ("sgd", 0.0),
    "sgd_freeze_embed": ("sgd_freeze_embed", 0.9),
}


def _step_state(cfg: DictConfig, opt_key: str, device: torch.device, precision: str) -> dict:
    """Build ``bench.model`` (timm defaults), take two training steps, return the ledger and the step's peak memory."""
    b = cfg.bench
    name, momentum = BENCH_OPTIMIZERS[opt_key]
    m = with_values(cfg, {"model.name": b.model, "model.kwargs": {}, "model.pretrained": False, "model.checkpoint": None}).model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        gc.collect()
        reset_peak_rss()
        start = read_peak_rss()
    backbone = create_backbone(m)
    model = Classifier(backbone, 10, (0.5,) * 3, (0.5,) * 3).to(device)
    if name.endswith("_freeze_embed"):
        freeze(model, embedding_patterns(m, family(backbone, m.family)))
    opt, _ = make_optimizer(OmegaConf.create({"name": name, "lr": 1e-4, "momentum": momentum, "weight_decay": 0.0}), model, 1)
    x = torch.rand(b.batch_size, 3, b.image_size, b.image_size, device=device)
    y = torch.randint(0, 10, (b.batch_size,), device=device)
    tic = time.perf_counter()
    for _ in range(2):  # the second step holds every state tensor (momentum / Adam moments exist from step 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # grads stay allocated, as between steps of a training loop
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        peak = read_peak_rss() - start
    ledger = memory_ledger(model, [opt])
    ledger["seconds_2_steps"] = time.perf_counter() - tic
    ledger["peak_bytes"] = peak
    return ledger


def check_memory_bench(b: DictConfig) -> None:
    """A memory-bench point's model and optimizer names (the module's check_config calls this before the parent opens)."""
    check_timm_name(b.model)
    unknown = [name for name in b.optimizers if name not in BENCH_OPTIMIZERS]
    if unknown:
        raise ConfigError(f"unknown bench.optimizers {', '.join(unknown)}; valid: {', '.join(BENCH_OPTIMIZERS)}")


def memory_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Every optimizer of ``bench.optimizers`` on ``bench.model``: bytes per trainable parameter, training-state MB,
    peak memory of the step, and both as ratios to the first optimizer (AdamW), all measured in this run."""
    b = cfg.bench
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    precision = b.precision if b.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32")
    out: dict[str, float] = {}
    baseline = None
    for opt_key in b.optimizers:
        # on CPU a fresh process per optimizer: memory freed by one measurement would hide the next one's growth
        led = (
            run_isolated(_step_state, cfg, opt_key, device, precision)
            if device.type == "cpu"
            else _step_state(cfg, opt_key, device, precision)
        )
        state = led["param_bytes"] + led["grad_bytes"] + led["optimizer_state_bytes"]
        baseline = baseline or (state, max(led["peak_bytes"], 1))
        out.update(
            {
                f"{opt_key}/trainable_m": led["trainable_params"] / 1e6,
                f"{opt_key}/bytes_per_param": led["bytes_per_trainable_param"],
                f"{opt_key}/state_mb": state / MB,
                f"{opt_key}/optimizer_state_mb": led["optimizer_state_bytes"] / MB,
                f"{opt_key}/peak_mb": led["peak_bytes"] / MB,
                f"{opt_key}/seconds_2_steps": led["seconds_2_steps"],
                f"{opt_key}/state_x_adamw": state / baseline[0],
                f"{opt_key}/peak_x_adamw": led["peak_bytes"] / baseline[1],
            }
        )
        print(f"{b.model} {opt_key}: {led['bytes_per_trainable_param']:.0f} B/param, peak {led['peak_bytes'] / MB:.0f} MB", flush=True)
        gc.collect()
    return out


def beside_paper(children: list[dict], cfg: DictConfig, tracker: Tracker | None) -> str:
    """ID test / OOD test averaged over the tasks, each task at its own chosen lr (as the paper averages its
    benchmarks), with the paper's averages over its five benchmarks below."""
    optimizers = list(dict.fromkeys(c["optim.name"] for c in children))
    tasks = list(dict.fromkeys(str(c["data.name"]) for c in children))
    row = {"model": f"ours: {cfg.model.name} (tasks: {', '.join(tasks)})"}
    for name in optimizers:
        per_task = []
        for task in tasks:
            runs = [c for c in children if c["optim.name"] == name and str(c.get("data.name")) == task and "best/val_acc" in c]
            by_lr: dict[float, list[dict]] = {}
            for c in runs:
                by_lr.setdefault(c["optim.lr"], []).append(c)
            if by_lr:
                chosen = max(by_lr.values(), key=lambda g: statistics.mean(c["best/val_acc"] for c in g))
                per_task.append([statistics.mean(100 * c[k] for c in chosen) for k in ("best/test_acc", "best/ood_test_acc")])
        row[name] = " / ".join(f"{statistics.mean(v):.1f}" for v in zip(*per_task)) if per_task else "–"
    paper = OmegaConf.to_container(cfg.reproduce.paper)
    rows = [row] + [{"model": f"paper: {model}", **{name: values.get(name, "–") for name in optimizers}} for model, values in paper.items()]
    table = markdown_table(rows, title="ID test / OOD test accuracy %, averaged over the tasks (ours) and over the paper's five benchmarks")
    if tracker is not None:
        tracker.log_text(table, "tables/beside_paper.md")
    return table


def overhead_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Training steps/s of the Lightning loop (FineTuneModule under a Trainer) against a hand loop of the same step
    (the next batch of the same loader, forward, cross-entropy, backward, optimizer step; the schedule stepped each
    epoch), training only (no evaluation, no diagnostic), step by step in turn (``InterleavedSteps``) for
    ``bench.repeats`` fits after a warm-up fit; each side's speed is its median step."""
    import copy

    import lightning.pytorch as pl
    from torch.nn import functional as F

    from common.callbacks import InterleavedSteps
    from common.hardware import trainer_kwargs
    from pipelines.sgd_freeze_embed.data import ShiftDataModule
    from pipelines.sgd_freeze_embed.module import FineTuneModule

    def hand_loop(model: torch.nn.Module):
        opt, schedule = make_optimizer(cfg.optim, model, cfg.trainer.max_epochs)
        model.train()
        while True:
            for x, y, _ in data.train_dataloader():
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                yield
            schedule.step()

    cfg = with_values(cfg, {"diagnostic.enabled": False})
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    kwargs, _ = trainer_kwargs(cfg.trainer)
    kwargs.update(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=1.0,  # the hand loop runs whole epochs
        **InterleavedSteps.SAME_STEP,
    )
    data = ShiftDataModule(cfg)
    data.setup("fit")
    warm = FineTuneModule(cfg)
    pl.Trainer(**kwargs).fit(warm, datamodule=data)  # warms up (stage-1 cache, allocator, kernels); builds the hand's model
    rounds = []
    for _ in range(int(cfg.bench.repeats)):
        rounds.append(InterleavedSteps(hand_loop(copy.deepcopy(warm.model).to(device))))
        pl.Trainer(**kwargs, callbacks=[rounds[-1]]).fit(FineTuneModule(cfg), datamodule=data)
    return {**InterleavedSteps.summary(rounds), "torch_threads": float(torch.get_num_threads())}
