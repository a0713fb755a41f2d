"""SETR: a pure-Transformer encoder (timm ViT) read out at chosen layers, the three decoders of the official code
(Naive, PUP, MLA) with their auxiliary heads, the loss, SGD with the poly schedule and a ×10 head learning rate,
and sliding-window / multi-scale + flip inference. Pure nn.Modules and functions: no Lightning, no I/O.

Shapes: images ``[B, 3, H, W]`` in [0, 1] (normalised inside :class:`SETR`), token maps ``[B, C, H/p, W/p]``
(p: the patch size), logits ``[B, K, H, W]``, labels ``[B, H, W]`` with ``ignore_index`` where unlabelled.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError
from common.models import create_timm_model

IGNORE_INDEX = 255
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # mmseg's img_norm_cfg / 255
# the paper's layers for ViT-L (24 blocks), 1-based; scaled to other depths by scale_layers
REFERENCE_DEPTH = 24
AUX_LAYERS = {"naive": (10, 15, 20), "pup": (10, 15, 20, 24)}  # configs: in_index 9, 14, 19 (, 23)
MLA_LAYERS = (6, 12, 18, 24)  # vit_mla.py: mla_index (5, 11, 17, 23)


def scale_layers(reference: Sequence[int], depth: int) -> list[int]:
    """1-based layer numbers of ViT-L (24 blocks) mapped to a ViT of ``depth`` blocks: ``round(l · depth / 24)``,
    at least 1 (half rounds up, so 24 → depth always reads the last block)."""
    return [max(1, math.floor(layer * depth / REFERENCE_DEPTH + 0.5)) for layer in reference]


def check_layers(layers: Sequence[int], depth: int, what: str) -> list[int]:
    bad = [layer for layer in layers if not isinstance(layer, int) or not 1 <= layer <= depth]
    if bad:
        raise ConfigError(f"{what} has layer index {bad[0]}, but the ViT has blocks 1..{depth}; give 1-based layer numbers in that range")
    return list(layers)


# -- encoder ----------------------------------------------------------------------------------------
def interpolate_pos_embed(pos_embed: torch.Tensor, prefix: int, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize the patch part of ``pos_embed`` ``[1, prefix + gh·gw, C]`` to ``new_grid`` (bilinear, align_corners=False,
    as the official ``load_pretrained(pos_embed_interp=True)``); the class token's embedding is kept as it is."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    cls, patches = pos_embed[:, :prefix], pos_embed[:, prefix:]
    c = patches.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=new_grid, mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c)], 1)


class ViTEncoder(nn.Module):
    r"""A timm VisionTransformer read out after chosen blocks.

    :math:`z_0 = [x_p^1 E; \dots; x_p^L E] + E_{pos}`, :math:`z'_l = \mathrm{MSA}(\mathrm{LN}(z_{l-1})) + z_{l-1}`,
    :math:`z_l = \mathrm{MLP}(\mathrm{LN}(z'_l)) + z'_l`; each requested :math:`z_l` (1-based ``l``) is returned as a map
    ``[B, C, H/p, W/p]`` with the class token dropped. ``E_pos`` is interpolated to the input's grid, so any input
    size works (a remainder smaller than a patch is dropped by the stride-p projection, as in the official PatchEmbed).
    ``keep_cls_token``: the class token takes part in attention (official Naive/PUP backbone ``vit.py``) or is
    dropped right after the position embedding (official MLA backbone ``vit_mla.py``).
    """

    def __init__(self, vit: nn.Module, layers: Sequence[int], keep_cls_token: bool = True):
        super().__init__()
        self.vit = vit
        self.depth = len(vit.blocks)
        self.layers = check_layers(list(layers), self.depth, "the encoder's read-out")
        self.keep_cls_token = keep_cls_token
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        v = self.vit
        tokens = v.patch_embed.proj(x)  # [B, C, gh, gw]
        b, c, gh, gw = tokens.shape
        tokens = v.patch_embed.norm(tokens.flatten(2).transpose(1, 2))
        pos = interpolate_pos_embed(v.pos_embed, self.prefix, tuple(v.patch_embed.grid_size), (gh, gw))
        prefix = v.num_prefix_tokens
        if prefix:
            cls = v.cls_token.expand(b, -1, -1) if v.cls_token is not None else torch.zeros(b, 0, c, dtype=x.dtype, device=x.device)
            reg = [v.reg_token.expand(b, -1, -1)] if getattr(v, "reg_token", None) is not None else []
            if self.prefix:  # the position embedding covers the prefix tokens
                tokens = torch.cat([cls, *reg, tokens], 1) + pos
            else:
                tokens = torch.cat([cls, *reg, tokens + pos], 1)
        else:
            tokens = tokens + pos
        if not self.keep_cls_token:
            tokens, prefix = tokens[:, prefix:], 0
        tokens = v.norm_pre(v.pos_drop(tokens))
        wanted, out = set(self.layers), {}
        for i, block in enumerate(v.blocks[: max(self.layers)], start=1):
            tokens = block(tokens)
            if i in wanted:
                out[i] = tokens[:, prefix:].transpose(1, 2).reshape(b, c, gh, gw)
        return out


def create_vit(name: str, kwargs: dict, drop_rate: float = 0.0, key: str = "model.kwargs") -> nn.Module:
    """A timm ViT without its classifier; never downloads (pretrained=False; weights come from model.checkpoint)."""
    vit = create_timm_model(name, key, pretrained=False, num_classes=0, drop_rate=drop_rate, **kwargs)
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ConfigError(f"timm model '{name}' is not a VisionTransformer (SETR needs patch_embed, pos_embed and blocks)")
    return vit


# -- decoders ---------------------------------------------------------------------------------------
class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a map ``[B, C, h, w]`` (the heads' LN on the token sequence, eps 1e-6)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_bn_relu(cin: int, cout: int, kernel: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class NaiveHead(nn.Module):
    """SETR-Naive (``VisionTransformerUpHead``, num_conv=2, conv3x3_conv1x1=False, one upsampling):
    LN → 1×1 conv (C → 256) + BN + ReLU → 1×1 conv (256 → K) → bilinear to the input size (×p).
    Also the Naive variant's auxiliary head (the same module on layers 10, 15, 20)."""

    def __init__(self, embed_dim: int, classes: int, channels: int = 256):
        super().__init__()
        self.norm = ChannelLayerNorm(embed_dim)
        self.conv = conv_bn_relu(embed_dim, channels, 1)
        self.cls = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return upsample(self.cls(self.conv(self.norm(x))), size)


class PUPHead(nn.Module):
    """SETR-PUP (``VisionTransformerUpHead``, num_conv=4, num_upsampe_layer=4): LN, then
    [3×3 conv (256) + BN + ReLU + ×2 bilinear] three times, a fourth 3×3 conv + BN + ReLU, the 1×1 classifier,
    and the fourth ×2: H/16 → H in four ×2 steps. The classifier sits before the last upsampling, as in the
    official forward. ``stages`` = log2(patch size) keeps "×2 per stage up to full resolution" for other patch
    sizes (4 for 16-pixel patches); a final resize to the input size covers inputs that are not a multiple of p."""

    def __init__(self, embed_dim: int, classes: int, channels: int = 256, stages: int = 4):
        super().__init__()
        self.norm = ChannelLayerNorm(embed_dim)
        self.convs = nn.ModuleList([conv_bn_relu(embed_dim if i == 0 else channels, channels, 3) for i in range(stages)])
        self.cls = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.norm(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(self.cls(x), scale_factor=2, mode="bilinear", align_corners=False)
        return upsample(x, size)


class PUPAuxHead(nn.Module):
    """PUP's auxiliary head (num_conv=2, conv3x3_conv1x1=True, num_upsampe_layer=2): LN → 3×3 conv (256) + BN + ReLU
    → ×4 bilinear → 1×1 conv (K) → bilinear to the input size."""

    def __init__(self, embed_dim: int, classes: int, channels: int = 256):
        super().__init__()
        self.norm = ChannelLayerNorm(embed_dim)
        self.conv = conv_bn_relu(embed_dim, channels, 3)
        self.cls = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(self.conv(self.norm(x)), scale_factor=4, mode="bilinear", align_corners=False)
        return upsample(self.cls(x), size)


class MLANeck(nn.Module):
    """Multi-level aggregation (official ``Conv_MLA`` with the backbone's ``norm_0..3``), streams shallow → deep:
    p_i = ReLU(BN(1×1 conv(LN(z_i)))); top-down s_4 = p_4, s_3 = s_4 + p_3, s_2 = s_3 + p_2, s_1 = s_2 + p_1;
    out_i = ReLU(BN(3×3 conv(s_i)))."""

    def __init__(self, embed_dim: int, channels: int = 256, streams: int = 4):
        super().__init__()
        self.norms = nn.ModuleList([ChannelLayerNorm(embed_dim) for _ in range(streams)])
        self.lateral = nn.ModuleList([conv_bn_relu(embed_dim, channels, 1, bias=False) for _ in range(streams)])
        self.smooth = nn.ModuleList([conv_bn_relu(channels, channels, 3, bias=False) for _ in range(streams)])

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lateral = [conv(norm(m)) for m, norm, conv in zip(maps, self.norms, self.lateral)]
        summed, running = [None] * len(lateral), None
        for i in reversed(range(len(lateral))):  # deepest first
            running = lateral[i] if running is None else running + lateral[i]
            summed[i] = running
        return [smooth(s) for s, smooth in zip(summed, self.smooth)]


class MLAHead(nn.Module):
    """SETR-MLA head (official ``VIT_MLAHead``): per level two 3×3 convs (→ 128) + BN + ReLU, ×4 bilinear
    (align_corners=True); concatenate the four (512 ch) → 3×3 conv to K → bilinear to the input size."""

    def __init__(self, classes: int, channels: int = 256, head_channels: int = 128, streams: int = 4):
        super().__init__()
        self.heads = nn.ModuleList(
            [
                nn.Sequential(
                    conv_bn_relu(channels, head_channels, 3, bias=False), conv_bn_relu(head_channels, head_channels, 3, bias=False)
                )
                for _ in range(streams)
            ]
        )
        self.cls = nn.Conv2d(streams * head_channels, classes, 3, padding=1)

    def forward(self, levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = torch.cat(
            [F.interpolate(head(level), scale_factor=4, mode="bilinear", align_corners=True) for head, level in zip(self.heads, levels)], 1
        )
        return upsample(self.cls(x), size)


class MLAAuxHead(nn.Module):
    """MLA's auxiliary head on one MLA output (``VIT_MLA_AUXIHead``, in_channels 256): 1×1 conv (no bias) → input size."""

    def __init__(self, classes: int, channels: int = 256):
        super().__init__()
        self.cls = nn.Conv2d(channels, classes, 1, bias=False)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return upsample(self.cls(x), size)


class SETR(nn.Module):
    """Normalisation, encoder, one decoder and its auxiliary heads. ``forward(x)`` → logits ``[B, K, H, W]``;
    ``forward(x, with_aux=True)`` → (logits, [aux logits, …]).

    ``head``, ``aux_heads`` and (MLA) ``neck`` hold every decoder parameter. The official code gives the ×10
    learning rate to names containing "head" (decode and auxiliary heads); its MLA neck lives in the backbone
    and trains at the base rate — :func:`param_groups` keeps that split."""

    def __init__(
        self,
        encoder: ViTEncoder,
        head: nn.Module,
        aux_heads: Sequence[nn.Module],
        aux_layers: Sequence[int],
        main_layers: Sequence[int],
        neck: nn.Module | None = None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__()
        self.encoder, self.head, self.neck = encoder, head, neck
        self.aux_heads = nn.ModuleList(aux_heads)
        self.main_layers, self.aux_layers = list(main_layers), list(aux_layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        size = x.shape[-2:]
        maps = self.encoder((x - self.mean) / self.std)
        if self.neck is not None:  # MLA: the decoder and the auxiliary heads read the neck's levels
            levels = self.neck([maps[layer] for layer in self.main_layers])
            logits = self.head(levels, size)
            aux_inputs = levels
        else:
            logits = self.head(maps[self.main_layers[0]], size)
            aux_inputs = [maps[layer] for layer in self.aux_layers]
        if not with_aux:
            return logits
        return logits, [head(feature, size) for head, feature in zip(self.aux_heads, aux_inputs)]


def _naive(vit, classes, depth, aux_layers, mla_layers, channels, head_channels):
    c = vit.embed_dim
    aux_layers = aux_layers or scale_layers(AUX_LAYERS["naive"], depth)
    encoder = ViTEncoder(vit, sorted({depth, *aux_layers}))
    return SETR(encoder, NaiveHead(c, classes, channels), [NaiveHead(c, classes, channels) for _ in aux_layers], aux_layers, [depth])


def _pup(vit, classes, depth, aux_layers, mla_layers, channels, head_channels):
    c, p = vit.embed_dim, vit.patch_embed.patch_size[0]
    stages = max(1, round(math.log2(p)))
    aux_layers = aux_layers or scale_layers(AUX_LAYERS["pup"], depth)
    encoder = ViTEncoder(vit, sorted({depth, *aux_layers}))
    return SETR(encoder, PUPHead(c, classes, channels, stages), [PUPAuxHead(c, classes, channels) for _ in aux_layers], aux_layers, [depth])


def _mla(vit, classes, depth, aux_layers, mla_layers, channels, head_channels):
    c = vit.embed_dim
    layers = mla_layers or scale_layers(MLA_LAYERS, depth)
    if len(layers) != 4 or list(layers) != sorted(set(layers)):  # the top-down aggregation runs from the deepest
        raise ConfigError(f"model.mla_layers needs 4 distinct layer numbers, shallow to deep, got {list(layers)}")
    encoder = ViTEncoder(vit, sorted(set(layers)), keep_cls_token=False)
    return SETR(
        encoder,
        MLAHead(classes, channels, head_channels),
        [MLAAuxHead(classes, channels) for _ in layers],
        list(range(4)),
        layers,
        neck=MLANeck(c, channels),
    )


# decoder name → constructor(vit, classes, depth, aux_layers, mla_layers, channels, head_channels)
DECODERS: dict[str, Callable[..., SETR]] = {"naive": _naive, "pup": _pup, "mla": _mla}


def check_decoder(name: str, key: str = "model.decoder") -> None:
    if name not in DECODERS:
        raise ConfigError(f"unknown {key} '{name}'; valid: {', '.join(DECODERS)}")


def build_setr(
    decoder: str,
    vit: nn.Module,
    classes: int,
    aux_layers: Sequence[int] | None = None,
    mla_layers: Sequence[int] | None = None,
    channels: int = 256,
    head_channels: int = 128,
) -> SETR:
    """SETR-``decoder`` on ``vit``; ``aux_layers`` / ``mla_layers``: 1-based blocks, None = the paper's scaled to the depth."""
    check_decoder(decoder)
    depth = len(vit.blocks)
    if aux_layers:
        check_layers(list(aux_layers), depth, "model.aux_layers")
    if mla_layers:
        check_layers(list(mla_layers), depth, "model.mla_layers")
    return DECODERS[decoder](vit, classes, depth, list(aux_layers or []), list(mla_layers or []), channels, head_channels)


# -- loss and optimisation -------------------------------------------------------------------------
def setr_loss(
    logits: torch.Tensor,
    aux_logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    aux_weight: float = 0.4,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = CE(main) + aux_weight · Σ_a CE(aux_a), pixel-wise, ``ignore_index`` excluded. Returns (L, CE(main), Σ CE(aux))."""
    main = F.cross_entropy(logits, target, ignore_index=ignore_index)
    aux = sum((F.cross_entropy(a, target, ignore_index=ignore_index) for a in aux_logits), torch.zeros((), device=logits.device))
    return main + aux_weight * aux, main, aux


def param_groups(model: SETR, lr: float, head_lr_mult: float) -> list[dict]:
    """Encoder (and the MLA neck, which the official code keeps in the backbone) at ``lr``; decode and auxiliary
    heads at ``lr × head_lr_mult`` (official: ``paramwise_cfg custom_keys {'head': lr_mult 10}``)."""
    heads = [p for n, p in model.named_parameters() if n.startswith(("head.", "aux_heads.")) and p.requires_grad]
    head_ids = {id(p) for p in heads}
    rest = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return [{"params": rest, "lr": lr, "name": "backbone"}, {"params": heads, "lr": lr * head_lr_mult, "name": "head"}]


def poly_factor(step: int, total: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """mmcv's per-iteration poly rule as a multiplier of ``base_lr``: lr_t = (lr_0 − min_lr)(1 − t/T)^power + min_lr."""
    coeff = (1 - min(step, total) / max(total, 1)) ** power
    return ((base_lr - min_lr) * coeff + min_lr) / base_lr


def make_optimizer(
    model: SETR,
    lr: float,
    momentum: float,
    weight_decay: float,
    head_lr_mult: float,
    total_steps: int,
    power: float = 0.9,
    min_lr: float = 0.0,
):
    """SGD with momentum on the two groups, and a per-step LambdaLR that follows :func:`poly_factor` for each group."""
    groups = param_groups(model, lr, head_lr_mult)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    lambdas = [lambda step, base=g["lr"]: poly_factor(step, total_steps, base, power, min_lr) for g in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


# -- inference -------------------------------------------------------------------------------------
def window_origins(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis (mmseg's slide_inference: the last window is moved back to end at the border)."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(grids)})


def check_window(height: int, width: int, crop: Sequence[int], pad: bool) -> None:
    if (height < crop[0] or width < crop[1]) and not pad:
        raise ConfigError(
            f"sliding window {crop[0]}×{crop[1]} is larger than the {height}×{width} image and eval.pad=false; "
            "lower eval.crop or set eval.pad=true"
        )


def slide_inference(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    crop: Sequence[int],
    stride: Sequence[int],
    classes: int,
    windows_per_forward: int = 0,
    pad: bool = True,
) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` averaged over overlapping windows of size ``crop`` placed every ``stride`` pixels.

    ``windows_per_forward``: how many windows (of all images of the batch) go through one forward; 0 = all at
    once, 1 = window by window (the reference loop). The same windows and the same sums in the same order are
    computed either way, so the logits agree to float rounding. An image smaller than the crop is padded with zeros
    on the bottom/right (``pad``, as mmseg's Pad) and the padding cropped from the logits; with ``pad`` off that is
    an error, since the heads upsample to the crop's size."""
    b, _, h, w = images.shape
    ch, cw = crop
    check_window(h, w, crop, pad)
    ph, pw = max(h, ch), max(w, cw)
    if (ph, pw) != (h, w):
        images = F.pad(images, (0, pw - w, 0, ph - h))
    boxes = [(y, x) for y in window_origins(ph, ch, stride[0]) for x in window_origins(pw, cw, stride[1])]
    crops = torch.stack([images[:, :, y : y + ch, x : x + cw] for y, x in boxes], 1).flatten(0, 1)  # [B·n, 3, ch, cw], image-major
    chunk = windows_per_forward if windows_per_forward > 0 else len(crops)
    outputs = torch.cat([forward(crops[i : i + chunk]) for i in range(0, len(crops), chunk)]).view(b, len(boxes), classes, ch, cw)
    logits = images.new_zeros(b, classes, ph, pw)
    count = images.new_zeros(1, 1, ph, pw)
    for k, (y, x) in enumerate(boxes):
        logits[:, :, y : y + ch, x : x + cw] += outputs[:, k]
        count[:, :, y : y + ch, x : x + cw] += 1
    return (logits / count)[:, :, :h, :w]


def setr_multi_scale_sizes(height: int, width: int, base_short: int, crop: int, ratios: Sequence[float]) -> list[tuple[int, int]]:
    """The official ``Resize(setr_multi_scale=True)``: for each ratio r the short side becomes max(crop, r · base_short)
    (never below the crop, so every window is a full crop) and the long side keeps the aspect ratio."""
    sizes = []
    for r in ratios:
        short = max(crop, r * base_short)
        if height > width:
            sizes.append((int(short * height / width + 0.5), int(short)))
        else:
            sizes.append((int(short), int(short * width / height + 0.5)))
    return sizes


def multi_scale_inference(
    infer: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sizes: Sequence[tuple[int, int]], flip: bool = True
) -> torch.Tensor:
    """Softmax probabilities averaged over the resized (and horizontally flipped) copies, each resized back to the
    input size (mmseg's aug_test averages the per-scale softmax outputs)."""
    h, w = images.shape[-2:]
    total, n = 0, 0
    for size in sizes:
        scaled = upsample(images, size)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            probs = infer(x).softmax(1)
            probs = probs.flip(-1) if flipped else probs
            total = total + upsample(probs, (h, w))
            n += 1
    return total / n
