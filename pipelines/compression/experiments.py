"""The compression bench's grid point and the reproduce report's extra section (grids and tables: conf/compression.yaml).

The reproduce children are ordinary ``lightyard train compression technique=<name>`` runs. ``latency_point`` is the issue's
latency target, in one process: a random-init timm resnet18 at 224 px, batch 1, as fp32 eager, fp32 under inductor
(freezing), torchao PT2E static int8 under inductor, 50 % of its channels removed (torch-pruning) and 50 % unstructured
sparsity, each timed in interleaved rounds so that the ratios are same-run ratios."""

from __future__ import annotations

import copy
import statistics

import torch
from omegaconf import DictConfig, OmegaConf

from common.memory import MB
from common.models import create_timm_model
from common.tables import markdown_table
from common.tracking import Tracker, pyplot, notice
from pipelines.compression.model import (
    add_masks,
    exported_bytes,
    latency,
    prune_channels,
    pt2e_static_int8,
    quiet,
    remove_masks,
    update_masks,
)
from pipelines.compression.module import compiled

# -- bench ---------------------------------------------------------------------------------------------------------------------


def latency_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    b = cfg.bench
    torch.set_num_threads(int(b.thread))
    torch.manual_seed(0)
    size = int(b.image_size)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (OmegaConf.to_container(b.kwargs) if b.kwargs else {}).items()}
    fp32 = create_timm_model(b.model, "bench.kwargs", num_classes=1000, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    calibration = [torch.randn(4, 3, size, size) for _ in range(b.calibration_batches)]
    int8 = pt2e_static_int8(copy.deepcopy(fp32), calibration)
    pruned = prune_channels(fp32, float(b.channels), x, ["fc"], key="bench.channels")
    sparse = copy.deepcopy(fp32)
    modules = add_masks(sparse)
    sparsity = update_masks(modules, float(b.sparsity))
    remove_masks(modules)
    models = {
        "fp32_eager": fp32,
        "fp32_inductor": compiled(copy.deepcopy(fp32), b.compile),
        "int8_inductor": compiled(int8, b.compile),
        "pruned_eager": pruned,
        "pruned_inductor": compiled(copy.deepcopy(pruned), b.compile),
        "sparse_eager": sparse,
        "sparse_inductor": compiled(copy.deepcopy(sparse), b.compile),
    }
    samples: dict[str, list[float]] = {k: [] for k in models}
    rounds: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad(), quiet():
        for model in models.values():  # compile (first call) and warm up
            latency(lambda m=model: m(x), torch.device("cpu"), int(b.warmup), 2)
        for _ in range(int(b.rounds)):
            for name, model in models.items():
                times = []
                for _ in range(int(b.iters)):
                    times.append(latency(lambda m=model: m(x), torch.device("cpu"), 0, 1)["p50_ms"])
                samples[name] += times
                rounds[name].append(statistics.median(times))
    out: dict[str, float] = {}
    for name, times in samples.items():
        ordered = sorted(times)
        out[f"{name}_p50_ms"] = statistics.median(times)
        out[f"{name}_p95_ms"] = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    pairs = {
        "int8_speedup": ("fp32_inductor", "int8_inductor"),
        "pruned_speedup": ("fp32_inductor", "pruned_inductor"),
        "sparse_speedup": ("fp32_inductor", "sparse_inductor"),
        "pruned_eager_speedup": ("fp32_eager", "pruned_eager"),
        "sparse_eager_speedup": ("fp32_eager", "sparse_eager"),
        "inductor_speedup": ("fp32_eager", "fp32_inductor"),
    }
    for key, (base, other) in pairs.items():
        out[key] = out[f"{base}_p50_ms"] / out[f"{other}_p50_ms"]
        per_round = [a / c for a, c in zip(rounds[base], rounds[other])]
        out[f"{key}_min"], out[f"{key}_max"] = min(per_round), max(per_round)
    sizes = {"fp32": fp32, "int8": int8, "pruned": pruned}
    for name, model in sizes.items():
        out[f"{name}_size_mb"] = len(exported_bytes(model, x)) / MB
    out["int8_size_ratio"] = out["fp32_size_mb"] / out["int8_size_mb"]
    out["pruned_params_ratio"] = sum(p.numel() for p in fp32.parameters()) / sum(p.numel() for p in pruned.parameters())
    out["sparsity"] = sparsity
    out["torch_threads"] = float(torch.get_num_threads())
    out["compiled"] = float(bool(b.compile))  # bench.compile=false: the "inductor" columns ran eager
    if not b.compile:
        notice("bench.compile=false: every 'inductor' time of this point ran eager, NOT COMPILED")
    print(
        f"{b.thread} threads: fp32 eager {out['fp32_eager_p50_ms']:.2f} ms, inductor {out['fp32_inductor_p50_ms']:.2f} ms, "
        f"int8 {out['int8_inductor_p50_ms']:.2f} ms ({out['int8_speedup']:.2f}×, size ÷{out['int8_size_ratio']:.2f}), "
        f"50 % channels {out['pruned_inductor_p50_ms']:.2f} ms ({out['pruned_speedup']:.2f}×), "
        f"50 % sparse {out['sparse_inductor_p50_ms']:.2f} ms ({out['sparse_speedup']:.2f}×)",
        flush=True,
    )
    return out


def latency_ranges(children: list[dict], cfg: DictConfig, tracker: Tracker) -> str:
    """Per thread count: each same-run ratio with its min–max over the interleaved rounds, against the issue's target."""
    targets = {
        "int8_speedup": ">= 2 (int8 vs fp32, both inductor)",
        "pruned_speedup": ">= 1.6 (50 % channels, inductor)",
        "sparse_speedup": "≈ 1: no gain expected (dense kernels)",
        "pruned_eager_speedup": "",
        "sparse_eager_speedup": "",
        "inductor_speedup": "",
    }
    rows = []
    for child in children:
        for key, target in targets.items():
            if key in child:
                rows.append(
                    {
                        "threads": int(child.get("bench.thread", 0)),
                        "ratio": key,
                        "all calls": f"{child[key]:.2f}",
                        "range over rounds": f"{child[f'{key}_min']:.2f}–{child[f'{key}_max']:.2f}",
                        "target": target,
                    }
                )
    return markdown_table(rows, title="Same-run latency ratios (p50 of the baseline ÷ p50 of the variant)")


# -- reproduce: the Pareto front and the survey's claims ---------------------------------------------------------------------------
def _means(children: list[dict]) -> dict[str, dict[str, float]]:
    by: dict[str, dict[str, list[float]]] = {}
    for child in children:
        slot = by.setdefault(str(child["compress.technique"]), {})
        for key, value in child.items():
            if isinstance(value, (int, float)) and not key.startswith("_"):
                slot.setdefault(key, []).append(float(value))
    return {t: {k: statistics.fmean(v) for k, v in metrics.items()} for t, metrics in by.items()}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, accuracy) no other point beats: lower-or-equal cost and higher-or-equal accuracy, one strictly."""
    front = []
    for name, (cost, acc) in points.items():
        dominated = any((c <= cost and a >= acc) and (c < cost or a > acc) for other, (c, a) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _figure(points: dict[str, tuple[float, float]], front: list[str], xlabel: str, title: str, logx: bool = False):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, (x, y) in points.items():
        on = name in front
        ax.scatter([x], [100 * y], color="tab:red" if on else "tab:blue", s=40 if on else 25, zorder=3)
        ax.annotate(name, (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([points[n][0] for n in front], [100 * points[n][1] for n in front], color="tab:red", lw=1, label="Pareto front")
    ax.set(xlabel=xlabel, ylabel="top-1 % (mean over seeds)", title=title)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def claims(means: dict[str, dict[str, float]]) -> list[dict]:
    """The survey's qualitative claims, each beside the number that confirms it or not."""
    base = means.get("baseline", {})
    rows = []

    def get(t: str, k: str) -> float | None:
        return means.get(t, {}).get(k)

    def add(claim: str, evidence: str, holds: bool | None) -> None:
        rows.append(
            {"survey claim": claim, "measured": evidence, "verdict": "–" if holds is None else ("confirmed" if holds else "not confirmed")}
        )

    d, r = get("int8_static", "top1_drop"), get("int8_static", "size_ratio")
    if d is not None and r is not None:
        add(
            "quantization: negligible accuracy loss, big savings",
            f"int8 static: top-1 {-100 * d:+.2f} points, size ÷{r:.2f}",
            d <= 0.01 and r >= 3.5,
        )
    # speed-ups are each child's own: the variant against the baseline in the same process (latency across processes
    # drifts by more than these effects at 32 px)
    u = get("prune_unstructured", "speedup")
    if u is not None:
        add(
            "unstructured sparsity is hard to exploit on CPUs",
            f"50 % sparse: {u:.2f}× the dense baseline's speed (same run); dense size ÷{get('prune_unstructured', 'size_ratio'):.2f}",
            u < 1.1,
        )
    s = get("prune_structured", "speedup")
    if s is not None:
        add(
            "structured pruning removes real work",
            f"50 % channels: {s:.2f}× faster (same run), top-1 {-100 * get('prune_structured', 'top1_drop'):+.2f} points (target ≥ 1.6×, ≥ −2)",
            s >= 1.6 and get("prune_structured", "top1_drop") <= 0.02,
        )
    for t, label in (("depthwise", "depthwise-separable"), ("low_rank", "low-rank (SVD)")):
        if t in means and "macs_m" in base:
            macs, drop = means[t]["macs_m"] / base["macs_m"], means[t]["top1_drop"]
            add(
                f"compact convolutions / factorisation: fewer operations at high accuracy ({label})",
                f"MACs ×{macs:.2f}, params ×{means[t]['params'] / base['params']:.2f}, top-1 {-100 * drop:+.2f} points"
                + (f", {means[t]['speedup']:.2f}× faster (same run)" if "speedup" in means[t] else ""),
                macs < 1 and drop <= 0.02,
            )
    if "nas" in means and "student" in means and "speedup" in means["nas"]:
        # the fair rival of a searched small net is a hand-scaled small net trained as long (the student), not the baseline
        n, st = means["nas"], means["student"]
        add(
            "NAS: a better small network than a hand-designed one under a device budget",
            f"winner: {100 * n['top1']:.2f} % at {n['p50_ms']:.3f} ms ({n['speedup']:.2f}× the baseline), {n['params'] / 1e6:.3f} M params; "
            f"hand-scaled student {100 * st['top1']:.2f} % ({st['params'] / 1e6:.3f} M); baseline {100 * base['top1']:.2f} %",
            n["top1"] > st["top1"] and n["speedup"] > 1,
        )
    if "kd" in means and "student" in means:
        gain = means["kd"]["top1"] - means["student"]["top1"]
        add(
            "KD: a small student learns more from the teacher",
            f"student {100 * means['student']['top1']:.2f} % → {100 * means['kd']['top1']:.2f} % with KD ({100 * gain:+.2f} points), "
            f"{means['kd']['params'] / 1e6:.3f} M params",
            gain > 0,
        )
    return rows


def pareto_report(children: list[dict], cfg: DictConfig, tracker: Tracker) -> str:
    means = _means(children)
    parts = []
    for cost, xlabel, stem, logx in (
        ("p50_ms", "p50 latency at batch 1, ms", "acc_vs_latency", False),
        ("size_mb", "size of the shipped .pt2, MB", "acc_vs_size", True),
    ):
        points = {t: (m[cost], m["top1"]) for t, m in means.items() if cost in m and "top1" in m}
        if not points:
            continue
        front = pareto_front(points)
        tracker.log_figure(_figure(points, front, xlabel, f"top-1 vs {xlabel.split(',')[0]}", logx), f"figures/{stem}.png")
        parts.append(f"Pareto front (top-1 vs {cost}): {', '.join(front)} — figure figures/{stem}.png on the parent run.")
    rows = claims(means)
    if rows:
        parts.append(markdown_table(rows, title="The survey's claims beside what this run measured"))
    return "\n\n".join(parts)
