"""vocab_kd on CUDA: two bf16 steps of the paper preset (96-wide student, the packaged MiniLM teacher trained too by dual
training) through the real `lightyard train` path (skipped without a GPU; tests/gpu/run_all.sh runs it and
`lightyard bench vocab_kd trainer.accelerator=cuda`)."""

import pytest
import torch

from common.runner import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_paper_preset_dual_training_steps_in_bf16(home):
    (result,) = train(
        "vocab_kd",
        ["preset=paper", "trainer.accelerator=cuda", "trainer.devices=1", "trainer.max_steps=2", "teacher.head.steps=5",
         "metrics.fit_passages=100", "trainer.enable_progress_bar=false"],
    )  # fmt: skip
    assert result.status == "FINISHED"
    assert result.config.dual.train_teacher and result.config.trainer.precision == "bf16-mixed"
    assert torch.isfinite(torch.tensor(result.metrics["test/student_mlm_loss"]))
    assert result.metrics["size/student_params"] > 0
