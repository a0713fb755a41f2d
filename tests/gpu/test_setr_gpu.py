"""setr on CUDA (skipped without a GPU; tests/gpu/run_all.sh runs them and `lightyard bench setr` on a GPU machine)."""

import pytest
import torch

from common.runner import compose

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("decoder", ["naive", "pup", "mla"])
def test_paper_sized_bf16_step(decoder):
    """One bf16 training step of the paper preset's model (ViT-L/16 at 768 px, 19 classes, all auxiliary heads), batch 2:
    finite loss, gradients on every trainable parameter, and the sliding window batched equal to window by window."""
    from pipelines.setr.model import make_optimizer, setr_loss, slide_inference
    from pipelines.setr.module import build_model

    cfg = compose("setr", {"preset": "paper", "model.decoder": decoder, "data.root": "/unused"})
    torch.manual_seed(0)
    model = build_model(cfg, 19).cuda()
    opt, _ = make_optimizer(model, 0.01, 0.9, 0.0, 10.0, 10)
    x = torch.rand(2, 3, 768, 768, device="cuda")
    y = torch.randint(0, 19, (2, 768, 768), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, aux = model(x, with_aux=True)
        loss = setr_loss(logits.float(), [a.float() for a in aux], y)[0]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    image = torch.rand(1, 3, 768, 1280, device="cuda")
    with torch.inference_mode():
        batched = slide_inference(model, image, (768, 768), (512, 512), 19, 0)
        single = slide_inference(model, image, (768, 768), (512, 512), 19, 1)
    assert torch.allclose(batched, single, atol=1e-4)  # fp32 on GPU: kernels may differ by batch size (cuDNN heuristics)
