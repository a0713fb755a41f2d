"""``lightyard train compression``: the trained baseline (cached), one compression technique applied to it through
config (``compress.technique``), its fine-tuning, then every metric of the survey measured the same way for each variant.

Compression is a transformation of a trained network followed by short fine-tunes, not one training run: this is a
:class:`~common.experiment.NonGradientExperiment`, and the baseline's training and the fine-tunes are one plain loop
(:func:`fit`: SGD with Nesterov momentum, cosine schedule, flip-and-shift augmentation), as input_iba trains its
classifier. The baseline is trained once per (model, settings, data) and cached under ``paths.cache_dir``, so every
variant and seed of a grid starts from the same weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import fit_state_dict
from common.experiment import NonGradientExperiment
from common.hardware import resolve_accelerator
from common.memory import MB, read_peak_rss, reset_peak_rss, run_isolated
from common.models import check_timm_name, create_timm_model
from common.tracking import Tracker
from pipelines.compression.data import Task, check_data, load_task, normalize
from pipelines.compression.model import (
    Arch,
    add_masks,
    build_arch,
    check_channel_ratio,
    count_macs,
    count_params,
    cubic_sparsity,
    depthwise_separable,
    factorised_layer,
    exported_bytes,
    factorise,
    low_rank_layers,
    program_weight_bytes,
    int4_weight_only,
    kd_loss,
    latency,
    mnas_reward,
    nvml_energy,
    prune_channels,
    pt2e_convert,
    pt2e_prepare_qat,
    pt2e_static_int8,
    quiet,
    remove_masks,
    sample_arch,
    separable_candidates,
    set_mode,
    set_module,
    sparse_bytes,
    sync,
    torchao_int8_dynamic,
    update_masks,
)


# -- models and the training loop ---------------------------------------------------------------------------------------------
def build_model(spec: DictConfig, classes: int) -> nn.Module:
    kwargs = OmegaConf.to_container(spec.kwargs, resolve=True) if spec.kwargs else {}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return create_timm_model(spec.name, num_classes=classes, **kwargs)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per image and one random shift of up to 2 pixels (reflected) per batch."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(3), x)
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
    return F.pad(x, (2, 2, 2, 2), mode="reflect")[:, :, dy : dy + h, dx : dx + w]


def fit(
    model: nn.Module,
    task: Task,
    cfg: DictConfig,
    opt_cfg: DictConfig,
    epochs: float,
    device: torch.device,
    seed: int,
    teacher: nn.Module | None = None,
    on_step: Callable[[int, int], None] | None = None,
    desc: str = "fit",
) -> list[float]:
    """SGD (Nesterov momentum 0.9) with a per-step cosine schedule for ``epochs`` (fractions allowed) over the training
    split (bf16 autocast on CUDA); cross-entropy, or Hinton's KD loss against ``teacher``. ``on_step(step, total)`` runs before each step (pruning
    schedules). Returns the mean loss per epoch."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=opt_cfg.lr, momentum=0.9, nesterov=True, weight_decay=opt_cfg.weight_decay)
    n, batch = len(task.train), int(opt_cfg.batch_size)
    per_epoch = max(1, n // batch)
    total = max(1, int(round(epochs * per_epoch)))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    mean, std = cfg.data.mean, cfg.data.std
    history, losses, step = [], [], 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not cfg.trainer.enable_progress_bar)
    set_mode(model, True)
    if teacher is not None:
        teacher.eval()
    while step < total:
        order = torch.randperm(n, generator=g)
        for k in range(per_epoch):
            if step >= total:
                break
            idx = order[k * batch : (k + 1) * batch]
            x = _augment(normalize(task.train.images[idx], mean, std), g).to(device)
            y = task.train.labels[idx].to(device)
            if on_step is not None:
                on_step(step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # bf16 on GPUs
                logits = model(x).float()
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x).float()
                    loss = kd_loss(logits, target, y, cfg.kd.temperature, cfg.kd.alpha)
                else:
                    loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(sum(losses) / max(len(losses), 1))
        losses = []
    bar.close()
    set_mode(model, False)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, cfg: DictConfig, device: torch.device, batch: int = 500) -> float:
    """Top-1 on the test split (torchmetrics)."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(len(task.classes), average="micro").to(device)
    set_mode(model, False)
    for i in range(0, len(task.test), batch):
        x = normalize(task.test.images[i : i + batch], cfg.data.mean, cfg.data.std).to(device)
        metric.update(model(x), task.test.labels[i : i + batch].to(device))
    return float(metric.compute())


# -- the cached baseline -----------------------------------------------------------------------------------------------------
def baseline_cache_path(cfg: DictConfig, task: Task) -> Path:
    """A hash of the model, the baseline's training settings and the data (not of the run's seed: every seed of every
    variant compresses the same trained network)."""
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "baseline": OmegaConf.to_container(cfg.baseline, resolve=True),
        "data": task.identity,
        "norm": [list(cfg.data.mean), list(cfg.data.std)],
    }
    return cache_file(cfg, "compression", "baseline", key)


def baseline_stage(cfg: DictConfig, task: Task, device: torch.device) -> nn.Module:
    def build() -> dict:
        torch.manual_seed(cfg.baseline.seed)
        model = build_model(cfg.model, len(task.classes)).to(device)
        history = fit(
            model, task, cfg, cfg.baseline, cfg.baseline.epochs, device, int(cfg.baseline.seed), desc=f"baseline {cfg.model.name}"
        )
        return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "loss": torch.tensor(history)}

    def check(result: dict) -> None:  # a file this version did not build is built again (common.cache)
        with torch.device("meta"):
            fit_state_dict(build_model(cfg.model, len(task.classes)), result["state"], "baseline", load=False)

    result = cached(baseline_cache_path(cfg, task), build, "baseline", check=check)
    model = build_model(cfg.model, len(task.classes))
    model.load_state_dict(result["state"])
    return model.to(device).eval()


# -- the variants ---------------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """What a technique hands back: the model whose accuracy is measured (eager), the one that is timed (``deploy``; the
    same unless given), the float model whose MACs count (``arch``), and extra metrics."""

    model: nn.Module
    arch: nn.Module
    deploy: nn.Module | None = None
    cpu_only: bool = False  # int8 kernels of the x86 inductor backend
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    cfg: DictConfig
    task: Task
    baseline: nn.Module
    device: torch.device
    seed: int

    def example(self, batch: int = 2) -> torch.Tensor:
        return normalize(self.task.train.images[:batch], self.cfg.data.mean, self.cfg.data.std).to(self.device)

    def calibration(self) -> list[torch.Tensor]:
        q = self.cfg.quant
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(self.task.train), generator=g)[: q.calibration_batches * q.calibration_batch_size]
        x = normalize(self.task.train.images[idx], self.cfg.data.mean, self.cfg.data.std)
        return list(x.to(self.device).split(q.calibration_batch_size))

    def finetune(self, model: nn.Module, epochs: float | None = None, **kwargs) -> nn.Module:
        c = self.cfg.finetune
        epochs = c.epochs if epochs is None else epochs
        if epochs > 0:
            fit(model, self.task, self.cfg, c, epochs, self.device, self.seed, desc=f"fine-tune {self.cfg.compress.technique}", **kwargs)
        return model.eval()


def t_baseline(ctx: Context) -> Variant:
    return Variant(ctx.baseline, ctx.baseline)


def t_int8_dynamic(ctx: Context) -> Variant:
    return Variant(torchao_int8_dynamic(ctx.baseline), ctx.baseline)


def t_int8_static(ctx: Context) -> Variant:
    return Variant(pt2e_static_int8(copy.deepcopy(ctx.baseline).cpu(), [b.cpu() for b in ctx.calibration()]), ctx.baseline, cpu_only=True)


def t_int4_weight(ctx: Context) -> Variant:
    return Variant(int4_weight_only(ctx.baseline, ctx.cfg.quant.group_size, layer_names(ctx.cfg) or None), ctx.baseline)


def t_qat(ctx: Context) -> Variant:
    """Fake-quantized fine-tuning of the exported baseline (observers learn the ranges, STE carries the gradients), then
    conversion to the same int8 graph as PTQ."""
    prepared = pt2e_prepare_qat(copy.deepcopy(ctx.baseline).cpu(), ctx.example(4).cpu())
    fit(prepared, ctx.task, ctx.cfg, ctx.cfg.finetune, ctx.cfg.quant.qat_epochs, torch.device("cpu"), ctx.seed, desc="QAT")
    return Variant(pt2e_convert(prepared), ctx.baseline, cpu_only=True)


def t_prune_unstructured(ctx: Context) -> Variant:
    """Global magnitude masks raised along the cubic schedule over the first ``prune.ramp`` of the fine-tune steps, held
    for the rest; then made permanent (dense zeros)."""
    p = ctx.cfg.prune
    model = copy.deepcopy(ctx.baseline)
    modules = add_masks(model, layer_names(ctx.cfg) or None)
    every = max(1, int(p.every))

    def on_step(step: int, total: int) -> None:
        ramp = max(1, int(p.ramp * total))
        if step % every == 0 or step >= ramp:
            update_masks(modules, cubic_sparsity(min(step, ramp), p.sparsity, 0, max(1, ramp // every), every))

    if ctx.cfg.finetune.epochs > 0:
        ctx.finetune(model, on_step=on_step)
    reached = update_masks(modules, p.sparsity)
    remove_masks(modules)
    return Variant(model.eval(), model, extra={"sparsity": reached, "sparse_size_mb": sparse_bytes(model) / MB})


def classifier_name(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def t_prune_structured(ctx: Context) -> Variant:
    """torch-pruning removes ``prune.channels`` of the channels of every coupled group (the classifier's outputs kept),
    then the smaller dense network is fine-tuned."""
    base = ctx.baseline
    model = prune_channels(base, ctx.cfg.prune.channels, ctx.example(1), [classifier_name(base)]).to(ctx.device)
    return Variant(ctx.finetune(model), model)


def t_depthwise(ctx: Context) -> Variant:
    model = copy.deepcopy(ctx.baseline)
    for name in layer_names(ctx.cfg) or separable_candidates(model):
        set_module(model, name, depthwise_separable(model.get_submodule(name)).to(ctx.device))
    return Variant(ctx.finetune(model), model)


def t_low_rank(ctx: Context) -> Variant:
    model = factorise(ctx.baseline, ctx.cfg.lowrank.rank_ratio, ctx.cfg.lowrank.method, layer_names(ctx.cfg) or None).to(ctx.device)
    return Variant(ctx.finetune(model), model)


def _student(ctx: Context) -> nn.Module:
    torch.manual_seed(ctx.seed)
    return build_model(ctx.cfg.kd.student, len(ctx.task.classes)).to(ctx.device)


def t_kd(ctx: Context) -> Variant:
    student = _student(ctx)
    fit(student, ctx.task, ctx.cfg, ctx.cfg.finetune, ctx.cfg.kd.epochs, ctx.device, ctx.seed, teacher=ctx.baseline, desc="KD student")
    return Variant(student.eval(), student)


def t_student(ctx: Context) -> Variant:
    """The KD student trained on labels alone: the control that says what the teacher added."""
    student = _student(ctx)
    fit(student, ctx.task, ctx.cfg, ctx.cfg.finetune, ctx.cfg.kd.epochs, ctx.device, ctx.seed, desc="student (CE)")
    return Variant(student.eval(), student)


def nas_cache_path(cfg: DictConfig, task: Task) -> Path:
    key = {"nas": OmegaConf.to_container(cfg.nas, resolve=True), "data": task.identity, "finetune": OmegaConf.to_container(cfg.finetune)}
    return cache_file(cfg, "compression", "nas", key)


def nas_search(ctx: Context) -> dict:
    """Random search of ``nas.candidates`` architectures: each trained ``nas.proxy_epochs`` on the training split, its
    accuracy measured on a held-out slice of it (never the test split) and its batch-1 latency measured on this machine;
    the best MnasNet reward against the budget ``nas.target_ms`` wins. Cached: every seed trains the same winner."""
    n = ctx.cfg.nas
    g = torch.Generator().manual_seed(int(n.seed))
    held = max(1, int(0.2 * len(ctx.task.train)))
    order = torch.randperm(len(ctx.task.train), generator=g)
    from pipelines.compression.data import Split

    pick = lambda idx: Split(ctx.task.train.images[idx], ctx.task.train.labels[idx])
    proxy = Task(ctx.task.name, ctx.task.classes, pick(order[held:]), pick(order[:held]), ctx.task.identity)
    rows, seen = [], set()
    x1 = ctx.example(1)
    while len(rows) < n.candidates:
        arch = sample_arch(g, n.widths, n.depths, n.kernels)
        if arch in seen:
            continue
        seen.add(arch)
        torch.manual_seed(int(n.seed))
        model = build_arch(arch, len(ctx.task.classes)).to(ctx.device)
        fit(model, proxy, ctx.cfg, ctx.cfg.finetune, n.proxy_epochs, ctx.device, int(n.seed), desc=f"NAS {arch.label()}")
        accuracy = evaluate(model, proxy, ctx.cfg, ctx.device)
        with torch.no_grad():
            ms = latency(lambda m=model: m(x1), ctx.device, 5, 30)["p50_ms"]
        reward = mnas_reward(accuracy, ms, n.target_ms, n.alpha, n.beta)
        rows.append(
            {"width": arch.width, "depths": list(arch.depths), "kernels": list(arch.kernels), "acc": accuracy, "ms": ms, "reward": reward}
        )
        print(f"NAS {arch.label()}: held-out top-1 {accuracy:.3f}, {ms:.2f} ms, reward {reward:.4f}", flush=True)
    best = max(rows, key=lambda r: r["reward"])
    return {"best": best, "candidates": rows}


def winner(search: dict) -> tuple[dict, Arch]:
    """The search's best row and its architecture (a cache file without them is built again: common.cache)."""
    b = search["best"]
    return b, Arch(float(b["width"]), tuple(int(v) for v in b["depths"]), tuple(int(v) for v in b["kernels"]))


def t_nas(ctx: Context) -> Variant:
    search = cached(nas_cache_path(ctx.cfg, ctx.task), lambda: nas_search(ctx), "NAS search", check=winner)
    b, arch = winner(search)
    torch.manual_seed(ctx.seed)
    model = build_arch(arch, len(ctx.task.classes)).to(ctx.device)
    fit(model, ctx.task, ctx.cfg, ctx.cfg.finetune, ctx.cfg.nas.epochs, ctx.device, ctx.seed, desc=f"NAS winner {arch.label()}")
    print(f"NAS winner {arch.label()} (proxy top-1 {b['acc']:.3f}, {b['ms']:.2f} ms, reward {b['reward']:.4f})", flush=True)
    return Variant(model.eval(), model, extra={"nas_proxy_acc": float(b["acc"]), "nas_proxy_ms": float(b["ms"])})


# name → (family, apply); the survey's four families
TECHNIQUES: dict[str, tuple[str, Callable[[Context], Variant]]] = {
    "baseline": ("none", t_baseline),
    "int8_dynamic": ("quantization", t_int8_dynamic),
    "int8_static": ("quantization", t_int8_static),
    "int4_weight": ("quantization", t_int4_weight),
    "qat": ("quantization", t_qat),
    "prune_unstructured": ("pruning", t_prune_unstructured),
    "prune_structured": ("pruning", t_prune_structured),
    "depthwise": ("compact convolutions", t_depthwise),
    "low_rank": ("factorisation", t_low_rank),
    "nas": ("architecture search", t_nas),
    "kd": ("distillation", t_kd),
    "student": ("distillation (control)", t_student),
}
LAYER_TECHNIQUES = {"int4_weight", "prune_unstructured", "depthwise", "low_rank"}  # the ones compress.layers applies to


def layer_names(cfg: DictConfig) -> list[str]:
    return list(cfg.compress.layers or [])


def check_technique(cfg: DictConfig, classes: int = 10) -> None:
    """The technique's name and the layers it names, before any run starts (one line each)."""
    technique = cfg.compress.technique
    if technique not in TECHNIQUES:
        raise ConfigError(f"unknown compress.technique '{technique}'; valid: {', '.join(TECHNIQUES)}")
    if technique == "prune_structured":
        with quiet():
            model = build_model(cfg.model, classes)
        check_channel_ratio(model, float(cfg.prune.channels), [classifier_name(model)], "prune.channels")
    layers = layer_names(cfg)
    if layers and technique not in LAYER_TECHNIQUES:
        raise ConfigError(f"compress.layers applies to {', '.join(sorted(LAYER_TECHNIQUES))}, not to {technique}; leave it empty")
    if not layers and technique != "low_rank":
        return
    with quiet():
        model = build_model(cfg.model, classes)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise ConfigError(
                f"compress.layers names '{name}', which {cfg.model.name} does not have; its conv/linear layers: {', '.join(convs[:12])}, …"
            )
        if not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"compress.layers names '{name}', a {type(modules[name]).__name__}; name conv or linear layers")
        if technique == "depthwise" and name not in separable_candidates(model, min_channels=1):
            raise ConfigError(
                f"compress.layers names '{name}', a {type(modules[name]).__name__} that technique=depthwise cannot split "
                f"(it replaces k×k convolutions, k > 1, of one group); {cfg.model.name}'s: {', '.join(separable_candidates(model, 1)[:12])}"
            )
    if technique == "low_rank":
        ratio, method = float(cfg.lowrank.rank_ratio), str(cfg.lowrank.method)
        considered = low_rank_layers(model, layers or None)
        if not any(factorised_layer(modules[n], ratio, method) for n in considered):
            raise ConfigError(
                f"lowrank.rank_ratio={ratio} factorises none of {'compress.layers' if layers else 'the layers of ' + cfg.model.name} "
                "(a factorisation saves weights only below about mn/(m + n) of full rank): lower lowrank.rank_ratio"
            )


# -- measurement --------------------------------------------------------------------------------------------------------------
def _peak_memory(program: bytes, batch: int, size: int, threads: int) -> float:
    """In a fresh process: growth of the peak RSS from before loading the shipped program to after one forward of a batch
    (weights + activations + workspace), in MB."""
    import io

    torch.set_num_threads(threads)
    reset_peak_rss()
    start = read_peak_rss()
    with quiet():
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (registers the q/dq ops an int8 program holds)

        module = torch.export.load(io.BytesIO(program)).module()
        with torch.no_grad():
            module(torch.randn(batch, 3, size, size))
    return (read_peak_rss() - start) / MB


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """torch.compile (inductor, with freezing: weights become constants, so int8 patterns fuse into int8 kernels)."""
    if not on:
        return model
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


def measure(variant: Variant, ctx: Context) -> dict[str, float]:
    """Every metric of one variant, the same way for all: parameters, size of the shipped ``.pt2`` program, MACs, peak
    memory (fresh process), latency p50/p95 at batch 1, throughput at batch 32 (and NVML energy on CUDA)."""
    cfg, m = ctx.cfg, ctx.cfg.measure
    device = torch.device("cpu") if variant.cpu_only else ctx.device
    model = variant.model.to(device) if not isinstance(variant.model, torch.fx.GraphModule) else variant.model
    example = ctx.example(1).to(device)
    program = exported_bytes(model, example)
    out = {
        **count_params(model),
        "size_mb": len(program) / MB,
        "weights_mb": program_weight_bytes(program) / MB,
        "macs_m": count_macs(copy.deepcopy(variant.arch).cpu(), example.cpu()) / 1e6,
    }
    if m.memory:
        out["peak_mem_mb"] = run_isolated(_peak_memory, program, int(m.batch), int(cfg.data.image_size), torch.get_num_threads())
    if m.latency:
        deploy = compiled(variant.deploy or model, m.compile)
        base_deploy = compiled(ctx.baseline.to(device), m.compile) if device == ctx.device else None
        batch = normalize(ctx.task.test.images[: m.batch], cfg.data.mean, cfg.data.std).to(device)
        energy = nvml_energy(device)
        with torch.no_grad(), quiet():
            start = time.perf_counter()
            deploy(example)  # (the first call compiles)
            out["compile_s"] = time.perf_counter() - start
            out.update(latency(lambda: deploy(example), device, m.warmup, m.iters))
            if base_deploy is not None:
                # latency across processes drifts by more than the effects at 32 px (the baseline and the dense-equal
                # 50 %-sparse model differed 1.4× in two children): the speed-up is the variant against the baseline in
                # this process, interleaved rounds, the fastest p50 of each
                v = b = float("inf")
                for _ in range(3):
                    v = min(v, latency(lambda: deploy(example), device, 2, m.iters)["p50_ms"])
                    b = min(b, latency(lambda: base_deploy(example), device, 2, m.iters)["p50_ms"])
                out["speedup"] = b / v
            joules = energy() if energy else None
            timed = latency(lambda: deploy(batch), device, 2, m.throughput_iters)
            if joules is not None:
                out["energy_mj_per_image"] = 1e3 * (energy() - joules) / (len(batch) * m.throughput_iters)
            out["throughput"] = len(batch) / (timed["mean_ms"] / 1e3)
        sync(device)
    return out


class CompressionExperiment(NonGradientExperiment):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_data(cfg.data)
        check_technique(cfg)
        check_timm_name(cfg.model.name)
        check_timm_name(cfg.bench.model)  # (a bench child would fail only once running)
        if cfg.compress.technique == "kd":
            check_timm_name(cfg.kd.student.name)
        channels = (cfg.model.kwargs or {}).get("channels")
        if channels is not None and str(cfg.model.name).startswith("resnet") and len(channels) != 4:
            raise ConfigError(f"model.kwargs.channels gives one width per ResNet stage: 4 numbers, got {list(channels)}")

    task: Task | None = None

    def prepare(self) -> None:
        if self.task is None:
            self.task = load_task(self.cfg)  # (decodes and checks every image; draws nothing)

    def run(self, tracker: Tracker | None) -> dict[str, float]:
        cfg = self.cfg
        self.check_config(cfg)
        device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
        self.prepare()
        task = self.task
        baseline = baseline_stage(cfg, task, device)
        base_top1 = evaluate(baseline, task, cfg, device)
        ctx = Context(cfg, task, baseline, device, int(cfg.seed))
        technique = cfg.compress.technique
        start = time.perf_counter()
        variant = TECHNIQUES[technique][1](ctx)
        seconds = time.perf_counter() - start
        top1 = evaluate(variant.model, task, cfg, torch.device("cpu") if variant.cpu_only else device)
        metrics = {"top1": top1, "baseline_top1": base_top1, "top1_drop": base_top1 - top1, "compress_s": seconds, **variant.extra}
        metrics.update(measure(variant, ctx))
        base_program = exported_bytes(baseline, ctx.example(1))
        base_size = len(base_program) / MB
        metrics["size_ratio"] = base_size / metrics["size_mb"]
        metrics["weights_ratio"] = program_weight_bytes(base_program) / MB / metrics["weights_mb"]
        timing = (
            f", p50 {metrics['p50_ms']:.3f} ms, {metrics['throughput']:.0f} img/s at batch {cfg.measure.batch}"
            if "p50_ms" in metrics
            else ""
        )
        print(
            f"{technique}: top-1 {100 * base_top1:.2f} % → {100 * top1:.2f} %, size {base_size:.3f} → {metrics['size_mb']:.3f} MB "
            f"(÷{metrics['size_ratio']:.2f}; weights {metrics['weights_mb']:.3f} MB, ÷{metrics['weights_ratio']:.2f}), {metrics['params'] / 1e6:.3f} M values ({metrics['nonzero_params'] / 1e6:.3f} M nonzero), "
            f"{metrics['macs_m']:.1f} MMACs{timing}",
            flush=True,
        )
        if tracker is not None:
            tracker.set_tags({"compression.family": TECHNIQUES[technique][0]})
        return metrics
