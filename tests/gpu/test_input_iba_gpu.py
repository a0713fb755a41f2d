"""input_iba on CUDA: every method on a batch of images of the paper preset's classifier family, and the batched
input bottleneck equal to one image at a time in float64 (skipped without a GPU; tests/gpu/run_all.sh runs them and
`lightyard bench input_iba trainer.accelerator=cuda`)."""

import pytest
import torch

from common.models import create_timm_model
from pipelines.input_iba.model import METHODS, Explainer, GanSettings, LatentHook, LatentStats, Settings, estimate_stats

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _explainer(dtype: torch.dtype) -> tuple[Explainer, torch.Tensor]:
    device = torch.device("cuda")
    model = create_timm_model("resnet18", num_classes=10).to(device, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 64, 64, device=device, dtype=dtype)
    hook = LatentHook(model, "layer2")
    with torch.no_grad():
        stats = estimate_stats(lambda: iter([hook.latent(x)]))
    hook.remove()
    stats = LatentStats(stats.mean.to(dtype), stats.std.to(dtype), stats.active.to(dtype))
    settings = Settings(
        feature_steps=3, copies=4, input_steps=5, ig_steps=8, gan=GanSettings(epochs=2, batch_size=8, real_samples=16, group_size=8)
    )
    return Explainer(model, "layer2", stats, settings), x


def test_every_method_on_cuda():
    explainer, x = _explainer(torch.float32)
    y = torch.arange(4, device=x.device)
    for method in METHODS:
        heat = explainer(method, x, y, [0, 1, 2, 3])
        assert heat.shape == (4, 64, 64) and heat.is_cuda and torch.isfinite(heat).all(), method


def test_batched_input_iba_equals_one_by_one_in_float64_on_cuda():
    explainer, x = _explainer(torch.float64)
    y = torch.arange(4, device=x.device)
    together = explainer("input_iba", x, y, [0, 1, 2, 3])
    alone = torch.cat([explainer("input_iba", x[i : i + 1], y[i : i + 1], [i]) for i in range(4)])
    assert (together - alone).abs().max() < 1e-6
