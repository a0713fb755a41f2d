"""Memory accounting: an exact ledger of training state, and peak memory per stage.

The ledger counts bytes actually held after the first optimizer step: parameters, gradients, and
optimizer state tensors shaped like their parameter (momentum, Adam moments). Per-parameter scalars
such as Adam's ``step`` counter are reported apart as bookkeeping, so that the headline number is
exactly the textbook one: fp32 SGD 8, SGD with momentum 12, AdamW 16 bytes per trainable parameter.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from common.tables import markdown_table

MB = 2**20


def memory_ledger(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state held right now by ``model``'s training."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    state_bytes = bookkeeping_bytes = 0
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for value in state.values():
                if not torch.is_tensor(value):
                    continue
                size = value.numel() * value.element_size()
                if value.shape == param.shape:
                    state_bytes += size
                else:
                    bookkeeping_bytes += size
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return {
        "trainable_params": n_trainable,
        "frozen_params": sum(p.numel() for p in frozen),
        "param_bytes": trainable_bytes + sum(p.numel() * p.element_size() for p in frozen),
        "frozen_param_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "optimizer_bookkeeping_bytes": bookkeeping_bytes,
        "bytes_per_trainable_param": (trainable_bytes + grad_bytes + state_bytes) / max(n_trainable, 1),
    }


def read_peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM, resettable on Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_isolated(fn, *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process (picklable fn and args): peak-RSS measurements on CPU
    need it, since memory freed by one measurement stays in the allocator and hides the next one's growth."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # an executor, not a Pool: a worker killed by the kernel (out of memory) raises here instead of hanging forever
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the measurement process of {fn.__name__} died (killed by a signal, e.g. for memory, or failed to start)"
            ) from None


class MemoryProfiler(pl.Callback):
    """Peak memory per stage (CUDA allocated/reserved on GPU, process RSS on CPU) and the ledger.

    Logged to the trainer's logger as ``memory/...`` metrics and printed at the end of fit.
    """

    def __init__(self) -> None:
        self.ledger: dict[str, float] | None = None
        self.peaks: dict[str, dict[str, float]] = {}
        self._rss_resettable = True

    def _start(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        else:
            self._rss_resettable = reset_peak_rss()

    def _stop(self, trainer: pl.Trainer, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks = {
                "peak_cuda_allocated_mb": torch.cuda.max_memory_allocated(device) / MB,
                "peak_cuda_reserved_mb": torch.cuda.max_memory_reserved(device) / MB,
            }
        else:
            key = "peak_rss_mb" if self._rss_resettable else "peak_rss_since_start_mb"
            peaks = {key: read_peak_rss() / MB}
        self.peaks[stage] = peaks
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"memory/{stage}_{k}": v for k, v in peaks.items()}, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.training and not trainer.sanity_checking and trainer.state.fn == "validate":
            self._start(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ledger is None and trainer.global_step >= 1:
            self.ledger = memory_ledger(pl_module, list(trainer.optimizers))
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"memory/{k}": v for k, v in self.ledger.items()}, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop(trainer, "fit")
        if trainer.is_global_zero and os.environ.get("LIGHTYARD_VERBOSE"):
            print(self.report())

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._stop(trainer, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._stop(trainer, "test")

    def report(self) -> str:
        rows: list[dict[str, Any]] = []
        if self.ledger:
            rows += [{"what": k, "value": v} for k, v in self.ledger.items()]
        for stage, peaks in self.peaks.items():
            rows += [{"what": f"{stage} {k}", "value": v} for k, v in peaks.items()]
        return markdown_table(rows, title="Memory")
