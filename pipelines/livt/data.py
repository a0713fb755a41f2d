"""Long-tailed image data for LiVT: the embedded generated default and the paper's datasets from their on-disk formats.

Embedded default (``data.name=generated``): 32×32 images whose class is a (shape, texture) pair, drawn with random
colours, positions, sizes and cluttered backgrounds; the training set follows the exponential long-tailed profile
n_c = ⌊n_max·ρ^(−c/(C−1))⌋ and the test set is balanced. The pairs are chosen so that every rare class shares its
shape with one frequent class and its texture with another: features learnt by MGP on the whole (head-dominated)
training set describe the rare classes too.

Real data: CIFAR-10/100-LT by the standard protocol (per class, a fixed-seed shuffle, then the first n_c images) from
the canonical python batches, an ImageFolder tree or its zips (``../shared/data/cifar10_jpg``); ImageNet-LT, Places-LT
and iNaturalist 2018 from their split lists (``relative/path label`` per line) over an image root.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from common.config import ConfigError
from common.data import (
    CIFAR_BATCHES,
    cached_arrays,
    check_root_is_read,
    check_image_source,
    check_images,
    files_digest,
    image_sources,
    load_image,
    read_cifar_batches,
    read_image_tree,
    read_text,
    require_files,
    SeededItems,
    eval_loader,
    training_loader,
)

# -- the long-tailed protocol ---------------------------------------------------------------------------


def lt_counts(n_max: int, classes: int, rho: float) -> list[int]:
    """Per-class training counts of the exponential profile, n_c = ⌊n_max · ρ^(−c/(C−1))⌋ (c = 0 the most frequent)."""
    if rho < 1:
        raise ConfigError(f"data.rho (imbalance ratio n_max/n_min) must be >= 1, got {rho}")
    if classes < 2:
        raise ConfigError(f"a long-tailed set needs at least 2 classes, got {classes}")
    return [int(n_max * rho ** (-c / (classes - 1))) for c in range(classes)]


def long_tail_indices(labels: np.ndarray, classes: int, rho: float, seed: int, n_max: int | None = None) -> np.ndarray:
    """Indices of the LT subset of a balanced set (LDAM's IMBALANCECIFAR protocol): for c = 0, 1, …, shuffle the indices
    of class c with one fixed-seed generator and keep the first n_c; n_max defaults to the smallest class's size."""
    labels = np.asarray(labels)
    available = np.bincount(labels, minlength=classes)
    n_max = int(available.min()) if n_max is None else n_max
    if n_max > available.min():
        raise ConfigError(f"data.n_max={n_max} exceeds the images of the smallest class ({available.min()})")
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(lt_counts(n_max, classes, rho)):
        idx = np.nonzero(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


# -- drawing the embedded default -----------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hbar")
TEXTURES = ("stripes", "checker", "dots", "solid")
GENERATED_N_MAX = 500  # data.n_max's default for the generated set
MAX_GENERATED_CLASSES = len(SHAPES) * len(TEXTURES)  # class c = (shape c mod 7, texture c mod 4): 28 distinct pairs


def class_pair(c: int) -> tuple[int, int]:
    """(shape, texture) of generated class c; 7 and 4 are coprime, so c ↦ (c mod 7, c mod 4) is one-to-one below 28
    and neighbouring (similarly frequent) classes never share a shape or a texture."""
    return c % len(SHAPES), c % len(TEXTURES)


def _shape_masks(kind: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = len(kind)
    coords = torch.arange(size, dtype=torch.float32)
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.3
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.3
    r = size * (0.26 + 0.1 * torch.rand(n, generator=g))
    dx = (coords[None, None, :] - cx[:, None, None]) / r[:, None, None]
    dy = (coords[None, :, None] - cy[:, None, None]) / r[:, None, None]
    d = (dx**2 + dy**2).sqrt()
    shapes = torch.stack(
        [
            d < 1,
            (dx.abs() < 0.85) & (dy.abs() < 0.85),
            (dy > -0.9) & (dy < 0.8) & (dx.abs() < (dy + 0.9) * 0.55),
            ((dx.abs() < 0.32) & (dy.abs() < 1)) | ((dy.abs() < 0.32) & (dx.abs() < 1)),
            (d < 1) & (d > 0.55),
            dx.abs() + dy.abs() < 1.1,
            (dy.abs() < 0.4) & (dx.abs() < 1),
        ],
        1,
    )
    return shapes[torch.arange(n), kind]


def _textures(kind: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Fill patterns in {0, 1} [n, size, size]: stripes (random angle), checker, dots, solid."""
    n = len(kind)
    coords = torch.arange(size, dtype=torch.float32)
    theta = torch.rand(n, generator=g) * math.pi
    proj = coords[None, None, :] * theta.cos()[:, None, None] + coords[None, :, None] * theta.sin()[:, None, None]
    stripes = (torch.sin(1.6 * proj + 6 * torch.rand(n, 1, 1, generator=g)) > 0).float()
    cell = 3 + torch.randint(0, 2, (n, 1, 1), generator=g)
    checker = (((coords[None, None, :] // cell) + (coords[None, :, None] // cell)) % 2).float()
    ox, oy = torch.rand(n, 1, 1, generator=g) * 5, torch.rand(n, 1, 1, generator=g) * 5
    dots = ((((coords[None, None, :] + ox) % 5) - 2) ** 2 + (((coords[None, :, None] + oy) % 5) - 2) ** 2 < 2.5).float()
    solid = torch.ones(n, size, size)
    return torch.stack([stripes, checker, dots, solid], 1)[torch.arange(n), kind]


def draw_images(labels: torch.Tensor, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """uint8 images [n, size, size, 3] of the generated classes ``labels`` on smooth random backgrounds."""
    n = len(labels)
    pairs = torch.tensor([class_pair(int(c)) for c in range(int(labels.max()) + 1)]) if n else torch.zeros(0, 2, dtype=torch.long)
    shape, texture = pairs[labels, 0], pairs[labels, 1]
    mask = _shape_masks(shape, size, g)[:, None].float()
    blobs = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    background = 0.25 + 0.5 * blobs.clamp(0, 1)
    fill = _textures(texture, size, g)[:, None]
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    b = torch.where((a - b).abs().sum(1, keepdim=True) < 0.6, 1 - a, b)  # the two fill colours differ visibly
    foreground = fill * a + (1 - fill) * b
    image = mask * foreground + (1 - mask) * background + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def generated_lt(classes: int, n_max: int, rho: float, n_test: int, seed: int, size: int = 32) -> tuple[dict, list[str]]:
    """{'train': (images uint8 [N, H, W, 3], labels), 'test': balanced} and the class names (``classes`` checked by
    check_data)."""
    g = torch.Generator().manual_seed(seed)
    counts = lt_counts(n_max, classes, rho)
    if min(counts) < 1:
        raise ConfigError(f"data.n_max={n_max} with rho={rho} leaves a class without images (counts {counts})")
    train_labels = torch.repeat_interleave(torch.arange(classes), torch.tensor(counts))
    test_labels = torch.arange(classes).repeat_interleave(n_test)
    names = [f"{SHAPES[s]}-{TEXTURES[t]}" for s, t in map(class_pair, range(classes))]
    return {
        "train": (draw_images(train_labels, g, size).numpy(), train_labels.numpy()),
        "test": (draw_images(test_labels, g, size).numpy(), test_labels.numpy()),
    }, names


# -- CIFAR from its canonical formats --------------------------------------------------------------------
CIFAR_LAYOUT = (
    "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or <root>/cifar-100-python/{train,test,meta} "
    "(the python pickles), or an ImageFolder <root>/{train,test}/<class>/*.{jpg,png}, or its zips <root>/{train,test}.zip"
)


def load_cifar(kind: str, root: str | Path, cache_dir: str | Path) -> tuple[dict, list[str]]:
    """Balanced CIFAR-10/100 train and test arrays from whichever canonical layout ``root`` holds; decoded images are cached
    under ``cache_dir`` by a hash of the source files (the data folder may be read-only)."""
    root, batches, sources = image_sources(root, CIFAR_LAYOUT, kind)

    def read() -> tuple[dict, list[str]]:
        arrays, names = read_cifar_batches(root, kind, CIFAR_LAYOUT) if batches else read_image_tree(root, CIFAR_LAYOUT)
        expected = CIFAR_BATCHES[kind][-1]
        if len(names) != expected:
            raise ConfigError(f"{root} holds {len(names)} classes, {kind} has {expected}; expected layout: {CIFAR_LAYOUT}")
        return arrays, names

    return cached_arrays(Path(cache_dir) / "livt" / f"{kind}-{files_digest(sources, root)}.npz", read)


# -- ImageNet-LT, Places-LT, iNaturalist 2018: split lists over an image root -------------------------------
SPLIT_LISTS = {  # name → (train list, val list or None, test list)
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    "inat18": ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt"),
}


def read_split_list(path: Path, image_root: Path) -> list[tuple[Path, int]]:
    """``relative/path label`` per line → [(image path, label)]; a malformed line or a missing image is one line."""
    records = []
    for number, line in enumerate(read_text(path, "split list").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(f"{path}:{number}: expected 'relative/path label', got {line.strip()!r}")
        records.append((image_root / parts[0], int(parts[1])))
    if not records:
        raise ConfigError(f"{path} lists no images; expected 'relative/path label' per line")
    missing = [(p, n) for n, (p, _) in enumerate(records, 1) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{path}:{missing[0][1]} names a missing image {missing[0][0]} ({len(missing)} of {len(records)} missing); "
            f"data.image_root must be the folder the listed paths start from"
        )
    return records


def load_split_lists(name: str, root: str | Path, image_root: str | Path | None) -> dict[str, list[tuple[Path, int]]]:
    train, val, test = SPLIT_LISTS[name]
    layout = f"<root>/{{{', '.join(f for f in (train, val, test) if f)}}} ('relative/path label' per line; the val list optional), images under data.image_root (default <root>)"
    root = require_files(root, [train, test], layout)
    images = Path(image_root) if image_root else root
    out = {"train": read_split_list(root / train, images), "test": read_split_list(root / test, images)}
    out["val"] = read_split_list(root / val, images) if val and (root / val).is_file() else out["test"]
    classes = max(label for _, label in out["train"]) + 1
    if classes < 2:
        raise ConfigError(f"{root / train} gives one class (label 0); a classifier needs at least 2")
    missing = sorted(set(range(classes)) - {label for _, label in out["train"]})
    if missing:  # (found before a run opens: these lists are read by check_data)
        raise ConfigError(f"{root / train}: labels {missing[:5]} have no training image (labels are 0..{classes - 1})")
    bad = next(((s, lab) for s, recs in out.items() for _, lab in recs if lab >= classes), None)
    if bad:
        raise ConfigError(f"{name} {bad[0]} list has label {bad[1]}, but the train list's labels end at {classes - 1}")
    return out


# -- datasets ----------------------------------------------------------------------------------------------
class ImageSet(Dataset):
    """(image, label) from in-memory uint8 arrays [N, H, W, 3] or from image files, through a PIL transform."""

    def __init__(self, labels: np.ndarray, transform: Callable, images: np.ndarray | None = None, paths: list[Path] | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images, self.paths, self.transform = images, paths, transform

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int):
        from PIL import Image

        if self.images is not None:
            return Image.fromarray(self.images[index])
        return load_image(self.paths[index]).convert("RGB")

    def __getitem__(self, index: int):
        return self.transform(self.pil(index)), int(self.labels[index])


@dataclass
class Source:
    """One split before its transform: arrays or file paths, and labels."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None

    def dataset(self, transform: Callable) -> ImageSet:
        return ImageSet(self.labels, transform, self.images, self.paths)


def _generated(d: DictConfig, cache_dir: str) -> tuple[dict[str, Source], list[str]]:
    arrays, names = generated_lt(d.classes, d.n_max or GENERATED_N_MAX, d.rho, d.n_test, d.seed, d.image_size)
    return {s: Source(y, images=x) for s, (x, y) in arrays.items()}, names


def _cifar(kind: str) -> Callable:
    def build(d: DictConfig, cache_dir: str) -> tuple[dict[str, Source], list[str]]:
        arrays, names = load_cifar(kind, d.root, cache_dir)
        (x, y), (tx, ty) = arrays["train"], arrays["test"]
        keep = long_tail_indices(y, len(names), d.rho, d.seed, d.n_max)
        return {"train": Source(y[keep], images=x[keep]), "test": Source(ty, images=tx)}, names

    return build


def _lists(name: str) -> Callable:
    def build(d: DictConfig, cache_dir: str) -> tuple[dict[str, Source], list[str]]:
        splits = load_split_lists(name, d.root, d.image_root)
        check_images(path for recs in splits.values() for path, _ in recs)
        classes = max(label for _, label in splits["train"]) + 1
        return (
            {s: Source(np.array([lab for _, lab in recs]), paths=[p for p, _ in recs]) for s, recs in splits.items()},
            [str(c) for c in range(classes)],
        )

    return build


# name → builder(data config, cache dir) → ({'train', 'test'[, 'val']}: Source, class names)
DATASETS: dict[str, Callable[[DictConfig, str], tuple[dict[str, Source], list[str]]]] = {
    "generated": _generated,
    "cifar10_lt": _cifar("cifar10"),
    "cifar100_lt": _cifar("cifar100"),
    "imagenet_lt": _lists("imagenet_lt"),
    "places_lt": _lists("places_lt"),
    "inat18": _lists("inat18"),
}


def check_data(d: DictConfig) -> None:
    """The dataset name and its folder, before anything runs."""
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name != "generated" and not d.root:
        raise ConfigError(f"data.name={d.name} needs data.root=<folder>")
    check_root_is_read(d, "generated", DATASETS)
    # classes and n_max's default (the class size) of the sets the exponential profile is drawn from
    classes, n_max = {"generated": (d.classes, GENERATED_N_MAX), "cifar10_lt": (10, 5000), "cifar100_lt": (100, 500)}.get(d.name, (0, 0))
    n_max = d.n_max or n_max
    if classes and min(lt_counts(int(n_max), int(classes), float(d.rho))) < 1:
        raise ConfigError(  # (was "classes [...] have no training image" once the run had opened)
            f"data.n_max={n_max} with data.rho={d.rho} leaves the rarest of {classes} classes no image "
            f"(n_min = ⌊n_max / rho⌋); raise data.n_max to at least {math.ceil(d.rho)} or lower data.rho"
        )
    if d.image_root and d.name not in SPLIT_LISTS:  # (ignored without a word)
        raise ConfigError(f"data.image_root applies to the split-list sets ({', '.join(SPLIT_LISTS)}), not data.name={d.name}")
    if d.name == "generated" and d.classes > MAX_GENERATED_CLASSES:
        raise ConfigError(f"data.classes={d.classes} is more than the generated set has ({MAX_GENERATED_CLASSES} shape × texture pairs)")
    if d.name in SPLIT_LISTS:  # the lists' files, paths and labels before a run opens (images are checked at setup)
        load_split_lists(d.name, d.root, d.image_root)
    elif d.name != "generated":
        check_image_source(d.root, CIFAR_LAYOUT, d.name.removesuffix("_lt"))  # the layout (images are decoded in setup)


# -- transforms ----------------------------------------------------------------------------------------------
def train_transform(d: DictConfig, a: DictConfig) -> Callable:
    """Fine-tuning: RandomResizedCrop + flip + RandAugment + random erasing (DeiT / LiVT, through timm)."""
    from timm.data import create_transform

    return create_transform(
        input_size=d.image_size,
        is_training=True,
        scale=tuple(a.crop_scale),
        hflip=0.5,
        color_jitter=None,
        auto_augment=None if a.randaugment == "none" else a.randaugment,
        interpolation="bicubic",
        re_prob=a.reprob,
        re_mode="pixel",
        mean=tuple(d.mean),
        std=tuple(d.std),
    )


def mgp_transform(d: DictConfig, crop_scale) -> Callable:
    """MGP: RandomResizedCrop + horizontal flip only (MAE)."""
    from timm.data import create_transform

    return create_transform(
        input_size=d.image_size,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=0.5,
        color_jitter=None,
        interpolation="bicubic",
        mean=tuple(d.mean),
        std=tuple(d.std),
    )


def eval_transform(d: DictConfig) -> Callable:
    """Test: bicubic resize to size/crop_pct, centre crop (the notes' test transform)."""
    from timm.data import create_transform

    return create_transform(
        input_size=d.image_size, is_training=False, crop_pct=d.crop_pct, interpolation="bicubic", mean=tuple(d.mean), std=tuple(d.std)
    )


# -- datamodule ---------------------------------------------------------------------------------------------
class LTDataModule(pl.LightningDataModule):
    """Long-tailed training set, balanced evaluation. ``val`` (per epoch) is the dataset's val list where it has one,
    else the test set (the paper's reported numbers are on test); ``test`` runs once after fitting on the final weights."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.sources: dict[str, Source] | None = None
        self.class_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.sources is None:
            check_data(self.cfg.data)
            self.sources, self.class_names = DATASETS[self.cfg.data.name](self.cfg.data, self.cfg.paths.cache_dir)
            self.sources.setdefault("val", self.sources["test"])
            counts = self.class_counts
            if (counts == 0).any():
                raise ConfigError(
                    f"{self.cfg.data.name}: classes {torch.nonzero(counts == 0).flatten().tolist()[:5]} have no training image"
                )

    @property
    def class_counts(self) -> torch.Tensor:
        return torch.bincount(torch.as_tensor(self.sources["train"].labels), minlength=len(self.class_names))

    def identity(self) -> dict:
        """What the training set depends on (the MGP cache key): data settings, and the files behind a real set (an
        image rewritten in place gives a new key)."""
        d = self.cfg.data
        keys = (
            ("name", "classes", "n_max", "rho", "seed", "image_size", "mean", "std")
            if d.name == "generated"
            else ("name", "rho", "seed", "n_max", "image_size", "mean", "std")
        )
        train = self.sources["train"]
        digest = hashlib.sha1(np.ascontiguousarray(train.labels).tobytes())
        if train.images is not None:
            digest.update(np.ascontiguousarray(train.images).tobytes())
        else:  # each file's path, size and modification time (hashing ImageNet-LT's bytes would take minutes a run)
            digest.update("\n".join(f"{p}\0{s.st_size}\0{s.st_mtime_ns}" for p in train.paths for s in [Path(p).stat()]).encode())
        return {**{k: (list(d[k]) if k in ("mean", "std") else d[k]) for k in keys}, "train": digest.hexdigest()[:12]}

    def mgp_dataset(self) -> ImageSet:
        return self.sources["train"].dataset(mgp_transform(self.cfg.data, self.cfg.mgp.crop_scale))

    def train_dataloader(self):
        d = self.cfg.data
        # timm's augmentations draw from the global generators: seeded per (epoch, item) instead (exact resume, workers)
        data = SeededItems(self.sources["train"].dataset(train_transform(d, self.cfg.augment)), self.cfg.seed)
        # mixup/cutmix pair up a batch with its flip: an odd last batch is dropped
        return training_loader(self, data, item_epochs=True, drop_last=len(data) > d.batch_size)

    def val_dataloader(self):
        d = self.cfg.data
        return eval_loader(self, self.sources["val"].dataset(eval_transform(d)))

    def test_dataloader(self):
        d = self.cfg.data
        return eval_loader(self, self.sources["test"].dataset(eval_transform(d)))
