"""Data loading helpers shared by the pipelines' LightningDataModules."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from common.config import ConfigError


class EpochShuffleSampler(Sampler[int]):
    """A new permutation every epoch, drawn from (seed, epoch) alone, and a resumable position.

    The permutation is the one ``DistributedSampler(shuffle=True, seed=seed)`` draws, which Lightning
    puts on training loaders under DDP: a one-process run and a DDP run see the same global batches.

    Lightning calls ``set_epoch`` at each epoch start; the state (epoch, samples yielded) goes into
    checkpoints through StatefulDataLoader, so a run resumed mid-epoch sees exactly the order an
    uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self._yielded = self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        start, self._skip = self._skip, 0
        self._yielded = start
        for index in order[start:]:
            self._yielded += 1
            yield index

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["yielded"]


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0, **kwargs: Any
) -> StatefulDataLoader:
    """A DataLoader whose position goes into Lightning checkpoints.

    With :class:`EpochShuffleSampler` that lets a run stopped mid-epoch resume on exactly the
    batches an uninterrupted run would have seen next.
    """
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    # (a loader's iterator draws its base seed from the global RNG unless given ``generator=``; pipelines whose
    # dropout must not shift by that draw pass their own. Not a default: under ddp_spawn a loader
    # holding a generator made the worker processes abort at exit, 2 runs in 6.)
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def require_folder(root: str | Path, layout: str) -> Path:
    """A dataset folder that exists (and is a folder), or one line saying what it is and the layout expected."""
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"dataset folder {root} {problem}; expected layout: {layout}")
    return root


def require_files(root: str | Path, names: list[str], layout: str) -> Path:
    """Check a dataset folder before reading it; one line naming what is missing and the layout expected."""
    root = require_folder(root, layout)
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise ConfigError(f"dataset folder {root} lacks {', '.join(missing)}; expected layout: {layout}")
    return root


def files_digest(paths, root: str | Path) -> str:
    """Key of a decoded-data cache: each file's path under ``root`` (its class folder included), size and bytes. An
    edited, renamed or moved file (a label is often its folder) gives a new key, never a stale cache."""
    digest = hashlib.sha1()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def check_labels(where: str | Path, labels, count: int, classes: int) -> None:
    """One whole-number label in 0..classes-1 per image: a short label list would shift every later label silently."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise ConfigError(f"{where}: {labels.size} labels for {count} images; every image needs exactly one label")
    if count and not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{where}: labels must be whole numbers, got {labels.dtype}")
    if count and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels[(labels < 0) | (labels >= classes)][0])
        raise ConfigError(f"{where}: label {bad} is outside 0..{classes - 1}")


def read_text(path: str | Path, what: str = "text file") -> str:
    """A user's UTF-8 text file (split list, captions); a file in another encoding is one line naming the file and the
    first bad byte, not a UnicodeDecodeError after a run opened. A leading BOM (Windows editors) is dropped."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:  # decoded whole, so err.start is the offset in the file
        raise ConfigError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None


def check_images(paths) -> None:
    """Every file's image header, before training starts (a text file named .png, an empty or foreign file would
    otherwise fail only when a late split is first read, after the training it was meant to evaluate). A PNG is also
    verified: every chunk read and its CRC checked, so a truncated or damaged PNG is caught here too (cheap: 1402
    CamVid-half PNGs take 0.06 s warm, under 4 s from a cold disk); other formats' data is checked at decode."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        verifying = False
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 (the header is parsed here)
                verifying = image.format == "PNG"
                if verifying:
                    image.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
            if verifying:
                raise ConfigError(CORRUPT.format(path=path)) from None
            problem = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else " ".join(str(err).split())[:120]
            raise ConfigError(f"{path}: {problem}; remove or replace the file") from None


CORRUPT = "{path}: image data is truncated or corrupt; replace the file"


def load_image(path: str | Path):
    """A fully decoded PIL image (its file closed); PIL's decode errors, which surface only at ``load()``, as one
    line naming the file instead of "OSError: image file is truncated" in the middle of a run."""
    from PIL import Image

    with Image.open(path) as image:
        try:
            image.load()
        except (OSError, SyntaxError, EOFError):
            raise ConfigError(CORRUPT.format(path=path)) from None
        return image


def require_weights_file(path: str | Path, what: str) -> Path:
    """A file in torch.save's format (a zip archive), checked before anything runs: torch's own error for anything
    else is a page that ends by advising ``weights_only=False``, which would run code from the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{what} {path} is not a PyTorch file (torch.save's zip format): empty, truncated or something else")
    return path


def load_weights(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a checked file; tensors and plain containers only, errors in one line."""
    path = require_weights_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a zip that is not a checkpoint, or one holding objects weights_only refuses
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(f"{what} {path} does not load as PyTorch weights ({type(err).__name__}: {reason})") from None


NUMPY_ARRAYS = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
)


def load_pickle(file, allowed: frozenset[tuple[str, str]] = NUMPY_ARRAYS, encoding: str = "bytes") -> Any:
    """A pickle from a user's data folder (CIFAR's batches, Planetoid's files) with only ``allowed`` classes: plain
    containers and numpy arrays by default, never code. Anything else raises ``pickle.UnpicklingError``."""

    import _compat_pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # a Python 2 pickle (Planetoid's) names __builtin__.list: mapped as pickle's own find_class maps it
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
            return super().find_class(module, name)

    return Restricted(file, encoding=encoding).load()
