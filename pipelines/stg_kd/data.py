"""Videos as features for captioning: per frame a scene feature (2D, optionally with a motion "3D" part), and per frame up
to K object slots (RoI feature, normalised box ``x1 y1 x2 y2`` in [0, 1], a mask of the real ones), with several reference
captions per video.

Embedded default (``data.name=shapes``): generated clips of coloured shapes on a textured background. Two actors interact
(one approaches the other, passes it, the two collide, one follows the other), sometimes beside a still distractor; the
captions come from a grammar ("a red circle moves toward the blue square") with several wordings per clip, so the words
name objects, attributes and a relation that only the motion of two particular objects tells. Boxes are exact, then
jittered, and a detection is missed now and then (the detector noise the paper distils around). Frame and object features
come from a small CNN trained once on the objects' crops (shape × colour; cached by ``common.cache``).

Real data (``data.name=folder``): MSVD / MSR-VTT in the pre-extracted-feature layout, see ``FOLDER_LAYOUT``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from common.cache import cache_file, cached
from common.config import ConfigError
from common.data import (
    NUMPY_READ_ERRORS,
    check_root_is_read,
    eval_loader,
    fit_state_dict,
    load_numpy,
    numpy_error,
    read_text,
    require_files,
    training_loader,
)
from common.tracking import notice
from pipelines.stg_kd.model import BOS, EOS, PAD, SPECIALS, UNK

FOLDER_LAYOUT = (
    "<root>/captions.json ({'videos': [{'video_id', 'split': train|validate|test}], 'sentences': [{'video_id', 'caption'}]}, "
    "MSR-VTT's videodatainfo shape), <root>/features_2d/<video_id>.npy [T, D2], optional <root>/features_3d/<video_id>.npy [T, D3], "
    "<root>/objects/<video_id>.npz (boxes [T, K, 4] x1 y1 x2 y2 in pixels with frame_size [W, H], or in [0, 1] without; "
    "features [T, K, Do]; optional mask [T, K])"
)
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
VERBS = {
    "approach": ("approaches", "moves toward", "goes to"),
    "pass": ("passes", "moves past", "goes by"),
    "collide": ("collides with", "hits", "bumps into"),
    "follow": ("follows", "chases", "goes after"),
}
INTERACTIONS = tuple(VERBS)
SPLITS = ("train", "val", "test")


def words(caption: str) -> list[str]:
    """Lower-cased word tokens (letters of any script, digits, apostrophes inside a word): the training vocabulary's tokenisation. The
    scores use the COCO toolkit's PTB tokeniser instead (see ``metrics.py``)."""
    return re.findall(r"[^\W_]+(?:'[^\W\d_]+)?", caption.lower())  # letters of any script ("fährt", not "f", "hrt")


# -- generated clips ---------------------------------------------------------------------------------------------------
def _trajectory(kind: str, frames: int, size: int, obj: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``[T, 2]`` of the subject's partner and of the subject, for one interaction (rejection-sampled inside the
    frame). Returns (centres of actor 0, centres of actor 1); the caption's subject is actor 1 for 'follow', else actor 0."""
    lo, hi = obj / 2 + 1, size - obj / 2 - 1
    t = np.linspace(0, 1, frames)[:, None]
    for _ in range(200):
        angle = rng.uniform(0, 2 * np.pi)
        u = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-u[1], u[0]])
        centre = rng.uniform(lo + obj, hi - obj, 2)
        if kind == "approach":  # actor 0 moves from afar to just short of the still actor 1
            b = np.repeat(centre[None], frames, 0)
            a = centre - u * (obj * 2.6 - t * obj * 1.4)
        elif kind == "pass":  # actor 0 crosses by actor 1, a gap to the side
            b = np.repeat(centre[None], frames, 0)
            a = centre + normal * (obj * 1.35) + u * (t - 0.5) * obj * 3.2
        elif kind == "collide":  # both move toward each other and meet (overlapping) at the end
            meet = np.clip((t * 1.15), 0, 1)
            a = centre - u * obj * (1.5 - 1.1 * meet)
            b = centre + u * obj * (1.5 - 1.1 * meet)
        else:  # follow: the leader (actor 0) moves on, actor 1 keeps behind it on the same line
            a = centre + u * (t - 0.3) * obj * 2.2
            b = a - u * obj * 1.5
        if a.min() >= lo and a.max() <= hi and b.min() >= lo and b.max() <= hi:
            return a, b
    raise ConfigError(f"data.frame_size {size} is too small for objects of data.object_size {obj}: make the frame larger")


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    return (yy <= cy + r * 0.8) & (yy - cy + r >= 1.8 * np.abs(xx - cx))  # triangle, apex up


def _phrase(colour: str, shape: str, rng: np.random.Generator) -> str:
    return f"{rng.choice(('a', 'the'))} {colour} {shape}"


def _captions(kind: str, subject: tuple, other: tuple, count: int, rng: np.random.Generator) -> list[str]:
    options = set()
    for _ in range(20 * count):
        if kind == "collide" and rng.random() < 0.25:
            options.add(f"{_phrase(*subject, rng)} and {_phrase(*other, rng)} collide")
        else:
            options.add(f"{_phrase(*subject, rng)} {rng.choice(VERBS[kind])} {_phrase(*other, rng)}")
        if len(options) >= count:
            break
    return sorted(options)


def generate_clips(n: int, d: DictConfig, seed: int) -> dict:
    """``n`` clips: frames ``[n, T, 3, S, S]`` (float32 in [0, 1]), exact boxes ``[n, T, A, 4]`` in [0, 1] with A = 3 actors
    (the third present when ``present[:, 2]``), object labels (shape × colour) ``[n, A]``, the interaction, captions."""
    rng = np.random.default_rng(seed)
    s, obj, frames = int(d.frame_size), float(d.object_size), int(d.frames)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    video = np.zeros((n, frames, 3, s, s), np.float32)
    boxes = np.zeros((n, frames, 3, 4), np.float32)
    labels = np.zeros((n, 3), np.int64)
    present = np.ones((n, 3), bool)
    kinds, captions = [], []
    kinds_idx = rng.integers(0, len(INTERACTIONS), n)
    combos = [(c, sh) for c in COLOURS for sh in SHAPES]
    for i in range(n):
        kind = INTERACTIONS[kinds_idx[i]]
        chosen = rng.choice(len(combos), 3, replace=False)
        actors = [combos[k] for k in chosen]
        a, b = _trajectory(kind, frames, s, obj, rng)
        still = rng.uniform(obj, s - obj, 2)
        present[i, 2] = (
            rng.random() < d.distractor_prob
            and np.linalg.norm(still - a, axis=1).min() > obj * 1.3
            and np.linalg.norm(still - b, axis=1).min() > obj * 1.3
        )
        centres = [a, b, np.repeat(still[None], frames, 0)]
        base = 0.12 + 0.08 * rng.random(3).astype(np.float32)
        noise = rng.random((frames, 1, s, s), dtype=np.float32) * 0.12
        video[i] = base[None, :, None, None] + noise
        for k in range(3):
            if not present[i, k]:
                continue
            colour, shape = actors[k]
            labels[i, k] = list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
            rgb = np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0)
            for t in range(frames):
                cx, cy = centres[k][t]
                m = _shape_mask(shape, cx, cy, obj / 2, yy, xx)
                video[i, t][:, m] = rgb[:, None]
                boxes[i, t, k] = np.clip([cx - obj / 2, cy - obj / 2, cx + obj / 2, cy + obj / 2], 0, s) / s
        subject, other = (actors[1], actors[0]) if kind == "follow" else (actors[0], actors[1])
        kinds.append(kind)
        captions.append(_captions(kind, subject, other, int(d.captions_per_video), rng))
    return {"video": video, "boxes": boxes, "labels": labels, "present": present, "kinds": kinds, "captions": captions}


class FeatureCNN(nn.Module):
    """Three convolutions; ``features`` of a crop = the pooled map (the object feature), of a frame = the map pooled to
    ``grid × grid`` cells (the 2D scene feature)."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))

    @staticmethod
    def map_side(size: int) -> int:
        """The side of the body's map for a ``size``-pixel input (two stride-2 convolutions, padding 1)."""
        return -(-size // 4)


def _crops(video: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """RoI-aligned crops ``[M, 3, size, size]`` of ``video [M, 3, S, S]`` at ``boxes [M, 4]`` (in [0, 1])."""
    from torchvision.ops import roi_align

    s = video.shape[-1]
    rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes * s], 1)
    return roi_align(video, rois, (size, size), aligned=True)


def train_feature_cnn(clips: dict, d: DictConfig) -> dict:
    """The shape × colour classifier on the training clips' object crops (a few epochs of Adam)."""
    video = torch.from_numpy(clips["video"])
    n, t = video.shape[:2]
    keep = torch.from_numpy(clips["present"])[:, None, :].expand(n, t, 3)
    frames = video[:, :, None].expand(n, t, 3, *video.shape[2:])[keep]
    boxes = torch.from_numpy(clips["boxes"])[keep]
    labels = torch.from_numpy(clips["labels"])[:, None, :].expand(n, t, 3)[keep]
    crops = _crops(frames.contiguous(), boxes, d.crop_size)
    torch.manual_seed(0)
    model = FeatureCNN(d.feature_width, len(COLOURS) * len(SHAPES))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(d.feature_epochs):
        for idx in torch.randperm(len(crops), generator=order).split(256):
            loss = F.cross_entropy(model(crops[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(crops).argmax(1) == labels).float().mean()
    return {"state": model.state_dict(), "crop_accuracy": accuracy}


@torch.no_grad()
def clip_features(clips: dict, cnn: FeatureCNN, d: DictConfig, seed: int) -> dict[str, torch.Tensor]:
    """Scene features ``[n, T, D]`` (the frame map pooled to ``scene_grid²`` cells, and with ``motion`` its frame-to-frame
    difference) and detections: object slots in random order per frame, jittered boxes, missed detections."""
    g = torch.Generator().manual_seed(seed + 7919)
    video = torch.from_numpy(clips["video"])
    n, t = video.shape[:2]
    maps = cnn.body(video.flatten(0, 1))
    scene = F.adaptive_avg_pool2d(maps, d.scene_grid).flatten(1).reshape(n, t, -1)
    if d.motion:
        scene = torch.cat([scene, torch.cat([scene[:, 1:] - scene[:, :-1], torch.zeros_like(scene[:, :1])], 1)], -1)
    boxes = torch.from_numpy(clips["boxes"])
    boxes = (boxes + torch.randn(boxes.shape, generator=g) * d.box_jitter / d.frame_size).clamp(0, 1)
    mask = torch.from_numpy(clips["present"])[:, None, :].expand(n, t, 3).clone()
    mask &= torch.rand(mask.shape, generator=g) >= d.miss_prob
    order = torch.rand(n, t, 3, generator=g).argsort(-1)  # no slot keeps an object's identity across frames
    boxes = boxes.gather(2, order[..., None].expand(n, t, 3, 4))
    mask = mask.gather(2, order)
    frames = video[:, :, None].expand(n, t, 3, *video.shape[2:]).flatten(0, 2)
    feats = cnn.body(_crops(frames.contiguous(), boxes.flatten(0, 2), d.crop_size)).mean((2, 3)).reshape(n, t, 3, -1)
    return {"scene": scene, "obj_feats": feats * mask[..., None], "boxes": boxes * mask[..., None], "obj_mask": mask}


def generated_videos(cfg: DictConfig) -> dict[str, dict]:
    """The three splits of the generated clips with their features (the feature CNN trained once on the training split)."""
    d = cfg.data
    seed = int(d.seed)
    sizes = {"train": d.n_train, "val": d.n_val, "test": d.n_test}
    clips = {split: generate_clips(int(sizes[split]), d, seed * 3 + i) for i, split in enumerate(SPLITS)}
    settings = {
        k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k not in ("batch_size", "eval_batch_size", "num_workers")
    }
    path = cache_file(cfg, "stg_kd", "feature-cnn", {"data": settings, "seed": seed})

    def check(result: dict) -> None:  # a file this version did not build is built again (common.cache)
        with torch.device("meta"):
            fit_state_dict(FeatureCNN(d.feature_width, len(COLOURS) * len(SHAPES)), result["state"], "feature CNN", load=False)
        float(result["crop_accuracy"])

    result = cached(path, lambda: train_feature_cnn(clips["train"], d), "feature CNN", check=check)
    cnn = FeatureCNN(d.feature_width, len(COLOURS) * len(SHAPES))
    cnn.load_state_dict(result["state"])
    cnn.eval()
    out = {}
    for i, split in enumerate(SPLITS):
        feats = clip_features(clips[split], cnn, d, seed * 3 + i)
        out[split] = {**feats, "captions": clips[split]["captions"], "ids": [f"{split}{k}" for k in range(sizes[split])],
                      "kinds": clips[split]["kinds"]}  # fmt: skip
    out["train"]["crop_accuracy"] = float(result["crop_accuracy"])
    out["test"]["frames"] = torch.from_numpy(clips["test"]["video"][: int(d.preview)])  # for the captioned-clip figure
    return out


# -- real data: the pre-extracted-feature layout -------------------------------------------------------------------------
def _sample_frames(array: np.ndarray, frames: int) -> np.ndarray:
    """``frames`` rows spread evenly over the clip (repeated when it is shorter), as feature extractors sample clips."""
    return array[np.linspace(0, len(array) - 1, frames).round().astype(int)]


def read_folder(root: str, d: DictConfig) -> dict[str, dict]:
    """Read and check the whole folder before training: every captioned video's files, their shapes, finiteness, boxes
    inside the frame; one line naming the file and what is wrong."""
    root = require_files(root, ["captions.json", "features_2d", "objects"], FOLDER_LAYOUT)
    try:
        info = json.loads(read_text(root / "captions.json", "captions file"))
        videos, sentences = info["videos"], info["sentences"]
        split_of: dict[str, str] = {}
        for v in videos:
            vid, split = str(v["video_id"]), {"validate": "val"}.get(v["split"], v["split"])
            if split_of.setdefault(vid, split) != split:  # silently the last one: a test video could train
                raise ConfigError(
                    f"{root / 'captions.json'}: video {vid!r} is listed in both {split_of[vid]!r} and {split!r}; give each video one split"
                )
        caps: dict[str, list[str]] = {v: [] for v in split_of}
        for s in sentences:
            if not isinstance(s["caption"], str):  # null became the word "None"
                raise ConfigError(f"{root / 'captions.json'}: a caption of video {s['video_id']!r} is {s['caption']!r}, not text")
            caps.setdefault(str(s["video_id"]), []).append(s["caption"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{root / 'captions.json'} is not in the expected shape ({err}); expected layout: {FOLDER_LAYOUT}") from None
    unknown = sorted(set(split_of.values()) - set(SPLITS))
    if unknown:
        raise ConfigError(f"{root / 'captions.json'}: unknown split {unknown[0]!r} (use train, validate or test)")
    orphans = sorted(set(caps) - set(split_of))
    if orphans:
        raise ConfigError(f"{root / 'captions.json'}: sentences for video {orphans[0]!r}, which is not in 'videos'")
    for vid, cs in caps.items():
        if not cs or not all(words(c) for c in cs):
            raise ConfigError(
                f"{root / 'captions.json'}: video {vid!r} has {'no captions' if not cs else 'an empty caption'}; every video needs at least one non-empty caption"
            )
    has_3d = (root / "features_3d").is_dir()
    frames, k_max = int(d.frames), int(d.max_objects)
    out = {split: {"scene": [], "obj_feats": [], "boxes": [], "obj_mask": [], "captions": [], "ids": []} for split in SPLITS}
    dims: dict[str, int] = {}
    short: list[str] = []  # videos with fewer feature rows than data.frames (rows repeated)

    def load(path: Path, what: str) -> np.ndarray:
        if not path.is_file():
            raise ConfigError(f"{path} is missing: {what} of video {path.stem!r}, listed in captions.json")
        return load_numpy(path, archive=path.suffix == ".npz", what=what)

    def check(name: str, array: np.ndarray, path: Path, ndim: int) -> np.ndarray:
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)  # not complex, not bool
        if array.ndim != ndim or 0 in array.shape or not real:
            raise ConfigError(
                f"{path}: '{name}' has shape {array.shape} and dtype {array.dtype}; expected {ndim} non-empty dimensions of real numbers, frames first"
            )
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)  # (checked after the cast: 1e300 in float64 is inf in float32)
        if not np.isfinite(array).all():
            raise ConfigError(f"{path}: '{name}' holds NaN or infinite values (or values beyond float32's ±3.4e38)")
        if dims.setdefault(name, array.shape[-1]) != array.shape[-1]:
            raise ConfigError(f"{path}: '{name}' has {array.shape[-1]} features per row, other videos {dims[name]}")
        return array

    for vid, split in sorted(split_of.items()):
        p2 = root / "features_2d" / f"{vid}.npy"
        scene = check("features_2d", load(p2, "2D frame features"), p2, 2)
        if len(scene) < frames:
            short.append(vid)
        if has_3d:
            p3 = root / "features_3d" / f"{vid}.npy"
            scene = np.concatenate(
                [_sample_frames(scene, frames), _sample_frames(check("features_3d", load(p3, "3D features"), p3, 2), frames)], 1
            )
        po = root / "objects" / f"{vid}.npz"
        with load(po, "object boxes and features") as z:
            if "boxes" not in z or "features" not in z:
                raise ConfigError(f"{po} lacks 'boxes' or 'features' (has {', '.join(z.files)}); expected layout: {FOLDER_LAYOUT}")
            try:  # members are read (and decompressed) only here: a damaged one fails here
                members = {k: z[k] for k in ("boxes", "features", "mask", "frame_size") if k in z}
            except NUMPY_READ_ERRORS as err:
                raise numpy_error(po, err) from None
            boxes, feats = check("boxes", members["boxes"], po, 3), check("object features", members["features"], po, 3)
            mask = members.get("mask", np.ones(boxes.shape[:2], bool))
            if mask.dtype != bool and not (mask.dtype.kind in "iuf" and np.isin(mask, (0, 1)).all()):  # (NaN or 0.3 read as True)
                raise ConfigError(
                    f"{po}: 'mask' must hold 0/1 or booleans (1: a real object), got values like {np.unique(mask)[:5].tolist()}"
                )
            mask = mask.astype(bool)
            size = members["frame_size"].astype(np.float32) if "frame_size" in members else None
        if size is not None and (size.size != 2 or not (size > 0).all() or not np.isfinite(size).all()):
            raise ConfigError(f"{po}: 'frame_size' is {size.ravel().tolist()}; expected [W, H], two positive numbers of pixels")
        if boxes.shape[-1] != 4 or boxes.shape[:2] != feats.shape[:2] or mask.shape != boxes.shape[:2]:
            raise ConfigError(
                f"{po}: boxes {boxes.shape}, features {feats.shape} and mask {mask.shape} do not agree ([T, K, 4], [T, K, D], [T, K])"
            )
        limit = np.array([1.0, 1.0], np.float32) if size is None else size.reshape(2)
        scaled = boxes / np.tile(limit, 2)
        real = scaled[mask]
        bad = (real[:, :2] < -1e-3).any(1) | (real[:, 2:] > 1 + 1e-3).any(1) | (real[:, 2] < real[:, 0]) | (real[:, 3] < real[:, 1])
        if bad.any():
            frame = int(np.nonzero(mask)[0][np.argmax(bad)])
            where = "the [0, 1] frame (no frame_size given)" if size is None else f"the {int(limit[0])}×{int(limit[1])} frame"
            raise ConfigError(
                f"{po}: box {boxes[mask][np.argmax(bad)].round(3).tolist()} of frame {frame} lies outside {where} or has x2 < x1 / y2 < y1"
            )
        keep = min(k_max, boxes.shape[1])

        def pad(a: np.ndarray, keep: int = keep) -> np.ndarray:  # the first K slots, zero slots up to max_objects
            return np.concatenate([a[:, :keep], np.zeros((a.shape[0], k_max - keep, *a.shape[2:]), a.dtype)], 1)

        o = out[split]
        o["scene"].append(_sample_frames(scene, frames))
        o["boxes"].append(_sample_frames(pad(np.clip(scaled, 0, 1) * mask[..., None]), frames))
        o["obj_feats"].append(_sample_frames(pad(feats * mask[..., None]), frames))
        o["obj_mask"].append(_sample_frames(pad(mask), frames))
        o["captions"].append(caps[vid])
        o["ids"].append(vid)
    if short:
        notice(
            f"{len(short)} of {len(split_of)} videos (e.g. {short[0]!r}) have fewer 2D feature rows than data.frames={frames}: rows repeated"
        )
    for split in SPLITS:
        if not out[split]["ids"]:
            raise ConfigError(f"{root / 'captions.json'} lists no '{split}' videos; every split needs at least one")
        for key in ("scene", "obj_feats", "boxes", "obj_mask"):
            out[split][key] = torch.from_numpy(np.stack(out[split][key]))
    return out


# -- vocabulary and datasets ---------------------------------------------------------------------------------------------
class Vocabulary:
    def __init__(self, captions: list[list[str]], min_count: int):
        counts = Counter(w for cs in captions for c in cs for w in words(c))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.itos = list(SPECIALS) + kept
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_words: int) -> list[int]:
        return [self.stoi.get(w, UNK) for w in words(caption)[:max_words]]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i in (EOS, PAD):
                break
            out.append(self.itos[i])
        return " ".join(out)


class CaptionSet(Dataset):
    """Training: one item per (video, reference caption); evaluation: one per video (its first reference for the loss; the
    scores use them all)."""

    def __init__(self, split: dict, vocab: Vocabulary, max_words: int, pairs: bool):
        self.split, self.vocab, self.max_words = split, vocab, max_words
        self.items = (
            [(v, c) for v, cs in enumerate(split["captions"]) for c in range(len(cs))]
            if pairs
            else [(v, 0) for v in range(len(split["ids"]))]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        v, c = self.items[i]
        s = self.split
        return {"scene": s["scene"][v], "obj_feats": s["obj_feats"][v], "boxes": s["boxes"][v], "obj_mask": s["obj_mask"][v],
                "words": self.vocab.encode(s["captions"][v][c], self.max_words), "index": v}  # fmt: skip


def collate(items: list[dict]) -> dict:
    """Stack the features; tokens_in = BOS + words, targets = words + EOS, PAD-padded."""
    out = {k: torch.stack([it[k] for it in items]) for k in ("scene", "obj_feats", "boxes", "obj_mask")}
    n = max(len(it["words"]) for it in items) + 1
    out["tokens_in"] = torch.full((len(items), n), PAD, dtype=torch.long)
    out["targets"] = torch.full((len(items), n), PAD, dtype=torch.long)
    for r, it in enumerate(items):
        w = it["words"]
        out["tokens_in"][r, : len(w) + 1] = torch.tensor([BOS, *w])
        out["targets"][r, : len(w) + 1] = torch.tensor([*w, EOS])
    out["index"] = torch.tensor([it["index"] for it in items])
    return out


def check_data(d: DictConfig) -> None:
    if d.name not in ("shapes", "folder"):
        raise ConfigError(f"data.name '{d.name}' is not one of shapes (generated), folder (MSVD / MSR-VTT features)")
    if d.name == "folder" and not d.root:
        raise ConfigError(f"data.name=folder needs data.root=<folder>; expected layout: {FOLDER_LAYOUT}")
    check_root_is_read(d, "shapes", ("shapes", "folder"))
    if d.name == "shapes" and d.frame_size < 3 * d.object_size:
        raise ConfigError(f"data.frame_size {d.frame_size} must be at least 3 × data.object_size ({d.object_size})")
    side = FeatureCNN.map_side(d.frame_size)
    if d.name == "shapes" and d.scene_grid > side:  # pooling "up" repeats cells: a scene feature grid²/side² times wider
        raise ConfigError(
            f"data.scene_grid={d.scene_grid} exceeds the {side}×{side} feature map of a {d.frame_size}-pixel frame; use at most {side}"
        )
    if d.name == "shapes":
        import psutil

        need, have = shapes_bytes(d), psutil.virtual_memory().total
        if need > have:  # (a lower bound of the peak: it would end in an allocation error once the run had opened)
            raise ConfigError(
                f"the generated clips need over {need / 2**30:.0f} GiB to make (data.feature_width={d.feature_width}, "
                f"data.frame_size={d.frame_size}, {max(d.n_train, d.n_val, d.n_test)} clips × data.frames={d.frames}), "
                f"more than this machine's {have / 2**30:.0f} GiB; lower them"
            )


def shapes_bytes(d: DictConfig) -> float:
    """Memory that making the shapes clips' features takes at least: the feature CNN with its gradients and Adam's
    state (its two width × width convolutions), and its first map (width/2 channels, full resolution) over every
    frame of the largest split, made at once by clip_features."""
    width = int(d.feature_width)
    params = 9 * (3 * (width // 2) + (width // 2) * width + width * width)
    frames = max(d.n_train, d.n_val, d.n_test) * d.frames
    return 4.0 * (4 * params + frames * (width // 2) * d.frame_size**2)


class VideoCaptionDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_data(cfg.data)
        self.cfg = cfg
        self.splits: dict[str, dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        d = self.cfg.data
        self.splits = generated_videos(self.cfg) if d.name == "shapes" else read_folder(d.root, d)
        self.vocab = Vocabulary(self.splits["train"]["captions"], int(d.min_word_count))
        if len(self.vocab) == len(SPECIALS):
            raise ConfigError(f"data.min_word_count={d.min_word_count} keeps no word of the training captions; lower it")
        self.scene_dim = int(self.splits["train"]["scene"].shape[-1])
        self.object_dim = int(self.splits["train"]["obj_feats"].shape[-1])
        self.frames = int(self.splits["train"]["scene"].shape[1])

    def _captions(self, split: str, train: bool) -> CaptionSet:
        return CaptionSet(self.splits[split], self.vocab, int(self.cfg.data.max_words), pairs=train)

    def train_dataloader(self):
        return training_loader(self, self._captions("train", True), collate_fn=collate)

    def val_dataloader(self):
        return eval_loader(self, self._captions("val", False), collate_fn=collate)

    def test_dataloader(self):
        return eval_loader(self, self._captions("test", False), collate_fn=collate)

    def identity(self) -> dict:
        d = self.cfg.data
        return {"name": d.name, "root": str(d.root), "videos": {s: len(self.splits[s]["ids"]) for s in SPLITS}}
