"""LightningModule: fine-tune backbone + fresh head with one of the four optimizers; each epoch evaluates
ID validation (model selection), ID test and OOD test (with worst group), and keeps the test numbers
of the epoch with the best ID validation accuracy (the paper's early stopping)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from common.config import ConfigError, with_values
from common.data import fit_checkpoint, image_counts
from common.models import check_timm_name
from pipelines.sgd_freeze_embed.data import (
    CIFAR_LAYOUT,
    GENERATED,
    WATERBIRDS_TRAIN_MIX,
    ShiftDataModule,
    check_data,
    check_stage1_size,
    cifar_digest,
    cifar_source,
    source_domain,
)
from pipelines.sgd_freeze_embed.model import (
    Classifier,
    build_classifier,
    check_optimizer,
    classifier_names,
    create_backbone,
    diagnostic_figure,
    embedding_patterns,
    family,
    gradient_diagnostic,
    make_optimizer,
    pretrained_backbone,
)


def num_classes(dataset) -> int:
    if hasattr(dataset, "tensors"):
        return int(dataset.tensors[1].max()) + 1
    if hasattr(dataset, "records"):
        return max(label for _, label, _ in dataset.records) + 1
    raise ConfigError("cannot infer the number of classes of this dataset; set data.classes")


def runs_stage1(cfg: DictConfig) -> bool:
    """Stage 1 runs when it is on and no weights are given (for the generated sets and the CIFAR-10 setting)."""
    return bool(cfg.pretrain.enabled and not cfg.model.checkpoint and not cfg.model.pretrained)


def backbone_weights(cfg: DictConfig) -> dict | None:
    """Stage 1 for the embedded default (and the CIFAR-10 setting) when no weights are given."""
    if not runs_stage1(cfg):
        return None
    if cfg.data.name in GENERATED:
        return pretrained_backbone(cfg, "shapes", source_domain)
    if cfg.data.name == "cifar10_cue":
        root, cache = cfg.data.root, cfg.paths.cache_dir
        return pretrained_backbone(cfg, "cifar10", lambda n, seed: cifar_source(root, n, seed, cache), cifar_digest(root))
    return None


class FineTuneModule(pl.LightningModule):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Before any MLflow run starts: the optimizer and the timm model name."""
        check_optimizer(cfg.optim)
        check_data(cfg.data)
        check_timm_name(cfg.model.name)
        if cfg.model.checkpoint:  # names and shapes, on a meta-device backbone
            with torch.device("meta"):
                backbone = create_backbone(with_values(cfg, {"model.pretrained": False}).model)
            fit_checkpoint(backbone, cfg.model.checkpoint, classifier_names(backbone), load=False)
        if cfg.bench.model is not None:  # a memory-bench point (the grid sets bench.model)
            from pipelines.sgd_freeze_embed.experiments import check_memory_bench

            check_memory_bench(cfg.bench)
        if cfg.data.name == "cifar10_cue" and runs_stage1(cfg):  # stage 1 draws its images from the folder's training split
            check_stage1_size(cfg.pretrain.n_images, image_counts(cfg.data.root, CIFAR_LAYOUT)["train"], cfg.data.root)

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (the network is built in setup, after stage 1, for the data's classes)."""
        # the names only: no pretrained weights (preset=paper's would be fetched from the Hub, or fail offline)
        backbone = create_backbone(OmegaConf.merge(cfg.model, {"pretrained": False}))
        return torch.nn.ModuleDict({"model": Classifier(backbone, 2, (0.5,) * 3, (0.5,) * 3)})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_optimizer(cfg.optim)
        self.cfg = cfg
        self.model = None
        self.frozen: list[str] = []
        self.best = {"val_acc": -1.0}
        self._counts: dict[int, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        if self.model is None:
            splits = self.trainer.datamodule.splits
            classes = self.cfg.data.classes or num_classes(splits["train"])
            weights = backbone_weights(self.cfg)
            scale = self.cfg.pretrain.embed_scale if weights is not None else 1.0
            self.model, self.frozen = build_classifier(self.cfg, classes, weights, scale)
            self.num_classes = classes

    def forward(self, x):
        return self.model(x)

    def model_for_export(self):
        """(classifier, example batch) for logger.log_model; inputs as the datamodule gives them (normalised images)."""
        size = self.cfg.data.image_size
        return self.model, torch.zeros(2, 3, size, size)

    # -- diagnostic ---------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if not self.cfg.diagnostic.enabled or self.global_step > 0:
            return
        fam = family(self.model.backbone, self.cfg.model.family)
        embedding = embedding_patterns(self.cfg.model, fam)
        rows, ratio = gradient_diagnostic(self.model, self.trainer.train_dataloader, embedding, self.cfg.diagnostic.batches)
        self.diagnostic = (rows, ratio)
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is not None:  # the group norms as metrics too, so that experiment reports can tabulate them
            norms = {f"grad/norm/{row['group'].replace('+', '_')}": row["grad_norm"] for row in rows}
            tracker.log_metrics({"grad/embed_over_rest": ratio, **norms}, step=0)
            tracker.log_table(
                rows, "diagnostic/gradient_norms.md", title=f"Gradient norms at lr 0 ({fam}; embedding = {', '.join(embedding)})"
            )
            tracker.log_figure(diagnostic_figure(rows, ratio), "diagnostic/gradient_norms.png")
        print(f"gradient diagnostic: embedding/rest (size-normalised) = {ratio:.2f}", flush=True)

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._counts = {}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, group = batch
        correct = (self.model(x).argmax(1) == y).long()
        # per loader: [correct, total] overall and for groups 0..3 (group −1: none)
        counts = self._counts.setdefault(dataloader_idx, torch.zeros(5, 2, dtype=torch.long, device=y.device))
        counts[0] += torch.stack([correct.sum(), torch.tensor(len(y), device=y.device)])
        for g in range(4):
            sel = group == g
            counts[g + 1] += torch.stack([correct[sel].sum(), sel.sum()])

    def on_validation_epoch_end(self) -> None:
        names = [k for k in ShiftDataModule.EVAL if k in self.trainer.datamodule.splits]
        metrics = {}
        for idx, counts in self._counts.items():
            counts = counts.cpu().double()
            name = names[idx]
            metrics[f"{name}_acc"] = float(counts[0, 0] / counts[0, 1].clamp(min=1))
            present = counts[1:, 1] > 0
            if present.any():
                group_acc = counts[1:, 0] / counts[1:, 1].clamp(min=1)
                metrics[f"{name}_worst_group_acc"] = float(group_acc[present].min())
                if name == "test" and self.cfg.data.name == "waterbirds_real":  # Waterbirds' ID: re-weighted to the training mix
                    w = torch.tensor(WATERBIRDS_TRAIN_MIX, dtype=torch.double)[present]
                    metrics["test_acc"] = float((group_acc[present] * w).sum() / w.sum())
        if self.trainer.sanity_checking or not metrics:
            return
        self.log_dict(metrics, batch_size=1)
        if metrics.get("val_acc", -1) > self.best["val_acc"]:
            self.best = {**metrics, "epoch": float(self.current_epoch)}
        self.log_dict({f"best/{k}": v for k, v in self.best.items()}, batch_size=1)
        if hasattr(self, "diagnostic"):  # also into the run's final metrics (the runs table)
            self.log("grad/embed_over_rest", self.diagnostic[1], batch_size=1)

    def configure_optimizers(self):
        opt, schedule = make_optimizer(self.cfg.optim, self.model, self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["best"] = self.best

    def on_load_checkpoint(self, checkpoint) -> None:
        self.best = checkpoint.get("best", self.best)
