"""Data loading helpers shared by the pipelines' LightningDataModules."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from common import rng
from common.config import ConfigError
from common.tracking import notice


class EpochShuffleSampler(Sampler):
    """A new permutation every epoch, drawn from (seed, epoch) alone, and a resumable position.

    The permutation is the one ``DistributedSampler(shuffle=True, seed=seed)`` draws, which Lightning
    puts on training loaders under DDP: a one-process run and a DDP run see the same global batches.

    Lightning calls ``set_epoch`` at each epoch start; the state (epoch, samples yielded) goes into
    checkpoints through StatefulDataLoader, so a run resumed mid-epoch sees exactly the order an
    uninterrupted run would have seen. ``with_epoch`` yields ``(epoch, index)`` keys for datasets whose random
    augmentations are seeded per epoch and item (:class:`SeededItems`).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, with_epoch: bool = False, epoch: int = 0):
        self.size, self.seed, self.epoch, self.shuffle, self.with_epoch = size, seed, epoch, shuffle, with_epoch
        self._yielded = self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        start, self._skip = self._skip, 0
        self._yielded = start
        for index in order[start:]:
            self._yielded += 1
            yield (self.epoch, index) if self.with_epoch else index

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["yielded"] >= self.size:  # saved at an epoch's end: the next iteration is the next epoch, whole
            self.epoch, self._skip = state["epoch"] + 1, 0
        else:
            self.epoch, self._skip = state["epoch"], state["yielded"]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """One generator seed per (run seed, epoch, item): the same in every process, worker and resume."""
    return hash((seed, epoch, index)) % 2**63  # (a tuple of ints hashes the same in every process)


class SeededItems(Dataset):
    """Item ``(epoch, i)`` is ``dataset[i]`` drawn with torch's, numpy's and ``random``'s generators seeded by
    :func:`item_seed`, and the run's own streams restored afterwards.

    For transforms that draw from the global generators (timm's crops and RandAugment): without it an item's
    augmentation depends on what was drawn before it, and Lightning fetches one batch ahead, so a checkpoint's
    generator state is a batch past its loader's position and a resumed run augments differently. Loader workers
    get the epoch with each key (persistent workers never see a dataset attribute set after they started).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch's items (the loader hands a batch's keys at once) under one fork of the streams: saving and restoring
        them around each item took a third of a small image batch's loading."""
        with rng.forked():
            return [self._seeded(epoch, index) for epoch, index in keys]

    def _seeded(self, epoch: int, index: int):
        seed = item_seed(self.seed, epoch, index)
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed CUDA's too, which is not forked)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    item_epochs: bool = False,
    epoch: int = 0,
    **kwargs: Any,
) -> StatefulDataLoader:
    """A DataLoader whose position goes into Lightning checkpoints.

    With :class:`EpochShuffleSampler` that lets a run stopped mid-epoch resume on exactly the
    batches an uninterrupted run would have seen next. ``item_epochs``: the dataset is indexed by
    ``(epoch, index)`` (training sets with per-item seeded augmentation, e.g. :class:`SeededItems`).
    ``epoch``: the sampler's first epoch (a resumed fit creates its loader's iterator before it sets the sampler's
    epoch, and loader workers start drawing at once); a datamodule's loaders: :func:`training_loader`, :func:`eval_loader`.
    """
    use_sampler = shuffle or item_epochs
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle, with_epoch=item_epochs, epoch=epoch) if use_sampler else None
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


def fit_epoch(datamodule) -> int:
    """The epoch a training loader starts in, 0 outside a fit: the one Lightning will give the sampler (epochs
    processed; after a checkpoint saved at an epoch's end that is the next epoch, where ``current_epoch`` still
    says the saved one until the fit starts)."""
    trainer = getattr(datamodule, "trainer", None)
    return int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else 0


def training_loader(datamodule, dataset: Dataset, shuffle: bool = True, item_epochs: bool = False, **kwargs: Any) -> StatefulDataLoader:
    """A datamodule's training loader: ``data.batch_size``, ``data.num_workers`` and ``seed`` from its config, and
    the sampler started at :func:`fit_epoch` (here, so that no pipeline can forget it: a resumed fit needs it)."""
    cfg = datamodule.cfg
    return make_loader(
        dataset,
        cfg.data.batch_size,
        shuffle=shuffle,
        seed=int(cfg.seed),
        num_workers=cfg.data.num_workers,
        item_epochs=item_epochs,
        epoch=fit_epoch(datamodule),
        **kwargs,
    )


def check_full_batch(batch_size: int, items: int, what: str) -> None:
    """A training loader that drops its partial batch needs one full batch: a datamodule's setup says so before a
    run opens (the runner's own check finds an empty epoch only once the run is open: a FAILED run)."""
    if items < batch_size:
        raise ConfigError(f"data.batch_size={batch_size} is more than the {items} {what}: nothing would train; lower data.batch_size")


def eval_loader(datamodule, dataset: Dataset, **kwargs: Any) -> StatefulDataLoader:
    """A datamodule's evaluation loader: in order, ``data.eval_batch_size`` and ``data.num_workers`` from its config."""
    return make_loader(dataset, datamodule.cfg.data.eval_batch_size, num_workers=datamodule.cfg.data.num_workers, **kwargs)


def check_root_is_read(d, embedded: str | tuple[str, ...], names, key: str = "name") -> None:
    """``data.root`` set while ``data.<key>`` is a generated set, which reads no folder: the user meant a real set
    (it trained on the generated data, FINISHED, without a word)."""
    embedded = (embedded,) if isinstance(embedded, str) else tuple(embedded)
    if d[key] in embedded and d.root:
        others = ", ".join(n for n in names if n not in embedded)
        raise ConfigError(f"data.root={d.root} is set but data.{key}={d[key]} reads no folder; set data.{key} (one of {others})")


def require_folder(root: str | Path, layout: str) -> Path:
    """A dataset folder that exists (and is a folder), or one line saying what it is and the layout expected."""
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"dataset folder {root} {problem}; expected layout: {layout}")
    return root


def require_image_tree(
    root: str | Path, layout: str, splits: tuple[str, ...] = ("train", "test"), classes: tuple[str, ...] | None = None
) -> Path:
    """An ImageFolder tree or its zip per split, checked by names before a run opens (the images are read in setup):
    each split readable, two or more class folders holding images, the same classes in every split; or, for a reader
    that takes only ``classes`` (others ignored), each of those holding an image in every split."""
    root = require_folder(root, layout)
    for split in splits:
        if not (root / split).is_dir() and not (root / f"{split}.zip").is_file():
            raise ConfigError(f"dataset folder {root} lacks {split}/ and {split}.zip; expected layout: {layout}")
    names = None
    for split in splits:
        where, split_names = _split_classes(root, split, layout)
        if classes is not None:
            missing = [c for c in classes if c not in split_names]
            if missing:
                raise ConfigError(f"no {', '.join(missing)} images under {where}/{split}/; expected layout: {layout}")
            continue
        if not split_names:
            raise ConfigError(f"no images under {where}/{split}/<class>/; expected layout: {layout}")
        if len(split_names) < 2:  # (torchmetrics refused it only after training)
            raise ConfigError(f"{where}/{split} holds one class folder ({split_names[0]}); a classifier needs two or more: {layout}")
        if names is not None and split_names != names:
            only = [f"{c} only in {split if c in split_names else splits[0]}" for c in sorted(set(names) ^ set(split_names))]
            raise ConfigError(
                f"{root}: {' and '.join(splits)} hold different classes ({', '.join(only[:5])}); a class folder without images counts as absent"
            )
        names = split_names
    return root


def _zip_members(archive: zipfile.ZipFile, split: str) -> dict[str, str]:
    """``<split>/<class>/<file>`` → its member: <split>/<class>/<file> as the CIFAR zips hold it, or <class>/<file>, or
    under a prefix folder. In a zip of the first kind a file at the split's root is in no class folder (_loose)."""
    names = archive.namelist()
    loose = set(_loose(names, split))
    return {
        f"{split}/{'/'.join(n.split('/')[-2:])}": n
        for n in names
        if not n.endswith("/") and n.count("/") >= 1 and (n.count("/") == 1 or n.split("/")[-3] == split) and n not in loose
    }


def _loose(names: list[str], split: str) -> list[str]:
    """<split>/<file> in a zip that also holds <split>/<class>/<file>: outside any class folder, as a file directly in a
    tree's split folder (no label to give it). In a zip of <class>/<file> it is a file of a class named like the split."""
    if not any(n.count("/") >= 2 and n.split("/")[-3] == split for n in names):
        return []
    return [n for n in names if n.count("/") == 1 and n.startswith(f"{split}/") and not n.endswith("/")]


def _open_zip(where: str, layout: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(where)
    except (zipfile.BadZipFile, OSError):
        raise ConfigError(f"{where} is not a readable zip archive; expected layout: {layout}") from None


def _split_classes(root: Path, split: str, layout: str) -> tuple[str, list[str]]:
    """Where a split is read from and its class folders that hold an image file, by names (the first image found
    in each folder is enough)."""
    if (root / split).is_dir():
        folders = (c for c in (root / split).iterdir() if c.is_dir())
        return str(root), sorted(c.name for c in folders if any(p.suffix.lower() in IMAGE_SUFFIXES for p in c.iterdir()))
    where = str(root / f"{split}.zip")
    return where, list(_zip_index(where, split, layout, *_stat_key(root / f"{split}.zip"))[0])


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _zip_index(where: str, split: str, layout: str, size: int, mtime_ns: int) -> tuple[tuple[str, ...], int]:
    """(class folders holding an image, images in class folders); keyed by the zip's size and time too (an edited zip
    is read again): 0.5 s for CIFAR's 50 000 members, and a grid checks every child's data before it opens."""
    with _open_zip(where, layout) as archive:
        images = [k for k in _zip_members(archive, split) if Path(k).suffix.lower() in IMAGE_SUFFIXES]
    return tuple(sorted({k.split("/")[1] for k in images})), len(images)


def image_counts(root: str | Path, layout: str) -> dict[str, int]:
    """Images per split of an ImageFolder tree or its zips (checked by require_image_tree), by names: the files
    read_image_tree decodes, counted before a run opens (a size asked of a split is checked there, not in setup)."""
    root = require_image_tree(root, layout)
    counts = {}
    for split in ("train", "test"):
        if (root / split).is_dir():
            counts[split] = sum(1 for p in (root / split).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            counts[split] = _zip_index(str(root / f"{split}.zip"), split, layout, *_stat_key(root / f"{split}.zip"))[1]
    return counts


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
    CamVid-half PNGs take 0.06 s warm, under 4 s from a cold disk). A JPEG must end in its end-of-image marker; one
    that does not (a cut copy, or data after the end) is decoded at 1/8 scale, which reads all of it (~1 ms)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        verifying = False
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 (the header is parsed here)
                verifying = image.format == "PNG"
                if verifying:
                    image.verify()
                elif image.format == "JPEG" and not _ends_jpeg(path):
                    verifying = True
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
            if verifying:
                raise ConfigError(CORRUPT.format(path=path)) from None
            problem = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else " ".join(str(err).split())[:120]
            raise ConfigError(f"{path}: {problem}; remove or replace the file") from None


def _ends_jpeg(path) -> bool:
    """The end-of-image marker in the file's last 4 KiB (entropy-coded data never holds it: 0xFF there is followed by
    0x00 or a restart marker, so a truncated file does not). A file small enough for that window to reach its header
    (an EXIF thumbnail ends in the same marker) is read whole: the marker must follow the last start of scan."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size <= 72 * 1024:  # a header segment is at most 64 KiB
            f.seek(0)
            data = f.read()
            return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0
        f.seek(size - 4096)
        return b"\xff\xd9" in f.read()


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


# torch.save's format before PyTorch 1.6 (``_use_new_zipfile_serialization=False``): a pickle of this magic number first
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def require_weights_file(path: str | Path, what: str, legacy: bool = False) -> Path:
    """A file in torch.save's format (a zip archive; with ``legacy``, also the pre-1.6 format, which
    ``torch.load(weights_only=True)`` reads too), checked before anything runs: torch's own error for anything else is
    a page that ends by advising ``weights_only=False``, which would run code from the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    if zipfile.is_zipfile(path):
        return path
    if legacy:
        with open(path, "rb") as f:
            if f.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC:
                return path
    kind = "torch.save's format" if legacy else "torch.save's zip format"
    raise ConfigError(f"{what} {path} is not a PyTorch file ({kind}): empty, truncated or something else")


def load_weights(path: str | Path, what: str, legacy: bool = False, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a checked file; tensors and plain containers only, errors in one line.
    ``mmap``: a zip's tensors are mapped, read only where used (a check of names and shapes reads none)."""
    path = require_weights_file(path, what, legacy)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # a zip that is not a checkpoint, or one holding objects weights_only refuses
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(f"{what} {path} does not load as PyTorch weights ({type(err).__name__}: {reason})") from None


def check_state_dict_file(path: str | Path, what: str = "model.checkpoint") -> Path:
    """A local weights file, before any run: a .safetensors file or torch.save's format."""
    file = Path(path).expanduser()
    if file.suffix == ".safetensors" and not file.is_file():
        where = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise ConfigError(f"{what} {file} {where} (a .safetensors file or a torch state dict)")
    return file if file.suffix == ".safetensors" else require_weights_file(file, what, legacy=True)


def load_state_dict_file(path: str | Path, what: str = "model.checkpoint", lazy: bool = False) -> dict[str, torch.Tensor]:
    """Local weights (safetensors, or a state dict saved by torch, read with weights_only=True, or a file's
    ``state_dict`` / ``model`` entry holding one, named as the network the pipeline builds), errors in one line.
    ``lazy``: for a check of names and shapes before the run, which then reads the file once (tensors mapped, or
    meta tensors of a .safetensors header's shapes)."""
    file = check_state_dict_file(path, what)
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            if not lazy:
                return load_file(str(file))
            with safe_open(str(file), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as err:
            raise ConfigError(f"{what} {file} is not a readable .safetensors file ({' '.join(str(err).split())[:120]})") from None
    state = load_weights(file, what, legacy=True, mmap=lazy)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{what} {file} holds a {type(state).__name__} that is not a state dict (parameter names → tensors)")
    return state


def unprefixed(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` with the name prefix removed that makes it fit ``module`` (a whole model's or a Lightning checkpoint's
    names: ``model.``, ``model.encoder.vit.``); as given when names already match or no prefix helps. Two prefixes that
    fit equally (a model and its EMA or teacher copy) are one line: which one is meant is not ours to guess."""
    own = module.state_dict().keys()
    if not own or own & state.keys():
        return state
    prefixes = {k[: i + 1] for k in state for i, c in enumerate(k) if c == "."}
    fits = sorted(((len({k.removeprefix(p) for k in state if k.startswith(p)} & own), p) for p in prefixes), reverse=True)
    if not fits or not fits[0][0]:
        return state
    best = [p for count, p in fits if count == fits[0][0]]
    if len(best) > 1:
        raise ConfigError(
            f"{what} holds {len(best)} sets of weights that fit {type(module).__name__} ({', '.join(sorted(best)[:4])}); "
            "save the one to load on its own"
        )
    return {k.removeprefix(best[0]): v for k, v in state.items() if k.startswith(best[0])}


def fit_checkpoint(module: torch.nn.Module, path: str | Path, optional: tuple[str, ...] = (), load: bool = True) -> None:
    """``model.checkpoint``'s weights into ``module`` (:func:`fit_state_dict`); ``load=False`` checks names and shapes
    before a run without reading the tensors."""
    what = f"model.checkpoint {Path(path).expanduser()}"
    fit_state_dict(module, load_state_dict_file(path, lazy=not load), what, optional, load)


def fit_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, optional: tuple[str, ...] = (), load: bool = True
) -> dict[str, torch.Tensor]:
    """``state`` loaded into ``module``, or one line saying why it does not fit: names (after :func:`unprefixed`), then
    shapes, which torch reports as a page per tensor. Names starting with one of ``optional`` (a classifier head) may be
    missing on either side; BatchNorm's ``num_batches_tracked`` may be missing (older files lack it; torch fills it).
    Returns the state as loaded; ``load=False`` only checks (a meta-device module, before any run or rebuild)."""
    own = module.state_dict()
    state = unprefixed(module, state, what)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(optional)}
    missing = sorted(k for k in own.keys() - state.keys() if not k.startswith(optional) and not k.endswith(".num_batches_tracked"))
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        names = lambda keys: ", ".join(keys[:2]) + (", …" if len(keys) > 2 else "")  # noqa: E731
        parts = [f"{len(missing)} of its {len(own)} tensors missing ({names(missing)})"] if missing else []
        parts += [f"{len(unexpected)} it does not have ({names(unexpected)})"] if unexpected else []
        raise ConfigError(f"{what} does not fit {type(module).__name__}: {'; '.join(parts)}")
    shapes = [f"{k} is {tuple(v.shape)}, not {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        plural = "s" if len(shapes) > 1 else ""
        raise ConfigError(
            f"{what} does not fit {type(module).__name__}: {len(shapes)} tensor{plural} of other shapes ({'; '.join(shapes[:2])})"
        )
    if load:
        module.load_state_dict(state, strict=False)
    return state


NUMPY_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)  # a truncated .npz is a BadZipFile


def numpy_error(path: str | Path, err: Exception) -> ConfigError:
    """numpy's error on reading ``path`` as one line. Its own words are wrong advice for a user's file: any file without
    the .npy magic is "pickled data", to be loaded "unsafely"; an object array says "cannot be loaded when
    allow_pickle=False"."""
    text = " ".join(str(err).split())
    if "pickle" in text or "Object arrays" in text:
        return ConfigError(
            f"{path} holds Python objects (an object array or pickled data), not numeric arrays; save numbers with np.save / np.savez"
        )
    short = text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " …"  # whole words
    return ConfigError(f"{path} is not a readable NumPy file, truncated or damaged ({type(err).__name__}: {short})")


def load_numpy(path: str | Path, archive: bool | None = None, what: str = "data") -> Any:
    """``np.load`` of a .npy array or a .npz archive, never unpickling: a file with neither format's signature (the .npy
    magic, a zip header) is refused by name before numpy calls it pickled data. ``archive`` True / False: the file must
    be an np.savez archive / one np.save array of ``what`` (np.load reads either whatever the name; the wrong one fails
    later, unnamed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror})") from None
    if head != b"\x93NUMPY" and head[:4] != b"PK\x03\x04":
        raise ConfigError(f"{path} is not a NumPy file (a .npy array starts with \\x93NUMPY, a .npz archive is a zip)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except NUMPY_READ_ERRORS as err:
        raise numpy_error(path, err) from None
    if archive is not None and isinstance(loaded, np.lib.npyio.NpzFile) != archive:
        if not archive:
            loaded.close()
        kind = "an array (np.save's .npy format)" if archive else "an archive (np.savez's .npz format)"
        raise ConfigError(f"{path} holds {kind}; expected {'an np.savez archive' if archive else 'one np.save array'} of {what}")
    return loaded


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


# -- CIFAR's python batches and ImageFolder trees (read by more than one pipeline; pipelines never import each other) --
CIFAR_BATCHES = {  # kind → (folder, train batches, test batches, label key, meta file, class-names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "batches.meta",
        b"label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names", 100),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # what PIL decodes


def _batch_folder(root: Path, kind: str) -> Path:
    return root / CIFAR_BATCHES[kind][0] if (root / CIFAR_BATCHES[kind][0]).is_dir() else root


def cifar_batch_files(root: Path, kind: str) -> list[Path] | None:
    """``kind``'s python batches under ``root`` (or its canonical subfolder), train then test, and the meta file when
    there is one (the class names come from it: part of a cache's key); None when there are no batches."""
    folder, (train, test), meta = _batch_folder(root, kind), CIFAR_BATCHES[kind][1:3], CIFAR_BATCHES[kind][4]
    if not (folder / train[0]).is_file():
        return None
    return [folder / f for f in [*train, *test]] + ([folder / meta] if (folder / meta).is_file() else [])


def check_image_source(root: str | Path, layout: str, cifar: str | None = None) -> list[Path] | None:
    """By names only, before a run opens (once per grid child: no listing of the images): ``cifar``'s python batches in
    ``root``, or else an ImageFolder tree or its zip per split; returns the batches, or None."""
    root = require_folder(root, layout)
    batches = cifar_batch_files(root, cifar) if cifar else None
    if not batches:
        require_image_tree(root, layout)
    return batches


def image_sources(root: str | Path, layout: str, cifar: str | None = None) -> tuple[Path, list[Path] | None, list[Path]]:
    """The folder, ``cifar``'s python batches in it (None without) and the files its data is read from (the batches, or
    an ImageFolder tree or its zips: a decoded cache's key); one line when it holds neither."""
    root = require_folder(root, layout)
    batches = cifar_batch_files(root, cifar) if cifar else None
    sources = batches or image_tree_files(root)
    if not sources:
        raise ConfigError(f"dataset folder {root} holds no {f'{cifar} batches or ' if cifar else ''}images; expected layout: {layout}")
    return root, batches, sources


def _read_batch(path: Path, layout: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = load_pickle(f)
    except Exception as err:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"  # e.g. which pickled class was refused
        raise ConfigError(f"{path} is not a readable CIFAR python batch ({reason}); expected layout: {layout}") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"{path} is not a CIFAR python batch (a pickled {type(batch).__name__}, not a dict); expected layout: {layout}")
    return batch


def read_cifar_batches(root: Path, kind: str, layout: str):
    """{split: (uint8 images N×32×32×3, labels)} and the class names (from the meta file when present) of ``kind``'s
    python batches under ``root``; every batch's labels checked against its images (a short list would shift the rest)."""
    import numpy as np

    _, train, test, label_key, meta_file, names_key, classes = CIFAR_BATCHES[kind]
    folder = require_files(_batch_folder(root, kind), train + test, layout)
    out = {}
    for split, files in (("train", train), ("test", test)):
        xs, ys = [], []
        for name in files:
            batch = _read_batch(folder / name, layout)
            if b"data" not in batch or label_key not in batch:
                raise ConfigError(f"{folder / name} lacks 'data' or '{label_key.decode()}'; expected layout: {layout}")
            try:
                x = np.asarray(batch[b"data"], dtype=np.uint8)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{folder / name}: 'data' is not an array of bytes ({err})") from None
            if x.ndim != 2 or x.shape[1] != 3072:
                raise ConfigError(f"{folder / name} must hold rows of 3072 bytes (3×32×32), got shape {x.shape}")
            check_labels(folder / name, batch[label_key], len(x), classes)
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[label_key]))
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    names = [str(i) for i in range(classes)]
    if (folder / meta_file).is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_batch(folder / meta_file, layout).get(names_key, names)]
        if len(names) != classes:
            raise ConfigError(f"{folder / meta_file}: {len(names)} class names, {kind} has {classes}")
    return out, names


def image_tree_files(root: Path) -> list[Path]:
    """The files an ImageFolder tree or its zips under ``root`` consist of (the key of its decoded cache); [] if none."""
    zips = [root / f"{s}.zip" for s in ("train", "test") if (root / f"{s}.zip").is_file() and not (root / s).is_dir()]
    return zips + sorted(p for s in ("train", "test") if (root / s).is_dir() for p in (root / s).glob("*/*") if p.is_file())


def eight_bit(image, where: str):
    """An 8-bit PIL image: Pillow's convert clips 16-bit grayscale ('I;16') at 255, so it is scaled (÷ 257) first (an
    'I' image by its values: 0..255 as is, up to 65535 scaled, beyond refused), and a palette image is expanded to
    RGB(A), or to L(A) where every palette entry is gray; float images are refused (their range is unknown)."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I"):  # I;16 (16-bit PNG), I (a 16-bit PGM, 32-bit TIFF): by the values' range
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ConfigError(f"{where} holds integer pixels in {low}..{high}, beyond 16 bits; convert it to 8 bits per channel")
        return Image.fromarray((values if high <= 255 and not image.mode.startswith("I;16") else values // 257).astype(np.uint8), "L")
    if image.mode == "F":
        raise ConfigError(f"{where} is a floating-point image; convert it to 8 bits per channel")
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        gray = all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))  # a gray GIF
        alpha = image.mode == "PA" or "transparency" in image.info
        return image.convert(("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB"))
    return image


def decode_image(read, where: str, size: int | None = None):
    """``read()``'s bytes as an RGB uint8 array H×W×3 (resized to size × size if given); any failure one line naming
    ``where``."""
    import io

    import numpy as np
    from PIL import Image

    try:  # reading too: a folder or an unreadable file named like an image is the same one line
        with Image.open(io.BytesIO(read())) as image:
            image = eight_bit(image, where).convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            return np.asarray(image)
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(f"{where} is not a readable image") from None


def read_image_tree(root: Path, layout: str, size: int | None = None):
    """An ImageFolder ``<root>/{train,test}/<class>/*`` or the zips ``<root>/{train,test}.zip`` holding one:
    {split: (uint8 images N×H×W×3, labels)} and the class names, one class index (sorted folder names) for both splits;
    images resized to size × size when ``size`` is given, else all of one size."""
    import contextlib

    import numpy as np

    root = require_image_tree(root, layout)
    out = {}
    for split in ("train", "test"):
        archive = None
        if (root / split).is_dir():
            files, where = {p.relative_to(root).as_posix(): p.read_bytes for p in (root / split).glob("*/*")}, str(root)
            loose = [p.name for p in (root / split).iterdir() if p.is_file()]
            if loose:  # outside any class folder: no label to give them
                notice(f"{root / split}: skipped {len(loose)} files outside a class folder (e.g. {loose[0]})")
        else:  # its zip (require_image_tree)
            where = str(root / f"{split}.zip")
            archive = _open_zip(where, layout)
            files = {key: (lambda n=n, a=archive: a.read(n)) for key, n in _zip_members(archive, split).items()}
            loose = _loose(archive.namelist(), split)
            if loose:
                notice(f"{where}: skipped {len(loose)} files outside a class folder (e.g. {loose[0]})")
        with archive or contextlib.nullcontext():
            placed = [p for p in files if p.count("/") == 2 and p.startswith(f"{split}/")]
            entries = sorted(p for p in placed if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if len(entries) < len(placed):  # said, not silently dropped
                other = sorted(set(placed) - set(entries))
                notice(f"{where}/{split}: skipped {len(other)} files that are not {'/'.join(sorted(IMAGE_SUFFIXES))} (e.g. {other[0]})")
            names = sorted({p.split("/")[1] for p in entries})  # the same in both splits, two or more (require_image_tree)
            images = [decode_image(files[p], f"{where}/{p}", size) for p in entries]
        shapes = sorted({image.shape[:2] for image in images})
        if len(shapes) > 1:
            raise ConfigError(
                f"{where}/{split}: images of {len(shapes)} sizes (e.g. {shapes[0]} and {shapes[-1]}); resize them to one size"
            )
        out[split] = (np.stack(images), np.array([names.index(p.split("/")[1]) for p in entries]))
    return out, names


def channels_first(arrays: dict) -> dict:
    """{split: (N×H×W×3, labels)} → {split: (N×3×H×W, labels)}, C-contiguous: a first (decoding) run and a later
    (cached) one must hand the model the same memory layout, or convolutions round differently."""
    import numpy as np

    return {split: (np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y) for split, (x, y) in arrays.items()}


def cached_arrays(cache: Path, read):
    """``read()``'s ({split: (images, labels)}, class names), kept in the .npz ``cache`` (keyed by its caller: the source
    files' digest and the settings), written whole or not at all."""
    import uuid

    import numpy as np

    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}, [str(n) for n in z["names"]]
    arrays, names = read()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{uuid.uuid4().hex}.npz")  # not np.random: the global RNG stays untouched
    np.savez(tmp, names=np.array(names), **{f"{s}_{k}": v for s, (x, y) in arrays.items() for k, v in (("x", x), ("y", y))})
    tmp.replace(cache)
    return arrays, names
