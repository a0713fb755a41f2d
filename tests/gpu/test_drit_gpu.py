"""drit on CUDA: one bf16 training iteration (discriminators, then every E/G loss before the E/G step) of the paper
preset's networks at 216 px, batch 2 (skipped without a GPU; tests/gpu/run_all.sh runs it and `lightyard bench drit
trainer.accelerator=cuda`)."""

import pytest
import torch

from common.runner import compose
from pipelines.drit.model import StepHooks, train_iteration
from pipelines.drit.module import build_net, loss_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_paper_preset_iteration_in_bf16():
    cfg = compose("drit", {"preset": "paper", "data.root": "/unused"})
    device = torch.device("cuda")
    net = build_net(cfg, 3).to(device)
    opts = {
        "content_d": torch.optim.Adam(net.dis_c.parameters(), 4e-5, betas=(0.5, 0.999)),
        "d": torch.optim.Adam(net.discriminator_parameters(), 1e-4, betas=(0.5, 0.999)),
        "eg": torch.optim.Adam(net.encoder_generator_parameters(), 1e-4, betas=(0.5, 0.999)),
    }
    trace = []
    hooks = StepHooks(
        backward=lambda loss, inputs, retain_graph=False: loss.backward(inputs=inputs, retain_graph=retain_graph),
        zero_grad=lambda n: opts[n].zero_grad(),
        step=lambda n: opts[n].step(),
        clip=lambda n, m: torch.nn.utils.clip_grad_norm_(net.dis_c.parameters(), m),
        trace=trace,
    )
    size = cfg.data.crop_size
    batch = (torch.rand(2, 3, size, size, device=device) * 2 - 1, torch.rand(2, 3, size, size, device=device) * 2 - 1, torch.arange(2))
    before = net.gen.x[0][0].body[1].weight.detach().clone()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logs = train_iteration(net, batch, 2, 0, loss_weights(cfg), 3, 1.0, 5.0, hooks)
    assert trace[-1] == "step:eg" and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert not torch.equal(before, net.gen.x[0][0].body[1].weight)
