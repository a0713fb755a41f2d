"""Content-keyed caches of trained stages (pretraining, classifiers, heads): one way to name, build, write and read them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
import zipfile
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


def cached(path: Path, build: Callable[[], Any], what: str, strategy=None, check: Callable[[Any], Any] | None = None) -> Any:
    """The artifact at ``path``, built first when missing. ``check`` (names, shapes, entries: e.g. fit_state_dict with
    load=False on a meta-device model) raises for a file that this version did not build, which is then said, deleted
    and built again; it runs under forked RNGs, so a rebuild does not move the run's random draws, and on a file just
    built its error is the code's, with its traceback. ``build`` runs under forked RNGs too (torch, numpy, random), so
    a run's own random draws do not depend on whether the cache existed (livt's first run, which built stage 1,
    differed from later ones by 4e-4: stage 1's augmentations had drawn from ``random``). Under DDP rank 0 builds and
    the others wait at a barrier. Read with weights_only=True: only tensors and plain containers."""
    path = Path(path)
    lead = strategy is None or strategy.global_rank == 0
    if strategy is None and (found := read_cached(path, what, check)) is not MISSING:
        return found
    if lead and not path.is_file():
        with rng.forked():
            result = build()
        save_atomic(result, path)
        print(f"{what} cached at {path}", flush=True)
    if strategy is not None:
        strategy.barrier(f"cache-{path.stem}")
    try:
        found = _load(path)
    except Exception as err:  # under DDP every rank reads the file: rebuilding it here would race them
        raise ConfigError(f"{what} cache {path} is unreadable ({_reason(err)}); delete it and rerun (it is built again)") from None
    if check is not None and strategy is None:
        with rng.forked():
            check(found)  # just built: an error here is the code's, with its traceback
    elif check is not None:
        try:
            with rng.forked():
                check(found)
        except CHECK_ERRORS as err:
            raise ConfigError(f"{what} cache {path} {_unfit(err)}; delete it and rerun (it is built again)") from None
    return found


MISSING = object()  # read_cached's "nothing usable"
CHECK_ERRORS = (ConfigError, KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)  # an entry missing or odd


def read_cached(path: Path, what: str, check: Callable[[Any], Any] | None = None) -> Any:
    """The cache file at ``path``, or ``MISSING`` when there is none, it is unreadable (damaged from outside: writes
    are atomic) or ``check`` refuses it (written by other code): it is then said, deleted and built again, instead of
    failing every run after. ``check`` runs under forked RNGs."""
    if not path.is_file():
        return MISSING
    try:
        found = _load(path)
    except Exception as err:
        return _drop(path, what, f"is unreadable ({_reason(err)})")
    if check is not None:
        try:
            with rng.forked():
                check(found)
        except CHECK_ERRORS as err:
            return _drop(path, what, _unfit(err))
    return found


def _drop(path: Path, what: str, why: str) -> Any:
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise ConfigError(f"{what} cache {path} {why} and cannot be removed ({err.strerror}); delete it") from None
    notice(f"{what} cache {path} {why}: building it again")
    return MISSING


def _load(path: Path) -> Any:
    """torch.load after the zip's own CRC check: torch's reader skips it, so zeroed or flipped bytes loaded silently."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if (bad := archive.testzip()) is not None:
                raise ValueError(f"record {bad} fails its CRC check")
    return torch.load(path, map_location="cpu", weights_only=True)


def _unfit(err: Exception) -> str:
    return f"does not hold what this version builds ({_reason(err, 200)})"  # (room for the tensor's name)


def _reason(err: Exception, limit: int = 100) -> str:
    """torch's error, its first sentence (the rest advises weights_only=False: unsafe for a file of unknown origin)."""
    text = " ".join(str(err).split()).split(". ")[0]
    text = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"  # whole words
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
