"""stg_kd on CUDA: a few bf16 steps of the paper preset's networks (d_model 512, 8 heads, 26 frames, beam 5) through the
real `lightyard train` path, on generated clips instead of MSVD / MSR-VTT features (skipped without a GPU;
tests/gpu/run_all.sh runs it and `lightyard bench stg_kd trainer.accelerator=cuda`)."""

import math

import pytest
import torch

from common.runner import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_paper_preset_steps_in_bf16(home):
    (result,) = train(
        "stg_kd",
        ["preset=paper", "data.name=shapes", "data.n_train=128", "data.n_val=8", "data.n_test=16", "data.feature_epochs=1",
         "data.num_workers=0", "trainer.accelerator=cuda", "trainer.devices=1", "trainer.max_epochs=1",
         "decode.meteor=false", "trainer.enable_progress_bar=false"],
    )  # fmt: skip
    assert result.status == "FINISHED"
    assert result.config.trainer.precision == "bf16-mixed" and result.config.model.d_model == 512
    assert math.isfinite(result.metrics["test/cider"]) and math.isfinite(result.metrics["test_object/cider"])
