"""One grid point of the LiVT bench (the reproduce children are ordinary ``lightyard train`` runs; grids and tables are
in conf/livt.yaml).

``speed_point`` times, in one process and interleaved round by round, four training steps of the run's ViT:
the MGP step (encoder on the visible 25 % of the tokens + light decoder) against a full-token step of the same
ViT (every token through the encoder, supervised CE), and the LiVT fine-tuning step (mixup/cutmix, Bal-BCE, layer-decay
AdamW) against a plain timm step (timm's ViT with its default head, hard-label cross-entropy, plain AdamW)."""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from common.hardware import resolve_accelerator, timed
from common.tracking import Tracker
from pipelines.livt.model import MaskedAutoencoder, create_vit, finetune_vit, layer_decay_groups, make_loss


def speed_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Images/s of each step and the two ratios the issue names (targets: MGP ≥ 2.5 × full-token, Bal-BCE ≥ 0.95 × timm CE)."""
    from timm.data import Mixup

    b, m = cfg.bench, cfg.mgp
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    bf16 = device.type == "cuda"
    classes = int(cfg.data.classes)
    size = int(cfg.model.kwargs.get("img_size", cfg.data.image_size)) if cfg.model.kwargs else int(cfg.data.image_size)
    x = torch.randn(b.batch_size, 3, size, size, device=device)
    y = torch.randint(0, classes, (b.batch_size,), device=device)
    counts = torch.tensor([max(1, int(1000 * 100 ** (-c / (classes - 1)))) for c in range(classes)])

    mae = MaskedAutoencoder(create_vit(cfg.model), m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mask_ratio, m.norm_pix).to(device)
    full = create_vit(cfg.model, classes).to(device)  # the same ViT on every token
    livt = finetune_vit(cfg.model, classes, cfg.optim.drop_path).to(device)
    timm_ce = create_vit(cfg.model, classes, drop_path=cfg.optim.drop_path).to(device)
    loss = make_loss("bal_bce", counts, cfg.loss.tau).to(device)
    a = cfg.augment
    # the notes' fine-tuning recipe (mixup 0.8, cutmix 1.0) whatever the preset trains with: the step the issue names
    mixup = Mixup(mixup_alpha=b.mixup, cutmix_alpha=b.cutmix, label_smoothing=a.label_smoothing, num_classes=classes)
    groups = layer_decay_groups(livt, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for group in groups:
        group["lr"] = 1e-4 * group.pop("lr_scale")
    optimizers = {
        "mgp": torch.optim.AdamW(mae.parameters(), lr=1e-4, betas=(0.9, 0.95)),
        "full_token": torch.optim.AdamW(full.parameters(), lr=1e-4, betas=(0.9, 0.95)),
        "bal_bce": torch.optim.AdamW(groups, lr=1e-4),
        "timm_ce": torch.optim.AdamW(timm_ce.parameters(), lr=1e-4),
    }

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if name == "mgp":
                    value = mae(x)[0]
                elif name == "full_token":
                    value = F.cross_entropy(full(x), y)
                elif name == "bal_bce":
                    mixed, targets = mixup(x.clone(), y)
                    value = loss(livt(mixed), targets)
                else:
                    value = F.cross_entropy(timm_ce(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            value.backward()
            optimizers[name].step()

        return run

    for model in (mae, full, livt, timm_ce):
        model.train()
    best = {name: float("inf") for name in optimizers}
    for round_ in range(int(b.repeats) + 1):  # round 0 warms up (allocator, kernels)
        for name in optimizers:
            seconds, _ = timed(step(name), device, int(b.steps))
            if round_ > 0:
                best[name] = min(best[name], seconds)
    rate = {name: b.batch_size * b.steps / seconds for name, seconds in best.items()}
    out = {f"{name}_images_per_s": value for name, value in rate.items()}
    out.update(
        mgp_over_full_token=rate["mgp"] / rate["full_token"],
        bal_bce_over_timm_ce=rate["bal_bce"] / rate["timm_ce"],
        visible_tokens=float(int(mae.encoder.patch_embed.num_patches * (1 - m.mask_ratio))),
        tokens=float(mae.encoder.patch_embed.num_patches),
        decoder_blocks=float(m.decoder_depth),
        decoder_width=float(m.decoder_dim),
        torch_threads=float(torch.get_num_threads()),
    )
    print(
        f"MGP {rate['mgp']:.0f} img/s vs full-token {rate['full_token']:.0f} img/s: {out['mgp_over_full_token']:.2f}×; "
        f"Bal-BCE fine-tune {rate['bal_bce']:.0f} vs timm CE {rate['timm_ce']:.0f} img/s: {out['bal_bce_over_timm_ce']:.3f}×",
        flush=True,
    )
    return out
