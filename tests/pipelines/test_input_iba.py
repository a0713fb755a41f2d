"""input_iba: the bottlenecks' KL terms against Gaussian closed forms, β = 0 → pass-through, batched = one-by-one
attribution, the metrics on hand-made cases, the generated task's evidence, loaders on real-format fixtures, one-line
errors, and smoke runs of train / reproduce / bench."""

import json
import math
import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from common.config import ConfigError, with_values
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from tests.conftest import assert_no_run, cifar10_jpg, cli, zip_splits
from pipelines.input_iba.data import SHAPES, box_mask, generate, load_cifar10, load_task, read_voc_boxes, shape_mask
from pipelines.input_iba.model import (
    METHODS,
    Explainer,
    GanSettings,
    LatentHook,
    LatentStats,
    Settings,
    ehr,
    estimate_stats,
    feature_iba,
    image_generators,
    insertion_deletion,
    kl_feature,
    kl_input,
    mask_iou,
    pointing_game,
    sensitivity_n,
    spatial,
)
from pipelines.input_iba.module import InputIBAExperiment, build_classifier, check_model, classifier_cache_path, classifier_stage


# -- the information terms ------------------------------------------------------------------------------------------
def test_feature_kl_is_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    r, mean = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g)
    std, lam = 0.1 + torch.rand(50, generator=g) * 2, torch.rand(50, generator=g) * 0.98
    # Z | R = λR + (1 − λ)ε, ε ~ N(μ, σ²): Z | R ~ N(λR + (1 − λ)μ, (1 − λ)²σ²) against Q(Z) = N(μ, σ²)
    p = torch.distributions.Normal(lam * r + (1 - lam) * mean, (1 - lam) * std)
    q = torch.distributions.Normal(mean, std)
    assert torch.allclose(kl_feature(r, lam, mean, std), torch.distributions.kl_divergence(p, q), atol=1e-5)
    assert torch.allclose(kl_feature(r, torch.zeros(50), mean, std), torch.zeros(50), atol=1e-6)  # all noise: no information


def test_input_kl_is_iba_without_prior_zero_where_the_prior_admits_and_matches_a_hand_value():
    g = torch.Generator().manual_seed(1)
    x, lam = torch.randn(40, generator=g), torch.rand(40, generator=g) * 0.95
    p = torch.distributions.Normal(lam * x, 1 - lam)
    assert torch.allclose(
        kl_input(x, lam, torch.zeros(40)), torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0)), atol=1e-5
    )
    assert torch.allclose(kl_input(x, lam, torch.ones(40)), torch.zeros(40), atol=1e-5)
    # x = 2, λ = 0.5, M_G = 0.5: r = (2 − 1)/(0.75) = 4/3, μ_z = 2/3, σ_z² = 0.25/0.5625 = 4/9
    hand = -0.5 * (1 + math.log(4 / 9) - (2 / 3) ** 2 - 4 / 9)
    assert float(kl_input(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.5))) == pytest.approx(hand, rel=1e-6)


def test_welford_stats_match_the_two_pass_ones_and_clamp_the_std():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(37, 3, 4, generator=g) * 2 + 1
    data[:, 0, 0] = 5.0  # constant: its std clamps to min_std
    data[:, 1, 1] = -torch.rand(37, generator=g)  # never positive: an inactive neuron
    stats = estimate_stats(lambda: iter(data.split(10)), min_std=0.01)
    assert torch.allclose(stats.mean, data.mean(0), atol=1e-5)
    std = data.std(0).clamp_min(0.01)
    assert torch.allclose(stats.std, std, atol=1e-5) and stats.std[0, 0] == pytest.approx(0.01)
    assert stats.active[1, 1] == 0 and stats.active[0, 0] == 1


# -- the bottleneck's behaviour ---------------------------------------------------------------------------------------
def _linear_model(d: int = 12, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("latent", nn.Identity())
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(3 * d, classes))
    with torch.no_grad():
        model.head.weight.mul_(8)
    return model.eval()


def test_beta_zero_drives_the_feature_mask_to_pass_through_and_a_large_beta_closes_it():
    model = _linear_model(4)
    hook = LatentHook(model, "latent")
    y = torch.tensor([0, 1, 0])
    # every feature is evidence for the target (w_y − w_other has the sign of x), so noise anywhere only costs
    margin = model.head.weight[y] - model.head.weight[1 - y]
    x = margin.sign().view(3, 3, 2, 2) * (1 + torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(3)))
    stats = LatentStats(torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.ones(3, 2, 2))
    gens = image_generators([0, 1, 2], 0, torch.device("cpu"))
    open_ = feature_iba(hook, x, y, stats, gens, beta=0.0, steps=40, lr=1.0, copies=8, alpha_init=0.0)
    assert open_.lam.min() > 0.95  # from λ = 0.5: the classifier's loss alone wants every feature
    closed = feature_iba(hook, x, y, stats, gens, beta=200.0, steps=40, lr=1.0, copies=8, alpha_init=0.0)
    assert closed.lam.mean() < 0.2


def _settings(**kw) -> Settings:
    gan = GanSettings(epochs=2, batch_size=4, real_samples=8, group_size=4, critic_iters=2)
    return Settings(feature_steps=3, copies=2, input_steps=3, ig_steps=4, gan=gan, **kw)


def test_batched_attribution_equals_one_image_at_a_time_in_float64():
    from common.models import create_timm_model

    model = create_timm_model("resnet10t", num_classes=4).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    hook = LatentHook(model, "layer1")
    with torch.no_grad():
        stats = estimate_stats(lambda: iter([hook.latent(x)]))
    hook.remove()
    stats = LatentStats(stats.mean.double(), stats.std.double(), stats.active.double())
    explainer = Explainer(model, "layer1", stats, _settings(), seed=5)
    for method in ("feature_iba", "input_iba"):
        together = explainer(method, x, y, [7, 8, 9])
        alone = torch.cat([explainer(method, x[i : i + 1], y[i : i + 1], [7 + i]) for i in range(3)])
        assert together.shape == (3, 16, 16) and torch.equal(together, alone), method
    assert not torch.equal(explainer("input_iba", x, y, [1, 2, 3]), explainer("input_iba", x, y, [7, 8, 9]))  # ids key the noise
    explainer.close()


def test_every_method_gives_a_map_per_image_on_a_vit_through_its_token_layer():
    from common.models import create_timm_model

    model = create_timm_model("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    hook = LatentHook(model, "blocks.0")
    with torch.no_grad():
        latent = hook.latent(x)
    assert latent.shape == (2, 17, 24) and spatial(latent).shape == (2, 24, 4, 4)  # class token dropped, 4 × 4 grid
    hook.remove()
    stats = LatentStats(latent.mean(0), latent.std(0).clamp_min(0.01), torch.ones_like(latent[0]))
    explainer = Explainer(model, "blocks.0", stats, _settings())
    for method in METHODS:
        heat = explainer(method, x, torch.tensor([0, 1]), [0, 1])
        assert heat.shape == (2, 16, 16) and torch.isfinite(heat).all() and heat.std() > 0, method
    explainer.close()


# -- metrics -------------------------------------------------------------------------------------------------------
class _Linear2(nn.Module):
    """Two classes, logit difference w · x (one channel): p(class 0) = sigmoid(w · x)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w)

    def forward(self, x):
        s = (x.flatten(1) * self.w).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_insertion_and_deletion_auc_equal_the_hand_computation():
    model = _Linear2([2.0, 1.0, 0.5, 0.25])
    x = torch.ones(1, 1, 2, 2)
    heat = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # order: pixel 0, 1, 2, 3
    y = torch.tensor([0])
    ins, dele = insertion_deletion(model, x, y, heat, steps=4, blur_sigma=0.0)  # σ = 0: insertion starts from x itself
    assert float(ins) == pytest.approx(_sig(3.75))
    # deletion: pixels to 0 in heat order; logits 3.75, 1.75, 0.75, 0.25, 0
    probs = [_sig(v) for v in (3.75, 1.75, 0.75, 0.25, 0.0)]
    hand = sum((a + b) / 2 * 0.25 for a, b in zip(probs, probs[1:]))
    assert float(dele) == pytest.approx(hand, rel=1e-6)
    # the reversed order deletes the least important pixels first: a larger AUC
    _, worse = insertion_deletion(model, x, y, heat.flip(-1).flip(-2), steps=4, blur_sigma=0.0)
    rev = [_sig(v) for v in (3.75, 3.5, 3.0, 2.0, 0.0)]
    assert float(worse) == pytest.approx(sum((a + b) / 2 * 0.25 for a, b in zip(rev, rev[1:])), rel=1e-6)
    # insertion from a zero "blur" baseline: 2 steps of 2 pixels each
    ins2, _ = insertion_deletion(model, x, y, heat, steps=2, blur_sigma=1e-9)
    assert float(ins2) == pytest.approx(_sig(3.75))


def test_sensitivity_n_is_one_for_exact_linear_contributions():
    w = torch.randn(16, generator=torch.Generator().manual_seed(7))
    model = _Linear2(w.tolist())
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    exact = (x[:, 0].flatten(1) * w).view(2, 4, 4)  # drop of the logit = Σ_S w_i x_i
    g = torch.Generator().manual_seed(0)
    r = sensitivity_n(model, x, torch.tensor([0, 0]), exact, [2, 5], 20, g)
    assert torch.allclose(r, torch.ones(2, 2), atol=1e-5)
    noise = sensitivity_n(model, x, torch.tensor([0, 0]), torch.rand(2, 4, 4, generator=g), [2, 5], 20, g)
    assert noise.mean() < 0.8


def test_ehr_pointing_and_iou_on_hand_made_maps():
    heat = torch.tensor([[[1.0, 0.5], [0.05, 0.0]]])
    box = torch.tensor([[[True, False], [False, False]]])
    # kept heat {1, .5}; q = 0: both above (inside 1 / 2); q > 0: only the peak (1 / 1) → AUC 0.075 + 0.9
    assert float(ehr(heat, box)) == pytest.approx(0.975, abs=1e-6)
    # the box on the other pixels: q = 0 gives 0.5 / 2, q > 0 gives 0 (the peak is outside) → AUC 0.25 · 0.1 / 2
    assert float(ehr(heat, ~box)) == pytest.approx(0.0125, abs=1e-6)
    # pointing: an object at rows 5–7, columns 10–12 of a 16 × 16 image, a bump on it, then beside it
    evidence = torch.zeros(1, 16, 16, dtype=torch.bool)
    evidence[0, 5:8, 10:13] = True
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    on = torch.exp(-((yy - 6) ** 2 + (xx - 11) ** 2) / 4)[None]
    off = torch.exp(-((yy - 6) ** 2 + (xx - 14) ** 2) / 4)[None]
    assert pointing_game(on, evidence).tolist() == [1.0] and pointing_game(off, evidence).tolist() == [0.0]
    assert pointing_game(off, evidence, tolerance=2).tolist() == [1.0]  # two pixels right of the object
    # IoU of the top-9 pixels with the 9-pixel object: the bump on it covers it exactly
    assert mask_iou(on, evidence).tolist() == [1.0]
    assert mask_iou(off, evidence).tolist() == [0.0]  # its top-9 block (columns 13–15) misses the object
    near = torch.exp(-((yy - 6) ** 2 + (xx - 13) ** 2) / 4)[None]
    assert mask_iou(near, evidence).tolist() == pytest.approx([3 / 15])  # columns 12–14: one shared column of 3 pixels


# -- data ----------------------------------------------------------------------------------------------------------
def test_generated_images_carry_their_label_as_the_shape_of_the_evidence():
    split = generate(12, 24, 7, seed=3)
    assert split.images.shape == (12, 3, 24, 24) and split.images.dtype == torch.uint8
    for i in range(12):
        rows, cols = split.evidence[i].nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        if SHAPES[int(split.labels[i])] in ("plus", "x", "disc"):  # these touch the stencil's first row/column only at its centre
            continue
        assert torch.equal(split.evidence[i, top : top + 7, left : left + 7], shape_mask(int(split.labels[i]), 7))
    masks = [shape_mask(k, 9) for k in range(len(SHAPES))]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(SHAPES)  # four distinct stencils
    inside = split.images[0][:, split.evidence[0]]
    assert (inside == inside[:, :1]).all()  # the object is one flat colour


def _write_cifar_tree(root, per_class=(3, 2)):
    for split, n in zip(("train", "test"), per_class):
        for c in range(10):
            for i in range(n):
                path = root / split / f"class{c}" / f"{i:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (20 * c, 0, 0)).save(path, quality=100)


def test_cifar_imagefolder_and_its_zips_read_the_same(tmp_path):
    _write_cifar_tree(tmp_path / "tree")
    zips = zip_splits(tmp_path / "tree", tmp_path / "zips", "*.jpg")
    a, names, _ = load_cifar10(tmp_path / "tree", 32, tmp_path / "cache")
    b, _, _ = load_cifar10(zips, 32, tmp_path / "cache")
    assert names == [f"class{c}" for c in range(10)]
    assert torch.equal(a["train"].images, b["train"].images) and a["test"].labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (a["train"].images[:, 0, 0, 0].long() - 20 * a["train"].labels).abs().max() <= 2  # red encodes the class folder
    assert len(list((tmp_path / "cache" / "input_iba").glob("cifar10-*.npz"))) == 2  # decoded once per folder
    cfg = compose(
        "input_iba",
        {"data.name": "cifar10", "data.root": str(zips), "data.estimation_size": 10, "paths.cache_dir": str(tmp_path / "cache")},
    )
    task = load_task(cfg)
    assert (len(task.train), len(task.estimation), len(task.attribution), task.attribution.evidence) == (20, 10, 20, None)
    with pytest.raises(ConfigError, match=re.escape("lacks train/ and train.zip; expected layout: <root>/{train,test}/<class>/*.jpg")):
        load_cifar10(tmp_path, 32, tmp_path / "cache")


def test_cifar_sizes_past_the_folder_are_one_line_before_a_run_opens(tmp_path, home):
    """train_size + estimation_size over the folder's 30 training images was found in setup, a FAILED run; now counted
    by names (tree and zips) before anything runs."""
    _write_cifar_tree(tmp_path / "tree")
    zips = zip_splits(tmp_path / "tree", tmp_path / "zips", "*.jpg")
    for root in (tmp_path / "tree", zips):
        for sizes, message in (
            (("data.train_size=25", "data.estimation_size=10"), "data.train_size + data.estimation_size = 35 > 30 CIFAR training images"),
            (
                ("data.train_size=null", "data.estimation_size=30"),
                "data.estimation_size=30 leaves none of the 30 CIFAR training images to train on",
            ),
        ):
            result = cli("train", "input_iba", "preset=smoke", "data.name=cifar10", f"data.root={root}", *sizes)
            assert result.returncode == 2 and message in result.stderr, result.stderr
    assert_no_run("input_iba")
    cfg = compose("input_iba", {"data.name": "cifar10", "data.root": str(zips), "data.train_size": 20, "data.estimation_size": 10})
    InputIBAExperiment.check_config(cfg)  # exactly the 30: fine


def _voc(path, width, height, boxes):
    objects = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, a, b, c, d in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objects}</annotation>")


def test_imagenet_voc_folder_gives_box_masks_at_the_model_resolution(tmp_path):
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537"]
    (root).mkdir()
    (root / "imagenet_class_index.json").write_text(json.dumps({"0": [wnids[0], "tench"], "1": [wnids[1], "goldfish"]}))
    for split in ("estimation", "attribution"):
        for k, wnid in enumerate(wnids):
            for i in range(2):
                path = root / "images" / split / wnid / f"ILSVRC2012_val_{k}{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 48), (100 * k, 50, 0)).save(path, format="JPEG")
                if split == "attribution":  # boxes nested by class for one, flat for the other (both layouts are read)
                    folder = root / "annotations" / "attribution" / (wnid if k == 0 else "")
                    _voc(folder / f"{path.stem}.xml", 64, 48, [(wnid, 0, 0, 32, 24)])
    (size, boxes) = read_voc_boxes(root / "annotations" / "attribution" / wnids[0] / "ILSVRC2012_val_00.xml")
    assert size == (64, 48) and boxes == [(wnids[0], 0.0, 0.0, 32.0, 24.0)]
    mask = box_mask(boxes, 64, 48, 16)
    assert mask[:8, :8].all() and mask.sum() == 64  # the top-left quarter of the resized image
    cfg = compose("input_iba", {"data.name": "imagenet_voc", "data.root": str(root), "data.image_size": 16})
    task = load_task(cfg)
    assert task.classes == ["tench", "goldfish"] and task.attribution.labels.tolist() == [0, 0, 1, 1]
    assert task.attribution.evidence.shape == (4, 16, 16) and int(task.attribution.evidence.sum()) == 4 * 64
    # boxes that give an empty or wrong evidence mask (EHR and pointing 0 in a finished run) are one line each
    flat = root / "annotations" / "attribution" / "ILSVRC2012_val_10.xml"
    for (w, h, box), message in (
        ((64, 48, (wnids[1], 40, 30, 10, 5)), "box of 'n01443537' (40, 30, 10, 5) must satisfy 0 ≤ min < max ≤ the size 64×48"),
        ((64, 48, (wnids[1], 0, 0, 640, 24)), "box of 'n01443537' (0, 0, 640, 24) must satisfy"),
        ((0, 48, (wnids[1], 0, 0, 1, 1)), "size 0×48 must be positive"),
        ((128, 96, (wnids[1], 0, 0, 32, 24)), "size 128×96 differs from its image ILSVRC2012_val_10.JPEG (64×48)"),
    ):
        _voc(flat, w, h, [box])
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_task(cfg)
    flat.unlink()
    with pytest.raises(ConfigError, match="no box annotation for .*ILSVRC2012_val_10.JPEG"):
        load_task(cfg)
    with pytest.raises(
        ConfigError, match=re.escape("lacks imagenet_class_index.json; expected layout: <root>/images/{estimation,attribution}")
    ):
        (root / "imagenet_class_index.json").unlink()
        load_task(cfg)


# -- bad input: one line, where it enters ---------------------------------------------------------------------------
def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_model(compose("input_iba", {"iba.layer": "layer9"}))
    message = str(err.value)
    assert message.startswith("unknown layer 'layer9' of ResNet; valid: conv1, conv1.0,") and "layer1, layer1.0" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=re.escape("iba.layer='fc' gives a latent of shape (1, 4): need (B, C, h, w) or tokens")):
        check_model(compose("input_iba", {"iba.layer": "fc"}))
    with pytest.raises(ConfigError, match=re.escape("config key 'iba.beta' must be >= 0, got -1.0")):
        compose("input_iba", {"iba.beta": -1.0})
    with pytest.raises(ConfigError, match=re.escape("config key 'input.beta' must be >= 0, got -2.0")):
        compose("input_iba", {"input.beta": -2.0})
    vit = {"model.name": "vit_tiny_patch16_224", "model.kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}, "iba.layer": "blocks.0"}
    with pytest.raises(
        ConfigError, match=re.escape("data.image_size=48 does not match the classifier's input size model.kwargs.img_size=32")
    ):
        InputIBAExperiment.check_config(compose("input_iba", {**vit, "data.image_size": 48}))
    InputIBAExperiment.check_config(compose("input_iba", {**vit, "data.image_size": 32}))
    with pytest.raises(ConfigError, match=r"data.image_size=48 does not fit the classifier vit_tiny_patch16_224: "):
        InputIBAExperiment.check_config(
            compose("input_iba", {"model.name": "vit_tiny_patch16_224", "iba.layer": "blocks.0", "data.image_size": 48})
        )
    with pytest.raises(ConfigError, match=re.escape("config key 'attribution.method' must be one of all|saliency")):
        compose("input_iba", {"attribution.method": "lime"})
    with pytest.raises(ConfigError, match=re.escape("data.name=cifar10 needs data.root=<folder>")):
        InputIBAExperiment.check_config(compose("input_iba", {"data.name": "cifar10"}))
    (tmp_path / "weights.pt").write_text("not weights")
    with pytest.raises(ConfigError, match=r"model.checkpoint .*weights.pt is not a PyTorch file"):  # (was a FAILED run)
        InputIBAExperiment.check_config(compose("input_iba", {"model.checkpoint": str(tmp_path / "weights.pt")}))


def test_model_checkpoint_fits_by_name_and_shape_before_the_run_opens(home, tmp_path):
    """A Lightning checkpoint of the classifier (names under ``model.``) is explained; weights for another class count
    are one line before any run opens (was torch's page of size mismatches in a FAILED run)."""
    cfg = compose("input_iba", {"preset": "smoke"})
    experiment = InputIBAExperiment(cfg)
    experiment.prepare()
    classes = len(experiment.task.classes)
    source = build_classifier(cfg, classes)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "run.ckpt")
    model, history = classifier_stage(
        with_values(cfg, {"model.checkpoint": str(tmp_path / "run.ckpt")}), experiment.task, torch.device("cpu")
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items()) and len(history) == 0
    torch.save(build_classifier(cfg, classes + 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        ConfigError, match=rf"^model.checkpoint .*other.pt does not fit ResNet: 2 tensors of other shapes \(fc.weight is \({classes + 3}, "
    ):
        train("input_iba", ["preset=smoke", f"model.checkpoint={tmp_path / 'other.pt'}"])
    assert_no_run("input_iba")


def test_bad_layer_is_one_line(home):
    """A ConfigError before any run (the command line prints it as one line, exit 2: tests/test_config.py)."""
    with pytest.raises(ConfigError, match=r"^unknown layer 'head' of ResNet; valid: conv1"):
        train("input_iba", ["preset=smoke", "layer=head"])


# -- the classifier cache and the smoke runs ------------------------------------------------------------------------
def test_classifier_cache_key_follows_model_classifier_data_and_seed_not_attribution():
    def key(**values):
        cfg = compose("input_iba", {"preset": "smoke", **values})
        return classifier_cache_path(cfg, load_task(cfg)).name

    base = key()
    assert key(**{"iba.beta": 5.0}) == base and key(**{"attribution.method": "saliency"}) == base
    assert key(seed=1) != base and key(**{"classifier.lr": 1e-3}) != base and key(**{"data.seed": 2}) != base


def test_train_smoke_logs_every_method_and_panels_and_reuses_the_classifier(home):
    (first,) = train("input_iba", ["preset=smoke"])
    for method in METHODS:
        assert {f"{method}/{m}" for m in ("insertion", "deletion", "sensitivity_n", "ehr", "pointing", "mask_iou")} <= set(first.metrics)
    client = MlflowClient(tracking_uri=tracking_uri(first.config))
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "figures")} | {
        a.path for a in client.list_artifacts(first.run_id, "tables")
    }
    assert {"figures/heatmaps.png", "tables/attribution.md"} <= artifacts
    (cached,) = (home / "cache" / "input_iba").glob("classifier-*.pt")
    stamp = cached.stat().st_mtime_ns
    (again,) = train("input_iba", ["preset=smoke", "attribution.method=saliency"])
    assert [p.stat().st_mtime_ns for p in (home / "cache" / "input_iba").glob("classifier-*.pt")] == [stamp]  # read, not retrained
    assert again.metrics["insertion"] == pytest.approx(first.metrics["saliency/insertion"])  # same classifier, same images


def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("input_iba")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def test_reproduce_smoke_tabulates_methods_and_logs_the_panel(home):
    result = run_experiment("reproduce", "input_iba", ["preset=smoke"])
    assert (result.status, result.total) == ("FINISHED", 2), result.report
    children = _children(result)
    assert sorted(c["attribution.method"] for c in children) == ["input_iba", "saliency"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[0] == "InputIBA" and len(r) == 6]
    child = next(c for c in children if c["attribution.method"] == "input_iba")
    assert row[1] == f"{child['insertion']:.3f}" and row[-1] == "1"
    assert "figures/heatmaps.png on the parent run" in result.report
    client = MlflowClient(tracking_uri=tracking_uri(compose("input_iba")))
    assert "figures/heatmaps.png" in {a.path for a in client.list_artifacts(result.run_id, "figures")}


def test_reproduce_smoke_of_the_cifar10_experiment_on_jpeg_zips(home, tmp_path):
    """experiment=cifar10 on a tiny copy of ../shared/data/cifar10_jpg; its loader: test_cifar_imagefolder_and_its_zips_read_the_same."""
    root = cifar10_jpg(tmp_path, per_class=(6, 2))  # 60 training images: 44 for the classifier, smoke's 16 for μ_R, σ_R
    overrides = [f"cifar_root={root}", "data.train_size=44", "data.test_size=20", "classifier.epochs=1"]  # the set's 10000 / 1000 / 3
    result = run_experiment("reproduce", "input_iba", ["preset=smoke", "experiment=cifar10", *overrides])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    children = _children(result)
    assert sorted(c["attribution.method"] for c in children) == ["input_iba", "saliency"]
    client = MlflowClient(tracking_uri=tracking_uri(compose("input_iba")))
    for child in children:  # each explained the fixture's images, not the generated task's
        params = client.get_run(child["_run_id"]).data.params
        assert (params["data.name"], params["data.root"]) == ("cifar10", str(root))
        assert all(math.isfinite(child[m]) for m in ("insertion", "deletion", "sensitivity_n", "classifier/test_acc"))
        assert "ehr" not in child  # CIFAR has no evidence masks: no localisation metric
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[0] == "Saliency"]  # the cifar10 experiment's one table: five metrics and the count
    child = next(c for c in children if c["attribution.method"] == "saliency")
    assert len(row) == 7 and row[1] == f"{child['insertion']:.3f}" and row[-1] == "1"
    assert "EHR ↑" not in result.report and "figures/heatmaps.png on the parent run" in result.report


def test_bench_smoke_times_every_method_and_compares_batched_with_one_by_one(home):
    result = run_experiment("bench", "input_iba", ["preset=smoke"])
    assert (result.status, result.total) == ("FINISHED", 1), result.report
    (child,) = _children(result)
    assert child["batched_speedup"] == pytest.approx(child["input_iba_loop_s_per_image"] / child["input_iba_batched_s_per_image"])
    assert child["classifier_speedup"] > 0
    assert child["bench_images"] == 2 and child["max_abs_heatmap_difference_float64"] < 1e-10  # float32: README
    assert all(child[f"{m}_s_per_image"] > 0 for m in METHODS[:-1])
