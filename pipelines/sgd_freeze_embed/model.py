"""timm backbones with a fresh linear head, the per-family "embedding layer", the four optimizers of
the paper, the learning-rate-0 gradient diagnostic, and stage-1 pretraining for the embedded default."""

from __future__ import annotations


import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import fit_checkpoint, fit_state_dict
from common.freezing import freeze, matches, trainable_parameters
from common.models import create_timm_model
from common.tracking import pyplot

OPTIMIZERS = ("sgd", "adamw", "sgd_freeze_embed", "adamw_freeze_embed")
FAMILIES = ("vit", "clip_vit", "convnext")


class Classifier(nn.Module):
    """Backbone φ_θ (timm, no head) and a freshly initialised linear head W; inputs in [0, 1] are
    normalised inside (the reference wrappers do this too, so datasets must not normalise again)."""

    def __init__(self, backbone: nn.Module, classes: int, mean, std):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))


def create_backbone(model_cfg: DictConfig) -> nn.Module:

    kwargs = OmegaConf.to_container(model_cfg.kwargs) if model_cfg.kwargs else {}
    return create_timm_model(model_cfg.name, pretrained=model_cfg.pretrained, num_classes=0, **kwargs)


def family(backbone: nn.Module, configured: str = "auto") -> str:
    """vit | clip_vit (a ViT with a LayerNorm before the blocks, as CLIP's ln_pre) | convnext."""
    if configured != "auto":
        if configured not in FAMILIES:
            raise ConfigError(f"unknown model.family '{configured}'; valid: auto, {', '.join(FAMILIES)}")
        return configured
    from timm.models.convnext import ConvNeXt
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return "vit" if isinstance(backbone.norm_pre, nn.Identity) else "clip_vit"
    if isinstance(backbone, ConvNeXt):
        return "convnext"
    raise ConfigError(
        f"cannot tell the family of {type(backbone).__name__}; set model.family to one of {', '.join(FAMILIES)} "
        "and model.embedding.<family> to its embedding modules"
    )


def embedding_patterns(model_cfg: DictConfig, fam: str) -> list[str]:
    """Module names of the "embedding layer" of this family, as parameter-name prefixes of the Classifier."""
    names = list(model_cfg.embedding[fam])
    if fam == "convnext" and model_cfg.convnext_freeze_stage0:
        names.append("stages.0")  # the reference code's freeze_bottom_k(2): stem and all of stage 0
    return [f"backbone.{n}" for n in names]


def layer_groups(model: Classifier) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Ordered parameter groups, bottom to top, like the reference code's ``get_layers()``:
    one per top-level module of the backbone, one per block / stage, the head last."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "head":
            key = "head"
        elif parts[1] in ("blocks", "stages") and len(parts) > 2:
            key = ".".join(parts[1:3])
        elif parts[1] in ("cls_token", "pos_embed", "reg_token"):
            key = "pos_embed+cls_token"
        else:
            key = parts[1]
        groups.setdefault(key, []).append((name, param))
    return list(groups.items())


def classifier_names(backbone: nn.Module) -> tuple[str, ...]:
    """The name prefixes of a timm model's classifier (its pretrained_cfg's ``classifier``: head, head.fc, fc,
    classifier, or a distilled pair), which the backbone (num_classes=0) lacks: a whole classifier's weights load
    without them. Not all of ``head.``: ConvNeXt's head.norm is the backbone's final norm."""
    names = getattr(backbone, "pretrained_cfg", {}).get("classifier") or "head"
    return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))


def build_classifier(
    cfg: DictConfig, classes: int, backbone_state: dict | None = None, input_scale: float = 1.0
) -> tuple[Classifier, list[str]]:
    """The classifier, with the embedding frozen for the ``*_freeze_embed`` optimizers; returns (model, frozen names).
    ``input_scale``: the normalised input is divided by it (pairs with :func:`rescale_patch_input`)."""
    check_optimizer(cfg.optim)
    m = cfg.model
    backbone = create_backbone(m)
    if m.checkpoint:  # a backbone's, a whole classifier's or a Lightning checkpoint's weights (prefixes removed)
        fit_checkpoint(backbone, m.checkpoint, classifier_names(backbone))
    elif backbone_state is not None:
        fit_state_dict(backbone, backbone_state, "stage 1", classifier_names(backbone))
    cfg_norm = backbone.pretrained_cfg if m.normalization == "timm" else {}
    mean, std = cfg_norm.get("mean", (0.5, 0.5, 0.5)), [v * input_scale for v in cfg_norm.get("std", (0.5, 0.5, 0.5))]
    model = Classifier(backbone, classes, mean, std)
    frozen = freeze(model, embedding_patterns(m, family(backbone, m.family))) if cfg.optim.name.endswith("_freeze_embed") else []
    return model, frozen


# -- optimizers -----------------------------------------------------------------------------------
def check_optimizer(optim: DictConfig) -> None:
    if optim.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optim.name '{optim.name}'; valid: {', '.join(OPTIMIZERS)}")


def make_optimizer(optim: DictConfig, model: nn.Module, max_epochs: int):
    """SGD (momentum μ, dampening 0) or AdamW (PyTorch defaults, weight decay 0 as the reference code),
    on the trainable parameters only, with a per-epoch cosine schedule and no warmup."""
    check_optimizer(optim)
    params = trainable_parameters(model)
    if optim.name.startswith("sgd"):
        opt = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(max_epochs, 1))
    return opt, schedule


# -- gradient diagnostic --------------------------------------------------------------------------
def gradient_diagnostic(model: Classifier, batches, embedding: list[str], max_batches: int) -> tuple[list[dict], float]:
    """Per-group gradient norms at the start of fine-tuning: forward/backward with no update (learning
    rate 0). Per-batch norms are averaged over the batches. Returns (rows, embedding/rest ratio of
    size-normalised norms; head excluded from the rest)."""
    groups = layer_groups(model)
    sums = {name: 0.0 for name, _ in groups}
    emb_sq = rest_sq = 0.0
    in_embedding = {n: matches(n, embedding) for n, _ in model.named_parameters()}
    in_rest = {n: not n.startswith("head") and not in_embedding[n] for n in in_embedding}
    emb_n = sum(p.numel() for n, p in model.named_parameters() if in_embedding[n])
    rest_n = sum(p.numel() for n, p in model.named_parameters() if in_rest[n])
    count = 0
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)  # measure frozen groups too
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for x, y, *_ in batches:
        if count >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for name, params in groups:
            sums[name] += float(torch.sqrt(sum((p.grad.float() ** 2).sum() for _, p in params)))
        e = sum(float((p.grad.float() ** 2).sum()) for n, p in model.named_parameters() if in_embedding[n])
        r = sum(float((p.grad.float() ** 2).sum()) for n, p in model.named_parameters() if in_rest[n])
        emb_sq, rest_sq = emb_sq + e**0.5, rest_sq + r**0.5
        count += 1
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(requires[n])
    model.train(was_training)
    count = max(count, 1)
    rows = []
    for name, params in groups:
        n_params = sum(p.numel() for _, p in params)
        norm = sums[name] / count
        rows.append(
            {
                "group": name,
                "params": n_params,
                "grad_norm": norm,
                "grad_norm_per_sqrt_param": norm / n_params**0.5,
                "weight_norm": float(torch.sqrt(sum((p.detach().float() ** 2).sum() for _, p in params))),
                "embedding": in_embedding[params[0][0]],
            }
        )
    ratio = (emb_sq / count / max(emb_n, 1) ** 0.5) / max(rest_sq / count / max(rest_n, 1) ** 0.5, 1e-30)
    return rows, ratio


def diagnostic_figure(rows: list[dict], ratio: float):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.45 * len(rows)) * 1.6, 3.6))
    names = [r["group"] for r in rows]
    colours = ["tab:red" if r["embedding"] else "tab:blue" for r in rows]
    for ax, key, title in ((axes[0], "grad_norm", "‖∇‖₂"), (axes[1], "grad_norm_per_sqrt_param", "‖∇‖₂ / √#params")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_xticks(range(len(rows)), names, rotation=70, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(title)
    fig.suptitle(f"Gradient norms at the start of fine-tuning (lr 0; red: embedding); embedding/rest = {ratio:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


def rescale_patch_input(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Multiply the first layer's weights (ViT patch projection, ConvNeXt stem conv) by ``scale``; the
    classifier then divides its normalised inputs by ``scale`` (see :func:`build_classifier`). The
    function is exactly the same, but the first layer's gradient grows by 1/scale: the state the
    paper finds in CLIP (a small embedding weight behind large inputs), which a short CPU
    pretraining does not reach by itself."""
    first = next((k for k in ("patch_embed.proj.weight", "stem.0.weight") if k in state), None)
    if scale == 1.0 or first is None:
        return state
    return {k: v * scale if k == first else v for k, v in state.items()}


# -- stage 1: pretraining for the embedded default ----------------------------------------------------
def pretrained_backbone(cfg: DictConfig, source_name: str, make_source, source_files: str = "") -> dict[str, torch.Tensor]:
    """Backbone weights pretrained (AdamW, supervised) on a source domain ``make_source(n, seed)``;
    cached on disk by a hash of the model, the pretraining settings and the source (``source_files``: the hash of
    the files a real source is read from, so other or edited files train a new stage 1)."""
    p = cfg.pretrain
    model_key = {k: OmegaConf.to_container(cfg.model)[k] for k in ("name", "kwargs")}
    settings = {k: v for k, v in OmegaConf.to_container(p).items() if k != "embed_scale"}
    key = {"model": model_key, "pretrain": settings, "source": source_name}
    if source_files:  # only for real sources: a generated source's cache keeps its key
        key["files"] = source_files
    path = cache_file(cfg, "sgd_freeze_embed", "pretrained", key)

    def check(state: dict) -> None:  # weights that do not fit the backbone are built again (common.cache)
        with torch.device("meta"):
            backbone = create_backbone(cfg.model)
        fit_state_dict(backbone, state, "stage 1", classifier_names(backbone), load=False)

    return rescale_patch_input(cached(path, lambda: _pretrain(cfg, source_name, make_source), "stage 1", check=check), p.embed_scale)


def _pretrain(cfg: DictConfig, source_name: str, make_source) -> dict[str, torch.Tensor]:
    """Stage 1: supervised AdamW on ``make_source``, one-cycle schedule; returns the backbone's weights."""
    from tqdm import tqdm

    p = cfg.pretrain
    torch.manual_seed(p.seed)
    source = make_source(p.n_images, p.seed)
    backbone = create_backbone(cfg.model)
    model = Classifier(backbone, int(source.labels.max()) + 1, (0.5,) * 3, (0.5,) * 3)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = p.epochs * (p.n_images // p.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(p.seed)
    bar = tqdm(
        total=steps,
        desc=f"stage 1: pretraining {cfg.model.name} on {source_name}",
        unit="step",
        disable=not cfg.trainer.enable_progress_bar,
    )
    correct = seen = 0
    for epoch in range(p.epochs):
        order = torch.randperm(p.n_images, generator=g)
        for i in range(p.n_images // p.batch_size):
            idx = order[i * p.batch_size : (i + 1) * p.batch_size]
            logits = model(source.images[idx])
            loss = F.cross_entropy(logits, source.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            if epoch == p.epochs - 1:
                correct += int((logits.argmax(1) == source.labels[idx]).sum())
                seen += len(idx)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    print(f"stage 1 done: last-epoch training accuracy {correct / max(seen, 1):.3f}", flush=True)
    return model.backbone.state_dict()
