"""Lightning glue of LiVT: stage 1 (MGP, cached by a hash of its settings and the training set) runs in ``setup``; the
LightningModule is stage 2, balanced fine-tuning, with top-1 overall and on many/medium/few-shot classes."""

from __future__ import annotations

import random
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import fit_state_dict
from common.hardware import check_finite_length, total_steps
from common.models import check_timm_name
from common.tracking import pyplot
from pipelines.livt.data import LTDataModule, check_data, eval_transform, train_transform
from pipelines.livt.model import (
    LOSSES,
    MaskedAutoencoder,
    create_vit,
    finetune_vit,
    layer_decay_groups,
    make_loss,
    reconstruction_images,
    scaled_lr,
    smooth_one_hot,
    warmup_cosine,
)


# -- stage 1 ----------------------------------------------------------------------------------------------
def build_mae(cfg: DictConfig) -> MaskedAutoencoder:
    m = cfg.mgp
    return MaskedAutoencoder(create_vit(cfg.model), m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mask_ratio, m.norm_pix)


def mgp_cache_path(cfg: DictConfig, data: LTDataModule) -> Path:
    """The cache file of stage 1: a hash of the model, the MGP settings and the training set (not of the run's seed, so
    fine-tuning seeds share one pretraining)."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg.mgp, resolve=True).items() if k != "enabled"}
    return cache_file(
        cfg,
        "livt",
        "mgp",
        # "seeds": stage 1 drew from the building run's random/numpy streams before mgp.seed seeded them
        {
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "mgp": settings,
            "data": data.identity(),
            "seeds": "mgp.seed, all streams",
        },
    )


def pretrain_mgp(cfg: DictConfig, data: LTDataModule, device: torch.device) -> dict:
    """Stage 1 on the long-tailed training set alone: AdamW β = (0.9, 0.95), lr = blr·batch/256, per-step warmup + cosine,
    bf16 autocast on CUDA. Returns {'state': MAE weights, 'loss': per-epoch mean loss}."""
    from tqdm import tqdm

    m = cfg.mgp
    # timm's crops and flips draw from random (and numpy): all three from mgp.seed, or stage 1 (cached under a key
    # without the run's seed) would depend on the seed of the run that built it (cached() forks them back afterwards)
    torch.manual_seed(m.seed)
    random.seed(m.seed)
    np.random.seed(m.seed)
    mae = build_mae(cfg).to(device)
    from timm.optim import param_groups_weight_decay

    lr = scaled_lr(m.blr, m.batch_size)
    opt = torch.optim.AdamW(param_groups_weight_decay(mae, m.weight_decay), lr=lr, betas=(0.9, 0.95))
    dataset = data.mgp_dataset()
    loader = DataLoader(
        dataset,
        batch_size=m.batch_size,
        shuffle=True,
        drop_last=len(dataset) > m.batch_size,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(m.seed),
    )
    total, warmup = m.epochs * len(loader), m.warmup_epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total, warmup, 0.0))
    history = []
    bar = tqdm(
        total=total, desc=f"stage 1: MGP of {cfg.model.name} on {cfg.data.name}", unit="step", disable=not cfg.trainer.enable_progress_bar
    )
    mae.train()
    for _ in range(m.epochs):
        losses = []
        for images, _ in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, _ = mae(images.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append(sum(losses) / len(losses))
    bar.close()
    return {"state": {k: v.detach().cpu() for k, v in mae.state_dict().items()}, "loss": torch.tensor(history)}


def mgp_stage(cfg: DictConfig, data: LTDataModule, device: torch.device, strategy=None) -> dict:
    """The cached stage 1 (computed on rank 0 under DDP, the others wait at a barrier, then every rank reads it)."""

    def check(mgp: dict) -> None:  # a file this version did not build is built again (common.cache)
        with torch.device("meta"):
            fit_state_dict(build_mae(cfg), mgp["state"], "stage 1 (MGP)", load=False)
        mgp["loss"].reshape(-1)

    return cached(mgp_cache_path(cfg, data), lambda: pretrain_mgp(cfg, data, device), "stage 1 (MGP)", strategy, check)


def encoder_weights(mae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's part of the MAE weights, without its final norm (fine-tuning pools into fc_norm instead)."""
    return {
        k.removeprefix("encoder."): v
        for k, v in mae_state.items()
        if k.startswith("encoder.") and not k.startswith(("encoder.norm.", "encoder.head."))
    }


def reconstruction_figure(cfg: DictConfig, mae_state: dict, data: LTDataModule, count: int = 8):
    """Rows: masked input, reconstruction (visible patches pasted in), target; on training images, test transform."""
    mae = build_mae(cfg)
    mae.load_state_dict(mae_state)
    mae.eval()
    source = data.sources["train"].dataset(eval_transform(cfg.data))
    step = max(len(source) // count, 1)
    images = torch.stack([source[i][0] for i in range(0, len(source), step)][:count])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rows = reconstruction_images(mae, images)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    plt = pyplot()
    fig, axes = plt.subplots(3, len(images), figsize=(1.3 * len(images), 4.2), squeeze=False)
    for r, (title, batch) in enumerate(zip(("masked", "output", "target"), rows)):
        shown = (batch * std + mean).clamp(0, 1)
        for c in range(len(images)):
            axes[r][c].imshow(shown[c].permute(1, 2, 0).numpy())
            axes[r][c].axis("off")
        axes[r][0].set_title(title, fontsize=8, loc="left")
    fig.suptitle(f"MGP reconstruction (mask ratio {cfg.mgp.mask_ratio})", fontsize=9)
    fig.tight_layout()
    return fig


# -- metrics ---------------------------------------------------------------------------------------------
def shot_groups(class_counts: torch.Tensor, many_above: int, few_below: int) -> dict[str, torch.Tensor]:
    """Class masks by training frequency: many > ``many_above``, medium in [few_below, many_above], few < ``few_below``."""
    return {
        "many": class_counts > many_above,
        "medium": (class_counts >= few_below) & (class_counts <= many_above),
        "few": class_counts < few_below,
    }


def per_class_figure(per_class: torch.Tensor, class_counts: torch.Tensor, names: list[str], title: str):
    plt = pyplot()
    order = torch.argsort(class_counts, descending=True, stable=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.18 * len(order) + 2), 3.5))
    ax.bar(range(len(order)), 100 * per_class[order].numpy(), color="tab:blue")
    ax.set(ylabel="top-1 accuracy %", xlabel="classes, most frequent first", ylim=(0, 100), title=title)
    if len(order) <= 30:
        ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=70, fontsize=7)
    twin = ax.twinx()
    twin.plot(range(len(order)), class_counts[order].numpy(), color="tab:red", marker=".")
    twin.set_yscale("log")
    twin.set_ylabel("training images", color="tab:red")
    fig.tight_layout()
    return fig


class LiVTModule(pl.LightningModule):
    """Stage 2: balanced fine-tuning of the MGP encoder (or of a fresh ViT when ``mgp.enabled=false``)."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Names (dataset, loss, timm model) before any MLflow run starts; ranges are the config's checks."""
        check_finite_length(cfg.trainer, "livt's warmup + cosine schedule")
        check_data(cfg.data)
        if cfg.loss.name not in LOSSES:
            raise ConfigError(f"unknown loss.name '{cfg.loss.name}'; valid: {', '.join(LOSSES)}")
        check_timm_name(cfg.model.name)
        kwargs = cfg.model.kwargs or {}
        if "img_size" in kwargs and int(kwargs.img_size) != int(cfg.data.image_size):
            raise ConfigError(
                f"data.image_size={cfg.data.image_size} but the ViT is built for model.kwargs.img_size={kwargs.img_size}; set both alike"
            )
        if "patch_size" in kwargs and int(cfg.data.image_size) % int(kwargs.patch_size):
            raise ConfigError(f"data.image_size={cfg.data.image_size} is not a multiple of model.kwargs.patch_size={kwargs.patch_size}")
        if "embed_dim" in kwargs and int(kwargs.embed_dim) % int(kwargs.get("num_heads", 1)):
            raise ConfigError(
                f"model.kwargs.embed_dim={kwargs.embed_dim} is not a multiple of model.kwargs.num_heads={kwargs.get('num_heads')}"
            )
        with torch.device("meta"):  # a ViT with a class token, and kwargs it takes (no memory, no weights)
            create_vit(cfg.model, 2, finetune=True)
        m = cfg.mgp
        if m.decoder_dim % m.decoder_heads:
            raise ConfigError(f"mgp.decoder_dim={m.decoder_dim} is not a multiple of mgp.decoder_heads={m.decoder_heads}")
        for key, dim in (("mgp.decoder_dim", m.decoder_dim), ("model.kwargs.embed_dim", kwargs.get("embed_dim"))):
            if dim is not None and int(dim) % 4:  # MGP's fixed 2-D sine-cosine position embeddings: 4 per position
                raise ConfigError(f"{key}={dim} must be a multiple of 4 (MGP's 2-D sine-cosine position embeddings)")
        if cfg.metrics.few_below > cfg.metrics.many_above:  # else a class between them would count as both many and few
            raise ConfigError(
                f"metrics.few_below={cfg.metrics.few_below} must not exceed metrics.many_above={cfg.metrics.many_above} "
                "(few < few_below ≤ medium ≤ many_above < many)"
            )
        for key in ("mgp.crop_scale", "augment.crop_scale"):  # lengths and ranges are the config's checks
            lo, hi = OmegaConf.select(cfg, key)
            if lo > hi:
                raise ConfigError(f"{key} is [min, max] of RandomResizedCrop's area, min <= max; got {[lo, hi]}")
        policy = str(cfg.augment.randaugment)
        sections = policy.split("-")[1:] if policy.startswith("rand") else []  # (augmix-…, original-…: timm's own parsers)
        skipped = [part for part in sections if not part.startswith("t") and not re.search(r"\d", part)]
        if skipped:  # timm's RandAugment skips a section without a number: the policy would run without it, silently
            raise ConfigError(
                f"augment.randaugment={policy!r}: timm would skip {', '.join(map(repr, skipped))} (sections after 'rand' are "
                "m<magnitude>, n<layers>, p<prob>, mstd<std>, mmax<max>, inc<0|1>, t<transforms>); e.g. rand-m9-mstd0.5-inc1, or none"
            )
        try:  # timm parses the RandAugment string only when the transform is built: after MGP, without this
            train_transform(cfg.data, cfg.augment)
        except (AssertionError, ValueError, KeyError) as err:
            raise ConfigError(
                f"augment.randaugment={cfg.augment.randaugment!r} is not a timm policy ({err}); e.g. rand-m9-mstd0.5-inc1, or none"
            ) from None
        if cfg.augment.mixup > 0 or cfg.augment.cutmix > 0:
            if cfg.data.batch_size % 2:
                raise ConfigError(
                    f"mixup/cutmix pair each image with another in its batch: data.batch_size must be even, got {cfg.data.batch_size}"
                )

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (the network is built in setup, for the data's classes)."""
        return torch.nn.ModuleDict({"model": finetune_vit(cfg.model, 2, cfg.optim.drop_path)})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.model = None
        self.best: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        data: LTDataModule = self.trainer.datamodule
        counts = data.class_counts
        self.register_buffer("class_counts", counts)
        self.class_names = data.class_names
        self.mgp = None
        encoder = None
        if self.cfg.mgp.enabled:
            strategy = self.trainer.strategy if self.trainer.world_size > 1 else None
            self.mgp = mgp_stage(self.cfg, data, self.trainer.strategy.root_device, strategy)
            encoder = encoder_weights(self.mgp["state"])
        c = len(counts)
        self.model = finetune_vit(self.cfg.model, c, self.cfg.optim.drop_path, encoder)
        self.loss = make_loss(self.cfg.loss.name, counts, self.cfg.loss.tau)
        a = self.cfg.augment
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                prob=a.mixup_prob,
                switch_prob=a.mixup_switch_prob,
                label_smoothing=a.label_smoothing,
                num_classes=c,
            )
        self.groups = shot_groups(counts, self.cfg.metrics.many_above, self.cfg.metrics.few_below)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{kind}": MulticlassAccuracy(c, average=avg)
                for split in ("val", "test")
                for kind, avg in (("acc", "micro"), ("per_class", "none"))
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # raw logits: the balanced losses shift them in training only

    def on_fit_start(self) -> None:
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is None or self.mgp is None or self.global_step > 0:
            return
        tracker.log_figure(reconstruction_figure(self.cfg, self.mgp["state"], self.trainer.datamodule), "mgp/reconstruction.png")
        for epoch, value in enumerate(self.mgp["loss"].tolist()):
            tracker.log_metrics({"mgp/loss": value}, step=epoch)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None and len(x) % 2 == 0:
            x, targets = self.mixup(x, y)
        else:
            targets = smooth_one_hot(y, len(self.class_counts), self.cfg.augment.label_smoothing)
        loss = self.loss(self.model(x), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"], on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def _eval_step(self, split: str, batch) -> None:
        x, y = batch
        logits = self.model(x)
        self.metrics[f"{split}_acc"].update(logits, y)
        self.metrics[f"{split}_per_class"].update(logits, y)

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _eval_end(self, split: str) -> dict[str, float]:
        acc = self.metrics[f"{split}_acc"].compute()
        per_class = self.metrics[f"{split}_per_class"].compute().cpu()
        self.metrics[f"{split}_acc"].reset()
        self.metrics[f"{split}_per_class"].reset()
        out = {f"{split}/acc": float(acc)}
        for name, members in self.groups.items():
            if members.any():  # a group without classes (CIFAR-10-LT at ρ = 10 has no few-shot class) logs nothing
                out[f"{split}/{name}"] = float(per_class[members.cpu()].mean())
        self._per_class = per_class
        return out

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_end("val")
        if self.trainer.sanity_checking:
            return
        self.log_dict(metrics, batch_size=1, sync_dist=False)
        if metrics["val/acc"] > self.best.get("best/val_acc", -1.0):  # the reference's best epoch, logged for parity only
            self.best = {f"best/{k.replace('/', '_')}": v for k, v in metrics.items()}
            self.best["best/epoch"] = float(self.current_epoch)
        self.log_dict(self.best, batch_size=1)

    def on_test_epoch_end(self) -> None:
        metrics = self._eval_end("test")
        self.log_dict(metrics, batch_size=1)
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is not None:
            counts = self.class_counts.cpu()
            title = f"{self.cfg.data.name} ρ={self.cfg.data.rho}, {'MGP' if self.cfg.mgp.enabled else 'scratch'} + {self.cfg.loss.name}"
            tracker.log_figure(per_class_figure(self._per_class, counts, self.class_names, title), "per_class_accuracy.png")
            order = torch.argsort(counts, descending=True, stable=True).tolist()
            tracker.log_table(
                [
                    {"class": self.class_names[i], "train images": int(counts[i]), "accuracy %": round(100 * float(self._per_class[i]), 2)}
                    for i in order
                ],
                "per_class_accuracy.md",
                title="Test accuracy per class, most frequent first",
            )

    def configure_optimizers(self):
        o = self.cfg.optim
        effective = self.cfg.data.batch_size * self.cfg.trainer.accumulate_grad_batches * self.trainer.world_size
        lr = scaled_lr(o.blr, effective)
        groups = layer_decay_groups(self.model, o.weight_decay, o.layer_decay)
        for group in groups:
            group["lr"] = lr * group.pop("lr_scale")
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas))
        total = int(total_steps(self.trainer))
        per_epoch = max(total // max(self.trainer.max_epochs, 1), 1)
        warmup = int(o.warmup_epochs * per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total, warmup, o.min_lr / lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["best"] = self.best

    def on_load_checkpoint(self, checkpoint) -> None:
        self.best = checkpoint.get("best", self.best)
