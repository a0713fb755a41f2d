"""InputIBA (Zhang et al., NeurIPS 2021) as pure functions over a fixed classifier: no Lightning, no I/O.

Three stages per explained image x with target y (notes: ../shared/papers/input_iba.md):

1. feature bottleneck (IBA) on a latent layer l, prior N(μ_R, σ_R²) estimated from data   → :func:`feature_iba`
2. WGAN that learns an input-space prior mask M_G whose latent samples look like stage 1's  → :func:`gan_prior`
3. input bottleneck with that prior, optimised per image; the map is sigmoid(α_I)           → :func:`input_iba`

Every stage works on a batch of B images at once with **one bottleneck per image** (parameters of shape (B, …)) and
the summed per-image loss: the Adam/RMSprop updates are elementwise, so image i's parameters follow exactly the
trajectory they would alone, and each image draws its noise from its own generator (:func:`image_generators`). The
bench checks batched against one-by-one heatmaps.

The classifier is any ``nn.Module``; the latent layer is named (``layer1``, ``blocks.1``) and reached by a forward
hook (:class:`LatentHook`), so timm CNNs (B, C, h, w) and ViTs (B, N, D) work alike.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError

# -- the latent layer ----------------------------------------------------------------------------------------------


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an unknown name is one line listing the valid ones (two levels deep)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    shown = [n for n in modules if n and n.count(".") <= 1]
    raise ConfigError(f"unknown layer '{name}' of {type(model).__name__}; valid: {', '.join(shown)} (and their submodules)")


class _Stop(Exception):
    """Raised by the hook to end a forward pass once the latent is captured (f_l without the rest of f)."""


class LatentHook:
    """A forward hook on the latent layer: records its output R, optionally replaces it by ``replace(R)`` (the
    bottleneck's Z), or stops the forward pass there (``latent(x)`` = f_l(x))."""

    def __init__(self, model: nn.Module, layer: str):
        self.model, self.layer = model, layer
        self.replace: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.stop = False
        self.output: torch.Tensor | None = None
        self.handle = find_layer(model, layer).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output):
        if not torch.is_tensor(output):
            raise ConfigError(f"layer '{self.layer}' returns {type(output).__name__}, not a tensor; choose another layer")
        self.output = output
        if self.stop:
            raise _Stop
        if self.replace is not None:
            return self.replace(output)
        return None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """f_l(x): the latent of a batch, the rest of the network not run."""
        self.stop = True
        try:
            with contextlib.suppress(_Stop):  # the hook ends the forward pass at layer l
                self.model(x)
        finally:
            self.stop = False
        return self.output

    def remove(self) -> None:
        self.handle.remove()


def spatial(t: torch.Tensor) -> torch.Tensor:
    """A per-element latent map as an image-like (B, C, h, w): CNN latents as they are; ViT tokens (B, N, D) without
    the prefix (class, register) tokens, on their square grid."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        b, n, d = t.shape
        for prefix in range(9):  # class / register tokens come first
            side = math.isqrt(n - prefix)
            if side * side == n - prefix:
                return t[:, prefix:].transpose(1, 2).reshape(b, d, side, side)
    raise ConfigError(f"latent of shape {tuple(t.shape)}: need (B, C, h, w) or tokens (B, N, D); choose another layer")


def to_input_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w) → (B, size, size), bilinear (as Grad-CAM and IBA upsample their latent maps)."""
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


# -- stage 1: feature bottleneck -------------------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Per-element mean μ_R and std σ_R (≥ ``min_std``) of f_l over the estimation images, and which neurons fire."""

    mean: torch.Tensor  # latent shape, without batch
    std: torch.Tensor
    active: torch.Tensor  # 1.0 where the element is > 0 in more than ``active_threshold`` of the images


def estimate_stats(
    latents: Callable[[], "list[torch.Tensor] | object"], min_std: float = 0.01, active_threshold: float = 0.01
) -> LatentStats:
    """Welford/Chan running mean and variance over batches of latents (an iterable of (b, *S) tensors), in float64."""
    count, mean, m2, positive = 0, None, None, None
    for batch in latents():
        batch = batch.detach().double()
        b = batch.shape[0]
        batch_mean = batch.mean(0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(0)
        if mean is None:
            count, mean, m2, positive = b, batch_mean, batch_m2, (batch > 0).sum(0).double()
            continue
        delta = batch_mean - mean
        total = count + b
        mean = mean + delta * b / total
        m2 = m2 + batch_m2 + delta**2 * count * b / total
        positive = positive + (batch > 0).sum(0)
        count = total
    if mean is None:
        raise ConfigError("no estimation images: the estimation set is empty")
    std = (m2 / max(count - 1, 1)).sqrt().clamp_min(min_std)
    return LatentStats(mean.float(), std.float(), (positive / count > active_threshold).float())


def kl_feature(r: torch.Tensor, lam: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""Per-element KL[P(Z|R) ‖ Q(Z)] of the feature bottleneck Z = λR + (1 − λ)ε, ε ~ Q = N(μ_R, σ_R²):

    .. math:: \mu_z = \lambda (R-\mu_R)/\sigma_R,\quad \sigma_z^2 = (1-\lambda)^2,\quad
              KL = -\tfrac12\,(1 + \log\sigma_z^2 - \mu_z^2 - \sigma_z^2)
    """
    mu_z = lam * (r - mean) / std
    var_z = (1 - lam) ** 2
    return -0.5 * (1 + torch.log(var_z.clamp_min(1e-12)) - mu_z**2 - var_z)


def image_generators(ids: list[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """One noise stream per image, keyed by (seed, image id): the same draws whether the image is alone or in a batch."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in ids]


def _randn(gens: list[torch.Generator], shape: tuple, device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal, image i from generator i."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])


@dataclass
class FeatureResult:
    lam: torch.Tensor  # (B, *S) the mask λ* = sigmoid(α)
    capacity: torch.Tensor  # (B, *S) KL per element (nats), times the active-neuron mask
    latent: torch.Tensor  # (B, *S) R = f_l(x)


def feature_iba(
    hook: LatentHook,
    x: torch.Tensor,
    y: torch.Tensor,
    stats: LatentStats,
    gens: list[torch.Generator],
    beta: float = 20.0,
    steps: int = 10,
    lr: float = 1.0,
    copies: int = 10,
    alpha_init: float = 5.0,
) -> FeatureResult:
    """Stage 1: minimise L = −log softmax(f(Z))_y + β·mean(KL) over α (one (B, *S) tensor), Z in place of f_l(x) for
    ``copies`` noise draws per image; Adam(lr). x: (B, 3, H, W) normalised, y: (B,)."""
    model = hook.model
    x_rep, y_rep = x.repeat_interleave(copies, 0), y.repeat_interleave(copies, 0)
    with torch.no_grad():
        # R from the same (B·copies) batch the bottleneck runs on: CPU convolutions round a batch of one differently
        # from larger ones, and the one-by-one path must see exactly the batched path's numbers
        r = hook.latent(x_rep)[::copies].detach()
    b, shape = r.shape[0], tuple(r.shape[1:])
    alpha = torch.full_like(r, alpha_init, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    mean, std, active = stats.mean.to(r), stats.std.to(r), stats.active.to(r)

    def bottleneck(lam: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        eps = mean + std * noise  # ε ~ N(μ_R, σ_R²)
        z = lam[:, None] * r[:, None] + (1 - lam[:, None]) * eps
        return z.reshape(b * copies, *shape)

    try:
        for _ in range(steps):
            lam = torch.sigmoid(alpha)
            noise = _randn(gens, (copies, *shape), r.device)
            hook.replace = lambda _out, lam=lam, noise=noise: bottleneck(lam, noise)
            logits = model(x_rep)
            ce = F.cross_entropy(logits.float(), y_rep, reduction="none").view(b, copies).mean(1)
            kl = (kl_feature(r, lam, mean, std) * active).flatten(1).mean(1)
            loss = (ce + beta * kl).sum()  # summed: each image's α gets exactly its own gradient
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        hook.replace = None
    with torch.no_grad():
        lam = torch.sigmoid(alpha)
        capacity = kl_feature(r, lam, mean, std) * active
    return FeatureResult(lam.detach(), capacity.detach(), r)


def capacity_heatmap(capacity: torch.Tensor, size: int) -> torch.Tensor:
    """IBA's map: the capacity in bits summed over channels, upsampled to the input: (B, *S) → (B, size, size)."""
    return to_input_size(spatial(capacity).sum(1) / math.log(2), size)


# -- stage 2: the GAN prior -------------------------------------------------------------------------------------------


class BatchedCritic(nn.Module):
    """B independent WGAN critics (3 convolutions + MLP, LeakyReLU) evaluated together: grouped convolutions and
    batched matrix products, image i's critic initialised from image i's generator. Input (n, B, C, h, w) → (n, B)."""

    def __init__(self, gens: list[torch.Generator], channels: int, h: int, w: int, width: int = 32, hidden: int = 64):
        super().__init__()
        self.b = len(gens)
        sizes = [channels, width, width, width // 2]
        self.convs = nn.ParameterList()
        self.conv_biases = nn.ParameterList()
        for cin, cout in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(cin * 9)  # nn.Conv2d's default init, per image
            self.convs.append(nn.Parameter(torch.cat([torch.empty(cout, cin, 3, 3).uniform_(-bound, bound, generator=g) for g in gens])))
            self.conv_biases.append(nn.Parameter(torch.cat([torch.empty(cout).uniform_(-bound, bound, generator=g) for g in gens])))
        features = sizes[-1] * h * w
        self.w1 = nn.Parameter(
            torch.stack([torch.empty(features, hidden).uniform_(-1, 1, generator=g) for g in gens]) / math.sqrt(features)
        )
        self.b1 = nn.Parameter(torch.zeros(self.b, hidden))
        self.w2 = nn.Parameter(torch.stack([torch.empty(hidden, 1).uniform_(-1, 1, generator=g) for g in gens]) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(self.b, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, b, c, h, w = z.shape
        out = z.reshape(n, b * c, h, w)
        for weight, bias in zip(self.convs, self.conv_biases):
            out = F.leaky_relu(F.conv2d(out, weight, bias, padding=1, groups=self.b), 0.2)
        out = out.reshape(n, b, -1).transpose(0, 1)  # (B, n, F)
        out = F.leaky_relu(torch.baddbmm(self.b1[:, None], out, self.w1), 0.2)
        return torch.baddbmm(self.b2[:, None], out, self.w2)[..., 0].transpose(0, 1)  # (n, B)

    @torch.no_grad()
    def clip(self, value: float) -> None:
        for p in self.parameters():
            p.clamp_(-value, value)


@dataclass
class GanSettings:
    epochs: int = 20
    batch_size: int = 32
    real_samples: int = 200
    group_size: int = 20
    critic_iters: int = 5
    clip: float = 0.01
    critic_lr: float = 5e-5
    mean_lr: float = 0.1
    std_lr: float = 0.05
    mask_lr: float = 0.003
    real_mask: str = "lambda"  # lambda (the paper's intent) | capacity (the reference code, clamped to [0, 1])


def logit(p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def gan_prior(hook: LatentHook, x: torch.Tensor, stage1: FeatureResult, gens: list[torch.Generator], s: GanSettings) -> torch.Tensor:
    """Stage 2: the input-space prior mask M_G = σ(m), (B, 1, H, W).

    Generator (per image): m (1×H×W, initialised from the upsampled capacity map), μ_g, s_g (per channel, init 0 and 1);
    a fake latent is Ẑ = f_l(σ(m)⊙x + (1−σ(m))⊙(s_g z + μ_g)), z ~ N(0, I). Real latents imitate stage 1:
    Z = c⊙R + (1−c)⊙N(μ_k, s_k²), μ_k ~ U(−2, 2), s_k ~ U(0, 5) per group of ``group_size``. WGAN with weight
    clipping: critic loss E[D(Ẑ)] − E[D(Z)], generator loss −E[D(Ẑ)], RMSprop, ``critic_iters`` critic steps per
    generator step."""
    b, _, size, _ = x.shape
    device = x.device
    r = stage1.latent
    shape = tuple(r.shape[1:])
    c = stage1.lam if s.real_mask == "lambda" else stage1.capacity.clamp(0, 1)
    # real latent samples, (B, real_samples, *S), per image from its own generator
    groups = math.ceil(s.real_samples / s.group_size)
    real = []
    for i, g in enumerate(gens):
        mu_k = (torch.rand(groups, generator=g, device=device) * 4 - 2).repeat_interleave(s.group_size)[: s.real_samples]
        s_k = (torch.rand(groups, generator=g, device=device) * 5).repeat_interleave(s.group_size)[: s.real_samples]
        noise = torch.randn((s.real_samples, *shape), generator=g, device=device)
        noise = noise * s_k.view(-1, *[1] * len(shape)) + mu_k.view(-1, *[1] * len(shape))
        real.append(c[i] * r[i] + (1 - c[i]) * noise)
    real = torch.stack(real)

    cap = capacity_heatmap(stage1.capacity, size)
    cap = cap / cap.flatten(1).amax(1).clamp_min(1e-12).view(b, 1, 1)
    mask_logits = logit(cap)[:, None].clone().requires_grad_(True)  # (B, 1, H, W)
    noise_mean = torch.zeros(b, 3, 1, 1, device=device, dtype=x.dtype, requires_grad=True)
    noise_std = torch.ones(b, 3, 1, 1, device=device, dtype=x.dtype, requires_grad=True)
    lat = spatial(r[:1])
    critic_gens = [torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g, device=device))) for g in gens]
    critic = BatchedCritic(critic_gens, *lat.shape[1:]).to(device, r.dtype)
    opt_d = torch.optim.RMSprop(critic.parameters(), lr=s.critic_lr)
    opt_g = torch.optim.RMSprop(
        [{"params": [noise_mean], "lr": s.mean_lr}, {"params": [noise_std], "lr": s.std_lr}, {"params": [mask_logits], "lr": s.mask_lr}]
    )

    def fake(n: int) -> torch.Tensor:
        z = _randn(gens, (n, 3, size, size), device)  # (B, n, 3, H, W)
        m = torch.sigmoid(mask_logits)[:, None]
        inputs = m * x[:, None] + (1 - m) * (noise_std[:, None] * z + noise_mean[:, None])
        return hook.latent(inputs.reshape(b * n, 3, size, size)).reshape(b, n, *shape)

    def critic_of(z: torch.Tensor) -> torch.Tensor:  # (B, n, *S) → (B,) mean score
        n = z.shape[1]
        return critic(spatial(z.reshape(b * n, *shape)).reshape(b, n, *lat.shape[1:]).transpose(0, 1)).mean(0)

    iteration = 0
    for _ in range(s.epochs):
        order = torch.stack([torch.randperm(s.real_samples, generator=g, device=device) for g in gens])
        for start in range(0, s.real_samples, s.batch_size):
            idx = order[:, start : start + s.batch_size]
            batch = torch.gather(real, 1, idx.view(b, -1, *[1] * len(shape)).expand(-1, -1, *shape))
            with torch.no_grad():
                generated = fake(idx.shape[1])
            loss_d = (critic_of(generated) - critic_of(batch)).sum()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            critic.clip(s.clip)
            iteration += 1
            if iteration % s.critic_iters == 0:
                loss_g = -critic_of(fake(idx.shape[1])).sum()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
    return torch.sigmoid(mask_logits).detach()


# -- stage 3: input bottleneck ---------------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian smoothing of (B, C, H, W), kernel 2⌈3σ⌉+1, reflected borders (IBA's smoothing)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    b, c, h, w = x.shape
    # every channel of every image as its own one-channel image: the same kernel path for one image as for many
    out = F.pad(x.reshape(b * c, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(F.conv2d(out, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return out.view(b, c, h, w)


def kl_input(x: torch.Tensor, lam: torch.Tensor, prior: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    r"""Per-element KL of the input bottleneck Z_I = λ_I x + (1 − λ_I) ε, ε ~ N(μ, σ²), under the GAN prior M_G:

    .. math:: r = \frac{x-\mu+M_G(\mu-x)}{(1-M_G\lambda_I)\,\sigma},\quad \mu_z=\lambda_I r,\quad
              \sigma_z^2=\frac{(1-\lambda_I)^2}{(1-M_G\lambda_I)^2},\quad KL=-\tfrac12(1+\log\sigma_z^2-\mu_z^2-\sigma_z^2)

    M_G = 0 gives the standard IBA term; M_G = 1 gives 0 (features the prior admits are free)."""
    denom = (1 - prior * lam).clamp_min(1e-6)
    r = (x - mean + prior * (mean - x)) / (denom * std)
    mu_z = lam * r
    var_z = ((1 - lam) / denom) ** 2
    return -0.5 * (1 + torch.log(var_z.clamp_min(1e-12)) - mu_z**2 - var_z)


def input_iba(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    gens: list[torch.Generator],
    beta: float = 20.0,
    steps: int = 60,
    lr: float = 1.0,
    copies: int = 10,
    smooth_sigma: float = 1.0,
    alpha_init: float = 5.0,
) -> torch.Tensor:
    """Stage 3: minimise CE(f(Z_I), y) + β·mean(KL) over α_I (B, 3, H, W), λ_I = blur_σ(sigmoid(α_I)), noise N(0, 1)
    in normalised pixel space, ``copies`` draws per image. Returns the map sigmoid-mask averaged over colour
    channels, (B, H, W) (what the reference code returns, not the KL)."""
    b, c, h, w = x.shape
    alpha = torch.full_like(x, alpha_init, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    y_rep = y.repeat_interleave(copies, 0)
    for _ in range(steps):
        lam = gaussian_blur(torch.sigmoid(alpha), smooth_sigma)
        eps = _randn(gens, (copies, c, h, w), x.device)
        z = lam[:, None] * x[:, None] + (1 - lam[:, None]) * eps
        logits = model(z.reshape(b * copies, c, h, w))
        ce = F.cross_entropy(logits.float(), y_rep, reduction="none").view(b, copies).mean(1)
        kl = kl_input(x, lam, prior).flatten(1).mean(1)
        loss = (ce + beta * kl).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return gaussian_blur(torch.sigmoid(alpha), smooth_sigma).mean(1)


# -- every method behind one interface --------------------------------------------------------------------------------

METHODS = ("saliency", "integrated_gradients", "gradcam", "feature_iba", "input_iba")


@dataclass
class Settings:
    """The method's settings (config sections ``iba``, ``gan``, ``input``, ``baselines`` as plain values)."""

    beta: float = 20.0
    feature_steps: int = 10
    feature_lr: float = 1.0
    copies: int = 10
    alpha_init: float = 5.0
    input_beta: float = 20.0
    input_steps: int = 60
    input_lr: float = 1.0
    smooth_sigma: float = 1.0
    ig_steps: int = 32
    gan: GanSettings | None = None


class Explainer:
    """One interface: ``explainer(method, x, y, ids)`` → a heatmap (B, H, W) per image, for every method in
    :data:`METHODS`. ``ids`` key each image's noise streams, so a heatmap does not depend on which batch it came in."""

    def __init__(self, model: nn.Module, layer: str, stats: LatentStats, settings: Settings, seed: int = 0):
        self.model, self.layer, self.stats, self.s, self.seed = model, layer, stats, settings, seed
        self.hook = LatentHook(model, layer)

    def close(self) -> None:
        self.hook.remove()

    def __call__(self, method: str, x: torch.Tensor, y: torch.Tensor, ids: list[int]) -> torch.Tensor:
        if method not in METHODS:
            raise ConfigError(f"unknown attribution method '{method}'; valid: {', '.join(METHODS)}")
        return getattr(self, method)(x, y, ids).detach().float()

    # gradient baselines from Captum
    def saliency(self, x, y, ids):
        from captum.attr import Saliency

        return Saliency(self.model).attribute(x.clone().requires_grad_(True), target=y, abs=True).amax(1)

    def integrated_gradients(self, x, y, ids):
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(self.model)
        return ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=self.s.ig_steps, internal_batch_size=len(x) * 8).sum(1)

    def gradcam(self, x, y, ids):
        size = x.shape[-1]
        with torch.no_grad():
            latent = self.hook.latent(x)
        if latent.dim() == 4:
            from captum.attr import LayerGradCam

            cam = LayerGradCam(self.model, find_layer(self.model, self.layer)).attribute(x, target=y, relu_attributions=True)
            return to_input_size(cam[:, 0], size)
        # token latents (ViT): Captum's LayerGradCam would average over tokens as if they were channels; the same
        # formula on the token grid instead: ReLU(Σ_d mean_ij(∂y/∂A_dij) A_dij)
        x = x.clone().requires_grad_(True)
        logits = self.model(x)
        acts = self.hook.output
        grads = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), acts)[0]
        a, g = spatial(acts), spatial(grads)
        cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
        return to_input_size(cam, size)

    # the bottlenecks
    def _feature(self, x, y, gens) -> FeatureResult:
        s = self.s
        return feature_iba(self.hook, x, y, self.stats, gens, s.beta, s.feature_steps, s.feature_lr, s.copies, s.alpha_init)

    def feature_iba(self, x, y, ids):
        gens = image_generators(ids, self.seed, x.device)
        return capacity_heatmap(self._feature(x, y, gens).capacity, x.shape[-1])

    def input_iba(self, x, y, ids):
        s = self.s
        gens = image_generators(ids, self.seed, x.device)
        stage1 = self._feature(x, y, gens)
        prior = gan_prior(self.hook, x, stage1, gens, s.gan or GanSettings())
        return input_iba(self.model, x, y, prior, gens, s.input_beta, s.input_steps, s.input_lr, s.copies, s.smooth_sigma, s.alpha_init)


# -- evaluation (batched over images) ---------------------------------------------------------------------------------


def pixel_ranks(heat: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → (B, H·W): each pixel's place in decreasing-heat order (ties: earlier pixel first)."""
    flat = heat.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def target_scores(model: nn.Module, images: torch.Tensor, y: torch.Tensor, chunk: int = 256, kind: str = "prob") -> torch.Tensor:
    """Softmax probability (or logit) of y for images (B, n, C, H, W) → (B, n), run in chunks."""
    b, n = images.shape[:2]
    flat = images.reshape(b * n, *images.shape[2:])
    targets = y.repeat_interleave(n)
    out = []
    for start in range(0, len(flat), chunk):
        logits = model(flat[start : start + chunk]).float()
        values = logits.softmax(1) if kind == "prob" else logits
        out.append(values.gather(1, targets[start : start + chunk, None])[:, 0])
    return torch.cat(out).view(b, n)


def perturbation_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    heat: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    steps: int,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels move from ``start`` to ``end`` in decreasing-heat order; after step k the top round(k·P/steps) pixels
    (all channels) come from ``end``. Every step is a fresh image (no reuse of an in-place-modified tensor: the
    reference's staircase). Returns (fractions (steps+1,), target probabilities (B, steps+1))."""
    b, c, h, w = x.shape
    pixels = h * w
    counts = torch.tensor([round(k * pixels / steps) for k in range(steps + 1)], device=x.device)
    ranks = pixel_ranks(heat)  # (B, P)
    taken = (ranks[:, None, :] < counts[None, :, None]).view(b, steps + 1, 1, h, w)
    images = torch.where(taken, end[:, None], start[:, None])
    return counts.float() / pixels, target_scores(model, images, y, chunk)


def trapezoid_auc(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """∫ y dx by the trapezoid rule, per row of ys (B, n)."""
    return ((ys[:, 1:] + ys[:, :-1]) / 2 * (xs[1:] - xs[:-1])).sum(1)


def insertion_deletion(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, heat: torch.Tensor, steps: int, blur_sigma: float, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insertion AUC (from the blurred image, original pixels put back; higher is better) and deletion AUC (pixels set
    to 0; lower is better), per image (B,)."""
    xs, ins = perturbation_curve(model, x, y, heat, gaussian_blur(x, blur_sigma), x, steps, chunk)
    _, dele = perturbation_curve(model, x, y, heat, x, torch.zeros_like(x), steps, chunk)
    return trapezoid_auc(xs, ins), trapezoid_auc(xs, dele)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correlation along the last dim; 0 where either side is constant."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    denom = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp_min(1e-30), torch.zeros_like(denom))


def sensitivity_n(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    heat: torch.Tensor,
    ns: list[int],
    sets: int,
    generator: torch.Generator,
    chunk: int = 256,
) -> torch.Tensor:
    """Sensitivity-N: for each n, ``sets`` random sets S of n pixels set to 0; Pearson correlation (over the sets)
    between Σ_{i∈S} R_i and f_y(x) − f_y(x_[S]=0) (logits). Returns (B, len(ns))."""
    b, c, h, w = x.shape
    pixels = h * w
    base = target_scores(model, x[:, None], y, chunk, "logit")  # (B, 1)
    out = []
    for n in ns:
        scores = torch.rand(b, sets, pixels, generator=generator, device=x.device)
        chosen = torch.zeros(b, sets, pixels, device=x.device).scatter_(2, scores.topk(n, dim=2).indices, 1.0)
        images = x[:, None] * (1 - chosen.view(b, sets, 1, h, w))
        drop = base - target_scores(model, images, y, chunk, "logit")
        out.append(pearson((chosen * heat.flatten(1)[:, None]).sum(-1), drop))
    return torch.stack(out, 1)


def ehr(heat: torch.Tensor, box: torch.Tensor, floor: float = 0.1, levels: int = 11) -> torch.Tensor:
    """Effective heat ratio per image (B,): heat min-max normalised, values < ``floor`` dropped; for thresholds t_q at
    the quantiles q = 0, 0.1, …, 1 of the kept heat, (heat inside the box above t_q) / (pixels above t_q); AUC over q."""
    flat = heat.flatten(1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    norm = (flat - lo) / (hi - lo).clamp_min(1e-12)
    kept = torch.where(norm >= floor, norm, torch.full_like(norm, float("nan")))
    qs = torch.linspace(0, 1, levels, device=heat.device)
    thresholds = torch.nanquantile(kept, qs, dim=1).T  # (B, levels); NaN when nothing is kept
    above = (norm[:, None] >= thresholds[..., None]) & (norm[:, None] >= floor)  # NaN compares False
    inside = (norm[:, None] * above * box.flatten(1)[:, None].float()).sum(-1)
    ratio = inside / above.sum(-1).clamp_min(1)
    return trapezoid_auc(qs, ratio)


def pointing_game(heat: torch.Tensor, evidence: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """1 where the heatmap's maximum lies within ``tolerance`` pixels (square) of the evidence mask, per image (B,)."""
    mask = evidence.float()[:, None]
    if tolerance > 0:
        mask = F.max_pool2d(mask, 2 * tolerance + 1, stride=1, padding=tolerance)
    peak = heat.flatten(1).argmax(1)
    return mask.flatten(1).gather(1, peak[:, None])[:, 0]


def mask_iou(heat: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """IoU between the evidence mask and the heatmap's top-k pixels, k = the mask's area (threshold-free), per image."""
    ranks = pixel_ranks(heat)
    truth = evidence.flatten(1).bool()
    area = truth.sum(1, keepdim=True)
    top = ranks < area
    return (top & truth).sum(1) / (top | truth).sum(1).clamp_min(1)
