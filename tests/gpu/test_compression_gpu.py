"""compression on CUDA: one bf16 training step of the paper preset's resnet18 at 224 px, and the latency harness with
device synchronisation and NVML energy (skipped without a GPU; tests/gpu/run_all.sh runs them)."""

import pytest
import torch
from torch.nn import functional as F

from common.runner import compose
from pipelines.compression.model import latency, nvml_energy
from pipelines.compression.module import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_paper_preset_step_in_bf16_and_timed_inference_with_energy():
    cfg = compose("compression", {"preset": "paper"})
    device = torch.device("cuda")
    model = build_model(cfg.model, 10).to(device)
    x, y = torch.randn(8, 3, 224, 224, device=device), torch.randint(0, 10, (8,), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss) and model.fc.weight.grad.abs().sum() > 0
    model.eval()
    energy = nvml_energy(device)
    start = energy() if energy else None
    with torch.no_grad():
        out = latency(lambda: model(x[:1]), device, warmup=5, iters=20)
    assert 0 < out["p50_ms"] <= out["p95_ms"]
    if energy is not None:
        assert energy() >= start
