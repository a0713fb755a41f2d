"""The survey's four families as plain functions on an ``nn.Module`` (no Lightning, no I/O), and the measurement harness.

Families (notes: ../shared/papers/compression.md):

1. quantization and pruning — torchao (PT2E static int8 with the X86 inductor quantizer and calibration; PT2E QAT;
   eager ``quantize_`` int8 dynamic), our own packed int4 weight-only (the notes' symmetric formula, per group),
   ``torch.nn.utils.prune`` masks with the gradual cubic schedule, torch-pruning's dependency graph for channels;
2. compressed convolutions and factorisation — depthwise-separable replacement, truncated SVD / Tucker-2;
3. hardware-aware search — a MnasNet reward over a small timm MobileNet-style space with latency measured here;
4. knowledge distillation — Hinton's soft-target loss.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import statistics
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError


# -- imports with their noise silenced ----------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet():
    """torchao registers pytree constants at import (a deprecation warning through torch's logger on stderr) and the
    PT2E flow warns about deprecated torch.ao internals: neither is the user's business."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- 1a. uniform quantization (the notes' formulas) ---------------------------------------------------------------------
def quantize_symmetric(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group symmetric quantization of a weight along its flattened input dimension.

    ``s = max|w_g| / (2^{b−1} − 1)``, ``q = clamp(round(w/s), −(2^{b−1}−1), 2^{b−1}−1)``; groups are ``group_size``
    consecutive inputs of one output row (``w`` viewed as [out, in·k·k], zero-padded to a multiple of the group).
    Returns q (int8 [out, groups, group_size]) and s (float32 [out, groups, 1]).
    """
    qmax = 2 ** (bits - 1) - 1
    rows = w.detach().reshape(w.shape[0], -1).float()
    pad = (-rows.shape[1]) % group_size
    groups = F.pad(rows, (0, pad)).view(rows.shape[0], -1, group_size)
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.clamp(torch.round(groups / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``ŵ = s·q``, cropped back to the weight's shape."""
    numel = math.prod(shape[1:])
    return (q.float() * scale).reshape(shape[0], -1)[:, :numel].reshape(shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte: q + 8 ∈ [1, 15] in the low nibble (even index) and high nibble (odd index)."""
    flat = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if len(flat) % 2:
        flat = torch.cat([flat, torch.full((1,), 8, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4` (int8 values in [−8, 7], first ``numel``)."""
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    return torch.stack([low, high], 1).reshape(-1)[:numel].to(torch.int8)


class Int4WeightOnly(nn.Module):
    """A conv or linear layer whose weight is stored packed at 4 bits per value with one fp16 scale per group; the weight
    is dequantized at every forward (weight-only: activations stay in float)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, group_size: int):
        super().__init__()
        q, scale = quantize_symmetric(layer.weight, 4, group_size)
        self.shape = tuple(layer.weight.shape)
        self.q_shape = tuple(q.shape)  # [out, groups, group_size]
        self.numel = q.numel()
        self.register_buffer("packed", pack_int4(q))
        self.register_buffer("scale", scale.half())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.conv = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")} if isinstance(layer, nn.Conv2d) else None

    def weight(self) -> torch.Tensor:
        q = unpack_int4(self.packed, self.numel).view(self.q_shape)
        return dequantize_symmetric(q, self.scale.float(), self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return F.conv2d(x, self.weight(), self.bias, **self.conv)
        return F.linear(x, self.weight(), self.bias)


def int4_weight_only(model: nn.Module, group_size: int, layers: list[str] | None = None) -> nn.Module:
    """A copy of ``model`` with every conv / linear weight (or those named in ``layers``) as :class:`Int4WeightOnly`."""
    model = copy.deepcopy(model)
    for name in layers or [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        set_module(model, name, Int4WeightOnly(model.get_submodule(name), group_size))
    return model


# -- 1b. torchao: PT2E static int8 / QAT, eager dynamic int8 ------------------------------------------------------------
def export_module(model: nn.Module, example: torch.Tensor, min_batch: int = 1) -> torch.fx.GraphModule:
    """``torch.export`` with a dynamic batch dimension (calibration, evaluation and timing use different batch sizes)."""
    batch = torch.export.Dim("batch", min=min_batch, max=1 << 16)
    with quiet():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()


def x86_quantizer(qat: bool = False):
    """torchao's X86 inductor quantizer: per-channel symmetric int8 weights, per-tensor affine uint8 activations."""
    with quiet():
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    return quantizer


def strip_unused(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the parameters and buffers no node reads: ``convert_pt2e`` keeps the float weights beside their int8
    copies, which would ship 4 bytes per weight for nothing."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for key in list(graph_module.state_dict(keep_vars=True)):
        if key not in used:
            owner, _, attr = key.rpartition(".")
            module = graph_module.get_submodule(owner) if owner else graph_module
            if hasattr(module, attr):
                delattr(module, attr)
    return graph_module


def pt2e_static_int8(model: nn.Module, calibration: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """Post-training static int8: export, insert observers, run the calibration batches, convert (q/dq around int8 weights
    folded as constants); inductor fuses the pattern into int8 kernels when the result is compiled."""
    with quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        prepared = prepare_pt2e(export_module(model.eval(), calibration[0]), x86_quantizer())
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return strip_unused(convert_pt2e(prepared))


def pt2e_prepare_qat(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """QAT, step 1: fake-quantize weights and activations (straight-through estimator; BN folded into the conv weights
    during training) in the exported training graph."""
    with quiet():
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        return prepare_qat_pt2e(export_module(model.train(), example, min_batch=2), x86_quantizer(qat=True))


def pt2e_convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """QAT, step 2: the observers' ranges become the int8 model's scales."""
    with quiet():
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        move_exported_model_to_eval(prepared)
        return strip_unused(convert_pt2e(prepared))


def set_mode(model: nn.Module, training: bool) -> None:
    """``model.train()``/``eval()``, or torchao's equivalent for an exported graph (whose BN and dropout are ops)."""
    if isinstance(model, torch.fx.GraphModule) and not hasattr(model, "training_mode_switch"):
        with quiet():
            from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

            (move_exported_model_to_train if training else move_exported_model_to_eval)(model)
    else:
        model.train(training)


def torchao_int8_dynamic(model: nn.Module) -> nn.Module:
    """torchao's eager ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``: int8 weights, activations quantized
    per token at run time. It replaces Linear weights only (a conv net keeps its convolutions in float)."""
    with quiet():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        model = copy.deepcopy(model).eval()
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


# -- 1c. pruning ---------------------------------------------------------------------------------------------------------
def cubic_sparsity(step: int, final: float, start: int, steps: int, every: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³`` for t in [t_0, t_0 + nΔt], held outside."""
    progress = min(max((step - start) / max(steps * every, 1), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


def prunable(model: nn.Module, layers: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers (or those named) whose weights pruning masks."""
    if layers:
        return [(n, model.get_submodule(n)) for n in layers]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def add_masks(model: nn.Module, layers: list[str] | None = None) -> list[nn.Module]:
    """``torch.nn.utils.prune`` reparametrisation (weight = weight_orig ⊙ weight_mask) with all-ones masks."""
    from torch.nn.utils import prune

    modules = [m for _, m in prunable(model, layers)]
    for module in modules:
        prune.custom_from_mask(module, "weight", torch.ones_like(module.weight))
    return modules


def update_masks(modules: list[nn.Module], sparsity: float) -> float:
    """Global magnitude pruning: ``m = 1[|w| ≥ t]`` with t the ``sparsity``-quantile of |w| over every masked layer.
    Returns the sparsity reached (ties at t can keep a few more weights)."""
    weights = torch.cat([m.weight_orig.detach().abs().flatten() for m in modules])
    k = int(round(sparsity * len(weights)))
    if k == 0:
        for m in modules:
            m.weight_mask.fill_(1.0)
        return 0.0
    threshold = torch.kthvalue(weights, k).values
    zeros = total = 0
    for m in modules:
        mask = (m.weight_orig.detach().abs() > threshold).float()
        m.weight_mask.copy_(mask)
        zeros, total = zeros + int((mask == 0).sum()), total + mask.numel()
    return zeros / total


def remove_masks(modules: list[nn.Module]) -> None:
    """Make the pruning permanent: the masked weights become plain (dense, zero-filled) parameters."""
    from torch.nn.utils import prune

    for m in modules:
        prune.remove(m, "weight")


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of the state dict with every conv/linear weight stored as CSR (values + int64 indices): the storage format
    that would ship the sparsity, beside the dense one."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.reshape(tensor.shape[0], -1).to_sparse_csr() if name.endswith("weight") and tensor.dim() in (2, 4) else tensor
    return len(to_bytes(state))


def check_channel_ratio(model: nn.Module, ratio: float, ignore: list[str], key: str) -> None:
    """torch-pruning keeps ``int(width · (1 − ratio))`` channels of a group and silently skips a group that would keep
    none, so a ratio past ``1 − 1/width`` of the narrowest prunable layer prunes less than asked (at 0.99, nothing).
    A grouped (not depthwise) conv is pruned per group of ``width / groups`` channels; one-channel layers are never
    pruned."""

    def width(m: nn.Module) -> int:
        if isinstance(m, nn.Linear):
            return m.out_features
        return m.out_channels // m.groups if 1 < m.groups < m.out_channels else m.out_channels

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in ignore and width(m) > 1}
    if not layers or ratio <= 0:
        return
    name, narrowest = min(((n, width(m)) for n, m in layers.items()), key=lambda item: item[1])
    if int(narrowest * (1 - ratio)) < 1:
        most = math.floor((1 - 1 / narrowest) * 1e4) / 1e4
        while int(narrowest * (1 - most)) < 1:  # (1 − 0.9) · 10 rounds below 1
            most = round(most - 1e-4, 4)
        per = " per group" if getattr(layers[name], "groups", 1) > 1 else ""
        raise ConfigError(
            f"{key}={ratio} would remove every channel of {name} ({narrowest}{per}), which torch-pruning then skips: use at most {most} for this model"
        )


def prune_channels(model: nn.Module, ratio: float, example: torch.Tensor, ignore: list[str], key: str = "prune.channels") -> nn.Module:
    """Structured pruning through torch-pruning's dependency graph: rank channel groups by the L2 norm of their filters
    and remove the lowest ``ratio`` of them with every coupled input channel, BN entry and residual partner."""
    import torch_pruning as tp

    check_channel_ratio(model, ratio, ignore, key)
    model = copy.deepcopy(model).eval()
    ignored = [model.get_submodule(n) for n in ignore]
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=ignored
    )
    pruner.step()
    return model


# -- 2. compressed convolutions and factorisation -------------------------------------------------------------------------
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


def separable_candidates(model: nn.Module, min_channels: int = 8) -> list[str]:
    """Dense k×k convolutions (k > 1, one group) with enough input channels for a depthwise split to pay."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and max(m.kernel_size) > 1 and m.in_channels >= min_channels
    ]


def depthwise_separable(conv: nn.Conv2d) -> nn.Sequential:
    """MobileNet's replacement of a k×k conv (M → N): a k×k depthwise conv then a 1×1 pointwise conv.
    MACs per output pixel ``k²M + MN`` against ``k²MN`` (ratio ``1/N + 1/k²``); fresh weights, trained by fine-tuning."""
    m, n = conv.in_channels, conv.out_channels
    return nn.Sequential(
        nn.Conv2d(m, m, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=m, bias=False),
        nn.Conv2d(m, n, 1, bias=conv.bias is not None),
    )


def svd_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``W ≈ U_r Σ_r V_rᵀ``: one (n → m) layer becomes (n → r) then (r → m), exact at full rank; ``r(m + n)`` weights."""
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    first, second = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    first.weight.data = (s[:rank, None].sqrt() * vh[:rank]).contiguous()
    second.weight.data = (u[:, :rank] * s[None, :rank].sqrt()).contiguous()
    if layer.bias is not None:
        second.bias.data = layer.bias.detach().clone()
    return nn.Sequential(first, second)


def svd_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Truncated SVD of the unfolded kernel W ∈ R^{N × M k²}: a k×k conv to r channels, then a 1×1 conv to N."""
    n, m, kh, kw = conv.weight.shape
    u, s, vh = torch.linalg.svd(conv.weight.detach().reshape(n, -1), full_matrices=False)
    first = nn.Conv2d(m, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    second = nn.Conv2d(rank, n, 1, bias=conv.bias is not None)
    first.weight.data = (s[:rank, None].sqrt() * vh[:rank]).reshape(rank, m, kh, kw).contiguous()
    second.weight.data = (u[:, :rank] * s[None, :rank].sqrt()).reshape(n, rank, 1, 1).contiguous()
    if conv.bias is not None:
        second.bias.data = conv.bias.detach().clone()
    return nn.Sequential(first, second)


def tucker2_conv(conv: nn.Conv2d, rank_in: int, rank_out: int) -> nn.Sequential:
    """Tucker-2 (HOSVD on the channel modes): ``W ≈ C ×₁ U_out ×₂ U_in`` becomes 1×1 (M → r_in), k×k core (r_in → r_out),
    1×1 (r_out → N); exact when the ranks are full."""
    w = conv.weight.detach()
    n, m, kh, kw = w.shape
    u_out = torch.linalg.svd(w.reshape(n, -1), full_matrices=False)[0][:, :rank_out]  # mode-1 factor [N, r_out]
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(m, -1), full_matrices=False)[0][:, :rank_in]  # mode-2 [M, r_in]
    core = torch.einsum("nmhw,no,mi->oihw", w, u_out, u_in)
    first = nn.Conv2d(m, rank_in, 1, bias=False)
    middle = nn.Conv2d(rank_in, rank_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(rank_out, n, 1, bias=conv.bias is not None)
    first.weight.data = u_in.t().reshape(rank_in, m, 1, 1).contiguous()
    middle.weight.data = core.contiguous()
    last.weight.data = u_out.reshape(n, rank_out, 1, 1).contiguous()
    if conv.bias is not None:
        last.bias.data = conv.bias.detach().clone()
    return nn.Sequential(first, middle, last)


def factorised_layer(layer: nn.Module, rank_ratio: float, method: str) -> Callable[[], nn.Module] | None:
    """How a layer is factorised at ``rank_ratio`` of full rank (SVD for linears; SVD or Tucker-2 for convs), or None
    where that would not save weights (``r < mn/(m + n)`` for SVD)."""
    if isinstance(layer, nn.Linear):
        m, n = layer.out_features, layer.in_features
        rank = max(1, int(rank_ratio * min(m, n)))
        return (lambda: svd_linear(layer, rank)) if rank * (m + n) < m * n else None
    if isinstance(layer, nn.Conv2d):
        n, m = layer.out_channels, layer.in_channels
        k2 = layer.kernel_size[0] * layer.kernel_size[1]
        if method == "tucker":
            r_in, r_out = max(1, int(rank_ratio * m)), max(1, int(rank_ratio * n))
            return (lambda: tucker2_conv(layer, r_in, r_out)) if m * r_in + r_in * r_out * k2 + r_out * n < n * m * k2 else None
        rank = max(1, int(rank_ratio * min(n, m * k2)))
        return (lambda: svd_conv(layer, rank)) if rank * (m * k2 + n) < n * m * k2 else None
    return None


def low_rank_layers(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """The layers ``factorise`` considers: those named, else every linear and every dense k×k conv."""
    return layers or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + separable_candidates(model)


def factorise(model: nn.Module, rank_ratio: float, method: str, layers: list[str] | None = None) -> nn.Module:
    """A copy of ``model`` with its k×k convs (SVD or Tucker-2) and linears (SVD) factorised at ``rank_ratio`` of full rank,
    where that saves weights."""
    model = copy.deepcopy(model)
    for name in low_rank_layers(model, layers):
        build = factorised_layer(model.get_submodule(name), rank_ratio, method)
        if build is not None:
            set_module(model, name, build())
    return model


# -- 3. hardware-aware architecture search ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One point of the search space: a width multiplier, blocks per stage and one kernel size per stage."""

    width: float
    depths: tuple[int, ...]
    kernels: tuple[int, ...]

    def label(self) -> str:
        return f"w{self.width:g}-d{''.join(map(str, self.depths))}-k{''.join(map(str, self.kernels))}"


STAGES = ((24, 2), (40, 2), (80, 2))  # (channels at width 1, stride) of the searched stages; a 16-channel stem stage first


def build_arch(arch: Arch, classes: int) -> nn.Module:
    """A timm EfficientNet/MobileNetV2-style network (inverted residual blocks, expansion 4) of ``arch``."""
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet

    stages = [["ds_r1_k3_s1_e1_c16"]] + [[f"ir_r{d}_k{k}_s{s}_e4_c{c}"] for (c, s), d, k in zip(STAGES, arch.depths, arch.kernels)]
    return EfficientNet(
        decode_arch_def(stages),
        num_classes=classes,
        stem_size=16,
        num_features=round_channels(256, arch.width),
        round_chs_fn=lambda ch: round_channels(ch, arch.width),
    )


def sample_arch(g: torch.Generator, widths: Sequence[float], depths: Sequence[int], kernels: Sequence[int]) -> Arch:
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    return Arch(pick(list(widths)), tuple(pick(list(depths)) for _ in STAGES), tuple(pick(list(kernels)) for _ in STAGES))


def mnas_reward(accuracy: float, latency: float, target: float, alpha: float = -0.07, beta: float = -0.07) -> float:
    """MnasNet: ``ACC(m) · [LAT(m)/T]^w`` with ``w = α`` if LAT ≤ T else β (soft constraint α = β = −0.07)."""
    return accuracy * (latency / target) ** (alpha if latency <= target else beta)


# -- 4. knowledge distillation -------------------------------------------------------------------------------------------------
def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. (2015): ``(1 − α) CE(y, softmax(z_s)) + α T² KL(softmax(z_t/T) ‖ softmax(z_s/T))``."""
    hard = F.cross_entropy(student, labels)
    soft = F.kl_div(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), log_target=True, reduction="batchmean"
    )
    return (1 - alpha) * hard + alpha * temperature**2 * soft


# -- measurement ------------------------------------------------------------------------------------------------------------------
def to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def exported_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as a ``torch.export`` program (``.pt2``, any batch size), the format the runs ship (MLflow's
    ``serialization_format``)."""
    buffer = io.BytesIO()
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    example = torch.cat([example, example]) if len(example) == 1 else example  # a batch of 1 would specialise the size
    with quiet(), torch.no_grad():
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), buffer)
    return buffer.getvalue()


def program_weight_bytes(program: bytes) -> int:
    """Bytes of a ``.pt2`` program's tensors (its ``data/weights`` and ``data/constants`` files), without the graph and
    the sample inputs: on a small network the graph is most of the file (an int4 program's unpacking nodes, say)."""
    with zipfile.ZipFile(io.BytesIO(program)) as archive:
        return sum(
            i.file_size
            for i in archive.infolist()
            if ("/data/weights/" in i.filename or "/data/constants/" in i.filename) and not i.filename.endswith(".json")
        )


def count_params(model: nn.Module) -> dict[str, int]:
    """Stored values: parameters and buffers that hold weights (int8/int4 weights counted as values, not bytes), and the
    nonzero ones."""
    total = nonzero = 0
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen or "running" in name or "num_batches" in name or "mask" in name:
            continue
        seen.add(id(tensor))
        if name.endswith("packed"):  # two int4 values per byte
            numel, nz = 2 * tensor.numel(), 2 * tensor.numel()
        else:
            numel = tensor.numel()
            try:
                nz = int(torch.count_nonzero(tensor.detach()))
            except NotImplementedError:  # a torchao quantized tensor subclass: its stored int8 values
                nz = numel
        total, nonzero = total + numel, nonzero + nz
    return {"params": total, "nonzero_params": nonzero}


def count_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of one forward (fvcore: one per fused multiply-add of conv / linear / matmul; norms and
    activations not counted)."""
    from fvcore.nn import FlopCountAnalysis

    with quiet(), torch.no_grad():
        analysis = FlopCountAnalysis(model.eval(), example)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return float(analysis.total())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Milliseconds per call after ``warmup`` untimed calls, each call synchronised on CUDA: p50 and p95
    (nearest-rank) over ``iters`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    ordered = sorted(times)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return {"p50_ms": statistics.median(times), "p95_ms": rank(0.95), "mean_ms": statistics.fmean(times)}


def nvml_energy(device: torch.device) -> Callable[[], float] | None:
    """A reader of the GPU's cumulative energy counter in joules (NVML), or None (CPU, or no counter)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
    except Exception:
        return None
