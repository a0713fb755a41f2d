"""``lightyard train input_iba``: the classifier (trained once, cached by a hash of its settings and its data), the
latent statistics, then every attribution method on the same images, scored by every metric, with heatmap panels.

Attribution is an optimisation per image of a fixed classifier, not a training: this is a
:class:`~common.experiment.NonGradientExperiment`. The classifier's own training is a plain loop (AdamW, cosine) run
once per (model, classifier settings, data, seed) and cached under ``paths.cache_dir``, as livt caches its stage 1.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import check_state_dict_file, fit_checkpoint, fit_state_dict
from common.experiment import NonGradientExperiment
from common.hardware import resolve_accelerator
from common.models import create_timm_model
from common.tracking import Tracker, pyplot
from pipelines.input_iba.data import Task, check_data, load_task, normalize
from pipelines.input_iba.model import (
    METHODS,
    Explainer,
    GanSettings,
    LatentHook,
    Settings,
    ehr,
    estimate_stats,
    find_layer,
    insertion_deletion,
    mask_iou,
    pointing_game,
    sensitivity_n,
    spatial,
)

LABELS = {
    "saliency": "Saliency",
    "integrated_gradients": "Integrated Gradients",
    "gradcam": "Grad-CAM",
    "feature_iba": "IBA (feature)",
    "input_iba": "InputIBA",
}


# -- the classifier ----------------------------------------------------------------------------------------------------
def build_classifier(cfg: DictConfig, classes: int) -> nn.Module:
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True) if cfg.model.kwargs else {}
    return create_timm_model(cfg.model.name, num_classes=classes, **kwargs)


def classifier_cache_path(cfg: DictConfig, task: Task) -> Path:
    """A hash of the model, the classifier's settings, the data and the run seed (each seed is its own classifier;
    attribution settings do not enter it)."""
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "classifier": OmegaConf.to_container(cfg.classifier, resolve=True),
        "data": task.identity,
        "norm": [list(cfg.data.mean), list(cfg.data.std)],
        "seed": int(cfg.seed),
    }
    return cache_file(cfg, "input_iba", "classifier", key)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (reflected), per image."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def train_classifier(cfg: DictConfig, task: Task, device: torch.device) -> dict:
    """AdamW with a per-step cosine schedule on the task's training images; bf16 autocast on CUDA."""
    from tqdm import tqdm

    c = cfg.classifier
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(int(cfg.seed))
    model = build_classifier(cfg, len(task.classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    n = len(task.train)
    per_epoch = max(1, n // c.batch_size)
    total = c.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    history = []
    bar = tqdm(total=total, desc=f"classifier {cfg.model.name} on {task.name}", unit="step", disable=not cfg.trainer.enable_progress_bar)
    model.train()
    for _ in range(c.epochs):
        order = torch.randperm(n, generator=g)
        losses = []
        for k in range(per_epoch):
            idx = order[k * c.batch_size : (k + 1) * c.batch_size]
            x = normalize(task.train.images[idx].to(device), cfg.data.mean, cfg.data.std)
            if c.augment:
                x = _augment(x, g)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), task.train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(sum(losses) / len(losses))
    bar.close()
    return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "loss": torch.tensor(history)}


def classifier_stage(cfg: DictConfig, task: Task, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The cached classifier (``model.checkpoint`` instead, when given), in eval mode with frozen weights; and its
    per-epoch training loss (empty for a checkpoint)."""
    model = build_classifier(cfg, len(task.classes))
    if cfg.model.checkpoint:
        fit_checkpoint(model, cfg.model.checkpoint)
        history = torch.zeros(0)
    else:

        def check(result: dict) -> None:  # a file this version did not build is built again (common.cache)
            with torch.device("meta"):
                fit_state_dict(build_classifier(cfg, len(task.classes)), result["state"], "classifier", load=False)
            result["loss"].reshape(-1)

        result = cached(classifier_cache_path(cfg, task), lambda: train_classifier(cfg, task, device), "classifier", check=check)
        model.load_state_dict(result["state"])
        history = result["loss"]
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, cfg: DictConfig, device: torch.device, batch: int = 500) -> torch.Tensor:
    return torch.cat(
        [
            model(normalize(images[i : i + batch].to(device), cfg.data.mean, cfg.data.std)).argmax(1).cpu()
            for i in range(0, len(images), batch)
        ]
    )


# -- settings and checks -----------------------------------------------------------------------------------------------
def settings(cfg: DictConfig) -> Settings:
    i, g, p = cfg.iba, cfg.gan, cfg.input
    return Settings(
        beta=i.beta,
        feature_steps=i.steps,
        feature_lr=i.lr,
        copies=i.copies,
        alpha_init=i.alpha_init,
        input_beta=p.beta,
        input_steps=p.steps,
        input_lr=p.lr,
        smooth_sigma=p.smooth_sigma,
        ig_steps=cfg.baselines.ig_steps,
        gan=GanSettings(
            epochs=g.epochs,
            batch_size=g.batch_size,
            real_samples=g.real_samples,
            group_size=g.group_size,
            critic_iters=g.critic_iters,
            clip=g.clip,
            critic_lr=g.critic_lr,
            mean_lr=g.mean_lr,
            std_lr=g.std_lr,
            mask_lr=g.mask_lr,
            real_mask=g.real_mask,
        ),
    )


def methods_of(cfg: DictConfig) -> list[str]:
    a = cfg.attribution
    chosen = list(a.methods) if a.method == "all" else [a.method]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown attribution method '{unknown[0]}'; valid: {', '.join(METHODS)}")
    return chosen


def check_model(cfg: DictConfig, classes: int = 4) -> None:
    """The classifier takes data.image_size and has the layer iba.layer: one line each otherwise."""
    kwargs = cfg.model.kwargs or {}
    size = int(cfg.data.image_size)
    if "img_size" in kwargs and int(kwargs["img_size"]) != size:
        raise ConfigError(f"data.image_size={size} does not match the classifier's input size model.kwargs.img_size={kwargs['img_size']}")
    model = build_classifier(cfg, classes).eval()
    find_layer(model, cfg.iba.layer)
    hook = LatentHook(model, cfg.iba.layer)
    try:
        with torch.no_grad():
            latent = hook.latent(torch.zeros(1, 3, size, size))
        try:  # a map or a token grid (was found only after two baselines had run)
            spatial(latent)
        except ConfigError as err:
            raise ConfigError(f"iba.layer='{cfg.iba.layer}' gives a {err}") from None
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data.image_size={size} does not fit the classifier {cfg.model.name}: {first}") from None
    finally:
        hook.remove()


# -- evaluation and figures ---------------------------------------------------------------------------------------------
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, heat: torch.Tensor, evidence: torch.Tensor | None, e: DictConfig, seed: int
) -> dict[str, float]:
    """Every metric, averaged over the images."""
    ins, dele = insertion_deletion(model, x, y, heat, e.steps, e.blur_sigma, e.chunk)
    pixels = x.shape[-1] * x.shape[-2]
    ns = [max(1, round(f * pixels)) for f in e.sensitivity_fractions]
    g = torch.Generator(device=x.device).manual_seed(seed)
    sens = sensitivity_n(model, x, y, heat, ns, e.sensitivity_sets, g, e.chunk)
    out = {"insertion": float(ins.mean()), "deletion": float(dele.mean()), "sensitivity_n": float(sens.mean())}
    for f, column in zip(e.sensitivity_fractions, sens.T):
        out[f"sensitivity_n_{round(100 * f)}pct"] = float(column.mean())
    if evidence is not None:
        out["ehr"] = float(ehr(heat, evidence, e.ehr_floor).mean())
        out["pointing"] = float(pointing_game(heat, evidence, e.pointing_tolerance).mean())
        out["mask_iou"] = float(mask_iou(heat, evidence).mean())
    return out


def panel_figure(images: torch.Tensor, evidence: torch.Tensor | None, heatmaps: dict[str, torch.Tensor], title: str):
    """Rows: images; columns: the image, its evidence mask (when known), each method's heatmap (min-max per map)."""
    plt = pyplot()
    cols = 1 + (evidence is not None) + len(heatmaps)
    rows = len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows + 0.4), squeeze=False)
    for r in range(rows):
        panels = [("image", images[r].permute(1, 2, 0).numpy(), None)]
        if evidence is not None:
            panels.append(("evidence", evidence[r].float().numpy(), "gray"))
        for name, heat in heatmaps.items():
            h = heat[r].float()
            panels.append((LABELS.get(name, name), ((h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)).numpy(), "jet"))
        for c, (label, data, cmap) in enumerate(panels):
            axes[r][c].imshow(data, cmap=cmap, vmin=None if cmap is None else 0, vmax=None if cmap is None else 1)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def attribution_images(
    cfg: DictConfig, task: Task, model: nn.Module, device: torch.device, count: int | None = None
) -> tuple[torch.Tensor, ...]:
    """The first ``count`` (default ``attribution.images``) images of the attribution split (correctly classified ones only, by default):
    (uint8 images, labels, evidence or None, ids)."""
    split = task.attribution
    ids = torch.arange(len(split))
    if cfg.attribution.correct_only:
        ids = ids[predict(model, split.images, cfg, device) == split.labels]
    ids = ids[: count or cfg.attribution.images]
    if len(ids) == 0:
        raise ConfigError(
            "no image to attribute: the classifier gets none of the attribution images right (attribution.correct_only=false)"
        )
    part = split.take(ids)
    return part.images, part.labels, part.evidence, ids


def attribute_all(explainer: Explainer, method: str, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([explainer(method, x[i : i + batch], y[i : i + batch], ids[i : i + batch].tolist()) for i in range(0, len(x), batch)])


def latent_batches(hook: LatentHook, images: torch.Tensor, cfg: DictConfig, device: torch.device, batch: int = 250):
    def iterate():
        with torch.no_grad():
            for i in range(0, len(images), batch):
                yield hook.latent(normalize(images[i : i + batch].to(device), cfg.data.mean, cfg.data.std))

    return iterate


class InputIBAExperiment(NonGradientExperiment):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Names and shapes before any MLflow run starts; ranges are the config's checks."""
        check_data(cfg.data)
        methods_of(cfg)
        check_model(cfg)
        if cfg.model.checkpoint:  # its format (its names and shapes: prepare, once the classes are known)
            check_state_dict_file(cfg.model.checkpoint)

    task: Task | None = None

    def prepare(self) -> None:
        if self.task is not None:
            return
        task = load_task(self.cfg)  # (decodes and checks every image and annotation; draws nothing)
        if self.cfg.model.checkpoint:  # names and shapes (the head's: the data's classes), before the run opens
            with torch.device("meta"):
                model = build_classifier(self.cfg, len(task.classes))
            fit_checkpoint(model, self.cfg.model.checkpoint, load=False)
        self.task = task

    def run(self, tracker: Tracker | None) -> dict[str, float]:
        cfg = self.cfg
        self.check_config(cfg)
        device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
        self.prepare()
        task = self.task
        model, history = classifier_stage(cfg, task, device)
        metrics = {"classifier/test_acc": float((predict(model, task.test.images, cfg, device) == task.test.labels).float().mean())}
        images, y, evidence, ids = attribution_images(cfg, task, model, device)
        x, y = normalize(images.to(device), cfg.data.mean, cfg.data.std), y.to(device)
        evidence = None if evidence is None else evidence.to(device)
        hook = LatentHook(model, cfg.iba.layer)
        stats = estimate_stats(latent_batches(hook, task.estimation.images, cfg, device), cfg.iba.min_std)
        hook.remove()
        explainer = Explainer(model, cfg.iba.layer, stats, settings(cfg), seed=int(cfg.seed))
        heatmaps, rows = {}, []
        methods = methods_of(cfg)
        try:
            for method in methods:
                start = time.perf_counter()
                heat = attribute_all(explainer, method, x, y, ids, cfg.attribution.batch_size)
                seconds = (time.perf_counter() - start) / len(x)
                scores = evaluate(model, x, y, heat, evidence, cfg.evaluation, int(cfg.seed))
                scores["seconds_per_image"] = seconds
                heatmaps[method] = heat.cpu()
                metrics.update({f"{method}/{k}": v for k, v in scores.items()})
                if len(methods) == 1:
                    metrics.update(scores)
                rows.append({"method": LABELS[method], **{k: v for k, v in scores.items() if "pct" not in k}})
                print(f"{LABELS[method]}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if "pct" not in k), flush=True)
        finally:
            explainer.close()
        metrics["attributed_images"] = float(len(x))
        if tracker is not None:
            tracker.log_metrics(metrics)
            for epoch, loss in enumerate(history.tolist()):
                tracker.log_metrics({"classifier/loss": loss}, step=epoch)
            print(
                tracker.log_table(
                    rows,
                    "tables/attribution.md",
                    title=f"{task.name}: metrics over {len(x)} images (insertion ↑, deletion ↓, sensitivity-N ↑, EHR ↑, pointing ↑, IoU ↑)",
                )
            )
            shown = slice(0, cfg.attribution.panel_images)
            fig = panel_figure(
                images[shown],
                None if evidence is None else evidence[shown].cpu(),
                {m: h[shown] for m, h in heatmaps.items()},
                f"{task.name}, {cfg.model.name} at {cfg.iba.layer}",
            )
            tracker.log_figure(fig, "figures/heatmaps.png")
            buffer = io.BytesIO()
            torch.save(
                {
                    "dataset": task.name,
                    "ids": ids,
                    "images": images[shown],
                    "evidence": None if evidence is None else evidence[shown].cpu(),
                    "heatmaps": {m: h[shown] for m, h in heatmaps.items()},
                },
                buffer,
            )
            tracker.log_bytes(buffer.getvalue(), "heatmaps.pt")
        return metrics
