"""Data for fine-tuning under distribution shift.

Embedded default (no files): procedurally drawn 32×32 images of shapes on textured backgrounds.
- ``source``: stage-1 pretraining, 8 shape classes, every style and background, no correlations.
- ``waterbirds``: 2 shape classes ("bird types") on 2 backgrounds ("places"); in training the place
  agrees with the class in 95 % of images (group mix of Waterbirds: 3498/184/56/1057), at test all
  four groups are equally large. ID = test accuracy re-weighted to the training mix, OOD = worst group.
- ``domain_shift``: 4 shape classes; ID images are solid shapes on plain backgrounds, OOD images the
  same shapes with textured fill on textured backgrounds (a style the pretraining saw, fine-tuning not).

Real data: Waterbirds (WILDS layout), DomainNet (SENTRY split files), ImageFolder trees (Living-17-style
source/target class lists optional), FMoW / Camelyon17 through the ``wilds`` package, and CIFAR-10
(ImageFolder) with a colour cue that flips at test time.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset, TensorDataset

from common.config import ConfigError
from common.data import (
    cached_arrays,
    check_images,
    check_root_is_read,
    eval_loader,
    files_digest,
    image_sources,
    load_image,
    read_image_tree,
    read_text,
    require_files,
    require_image_tree,
    training_loader,
)
from common.tracking import notice

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "hbar", "vbar")
WATERBIRDS_TRAIN_MIX = (3498, 184, 56, 1057)  # groups (y, place): (0,0) (0,1) (1,0) (1,1)


# -- drawing ------------------------------------------------------------------------------------
def _shape_masks(kind: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Boolean masks [n, size, size] of the shapes ``kind`` with random centre and radius."""
    n = len(kind)
    coords = torch.arange(size, dtype=torch.float32)
    cx = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.25
    cy = size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.25
    r = size * (0.24 + 0.1 * torch.rand(n, generator=g))
    dx = (coords[None, None, :] - cx[:, None, None]) / r[:, None, None]
    dy = (coords[None, :, None] - cy[:, None, None]) / r[:, None, None]
    d = (dx**2 + dy**2).sqrt()
    shapes = torch.stack(
        [
            d < 1,  # circle
            (dx.abs() < 0.85) & (dy.abs() < 0.85),  # square
            (dy > -0.9) & (dy < 0.8) & (dx.abs() < (dy + 0.9) * 0.55),  # triangle
            (d < 1) & (d > 0.55),  # ring
            ((dx.abs() < 0.3) & (dy.abs() < 1)) | ((dy.abs() < 0.3) & (dx.abs() < 1)),  # cross
            dx.abs() + dy.abs() < 1.1,  # diamond
            (dy.abs() < 0.35) & (dx.abs() < 1),  # hbar
            (dx.abs() < 0.35) & (dy.abs() < 1),  # vbar
        ],
        1,
    )
    return shapes[torch.arange(n), kind]


def _texture(kind: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Grey-level textures in [0, 1], [n, size, size]: 0 plain, 1 stripes, 2 checker, 3 blobs."""
    n = len(kind)
    coords = torch.arange(size, dtype=torch.float32)
    theta = torch.rand(n, generator=g) * math.pi
    freq = 0.5 + 0.5 * torch.rand(n, generator=g)
    proj = coords[None, None, :] * theta.cos()[:, None, None] + coords[None, :, None] * theta.sin()[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj)
    cell = (4 + 4 * torch.rand(n, generator=g)).floor()
    checker = (((coords[None, None, :] // cell[:, None, None]) + (coords[None, :, None] // cell[:, None, None])) % 2).float()
    blobs = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)[
        :, 0
    ].clamp(0, 1)
    out = torch.stack([torch.full((n, size, size), 0.5), stripes, checker, blobs], 1)
    return out[torch.arange(n), kind]


def _colours(n: int, g: torch.Generator, palette: torch.Tensor | None = None) -> torch.Tensor:
    if palette is None:
        return torch.rand(n, 3, generator=g)
    return (palette[torch.randint(0, len(palette), (n,), generator=g)] + 0.15 * torch.randn(n, 3, generator=g)).clamp(0, 1)


def draw(
    shape: torch.Tensor,
    background: torch.Tensor,
    fill: torch.Tensor,
    g: torch.Generator,
    size: int = 32,
    bg_palette: torch.Tensor | None = None,
    noise: float = 0.08,
) -> torch.Tensor:
    """Images [n, 3, size, size] in [0, 1]: shape ``shape`` (index into SHAPES), background texture
    ``background`` and fill texture ``fill`` (0 = solid), random colours, pixel noise."""
    n = len(shape)
    mask = _shape_masks(shape, size, g)[:, None].float()
    bg_tex = _texture(background, size, g)[:, None]
    bg_a, bg_b = _colours(n, g, bg_palette), _colours(n, g, bg_palette)
    bg = bg_tex * bg_a[:, :, None, None] + (1 - bg_tex) * bg_b[:, :, None, None]
    fg_tex = _texture(fill, size, g)[:, None]
    fg_a, fg_b = _colours(n, g), _colours(n, g)
    fg = fg_tex * fg_a[:, :, None, None] + (1 - fg_tex) * fg_b[:, :, None, None]
    image = mask * fg + (1 - mask) * bg
    return (image + noise * torch.randn(image.shape, generator=g)).clamp(0, 1)


@dataclass
class Split:
    """Images, labels and group ids (group = label × spurious attribute, or -1 where there is none)."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels, self.groups)


def source_domain(n: int, seed: int, size: int = 32) -> Split:
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, len(SHAPES), (n,), generator=g)
    images = draw(shape, torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g), g, size)
    return Split(images, shape, torch.full((n,), -1))


# land: greens/browns, water: blues (the "places" of Waterbirds)
PLACES = (
    torch.tensor([[0.25, 0.5, 0.15], [0.45, 0.35, 0.2], [0.3, 0.6, 0.3]]),
    torch.tensor([[0.1, 0.3, 0.7], [0.2, 0.5, 0.8], [0.05, 0.2, 0.5]]),
)
WATERBIRD_SHAPES = (SHAPES.index("triangle"), SHAPES.index("diamond"))  # landbird, waterbird
SHIFT_SHAPES = tuple(SHAPES.index(s) for s in ("circle", "square", "triangle", "cross"))


def waterbirds_like(n: int, seed: int, balanced: bool, size: int = 32) -> Split:
    """Groups (label, place) in the training mix of Waterbirds, or balanced for the OOD test."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.ones(4) if balanced else torch.tensor(WATERBIRDS_TRAIN_MIX, dtype=torch.float)
    group = torch.multinomial(mix / mix.sum(), n, replacement=True, generator=g)
    label, place = group // 2, group % 2
    shape = torch.tensor(WATERBIRD_SHAPES)[label]
    images = torch.empty(n, 3, size, size)
    for p in (0, 1):  # land: blobs, water: stripes, each in its palette
        idx = torch.nonzero(place == p).flatten()
        texture = torch.full((len(idx),), 3 if p == 0 else 1)
        images[idx] = draw(shape[idx], texture, torch.randint(0, 4, (len(idx),), generator=g), g, size, bg_palette=PLACES[p])
    return Split(images, label, group)


def domain_shift(n: int, seed: int, ood: bool, size: int = 32) -> Split:
    """ID: solid shapes on plain backgrounds; OOD: textured shapes on textured backgrounds."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, len(SHIFT_SHAPES), (n,), generator=g)
    shape = torch.tensor(SHIFT_SHAPES)[label]
    if ood:
        background, fill = torch.randint(1, 4, (n,), generator=g), torch.randint(1, 4, (n,), generator=g)
    else:
        background, fill = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    return Split(draw(shape, background, fill, g, size), label, torch.full((n,), -1))


# -- real datasets ------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """(path, label, group) records read lazily with PIL, resized and scaled to [0, 1]."""

    def __init__(self, records: list[tuple[Path, int, int]], size: int):
        check_images(path for path, _, _ in records)
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from torchvision.transforms.functional import pil_to_tensor, resize

        path, label, group = self.records[index]
        x = pil_to_tensor(load_image(path).convert("RGB"))  # a truncated JPEG: one line naming it
        x = resize(x, [self.size, self.size], antialias=True).float() / 255
        return x, label, group


WATERBIRDS_LAYOUT = "<root>/metadata.csv (columns img_filename, y, split 0/1/2, place) and the image paths it lists"


def waterbirds_root(root: str | Path) -> Path:
    """The folder holding metadata.csv: ``root`` or WILDS' ``root/waterbirds_v1.0``."""
    root = Path(root)
    return root / "waterbirds_v1.0" if (root / "waterbirds_v1.0").is_dir() else root


def load_waterbirds(root: str | Path, size: int) -> dict[str, ImageFiles]:
    """WILDS' Waterbirds folder (waterbirds_v1.0): train / val / test with groups y×place."""
    root = require_files(waterbirds_root(root), ["metadata.csv"], WATERBIRDS_LAYOUT)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    with open(root / "metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"img_filename", "y", "split", "place"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{root / 'metadata.csv'} lacks columns {', '.join(sorted(missing))}; expected layout: {WATERBIRDS_LAYOUT}")
        for line, row in enumerate(reader, start=2):
            values = {key: row[key].strip() for key in ("split", "y", "place")}
            allowed = {"split": {"0", "1", "2"}, "y": {"0", "1"}, "place": {"0", "1"}}
            bad = next((key for key, value in values.items() if value not in allowed[key]), None)
            if bad:  # a split of -1 would silently index "test", a 3 crash, a 1.0 fail to parse
                raise ConfigError(
                    f"{root / 'metadata.csv'} line {line}: {bad} must be one of {', '.join(sorted(allowed[bad]))}, got {values[bad]!r}"
                )
            y, place = int(values["y"]), int(values["place"])
            splits[("train", "val", "test")[int(values["split"])]].append((root / row["img_filename"], y, 2 * y + place))
    absent = [p for s in splits.values() for p, _, _ in s[:1] if not p.exists()]
    if absent:
        raise ConfigError(f"image {absent[0]} listed in metadata.csv is missing; expected layout: {WATERBIRDS_LAYOUT}")
    return {k: ImageFiles(v, size) for k, v in splits.items()}


DOMAINNET_LAYOUT = (
    "<root>/SENTRY_splits/<domain>_{train,test}_mini.txt ('relative/path.jpg label' per line) and <root>/<domain>/<class>/*.jpg"
)


def domainnet_files(source: str, target: str) -> list[str]:
    return [f"SENTRY_splits/{source}_train_mini.txt", f"SENTRY_splits/{source}_test_mini.txt", f"SENTRY_splits/{target}_test_mini.txt"]


def load_domainnet(root: str | Path, source: str, target: str, size: int) -> dict[str, ImageFiles]:
    """DomainNet, SENTRY's 40-class split files: train and ID test on ``source``, OOD test on ``target``."""
    files = domainnet_files(source, target)
    root = require_files(root, files, DOMAINNET_LAYOUT)

    def read(name: str) -> list:
        records = []
        for number, line in enumerate(read_text(root / name, "split list").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():  # isdigit: a negative label is refused here too
                raise ConfigError(f"{root / name}:{number}: expected 'relative/path.jpg label' with a label ≥ 0, got {line!r}")
            records.append((root / parts[0], int(parts[1]), -1))
        return records

    train, id_test, ood_test = (read(f) for f in files)
    classes = max(label for _, label, _ in train) + 1 if train else 0
    for name, records in zip(files[1:], (id_test, ood_test)):
        # the head has one output per training label: a label past them is scored as always wrong
        bad = next((r for r in records if r[1] >= classes), None)
        if bad is not None:
            raise ConfigError(
                f"{root / name}: {bad[0].relative_to(root)} has label {bad[1]}, not among the training labels 0..{classes - 1}"
            )
    return {
        "train": ImageFiles(train, size),
        "val": ImageFiles(id_test, size),
        "test": ImageFiles(id_test, size),
        "ood_test": ImageFiles(ood_test, size),
    }


IMAGEFOLDER_LAYOUT = "<root>/{train,val}/<class>/*.{jpg,jpeg,png} (optional <root>/ood/<class>/…)"


def load_imagefolder(
    root: str | Path, size: int, classes: list[str] | None = None, ood_classes: list[str] | None = None
) -> dict[str, ImageFiles]:
    """ImageFolder splits train/ and val/ (and ood/ if present). Living-17-style: ``classes`` lists, per
    label, '+'-joined folder names for ID (source subclasses) and ``ood_classes`` those for OOD (target)."""
    root = Path(root)
    require_files(root, ["train", "val"], IMAGEFOLDER_LAYOUT)

    def folders(split: str) -> list[str]:
        return sorted(p.name for p in (root / split).iterdir() if p.is_dir())

    # one class index for every split, from train/: a split's own listing would shift every label when it lacks a class
    train_classes = folders("train")

    def read(split: str, groups: list[str] | None) -> list:
        folder = root / split
        if groups is None:
            extra = sorted(set(folders(split)) - set(train_classes))
            if extra:
                raise ConfigError(f"{folder} has class folders that train/ lacks ({', '.join(extra)}); every split uses train/'s classes")
            groups = train_classes
        records = []
        for label, group in enumerate(groups):
            for name in group.split("+"):
                if not (folder / name).is_dir():
                    if classes is None:
                        continue  # a class this split lacks (noticed below); labels stay train/'s
                    raise ConfigError(f"class folder {folder / name} is missing; expected layout: {IMAGEFOLDER_LAYOUT}")
                records += [(p, label, -1) for p in sorted((folder / name).iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
        if not records:
            raise ConfigError(f"no images under {folder}; expected layout: {IMAGEFOLDER_LAYOUT}")
        present = {label for _, label, _ in records}
        lacking = [group for label, group in enumerate(groups) if label not in present]  # no folder, or an empty one
        if lacking:
            notice(f"{folder} has no images of {len(lacking)} class(es) ({', '.join(lacking[:5])}); its accuracy covers the others")
        return records

    out = {"train": ImageFiles(read("train", classes), size), "val": ImageFiles(read("val", classes), size)}
    out["test"] = out["val"]
    if ood_classes:
        out["ood_test"] = ImageFiles(read("val", ood_classes), size)
    elif (root / "ood").is_dir():
        out["ood_test"] = ImageFiles(read("ood", classes), size)
    return out


class _Wilds(Dataset):
    def __init__(self, subset, size: int, group_fn=None):
        self.subset, self.size, self.group_fn = subset, size, group_fn

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, index):
        from torchvision.transforms.functional import pil_to_tensor, resize

        image, y, meta = self.subset[index]
        x = resize(pil_to_tensor(image.convert("RGB")), [self.size, self.size], antialias=True).float() / 255
        return x, int(y), int(self.group_fn(meta)) if self.group_fn else -1


WILDS_FOLDERS = {"fmow": "fmow_v1.1", "camelyon17": "camelyon17_v1.0"}
WILDS_LAYOUT = "<root>/{}/ as WILDS lays it out (metadata csv + images)"


def load_wilds(name: str, root: str | Path, size: int) -> dict[str, Dataset]:
    """FMoW (OOD: Africa region of the OOD test, as the reference code) or Camelyon17 via the wilds package."""
    try:
        import wilds
    except ImportError:
        raise ConfigError(f"data.name={name} needs the wilds package: pip install -e '.[datasets]'") from None
    folder = WILDS_FOLDERS[name]
    require_files(root, [folder], WILDS_LAYOUT.format(folder))
    dataset = wilds.get_dataset(dataset=name, root_dir=str(root), download=False)
    if name == "fmow":
        region = dataset.metadata_fields.index("region")
        test = dataset.get_subset("test")
        africa = (dataset.metadata_array[test.indices, region] == 2).nonzero().flatten().tolist()
        from torch.utils.data import Subset

        return {
            "train": _Wilds(dataset.get_subset("train"), size),
            "val": _Wilds(dataset.get_subset("id_val"), size),
            "test": _Wilds(dataset.get_subset("id_test"), size),
            "ood_test": _Wilds(Subset(test, africa), size),
        }
    return {
        "train": _Wilds(dataset.get_subset("train"), size),
        "val": _Wilds(dataset.get_subset("id_val"), size),
        "test": _Wilds(dataset.get_subset("id_val"), size),
        "ood_test": _Wilds(dataset.get_subset("test"), size),
    }


CIFAR_LAYOUT = "<root>/{train,test}/<class>/*.jpg, or their zips <root>/{train,test}.zip (CIFAR-10 as ImageFolder)"
VEHICLES = {"airplane", "automobile", "ship", "truck"}


def cifar_digest(root: str | Path) -> str:
    """The hash of the CIFAR-10 files under ``root`` (tree or zips): the key of everything built from them."""
    root, _, sources = image_sources(root, CIFAR_LAYOUT)
    return files_digest(sources, root)


def cifar_images(root: str | Path, cache_dir: str | Path) -> tuple[dict, list[str]]:
    """CIFAR-10 as ImageFolder, a tree or its zips: {split: (uint8 N×H×W×3, labels)} and the class names (one index
    for both splits), decoded once at their own size (32 px) and cached under ``cache_dir`` by the files' hash."""
    root = Path(root)
    cache = Path(cache_dir) / "sgd_freeze_embed" / f"cifar10-{cifar_digest(root)}.npz"
    return cached_arrays(cache, lambda: read_image_tree(root, CIFAR_LAYOUT))


def cifar_colour_cue(
    root: str | Path, n_train: int, n_test: int, seed: int, cache_dir: str | Path, size: int = 32, strength: float = 1.0
) -> dict[str, Split]:
    """Real images: CIFAR-10 (ImageFolder) animals vs vehicles with a colour tint that agrees with the
    label in 95 % of training images (Waterbirds' mix) and is balanced over the four groups at test.
    ``strength`` scales the tint (1: ±0.35 on the red/blue channels; the config default is 0.3)."""
    arrays, names = cifar_images(root, cache_dir)
    g = torch.Generator().manual_seed(seed)

    def load(split: str, n: int, balanced: bool) -> Split:
        images_all, classes = arrays[split]
        labels_all = torch.tensor([int(names[c] not in VEHICLES) for c in classes.tolist()])
        if labels_all.unique().numel() < 2:  # a task label without images to draw from
            raise ConfigError(
                f"{root}/{split} needs vehicle ({', '.join(sorted(VEHICLES))}) and animal class folders, got {', '.join(names)}"
            )
        mix = torch.ones(4) if balanced else torch.tensor(WATERBIRDS_TRAIN_MIX, dtype=torch.float)
        group = torch.multinomial(mix / mix.sum(), n, replacement=True, generator=g)
        images, labels = torch.empty(n, 3, size, size), group // 2
        for i, grp in enumerate(group.tolist()):
            pool = torch.nonzero(labels_all == grp // 2).flatten()
            x = torch.from_numpy(images_all[int(pool[torch.randint(0, len(pool), (1,), generator=g)])]).permute(2, 0, 1).float() / 255
            if x.shape[-2:] != (size, size):  # data.image_size: the drawn images only (the cache keeps them at 32 px)
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            tint = strength * (torch.tensor([0.35, 0.0, -0.2]) if grp % 2 == 0 else torch.tensor([-0.2, 0.0, 0.35]))
            images[i] = (x + tint[:, None, None]).clamp(0, 1)
        return Split(images, labels, group)

    return {
        "train": load("train", n_train, False),
        "val": load("train", n_test, False),
        "test": load("test", n_test, False),
        "ood_test": load("test", n_test, True),
    }


def check_stage1_size(n: int, available: int, root: str | Path) -> None:
    if n > available:
        raise ConfigError(f"pretrain.n_images={n} exceeds the {available} training images under {root}; lower it")


def cifar_source(root: str | Path, n: int, seed: int, cache_dir: str | Path) -> Split:
    """Clean CIFAR-10 training images, 10 classes (stage-1 pretraining for the colour-cue setting)."""
    arrays, _ = cifar_images(root, cache_dir)
    images_all, classes = arrays["train"]
    check_stage1_size(n, len(images_all), root)
    chosen = torch.randperm(len(images_all), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.from_numpy(images_all[chosen.numpy()]).permute(0, 3, 1, 2).float() / 255
    return Split(images, torch.from_numpy(classes[chosen.numpy()]).long(), torch.full((len(chosen),), -1))


# -- datamodule ---------------------------------------------------------------------------------
GENERATED = ("waterbirds", "domain_shift")
REAL = ("waterbirds_real", "domainnet", "imagefolder", "fmow", "camelyon17", "cifar10_cue")


REQUIRED = {  # a real set → a check of the files it is read from, by name, and its layout
    "waterbirds_real": lambda d: require_files(waterbirds_root(d.root), ["metadata.csv"], WATERBIRDS_LAYOUT),
    "domainnet": lambda d: require_files(d.root, domainnet_files(d.source_domain, d.target_domain), DOMAINNET_LAYOUT),
    "imagefolder": lambda d: require_files(d.root, ["train", "val"], IMAGEFOLDER_LAYOUT),
    "cifar10_cue": lambda d: require_image_tree(d.root, CIFAR_LAYOUT),
    **{
        name: lambda d: require_files(d.root, [WILDS_FOLDERS[d.name]], WILDS_LAYOUT.format(WILDS_FOLDERS[d.name])) for name in WILDS_FOLDERS
    },
}


def check_data(d: DictConfig) -> None:
    """The dataset name, and a folder for the real ones (before any run starts, and where the data is built)."""
    if d.name not in GENERATED + REAL:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(GENERATED + REAL)}")
    if d.name in REAL and not d.root:
        raise ConfigError(f"data.name={d.name} needs data.root=<folder>")
    check_root_is_read(d, GENERATED, GENERATED + REAL)
    if d.name in REQUIRED:  # the files it reads, by name, before a run opens (each grid point's run would fail in setup)
        REQUIRED[d.name](d)


def build_splits(cfg: DictConfig) -> dict[str, Dataset]:
    """{'train', 'val' (ID, model selection), 'test' (ID), 'ood_test'} datasets for ``data.name``."""
    d = cfg.data
    check_data(d)
    seed = cfg.seed if d.seed is None else d.seed
    if d.name == "waterbirds":
        return {
            "train": waterbirds_like(d.n_train, seed, False).dataset(),
            "val": waterbirds_like(d.n_val, seed + 1, False).dataset(),
            "test": waterbirds_like(d.n_test, seed + 2, False).dataset(),
            "ood_test": waterbirds_like(d.n_test, seed + 3, True).dataset(),
        }
    if d.name == "domain_shift":
        return {
            "train": domain_shift(d.n_train, seed, False).dataset(),
            "val": domain_shift(d.n_val, seed + 1, False).dataset(),
            "test": domain_shift(d.n_test, seed + 2, False).dataset(),
            "ood_test": domain_shift(d.n_test, seed + 3, True).dataset(),
        }
    if d.name == "waterbirds_real":
        splits = load_waterbirds(d.root, d.image_size)
        splits["ood_test"] = splits["test"]
        return splits
    if d.name == "domainnet":
        return load_domainnet(d.root, d.source_domain, d.target_domain, d.image_size)
    if d.name == "imagefolder":
        return load_imagefolder(d.root, d.image_size, list(d.classes_list) or None, list(d.ood_classes) or None)
    if d.name == "cifar10_cue":
        splits = cifar_colour_cue(d.root, d.n_train, d.n_test, seed, cfg.paths.cache_dir, d.image_size, d.cue_strength)
        return {k: v.dataset() for k, v in splits.items()}
    return load_wilds(d.name, d.root, d.image_size)


class ShiftDataModule(pl.LightningDataModule):
    """Fine-tuning data; validation runs ID val (model selection), ID test and OOD test every epoch."""

    EVAL = ("val", "test", "ood_test")

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.splits: dict[str, Dataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = build_splits(self.cfg)

    def train_dataloader(self):
        return training_loader(self, self.splits["train"])

    def val_dataloader(self):
        return [eval_loader(self, self.splits[k]) for k in self.EVAL if k in self.splits]
