"""setr: encoder read-out against timm, decoder shapes and strides on odd sizes, the sliding window against a single
forward and against itself window by window, multi-scale sizes, the loss and the poly schedule, mIoU against a
hand-computed confusion matrix with ignored pixels, the Cityscapes trainId mapping, loaders on real-format fixtures,
one-line errors, and smoke runs of train, reproduce and bench."""

import math
import re

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from common.config import ConfigError, with_values
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.setr.data import (
    CITYSCAPES_LABEL_TO_TRAIN,
    IGNORE,
    SCENE_CLASSES,
    cityscapes_train_ids,
    generate_scenes,
    load_ade20k,
    check_labels,
    load_camvid,
    load_cityscapes,
    load_pascal_context,
    train_transform,
)
from pipelines.setr.model import (
    build_setr,
    create_vit,
    interpolate_pos_embed,
    make_optimizer,
    multi_scale_inference,
    param_groups,
    poly_factor,
    scale_layers,
    setr_loss,
    setr_multi_scale_sizes,
    slide_inference,
    window_origins,
)
from pipelines.setr.module import SegmentationMetrics
from tests.conftest import cli

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}


def _setr(decoder: str, classes: int = 5, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_setr(decoder, create_vit("vit_tiny_patch16_224", {**TINY, **kwargs}), classes, channels=16, head_channels=8)


# -- encoder ---------------------------------------------------------------------------------------
def test_paper_layers_scale_with_depth():
    assert scale_layers((10, 15, 20, 24), 24) == [10, 15, 20, 24]  # ViT-L: the configs' in_index 9, 14, 19, 23
    assert scale_layers((10, 15, 20, 24), 12) == [5, 8, 10, 12]
    assert scale_layers((6, 12, 18, 24), 12) == [3, 6, 9, 12]
    assert scale_layers((6, 12, 18, 24), 4) == [1, 2, 3, 4]
    model = _setr("pup")
    assert model.aux_layers == [2, 3, 3, 4] and model.main_layers == [4]


def test_encoder_read_out_equals_timm_blocks():
    """At the ViT's own resolution the read-out of layer l is timm's output of block l (class token dropped)."""
    model = _setr("naive").eval()
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - model.mean) / model.std
    maps = model.encoder(normalised)
    reference = model.encoder.vit.forward_intermediates(normalised, indices=[1, 2, 3], norm=False, intermediates_only=True)
    for layer, ref in zip((2, 3, 4), reference):
        assert maps[layer].shape == (2, 32, 4, 4)
        assert torch.allclose(maps[layer], ref, atol=1e-5)


def test_position_embedding_interpolation():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, 1, (4, 4), (4, 4)) is pos
    ramp = torch.arange(4.0).view(4, 1, 1).expand(4, 4, 8).reshape(1, 16, 8)  # varies along height only
    out = interpolate_pos_embed(torch.cat([pos[:, :1], ramp], 1), 1, (4, 4), (8, 6))
    assert out.shape == (1, 1 + 48, 8) and torch.equal(out[:, 0], pos[:, 0])  # the class token's embedding is kept
    grid = out[0, 1:, 0].view(8, 6)
    assert torch.allclose(grid, grid[:, :1].expand(8, 6))  # constant along width stays constant
    expected = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])  # bilinear, align_corners=False, from 4 to 8
    assert torch.allclose(grid[:, 0], expected)


# -- decoders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder,cls_scale", [("naive", 1), ("pup", 4), ("mla", 4)])
@pytest.mark.parametrize("size", [(35, 50), (41, 29)])
def test_decoder_shapes_and_strides_on_odd_sizes(decoder, cls_scale, size):
    """Logits at the input size; the classifier works at stride p (Naive), p/2 before PUP's last ×2 (3 stages for
    p = 8: ×2 ×2, classifier, ×2), p/4 (MLA: ×4 per level)."""
    model = _setr(decoder)
    seen = []
    model.head.cls.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[-2:])))
    logits, aux = model(torch.rand(2, 3, *size), with_aux=True)
    grid = (size[0] // 8, size[1] // 8)
    assert logits.shape == (2, 5, *size)
    assert seen == [(grid[0] * cls_scale, grid[1] * cls_scale)]
    assert len(aux) == {"naive": 3, "pup": 4, "mla": 4}[decoder] and all(a.shape == (2, 5, *size) for a in aux)


def test_mla_top_down_aggregation():
    """s_4 = p_4, s_3 = p_4 + p_3, …: with the 3×3 smoothing replaced by identity, level i is the sum of streams i..4."""
    model = _setr("mla").eval()
    neck = model.neck
    for smooth in neck.smooth:
        smooth[0] = torch.nn.Identity()
        smooth[1] = torch.nn.Identity()
        smooth[2] = torch.nn.Identity()
    maps = [torch.randn(1, 32, 3, 3) for _ in range(4)]
    lateral = [conv(norm(m)) for m, norm, conv in zip(maps, neck.norms, neck.lateral)]
    levels = neck(maps)
    for i in range(4):
        assert torch.allclose(levels[i], sum(lateral[i:]), atol=1e-6)


def test_unknown_layer_index_is_one_line():
    with pytest.raises(ConfigError, match=r"model.aux_layers has layer index 9, but the ViT has blocks 1..4"):
        build_setr("naive", create_vit("vit_tiny_patch16_224", TINY), 5, aux_layers=[2, 9])
    with pytest.raises(ConfigError, match="unknown model.decoder 'upernet'; valid: naive, pup, mla"):
        build_setr("upernet", create_vit("vit_tiny_patch16_224", TINY), 5)


# -- loss and schedule -----------------------------------------------------------------------------
def test_loss_is_main_plus_0_4_aux_without_ignored_pixels():
    torch.manual_seed(0)
    main, aux = torch.randn(1, 3, 2, 2), [torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)]
    target = torch.tensor([[[0, 2], [IGNORE, 1]]])

    def ce(logits):  # mean over the three labelled pixels of −log softmax at the label
        logp = logits.log_softmax(1)[0]
        return -(logp[0, 0, 0] + logp[2, 0, 1] + logp[1, 1, 1]) / 3

    loss, main_loss, aux_loss = setr_loss(main, aux, target, aux_weight=0.4)
    assert torch.allclose(main_loss, ce(main)) and torch.allclose(aux_loss, ce(aux[0]) + ce(aux[1]))
    assert torch.allclose(loss, ce(main) + 0.4 * (ce(aux[0]) + ce(aux[1])))


def test_poly_schedule_and_ten_times_head_lr():
    model = _setr("mla")
    opt, schedule = make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.0, head_lr_mult=10.0, total_steps=10, min_lr=1e-4)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    for t, (backbone, head) in enumerate(lrs):
        coeff = (1 - t / 10) ** 0.9
        assert backbone == pytest.approx((0.01 - 1e-4) * coeff + 1e-4) and head == pytest.approx((0.1 - 1e-4) * coeff + 1e-4)
    assert poly_factor(10, 10, 0.01, min_lr=1e-4) == pytest.approx(0.01)
    groups = param_groups(model, 0.01, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    heads = {names[id(p)].split(".")[0] for p in groups[1]["params"]}
    backbone = {names[id(p)].split(".")[0] for p in groups[0]["params"]}
    assert heads == {"head", "aux_heads"} and backbone == {"encoder", "neck"}  # the official MLA neck lives in the backbone
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# -- inference -------------------------------------------------------------------------------------
def test_window_origins_follow_mmseg():
    assert window_origins(100, 64, 32) == [0, 32, 36]  # the last window is moved back to end at the border
    assert window_origins(64, 64, 32) == [0] and window_origins(50, 64, 32) == [0]


@pytest.mark.parametrize("size,crop,stride", [((37, 53), (16, 24), (7, 11)), ((20, 20), (32, 32), (16, 16))])
def test_sliding_window_averages_overlaps_exactly(size, crop, stride):
    """A forward that returns its input: the averaged windows give back the image, whatever the overlaps and padding."""
    image = torch.rand(2, 3, *size)
    assert torch.allclose(slide_inference(lambda c: c, image, crop, stride, 3), image, atol=1e-6)


def test_sliding_window_equals_one_forward_when_the_window_covers_the_image():
    for decoder in ("naive", "pup", "mla"):
        model = _setr(decoder).eval()
        image = torch.rand(2, 3, 32, 48)
        with torch.no_grad():
            assert torch.allclose(slide_inference(model, image, (32, 48), (16, 16), 5), model(image), atol=1e-6)
            batched = slide_inference(model, image, (32, 32), (16, 16), 5, windows_per_forward=0)
            single = slide_inference(model, image, (32, 32), (16, 16), 5, windows_per_forward=1)
            chunked = slide_inference(model, image, (32, 32), (16, 16), 5, windows_per_forward=4)
        assert torch.allclose(batched, single, atol=1e-5) and torch.allclose(chunked, single, atol=1e-5)


def test_crop_larger_than_image_without_padding_is_one_line():
    with pytest.raises(
        ConfigError, match=r"sliding window 32×32 is larger than the 20×40 image and eval.pad=false; lower eval.crop or set eval.pad=true"
    ):
        slide_inference(lambda c: c, torch.rand(1, 3, 20, 40), (32, 32), (16, 16), 3, pad=False)


def test_setr_multi_scale_sizes_and_flip():
    # ADE20K's MS config: img_scale (2048, 512), crop 512, ratios 0.5…1.75 → short sides never below the crop
    sizes = setr_multi_scale_sizes(512, 683, 512, 512, [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    assert [min(s) for s in sizes] == [512, 512, 512, 640, 768, 896] and sizes[3] == (640, 854)
    assert setr_multi_scale_sizes(300, 200, 100, 50, [1.0]) == [(150, 100)]  # portrait: the width is the short side
    x = torch.randn(1, 3, 6, 8)  # a forward returning its input: the flipped copy flipped back equals the plain one
    assert torch.allclose(multi_scale_inference(lambda t: t, x, [(6, 8)], flip=True), x.softmax(1), atol=1e-6)


# -- metrics ---------------------------------------------------------------------------------------
def test_miou_against_a_hand_computed_confusion_matrix_over_the_split():
    """Two batches; per-class IoU from the summed confusion matrix, ignore pixels in neither; a class that never
    occurs (3) is NaN and left out of the mean, as mmseg's nanmean."""
    metrics = SegmentationMetrics(4)
    target1, pred1 = torch.tensor([[[0, 0, 0, IGNORE]]]), torch.tensor([[[0, 0, 0, 2]]])
    target2, pred2 = torch.tensor([[[2, 2, 1, 0]]]), torch.tensor([[[2, 0, 1, 0]]])
    metrics.update(pred1, target1)
    metrics.update(pred2, target2)
    # confusion (rows target, cols prediction) over the 7 labelled pixels:
    # 0: [4, 0, 0]  1: [0, 1, 0]  2: [1, 0, 1]  → IoU_0 = 4/(4+5−4), IoU_1 = 1/1, IoU_2 = 1/(2+1−1)
    iou = [4 / 5, 1.0, 1 / 2]
    result = metrics.compute()
    assert torch.allclose(result["iou"][:3], torch.tensor(iou)) and math.isnan(float(result["iou"][3]))
    assert float(result["miou"]) == pytest.approx(sum(iou) / 3)
    assert float(result["acc"]) == pytest.approx(6 / 7)  # the ignored pixel predicted 2 counts nowhere
    per_batch = []  # averaging per-batch mIoUs would give another number (1 and 2/3 → 0.833): the split is what counts
    for p, t in ((pred1, target1), (pred2, target2)):
        single = SegmentationMetrics(4)
        single.update(p, t)
        per_batch.append(float(single.compute()["miou"]))
    assert per_batch == pytest.approx([1.0, 2 / 3]) and float(result["miou"]) == pytest.approx(0.7667, abs=1e-4)


# -- data ------------------------------------------------------------------------------------------
def test_generated_scenes_have_every_class_occlusion_and_an_ignore_region():
    images, labels = generate_scenes(24, 48, 64, seed=3)
    assert images.shape == (24, 3, 48, 64) and images.min() >= 0 and images.max() <= 1
    assert set(labels.unique().tolist()) == set(range(len(SCENE_CLASSES))) | {IGNORE}
    again = generate_scenes(24, 48, 64, seed=3)
    assert torch.equal(again[1], labels) and not torch.equal(generate_scenes(24, 48, 64, seed=4)[1], labels)
    shares = torch.bincount(labels[labels != IGNORE], minlength=6).float() / (labels != IGNORE).sum()
    assert shares[2:].min() > 0.01  # every object class covers a real part of the images


def test_train_transform_crops_pads_and_keeps_labels_aligned():
    g = torch.Generator().manual_seed(0)
    label = (torch.arange(30) // 6).expand(20, 30).clone()  # five vertical bands
    image = (label.float() / 6).expand(3, 20, 30).clone()
    for _ in range(5):
        x, y = train_transform(image, label, (24, 24), None, (0.5, 2.0), 0.75, g, photometric=False)
        assert x.shape == (3, 24, 24) and y.shape == (24, 24)
        valid = y != IGNORE
        assert torch.allclose(x[0][valid], y[valid].float() / 6, atol=0.2)  # the image moved with its label
        assert (x[:, ~valid] == 0).all()  # padding: image 0, label 255


def test_cityscapes_label_ids_to_train_ids():
    ids = torch.tensor([[0, 7, 8, 11, 26], [33, 4, 23, 24, 31]])
    assert cityscapes_train_ids(ids).tolist() == [[255, 0, 1, 2, 13], [18, 255, 10, 11, 16]]
    assert sorted(CITYSCAPES_LABEL_TO_TRAIN.values()) == list(range(19))


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _rgb(h=12, w=16):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3))


def test_camvid_loader_segnet_layout_and_bad_labels(tmp_path):
    for split in ("train", "val", "test"):
        lines = []
        for i in range(2):
            _png(tmp_path / split / f"{i}.png", _rgb())
            _png(tmp_path / f"{split}annot" / f"{i}.png", np.full((12, 16), 11 if i else 3))
            lines.append(f"/SegNet/CamVid/{split}/{i}.png /SegNet/CamVid/{split}annot/{i}.png")  # SegNet's own absolute paths
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    splits = load_camvid(tmp_path)
    image, label = splits["val"](0)
    assert image.shape == (3, 12, 16) and (label == 3).all()
    assert (splits["val"](1)[1] == IGNORE).all()  # 11 = Unlabelled → ignore
    cfg = compose("setr", {"preset": "smoke", "data.name": "camvid", "data.root": str(tmp_path), "paths.cache_dir": str(tmp_path / "c")})
    check_labels(cfg)  # every label file read once, before a run opens; the file set's scan is remembered
    assert len(list((tmp_path / "c" / "setr").glob("labels-checked-*.pt"))) == 1
    _png(tmp_path / "testannot" / "1.png", np.full((12, 16), 20))
    with pytest.raises(ConfigError, match=r"testannot/1.png has value 20 outside the class range 0..11"):
        splits["test"](1)
    with pytest.raises(ConfigError, match=r"testannot/1.png has value 20 outside the class range 0..11"):
        check_labels(cfg)  # the changed file is read again (a new size and modification time)
    _png(tmp_path / "testannot" / "1.png", np.full((12, 15), 3))
    with pytest.raises(ConfigError, match=r"testannot/1.png is \(12, 15\)"):
        check_labels(cfg)
    with pytest.raises(ConfigError, match=r"expected layout: <root>/\{train,val,test\}.txt"):
        load_camvid(tmp_path / "nope")


def test_mixed_image_sizes_need_eval_batches_of_one_and_a_replaced_image_is_scanned_again(tmp_path):
    """(a review: ADE20K-like sizes stopped the run at its first validation with torch.stack's error; an image
    replaced by one of another size passed the remembered scan, which keyed on the label files only)"""
    for split in ("train", "val", "test"):
        for i, (h, w) in enumerate([(12, 16), (14, 18) if split == "val" else (12, 16)]):
            _png(tmp_path / split / f"{i}.png", _rgb(h, w))
            _png(tmp_path / f"{split}annot" / f"{i}.png", np.full((h, w), 3))
        (tmp_path / f"{split}.txt").write_text("".join(f"{split}/{i}.png {split}annot/{i}.png\n" for i in range(2)))
    values = {"preset": "smoke", "data.name": "camvid", "data.root": str(tmp_path), "paths.cache_dir": str(tmp_path / "c")}
    message = r"^camvid's val images differ in size \(12×16, 14×18\): .*; set data.eval_batch_size=1 \(got 2\)$"
    for _ in range(2):  # the first scan, then the remembered one
        with pytest.raises(ConfigError, match=message):
            check_labels(compose("setr", values))
    check_labels(compose("setr", {**values, "data.eval_batch_size": 1}))
    _png(tmp_path / "test" / "1.png", _rgb(10, 16))  # same name, another size: its label no longer fits
    with pytest.raises(ConfigError, match=r"test/1.png is \(10, 16\) but its label .*testannot/1.png is \(12, 16\)$"):
        check_labels(compose("setr", {**values, "data.eval_batch_size": 1}))


def test_ade20k_loader_reduces_the_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for folder in ("training", "validation"):
        Image.fromarray(_rgb().astype(np.uint8)).save(_mkdir(root / "images" / folder) / "ADE_x_1.jpg")
        _png(root / "annotations" / folder / "ADE_x_1.png", np.tile([0, 1, 150, 7], (12, 4)))
    splits = load_ade20k(tmp_path)
    _, label = splits["train"](0)
    assert label[0, :4].tolist() == [255, 0, 149, 6] and len(splits["test"]) == 1
    _png(root / "annotations" / "validation" / "ADE_x_1.png", np.tile([0, 151], (12, 8)))
    with pytest.raises(ConfigError, match="has value 151 outside the class range"):
        splits["val"](0)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_cityscapes_loader_maps_label_ids(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", _rgb(4, 5))
        _png(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.array([[7, 26, 0, 33, 24]] * 4))
    splits = load_cityscapes(tmp_path)
    assert splits["val"](0)[1][0].tolist() == [0, 13, 255, 18, 11]
    _png(tmp_path / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.array([[7, 40, 0, 33, 24]] * 4))
    with pytest.raises(ConfigError, match="labelId 40 outside Cityscapes' 0..33"):
        splits["val"](0)


def test_pascal_context_loader_60_and_59_classes(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    Image.fromarray(_rgb().astype(np.uint8)).save(_mkdir(voc / "JPEGImages") / "2008_000002.jpg")
    _png(voc / "SegmentationClassContext" / "2008_000002.png", np.tile([0, 1, 59, 255], (12, 4)))
    for split in ("train", "val"):
        (_mkdir(voc / "ImageSets" / "SegmentationContext") / f"{split}.txt").write_text("2008_000002\n")
    assert load_pascal_context(tmp_path, 60)["val"](0)[1][0, :4].tolist() == [0, 1, 59, 255]
    assert load_pascal_context(tmp_path, 59)["val"](0)[1][0, :4].tolist() == [255, 0, 58, 255]
    with pytest.raises(ConfigError, match=re.escape("VOC2010/{JPEGImages/*.jpg")):
        load_pascal_context(tmp_path / "nothing", 60)


# -- the command line and the experiment path ------------------------------------------------------
def test_bad_config_values_are_one_line_errors(home):
    """Checked when the config is composed, before any run: in-process for each, once through the command line."""
    from pipelines.setr.module import SETRModule

    for values, message in (
        ({"eval.pad": False, "eval.crop": [80, 80]}, "sliding window 80×80 is larger than the 64×96 image and eval.pad=false"),
        ({"model.aux_layers": [3, 12]}, "model.aux_layers has layer index 12, but the ViT has blocks 1..6"),
        ({"model.mla_layers": [0, 2, 4, 6], "model.decoder": "mla"}, "model.mla_layers has layer index 0"),
        ({"model.mla_layers": [2, 1, 2, 1], "model.decoder": "mla"}, "model.mla_layers needs 4 distinct layer numbers, shallow to deep"),
        # a later fuzz: timm's assertion naming no key
        ({"model.kwargs.num_heads": 5}, "model.kwargs do not fit vit_tiny_patch16_224: dim should be divisible by num_heads"),
        ({"model.kwargs.patch_size": 7}, "data.crop=[64, 64] is not a multiple of the ViT's patch size 7"),
        ({"model.decoder": "upernet"}, "unknown model.decoder 'upernet'; valid: naive, pup, mla"),
        ({"eval.ratios": []}, "config key 'eval.ratios' must be a non-empty list, got []"),
        ({"data.image_size": [8]}, "config key 'data.image_size' must be a list of 2 values, got [8]"),
        ({"data.ratio_range": [2.0, 0.5]}, "data.ratio_range is [lo, hi] with lo <= hi, got [2.0, 0.5]"),
        ({"eval.stride": [128, 16]}, "eval.stride=[128, 16] is larger than eval.crop=[64, 64]: windows would leave pixels uncovered"),
        # sizes that would exhaust memory (a native OOM kill leaves the run RUNNING), refused before the run
        ({"eval.crop": [2048, 2048]}, "eval.crop=[2048, 2048] gives 65536 tokens a window at patch size 8 (at most 16384"),
        ({"data.image_size": [2000, 3000]}, "would take 64.4 GiB of memory (at most 8); lower them"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            SETRModule.check_config(compose("setr", values))
    out = cli("train", "setr", "model.aux_layers=[3,12]")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "model.aux_layers has layer index 12" in lines[0], out.stderr


def test_train_smoke_logs_metrics_and_the_overlay_panel(home):
    (result,) = train("setr", ["preset=smoke", "model.decoder=pup"])
    client = MlflowClient(tracking_uri=tracking_uri(result.config))
    metrics = client.get_run(result.run_id).data.metrics
    assert {"val/miou", "test/miou", "test_ms/miou", "test/acc", "train/loss_main", "train/loss_aux"} <= set(metrics)
    assert 0 < metrics["test/acc"] and any(k.startswith("test/iou/") for k in metrics)
    assert [a.path for a in client.list_artifacts(result.run_id, "panels")] == ["panels/test_overlay.png"]
    # the end-of-run table reads the run's result: the fit's last validation survives trainer.test
    assert result.metrics["val/miou"] == metrics["val/miou"] and result.metrics["test/miou"] == metrics["test/miou"]


def test_reproduce_smoke_tabulates_decoders_beside_the_paper(home):
    result = run_experiment("reproduce", "setr", ["preset=smoke"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    client = MlflowClient(tracking_uri=tracking_uri(compose("setr")))
    children = children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)
    assert sorted(c["model.decoder"] for c in children) == ["mla", "naive"]
    assert "paper naive" in result.report and "77.90 Cityscapes" in result.report and "paper cityscapes_ss: naive ≥ mla" in result.report
    mla = next(c for c in children if c["model.decoder"] == "mla")
    assert f"{100 * mla['test/miou']:.1f}" in result.report


def test_bench_smoke_compares_batched_and_window_by_window_sliding(home):
    client = MlflowClient(tracking_uri=tracking_uri(compose("setr")))
    bench = run_experiment("bench", "setr", ["preset=smoke"])
    assert (bench.status, bench.total) == ("FINISHED", 1), bench.report
    (child,) = children_rows(client, bench.run_id, client.get_run(bench.run_id).info.experiment_id)
    assert child["slide_max_abs_diff"] <= 1e-5 and child["slide_identical"] == 1
    # smoke: no fresh process (bench.isolate=false), where freed memory would hide growth: no peak reported, not a 0
    assert child["slide_windows"] == 3 and child["train_images_per_s"] > 0
    assert not {"train_peak_mb", "slide_batched_peak_mb", "slide_within_budget"} & set(child)
    assert child["slide_batched_images_per_s"] > 0 and child["slide_speedup"] > 0 and child["vit_speedup"] > 0


def test_model_checkpoint_loads_local_vit_weights_and_refuses_other_files(tmp_path):
    """model.checkpoint: a timm ViT state dict at another grid loads with E_pos interpolated; a pickle, a missing file
    or a state dict of another network is one line before anything runs (torch's own error was a page)."""
    import pickle

    from pipelines.setr.module import SETRModule, build_model

    cfg = compose("setr", {"preset": "smoke"})
    source = build_model(compose("setr", {"preset": "smoke", "model.kwargs.img_size": 64}), 19)  # an 8×8 grid, not 4×4
    torch.save({"state_dict": source.encoder.vit.state_dict()}, tmp_path / "vit.pt")
    model = build_model(compose("setr", {"preset": "smoke", "model.checkpoint": str(tmp_path / "vit.pt")}), 19)
    assert torch.equal(model.encoder.vit.blocks[0].attn.qkv.weight, source.encoder.vit.blocks[0].attn.qkv.weight)
    assert model.encoder.vit.pos_embed.shape == build_model(cfg, 19).encoder.vit.pos_embed.shape
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pt")
    for name, message in (
        ("plain.pt", "is not a PyTorch file (torch.save's format)"),
        ("missing.pt", "does not exist"),
        ("missing.safetensors", "does not exist"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            SETRModule.check_config(compose("setr", {"preset": "smoke", "model.checkpoint": str(tmp_path / name)}))
    with pytest.raises(ConfigError, match=r"other.pt does not fit VisionTransformer: \d+ of its \d+ tensors missing"):
        SETRModule.check_config(compose("setr", {"preset": "smoke", "model.checkpoint": str(tmp_path / "other.pt")}))
    # a Lightning checkpoint of a whole SETRModule (names under model.encoder.vit.) loads; other widths are one line
    setr = compose("setr", {"preset": "smoke"})
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "run.ckpt")
    loaded = build_model(with_values(setr, {"model.checkpoint": str(tmp_path / "run.ckpt")}), 19)
    assert torch.equal(loaded.encoder.vit.blocks[0].attn.qkv.weight, source.encoder.vit.blocks[0].attn.qkv.weight)
    wide = build_model(compose("setr", {"preset": "smoke", "model.kwargs.embed_dim": 48, "model.kwargs.num_heads": 3}), 19)
    torch.save(wide.encoder.vit.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(
        ConfigError,
        match=r"^model.checkpoint .*wide.pt does not fit VisionTransformer: \d+ tensors of other shapes \(cls_token is \(1, 1, 48\), not \(1, 1, \d+\)",
    ):
        SETRModule.check_config(with_values(setr, {"model.checkpoint": str(tmp_path / "wide.pt")}))


@pytest.mark.slow  # 12-26 s; stg_kd's (a monitored checkpoint) and the toy's stay in the suite
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_and_resume_equal_an_uninterrupted_run(home, workers):
    """Two epochs of two steps, killed after step 2 (the checkpoint lands after step 3, mid-epoch 2): the resumed weights
    equal an uninterrupted run's, with and without loader workers (both failed before common.hardware.total_steps)."""
    from tests.resume_check import assert_exact_resume

    overrides = ["preset=smoke", "trainer.max_epochs=2", f"data.num_workers={workers}"]
    assert_exact_resume(home, "setr", overrides, kill_at_step=2, total_steps=4)
