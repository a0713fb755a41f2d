"""livt on CUDA: one bf16 MGP step and one bf16 Bal-BCE fine-tuning step of the paper preset's ViT-B/16 at 224 px
(skipped without a GPU; tests/gpu/run_all.sh runs them and `lightyard bench livt trainer.accelerator=cuda`)."""

import pytest
import torch

from common.runner import compose
from pipelines.livt.model import MaskedAutoencoder, create_vit, finetune_vit, make_loss, smooth_one_hot

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_paper_preset_mgp_and_bal_bce_steps_in_bf16():
    cfg = compose("livt", {"preset": "paper"})
    m = cfg.mgp
    device = torch.device("cuda")
    mae = MaskedAutoencoder(create_vit(cfg.model), m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mask_ratio).to(device)
    x = torch.randn(8, 3, 224, 224, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = mae(x)
    loss.backward()
    assert pred.shape == (8, 196, 768) and mask.sum(1).tolist() == [147.0] * 8 and torch.isfinite(loss)
    model = finetune_vit(cfg.model, 10, cfg.optim.drop_path).to(device)
    counts = torch.tensor([100, 50, 20, 10, 5, 5, 4, 3, 2, 1])
    criterion = make_loss("bal_bce", counts, 1.0).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = criterion(model(x), smooth_one_hot(torch.arange(8, device=device), 10, 0.1))
    value.backward()
    assert torch.isfinite(value) and model.head.weight.grad.abs().sum() > 0
