"""sgd_freeze_embed on CUDA (skipped without a GPU; tests/gpu/run_all.sh runs them and `lightyard bench sgd_freeze_embed`
on a GPU machine)."""

import pytest
import torch
from torch.nn import functional as F

from common.runner import compose
from pipelines.sgd_freeze_embed.model import build_classifier, make_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


@pytest.mark.parametrize("optimizer", ["sgd_freeze_embed", "adamw"])
def test_paper_preset_bf16_step(optimizer):
    """One bf16 step of the paper preset's CLIP ViT-B/16 at 224 px, batch 8 (random weights: the hub's are not
    reachable here): finite loss; under SGD-FreezeEmbed the embedding (patch_embed, norm_pre) gets no gradient
    and no optimizer state, and every other parameter has one."""
    cfg = compose("sgd_freeze_embed", {"preset": "paper", "model.pretrained": False, "optim.name": optimizer})
    torch.manual_seed(0)
    model, frozen = build_classifier(cfg, 10)
    model = model.to(DEVICE)
    opt, _ = make_optimizer(cfg.optim, model, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.rand(8, 3, 224, 224, device=DEVICE)
    y = torch.arange(8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    if optimizer == "sgd_freeze_embed":
        assert frozen and all(n.startswith(("backbone.patch_embed", "backbone.norm_pre")) for n in frozen)
        assert all(params[n].grad is None and not opt.state.get(params[n]) for n in frozen)
        assert all(torch.equal(params[n], before[n]) for n in frozen)
    else:
        assert frozen == []
    trained = [n for n, p in params.items() if n not in frozen]
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in trained)
