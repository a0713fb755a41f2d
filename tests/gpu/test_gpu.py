"""CUDA checks (skipped without a GPU; tests/gpu/run_all.sh runs them on a GPU machine)."""

import lightning.pytorch as pl
import pytest
import torch

from common.hardware import resolve_precision
from common.memory import MemoryProfiler
from common.runner import compose
from tests.test_callbacks import _fit
from tests.toy.module import ToyData, ToyModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_step_runs_and_learns():
    precision, notice = resolve_precision("auto", "cuda")
    assert notice is None and precision in {"bf16-mixed", "16-mixed"}
    cfg = compose("toy", {"trainer.max_epochs": 10})
    x, y = ToyData(cfg).train_set.tensors

    def accuracy(module) -> float:
        with torch.no_grad():
            return float((module.cpu()(x).argmax(1) == y).float().mean())

    pl.seed_everything(cfg.seed, verbose=False)
    untrained = accuracy(ToyModule(cfg))  # the same initial weights: _fit seeds the same way before building it
    module, trainer = _fit(cfg, accelerator="cuda", precision="bf16-mixed")
    assert trainer.precision == "bf16-mixed" and next(module.parameters()).device.type == "cuda"
    assert accuracy(module) >= 0.85 > untrained + 0.1  # two separated blobs: bf16 training reaches them


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
