"""sgd_freeze_embed: frozen sets per family, optimizer state bytes, the schedule, the diagnostic and its
reparametrisation, a tiny run of each optimizer, loaders on real-format fixtures, clear errors."""

import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from common.config import ConfigError, with_values
from common.grid import run_experiment
from common.memory import memory_ledger
from common.report import children_rows
from common.runner import compose, train
from common.tables import format_cell
from common.tracking import tracking_uri
from pipelines.sgd_freeze_embed.data import (
    load_domainnet,
    load_imagefolder,
    load_waterbirds,
    waterbirds_like,
)
from pipelines.sgd_freeze_embed.model import (
    OPTIMIZERS,
    build_classifier,
    create_backbone,
    embedding_patterns,
    family,
    gradient_diagnostic,
    make_optimizer,
    rescale_patch_input,
)
from pipelines.sgd_freeze_embed.module import FineTuneModule

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2}
TINY_CLIP = {**TINY_VIT, "pre_norm": True}


def _cfg(**values):
    """The pipeline's config for a tiny model; ``model.kwargs`` replaces the default's kwargs instead of merging."""
    kwargs = values.pop("model.kwargs", TINY_CLIP)
    base = {
        "data.n_train": 64,
        "data.n_val": 32,
        "data.n_test": 32,
        "data.batch_size": 16,
        "pretrain.enabled": False,
        "trainer.max_epochs": 2,
        "trainer.enable_progress_bar": False,
        "diagnostic.batches": 2,
    }
    cfg = compose("sgd_freeze_embed", {**base, **values})
    OmegaConf.update(cfg, "model.kwargs", kwargs, merge=False)
    return cfg


@pytest.mark.parametrize(
    "name,kwargs,stage0,expected",
    [
        ("vit_tiny_patch16_224", TINY_VIT, True, ["patch_embed.proj.weight", "patch_embed.proj.bias"]),
        ("vit_base_patch16_clip_224", TINY_CLIP, True, ["patch_embed.proj.weight", "norm_pre.weight", "norm_pre.bias"]),
        ("convnext_atto", {}, False, ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]),
    ],
)
def test_exact_frozen_parameters_per_family(name, kwargs, stage0, expected):
    cfg = _cfg(**{"model.name": name, "model.kwargs": kwargs, "optim.name": "sgd_freeze_embed", "model.convnext_freeze_stage0": stage0})
    model, frozen = build_classifier(cfg, 3)
    assert frozen == [f"backbone.{n}" for n in expected]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == frozen
    if "vit" in name:  # position embedding and class token stay trainable, as in the reference code
        assert model.backbone.pos_embed.requires_grad and model.backbone.cls_token.requires_grad


def test_convnext_reference_definition_adds_stage_0():
    cfg = _cfg(**{"model.name": "convnext_atto", "model.kwargs": {}, "optim.name": "sgd_freeze_embed"})
    model, frozen = build_classifier(cfg, 3)
    stage0 = [n for n, _ in model.named_parameters() if n.startswith("backbone.stages.0.")]
    assert frozen == [f"backbone.stem.{i}.{k}" for i in (0, 1) for k in ("weight", "bias")] + stage0 and len(stage0) > 10
    assert family(model.backbone) == "convnext" and not any(n.startswith("backbone.stages.1.") for n in frozen)


def test_family_is_read_from_the_structure():
    for name, fam in (("vit_tiny_patch16_224", "vit"), ("vit_base_patch16_clip_224", "clip_vit")):
        model, _ = build_classifier(_cfg(**{"model.name": name, "optim.name": "sgd", "model.kwargs": TINY_VIT}), 2)
        assert family(model.backbone) == fam


@pytest.mark.parametrize(
    "optimizer,momentum,per_param", [("adamw", 0.9, 16), ("sgd", 0.9, 12), ("sgd", 0.0, 8), ("sgd_freeze_embed", 0.9, 12)]
)
def test_optimizer_state_bytes(optimizer, momentum, per_param):
    cfg = _cfg(**{"optim.name": optimizer, "optim.momentum": momentum})
    model, frozen = build_classifier(cfg, 2)
    opt, _ = make_optimizer(cfg.optim, model, 1)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ledger = memory_ledger(model, [opt])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ledger["trainable_params"] == trainable
    assert ledger["bytes_per_trainable_param"] == per_param
    assert ledger["optimizer_state_bytes"] == (per_param - 8) * trainable
    if frozen:
        assert ledger["frozen_params"] == sum(p.numel() for n, p in model.named_parameters() if n in frozen) > 0


def test_cosine_schedule_steps_per_epoch():
    cfg = _cfg(**{"optim.lr": 0.1})
    model, _ = build_classifier(cfg, 2)
    opt, schedule = make_optimizer(cfg.optim, model, 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step()
    assert np.allclose(lrs, [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_diagnostic_and_the_embedding_rescale_keep_the_function():
    cfg = _cfg(**{"optim.name": "sgd"})
    torch.manual_seed(0)
    model, _ = build_classifier(cfg, 2)
    state = model.backbone.state_dict()
    scaled, _ = build_classifier(cfg, 2, rescale_patch_input(state, 0.1), input_scale=0.1)
    scaled.head.load_state_dict(model.head.state_dict())
    x = torch.rand(8, 3, 32, 32)
    assert torch.allclose(model.eval()(x), scaled.eval()(x), atol=1e-4)
    batches = [(x, torch.tensor([0, 1] * 4))]
    embedding = embedding_patterns(cfg.model, "clip_vit")
    rows, ratio = gradient_diagnostic(model, batches, embedding, 1)
    rows_s, ratio_s = gradient_diagnostic(scaled, batches, embedding, 1)
    patch = next(r["grad_norm"] for r in rows if r["group"] == "patch_embed")
    patch_s = next(r["grad_norm"] for r in rows_s if r["group"] == "patch_embed")
    assert patch_s == pytest.approx(10 * patch, rel=1e-3)  # same function, ten times the embedding gradient
    assert ratio_s > 2 * ratio  # the embedding also holds norm_pre, which the rescale leaves alone
    assert [r["group"] for r in rows][:4] == ["pos_embed+cls_token", "patch_embed", "norm_pre", "blocks.0"] and rows[-1]["group"] == "head"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_tiny_run_of_each_optimizer(optimizer, home):
    """`lightyard train` at the smoke size: metrics of the best-validation epoch, the diagnostic, and the
    embedding left exactly at its stage-1 weights by the freeze-embed optimizers only."""
    from pipelines.sgd_freeze_embed.module import backbone_weights

    values = {"preset": "smoke", "optim.name": optimizer, "optim.lr": 1e-3 if optimizer.startswith("adamw") else 0.01}
    (result,) = train("sgd_freeze_embed", [f"{k}={v}" for k, v in values.items()])
    metrics = result.metrics
    assert {"best/val_acc", "best/test_acc", "best/ood_test_acc", "best/ood_test_worst_group_acc", "best/epoch"} <= set(metrics)
    assert metrics["grad/embed_over_rest"] > 0
    run = MlflowClient(tracking_uri=tracking_uri(result.config)).get_run(result.run_id)
    state = torch.load(Path(run.data.tags["lightyard.run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    start = backbone_weights(compose("sgd_freeze_embed", values))["patch_embed.proj.weight"]  # from the stage-1 cache, now reused
    assert torch.equal(state["model.backbone.patch_embed.proj.weight"], start) == optimizer.endswith("_freeze_embed")


def _table_rows(report: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]


def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("sgd_freeze_embed")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def test_reproduce_smoke_children_are_train_runs_and_the_report_selects_lr_on_validation(home):
    result = run_experiment("reproduce", "sgd_freeze_embed", ["preset=smoke"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 8, 8), result.report
    children = _children(result)
    expected = [("adamw", 0.001), ("sgd", 0.0001), ("sgd", 0.01), ("sgd_freeze_embed", 0.01)]
    assert sorted((c["optim.name"], c["optim.lr"], c["seed"]) for c in children) == sorted((o, lr, s) for o, lr in expected for s in (0, 1))
    for child in children:  # the runner's memory ledger and the module's metrics, as in any `train` run
        assert child["memory/bytes_per_trainable_param"] == {"adamw": 16, "sgd": 12, "sgd_freeze_embed": 12}[child["optim.name"]]
        assert (child["memory/frozen_params"] > 0) == (child["optim.name"] == "sgd_freeze_embed")
        assert child["grad/embed_over_rest"] > 0 and child["grad/norm/patch_embed"] > 0
    # one draw of the task for every child: the diagnostic (lr 0, before any step) depends on the seed alone
    by_seed = {}
    for child in children:
        by_seed.setdefault(child["seed"], set()).add(round(child["grad/norm/patch_embed"], 6))
    assert all(len(norms) == 1 for norms in by_seed.values()), by_seed
    sgd = [c for c in children if c["optim.name"] == "sgd"]
    val = {lr: statistics.mean(c["best/val_acc"] for c in sgd if c["optim.lr"] == lr) for lr in (0.0001, 0.01)}
    chosen = [c for c in sgd if c["optim.lr"] == max(val, key=val.get)]
    rows = _table_rows(result.report)
    (row,) = [r for r in rows if r[:2] == ["waterbirds", "sgd"]]
    assert format_cell(float(chosen[0]["optim.lr"])) in row  # the "chosen lr" column
    assert f"{100 * statistics.mean(c['best/ood_test_acc'] for c in chosen):.1f} ± " in " | ".join(row)
    assert ["paper: CLIP ViT-L/14", "93.7 / 82.2", "89.7 / 66.8", "93.7 / 83.0"] in rows  # adamw, sgd, freeze-embed


@pytest.mark.slow  # 33 s of a 10-minute suite (three spawned ViT processes); the state ledger it reports: test_optimizer_state_bytes
def test_bench_smoke_measures_every_optimizer_against_adamw_in_one_run(home):
    result = run_experiment("bench", "sgd_freeze_embed", ["preset=smoke"])
    assert (result.status, result.total) == ("FINISHED", 1), result.report
    (child,) = _children(result)
    assert (child["adamw/bytes_per_param"], child["sgd/bytes_per_param"], child["sgd_freeze_embed/bytes_per_param"]) == (16, 8, 12)
    assert child["sgd/state_x_adamw"] == pytest.approx(0.5)  # params + grads (8 B) over params + grads + two moments (16 B)
    total, trainable = child["adamw/trainable_m"], child["sgd_freeze_embed/trainable_m"]
    assert trainable < total  # the frozen embedding holds its 4 B of weights, nothing else
    assert child["sgd_freeze_embed/state_x_adamw"] == pytest.approx((4 * total + 8 * trainable) / (16 * total))
    assert all(child[f"{o}/peak_mb"] > 0 for o in ("adamw", "sgd", "sgd_freeze_embed"))
    assert any(row[0] == "vit_tiny_patch16_224" and "16" in row for row in _table_rows(result.report))


def test_waterbirds_like_groups_follow_the_training_mix():
    split = waterbirds_like(4000, 0, balanced=False)
    share = torch.bincount(split.groups, minlength=4).float() / 4000
    assert torch.allclose(share, torch.tensor([3498, 184, 56, 1057]) / 4795, atol=0.02)
    assert torch.equal(split.labels, split.groups // 2)
    balanced = torch.bincount(waterbirds_like(4000, 1, balanced=True).groups, minlength=4).float() / 4000
    assert torch.allclose(balanced, torch.full((4,), 0.25), atol=0.03)


# -- real-format loaders -------------------------------------------------------------------------------
def _png(path, colour=(255, 0, 0), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_waterbirds_loader_reads_wilds_layout(tmp_path):
    root = tmp_path / "waterbirds_v1.0"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    for i in range(12):
        name = f"{i:03d}.Bird/img_{i}.jpg"
        _png(root / name)
        rows.append(f"{i},{name},{i % 2},{i % 3},{(i // 2) % 2},x/y.jpg")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    splits = load_waterbirds(tmp_path, 32)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [4, 4, 4]
    x, y, group = splits["train"][0]
    assert x.shape == (3, 32, 32) and x.max() <= 1 and group == 2 * y + 0
    for bad, message in (
        ("-1", "line 3: split must be one of 0, 1, 2, got '-1'"),
        ("1.0", "line 3: split must be one of 0, 1, 2, got '1.0'"),
    ):
        broken = rows[:2] + [rows[2].replace(",1,1,0,", f",1,{bad},0,")] + rows[3:]
        (root / "metadata.csv").write_text("\n".join(broken) + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_waterbirds(tmp_path, 32)


def test_domainnet_loader_reads_sentry_split_files(tmp_path):
    (tmp_path / "SENTRY_splits").mkdir()
    for domain in ("sketch", "real"):
        for split in ("train", "test"):
            lines = []
            for i in range(3):
                rel = f"{domain}/class_{i}/{split}_{i}.jpg"
                _png(tmp_path / rel)
                lines.append(f"{rel} {i}")
            (tmp_path / "SENTRY_splits" / f"{domain}_{split}_mini.txt").write_text("\n".join(lines) + "\n")
    splits = load_domainnet(tmp_path, "sketch", "real", 24)
    assert len(splits["train"]) == 3 and splits["ood_test"].records[2][1] == 2
    assert splits["ood_test"][0][0].shape == (3, 24, 24)
    (tmp_path / "SENTRY_splits" / "real_test_mini.txt").write_text("real/a.jpg not_a_label\n")
    with pytest.raises(ConfigError, match="expected 'relative/path.jpg label'"):
        load_domainnet(tmp_path, "sketch", "real", 24)
    # a label past the training labels was scored as always wrong (FINISHED); a negative one failed in training
    (tmp_path / "SENTRY_splits" / "real_test_mini.txt").write_text("real/class_0/test_0.jpg 7\n")
    with pytest.raises(ConfigError, match=re.escape("real/class_0/test_0.jpg has label 7, not among the training labels 0..2")):
        load_domainnet(tmp_path, "sketch", "real", 24)
    (tmp_path / "SENTRY_splits" / "sketch_train_mini.txt").write_text("sketch/class_0/train_0.jpg -1\n")
    with pytest.raises(ConfigError, match="sketch_train_mini.txt:1: expected 'relative/path.jpg label' with a label ≥ 0"):
        load_domainnet(tmp_path, "sketch", "real", 24)


def test_imagefolder_loader_living17_style(tmp_path):
    for split in ("train", "val"):
        for sub in ("n01", "n02", "n03", "n04"):
            _png(tmp_path / split / sub / "a.JPEG")
            _png(tmp_path / split / sub / "b.png")
    splits = load_imagefolder(tmp_path, 16, classes=["n01", "n02"], ood_classes=["n03", "n04"])
    assert len(splits["train"]) == 4 and {r[1] for r in splits["ood_test"].records} == {0, 1}
    plain = load_imagefolder(tmp_path, 16)
    assert len(plain["train"]) == 8 and "ood_test" not in plain
    with pytest.raises(ConfigError, match="class folder .* is missing"):
        load_imagefolder(tmp_path, 16, classes=["n09"])


def test_imagefolder_labels_come_from_train_for_every_split(tmp_path, capsys):
    """A val/ without one class keeps train/'s label of every other class (it used to shift them all down)."""
    import shutil

    for split in ("train", "val"):
        for sub in ("ant", "bee", "cat"):
            _png(tmp_path / split / sub / "a.png")
    shutil.rmtree(tmp_path / "val" / "ant")
    splits = load_imagefolder(tmp_path, 16)
    assert {r[0].parent.name: r[1] for r in splits["val"].records} == {"bee": 1, "cat": 2}
    assert "val has no images of 1 class(es) (ant)" in capsys.readouterr().err
    (tmp_path / "val" / "ant").mkdir()  # an empty class folder: the same notice
    load_imagefolder(tmp_path, 16)
    assert "val has no images of 1 class(es) (ant)" in capsys.readouterr().err
    _png(tmp_path / "val" / "dog" / "a.png")
    with pytest.raises(ConfigError, match=r"val has class folders that train/ lacks \(dog\)"):
        load_imagefolder(tmp_path, 16)


def test_missing_folders_name_the_expected_layout(tmp_path):
    with pytest.raises(ConfigError, match="expected layout: <root>/metadata.csv"):
        load_waterbirds(tmp_path / "nope", 32)
    with pytest.raises(ConfigError, match=r"SENTRY_splits/<domain>_\{train,test\}_mini.txt"):
        load_domainnet(tmp_path, "sketch", "real", 32)


def test_wilds_datasets_need_the_package_or_the_folder(tmp_path):
    pytest.importorskip("wilds")
    from pipelines.sgd_freeze_embed.data import load_wilds

    with pytest.raises(ConfigError, match="fmow_v1.1"):
        load_wilds("fmow", tmp_path, 32)


def test_bad_model_and_optimizer_names_are_one_line_errors(home):
    """ConfigErrors (the command line prints them as one line, exit 2: tests/test_config.py), raised before training."""
    with pytest.raises(ConfigError, match=re.escape("unknown optim.name 'adam'; valid: sgd, adamw, sgd_freeze_embed, adamw_freeze_embed")):
        train("sgd_freeze_embed", ["optim.name=adam"])
    with pytest.raises(ConfigError, match="unknown timm model 'vit_tiniest'"):
        train("sgd_freeze_embed", ["model.name=vit_tiniest"])


def test_local_checkpoint_safetensors_or_state_dict(tmp_path):
    from safetensors.torch import save_file

    cfg = _cfg(**{"optim.name": "sgd"})
    source, _ = build_classifier(cfg, 2)
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "w.ckpt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's format (a review)
    for name in ("w.safetensors", "w.ckpt", "legacy.pt"):
        OmegaConf.update(cfg, "model.checkpoint", str(tmp_path / name))
        loaded, _ = build_classifier(cfg, 2)
        assert all(torch.equal(loaded.backbone.state_dict()[k], v) for k, v in state.items())
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    OmegaConf.update(cfg, "model.checkpoint", str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match=r"bad.pt does not fit VisionTransformer: \d+ of its \d+ tensors missing"):
        build_classifier(cfg, 2)
    # a whole classifier's weights (timm's head left out) load; a backbone of another width is one line before any run
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "lightning.ckpt")
    OmegaConf.update(cfg, "model.checkpoint", str(tmp_path / "lightning.ckpt"))
    loaded, _ = build_classifier(cfg, 2)
    assert all(torch.equal(loaded.backbone.state_dict()[k], v) for k, v in state.items())
    # a whole timm classifier whose head is not named head (ResNet's fc; a review: refused) loads without it
    from common.models import create_timm_model

    resnet = create_timm_model("resnet10t", num_classes=5)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    other = with_values(cfg, {"model.name": "resnet10t", "model.kwargs": {}, "model.checkpoint": str(tmp_path / "resnet.pt")})
    loaded, _ = build_classifier(other, 2)
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in loaded.backbone.state_dict().items())
    torch.save({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if k == "cls_token" else v for k, v in state.items()}, tmp_path / "wide.pt")
    with pytest.raises(
        ConfigError, match=r"^model.checkpoint .*wide.pt does not fit VisionTransformer: 1 tensor of other shapes \(cls_token is"
    ):
        FineTuneModule.check_config(with_values(cfg, {"model.checkpoint": str(tmp_path / "wide.pt")}))
    OmegaConf.update(cfg, "model.checkpoint", str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_classifier(cfg, 2)
    # a damaged file, before any run (was torch's unpickling error, advising an unsafe load, in a FAILED run)
    (tmp_path / "garbage.pt").write_text("garbage")
    for name in ("garbage.pt", "missing.pt"):
        with pytest.raises(
            ConfigError, match=f"^model.checkpoint {re.escape(str(tmp_path / name))} (is not a PyTorch file|does not exist)"
        ):
            FineTuneModule.check_config(with_values(cfg, {"model.checkpoint": str(tmp_path / name)}))


def test_cifar_colour_cue_reads_an_imagefolder_of_jpgs(tmp_path):
    """The tree, or its zips as ../shared/data/cifar10_jpg holds them (the same draws from either)."""
    import zipfile

    from pipelines.sgd_freeze_embed.data import cifar_colour_cue, cifar_source

    cache, zipped = tmp_path / "cache", tmp_path / "zipped"
    tmp_path = tmp_path / "tree"
    zipped.mkdir()
    for split in ("train", "test"):
        for cls, colour in (("airplane", (200, 200, 255)), ("cat", (120, 90, 60))):
            for i in range(3):
                _png(tmp_path / split / cls / f"{i:04d}.jpg", colour, size=(32, 32))
        with zipfile.ZipFile(zipped / f"{split}.zip", "w") as z:
            for path in sorted((tmp_path / split).rglob("*.jpg")):
                z.write(path, path.relative_to(tmp_path).as_posix())
    splits = cifar_colour_cue(tmp_path, n_train=40, n_test=40, seed=0, cache_dir=cache)
    from_zips = cifar_colour_cue(zipped, n_train=40, n_test=40, seed=0, cache_dir=cache)
    assert all(torch.equal(splits[k].images, from_zips[k].images) and torch.equal(splits[k].groups, from_zips[k].groups) for k in splits)
    train, ood = splits["train"], splits["ood_test"]
    assert train.images.shape == (40, 3, 32, 32) and torch.equal(train.labels, train.groups // 2)
    assert (train.groups == 0).sum() > (train.groups == 1).sum()  # the cue agrees with the label in most training images
    # the tint is the spurious cue: red-shifted for group parity 0, blue-shifted for parity 1 (balanced OOD set)
    red_minus_blue = ood.images[:, 0].mean((1, 2)) - ood.images[:, 2].mean((1, 2))
    for label in (0, 1):
        same = ood.labels == label
        assert red_minus_blue[same & (ood.groups % 2 == 0)].mean() > red_minus_blue[same & (ood.groups % 2 == 1)].mean() + 0.3
    assert set(ood.groups.tolist()) == {0, 1, 2, 3}
    # data.cue_strength scales the tint: at 0 the two tints of one class look the same
    plain = cifar_colour_cue(tmp_path, n_train=8, n_test=40, seed=0, cache_dir=cache, strength=0.0)["ood_test"]
    gap = plain.images[:, 0].mean((1, 2)) - plain.images[:, 2].mean((1, 2))
    same = plain.labels == 0
    assert abs(gap[same & (plain.groups % 2 == 0)].mean() - gap[same & (plain.groups % 2 == 1)].mean()) < 0.02
    source = cifar_source(tmp_path, 5, 0, cache)
    assert source.images.shape == (5, 3, 32, 32) and set(source.labels.tolist()) <= {0, 1}
    with pytest.raises(ConfigError, match=r"pretrain.n_images=7 exceeds the 6 training images"):  # was an IndexError
        cifar_source(tmp_path, 7, 0, cache)
    for root in (tmp_path, zipped):  # and before a run opens (it was found in setup, a FAILED run): counted by names
        cfg = compose("sgd_freeze_embed", {"data.name": "cifar10_cue", "data.root": str(root), "pretrain.n_images": 7})
        with pytest.raises(ConfigError, match=r"pretrain.n_images=7 exceeds the 6 training images"):
            FineTuneModule.check_config(cfg)
        FineTuneModule.check_config(with_values(cfg, {"pretrain.n_images": 6}))
        torch.save(create_backbone(cfg.model).state_dict(), tmp_path / "w.pt")
        FineTuneModule.check_config(with_values(cfg, {"model.checkpoint": str(tmp_path / "w.pt")}))  # no stage 1: not asked
    assert cifar_colour_cue(tmp_path, 4, 4, 0, cache, size=48)["train"].images.shape == (4, 3, 48, 48)  # data.image_size
    with pytest.raises(ConfigError, match=r"<root>/\{train,test\}/<class>/\*.jpg, or their zips"):
        cifar_colour_cue(tmp_path / "nope", 4, 4, 0, cache)
    for split in ("train", "test"):  # animals only: no vehicle images to draw
        for cls in ("cat", "dog"):
            _png(tmp_path / "animals" / split / cls / "0000.jpg", (90, 90, 90), size=(32, 32))
    with pytest.raises(ConfigError, match="needs vehicle .* and animal class folders, got cat, dog"):
        cifar_colour_cue(tmp_path / "animals", 4, 4, 0, cache)


def test_cifar_stage_one_is_keyed_by_the_files(tmp_path, monkeypatch):
    """Other or edited CIFAR files train a new stage 1 (its cache was keyed by the name 'cifar10' alone)."""
    from pipelines.sgd_freeze_embed import model
    from pipelines.sgd_freeze_embed.module import backbone_weights

    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            _png(tmp_path / "c" / split / cls / "0000.jpg", (90, 90, 90), size=(32, 32))
    keys = []
    monkeypatch.setattr(model, "cached", lambda path, build, what, strategy=None, check=None: keys.append(path.name) or {})
    monkeypatch.setattr(model, "rescale_patch_input", lambda weights, scale: weights)
    cfg = compose("sgd_freeze_embed", {"preset": "smoke", "data.name": "cifar10_cue", "data.root": str(tmp_path / "c")})
    backbone_weights(cfg)
    backbone_weights(cfg)
    _png(tmp_path / "c" / "train" / "cat" / "0000.jpg", (10, 200, 10), size=(32, 32))
    backbone_weights(cfg)
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.slow  # 11-16 s; exact mid-epoch resume stays in the suite (tests/test_faults.py), this is its timm variant
def test_sigterm_and_resume_equal_an_uninterrupted_run(home):
    """4 batches per epoch; the interrupt after step 3 lands on the first epoch's last batch."""
    from tests.resume_check import assert_exact_resume

    assert_exact_resume(home, "sgd_freeze_embed", ["preset=smoke", "optim.name=adamw"], kill_at_step=3, total_steps=8)


def test_freeze_from_config_reaches_the_backbone(home):
    """freeze=[patch_embed] (a module at any depth) through the runner: frozen in the run's memory ledger, no gradient
    and no AdamW state for it."""
    from mlflow.tracking import MlflowClient

    from common.runner import compose, train
    from common.tracking import tracking_uri

    (run,) = train("sgd_freeze_embed", ["preset=smoke", "optim.name=adamw", "freeze=[patch_embed]"])
    metrics = MlflowClient(tracking_uri=tracking_uri(compose("sgd_freeze_embed"))).get_run(run.run_id).data.metrics
    kw = compose("sgd_freeze_embed", {"preset": "smoke"}).model.kwargs
    patch_embed = 3 * kw.patch_size**2 * kw.embed_dim  # the patch conv's weight (no bias under CLIP's pre-norm)
    assert metrics["memory/frozen_params"] == patch_embed
    assert metrics["memory/grad_bytes"] == 4 * metrics["memory/trainable_params"]
    assert metrics["memory/optimizer_state_bytes"] == 8 * metrics["memory/trainable_params"]


@pytest.mark.slow  # ~20 s (four spawned children); the diagnostic itself: the reproduce smoke above
def test_diagnostic_experiment_smoke_scales_only_the_embeddings_gradient(home):
    result = run_experiment("reproduce", "sgd_freeze_embed", ["preset=smoke", "experiment=diagnostic"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    by = {(c["seed"], c["pretrain.embed_scale"]): c for c in _children(result)}
    for seed in (0, 1):
        plain, scaled = by[(seed, 1.0)], by[(seed, 0.1)]
        # the same draw of the task and weights; the reparametrised embedding's gradient grows ~1/scale, the rest's stays
        assert scaled["grad/norm/blocks.0"] == pytest.approx(plain["grad/norm/blocks.0"], rel=1e-5)
        assert 5 < scaled["grad/norm/patch_embed"] / plain["grad/norm/patch_embed"] < 20
    assert "embedding/rest" in result.report


@pytest.mark.slow  # ~20 s; the overhead bench's target is measured at the quick preset (README), not at this size
def test_overhead_bench_smoke_times_both_loops_per_thread_count(home):
    result = run_experiment("bench", "sgd_freeze_embed", ["preset=smoke", "experiment=overhead"])
    assert (result.status, result.total) == ("FINISHED", 2), result.report
    for child in _children(result):
        assert child["steps"] == 8 and child["hand_steps_per_s"] > 0 and child["lightning_steps_per_s"] > 0
        assert child["lightning_over_hand"] == pytest.approx(child["lightning_steps_per_s"] / child["hand_steps_per_s"], rel=1e-6)


@pytest.mark.slow  # ~30 s; the CIFAR reader: test_cifar_colour_cue_reads_an_imagefolder_of_jpgs
def test_cifar_experiment_smoke_on_an_imagefolder_fixture(home, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            for i in range(40):
                _png(tmp_path / "cifar" / split / cls / f"{i:04d}.jpg", tuple(int(v) for v in rng.integers(0, 255, 3)), size=(32, 32))
    overrides = ["preset=smoke", f"reproduce.cifar_root={tmp_path / 'cifar'}", "reproduce.seeds=[0]"]
    result = run_experiment("reproduce", "sgd_freeze_embed", ["experiment=cifar", *overrides])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    children = _children(result)
    assert sorted((c["optim.name"], c["optim.lr"]) for c in children) == [
        ("adamw", 0.001),
        ("sgd", 0.0001),
        ("sgd", 0.01),
        ("sgd_freeze_embed", 0.01),
    ]
    assert all(c["data.name"] == "cifar10_cue" and 0 < c["best/test_acc"] for c in children)
