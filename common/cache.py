"""Content-keyed caches of trained stages (pretraining, classifiers, heads): one way to name, build, write and read them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from common import rng
from common.config import ConfigError
from common.tracking import notice


def cache_file(cfg: DictConfig, pipeline: str, stem: str, key: Any) -> Path:
    """``<paths.cache_dir>/<pipeline>/<stem>-<hash of key>.pt``: key holds every input and setting the artifact depends on."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / pipeline / f"{stem}-{digest}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: a reader never sees half a file, a killed writer leaves none."""
    tmp = path.with_name(f"{path.name}.tmp{uuid.uuid4().hex}")  # not torch.randint: the run's RNG stays untouched
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        tmp.replace(path)
    except BaseException as err:  # nothing half-written is left, whatever stopped it
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # a folder where the file goes, a read-only folder, a full disk
            raise ConfigError(f"cannot write {path} ({err.strerror or err}); remove what is there or make its folder writable") from None
        raise


def cached(path: Path, build: Callable[[], Any], what: str, strategy=None) -> Any:
    """The artifact at ``path``, built first when missing. ``build`` runs under forked RNGs (torch, numpy, random), so a
    run's own random draws do not depend on whether the cache existed (livt's first run, which built stage 1, differed
    from later ones by 4e-4: stage 1's augmentations had drawn from ``random``). Under DDP rank 0 builds and the others
    wait at a barrier. Read with weights_only=True: only tensors and plain containers."""
    path = Path(path)
    lead = strategy is None or strategy.global_rank == 0
    if strategy is None and (found := read_cached(path, what)) is not None:
        return found
    if lead and not path.is_file():
        with rng.forked():
            result = build()
        save_atomic(result, path)
        print(f"{what} cached at {path}", flush=True)
    if strategy is not None:
        strategy.barrier(f"cache-{path.stem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # under DDP every rank reads the file: rebuilding it here would race them
        raise ConfigError(f"{what} cache {path} is unreadable ({_reason(err)}); delete it and rerun (it is built again)") from None


def read_cached(path: Path, what: str) -> Any | None:
    """The cache file at ``path``, or None when there is none or it is unreadable: damaged from outside (writes are
    atomic), it is said, deleted and built again, instead of failing every run after."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = _reason(err)
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"{what} cache {path} is unreadable ({reason}) and cannot be removed ({err.strerror}); delete it") from None
    notice(f"{what} cache {path} is unreadable ({reason}): building it again")
    return None


def _reason(err: Exception) -> str:
    """torch's error, its first sentence (the rest advises weights_only=False: unsafe for a file of unknown origin)."""
    text = " ".join(str(err).split()).split(". ")[0][:100]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
