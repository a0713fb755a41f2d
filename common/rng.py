"""The random streams a run draws from, in one place: torch's CPU (and CUDA) generators, numpy's and ``random``'s
(timm's RandAugment and crops draw from ``random``). Captured into a checkpoint, restored, or forked around work whose
draws must not move the run's."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch


def get_state(cuda: bool = True) -> dict[str, Any]:
    """Every stream's state as tensors and plain values (a checkpoint read with weights_only=True takes them);
    CUDA's only where CUDA has been initialised (asking would initialise it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    # (a checkpoint may hand back random's tuples as lists)
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked():
    """The CPU streams restored afterwards (CUDA's are left alone: what runs inside seeds or draws on the CPU only)."""
    state = get_state(cuda=False)
    try:
        yield
    finally:
        set_state(state)
