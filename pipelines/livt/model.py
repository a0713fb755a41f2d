"""LiVT (Xu et al., CVPR 2023): masked generative pretraining (MGP) of a timm ViT on the long-tailed training set,
then balanced fine-tuning (BFT) with the balanced binary cross-entropy. Plain nn.Modules and functions, no Lightning.

Stage 1 — :class:`MaskedAutoencoder`: MAE around a timm ``VisionTransformer`` (its own patch embedding, class token
and blocks) that encodes only the visible 25 % of the patches; a light decoder with its own position embeddings
predicts every patch; the loss is the per-patch normalised pixel error on the masked patches (:func:`mgp_loss`).

Stage 2 — :func:`finetune_vit`: the same timm ViT with global average pooling over the patch tokens, ``fc_norm`` and a
linear head; :data:`LOSSES` holds CE, BCE, Bal-CE (logit adjustment) and Bal-BCE, each a module whose ``shift`` is
added to the logits in training only (inference uses the raw logits); :func:`layer_decay_groups` is timm's layer-wise
learning-rate decay; :func:`warmup_cosine` the per-step schedule.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError
from common.models import create_timm_model


# -- backbone ---------------------------------------------------------------------------------------
def create_vit(model_cfg: DictConfig, num_classes: int = 0, finetune: bool = False, drop_path: float = 0.0) -> nn.Module:
    """A timm ViT (never downloaded). ``finetune``: global average pooling over the patch tokens + ``fc_norm`` (LiVT's
    / MAE's fine-tuning head, which also drops the final ``norm``); otherwise timm's class-token model with ``norm``."""

    kwargs = OmegaConf.to_container(model_cfg.kwargs) if model_cfg.kwargs else {}
    if finetune:
        kwargs.update(global_pool="avg", fc_norm=True)
    vit = create_timm_model(model_cfg.name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **kwargs)
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer) or vit.num_prefix_tokens != 1 or vit.no_embed_class:
        raise ConfigError(f"model.name={model_cfg.name} must be a timm VisionTransformer with one class token (vit_*_patch*)")
    return vit


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix: int = 1) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [1, prefix + h·w, dim] (zeros for the class token), as MAE."""
    from timm.layers import build_sincos2d_pos_embed

    pos = build_sincos2d_pos_embed(list(grid), dim=dim)
    return torch.cat([torch.zeros(prefix, dim), pos], 0)[None]


# -- stage 1: masked generative pretraining ---------------------------------------------------------
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 3, H, W] → [N, L, patch²·3], patches in timm's row-major order, pixels (row, column, channel) inside."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    n, length, _ = patches.shape
    side = int(round(length**0.5))
    x = patches.reshape(n, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * patch, side * patch)


def random_masking(tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``⌊L(1 − mask_ratio)⌋`` tokens per image (MAE's per-sample shuffle).

    tokens [N, L, D] → (visible [N, K, D], mask [N, L] with 1 = masked, ids_restore [N, L])."""
    n, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=tokens.device)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def mgp_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    r"""Masked-patch reconstruction loss (notes, stage 1):

    .. math:: \tilde x_p = \frac{x_p - \mathrm{mean}(x_p)}{\sqrt{\mathrm{var}(x_p) + 10^{-6}}},\qquad
              L_{MGP} = \frac{1}{|M|}\sum_{p\in M}\frac{1}{D}\lVert \hat x_p - \tilde x_p\rVert^2

    pred [N, L, D], images [N, 3, H, W], mask [N, L] (1 = masked). ``var`` is the unbiased variance, as MAE's code."""
    target = patchify(images, patch)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(nn.Module):
    """MGP: the timm ViT ``encoder`` on the visible patches only, a light Transformer decoder (timm blocks) on the
    encoded visible tokens plus mask tokens, each with fixed sine-cosine position embeddings (MAE's choice)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        if not 0 < mask_ratio < 1:
            raise ConfigError(f"mgp.mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder, self.mask_ratio, self.norm_pix = encoder, mask_ratio, norm_pix
        self.patch = encoder.patch_embed.patch_size[0]
        grid = encoder.patch_embed.grid_size
        dim = encoder.embed_dim
        encoder.pos_embed.data.copy_(sincos_pos_embed(grid, dim))
        encoder.pos_embed.requires_grad_(False)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(grid, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] → (latent [N, 1 + K, D] incl. the class token, mask [N, L], ids_restore [N, L])."""
        e = self.encoder
        x = e.patch_embed(images) + e.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio)
        cls = (e.cls_token + e.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = e.norm_pre(torch.cat([cls, x], 1))
        for block in e.blocks:
            x = block(x)
        return e.norm(x), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """→ predicted pixels of every patch [N, L, patch²·3] (the class token is dropped at the end)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        masks = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], 1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], 1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (loss, pred [N, L, patch²·3], mask [N, L])."""
        latent, mask, ids_restore = self.encode(images)
        pred = self.decode(latent, ids_restore)
        return mgp_loss(pred, images, mask, self.patch, self.norm_pix), pred, mask


def reconstruction_images(model: MaskedAutoencoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction with the visible patches pasted in, target) for a figure; with ``norm_pix`` the
    prediction is mapped back with each patch's own mean and std (MAE's visualisation)."""
    with torch.no_grad():
        _, pred, mask = model(images)
        target = patchify(images, model.patch)
        if model.norm_pix:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        m = mask[:, :, None]
        masked = unpatchify(target * (1 - m), model.patch)
        pasted = unpatchify(target * (1 - m) + pred * m, model.patch)
    return masked, pasted, images


# -- stage 2: the fine-tuning model -------------------------------------------------------------------
def load_encoder(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """MGP encoder weights into the fine-tuning ViT; only ``fc_norm`` and ``head`` stay fresh (head: std 2e-5, as MAE)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not k.startswith(("fc_norm.", "head."))]
    if fresh or unexpected:
        raise ConfigError(
            f"MGP weights do not fit the fine-tuning ViT: missing {fresh[:3]}, unexpected {unexpected[:3]} "
            "(pretrain and fine-tune need the same model.name and model.kwargs)"
        )
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)


def finetune_vit(model_cfg: DictConfig, num_classes: int, drop_path: float, encoder: dict | None = None) -> nn.Module:
    """ViT → mean over patch tokens → fc_norm → linear head; from the MGP encoder when given, else from scratch."""
    model = create_vit(model_cfg, num_classes, finetune=True, drop_path=drop_path)
    if encoder is not None:
        load_encoder(model, encoder)
    return model


# -- losses ----------------------------------------------------------------------------------------
def class_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """π_j = n_j / Σ_c n_c from the training class counts."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if (counts <= 0).any():
        raise ConfigError(f"every class needs at least one training image to define its prior; counts {counts.long().tolist()}")
    return counts / counts.sum()


class LogitShiftLoss(nn.Module):
    """A loss on ``logits + shift`` (``shift`` [C] from the class prior); ``forward`` is training only, inference
    takes the raw logits."""

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits [B, C], soft targets [B, C] (mixup/cutmix and label smoothing already in them)."""
        return self.criterion(logits.float() + self.shift, targets.float())


class SoftCE(LogitShiftLoss):
    r"""Cross-entropy with soft targets, :math:`L = -\frac1B\sum_i\sum_j y_{ij}\log\mathrm{softmax}(z_i + s)_j`."""

    @staticmethod
    def criterion(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sum(-y * F.log_softmax(z, -1), -1).mean()


class SigmoidBCE(LogitShiftLoss):
    r"""Per-class sigmoid BCE summed over classes, averaged over the batch:
    :math:`L = -\frac1B\sum_i\sum_j [y_{ij}\log\sigma(z'_{ij}) + (1-y_{ij})\log(1-\sigma(z'_{ij}))]` (the code's C·mean)."""

    @staticmethod
    def criterion(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return z.shape[-1] * F.binary_cross_entropy_with_logits(z, y)


def ce(class_counts: torch.Tensor, tau: float) -> LogitShiftLoss:
    return SoftCE(torch.zeros(len(class_counts)))


def bce(class_counts: torch.Tensor, tau: float) -> LogitShiftLoss:
    return SigmoidBCE(torch.zeros(len(class_counts)))


def bal_ce(class_counts: torch.Tensor, tau: float) -> LogitShiftLoss:
    """Logit adjustment (Menon et al. 2020): CE on ``z + τ log π``."""
    return SoftCE(tau * class_prior(class_counts).log())


def bal_bce(class_counts: torch.Tensor, tau: float) -> LogitShiftLoss:
    r"""Balanced BCE (LiVT): BCE on :math:`z'_j = z_j + \tau(\log\pi_j - \log(1-\pi_j))`. τ is a real setting here (the
    reference code hard-codes 1)."""
    prior = class_prior(class_counts)
    return SigmoidBCE(tau * (prior.log() - torch.log1p(-prior)))


LOSSES: dict[str, Callable[[torch.Tensor, float], LogitShiftLoss]] = {"ce": ce, "bce": bce, "bal_ce": bal_ce, "bal_bce": bal_bce}


def make_loss(name: str, class_counts: torch.Tensor, tau: float) -> LogitShiftLoss:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss.name '{name}'; valid: {', '.join(LOSSES)}")
    return LOSSES[name](class_counts, tau)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Hard labels → targets with ``off = s/C``, ``on = 1 − s + s/C`` (timm's / the reference's smoothing)."""
    from timm.data.mixup import one_hot

    off = smoothing / num_classes
    return one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


# -- optimisation -----------------------------------------------------------------------------------
def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise decay groups (MAE convention: embeddings id 0, block b id b+1, fc_norm/head id L+1; scale
    d^(L+1−id)); 1-D parameters, position embedding and class token get no weight decay."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    r"""lr_t / lr: linear warmup, then :math:`r + (1 - r)\,\tfrac12(1 + \cos(\pi (t - t_w)/(T - t_w)))` with r = lr_min/lr."""
    if step < warmup:
        return step / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """lr = blr · effective batch / 256 (MAE / LiVT)."""
    return base_lr * effective_batch / 256
