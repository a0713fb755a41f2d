"""LightningModule: SETR trained on crops with L = CE(main) + 0.4 Σ CE(aux), SGD + poly per step, head lr ×10;
validation single-scale with the sliding window; test single-scale and (eval.multi_scale) multi-scale + flip.
mIoU, per-class IoU and pixel accuracy from torchmetrics, accumulated over the whole split; overlay panels
(image, label, prediction) logged to MLflow at the end of the test."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from common.config import ConfigError
from common.hardware import check_finite_length, total_steps
from common.data import fit_state_dict, load_state_dict_file, unprefixed
from pipelines.setr.data import SegDataModule, check_data, check_labels, class_names
from pipelines.setr.model import (
    IGNORE_INDEX,
    SETR,
    build_setr,
    check_window,
    check_decoder,
    create_vit,
    make_optimizer,
    multi_scale_inference,
    setr_loss,
    setr_multi_scale_sizes,
    slide_inference,
)


class SegmentationMetrics(nn.Module):
    """Per-class IoU (a class with an empty union over the whole split is NaN and left out of the mean, as mmseg's
    nanmean), mIoU and pixel accuracy, accumulated over every batch of a split (one confusion matrix, never an
    average of per-batch scores); pixels labelled ``ignore_index`` count nowhere. torchmetrics syncs them under DDP."""

    def __init__(self, classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.iou = MulticlassJaccardIndex(classes, average="none", ignore_index=ignore_index, zero_division=math.nan)
        self.acc = MulticlassAccuracy(classes, average="micro", ignore_index=ignore_index)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """``predicted``: class indices ``[B, H, W]``; ``target``: labels ``[B, H, W]``."""
        self.iou.update(predicted, target)
        self.acc.update(predicted, target)

    def compute(self) -> dict[str, torch.Tensor]:
        iou = self.iou.compute()
        return {"miou": iou.nanmean(), "iou": iou, "acc": self.acc.compute()}

    def reset(self) -> None:
        self.iou.reset()
        self.acc.reset()


def build_model(cfg: DictConfig, classes: int) -> SETR:
    m = cfg.model
    kwargs = OmegaConf.to_container(m.kwargs) if m.kwargs else {}
    vit = create_vit(m.name, kwargs, m.drop_rate)
    model = build_setr(m.decoder, vit, classes, list(m.aux_layers) or None, list(m.mla_layers) or None, m.channels, m.head_channels)
    if m.checkpoint:
        load_encoder_weights(model, m.checkpoint)
    return model


def load_encoder_weights(model: SETR, path: str, load: bool = True) -> None:
    """Local ViT weights (safetensors or a torch state dict, read with weights_only=True; a whole SETR's or a Lightning
    checkpoint's too); the position embedding is interpolated to the model's grid (bilinear, as the official
    pos_embed_interp). ``load=False``: checked only, on the meta-device model of check_config."""
    from pipelines.setr.model import interpolate_pos_embed

    file, vit, prefix = Path(path).expanduser(), model.encoder.vit, model.encoder.prefix
    what = f"model.checkpoint {file}"
    state = unprefixed(vit, load_state_dict_file(path, lazy=not load), what)
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape != vit.pos_embed.shape and pos.shape[2] == vit.pos_embed.shape[2]:
        old = math.isqrt(max(pos.shape[1] - prefix, 0))
        if old * old == pos.shape[1] - prefix > 0:  # (any other shape is the shape check's one line)
            state["pos_embed"] = interpolate_pos_embed(pos, prefix, (old, old), tuple(vit.patch_embed.grid_size))
    fit_state_dict(vit, state, what, optional=("head.",), load=load)


def overlay_figure(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, names: tuple[str, ...], title: str):
    """Rows of (image, label, prediction); ignored pixels black."""
    from common.tracking import pyplot

    plt = pyplot()
    palette = torch.tensor(plt.get_cmap("tab20")(range(20)))[:, :3]

    def paint(mask: torch.Tensor) -> torch.Tensor:
        colours = palette[mask.clamp(0, 19) % 20]
        colours[mask == IGNORE_INDEX] = 0
        return colours

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 2.6 * n * images.shape[-2] / images.shape[-1] + 0.6), squeeze=False)
    for i in range(n):
        for ax, panel, name in zip(
            axes[i], (images[i].permute(1, 2, 0).clamp(0, 1), paint(labels[i]), paint(predictions[i])), ("image", "label", "prediction")
        ):
            ax.imshow(panel.numpy(), interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name)
    shown = ", ".join(f"{k}={name}" for k, name in enumerate(names[:20]))
    fig.suptitle(f"{title}\n{shown}", fontsize=7)
    fig.tight_layout()
    return fig


def check_sizes(cfg: DictConfig) -> None:
    """The sliding window against generated images (sizes known from the config); real images are checked on the
    first image of each evaluation split when the data is set up."""
    e, d = cfg.eval, cfg.data
    # the pairs' lengths are the conf's checks (length 2); their order only this can see
    if d.ratio_range[0] > d.ratio_range[1]:
        raise ConfigError(f"data.ratio_range is [lo, hi] with lo <= hi, got {list(d.ratio_range)}")
    for where, crop, stride in (("eval", e.crop, e.stride), ("bench", cfg.bench.crop, cfg.bench.stride)):
        if any(s > c for s, c in zip(stride, crop)):  # pixels between windows would get no logits (0/0, then class 0)
            raise ConfigError(
                f"{where}.stride={list(stride)} is larger than {where}.crop={list(crop)}: windows would leave pixels uncovered; set {where}.stride <= {where}.crop"
            )
    if d.name == "scenes":
        check_window(d.image_size[0], d.image_size[1], e.crop, e.pad)


MAX_TOKENS = 16384  # a window's tokens (ViT-L/16 at 2048²); attention is quadratic in them: beyond, memory runs out, not time


def check_tokens(cfg: DictConfig, patch: int) -> None:
    """A training crop or sliding window so large that one forward cannot fit: refused before any run opens."""
    for key in ("data.crop", "eval.crop"):
        h, w = OmegaConf.select(cfg, key)
        if h % patch or w % patch:  # the patch embedding would drop the remainder, and the heads upsample ×patch
            raise ConfigError(f"{key}={[h, w]} is not a multiple of the ViT's patch size {patch}; change one of them")
        tokens = (h // patch) * (w // patch)
        if tokens > MAX_TOKENS:
            raise ConfigError(
                f"{key}={[h, w]} gives {tokens} tokens a window at patch size {patch} (at most {MAX_TOKENS}: attention is "
                f"quadratic in them); lower {key}"
            )


class SETRModule(pl.LightningModule):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Before any MLflow run starts: names, layer numbers (on a meta-device model: no memory, no time), sizes."""
        check_finite_length(cfg.trainer, "setr's poly learning-rate schedule")
        check_decoder(cfg.model.decoder)
        check_data(cfg.data)  # (the files: check_labels below)
        check_sizes(cfg)
        with torch.device("meta"):
            model = build_model(OmegaConf.merge(cfg, {"model": {"checkpoint": None}}), len(class_names(cfg.data.name)))
        check_tokens(cfg, model.encoder.patch_size)
        if cfg.bench.decoder is not None:  # a bench point builds its own ViT and decoder: checked alike
            check_decoder(cfg.bench.decoder, "bench.decoders entry")
            with torch.device("meta"):
                create_vit(cfg.model.name, OmegaConf.to_container(cfg.bench.model_kwargs), key="bench.model_kwargs")
        if cfg.model.checkpoint:  # names and shapes, on the meta-device model
            load_encoder_weights(model, cfg.model.checkpoint, load=False)
        check_labels(cfg)  # last: it decodes every label file (once per file set)

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.class_names = class_names(cfg.data.name)
        self.classes = len(self.class_names)
        self.model = build_model(cfg, self.classes)
        self.metrics = nn.ModuleDict({k: SegmentationMetrics(self.classes) for k in ("val", "test", "test_ms", "test_ms_subset_ss")})
        self._panel: tuple | None = None
        self._ms_seen = 0

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:  # the paper's SyncBN
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, SegDataModule) and not self.cfg.eval.pad:
            for split in ("val", "test"):  # the window against a real image, before the first step
                if split in datamodule.splits and len(datamodule.splits[split]):
                    image, _ = datamodule.splits[split][0]
                    check_window(image.shape[-2], image.shape[-1], self.cfg.eval.crop, pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- inference ---------------------------------------------------------------------------------
    def slide(self, images: torch.Tensor) -> torch.Tensor:
        e = self.cfg.eval
        return slide_inference(self.model, images, tuple(e.crop), tuple(e.stride), self.classes, e.windows_per_forward, e.pad)

    def multi_scale(self, images: torch.Tensor) -> torch.Tensor:
        e = self.cfg.eval
        sizes = setr_multi_scale_sizes(images.shape[-2], images.shape[-1], e.base_short, min(e.crop), e.ratios)
        return multi_scale_inference(self.slide, images, sizes, e.flip)

    # -- steps -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits, aux = self.model(images, with_aux=True)
        loss, main, aux_sum = setr_loss(logits, aux, labels, self.cfg.optim.aux_weight)
        n = len(labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict({"train/loss_main": main, "train/loss_aux": aux_sum}, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.metrics["val"].update(self.slide(images).argmax(1), labels)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        predicted = self.slide(images).argmax(1)
        self.metrics["test"].update(predicted, labels)
        e = self.cfg.eval
        if e.multi_scale and (e.ms_images == 0 or self._ms_seen < e.ms_images):  # MS costs ~10× SS: ms_images caps it on CPUs
            keep = len(images) if e.ms_images == 0 else min(len(images), e.ms_images - self._ms_seen)
            self.metrics["test_ms"].update(self.multi_scale(images[:keep]).argmax(1), labels[:keep])
            if e.ms_images:  # single-scale on the same images, to compare like with like
                self.metrics["test_ms_subset_ss"].update(predicted[:keep], labels[:keep])
            self._ms_seen += keep
        if self._panel is None or len(self._panel[0]) < self.cfg.eval.panels:
            k = self.cfg.eval.panels - (0 if self._panel is None else len(self._panel[0]))
            part = (images[:k].cpu(), labels[:k].cpu(), predicted[:k].cpu())
            self._panel = part if self._panel is None else tuple(torch.cat([a, b]) for a, b in zip(self._panel, part))

    def _log_split(self, key: str) -> None:
        result = self.metrics[key].compute()
        self.metrics[key].reset()
        logged = {f"{key}/miou": result["miou"], f"{key}/acc": result["acc"]}
        logged.update(
            {f"{key}/iou/{name}": result["iou"][i] for i, name in enumerate(self.class_names) if not torch.isnan(result["iou"][i])}
        )
        self.log_dict(logged, batch_size=1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metrics["val"].reset()
            return
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")
        if self.cfg.eval.multi_scale:
            self._log_split("test_ms")
            if self.cfg.eval.ms_images:
                self._log_split("test_ms_subset_ss")
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is not None and self._panel is not None and self.cfg.eval.panels > 0:
            title = f"SETR-{self.cfg.model.decoder} on {self.cfg.data.name} (single-scale, sliding window)"
            tracker.log_figure(overlay_figure(*self._panel, self.class_names, title), "panels/test_overlay.png")
        self._panel, self._ms_seen = None, 0

    def configure_optimizers(self):
        o = self.cfg.optim
        opt, schedule = make_optimizer(
            self.model, o.lr, o.momentum, o.weight_decay, o.head_lr_mult, int(total_steps(self.trainer)), o.power, o.min_lr
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
