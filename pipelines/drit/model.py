"""DRIT / DRIT++ networks, losses and one training iteration as plain functions (no Lightning, no I/O).

Notation of the notes (../shared/papers/drit.md): domains X (A) and Y (B); content encoders E_c^X, E_c^Y with a shared
last block; attribute encoders E_a^X, E_a^Y (μ, log σ²; "concat" mode); generators G_X, G_Y (their first block
shared, as the official ``G_concat``); two multi-scale image discriminators per domain (encoded-attribute path D_X and
random-attribute path D_X2) and one content discriminator D_c.

Every loss here is a mean over the samples of a batch (the KL is summed over the code's elements, then averaged over
samples; mode seeking is a per-sample ratio, then averaged): with the official batch of one image per path these are
the reference's numbers, and for larger batches a DDP run and one process with the concatenated batch see the same
gradient. Noise (content-code noise, reparametrisation, random attributes) is drawn per sample from (seed, iteration,
sample index) by :func:`draw_noise`, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# -- building blocks ---------------------------------------------------------------------------------------------
def conv_norm_act(cin: int, cout: int, kernel: int, stride: int, norm: bool = True, act: str = "relu") -> nn.Sequential:
    """Reflection-padded conv (+ InstanceNorm) + ReLU / LeakyReLU(0.2), as the official ReLUINSConv2d / LeakyReLUConv2d."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride)]
    if norm:
        layers.append(nn.InstanceNorm2d(cout))
    layers.append(nn.ReLU() if act == "relu" else nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """INSResBlock: x + IN(conv3(ReLU(IN(conv3(x)))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ContentEncoders(nn.Module):
    """E_c^X, E_c^Y: per domain a 7×7 conv, two stride-2 convs and ``blocks`` residual blocks; then one residual block
    **shared** by both domains. Output [B, 4·width, H/4, W/4] (256 channels at width 64, as the paper)."""

    def __init__(self, channels: int, width: int, blocks: int):
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(
                conv_norm_act(channels, width, 7, 1, norm=False, act="lrelu"),
                conv_norm_act(width, 2 * width, 3, 2),
                conv_norm_act(2 * width, 4 * width, 3, 2),
                *[ResBlock(4 * width) for _ in range(blocks)],
            )

        self.x, self.y = branch(), branch()
        self.shared = ResBlock(4 * width)

    def forward(self, image: Tensor, domain: str, noise: Tensor | None = None) -> Tensor:
        """z^c = shared(E_c^domain(image)) (+ Gaussian noise in training, the official GaussianNoiseLayer)."""
        z = self.shared(getattr(self, domain)(image))
        return z if noise is None else z + noise


class AttributeEncoder(nn.Module):
    """E_a (concat mode): strided convs, global average pooling, then μ and log σ² of an ``nz``-dim Gaussian."""

    def __init__(self, channels: int, width: int, nz: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, width, 4, 2),
            nn.LeakyReLU(0.2),
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, 2 * width, 4, 2),
            nn.LeakyReLU(0.2),
            nn.ReflectionPad2d(1),
            nn.Conv2d(2 * width, 4 * width, 4, 2),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.mu = nn.Linear(4 * width, nz)
        self.logvar = nn.Linear(4 * width, nz)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(image)
        return self.mu(h), self.logvar(h)


class Generators(nn.Module):
    """G_X, G_Y (official ``G_concat``): a shared residual block on the content, then per domain: the attribute tiled
    and concatenated, ``blocks`` residual blocks, two ×2 transposed convs (the attribute concatenated before each) and a
    1×1 transposed conv + tanh."""

    def __init__(self, channels: int, width: int, blocks: int, nz: int):
        super().__init__()
        self.nz = nz
        self.shared = ResBlock(4 * width)

        def branch() -> nn.ModuleList:
            c = 4 * width + nz
            body = nn.Sequential(*[ResBlock(c) for _ in range(blocks)])
            up1 = nn.Sequential(
                nn.ConvTranspose2d(c + nz, (c + nz) // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d((c + nz) // 2), nn.ReLU()
            )
            c2 = (c + nz) // 2 + nz
            up2 = nn.Sequential(nn.ConvTranspose2d(c2, c2 // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c2 // 2), nn.ReLU())
            out = nn.Sequential(nn.ConvTranspose2d(c2 // 2 + nz, channels, 1), nn.Tanh())
            return nn.ModuleList([body, up1, up2, out])

        self.x, self.y = branch(), branch()

    @staticmethod
    def _with(h: Tensor, z: Tensor) -> Tensor:
        return torch.cat([h, z[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])], 1)

    def forward(self, content: Tensor, attribute: Tensor, domain: str) -> Tensor:
        body, up1, up2, out = getattr(self, domain)
        h = body(self._with(self.shared(content), attribute))
        h = up1(self._with(h, attribute))
        h = up2(self._with(h, attribute))
        return out(self._with(h, attribute))


class MultiScaleDiscriminator(nn.Module):
    """``scales`` patch discriminators on the image and its ×2 average-pooled copies (no normalisation: the official
    norm selection never applies one). Returns one logit map per scale."""

    def __init__(self, channels: int, width: int, layers: int, scales: int):
        super().__init__()

        def one() -> nn.Sequential:
            mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = width
            for _ in range(layers - 1):
                mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.2)]
                c *= 2
            mods.append(nn.Conv2d(c, 1, 1))
            return nn.Sequential(*mods)

        self.nets = nn.ModuleList([one() for _ in range(scales)])
        self.down = nn.AvgPool2d(3, 2, 1, count_include_pad=False)

    def forward(self, image: Tensor) -> list[Tensor]:
        outs = []
        for i, net in enumerate(self.nets):
            if i:
                image = self.down(image)
            outs.append(net(image))
        return outs


class ContentDiscriminator(nn.Module):
    """D_c: strided convs with InstanceNorm on the content map, a 1×1 conv to one logit, global average pooling.
    Returns [B] logits of 'the content came from domain X'."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Conv2d(channels, channels, 3, 2, 1), nn.InstanceNorm2d(channels), nn.LeakyReLU(0.2)]
        mods += [nn.Conv2d(channels, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*mods)

    def forward(self, content: Tensor) -> Tensor:
        return self.net(content)[:, 0]


# -- losses (each a mean over the samples of a batch) ---------------------------------------------------------------
def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """L_KL = −½ Σ_k (1 + log σ²_k − μ²_k − σ²_k), summed over the code's elements, averaged over samples."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()


def latent_regression(mu: Tensor, z: Tensor) -> Tensor:
    """L_lr = mean |μ(E_a(G(z^c, z))) − z| (the mean μ only, as the reference)."""
    return (mu - z).abs().mean()


def mode_seeking(out1: Tensor, out2: Tensor, z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """DRIT++: L_ms = 1 / (mean|G(c, z1) − G(c, z2)| / mean|z1 − z2| + ε), per sample, averaged over samples."""
    ratio = (out1 - out2).abs().flatten(1).mean(1) / (z1 - z2).abs().flatten(1).mean(1)
    return (1 / (ratio + eps)).mean()


def gan_loss(logits: list[Tensor] | Tensor, target: float) -> Tensor:
    """Sigmoid BCE against a constant target, summed over the discriminator's scales."""
    logits = logits if isinstance(logits, list) else [logits]
    return sum(F.binary_cross_entropy_with_logits(out, torch.full_like(out, target)) for out in logits)


def content_l2(content: Tensor) -> Tensor:
    """L_c2 = mean((z^c)²)."""
    return content.pow(2).mean()


@dataclass
class LossWeights:
    """The total of the notes: L = L_adv + L_adv^c + 10 L_cc + 10 L_rec + 10 L_lr + 0.01 L_KL + 0.01 L_c2 (+ L_ms)."""

    gan: float = 1.0
    content_adv: float = 1.0  # 0: no content discriminator at all (ablation)
    cross_cycle: float = 10.0
    self_rec: float = 10.0
    latent: float = 10.0
    kl: float = 0.01
    content_l2: float = 0.01
    mode_seeking: float = 1.0  # 0: original DRIT (no second random sample, no mode seeking)


# -- noise ---------------------------------------------------------------------------------------------------------
def draw_noise(
    indices: Tensor, seed: int, iteration: int, content_shape: tuple[int, ...], nz: int, content_std: float
) -> dict[str, Tensor]:
    """Per-sample noise from a generator seeded by (seed, iteration, dataset index): the same sample gets the same
    draws whatever process or batch position it lands in. Keys: content noise of the two encodings of x and y and of
    the two re-encodings (c_x, c_y, c_u, c_v), reparametrisation ε (e_x, e_y, e_u, e_v), random attributes z, z2."""
    keys_c, keys_z = ("c_x", "c_y", "c_u", "c_v"), ("e_x", "e_y", "e_u", "e_v", "z", "z2")
    out: dict[str, list[Tensor]] = {k: [] for k in keys_c + keys_z}
    for index in indices.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + iteration * 7_919 + int(index) * 104_729) % (2**63 - 1))
        for k in keys_c:
            out[k].append(torch.randn(content_shape, generator=g) * content_std)
        for k in keys_z:
            out[k].append(torch.randn(nz, generator=g))
    return {k: torch.stack(v) for k, v in out.items()}


# -- the model ----------------------------------------------------------------------------------------------------
class DRIT(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64, blocks: int = 3, nz: int = 8, dis_width: int = 64, dis_layers: int = 4,
                 dis_scales: int = 3, content_dis_layers: int = 3):  # fmt: skip
        super().__init__()
        self.nz, self.width = nz, width
        self.enc_c = ContentEncoders(channels, width, blocks)
        self.enc_a = nn.ModuleDict({"x": AttributeEncoder(channels, width, nz), "y": AttributeEncoder(channels, width, nz)})
        self.gen = Generators(channels, width, blocks, nz)
        self.dis = nn.ModuleDict({k: MultiScaleDiscriminator(channels, dis_width, dis_layers, dis_scales) for k in ("x", "y", "x2", "y2")})
        self.dis_c = ContentDiscriminator(4 * width, content_dis_layers)

    def content_shape(self, size: int) -> tuple[int, int, int]:
        return (4 * self.width, size // 4, size // 4)

    # parameter groups of the three optimisers
    def encoder_generator_parameters(self) -> list[nn.Parameter]:
        return list(chain(self.enc_c.parameters(), self.enc_a.parameters(), self.gen.parameters()))

    def content_generator_parameters(self) -> list[nn.Parameter]:
        return list(chain(self.enc_c.parameters(), self.gen.parameters()))

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.dis.parameters())

    def attribute(self, image: Tensor, domain: str, eps: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(z^a, μ, log σ²) with z^a = μ + σ ⊙ ε (μ itself when ε is None)."""
        mu, logvar = self.enc_a[domain](image)
        return (mu if eps is None else mu + (0.5 * logvar).exp() * eps), mu, logvar

    def forward(self, x: Tensor, y: Tensor, noise: dict[str, Tensor], mode_seeking: bool) -> dict[str, Tensor]:
        """The official forward on the encoded-attribute halves x, y: first translation u = G_X(z_y^c, z_x^a),
        v = G_Y(z_x^c, z_y^a); self-reconstructions; random-attribute outputs G_X(z_y^c, z) (and z2 for mode seeking);
        second translation x̂ = G_X(E_c^Y(v), E_a^X(u)), ŷ = G_Y(E_c^X(u), E_a^Y(v)); μ of the re-encoded random outputs."""
        t: dict[str, Tensor] = {"z": noise["z"], "z2": noise["z2"]}
        t["zc_x"] = self.enc_c(x, "x", noise["c_x"])
        t["zc_y"] = self.enc_c(y, "y", noise["c_y"])
        za_x, t["mu_x"], t["logvar_x"] = self.attribute(x, "x", noise["e_x"])
        za_y, t["mu_y"], t["logvar_y"] = self.attribute(y, "y", noise["e_y"])
        n = len(x)
        attrs_x, attrs_y = [za_x, za_x, noise["z"]], [za_y, za_y, noise["z"]]
        contents_x, contents_y = [t["zc_y"], t["zc_x"], t["zc_y"]], [t["zc_x"], t["zc_y"], t["zc_x"]]
        if mode_seeking:
            attrs_x.append(noise["z2"]), attrs_y.append(noise["z2"])
            contents_x.append(t["zc_y"]), contents_y.append(t["zc_x"])
        out_x = self.gen(torch.cat(contents_x), torch.cat(attrs_x), "x").split(n)
        out_y = self.gen(torch.cat(contents_y), torch.cat(attrs_y), "y").split(n)
        t["u"], t["x_self"], t["x_rand"] = out_x[:3]
        t["v"], t["y_self"], t["y_rand"] = out_y[:3]
        if mode_seeking:
            t["x_rand2"], t["y_rand2"] = out_x[3], out_y[3]
        zc_u = self.enc_c(t["u"], "x", noise["c_u"])  # content of y, rendered in X
        zc_v = self.enc_c(t["v"], "y", noise["c_v"])
        za_u, _, _ = self.attribute(t["u"], "x", noise["e_u"])
        za_v, _, _ = self.attribute(t["v"], "y", noise["e_v"])
        t["x_cycle"] = self.gen(zc_v, za_u, "x")
        t["y_cycle"] = self.gen(zc_u, za_v, "y")
        t["mu_lr_x"] = self.enc_a["x"](t["x_rand"])[0]
        t["mu_lr_y"] = self.enc_a["y"](t["y_rand"])[0]
        return t

    # discriminator sides
    def content_discriminator_loss(self, zc_x: Tensor, zc_y: Tensor) -> Tensor:
        """D_c learns the domain of a content code: target 1 for X, 0 for Y."""
        return gan_loss(self.dis_c(zc_x.detach()), 1.0) + gan_loss(self.dis_c(zc_y.detach()), 0.0)

    def discriminator_loss(
        self, t: dict[str, Tensor], x: Tensor, y: Tensor, x_real2: Tensor, y_real2: Tensor, mode_seeking: bool
    ) -> Tensor:
        """D_X: real x vs u; D_X2: real (second half) vs G_X(z_y^c, z) (and vs the z2 output, real counted again, as the
        reference's second backward_D); the same for Y."""

        def d(name: str, real: Tensor, fake: Tensor) -> Tensor:
            return gan_loss(self.dis[name](real), 1.0) + gan_loss(self.dis[name](fake.detach()), 0.0)

        loss = d("x", x, t["u"]) + d("y", y, t["v"]) + d("x2", x_real2, t["x_rand"]) + d("y2", y_real2, t["y_rand"])
        if mode_seeking:
            loss = loss + d("x2", x_real2, t["x_rand2"]) + d("y2", y_real2, t["y_rand2"])
        return loss

    # encoder / generator side
    def generator_losses(self, t: dict[str, Tensor], x: Tensor, y: Tensor, w: LossWeights) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Weighted terms of the two groups: (E_c + E_a + G terms, terms that update E_c + G only)."""
        eg = {
            "gan": w.gan * (gan_loss(self.dis["x"](t["u"]), 1.0) + gan_loss(self.dis["y"](t["v"]), 1.0)),
            "cross_cycle": w.cross_cycle * (F.l1_loss(t["x_cycle"], x) + F.l1_loss(t["y_cycle"], y)),
            "self_rec": w.self_rec * (F.l1_loss(t["x_self"], x) + F.l1_loss(t["y_self"], y)),
            "kl": w.kl * (kl_divergence(t["mu_x"], t["logvar_x"]) + kl_divergence(t["mu_y"], t["logvar_y"])),
            "content_l2": w.content_l2 * (content_l2(t["zc_x"]) + content_l2(t["zc_y"])),
        }
        if w.content_adv > 0:  # the encoders make D_c uncertain: target 0.5 for both domains
            eg["content_adv"] = w.content_adv * (gan_loss(self.dis_c(t["zc_x"]), 0.5) + gan_loss(self.dis_c(t["zc_y"]), 0.5))
        alone = {
            "latent": w.latent * (latent_regression(t["mu_lr_x"], t["z"]) + latent_regression(t["mu_lr_y"], t["z"])),
            "gan_random": w.gan * (gan_loss(self.dis["x2"](t["x_rand"]), 1.0) + gan_loss(self.dis["y2"](t["y_rand"]), 1.0)),
        }
        if w.mode_seeking > 0:
            alone["gan_random"] = alone["gan_random"] + w.gan * (
                gan_loss(self.dis["x2"](t["x_rand2"]), 1.0) + gan_loss(self.dis["y2"](t["y_rand2"]), 1.0)
            )
            alone["mode_seeking"] = w.mode_seeking * (
                mode_seeking(t["x_rand"], t["x_rand2"], t["z"], t["z2"]) + mode_seeking(t["y_rand"], t["y_rand2"], t["z"], t["z2"])
            )
        return eg, alone

    # test time
    @torch.no_grad()
    def translate(self, source: Tensor, source_domain: str, attribute: Tensor) -> Tensor:
        """G_target(E_c^source(source), attribute): diverse translation with z ~ N(0, I), or reference-guided with
        E_a^target(reference)'s μ."""
        target = "y" if source_domain == "x" else "x"
        return self.gen(self.enc_c(source, source_domain), attribute, target)


# -- one training iteration ----------------------------------------------------------------------------------------
@dataclass
class StepHooks:
    """How an iteration talks to its optimisers: the LightningModule passes manual_backward and Lightning's
    optimisers, the bench's hand-written loop plain ``loss.backward`` / ``opt.step``. ``trace`` (a list) records the
    order of loss computations and optimiser steps for the tests."""

    backward: Callable[..., None]  # backward(loss, inputs=[params], retain_graph=bool)
    zero_grad: Callable[[str], None]  # name in {"content_d", "d", "eg"}
    step: Callable[[str], None]
    clip: Callable[[str, float], None]  # clip(name, max_norm): gradient-norm clipping of that optimiser's parameters
    sync: Callable[[str], None] = lambda name: None  # average gradients across processes (DDP) before a step
    trace: list[str] | None = field(default=None)

    def mark(self, event: str) -> None:
        if self.trace is not None:
            self.trace.append(event)


def _backward(hooks: StepHooks, loss: torch.Tensor, params, retain_graph: bool = False) -> None:
    """Backward into the trainable ones of ``params``: ``freeze=[…]`` may have frozen some (they get no gradient, so
    Adam keeps no state for them) or all of a group (then there is nothing to do)."""
    inputs = [p for p in params if p.requires_grad]
    if inputs:
        hooks.backward(loss, inputs=inputs, retain_graph=retain_graph)


def _content_d_step(net, zc_x: torch.Tensor, zc_y: torch.Tensor, hooks: StepHooks, clip_norm: float) -> float:
    """One update of D_c on detached content codes: its loss, backward into D_c alone, DDP average, clipping, step."""
    hooks.zero_grad("content_d")
    loss = net.content_discriminator_loss(zc_x, zc_y)
    hooks.mark("loss:content_d")
    _backward(hooks, loss, net.dis_c.parameters())
    hooks.sync("content_d")
    hooks.clip("content_d", clip_norm)
    hooks.step("content_d")
    hooks.mark("step:content_d")
    return float(loss.detach())


def train_iteration(net: DRIT, batch: tuple[Tensor, Tensor, Tensor], iteration: int, seed: int, w: LossWeights, d_iter: int,
                    content_std: float, clip_norm: float, hooks: StepHooks) -> dict[str, float]:  # fmt: skip
    """One iteration of the notes' protocol on a batch (x [2n,C,H,W], y, dataset indices [2n]): the first n images per
    domain feed the encoded-attribute path, the last n are the real images of the random-attribute discriminators.

    On iterations with (iteration + 1) % d_iter != 0 only D_c is updated (on every image; gradient norm clipped).
    Otherwise: the domain discriminators and D_c are updated, then **every** encoder/generator loss is computed, the
    E_c+E_a+G group is backpropagated into all three and the random-attribute group into E_c and G only, and only then
    is one optimiser step taken (the reference stepped in between and then backpropagated through modified weights,
    which fails on PyTorch ≥ 1.5). Returns the detached losses."""
    x_all, y_all, idx = batch
    n = len(x_all) // 2
    use_content_d = w.content_adv > 0
    noise = draw_noise(
        idx[:n] if (iteration + 1) % d_iter == 0 else idx, seed, iteration, net.content_shape(x_all.shape[-1]), net.nz, content_std
    )
    noise = {k: v.to(x_all.device, x_all.dtype) for k, v in noise.items()}
    logs: dict[str, float] = {}
    if (iteration + 1) % d_iter != 0:
        if not use_content_d:
            return logs
        with torch.no_grad():
            zc_x, zc_y = net.enc_c(x_all, "x", noise["c_x"]), net.enc_c(y_all, "y", noise["c_y"])
        return {"content_d": _content_d_step(net, zc_x, zc_y, hooks, clip_norm)}

    x, y, x2, y2 = x_all[:n], y_all[:n], x_all[n:], y_all[n:]
    ms = w.mode_seeking > 0
    t = net(x, y, noise, ms)
    # discriminators first, on detached outputs
    hooks.zero_grad("d")
    loss_d = net.discriminator_loss(t, x, y, x2, y2, ms)
    hooks.mark("loss:d")
    _backward(hooks, loss_d, net.discriminator_parameters())
    hooks.sync("d")
    hooks.step("d")
    hooks.mark("step:d")
    logs["d"] = float(loss_d.detach())
    if use_content_d:
        logs["content_d"] = _content_d_step(net, t["zc_x"], t["zc_y"], hooks, clip_norm)
    # every encoder/generator loss before any of their steps
    eg, alone = net.generator_losses(t, x, y, w)
    for name in (*eg, *alone):
        hooks.mark(f"loss:{name}")
    hooks.zero_grad("eg")
    _backward(hooks, sum(eg.values()), net.encoder_generator_parameters(), retain_graph=True)
    _backward(hooks, sum(alone.values()), net.content_generator_parameters())
    hooks.sync("eg")
    hooks.step("eg")
    hooks.mark("step:eg")
    logs.update({k: float(v.detach()) for k, v in {**eg, **alone}.items()})
    logs["eg"] = sum(logs[k] for k in (*eg, *alone))
    return logs


def linear_decay(epoch: int, epochs: int, decay_start: int) -> float:
    """lr factor of the reference's 'lambda' policy: 1 until ``decay_start``, then 1 − (epoch − start)/(epochs − start + 1);
    ``decay_start < 0`` keeps 1 (cat2dog: 2000 epochs without decay)."""
    if decay_start < 0:
        return 1.0
    return 1.0 - max(0, epoch - decay_start) / float(epochs - decay_start + 1)


# -- evaluation networks ---------------------------------------------------------------------------------------------
class DomainClassifier(nn.Module):
    """A small CNN trained once to tell the two domains apart (cached): its logits give the domain accuracy of the
    translations, its pooled last features feed FID / KID (no Inception weights here), and its per-layer features the
    LPIPS-style diversity distance. Input in [0, 1]."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(width, 2 * width, 3, 1, 1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.ReLU(), nn.Conv2d(4 * width, 4 * width, 3, 2, 1), nn.ReLU()),
            ]
        )
        self.head = nn.Linear(4 * width, 2)
        self.num_features = 4 * width

    def layers(self, images: Tensor) -> list[Tensor]:
        h, out = images * 2 - 1, []
        for block in self.blocks:
            h = block(h)
            out.append(h)
        return out

    def embed(self, images: Tensor) -> Tensor:
        return self.layers(images)[-1].mean((2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(images))


class ClassifierFeatures(nn.Module):
    """The classifier's pooled features, unit-normalised, as torchmetrics' FID/KID ``feature`` network ([N, 3, H, W] in
    [0, 1] → [N, d]): the scale of ReLU features is arbitrary, on the unit sphere FID is at most 4 + trace terms ≤ 2."""

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.classifier.embed(images.float()), dim=1)


def perceptual_distance(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """LPIPS's form with uniform layer weights: Σ_layers mean_{h,w} ‖â_hw − b̂_hw‖² of channel-unit-normalised
    features. Per sample: [N]."""
    total = 0
    for fa, fb in zip(a, b):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (na - nb).pow(2).sum(1).mean((1, 2))
    return total
