"""The images InputIBA explains, with their ground-truth evidence where it is known.

* ``generated`` (default): the label is the shape of one small object (plus, ring, X, disc) at a random place on a
  random textured background (two coloured gratings + pixel noise); the object's pixels are the evidence mask.
* ``cifar10``: CIFAR-10 as an ImageFolder ``<root>/{train,test}/<class>/*.jpg`` or its zips ``<root>/{train,test}.zip``
  (``../shared/data/cifar10_jpg``); no evidence masks (insertion, deletion, sensitivity-N only).
* ``imagenet_voc``: the reference's layout, ``<root>/images/{estimation,attribution}/<wnid>/*.JPEG``,
  ``<root>/annotations/attribution/[<wnid>/]<stem>.xml`` (Pascal-VOC boxes), ``<root>/imagenet_class_index.json``;
  the evidence of an attribution image is the union of its boxes (EHR, pointing, IoU).

Every loader returns a :class:`Task` of uint8 tensors at ``data.image_size``; decoded real images are cached under
``paths.cache_dir`` (the data folder stays read-only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

import numpy as np
import torch
from omegaconf import DictConfig

from common.config import ConfigError
from common.data import (
    cached_arrays,
    channels_first,
    check_root_is_read,
    decode_image,
    files_digest,
    image_counts,
    image_tree_files,
    read_image_tree,
    read_text,
    require_files,
    require_folder,
)

SHAPES = ("plus", "ring", "x", "disc")
CIFAR_LAYOUT = "<root>/{train,test}/<class>/*.jpg (ImageFolder) or <root>/{train,test}.zip holding that tree"
VOC_LAYOUT = (
    "<root>/images/{estimation,attribution}/<wnid>/*.JPEG, <root>/annotations/attribution/[<wnid>/]<stem>.xml (Pascal VOC), "
    "<root>/imagenet_class_index.json"
)


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    evidence: torch.Tensor | None = None  # (N, S, S) bool: object pixels / union of boxes

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> "Split":
        return Split(self.images[index], self.labels[index], None if self.evidence is None else self.evidence[index])


@dataclass
class Task:
    name: str
    classes: list[str]
    train: Split  # the classifier's training images
    test: Split  # its accuracy
    estimation: Split  # μ_R, σ_R
    attribution: Split  # the images explained
    identity: dict = field(default_factory=dict)  # what the classifier cache key hashes


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float, (x/255 − mean)/std."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


# -- generated -------------------------------------------------------------------------------------------------------
def shape_mask(kind: int, k: int) -> torch.Tensor:
    """(k, k) bool stencil of SHAPES[kind]."""
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    c = (k - 1) / 2
    half = max(1, k // 6)
    if SHAPES[kind] == "plus":
        return ((i - c).abs() <= half) | ((j - c).abs() <= half)
    if SHAPES[kind] == "ring":
        return (i < 2) | (j < 2) | (i >= k - 2) | (j >= k - 2)
    if SHAPES[kind] == "x":
        return ((i - j).abs() <= half) | ((i + j - (k - 1)).abs() <= half)
    return (i - c) ** 2 + (j - c) ** 2 <= (k / 2) ** 2


def generate(n: int, size: int, object_size: int, seed: int) -> Split:
    """``n`` images: textured background, one object whose shape is the label, evidence = the object's pixels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPES), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = torch.zeros(n, 3, size, size)
    for _ in range(2):  # two gratings, random orientation / frequency / phase / colour each
        theta = torch.rand(n, 1, 1, generator=g) * math.pi
        freq = 0.25 + 0.9 * torch.rand(n, 1, 1, generator=g)
        phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
        wave = 0.5 + 0.5 * torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
        colour = torch.rand(n, 3, 1, 1, generator=g)
        images = images + 0.5 * wave[:, None] * colour
    images = (images + 0.12 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    evidence = torch.zeros(n, size, size, dtype=torch.bool)
    stencils = [shape_mask(k, object_size) for k in range(len(SHAPES))]
    corners = torch.randint(0, size - object_size + 1, (n, 2), generator=g)
    colours = 0.2 + 0.8 * torch.rand(n, 3, generator=g)
    for i in range(n):
        top, left = corners[i].tolist()
        stencil = stencils[int(labels[i])]
        evidence[i, top : top + object_size, left : left + object_size] = stencil
    images = torch.where(evidence[:, None], colours[:, :, None, None], images)
    return Split((images * 255).round().to(torch.uint8), labels, evidence)


def generated_task(d: DictConfig) -> Task:
    size, k = int(d.image_size), int(d.object_size)
    if k > size:
        raise ConfigError(f"data.object_size={k} does not fit in data.image_size={size}")
    sizes = {"train": d.train_size or 4000, "test": d.test_size or 500, "estimation": d.estimation_size, "attribution": d.test_size or 500}
    splits = {name: generate(sizes[name], size, k, int(d.seed) * 10 + i) for i, name in enumerate(("train", "test", "estimation"))}
    return Task(
        "generated",
        list(SHAPES),
        splits["train"],
        splits["test"],
        splits["estimation"],
        splits["test"],
        {"name": "generated", "size": size, "object": k, "seed": int(d.seed), "train": sizes["train"]},
    )


# -- CIFAR-10 --------------------------------------------------------------------------------------------------------
def load_cifar10(root: str | Path, size: int, cache_dir: str | Path) -> tuple[dict[str, Split], list[str], str]:
    """Both splits (N×3×S×S uint8) decoded once into ``<cache>/input_iba/cifar10-<digest>-<size>.npz`` (the digest over
    the files)."""
    root = require_folder(root, CIFAR_LAYOUT)
    digest = files_digest(image_tree_files(root), root) + f"-{size}"

    def read() -> tuple[dict, list[str]]:
        arrays, names = read_image_tree(root, CIFAR_LAYOUT, size)
        return channels_first(arrays), names

    arrays, names = cached_arrays(Path(cache_dir) / "input_iba" / f"cifar10-{digest}.npz", read)
    return {s: Split(torch.from_numpy(x), torch.from_numpy(y).long()) for s, (x, y) in arrays.items()}, names, digest


def check_cifar_sizes(d: DictConfig, available: int) -> None:
    """The classifier's training images and IBA's estimation images are disjoint draws from CIFAR's training split."""
    if d.train_size and d.train_size + d.estimation_size > available:
        raise ConfigError(
            f"data.train_size + data.estimation_size = {d.train_size + d.estimation_size} > {available} CIFAR training images"
        )
    if not d.train_size and d.estimation_size >= available:  # train_size null: the rest of the split
        raise ConfigError(f"data.estimation_size={d.estimation_size} leaves none of the {available} CIFAR training images to train on")


def cifar_task(d: DictConfig, cache_dir: str) -> Task:
    splits, names, digest = load_cifar10(d.root, int(d.image_size), cache_dir)
    g = torch.Generator().manual_seed(int(d.seed))
    order = torch.randperm(len(splits["train"]), generator=g)
    check_cifar_sizes(d, len(order))
    n_train = d.train_size or len(order) - d.estimation_size
    test = splits["test"].take(slice(0, d.test_size or len(splits["test"])))
    return Task(
        "cifar10",
        names,
        splits["train"].take(order[:n_train]),
        test,
        splits["train"].take(order[n_train : n_train + d.estimation_size]),
        test,
        {"name": "cifar10", "digest": digest, "seed": int(d.seed), "train": int(n_train)},
    )


# -- ImageNet validation folder with VOC boxes (the reference's layout) -----------------------------------------------
def read_voc_boxes(path: Path) -> tuple[tuple[int, int], list[tuple[str, float, float, float, float]]]:
    """((width, height), [(name, xmin, ymin, xmax, ymax), ...]) from one Pascal-VOC XML file."""
    try:
        root = ElementTree.parse(path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        boxes = [
            (o.findtext("name"), *(float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))) for o in root.iter("object")
        ]
    except (ElementTree.ParseError, TypeError, ValueError):
        raise ConfigError(f"{path} is not a Pascal-VOC annotation (size/width, size/height, object/bndbox/xmin…ymax)") from None
    # a box outside the image or inverted gives an empty evidence mask, and EHR / pointing of 0 in a finished run
    if width <= 0 or height <= 0:
        raise ConfigError(f"{path}: size {width}×{height} must be positive")
    if not boxes:
        raise ConfigError(f"{path} holds no object box; every attributed image needs at least one")
    for name, x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ConfigError(
                f"{path}: box of {name!r} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must satisfy 0 ≤ min < max ≤ the size {width}×{height}"
            )
    return (width, height), boxes


def box_mask(boxes: list[tuple], width: int, height: int, size: int) -> torch.Tensor:
    """Union of the boxes on the image resized to size × size (pixel centres inside a box)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    centres = torch.arange(size).float() + 0.5
    for _, x0, y0, x1, y1 in boxes:
        cols = (centres >= x0 * size / width) & (centres <= x1 * size / width)
        rows = (centres >= y0 * size / height) & (centres <= y1 * size / height)
        mask |= rows[:, None] & cols[None, :]
    return mask


def _images(folder: Path, wnids: dict[str, int], size: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    paths = sorted(p for p in folder.glob("*/*") if p.is_file() and p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not paths:
        raise ConfigError(f"{folder} holds no <wnid>/<image>.JPEG files; expected layout: {VOC_LAYOUT}")
    unknown = sorted({p.parent.name for p in paths} - set(wnids))
    if unknown:
        raise ConfigError(f"{folder}: class folder {unknown[0]} is not in imagenet_class_index.json")
    images = np.stack([decode_image(p.read_bytes, str(p), size).transpose(2, 0, 1) for p in paths])
    return paths, images, np.array([wnids[p.parent.name] for p in paths])


VOC_FILES = ["images/estimation", "images/attribution", "annotations/attribution", "imagenet_class_index.json"]


def imagenet_voc_task(d: DictConfig, cache_dir: str) -> Task:
    root = require_files(d.root, VOC_FILES, VOC_LAYOUT)
    try:
        index = json.loads(read_text(root / "imagenet_class_index.json", "class index"))
        wnids = {v[0]: int(k) for k, v in index.items()}
        names = [index[str(i)][1] for i in range(len(index))]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f'{root}/imagenet_class_index.json is not {{"0": ["n01440764", "tench"], ...}}') from None
    size = int(d.image_size)
    _, est_x, est_y = _images(root / "images" / "estimation", wnids, size)
    paths, att_x, att_y = _images(root / "images" / "attribution", wnids, size)
    masks = []
    for p in paths:
        candidates = [
            root / "annotations" / "attribution" / p.parent.name / f"{p.stem}.xml",
            root / "annotations" / "attribution" / f"{p.stem}.xml",
        ]
        xml = next((c for c in candidates if c.is_file()), None)
        if xml is None:
            raise ConfigError(f"no box annotation for {p}: expected {candidates[0]} or {candidates[1]}")
        (w, h), boxes = read_voc_boxes(xml)
        from PIL import Image

        with Image.open(p) as image:  # header only: the boxes are in the annotation's pixel grid
            if image.size != (w, h):
                raise ConfigError(f"{xml}: size {w}×{h} differs from its image {p.name} ({image.size[0]}×{image.size[1]})")
        masks.append(box_mask(boxes, w, h, size))
    estimation = Split(torch.from_numpy(est_x), torch.from_numpy(est_y).long())
    attribution = Split(torch.from_numpy(att_x), torch.from_numpy(att_y).long(), torch.stack(masks))
    digest = files_digest([p for p in (root / "images").rglob("*") if p.is_file()], root)
    return Task("imagenet_voc", names, estimation, attribution, estimation, attribution, {"name": "imagenet_voc", "digest": digest})


DATASETS: dict[str, Callable[[DictConfig, str], Task]] = {
    "generated": lambda d, cache: generated_task(d),
    "cifar10": cifar_task,
    "imagenet_voc": imagenet_voc_task,
}


def check_data(d: DictConfig) -> None:
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name != "generated" and not d.root:
        raise ConfigError(
            f"data.name={d.name} needs data.root=<folder>; expected layout: {CIFAR_LAYOUT if d.name == 'cifar10' else VOC_LAYOUT}"
        )
    check_root_is_read(d, "generated", DATASETS)
    if d.name == "cifar10":  # the layout and the training images' count before a run opens (decoded in setup)
        check_cifar_sizes(d, image_counts(d.root, CIFAR_LAYOUT)["train"])
    elif d.name == "imagenet_voc":
        require_files(d.root, VOC_FILES, VOC_LAYOUT)
    if d.name == "generated" and d.object_size > d.image_size:
        raise ConfigError(f"data.object_size={d.object_size} does not fit in data.image_size={d.image_size}")


def load_task(cfg: DictConfig) -> Task:
    check_data(cfg.data)
    return DATASETS[cfg.data.name](cfg.data, cfg.paths.cache_dir)
