"""LightningModule: the variant's branches trained with teacher forcing (STG-KD: ``CE_scene + λ_o·CE_obj + λ_d·KL(P_obj ‖
P_scene)``), validated by greedy CIDEr-D, tested by beam search with the variant's test branch (STG-KD: the scene branch
alone) and scored once over the whole split by the COCO toolkit."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from common.config import ConfigError
from common.hardware import check_finite_length, total_steps
from common.tracking import notice
from pipelines.stg_kd.data import VideoCaptionDataModule, check_data
from pipelines.stg_kd.metrics import caption_scores, java_available
from pipelines.stg_kd.model import STGKD, TEST_BRANCH, beam_search, caption_ce, check_variant, greedy_decode, kd_loss


def build_model(cfg: DictConfig, vocab: int, scene_dim: int, object_dim: int, frames: int, variant: str | None = None) -> STGKD:
    m = cfg.model
    return STGKD(variant or m.variant, vocab, scene_dim, object_dim, frames, int(cfg.data.max_words) + 1, d_model=m.d_model, heads=m.heads,
                 layers=m.layers, ff=m.ff, dropout=m.dropout, gcn_layers=m.gcn_layers, use_box=m.use_box)  # fmt: skip


def check_model(m: DictConfig) -> None:
    check_variant(m.variant)
    if m.d_model % m.heads:
        raise ConfigError(f"model.d_model {m.d_model} must be a multiple of model.heads {m.heads}")


def preview_figure(frames: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, rows: list[tuple[str, str]]):
    """Each row: the clip's frames with the detections drawn, the decoded caption and the first reference."""
    from common.tracking import pyplot

    plt = pyplot()
    n, t = frames.shape[:2]
    fig, axes = plt.subplots(n, t, figsize=(1.1 * t, 1.45 * n + 0.2), squeeze=False)
    size = frames.shape[-1]
    for i in range(n):
        for j in range(t):
            ax = axes[i, j]
            ax.imshow(frames[i, j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            for box in boxes[i, j][mask[i, j]] * size:
                x1, y1, x2, y2 = box.tolist()
                ax.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=0.6, ec="white"))
            ax.set_axis_off()
        axes[i, 0].set_title(f"ours: {rows[i][0]}\nref: {rows[i][1]}", fontsize=6, loc="left")
    fig.tight_layout()
    return fig


class STGKDModule(pl.LightningModule):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_finite_length(cfg.trainer, "stg_kd's learning-rate schedule")
        check_model(cfg.model)
        check_data(cfg.data)
        if cfg.decode.max_len > cfg.data.max_words:  # no longer than the captions it learnt (its positions end soon after)
            raise ConfigError(
                f"decode.max_len={cfg.decode.max_len} is longer than the captions the decoder is built for "
                f"(data.max_words={cfg.data.max_words}); set decode.max_len <= data.max_words"
            )

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (the network is built in setup, sized by the vocabulary and features)."""
        return torch.nn.ModuleDict({"model": build_model(cfg, 8, 4, 4, int(cfg.data.frames))})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.model: STGKD | None = None
        self._decoded: dict[str, dict[int, str]] = {}

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        data: VideoCaptionDataModule = self.trainer.datamodule
        data.setup(stage)
        self.vocab = data.vocab
        self.model = build_model(self.cfg, len(data.vocab), data.scene_dim, data.object_dim, data.frames)
        if not java_available():  # every score moves, not METEOR alone
            notice(
                "Java not found: captions are scored on whitespace tokens of lower-cased text (not the COCO toolkit's PTB "
                "tokenizer) and without METEOR, so no score is comparable with the paper's; install a Java runtime"
            )

    # -- training ------------------------------------------------------------------------------------------------------
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        targets = batch["targets"]
        logits = self.model(batch, batch["tokens_in"])
        out = {f"ce_{branch}": caption_ce(value, targets) for branch, value in logits.items()}
        variant = self.model.variant
        if variant == "stg_kd":
            k = self.cfg.kd
            teacher = logits["object"].detach() if k.detach_teacher else logits["object"]
            out["kd"] = kd_loss(logits["scene"], teacher, targets, k.temperature)
            out["loss"] = out["ce_scene"] + k.lambda_object * out["ce_object"] + k.lambda_kd * out["kd"]
        else:
            out["loss"] = out[f"ce_{TEST_BRANCH[variant]}"]
        return out

    def training_step(self, batch, batch_idx):
        out = self.losses(batch)
        n = len(batch["targets"])
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, on_step=False, on_epoch=True, batch_size=n)
        return out["loss"]

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def decode(self, batch: dict, branch: str, beam: int) -> list[str]:
        cap = self.model.captioners[branch]
        src = self.model.source(branch, batch)
        e = self.cfg.decode
        ids = greedy_decode(cap, src, e.max_len) if beam == 1 else beam_search(cap, src, beam, e.max_len, e.length_alpha)
        return [self.vocab.decode(row.tolist()) for row in ids]

    def _collect(self, key: str, batch: dict, captions: list[str]) -> None:
        self._decoded.setdefault(key, {}).update(zip(batch["index"].tolist(), captions))

    def validation_step(self, batch, batch_idx):
        out = self.losses(batch)
        self.log("val/loss", out[f"ce_{TEST_BRANCH[self.model.variant]}"], batch_size=len(batch["targets"]), sync_dist=True)
        self._collect("val", batch, self.decode(batch, TEST_BRANCH[self.model.variant], 1))

    def test_step(self, batch, batch_idx):
        branch = TEST_BRANCH[self.model.variant]
        self._collect("test", batch, self.decode(batch, branch, self.cfg.decode.beam))
        if self.model.variant == "stg_kd" and self.cfg.decode.score_teacher:  # the object branch, for the lift it should give
            self._collect("test_object", batch, self.decode(batch, "object", self.cfg.decode.beam))

    def _gathered(self, key: str) -> dict[int, str]:
        """Every rank's captions, once per video (a distributed sampler pads the split with repeats)."""
        mine = self._decoded.pop(key, {})
        if self.trainer.world_size == 1:
            return mine
        parts = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def _score(self, split: str, key: str, meteor: bool) -> dict[str, float]:
        decoded = self._gathered(key)
        refs = self.trainer.datamodule.splits[split]["captions"]
        scores = caption_scores({str(i): refs[i] for i in decoded}, {str(i): c for i, c in decoded.items()}, meteor=meteor)
        self.log_dict({f"{key}/{k}": v for k, v in scores.items()}, batch_size=1, rank_zero_only=True)
        return {**scores, "decoded": decoded}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._decoded.pop("val", None)
            return
        from pycocoevalcap.cider.cider import Cider

        decoded = self._gathered("val")
        refs = self.trainer.datamodule.splits["val"]["captions"]  # whitespace tokens: a quick CIDEr-D for model selection
        gts = {str(i): [" ".join(c.lower().split()) for c in refs[i]] for i in decoded}
        res = {str(i): [c or "unk"] for i, c in decoded.items()}
        self.log("val/cider", float(Cider().compute_score(gts, res)[0]) if decoded else 0.0, batch_size=1, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        result = self._score("test", "test", meteor=self.cfg.decode.meteor)
        if self.model.variant == "stg_kd" and self.cfg.decode.score_teacher:
            self._score("test", "test_object", meteor=self.cfg.decode.meteor)
        tracker = self.logger.experiment if self.logger is not None and self.global_rank == 0 else None
        if tracker is None:
            return
        split = self.trainer.datamodule.splits["test"]
        decoded = result["decoded"]
        rows = [
            {"video": split["ids"][i], "decoded": decoded[i], "references": " | ".join(split["captions"][i][:3])}
            for i in sorted(decoded)[:50]
        ]
        tracker.log_table(rows, "tables/test_captions.md", title=f"{self.model.variant}: test captions (beam {self.cfg.decode.beam})")
        if "frames" in split:
            k = len(split["frames"])
            figure = preview_figure(
                split["frames"], split["boxes"][:k], split["obj_mask"][:k], [(decoded[i], split["captions"][i][0]) for i in range(k)]
            )
            tracker.log_figure(figure, "panels/test_captions.png")

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.98))
        total = max(int(total_steps(self.trainer)), 1)
        warmup = min(int(o.warmup_steps), total // 2)
        lr = lambda step: (
            (step + 1) / max(warmup, 1) if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr), "interval": "step"}}
