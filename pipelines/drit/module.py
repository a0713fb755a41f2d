"""Lightning glue of DRIT / DRIT++: manual optimisation of the three optimiser groups (D_c; the four domain
discriminators; E_c + E_a + G), the notes' d_iter schedule, D_c gradient clipping, the linear lr decay per epoch; DDP by
averaging each group's gradients across processes before its step; test metrics (diversity, FID, KID, domain accuracy,
layout IoU on the generated domains) and sample grids."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import fit_state_dict
from common.hardware import check_manual_step
from common.tracking import notice, pyplot
from pipelines.drit.data import UnpairedDataModule, check_data, layout_iou, layout_mask, to_unit
from pipelines.drit.model import (
    DRIT,
    ClassifierFeatures,
    DomainClassifier,
    LossWeights,
    StepHooks,
    linear_decay,
    perceptual_distance,
    train_iteration,
)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # what torchmetrics' FID (torch-fidelity) would download
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, LPIPS's default backbone


def local_weights(name: str) -> bool:
    """Whether a pretrained file is already in torch's hub cache (nothing is downloaded at run time)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def build_net(cfg: DictConfig, channels: int) -> DRIT:
    m = cfg.model
    return DRIT(channels, m.width, m.blocks, m.nz, m.dis_width, m.dis_layers, m.dis_scales, m.content_dis_layers)


def loss_weights(cfg: DictConfig) -> LossWeights:
    """The loss weights; without a content discriminator its adversarial weight is 0 (and D_c is never updated)."""
    weights = LossWeights(**OmegaConf.to_container(cfg.loss, resolve=True))
    if not cfg.model.content_discriminator:
        weights.content_adv = 0.0
    return weights


# -- the cached domain classifier (feature network of the metrics) ---------------------------------------------------
def train_classifier(cfg: DictConfig, data: UnpairedDataModule, channels: int) -> dict:
    """A small CNN separating the domains' training images (Adam, cross-entropy); returns its weights and test accuracy."""
    c = cfg.metrics.classifier
    torch.manual_seed(c.seed)
    net = DomainClassifier(channels, c.width)
    images = torch.cat([torch.from_numpy(data.arrays["trainA"]), torch.from_numpy(data.arrays["trainB"])]).permute(0, 3, 1, 2).float() / 255
    labels = torch.cat([torch.zeros(len(data.arrays["trainA"])), torch.ones(len(data.arrays["trainB"]))]).long()
    images = crop_center(images, cfg.data.crop_size)
    opt = torch.optim.Adam(net.parameters(), lr=c.lr)
    g = torch.Generator().manual_seed(c.seed)
    for _ in range(c.epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(order), c.batch_size):
            batch = order[start : start + c.batch_size]
            x = images[batch]
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(net(x), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = torch.cat([torch.from_numpy(data.arrays["testA"]), torch.from_numpy(data.arrays["testB"])]).permute(0, 3, 1, 2).float() / 255
    truth = torch.cat([torch.zeros(len(data.arrays["testA"])), torch.ones(len(data.arrays["testB"]))]).long()
    with torch.no_grad():
        accuracy = (net(crop_center(test, cfg.data.crop_size)).argmax(1) == truth).float().mean()
    return {"state": net.state_dict(), "test_acc": accuracy}


def crop_center(images: torch.Tensor, size: int) -> torch.Tensor:
    top = (images.shape[-1] - size) // 2
    return images[..., top : top + size, top : top + size]


def classifier_stage(cfg: DictConfig, data: UnpairedDataModule, channels: int, strategy=None) -> dict:
    """Cached by the data's identity and every classifier setting (not the run's seed or the GAN's settings)."""
    key = {"data": data.identity(), "crop": cfg.data.crop_size, "classifier": OmegaConf.to_container(cfg.metrics.classifier, resolve=True)}
    path = cache_file(cfg, "drit", "classifier", key)

    def build() -> dict:
        with torch.inference_mode(False), torch.enable_grad():  # the test loop runs under inference mode
            return train_classifier(cfg, data, channels)

    def check(stage: dict) -> None:  # a file this version did not build is built again (common.cache)
        with torch.device("meta"):
            fit_state_dict(DomainClassifier(channels, cfg.metrics.classifier.width), stage["state"], "domain classifier", load=False)
        float(stage["test_acc"])

    return cached(path, build, "domain classifier", strategy, check)


# -- the module ------------------------------------------------------------------------------------------------------
class DRITModule(pl.LightningModule):
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_data(cfg.data)
        start, epochs = cfg.optim.decay_start_epoch, cfg.trainer.max_epochs
        if start >= 0 and not (epochs or 0) > start:  # (no decay at all, or a division by zero with max_epochs=-1)
            raise ConfigError(
                f"optim.decay_start_epoch={start} needs trainer.max_epochs above it (the lr decays from it to the last "
                f"epoch), got {epochs}; or -1: no decay"
            )
        side = cfg.data.crop_size // 4
        if side >> cfg.model.content_dis_layers < 2:  # InstanceNorm needs more than one spatial element
            raise ConfigError(
                f"model.content_dis_layers={cfg.model.content_dis_layers} halves the {side}×{side} content code to "
                f"{max(side >> cfg.model.content_dis_layers, 1)}×{max(side >> cfg.model.content_dis_layers, 1)}; "
                + (
                    f"use at most {int(math.log2(side)) - 1} at crop {cfg.data.crop_size}"
                    if side >= 4
                    else f"data.crop_size={cfg.data.crop_size} is too small for any content discriminator: use at least 16"
                )
            )
        side = cfg.data.crop_size  # the image discriminators: scale i sees the crop pooled i times, each layer halves it
        for scale in range(cfg.model.dis_scales):
            side = side if scale == 0 else -(-side // 2)
            if side >> (cfg.model.dis_layers - 1) < 2:  # a 4×4 stride-2 convolution needs 2 pixels (with its padding)
                raise ConfigError(
                    f"model.dis_layers={cfg.model.dis_layers} with model.dis_scales={cfg.model.dis_scales} halves the crop "
                    f"({cfg.data.crop_size} px) below the discriminator's kernel at scale {scale + 1}; lower them or raise data.crop_size"
                )
        check_manual_step(cfg.trainer, "drit's hand-stepped GAN updates")
        if cfg.metrics.samples < 2:
            raise ConfigError(f"metrics.samples must be >= 2 (diversity compares outputs pairwise), got {cfg.metrics.samples}")

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (the network is built in setup, for the data's channels)."""
        return torch.nn.ModuleDict({"net": build_net(cfg, 3)})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.automatic_optimization = False
        self.net: DRIT | None = None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # the d_iter schedule's counter (resumes)
        self.trace: list[str] | None = None  # tests: order of loss computations and optimiser steps

    def setup(self, stage: str) -> None:
        if self.net is not None:
            return
        data = self.trainer.datamodule
        self.channels = data.channels
        self.net = build_net(self.cfg, self.channels)

    # -- training ------------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        betas = tuple(o.betas)

        def adam(params, lr):
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay)

        opts = [
            adam(self.net.dis_c.parameters(), o.content_lr),
            adam(self.net.discriminator_parameters(), o.lr),
            adam(self.net.encoder_generator_parameters(), o.lr),
        ]
        epochs, start = max(int(self.trainer.max_epochs or 1), 1), int(o.decay_start_epoch)
        schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: linear_decay(e, epochs, start)) for opt in opts]
        return opts, schedules

    def _hooks(self) -> StepHooks:
        opts = dict(zip(("content_d", "d", "eg"), self.optimizers()))
        ddp = self.trainer.world_size > 1

        def sync(name: str) -> None:
            """DDP: one all-reduce of this group's gradients, averaged (the reducer assumes one backward per forward;
            here there are several, each into a subset of the parameters, so every backward runs outside it)."""
            if not ddp:
                return
            params = [p for group in opts[name].optimizer.param_groups for p in group["params"] if p.requires_grad]  # not frozen ones
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            torch.distributed.all_reduce(flat)
            flat /= self.trainer.world_size
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

        block = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)  # DDP's no_sync

        def backward(loss, inputs, retain_graph=False):
            with block():
                self.manual_backward(loss, inputs=inputs, retain_graph=retain_graph)

        return StepHooks(
            backward=backward,
            zero_grad=lambda name: opts[name].zero_grad(set_to_none=True),
            step=lambda name: opts[name].step(),
            clip=lambda name, norm: self.clip_gradients(opts[name], gradient_clip_val=norm, gradient_clip_algorithm="norm"),
            sync=sync,
            trace=self.trace,
        )

    def training_step(self, batch, batch_idx):
        o = self.cfg.optim
        logs = train_iteration(
            self.net,
            batch,
            int(self.iteration),
            self.cfg.seed,
            loss_weights(self.cfg),
            o.d_iter,
            self.cfg.model.content_noise,
            o.content_clip,
            self._hooks(),
        )
        self.iteration += 1
        # only the E/G iterations return losses, and self.log costs ~0.3 ms a key (a dozen keys: several % of a quick
        # iteration, the bench's Lightning-vs-loop gap): log the E/G iterations whose batch the logger writes anyway
        # (iteration = d_iter · m, and Lightning writes batch n when n % log_every_n_steps == 0)
        if logs and (self.iteration // o.d_iter) % self.trainer.log_every_n_steps == 0:
            self.log_dict(
                {f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=len(batch[0]), prog_bar=False
            )

    def on_train_epoch_end(self) -> None:
        for schedule in self.lr_schedulers():
            schedule.step()

    # -- evaluation ------------------------------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        data = self.trainer.datamodule
        strategy = self.trainer.strategy if self.trainer.world_size > 1 else None
        stage = classifier_stage(self.cfg, data, self.channels, strategy)
        classifier = DomainClassifier(self.channels, self.cfg.metrics.classifier.width)
        classifier.load_state_dict(stage["state"])
        classifier.eval().requires_grad_(False)
        self.classifier_acc = float(stage["test_acc"])
        self.classifier = classifier.to(self.device)  # registered after the weights were saved: not in checkpoints
        n_test = len(data.dataset("test"))
        subset = min(int(self.cfg.metrics.kid_subset), n_test)
        if subset < self.cfg.metrics.kid_subset:  # (KID is biased by its subset size: a changed value is said)
            notice(f"metrics.kid_subset={self.cfg.metrics.kid_subset} is more than the {n_test} test images; KID's subsets hold {subset}")
        inception = local_weights(INCEPTION_WEIGHTS) and self.channels == 3
        feature = 2048 if inception else ClassifierFeatures(self.classifier)
        self.eval_metrics = torch.nn.ModuleDict(
            {
                **{f"fid_{d}": FrechetInceptionDistance(feature=feature, normalize=True) for d in ("ab", "ba")},
                **{
                    f"kid_{d}": KernelInceptionDistance(feature=feature, subset_size=subset, subsets=20, normalize=True)
                    for d in ("ab", "ba")
                },
                **{f"acc_{d}": BinaryAccuracy() for d in ("ab", "ba")},
                "diversity": MeanMetric(),
                "layout_iou": MeanMetric(),
            }
        ).to(self.device)
        self.lpips = None
        if local_weights(ALEXNET_WEIGHTS) and self.channels == 3:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(self.device)
        self.generator = torch.Generator(device="cpu").manual_seed(self.cfg.seed + 12345)
        self.grid_batch = None

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            return torch.stack([self.lpips(a[i : i + 1], b[i : i + 1]) for i in range(len(a))])
        return perceptual_distance(self.classifier.layers(a), self.classifier.layers(b))

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        k, nz, m = self.cfg.metrics.samples, self.cfg.model.nz, self.eval_metrics
        if self.grid_batch is None:
            self.grid_batch = (x[: self.cfg.metrics.grid_inputs].cpu(), y[: self.cfg.metrics.grid_inputs].cpu())
        for source, real, src, direction, target_label in ((x, y, "x", "ab", 1), (y, x, "y", "ba", 0)):
            z = torch.randn(k, len(source), nz, generator=self.generator).to(self.device)
            outs = [to_unit(self.net.translate(source, src, z[j])) for j in range(k)]
            m[f"fid_{direction}"].update(to_unit(real), real=True)
            m[f"fid_{direction}"].update(outs[0], real=False)
            m[f"kid_{direction}"].update(to_unit(real), real=True)
            m[f"kid_{direction}"].update(outs[0], real=False)
            m[f"acc_{direction}"].update(self.classifier(outs[0]).argmax(1), torch.full((len(source),), target_label, device=self.device))
            for i in range(k):
                for j in range(i + 1, k):
                    m["diversity"].update(self._distance(outs[i], outs[j]))
            if self.cfg.data.name == "generated":
                m["layout_iou"].update(layout_iou(layout_mask(outs[0] * 2 - 1), layout_mask(source)))

    def on_test_epoch_end(self) -> None:
        m = self.eval_metrics
        out = {}
        for d in ("ab", "ba"):
            out[f"test/fid_{d}"] = float(m[f"fid_{d}"].compute())
            out[f"test/kid_{d}"] = float(m[f"kid_{d}"].compute()[0])
            out[f"test/domain_acc_{d}"] = float(m[f"acc_{d}"].compute())
        out["test/fid"] = (out["test/fid_ab"] + out["test/fid_ba"]) / 2
        out["test/kid"] = (out["test/kid_ab"] + out["test/kid_ba"]) / 2
        out["test/domain_acc"] = (out["test/domain_acc_ab"] + out["test/domain_acc_ba"]) / 2
        out["test/diversity"] = float(m["diversity"].compute())
        if self.cfg.data.name == "generated":
            out["test/layout_iou"] = float(m["layout_iou"].compute())
        out["test/classifier_acc"] = self.classifier_acc
        self.log_dict(out, batch_size=1, sync_dist=False)
        if self.trainer.is_global_zero:  # the method's effect in one line
            layout = f", layout IoU {out['test/layout_iou']:.2f}" if "test/layout_iou" in out else ""
            print(
                f"drit ({'DRIT++' if self.cfg.loss.mode_seeking > 0 else 'DRIT'}): translations classified as the target domain "
                f"{100 * out['test/domain_acc']:.0f} % (classifier on real test images {100 * self.classifier_acc:.0f} %){layout}, "
                f"diversity {out['test/diversity']:.3f} over {self.cfg.metrics.samples} random attributes, FID {out['test/fid']:.3f}",
                flush=True,
            )
        tracker = self.logger.experiment if self.logger is not None else None
        if tracker is not None and self.grid_batch is not None:
            x, y = (t.to(self.device) for t in self.grid_batch)
            for src, source, reference, name in (("x", x, y, "samples_a2b.png"), ("y", y, x, "samples_b2a.png")):
                tracker.log_figure(self.sample_grid(source, src, reference), name)
        del self.classifier

    @torch.no_grad()
    def sample_grid(self, source: torch.Tensor, src: str, reference: torch.Tensor):
        """Columns: input, ``metrics.samples`` outputs with z ~ N(0, I), the reference image, the reference-guided output."""
        target = "y" if src == "x" else "x"
        g = torch.Generator().manual_seed(self.cfg.seed)
        zs = [torch.randn(len(source), self.cfg.model.nz, generator=g).to(self.device) for _ in range(self.cfg.metrics.samples)]
        ref_mu = self.net.enc_a[target](reference)[0]
        columns = [source] + [self.net.translate(source, src, z) for z in zs] + [reference, self.net.translate(source, src, ref_mu)]
        titles = ["input"] + [f"z{i + 1}" for i in range(len(zs))] + ["reference", "ref.-guided"]
        plt = pyplot()
        rows = len(source)
        fig, axes = plt.subplots(rows, len(columns), figsize=(1.1 * len(columns), 1.1 * rows + 0.4), squeeze=False)
        for c, (title, images) in enumerate(zip(titles, columns)):
            shown = to_unit(images).cpu()
            for r in range(rows):
                ax = axes[r][c]
                ax.imshow(shown[r].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if shown.shape[1] == 1 else None)
                ax.axis("off")
            axes[0][c].set_title(title, fontsize=7)
        fig.suptitle(f"{'A→B' if src == 'x' else 'B→A'} ({'DRIT++' if self.cfg.loss.mode_seeking > 0 else 'DRIT'})", fontsize=8)
        fig.tight_layout()
        return fig
