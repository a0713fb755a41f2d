"""CUDA checks (skipped without a GPU; tests/gpu/run_all.sh runs them on a GPU machine)."""

import pytest
import torch

from common.hardware import resolve_precision
from common.memory import MemoryProfiler
from common.runner import compose
from tests.test_callbacks import _fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_step_runs_and_learns():
    precision, notice = resolve_precision("auto", "cuda")
    assert notice is None and precision in {"bf16-mixed", "16-mixed"}
    cfg = compose("toy", {"trainer.max_epochs": 3})
    module, trainer = _fit(cfg, accelerator="cuda", precision="bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert torch.isfinite(module.head.weight).all() and module.head.weight.device.type == "cuda"


def test_cuda_memory_reporting():
    profiler = MemoryProfiler()
    cfg = compose("toy", {"model.optimizer": "adamw", "model.hidden": 4096})
    _fit(cfg, [profiler], accelerator="cuda", max_steps=3)
    peaks = profiler.peaks["fit"]
    assert peaks["peak_cuda_allocated_mb"] > 0 and peaks["peak_cuda_reserved_mb"] >= peaks["peak_cuda_allocated_mb"]
    assert profiler.ledger["bytes_per_trainable_param"] == 16


def test_single_gpu_ddp():
    cfg = compose("toy", {"trainer.max_epochs": 1})
    module, trainer = _fit(cfg, accelerator="cuda", strategy="ddp", devices=1)
    assert trainer.world_size == 1 and type(trainer.strategy).__name__ == "DDPStrategy"
