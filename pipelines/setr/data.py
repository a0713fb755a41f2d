"""Data for semantic segmentation: samples are (image ``[3, H, W]`` float in [0, 1], label ``[H, W]`` long, 255 = ignore).

Embedded default (no files): generated street-like scenes. A sky and a ground region split by a random horizon
(background classes that only context tells apart from objects of the same texture), then objects of four classes
that differ in shape, texture and scale — small plain discs, large striped boxes, thin checkered poles and
mid-sized blobby triangles — in random colours, drawn in random order so they occlude each other, with exact masks;
a noise patch labelled 255 (ignore), like CamVid's void.

Real data, read from their on-disk layouts: CamVid (SegNet's 11-class version), ADE20K (ADEChallengeData2016,
zero label reduced), Cityscapes (leftImg8bit / gtFine; labelIds mapped to the 19 trainIds) and Pascal Context
(VOC2010 + SegmentationClassContext; 60 classes as the official configs, or 59 with the zero label reduced).
Training samples go through the mmseg pipeline of the paper: random resize (ratio 0.5–2.0), random crop with
cat_max_ratio 0.75, horizontal flip, photometric distortion, padding to the crop (label 255).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from torch.utils.data import Dataset

from common.cache import MISSING, cache_file, read_cached, save_atomic
from common.config import ConfigError
from common.data import (
    check_full_batch,
    check_images,
    check_root_is_read,
    eval_loader,
    item_seed,
    load_image,
    read_text,
    require_files,
    training_loader,
)

IGNORE = 255
SCENE_CLASSES = ("sky", "ground", "disc", "box", "pole", "triangle")
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist")
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# cityscapesScripts labels.py: labelId → trainId (every other id, and trainId 255/-1, is ignored)
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


# -- generated scenes ------------------------------------------------------------------------------
def _texture(kind: str, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Grey-level texture [h, w] in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    if kind == "plain":
        return torch.full((h, w), 0.5)
    if kind == "stripes":
        theta = float(torch.rand((), generator=g)) * math.pi
        period = 3 + 2 * float(torch.rand((), generator=g))
        return 0.5 + 0.5 * torch.sin(2 * math.pi * (xs * math.cos(theta) + ys * math.sin(theta)) / period)
    if kind == "checker":
        cell = 2 + int(torch.randint(0, 2, (), generator=g))
        return ((xs // cell + ys // cell) % 2).float()
    if kind == "blobs":
        coarse = torch.rand(1, 1, max(h // 6, 2), max(w // 6, 2), generator=g)
        return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1)
    if kind == "gradient":
        return (ys / max(h - 1, 1)).clamp(0, 1)
    raise ValueError(kind)


def _paint(texture: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return texture[None] * a[:, None, None] + (1 - texture[None]) * b[:, None, None]


# object class → (texture, radius range as a fraction of the image height, hue of its first colour); the second colour
# and the first's exact shade are random, so colour alone does not give the class away (texture and shape do)
SCENE_OBJECTS = {
    2: ("plain", (0.07, 0.12), (0.9, 0.25, 0.2)),
    3: ("stripes", (0.16, 0.26), (0.5, 0.5, 0.5)),
    4: ("checker", (0.25, 0.4), (0.9, 0.8, 0.2)),
    5: ("blobs", (0.12, 0.2), (0.6, 0.3, 0.8)),
}


def _object_mask(cls: int, h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dy, dx = (ys - cy) / r, (xs - cx) / r
    if cls == 2:  # disc
        return dx**2 + dy**2 < 1
    if cls == 3:  # box, wider than tall
        return (dx.abs() < 1.0) & (dy.abs() < 0.6)
    if cls == 4:  # pole: thin and tall
        return (dx.abs() < 0.16) & (dy.abs() < 1.0)
    return (dy > -0.9) & (dy < 0.8) & (dx.abs() < (dy + 0.9) * 0.6)  # triangle


def generate_scene(
    height: int, width: int, g: torch.Generator, objects: tuple[int, int] = (4, 7), ignore_prob: float = 0.5, noise: float = 0.04
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: (image [3, H, W] in [0, 1], label [H, W]); classes as :data:`SCENE_CLASSES`, 255 on the void patch."""
    rand = lambda *shape: torch.rand(*shape, generator=g)
    horizon = int(height * (0.3 + 0.3 * float(rand(()))))
    label = torch.ones(height, width, dtype=torch.long)  # ground
    label[:horizon] = 0  # sky
    sky = _paint(
        _texture("gradient", height, width, g),
        torch.tensor([0.55, 0.7, 0.95]) + 0.1 * rand(3),
        torch.tensor([0.25, 0.4, 0.8]) + 0.1 * rand(3),
    )
    ground = _paint(
        _texture("blobs", height, width, g),
        torch.tensor([0.35, 0.3, 0.2]) + 0.15 * rand(3),
        torch.tensor([0.25, 0.45, 0.2]) + 0.15 * rand(3),
    )
    image = torch.where(label[None] == 0, sky, ground)
    n = int(torch.randint(objects[0], objects[1] + 1, (), generator=g))
    for _ in range(n):  # later objects occlude earlier ones; the mask is exactly what is painted
        cls = int(torch.randint(2, 6, (), generator=g))
        texture, (lo, hi), hue = SCENE_OBJECTS[cls]
        r = height * (lo + (hi - lo) * float(rand(())))
        cy = horizon + (height - horizon) * float(rand(())) if cls != 2 else height * float(rand(()))  # discs also fly
        cx = width * float(rand(()))
        mask = _object_mask(cls, height, width, cy, cx, r)
        fill = _paint(_texture(texture, height, width, g), (torch.tensor(hue) + 0.3 * (rand(3) - 0.5)).clamp(0, 1), rand(3))
        image = torch.where(mask[None], fill, image)
        label[mask] = cls
    if float(rand(())) < ignore_prob:  # a void patch: noise, labelled ignore
        ph, pw = max(2, height // 6), max(2, width // 6)
        y, x = int(torch.randint(0, height - ph + 1, (), generator=g)), int(torch.randint(0, width - pw + 1, (), generator=g))
        image[:, y : y + ph, x : x + pw] = rand(3, ph, pw)
        label[y : y + ph, x : x + pw] = IGNORE
    image = (image + noise * torch.randn(image.shape, generator=g)).clamp(0, 1)
    return image, label


def generate_scenes(n: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pairs = [generate_scene(height, width, g) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# -- augmentation (mmseg's training pipeline) ----------------------------------------------------------
def photometric_distortion(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on [0, 1] images: each with probability 1/2, brightness ±32/255, contrast ×[0.5, 1.5],
    saturation ×[0.5, 1.5], hue ±18°; torchvision's functional ops do the colour-space work."""
    from torchvision.transforms import functional as TF

    coin = lambda: bool(torch.rand((), generator=g) < 0.5)
    uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))
    if coin():
        image = (image + uniform(-32, 32) / 255).clamp(0, 1)
    if coin():
        image = TF.adjust_contrast(image, uniform(0.5, 1.5))
    if coin():
        image = TF.adjust_saturation(image, uniform(0.5, 1.5))
    if coin():
        image = TF.adjust_hue(image, uniform(-18, 18) / 360)
    return image


def random_crop_box(
    label: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float, g: torch.Generator, tries: int = 10
) -> tuple[int, int]:
    """mmseg RandomCrop: up to 10 draws until no single class covers more than ``cat_max_ratio`` of the labelled
    pixels of the crop (and at least two classes are present)."""
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    y = x = 0
    for _ in range(tries):
        y = int(torch.randint(0, h - ch + 1, (), generator=g))
        x = int(torch.randint(0, w - cw + 1, (), generator=g))
        if cat_max_ratio >= 1:
            break
        patch = label[y : y + ch, x : x + cw]
        counts = torch.bincount(patch[patch != IGNORE].flatten(), minlength=1)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return y, x


def train_transform(
    image: torch.Tensor,
    label: torch.Tensor,
    crop: tuple[int, int],
    scale: tuple[int, int] | None,
    ratio_range: tuple[float, float],
    cat_max_ratio: float,
    g: torch.Generator,
    photometric: bool = True,
):
    """Random resize (keep ratio; ``scale`` = mmseg img_scale (long, short) × a ratio in ``ratio_range``, None = the
    image's own size), random crop, flip, photometric distortion, pad to the crop (image 0, label 255)."""
    h, w = label.shape
    ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * float(torch.rand((), generator=g))
    long_side, short_side = scale if scale else (max(h, w), min(h, w))
    factor = min(long_side * ratio / max(h, w), short_side * ratio / min(h, w))
    size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))
    if size != (h, w):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    y, x = random_crop_box(label, crop, cat_max_ratio, g)
    image, label = image[:, y : y + crop[0], x : x + crop[1]], label[y : y + crop[0], x : x + crop[1]]
    if bool(torch.rand((), generator=g) < 0.5):
        image, label = image.flip(-1), label.flip(-1)
    if photometric:
        image = photometric_distortion(image, g)
    ph, pw = crop[0] - label.shape[0], crop[1] - label.shape[1]
    if ph > 0 or pw > 0:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    return image.contiguous(), label.contiguous()


class SegmentationSet(Dataset):
    """Pairs from ``load(i)`` → (image, label); training sets apply ``transform(image, label, generator)``.
    The augmentation generator is seeded per (seed, epoch, index); training keys are (epoch, index) from the loader's
    sampler, so loader workers and a run resumed mid-epoch draw the same crops."""

    def __init__(
        self,
        size: int,
        load: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        transform=None,
        seed: int = 0,
        classes: tuple[str, ...] = (),
    ):
        self.size, self.load, self.transform, self.seed, self.classes = size, load, transform, seed, classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        epoch, index = key if self.transform is not None else (0, key)
        image, label = self.load(index)
        if self.transform is not None:
            g = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
            image, label = self.transform(image, label, g)
        return image, label


# -- real datasets ---------------------------------------------------------------------------------
def read_image(path: Path) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(load_image(path).convert("RGB")).float() / 255


def read_label(path: Path) -> torch.Tensor:
    import numpy as np

    im = load_image(path)
    if im.mode not in ("L", "P", "I", "I;16"):
        raise ConfigError(f"label file {path} is {im.mode}, expected a single-channel PNG of class indices")
    return torch.from_numpy(np.array(im, dtype=np.int64))


def checked_label(label: torch.Tensor, classes: int, path: Path, allowed_ignore: tuple[int, ...] = (IGNORE,)) -> torch.Tensor:
    """Refuse a label file with values outside 0..classes-1 and the ignore value: a wrong dataset or conversion
    would otherwise train on garbage classes (or crash inside the loss)."""
    bad = (label >= classes) & ~torch.isin(label, torch.tensor(allowed_ignore))
    bad |= label < 0
    if bool(bad.any()):
        value = int(label[bad][0])
        raise ConfigError(
            f"label file {path} has value {value} outside the class range 0..{classes - 1} (ignore: {IGNORE}); "
            "is it the right dataset / conversion?"
        )
    return label


class FilePairs:
    """Lazily read (image path, label path) pairs; ``map_label`` turns raw label values into train ids (255 = ignore)."""

    def __init__(self, pairs: list[tuple[Path, Path]], map_label: Callable[[torch.Tensor, Path], torch.Tensor]):
        check_images(path for pair in pairs for path in pair)
        self.pairs, self.map_label = pairs, map_label

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), self.map_label(read_label(label_path), label_path)
        if image.shape[1:] != label.shape:
            raise ConfigError(f"image {image_path} is {tuple(image.shape[1:])} but its label {label_path} is {tuple(label.shape)}")
        return image, label


CAMVID_LAYOUT = "<root>/{train,val,test}.txt ('train/x.png trainannot/x.png' per line) with the listed PNGs (labels 0-10, 11 = void)"


def camvid_label(label: torch.Tensor, path: Path) -> torch.Tensor:
    """SegNet CamVid: 0–10 are the classes, 11 (Unlabelled) is ignored."""
    checked_label(label, 12, path)
    return torch.where(label == 11, torch.full_like(label, IGNORE), label)


def load_camvid(root: str | Path) -> dict[str, FilePairs]:
    root = require_files(root, ["train.txt", "val.txt", "test.txt"], CAMVID_LAYOUT)
    out = {}
    for split in ("train", "val", "test"):
        pairs = []
        for number, line in enumerate(read_text(root / f"{split}.txt", "split list").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"{root / f'{split}.txt'}:{number}: expected 'image annotation', got {line!r}; layout: {CAMVID_LAYOUT}")
            # SegNet's lists hold absolute paths of the authors' machine: keep the last two parts (folder/file)
            pairs.append(tuple(root / Path(*Path(p).parts[-2:]) for p in parts))
        if not pairs:
            raise ConfigError(f"{root / f'{split}.txt'} lists no images; layout: {CAMVID_LAYOUT}")
        missing = [p for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise ConfigError(f"{missing[0]} listed in {split}.txt is missing; layout: {CAMVID_LAYOUT}")
        out[split] = FilePairs(pairs, camvid_label)
    return out


ADE_LAYOUT = "<root>/ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png} (or <root> itself)"


def ade_label(label: torch.Tensor, path: Path) -> torch.Tensor:
    """reduce_zero_label: 0 (other) → 255, 1..150 → 0..149."""
    checked_label(label, 151, path, allowed_ignore=())
    return torch.where(label == 0, torch.full_like(label, IGNORE), label - 1)


def load_ade20k(root: str | Path) -> dict[str, FilePairs]:
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    require_files(root, ["images/training", "images/validation", "annotations/training", "annotations/validation"], ADE_LAYOUT)
    out = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        images = sorted((root / "images" / folder).glob("*.jpg"))
        if not images:
            raise ConfigError(f"no .jpg images under {root / 'images' / folder}; layout: {ADE_LAYOUT}")
        pairs = [(p, root / "annotations" / folder / f"{p.stem}.png") for p in images]
        missing = [lab for _, lab in pairs if not lab.is_file()]
        if missing:
            raise ConfigError(f"annotation {missing[0]} is missing; layout: {ADE_LAYOUT}")
        out[split] = FilePairs(pairs, ade_label)
    out["test"] = out["val"]
    return out


CITYSCAPES_LAYOUT = (
    "<root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
    "<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)"
)


def cityscapes_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Cityscapes labelId → trainId (19 classes); every other id → 255."""
    table = torch.full((256,), IGNORE, dtype=torch.long)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        table[label_id] = train_id
    return table[label_ids.clamp(0, 255)]


def _cityscapes_label(label: torch.Tensor, path: Path) -> torch.Tensor:
    if path.name.endswith("_labelTrainIds.png"):
        return checked_label(label, 19, path)
    if bool((label > 33).any()):  # gtFine labelIds run 0..33
        raise ConfigError(
            f"label file {path} has labelId {int(label[label > 33][0])} outside Cityscapes' 0..33; is it a gtFine *_labelIds.png?"
        )
    return cityscapes_train_ids(label)


def load_cityscapes(root: str | Path) -> dict[str, FilePairs]:
    root = require_files(root, ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"], CITYSCAPES_LAYOUT)
    out = {}
    for split in ("train", "val"):
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if not images:
            raise ConfigError(f"no *_leftImg8bit.png under {root / 'leftImg8bit' / split}/<city>/; layout: {CITYSCAPES_LAYOUT}")
        pairs = []
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            folder = root / "gtFine" / split / image.parent.name
            label = folder / f"{stem}_gtFine_labelIds.png"
            label = label if label.is_file() else folder / f"{stem}_gtFine_labelTrainIds.png"
            if not label.is_file():
                raise ConfigError(f"no gtFine label for {image} (looked for {stem}_gtFine_labelIds.png); layout: {CITYSCAPES_LAYOUT}")
            pairs.append((image, label))
        out[split] = FilePairs(pairs, _cityscapes_label)
    out["test"] = out["val"]
    return out


CONTEXT_LAYOUT = (
    "<root>/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, ImageSets/SegmentationContext/{train,val}.txt} "
    "(or <root>/VOCdevkit/VOC2010/...)"
)


def load_pascal_context(root: str | Path, classes: int = 60) -> dict[str, FilePairs]:
    """60 classes with background 0 (official SETR configs, no reduction) or 59 (background → 255, mmseg's PascalContextDataset59)."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root):
        if (candidate / "SegmentationClassContext").is_dir():
            root = candidate
            break
    require_files(
        root,
        ["JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt", "ImageSets/SegmentationContext/val.txt"],
        CONTEXT_LAYOUT,
    )

    def mapped(label: torch.Tensor, path: Path) -> torch.Tensor:
        if classes == 60:
            return checked_label(label, 60, path)
        checked_label(label, 60, path)
        return torch.where(label == 0, torch.full_like(label, IGNORE), torch.where(label == IGNORE, label, label - 1))

    out = {}
    for split in ("train", "val"):
        names = [
            n.strip() for n in read_text(root / "ImageSets/SegmentationContext" / f"{split}.txt", "split list").splitlines() if n.strip()
        ]
        pairs = [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClassContext" / f"{n}.png") for n in names]
        missing = [p for pair in pairs for p in pair if not p.is_file()]
        if not pairs or missing:
            raise ConfigError(f"{missing[0] if missing else split + '.txt lists nothing'}: missing; layout: {CONTEXT_LAYOUT}")
        out[split] = FilePairs(pairs, mapped)
    out["test"] = out["val"]
    return out


# name → (loader(root) → {'train', 'val', 'test'}, class names or their count)
REAL: dict[str, tuple[Callable[[str], dict[str, FilePairs]], tuple[str, ...] | int]] = {
    "camvid": (load_camvid, CAMVID_CLASSES),
    "ade20k": (load_ade20k, 150),
    "cityscapes": (load_cityscapes, CITYSCAPES_CLASSES),
    "pascal_context": (lambda root: load_pascal_context(root, 60), 60),
    "pascal_context_59": (lambda root: load_pascal_context(root, 59), 59),
}
DATASETS = ("scenes", *REAL)


def class_names(name: str) -> tuple[str, ...]:
    if name == "scenes":
        return SCENE_CLASSES
    names = REAL[name][1]
    return names if isinstance(names, tuple) else tuple(f"class_{i}" for i in range(names))


GENERATED_MAX_GIB = 8


def check_data(d: DictConfig) -> None:
    """The dataset's name, root and (generated scenes) memory; a real dataset's files: :func:`check_labels`."""
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name != "scenes" and not d.root:
        raise ConfigError(f"data.name={d.name} needs data.root=<folder>")
    check_root_is_read(d, "scenes", DATASETS)
    if d.name == "scenes":  # held in memory: float32 RGB + int64 labels, 20 bytes a pixel
        gib = (d.n_train + d.n_val + d.n_test) * d.image_size[0] * d.image_size[1] * 20 / 2**30
        if gib > GENERATED_MAX_GIB:
            raise ConfigError(
                f"the generated scenes (data.n_train + n_val + n_test images of data.image_size={list(d.image_size)}) would take "
                f"{gib:.1f} GiB of memory (at most {GENERATED_MAX_GIB}); lower them"
            )


def check_labels(cfg: DictConfig) -> None:
    """Every label file of a real dataset decoded and checked (values in the class range, size equal to its image's)
    before a run opens: otherwise a bad file stops the run mid-epoch, or only at the test split after training. The
    scan is remembered under a hash of the file list (images' and labels' paths, sizes, modification times), so a
    changed file is read again and an unchanged set only once (CamVid-half: 701 labels). Whole-image evaluation
    batches need one image size per split: mixed sizes with data.eval_batch_size > 1 are refused here too."""
    from PIL import Image
    from tqdm import tqdm

    d = cfg.data
    if d.name == "scenes":
        return
    files = REAL[d.name][0](d.root)
    pairs = [(split, image, label) for split, f in files.items() for image, label in f.pairs]
    stats = [(str(path), s.st_size, s.st_mtime_ns) for _, image, label in pairs for path in (image, label) for s in [path.stat()]]
    marker = cache_file(cfg, "setr", "labels-checked", {"data": d.name, "files": stats})
    eval_sizes = lambda found: {str(k): [(int(h), int(w)) for h, w in v] for k, v in found["eval_sizes"].items()}  # noqa: E731
    checked = read_cached(marker, "label check", eval_sizes)
    if checked is not MISSING:
        sizes = eval_sizes(checked)
    else:
        seen: dict[str, set] = {}
        bar = tqdm(pairs, desc=f"checking {d.name}'s label files (once)", unit="file", disable=not cfg.trainer.enable_progress_bar)
        for split, image_path, label_path in bar:
            label = files[split].map_label(read_label(label_path), label_path)
            with Image.open(image_path) as image:
                if (image.height, image.width) != tuple(label.shape):
                    raise ConfigError(
                        f"image {image_path} is {(image.height, image.width)} but its label {label_path} is {tuple(label.shape)}"
                    )
            if split != "train":
                seen.setdefault(split, set()).add(tuple(label.shape))
        sizes = {split: sorted(shapes) for split, shapes in seen.items()}
        save_atomic({"files": len(pairs), "eval_sizes": sizes}, marker)
    for split, shapes in sizes.items():
        if d.eval_batch_size > 1 and len(shapes) > 1:
            shown = ", ".join(f"{h}×{w}" for h, w in shapes[:3]) + (", …" if len(shapes) > 3 else "")
            raise ConfigError(
                f"{d.name}'s {split} images differ in size ({shown}): whole images are evaluated in batches of one size; "
                f"set data.eval_batch_size=1 (got {d.eval_batch_size})"
            )


class SegDataModule(pl.LightningDataModule):
    """Training crops with the mmseg augmentation; validation and test on whole images (sliding window in the module)."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.splits: dict[str, SegmentationSet] | None = None
        self.classes: tuple[str, ...] = class_names(cfg.data.name)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        d = self.cfg.data
        check_data(d)  # (the files are listed just below)
        seed = self.cfg.seed if d.seed is None else d.seed
        crop = tuple(d.crop)
        scale = tuple(d.train_scale) if d.train_scale else None
        transform = lambda image, label, g: train_transform(
            image, label, crop, scale, tuple(d.ratio_range), d.cat_max_ratio, g, d.photometric
        )
        if d.name == "scenes":
            h, w = d.image_size
            sets = {
                "train": generate_scenes(d.n_train, h, w, seed),
                "val": generate_scenes(d.n_val, h, w, seed + 1),
                "test": generate_scenes(d.n_test, h, w, seed + 2),
            }
            loaders = {k: (len(v[0]), lambda i, v=v: (v[0][i], v[1][i])) for k, v in sets.items()}
        else:
            files = REAL[d.name][0](d.root)
            loaders = {k: (len(v), v) for k, v in files.items()}
        limits = {"train": d.limit_train, "val": d.limit_eval, "test": d.limit_eval}
        self.splits = {
            k: SegmentationSet(min(n, limits[k]) if limits[k] else n, load, transform if k == "train" else None, seed, self.classes)
            for k, (n, load) in loaders.items()
        }
        check_full_batch(d.batch_size, len(self.splits["train"]), "training images")

    def train_dataloader(self):
        return training_loader(self, self.splits["train"], item_epochs=True, drop_last=True)

    def val_dataloader(self):
        return eval_loader(self, self.splits["val"])

    def test_dataloader(self):
        return eval_loader(self, self.splits["test"])
