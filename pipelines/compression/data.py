"""Image classification data for the compression pipeline, held in memory as uint8 tensors.

* ``generated`` (embedded default): 10 classes, each a (shape, fill) pair — five shapes, solid or striped — drawn at a
  random place, size and colour on a smooth random background with pixel noise. Small enough for a CPU, hard enough
  that a narrowed network loses accuracy (the compression effects show).
* ``cifar10``: CIFAR-10 as the python batches ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``, an ImageFolder
  ``<root>/{train,test}/<class>/*.jpg`` or its zips ``<root>/{train,test}.zip`` (``../shared/data/cifar10_jpg``).
* ``imagefolder``: any ImageFolder ``<root>/{train,test}/<class>/*`` (or the zips), resized to ``data.image_size``.

Decoded real images are cached under ``paths.cache_dir/compression`` by a hash of the source files (the data folder
stays read-only). ``data.train_size`` / ``data.test_size`` take a fixed-seed random subset of a real set (0: all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from common.config import ConfigError
from common.data import (
    cached_arrays,
    channels_first,
    check_image_source,
    check_root_is_read,
    files_digest,
    image_sources,
    read_cifar_batches,
    read_image_tree,
)

TREE_LAYOUT = "<root>/{train,test}/<class>/*.{jpg,png} (ImageFolder) or <root>/{train,test}.zip holding that tree"
CIFAR_LAYOUT = f"<root>/cifar-10-batches-py/{{data_batch_1..5,test_batch}} (python batches), or {TREE_LAYOUT}"
SHAPES = ("disc", "square", "triangle", "cross", "ring")
FILLS = ("solid", "stripes")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    name: str
    classes: list[str]
    train: Split
    test: Split
    identity: dict  # what the data depends on (cache keys)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float, (x/255 − mean)/std."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


# -- generated ------------------------------------------------------------------------------------------------------------------
def _masks(shape: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = len(shape)
    coords = torch.arange(size, dtype=torch.float32)
    cx, cy = (size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.25 for _ in range(2))
    r = size * (0.3 + 0.1 * torch.rand(n, generator=g))
    dx = (coords[None, None, :] - cx[:, None, None]) / r[:, None, None]
    dy = (coords[None, :, None] - cy[:, None, None]) / r[:, None, None]
    d = (dx**2 + dy**2).sqrt()
    all_shapes = torch.stack(
        [
            d < 1,
            (dx.abs() < 0.85) & (dy.abs() < 0.85),
            (dy > -0.9) & (dy < 0.8) & (dx.abs() < (dy + 0.9) * 0.55),
            ((dx.abs() < 0.3) & (dy.abs() < 1)) | ((dy.abs() < 0.3) & (dx.abs() < 1)),
            (d < 1) & (d > 0.55),
        ],
        1,
    )
    return all_shapes[torch.arange(n), shape]


def generated_split(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """uint8 images (N, 3, size, size) of the generated classes: label = shape · 2 + fill."""
    n = len(labels)
    mask = _masks(labels // len(FILLS), size, g)[:, None].float()
    coords = torch.arange(size, dtype=torch.float32)
    theta = torch.rand(n, 1, 1, generator=g) * math.pi
    stripes = (torch.sin(1.8 * (coords[None, None, :] * theta.cos() + coords[None, :, None] * theta.sin())) > 0).float()
    fill = torch.where((labels % len(FILLS) == 1).view(n, 1, 1), stripes, torch.ones_like(stripes))[:, None]
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    b = torch.where((a - b).abs().sum(1, keepdim=True) < 0.6, 1 - a, b)
    foreground = fill * a + (1 - fill) * b
    background = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    image = mask * foreground + (1 - mask) * (0.3 + 0.4 * background) + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def generated_task(d: DictConfig) -> Task:
    if d.train_size < 2 or d.test_size < 1:
        raise ConfigError(f"data.name=generated needs data.train_size >= 2 and data.test_size >= 1, got {d.train_size} and {d.test_size}")
    g = torch.Generator().manual_seed(int(d.seed))
    classes = len(SHAPES) * len(FILLS)
    train_labels = torch.arange(classes).repeat(math.ceil(d.train_size / classes))[: d.train_size]
    test_labels = torch.arange(classes).repeat(math.ceil(d.test_size / classes))[: d.test_size]
    train = Split(generated_split(train_labels, d.image_size, g), train_labels)
    test = Split(generated_split(test_labels, d.image_size, g), test_labels)
    identity = {k: d[k] for k in ("name", "seed", "train_size", "test_size", "image_size")}
    return Task("generated", [f"{s}-{f}" for s in SHAPES for f in FILLS], train, test, identity)


# -- real data ---------------------------------------------------------------------------------------------------------------------
def load_folder(name: str, root: str | Path, size: int, cache_dir: str | Path) -> tuple[dict, list[str], str]:
    """Train and test arrays (N×3×S×S uint8) of ``root`` in whichever layout it holds; returns (arrays, class names,
    content digest)."""
    layout = CIFAR_LAYOUT if name == "cifar10" else TREE_LAYOUT
    root, batches, sources = image_sources(root, layout, "cifar10" if name == "cifar10" else None)

    def read() -> tuple[dict, list[str]]:
        arrays, names = read_cifar_batches(root, "cifar10", layout) if batches else read_image_tree(root, layout, size)
        if name == "cifar10" and len(names) != 10:
            raise ConfigError(f"{root} holds {len(names)} classes, CIFAR-10 has 10; expected layout: {layout}")
        if arrays["train"][0].shape[1] != size:
            raise ConfigError(f"{root} holds {arrays['train'][0].shape[1]}-pixel images; set data.image_size={arrays['train'][0].shape[1]}")
        return channels_first(arrays), names

    digest = files_digest(sources, root)
    arrays, names = cached_arrays(Path(cache_dir) / "compression" / f"{name}-{size}-{digest}-v2.npz", read)  # v2: names from batches.meta
    return arrays, names, digest


def subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A fixed-seed shuffle of the indices, first ``size`` (all when 0 or larger)."""
    order = np.random.RandomState(seed).permutation(len(labels))
    return np.sort(order[:size]) if size and size < len(labels) else np.arange(len(labels))


def folder_task(d: DictConfig, cache_dir: str) -> Task:
    arrays, names, digest = load_folder(d.name, d.root, d.image_size, cache_dir)
    splits = {}
    for split, size in (("train", d.train_size), ("test", d.test_size)):
        x, y = arrays[split]
        if size > len(y):  # (it used them all without a word)
            raise ConfigError(f"data.{split}_size={size} is more than the {len(y)} {split} images in {d.root}; lower it (0: all)")
        keep = subset(y, size, int(d.seed))
        splits[split] = Split(torch.from_numpy(np.ascontiguousarray(x[keep])), torch.from_numpy(y[keep].astype(np.int64)))
    identity = {k: d[k] for k in ("name", "seed", "train_size", "test_size", "image_size")} | {"files": digest}
    return Task(d.name, names, splits["train"], splits["test"], identity)


DATASETS = {"generated": lambda d, cache: generated_task(d), "cifar10": folder_task, "imagefolder": folder_task}


def check_data(d: DictConfig) -> None:
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name != "generated" and not d.root:
        raise ConfigError(f"data.name={d.name} needs data.root=<folder> ({CIFAR_LAYOUT if d.name == 'cifar10' else TREE_LAYOUT})")
    check_root_is_read(d, "generated", DATASETS)
    if d.name == "generated":
        return
    layout, cifar = (CIFAR_LAYOUT, "cifar10") if d.name == "cifar10" else (TREE_LAYOUT, None)
    if check_image_source(d.root, layout, cifar) and int(d.image_size) != 32:  # the layout (images are decoded in setup)
        raise ConfigError(f"{d.root} holds CIFAR-10's python batches, 32-pixel images; set data.image_size=32")  # before a run opens


def load_task(cfg: DictConfig) -> Task:
    check_data(cfg.data)
    return DATASETS[cfg.data.name](cfg.data, cfg.paths.cache_dir)
