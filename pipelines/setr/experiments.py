"""One grid point of the setr bench, and the reproduce report's extra section (the grids and tables are in conf/setr.yaml).

The reproduce children are ordinary ``lightyard train`` runs of :class:`SETRModule`; ``bench_point`` measures one
decoder: training images/s and peak memory (a fresh process on CPU), and sliding-window inference with all windows
batched against window by window on the same images in this run (identical logits required)."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf

from common.hardware import resolve_accelerator
from common.memory import MB, read_peak_rss, reset_peak_rss, run_isolated
from common.tables import markdown_table
from common.tracking import Tracker
from pipelines.setr.data import class_names
from pipelines.setr.model import build_setr, create_vit, make_optimizer, setr_loss, slide_inference, window_origins

BENCH_CLASSES = 19  # Cityscapes' trainIds


def _bench_model(cfg: DictConfig, device: torch.device):
    b = cfg.bench
    vit = create_vit(cfg.model.name, OmegaConf.to_container(b.model_kwargs), key="bench.model_kwargs")
    return build_setr(b.decoder, vit, BENCH_CLASSES, None, None, cfg.model.channels, cfg.model.head_channels).to(device)


def _start_peak(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return read_peak_rss()


def _peak_since(device: torch.device, start: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return read_peak_rss() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(cfg: DictConfig, device_type: str, threads: int) -> dict[str, float]:
    """Training steps (forward with auxiliary heads, L = CE + 0.4 Σ CE_aux, backward, SGD) at the crop size: images/s over
    ``bench.steps`` steps after one warm-up step, and the peak memory of the whole (model, optimizer, steps)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    b = cfg.bench
    torch.manual_seed(0)
    start = _start_peak(device)
    model = _bench_model(cfg, device).train()
    opt, schedule = make_optimizer(model, 0.01, 0.9, 0.0, 10.0, b.steps + 1)
    x = torch.rand(b.batch_size, 3, *b.crop, device=device)
    y = torch.randint(0, BENCH_CLASSES, (b.batch_size, *b.crop), device=device)
    autocast = device.type == "cuda"
    seconds = 0.0
    for step in range(b.steps + 1):
        _sync(device)
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits, aux = model(x, with_aux=True)
            loss = setr_loss(logits.float(), [a.float() for a in aux], y)[0]
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        schedule.step()
        _sync(device)
        if step > 0:  # step 0 warms up kernels and the allocator
            seconds += time.perf_counter() - tic
    return {"train_images_per_s": b.batch_size * b.steps / seconds, "train_peak_bytes": _peak_since(device, start)}


def batched_slide_peak(cfg: DictConfig, device_type: str, threads: int) -> int:
    """Peak memory of one batched sliding-window inference (model weights included)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_type)
    b = cfg.bench
    start = _start_peak(device)
    model = _bench_model(cfg, device).eval()
    images = torch.rand(b.images, 3, *b.image_size, device=device)
    with torch.inference_mode():
        slide_inference(model, images, tuple(b.crop), tuple(b.stride), BENCH_CLASSES, b.windows_per_forward)
    return _peak_since(device, start)


def bench_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """One decoder: training throughput and peak memory, then sliding-window inference with ``bench.windows_per_forward``
    windows per forward (0: all) against one window per forward, interleaved, on the same images and weights."""
    b = cfg.bench
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    threads = torch.get_num_threads()
    # on CPU a fresh process per measurement: memory freed by one would hide the next one's growth
    fresh = device.type == "cpu" and b.isolate  # (the smoke preset skips the process start-up: peaks then include earlier growth)
    isolate = (lambda fn, *a: run_isolated(fn, *a)) if fresh else (lambda fn, *a: fn(*a))
    out = isolate(train_speed, cfg, device.type, threads)
    out["train_peak_mb"] = out.pop("train_peak_bytes") / MB
    peak = isolate(batched_slide_peak, cfg, device.type, threads)
    if device.type == "cpu" and not fresh:  # in this process the allocator keeps what earlier work freed: no peak to read
        out["train_peak_mb"] = peak = math.nan

    torch.manual_seed(0)
    model = _bench_model(cfg, device).eval()
    images = torch.rand(b.images, 3, *b.image_size, device=device)
    slide = lambda per_forward: slide_inference(model, images, tuple(b.crop), tuple(b.stride), BENCH_CLASSES, per_forward)
    windows = len(window_origins(b.image_size[0], b.crop[0], b.stride[0])) * len(window_origins(b.image_size[1], b.crop[1], b.stride[1]))
    # the reference: the ViT encoder alone on as many windows, batched vs one by one (the issue's figure, "a forward of
    # 8 windows of timm vit_tiny at 224 px"), timed in the same rounds
    crops = torch.rand(windows * b.images, 3, *b.crop, device=device)
    chunk = b.windows_per_forward if b.windows_per_forward > 0 else len(crops)
    encode = lambda per_forward: [model.encoder(crops[i : i + per_forward]) for i in range(0, len(crops), per_forward)]  # noqa: E731
    runs = {"batched": lambda: slide(b.windows_per_forward), "single": lambda: slide(1)}
    runs.update({"vit_batched": lambda: encode(chunk), "vit_single": lambda: encode(1)})
    timings: dict[str, list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        batched, single = slide(b.windows_per_forward), slide(1)  # warm-up, and the logits compared
        encode(chunk), encode(1)
        for _ in range(b.repeats):
            for key, run in runs.items():
                _sync(device)
                tic = time.perf_counter()
                run()
                _sync(device)
                timings[key].append(time.perf_counter() - tic)
    diff = float((batched.float() - single.float()).abs().max())
    fastest = {k: min(v) for k, v in timings.items()}
    out.update(
        {
            "slide_windows": float(windows * b.images),
            "slide_batched_images_per_s": b.images / fastest["batched"],
            "slide_single_images_per_s": b.images / fastest["single"],
            "slide_speedup": fastest["single"] / fastest["batched"],
            "vit_speedup": fastest["vit_single"] / fastest["vit_batched"],
            "slide_max_abs_diff": diff,
            "slide_identical": float(diff <= 1e-5),
            "slide_batched_peak_mb": peak / MB,
            "slide_within_budget": math.nan if math.isnan(peak) else float(peak / MB <= b.memory_budget_mb),
            "torch_threads": float(threads),
        }
    )
    mb = lambda v: "n/a (bench.isolate=false)" if math.isnan(v) else f"{v:.0f} MB"  # noqa: E731
    print(
        f"{b.decoder}: train {out['train_images_per_s']:.1f} img/s, peak {mb(out['train_peak_mb'])}; sliding batched ÷ one-by-one "
        f"{out['slide_speedup']:.2f}× (the ViT encoder alone {out['vit_speedup']:.2f}×), max |Δ| {diff:.2e}, batched peak "
        f"{mb(out['slide_batched_peak_mb'])}",
        flush=True,
    )
    # not measured (bench.isolate=false): left out, not logged as NaN, which the report would mark as a failed value
    return {k: v for k, v in out.items() if not math.isnan(v)}


# -- reproduce report ---------------------------------------------------------------------------
def ordering(children: list[dict], cfg: DictConfig, tracker: Tracker | None) -> str:
    """Our decoders ranked by mean test mIoU (SS and MS), each of the paper's orderings (``reproduce.orderings``)
    checked against ours, and per-class IoU per decoder."""
    decoders = list(dict.fromkeys(str(c["model.decoder"]) for c in children))
    means: dict[str, dict[str, float]] = {}
    lines = []
    for scale, key, label in (("ss", "test/miou", "single-scale"), ("ms", "test_ms/miou", "multi-scale + flip")):
        values = {d: [c[key] for c in children if c["model.decoder"] == d and key in c] for d in decoders}
        means[scale] = {d: statistics.mean(v) for d, v in values.items() if v}
        if means[scale]:
            ranked = sorted(means[scale], key=means[scale].get, reverse=True)
            lines.append(f"- ours, {label}: {' > '.join(f'{d} {100 * means[scale][d]:.1f}' for d in ranked)}")
    orderings = OmegaConf.select(cfg, "reproduce.orderings", default=None)
    if orderings is None:  # a parent logged before the key existed: the paper's orderings are facts, take today's file
        from common.runner import compose

        orderings = compose(str(cfg.pipeline)).reproduce.orderings
    for name, spec in (OmegaConf.to_container(orderings) if orderings is not None else {}).items():
        ours = means.get(spec["scale"], {})
        order = [d for d in spec["order"] if d in ours]
        if len(order) < 2:
            continue
        holds = all(ours[a] >= ours[b] for a, b in zip(order, order[1:]))
        lines.append(f"- paper {name}: {' ≥ '.join(order)} — {'holds' if holds else 'does not hold'} in ours")
    dataset = str(OmegaConf.select(cfg, "reproduce.dataset") or cfg.data.name)
    rows = []
    for d in decoders:
        runs = [c for c in children if c["model.decoder"] == d]
        row = {"decoder": d}
        for name in class_names(dataset):
            values = [100 * c[f"test/iou/{name}"] for c in runs if f"test/iou/{name}" in c]
            row[name] = f"{statistics.mean(values):.1f}" if values else "–"
        rows.append(row)
    table = markdown_table(rows, title=f"Per-class IoU % on {dataset} (test, single-scale), mean over seeds")
    if tracker is not None:
        tracker.log_text(table, "tables/per_class.md")
    return "Ranking of the decoders by mean test mIoU, and the paper's orderings:\n\n" + "\n".join(lines) + "\n\n" + table
