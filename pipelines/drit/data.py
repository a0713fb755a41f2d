"""Unpaired two-domain image data for DRIT: the embedded generated domains and the paper's folder layout.

Embedded default (``data.name=generated``): every image is a *layout* (1–3 circles, squares or triangles at random
positions and sizes) rendered in a domain *style*. Domain X: a dark navy background, shapes filled with one warm solid
colour. Domain Y: a light sand background, shapes filled with cool colours in stripes. The two domains are drawn from
independent layouts (unpaired); a correct translation keeps the layout (:func:`layout_mask` recovers it from either
style) and changes the style (:func:`style_domain` tells the styles apart in closed form).


Real data: ``data.name=folder`` reads ``<root>/{trainA,trainB,testA,testB}/*.{jpg,png,…}`` (cat2dog, yosemite,
portrait as distributed); ``data.name=cifar_cat_dog`` takes the cat and dog classes of CIFAR-10 from an ImageFolder tree
``<root>/{train,test}/{cat,dog}/`` or its zips ``<root>/{train,test}.zip`` (../shared/data/cifar10_jpg).
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from torch.utils.data import Dataset

from common.config import ConfigError
from common.data import IMAGE_SUFFIXES, check_root_is_read, eight_bit, eval_loader, require_folder, require_image_tree, training_loader

DATASETS = ("generated", "folder", "cifar_cat_dog")
FOLDER_LAYOUT = "<root>/trainA, <root>/trainB, <root>/testA, <root>/testB holding .jpg/.png images (A = domain X, B = domain Y)"
CIFAR_LAYOUT = "<root>/{train,test}/{cat,dog}/*.jpg (an ImageFolder tree) or its zips <root>/{train,test}.zip"

# -- the embedded domains -------------------------------------------------------------------------------------------
BACKGROUND = {"x": (0.10, 0.12, 0.25), "y": (0.92, 0.86, 0.70)}  # RGB in [0, 1]


def draw_layouts(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Binary masks [n, size, size] of 1–3 shapes (circle, square, triangle) at random positions and sizes."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    counts = torch.randint(1, 4, (n,), generator=g)
    for k in range(3):
        cx = torch.rand(n, generator=g) * size * 0.7 + size * 0.15
        cy = torch.rand(n, generator=g) * size * 0.7 + size * 0.15
        r = size * (0.12 + 0.1 * torch.rand(n, generator=g))
        kind = torch.randint(0, 3, (n,), generator=g)
        dx = (coords[None, None, :] - cx[:, None, None]) / r[:, None, None]
        dy = (coords[None, :, None] - cy[:, None, None]) / r[:, None, None]
        shapes = torch.stack(
            [dx**2 + dy**2 < 1, (dx.abs() < 0.85) & (dy.abs() < 0.85), (dy > -0.9) & (dy < 0.8) & (dx.abs() < (dy + 0.9) * 0.6)], 1
        )
        masks |= shapes[torch.arange(n), kind] & (k < counts)[:, None, None]
    return masks


def render(masks: torch.Tensor, domain: str, g: torch.Generator) -> torch.Tensor:
    """uint8 images [n, H, W, 3] of the layouts in a domain's style (palette + texture), with a little pixel noise."""
    n, size, _ = masks.shape
    coords = torch.arange(size, dtype=torch.float32)
    background = torch.tensor(BACKGROUND[domain]).view(1, 3, 1, 1).expand(n, 3, size, size)
    if domain == "x":  # one warm solid colour: hue in red–yellow, bright
        hue = torch.rand(n, generator=g) * 0.15
        fill = _hue_rgb(hue, 0.9, 0.95)[:, :, None, None].expand(n, 3, size, size)
    else:  # cool stripes: a blue–purple colour and its darker shade, at a random angle
        hue = 0.5 + torch.rand(n, generator=g) * 0.25
        a = _hue_rgb(hue, 0.8, 0.85)[:, :, None, None]
        theta = torch.rand(n, generator=g) * math.pi
        proj = coords[None, None, :] * theta.cos()[:, None, None] + coords[None, :, None] * theta.sin()[:, None, None]
        stripes = (torch.sin(proj * 2 * math.pi / max(size / 8, 3)) > 0).float()[:, None]
        fill = stripes * a + (1 - stripes) * a * 0.45
    mask = masks[:, None].float()
    image = mask * fill + (1 - mask) * background + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _hue_rgb(hue: torch.Tensor, saturation: float, value: float) -> torch.Tensor:
    """HSV → RGB for a batch of hues in [0, 1): [n, 3]."""
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + hue[:, None] * 6) % 6
    return value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def layout_mask(images: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """The layout of generated images [n, C, H, W] in [−1, 1], whatever their palette: pixels farther than ``threshold``
    (RGB distance in [0, 1]) from the image's median colour (the background covers most of every generated image)."""
    unit = (images + 1) / 2
    median = unit.flatten(2).median(2).values[:, :, None, None]
    return (unit - median).norm(dim=1) > threshold


def layout_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of two masks [n, H, W] (1 where both are empty)."""
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def style_domain(images: torch.Tensor) -> torch.Tensor:
    """Closed-form style check for the generated domains: 0 (X) when the median colour is nearer X's background, else 1."""
    median = ((images + 1) / 2).flatten(2).median(2).values
    dist = torch.stack([(median - torch.tensor(BACKGROUND[d], device=images.device)).norm(dim=1) for d in ("x", "y")], 1)
    return dist.argmin(1)


def generated_domains(n_train: int, n_test: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """{'trainA', 'trainB', 'testA', 'testB'}: uint8 [n, size, size, 3], every image from its own random layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for letter, domain in (("A", "x"), ("B", "y")):
            out[f"{split}{letter}"] = render(draw_layouts(n, size, g), domain, g).numpy()
    return out


# -- real data -----------------------------------------------------------------------------------------------------
def _decode(data: bytes, where: str, size: int) -> tuple[np.ndarray, int]:
    """(uint8 [size, size, C] resized with bicubic filtering, C); C from the file's own bands."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = eight_bit(image, where)
            bands = len(image.getbands())
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB" if bands >= 3 else "L")
                bands = len(image.getbands())
            image = image.resize((size, size), Image.BICUBIC) if image.size != (size, size) else image
            array = np.asarray(image)
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(f"{where} is not a readable image") from None
    return (array[:, :, None] if array.ndim == 2 else array), bands


def _decode_all(files: list[tuple[str, callable]], size: int, limit: int | None) -> tuple[np.ndarray, list[str], list[int]]:
    files = files[:limit] if limit else files
    arrays, channels = [], []
    for where, read in files:
        try:  # the read, not only the decode: a file can vanish or turn unreadable after the layout was checked
            data = read()
        except OSError as err:
            raise ConfigError(f"{where} cannot be read ({err.strerror or err}); remove or replace it") from None
        array, bands = _decode(data, where, size)
        arrays.append(array)
        channels.append(bands)
    return arrays, [w for w, _ in files], channels


def check_channels(named: dict[str, tuple[list[str], list[int]]]) -> int:
    """The one channel count of every image, or one line naming two images that differ."""
    seen: dict[int, str] = {}
    for _, (paths, channels) in named.items():
        for path, c in zip(paths, channels):
            seen.setdefault(c, path)
    if len(seen) > 1:
        (c1, p1), (c2, p2) = sorted(seen.items())[:2]
        raise ConfigError(
            f"images of different channel counts: {p1} has {c1}, {p2} has {c2}; convert the dataset to one (all RGB or all grayscale)"
        )
    return next(iter(seen))


def folder_images(root: str | Path) -> dict[str, list[Path]]:
    """``<root>/{trainA,trainB,testA,testB}``'s image paths: the layout checked (names only, nothing decoded)."""
    root = require_folder(root, FOLDER_LAYOUT)
    missing = [d for d in ("trainA", "trainB", "testA", "testB") if not (root / d).is_dir()]
    if missing:
        raise ConfigError(f"dataset folder {root} lacks {', '.join(missing)}; expected layout: {FOLDER_LAYOUT}")
    out = {}
    for name in ("trainA", "trainB", "testA", "testB"):
        out[name] = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        # is_file() is False for a folder, a dangling link and a link loop alike: named here, before a run opens
        odd = next((p for p in out[name] if not p.is_file()), None)
        if odd is not None:
            problem = "a folder" if odd.is_dir() else "a broken or looping symbolic link" if odd.is_symlink() else "not a regular file"
            raise ConfigError(f"{odd} is {problem}, not an image file; remove it or replace it with the image")
        if not out[name]:
            raise ConfigError(f"{root / name} holds no .jpg/.png images; expected layout: {FOLDER_LAYOUT}")
    return out


def read_folder(root: str | Path, size: int, limit: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """``<root>/{trainA,trainB,testA,testB}``: uint8 arrays [n, size, size, C] and the channel count C."""
    out, named = {}, {}
    for name, paths in folder_images(root).items():
        arrays, where, channels = _decode_all([(str(p), p.read_bytes) for p in paths], size, limit)
        named[name] = (where, channels)
        out[name] = arrays
    channels = check_channels(named)
    return {k: np.stack(v) for k, v in out.items()}, channels


def read_cifar_cat_dog(root: str | Path, size: int, limit: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """CIFAR-10 cat (A) ↔ dog (B) from an ImageFolder tree or its zips."""
    root = require_image_tree(root, CIFAR_LAYOUT, classes=("cat", "dog"))
    out = {}
    for split in ("train", "test"):
        if (root / split).is_dir():
            lists = {
                c: [(str(p), p.read_bytes) for p in sorted((root / split / c).glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
                for c in ("cat", "dog")
            }
            archive = None
        else:  # its zip (require_image_tree)
            archive = zipfile.ZipFile(root / f"{split}.zip")
            names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES)
            lists = {
                c: [(f"{root / split}.zip:{n}", lambda n=n, archive=archive: archive.read(n)) for n in names if n.split("/")[-2:-1] == [c]]
                for c in ("cat", "dog")
            }
        for letter, c in (("A", "cat"), ("B", "dog")):  # (each split holds both: require_image_tree)
            arrays, _, _ = _decode_all(lists[c], size, limit)
            out[f"{split}{letter}"] = np.stack([a if a.shape[2] == 3 else np.repeat(a, 3, 2) for a in arrays])
        if archive is not None:
            archive.close()
    return out, 3


# -- datasets ------------------------------------------------------------------------------------------------------
class UnpairedImages(Dataset):
    """Item i: (image of A, image of B, i) as float [C, H, W] in [−1, 1]. A has item i mod |A|; B a fixed random
    permutation (from ``seed``) of its images, so the pairs are unrelated. Training: random crop to ``crop`` (when
    smaller than the stored size) and horizontal flip, each image independently, drawn from (seed, epoch, i): training
    items are keyed (epoch, i)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, train: bool, crop: int, seed: int, length: str = "max"):
        self.a, self.b = torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)
        self.train, self.crop, self.seed = train, crop, seed
        self.order_b = torch.randperm(len(b), generator=torch.Generator().manual_seed(seed))
        self.length = max(len(a), len(b)) if length == "max" else min(len(a), len(b))

    def __len__(self) -> int:
        return self.length

    def _prepare(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        size = image.shape[-1]
        if g is None:  # test: centre crop
            top = (size - self.crop) // 2
            image = image[:, top : top + self.crop, top : top + self.crop]
        else:
            top, left = torch.randint(0, size - self.crop + 1, (2,), generator=g).tolist() if size > self.crop else (0, 0)
            image = image[:, top : top + self.crop, left : left + self.crop]
            if torch.rand(1, generator=g) < 0.5:
                image = image.flip(-1)
        return image.float() / 127.5 - 1

    def __getitem__(self, key):
        # training keys are (epoch, i) from the loader's sampler: loader workers and a run resumed mid-epoch draw the
        # epoch's crops (an attribute set at the epoch's start reached neither)
        epoch, i = key if self.train else (0, key)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 7_919 + epoch) if self.train else None
        a = self._prepare(self.a[i % len(self.a)], g)
        b = self._prepare(self.b[self.order_b[i % len(self.b)]], g)
        return a, b, i


class UnpairedDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_data(cfg.data)
        self.cfg = cfg
        self.arrays: dict[str, np.ndarray] | None = None
        self.channels = 3

    def identity(self) -> dict:
        """What the data is (for cache keys): its settings and, for real data, a digest of the decoded images (a changed
        or corrected folder at the same path must not meet a classifier trained on the old one)."""
        d = self.cfg.data
        out = {k: d[k] for k in ("name", "root", "load_size", "n_train", "n_test", "seed", "max_images")}
        if d.name != "generated":
            self.setup()
            digest = hashlib.sha1()
            for key in sorted(self.arrays):
                digest.update(f"{key}{self.arrays[key].shape}".encode())
                digest.update(np.ascontiguousarray(self.arrays[key]).data)
            out["content"] = digest.hexdigest()[:12]
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        d = self.cfg.data
        if d.name == "generated":
            self.arrays, self.channels = generated_domains(d.n_train, d.n_test, d.load_size, d.seed), 3
        elif d.name == "folder":
            self.arrays, self.channels = read_folder(d.root, d.load_size, d.max_images)
        else:
            self.arrays, self.channels = read_cifar_cat_dog(d.root, d.load_size, d.max_images)

    def dataset(self, split: str) -> UnpairedImages:
        d = self.cfg.data
        train = split == "train"
        return UnpairedImages(self.arrays[f"{split}A"], self.arrays[f"{split}B"], train, d.crop_size, d.seed, "max" if train else "min")

    def train_dataloader(self):
        d = self.cfg.data
        # drop_last: every step needs a full (even) batch, the first half per domain for each path
        return training_loader(self, self.dataset("train"), shuffle=d.shuffle, item_epochs=True, drop_last=True)

    def test_dataloader(self):
        return eval_loader(self, self.dataset("test"))


def check_data(d: DictConfig) -> None:
    """Names and the settings that ranges cannot state, in one line each, before anything runs."""
    if d.name not in DATASETS:
        raise ConfigError(f"unknown data.name '{d.name}'; valid: {', '.join(DATASETS)}")
    if d.name != "generated" and not d.root:
        layout = FOLDER_LAYOUT if d.name == "folder" else CIFAR_LAYOUT
        raise ConfigError(f"data.name={d.name} needs data.root=<folder>; expected layout: {layout}")
    check_root_is_read(d, "generated", DATASETS)
    if d.name == "folder":  # the layout and counts, before a run opens (images are decoded, and checked, in setup)
        counts = {k: min(len(v), d.max_images or len(v)) for k, v in folder_images(d.root).items()}
        if max(counts["trainA"], counts["trainB"]) < d.batch_size:  # drop_last: not one training step
            raise ConfigError(
                f"{d.root}: trainA and trainB hold {counts['trainA']} and {counts['trainB']} images (data.max_images counted), "
                f"below data.batch_size={d.batch_size}: not one full batch to train on"
            )
        if min(counts["testA"], counts["testB"]) < 2:  # the test pairs min(A, B) images; FID needs two a domain
            raise ConfigError(
                f"{d.root}: testA and testB hold {counts['testA']} and {counts['testB']} images (data.max_images counted); "
                "FID and KID need at least 2 test images in each domain"
            )
    elif d.name != "generated":
        require_image_tree(d.root, CIFAR_LAYOUT, classes=("cat", "dog"))
    if d.batch_size < 2 or d.batch_size % 2:
        raise ConfigError(
            f"data.batch_size must be even and >= 2 (the first half of each domain's batch feeds the encoded-attribute path, "
            f"the second half the random-attribute discriminators), got {d.batch_size}"
        )
    if d.name == "generated" and d.n_train < d.batch_size:  # drop_last: not one training step
        raise ConfigError(f"data.n_train={d.n_train} is below data.batch_size={d.batch_size}: not one full batch to train on")
    if d.crop_size > d.load_size:
        raise ConfigError(f"data.crop_size={d.crop_size} is larger than data.load_size={d.load_size}")
    if d.crop_size % 4:
        raise ConfigError(f"data.crop_size must be a multiple of 4 (the content code is H/4 × W/4), got {d.crop_size}")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] → [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
