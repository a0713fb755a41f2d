"""Accelerator, precision and distributed strategy from config.

Mixed precision: ``bf16-mixed`` where the GPU supports it, ``16-mixed`` (with Lightning's loss
scaling) otherwise; a half precision asked for on CPU runs in 32 bit with a logged notice.
Distributed: devices, nodes and strategy pass through to Lightning, which detects torchrun
(TorchElastic variables) and SLURM (``SLURM_*`` variables) by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from common.config import ConfigError

HALF = {"16", "16-mixed", "bf16", "bf16-mixed", "16-true", "bf16-true"}


def resolve_accelerator(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={requested} but no CUDA device is visible; use trainer.accelerator=cpu")
    return "cuda" if requested == "gpu" else requested


def skip_failing_nvml_check() -> None:
    """Let ``torch.cuda.is_available()`` ask the CUDA runtime directly where NVML cannot be loaded (CUDA builds).

    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` on import (ask NVML, leave CUDA uninitialised, safe to fork).
    Without an NVIDIA driver torch then tries to dlopen libnvidia-ml on every call, fails, and asks the runtime anyway
    (``_cuda_getDeviceCount``); torch's optimizers ask on every step (~30 µs a call on this idle CPU machine, more under
    load). Same answer from the same runtime call, without the failing dlopen (with ``CUDA_VISIBLE_DEVICES`` empty the
    NVML path answers 0 without the runtime; the runtime answers 0 too). Kept: a machine where NVML loads, and ROCm
    builds (they ask AMD SMI, not NVML: there the variable keeps HIP uninitialised before a fork). Only once Lightning
    is imported (it sets the variable on import): the runner calls this after loading the pipeline, and
    :func:`trainer_kwargs` again. ddp_spawn workers import Lightning anew and keep its check."""
    if torch.version.hip or "lightning.fabric" not in sys.modules or os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def resolve_precision(requested: str, accelerator: str) -> tuple[str, str | None]:
    """Return (precision for Lightning, notice or None)."""
    requested = str(requested)
    if accelerator != "cuda":
        if requested in HALF:
            return "32-true", f"precision {requested} asked for on {accelerator}: running in 32-bit (half precision needs CUDA)"
        return "32-true", None
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return ("bf16-mixed" if bf16_ok else "16-mixed"), None
    if requested.startswith("bf16") and not bf16_ok:
        return (
            "16-mixed",
            f"precision {requested} asked for but {torch.cuda.get_device_name()} has no bf16: using 16-mixed with loss scaling",
        )
    return requested, None


def global_rank() -> int:
    """This process's rank under torchrun or SLURM before Lightning sets anything up."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def check_trainer(trainer_cfg: DictConfig) -> None:
    """The trainer values that ``checks:`` rules cannot state, refused in one line when the config is composed
    (Lightning's own check comes only after a run has opened)."""
    resolve_accelerator(str(trainer_cfg.accelerator))  # gpu on a machine without one: refused before a run opens
    devices = str(trainer_cfg.devices).replace(" ", "")
    ids = devices.split(",")
    count = int(devices) if re.fullmatch(r"-?\d+", devices) else None  # Lightning reads "2" as two devices, "0,1" as ids
    if not (devices == "auto" or (count is not None and (count >= 1 or count == -1)) or (len(ids) > 1 and all(i.isdigit() for i in ids))):
        raise ConfigError(f'trainer.devices must be auto, a count ≥ 1 (-1: all) or device ids like "0,1"; got {trainer_cfg.devices!r}')
    for key in ("max_epochs", "max_steps"):  # Lightning reads 0 as "train nothing" and still calls the run finished
        value = trainer_cfg.get(key)
        if value is not None and value != -1 and value < 1:
            raise ConfigError(f"trainer.{key} must be ≥ 1 (or -1: no limit), got {value}")
    limit = trainer_cfg.get("limit_train_batches")
    if limit is not None and not (limit > 0 and (limit <= 1 or float(limit).is_integer())):
        raise ConfigError(f"trainer.limit_train_batches must be a fraction in (0, 1] or a whole number of batches ≥ 1, got {limit}")
    if trainer_cfg.strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        names = StrategyRegistry.available_strategies()
        if trainer_cfg.strategy not in names:
            raise ConfigError(
                f"unknown trainer.strategy '{trainer_cfg.strategy}'; valid: auto, {', '.join(n for n in names if 'find_unused' not in n)}"
            )


def check_manual_step(trainer_cfg: DictConfig, what: str) -> None:
    """A module that steps its optimizers itself: Lightning refuses gradient clipping and accumulation for it, but
    only once the fit starts (the run open); refused here, before."""
    for key, neutral in (("gradient_clip_val", (None, 0)), ("accumulate_grad_batches", (1,))):
        if trainer_cfg.get(key) not in neutral:
            raise ConfigError(f"trainer.{key} does not apply to {what}; leave it unset")


def check_finite_length(trainer_cfg: DictConfig, what: str) -> None:
    """A schedule over the whole fit (``total_steps``) needs its length: trainer.max_epochs=-1 with no max_steps is
    endless (an OverflowError once the run had opened)."""
    if trainer_cfg.max_epochs in (-1, None) and trainer_cfg.max_steps in (-1, None):
        raise ConfigError(f"{what} needs the fit's length: set trainer.max_epochs or trainer.max_steps (both are -1: no limit)")


def trainer_kwargs(trainer_cfg: DictConfig) -> tuple[dict, list[str]]:
    """Lightning Trainer arguments from ``cfg.trainer``, with accelerator and precision resolved; the process drops
    Lightning's NVML-based CUDA check where NVML cannot load (:func:`skip_failing_nvml_check`)."""
    kwargs = dict(trainer_cfg)
    notices = []
    accelerator = resolve_accelerator(str(kwargs["accelerator"]))
    kwargs["accelerator"] = accelerator
    kwargs["precision"], notice = resolve_precision(kwargs["precision"], accelerator)
    if notice:
        notices.append(notice)
        warnings.warn(notice, stacklevel=2)
    kwargs["profiler"] = _hook_profiler()
    skip_failing_nvml_check()
    return kwargs, notices


_NO_OP = contextlib.nullcontext()


def _no_op(action_name: str) -> contextlib.nullcontext:
    return _NO_OP


def _hook_profiler():
    """Lightning's default profiler (PassThroughProfiler), with one shared no-op context for the ~25 hook calls of a
    step instead of a new generator context each: ~0.05 ms a step (a trivial module under the Trainer, 2,000 steps:
    0.53-0.58 → 0.49-0.51 ms), against a small graph's ~5 ms step. A module-level function, not a lambda: ddp_spawn
    pickles the Trainer."""
    from lightning.pytorch.profilers import PassThroughProfiler

    profiler = PassThroughProfiler()
    profiler.profile = _no_op
    return profiler


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, Any]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` and the last call's result; a CUDA device is synchronised before
    and after (its kernels run asynchronously), so the clock covers the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = None
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def total_steps(trainer) -> int:
    """``trainer.estimated_stepping_batches``, for an LR schedule built in ``configure_optimizers``.

    To count them Lightning builds (and starts iterating) the fit's training loader, which in ``configure_optimizers``
    is before a resumed run's loop state is restored; the fit then keeps that loader and never loads the saved
    position into it, so a run resumed mid-epoch started its epoch again from the first batch. Dropping the loader
    makes the fit build it again after the restore, with the saved position and the restored epoch. The dropped
    loader's draws (its iterator's base seed) are forked away: the run's streams are those of one loader, as before."""
    from common import rng

    with rng.forked():
        total = trainer.estimated_stepping_batches
    trainer.fit_loop._combined_loader = None  # (private: no public way to ask for the rebuild)
    return total
