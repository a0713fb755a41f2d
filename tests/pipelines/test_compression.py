"""compression: the quantization formulas and int4 packing against hand computations, sizes and parameter counts of every
transformation against hand counts on tiny models, int8 (PT2E) logits close to fp32, structured pruning's shapes, SVD /
Tucker exact at full rank, the pruning schedule, the MnasNet reward and the KD loss, the latency harness, loaders on
real-format fixtures, one-line errors, and a smoke run of train / reproduce / bench."""

import math
import pickle
import re
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn
from torch.nn import functional as F

from common.config import ConfigError
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.compression.data import load_task
from pipelines.compression.experiments import pareto_front
from pipelines.compression.model import (
    Int4WeightOnly,
    add_masks,
    check_channel_ratio,
    count_params,
    cubic_sparsity,
    dequantize_symmetric,
    depthwise_separable,
    exported_bytes,
    factorise,
    kd_loss,
    latency,
    mnas_reward,
    pack_int4,
    prune_channels,
    pt2e_static_int8,
    quantize_symmetric,
    remove_masks,
    svd_conv,
    svd_linear,
    tucker2_conv,
    unpack_int4,
    update_masks,
)
from pipelines.compression.module import CompressionExperiment, check_technique
from tests.conftest import cifar10_jpg, cli, zip_splits


class Tiny(nn.Module):
    """conv(3→8, 3×3) BN ReLU, conv(8→8, 3×3) BN ReLU, pool, linear(8→4): 216 + 16 + 576 + 16 + 32 + 4 = 860 values."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial BN statistics, as a trained network has
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model


# -- quantization ---------------------------------------------------------------------------------------------------------
def test_symmetric_quantization_matches_the_formula_by_hand():
    w = torch.tensor([[0.7, -0.33, 0.1, 0.0], [2.0, 0.9, -0.5, 0.2]])
    q, s = quantize_symmetric(w, 4, group_size=2)  # qmax = 7; groups: (0.7, −0.33), (0.1, 0), (2, 0.9), (−0.5, 0.2)
    assert s.flatten().tolist() == pytest.approx([0.1, 0.1 / 7, 2 / 7, 0.5 / 7])
    assert q.reshape(2, 4).tolist() == [[7, -3, 7, 0], [7, 3, -7, 3]]  # −3.3 → −3, 3.15 → 3, 2.8 → 3
    assert torch.allclose(dequantize_symmetric(q, s, w.shape), torch.tensor([[0.7, -0.3, 0.1, 0.0], [2.0, 6 / 7, -0.5, 1.5 / 7]]))
    values = torch.arange(-8, 8, dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and len(packed) == 8 and int(packed[0]) == (0 + 8 * 0) | ((1) << 4)  # −8+8=0, −7+8=1
    assert torch.equal(unpack_int4(packed, 16), values) and torch.equal(unpack_int4(pack_int4(values[:5]), 5), values[:5])


def test_int4_weight_only_layer_stores_half_a_byte_per_weight_and_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = Int4WeightOnly(linear, group_size=4)  # 6 inputs padded to 8: 2 groups per row
    assert layer.packed.numel() == 4 * 8 // 2 and layer.scale.shape == (4, 2, 1) and layer.scale.dtype == torch.float16
    q, s = quantize_symmetric(linear.weight, 4, 4)
    expected = F.linear(torch.ones(1, 6), dequantize_symmetric(q, s.half().float(), (4, 6)), linear.bias)
    assert torch.allclose(layer(torch.ones(1, 6)), expected, atol=1e-6)
    assert (layer.weight() - linear.weight).abs().max() <= s.max() / 2 + 1e-3  # within half a step
    assert count_params(layer)["params"] == 32 + 8 + 4  # 32 int4 values (16 bytes), 8 scales, 4 biases


def test_pt2e_static_int8_logits_are_close_to_fp32_and_the_program_is_smaller():
    model = _tiny()
    torch.manual_seed(1)
    calibration = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    int8 = pt2e_static_int8(model, calibration)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    int8_state = {k: v for k, v in int8.state_dict().items() if v.dtype == torch.int8}
    assert sum(v.numel() for v in int8_state.values()) == 216 + 576 + 32  # every conv/linear weight, once, in int8
    assert not any(v.dtype == torch.float32 and v.numel() in (216, 576) for v in int8.state_dict().values())  # floats stripped


# -- pruning ------------------------------------------------------------------------------------------------------------------
def test_cubic_schedule_and_global_magnitude_masks():
    assert cubic_sparsity(0, 0.8, 0, 10, 5) == 0.0
    assert cubic_sparsity(25, 0.8, 0, 10, 5) == pytest.approx(0.8 + (0 - 0.8) * 0.5**3)
    assert cubic_sparsity(50, 0.8, 0, 10, 5) == pytest.approx(0.8) and cubic_sparsity(99, 0.8, 0, 10, 5) == pytest.approx(0.8)
    model = _tiny()
    modules = add_masks(model)
    reached = update_masks(modules, 0.5)
    weights = torch.cat([m.weight_orig.detach().abs().flatten() for m in modules])
    assert reached == pytest.approx(0.5, abs=1 / len(weights))
    threshold = torch.kthvalue(weights, int(0.5 * len(weights))).values
    for m in modules:  # the smallest magnitudes, over all layers together
        assert torch.equal(m.weight_mask == 0, m.weight_orig.abs() <= threshold)
    remove_masks(modules)
    counts = count_params(model)
    assert counts["params"] == 860 and counts["nonzero_params"] == 860 - (216 + 576 + 32) // 2 - 16  # (BN biases start at 0)


def test_structured_pruning_removes_the_channels_and_the_model_still_runs():
    model = _tiny()
    pruned = prune_channels(model, 0.5, torch.randn(1, 3, 8, 8), ["fc"])
    assert pruned.conv1.weight.shape == (4, 3, 3, 3) and pruned.bn1.weight.shape == (4,)
    assert pruned.conv2.weight.shape == (4, 4, 3, 3) and pruned.fc.weight.shape == (4, 4)  # coupled inputs go too
    assert count_params(pruned)["params"] == 108 + 8 + 144 + 8 + 16 + 4
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    kept = [i for i in range(8) if any(torch.equal(model.conv1.weight[i], w) for w in pruned.conv1.weight)]
    assert len(kept) == 4  # surviving filters are copies of original ones, not new weights
    # conv2 keeps exactly the input channels of conv1's surviving filters (the dependency graph's coupling)
    assert all(any(torch.equal(row, full[kept]) for full in model.conv2.weight) for row in pruned.conv2.weight)


def test_a_channel_ratio_that_would_empty_a_layer_is_refused_not_skipped():
    """torch-pruning skips a group that would keep no channel: 0.99 of 8 channels pruned nothing, silently."""
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    assert prune_channels(model, 0.875, x, ["fc"]).conv1.weight.shape[0] == 1  # 1 − 1/8: one channel of eight kept
    message = (
        r"^prune.channels=0.9 would remove every channel of conv1 \(8\), which torch-pruning then skips: use at most 0.875 for this model$"
    )
    with pytest.raises(ConfigError, match=message):
        prune_channels(model, 0.9, x, ["fc"])
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 1, 1))
    check_channel_ratio(grouped, 0.5, [], "k")  # one of each group's two kept; the one-channel output is never pruned
    with pytest.raises(ConfigError, match=r"^k=0.6 would remove every channel of 1 \(2 per group\), .*use at most 0.5 for"):
        check_channel_ratio(grouped, 0.6, [], "k")
    with pytest.raises(ConfigError, match=r"use at most 0.8999 for"):  # (1 − 0.9) · 10 < 1 in floating point
        check_channel_ratio(nn.Sequential(nn.Conv2d(3, 10, 1)), 0.95, [], "k")
    with pytest.raises(
        ConfigError, match=r"^prune.channels=0.99 would remove every channel of layer1.0.conv1 \(8\)"
    ):  # the smoke model, before any run
        check_technique(compose("compression", {"preset": "smoke", "compress.technique": "prune_structured", "prune.channels": 0.99}))


# -- compact convolutions and factorisation ---------------------------------------------------------------------------------------
def test_depthwise_separable_and_factorisations_count_by_hand_and_svd_tucker_are_exact_at_full_rank():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    separable = depthwise_separable(conv)
    assert count_params(separable)["params"] == 8 * 9 + 8 * 16 + 16  # k²M + MN (+ bias)
    x = torch.randn(2, 8, 6, 6)
    full_svd = svd_conv(conv, min(16, 8 * 9))
    assert torch.allclose(full_svd(x), conv(x), atol=1e-4)
    assert torch.allclose(tucker2_conv(conv, 8, 16)(x), conv(x), atol=1e-4)
    low = svd_conv(conv, 4)
    assert count_params(low)["params"] == 4 * 8 * 9 + 16 * 4 + 16
    tucker = tucker2_conv(conv, 2, 4)
    assert count_params(tucker)["params"] == 8 * 2 + 2 * 4 * 9 + 4 * 16 + 16
    linear = nn.Linear(20, 10)
    y = torch.randn(3, 20)
    assert torch.allclose(svd_linear(linear, 10)(y), linear(y), atol=1e-4)
    assert count_params(svd_linear(linear, 3))["params"] == 3 * (20 + 10) + 10  # r(m + n) + bias
    small = factorise(_tiny(), 0.25, "svd")  # conv2: rank 2 of min(8, 72): 2·72 + 8·2 = 160 < 576; fc: 1·(8+4) = 12 < 32
    assert isinstance(small.conv2, nn.Sequential) and isinstance(small.fc, nn.Sequential) and not isinstance(small.conv1, nn.Sequential)
    assert count_params(small)["params"] == 216 + 16 + 160 + 16 + 12 + 4


def test_shipped_program_size_follows_the_stored_bytes():
    x = torch.randn(1, 100)
    narrow, wide = nn.Linear(100, 10), nn.Linear(100, 1000)
    extra = len(exported_bytes(wide, x)) - len(exported_bytes(narrow, x))
    assert extra == pytest.approx(4 * 990 * 101, rel=0.02)  # 4 bytes per extra fp32 value, and little else


# -- NAS and KD ---------------------------------------------------------------------------------------------------------------------
def test_mnas_reward_and_kd_loss_by_hand():
    assert mnas_reward(0.8, 10.0, 10.0) == pytest.approx(0.8)
    assert mnas_reward(0.8, 20.0, 10.0) == pytest.approx(0.8 * 2**-0.07)
    assert mnas_reward(0.8, 5.0, 10.0, alpha=-0.07, beta=-1.0) == pytest.approx(0.8 * 0.5**-0.07)
    s, t, y = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([1])
    T, a = 2.0, 0.75
    ps, pt = torch.softmax(s / T, 1)[0], torch.softmax(t / T, 1)[0]
    kl = sum(float(pt[i] * (pt[i].log() - ps[i].log())) for i in range(3))
    ce = -float(torch.log_softmax(s, 1)[0, 1])
    assert float(kd_loss(s, t, y, T, a)) == pytest.approx((1 - a) * ce + a * T**2 * kl, rel=1e-5)
    assert pareto_front({"a": (1.0, 0.9), "b": (2.0, 0.8), "c": (0.5, 0.7), "d": (3.0, 0.95)}) == ["c", "a", "d"]


# -- the latency harness ------------------------------------------------------------------------------------------------------------
def test_latency_harness_warms_up_and_orders_its_percentiles(monkeypatch):
    # A fake clock, so the assertions hold on a loaded machine: warm-up calls take 1 s each, timed call k takes k ms.
    clock, calls = [0.0], []
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def step():
        calls.append(1)
        clock[0] += 1.0 if len(calls) <= 3 else 1e-3 * (len(calls) - 3)

    out = latency(step, torch.device("cpu"), warmup=3, iters=20)
    assert len(calls) == 23
    assert out["p50_ms"] == pytest.approx(10.5) and out["p95_ms"] == pytest.approx(19) and out["mean_ms"] == pytest.approx(10.5)


# -- data ---------------------------------------------------------------------------------------------------------------------------
def test_generated_task_and_cifar_batches_and_imagefolder_zips(tmp_path):
    task = load_task(compose("compression", {"preset": "smoke"}))
    assert task.train.images.shape == (64, 3, 16, 16) and task.train.images.dtype == torch.uint8
    assert len(task.classes) == 10 and torch.bincount(task.test.labels).tolist() == [4] * 10
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        x = np.full((4, 3072), i, dtype=np.uint8)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": x, b"labels": [i, i, 0, 1]}))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [7, 8, 9]}))
    cfg = compose(
        "compression",
        {
            "data.name": "cifar10",
            "data.root": str(tmp_path / "cifar"),
            "data.train_size": 0,
            "data.test_size": 0,
            "paths.cache_dir": str(tmp_path / "c"),
        },
    )
    task = load_task(cfg)
    assert len(task.train) == 20 and task.train.images[4, 0, 0, 0] == 2 and task.test.labels.tolist() == [7, 8, 9]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [7, 8]}))
    with pytest.raises(ConfigError, match=re.escape("test_batch: 2 labels for 3 images")):  # was: every later label shifted
        load_task(cfg)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [7, 8, 9]}))
    tree = tmp_path / "tree"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                path = tree / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (200 if c == "dog" else 10, i, 0)).save(path)
    zips = zip_splits(tree, tmp_path / "zips")
    values = {"data.name": "imagefolder", "data.train_size": 0, "data.test_size": 0, "paths.cache_dir": str(tmp_path / "c")}
    a = load_task(compose("compression", {**values, "data.root": str(tree)}))
    b = load_task(compose("compression", {**values, "data.root": str(zips)}))
    assert a.classes == ["cat", "dog"] and a.train.images.shape == (6, 3, 32, 32)  # resized to data.image_size
    assert torch.equal(a.train.images, b.train.images) and a.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(a.train.images[3, 0].float().mean()) == 200
    with pytest.raises(ConfigError, match=re.escape("data.train_size=7 is more than the 6 train images in")):  # was all 6, silently
        load_task(compose("compression", {**values, "data.root": str(tree), "data.train_size": 7}))
    with pytest.raises(ConfigError, match=re.escape("lacks train/ and train.zip; expected layout: <root>/cifar-10-batches-py/")):
        (folder / "data_batch_1").unlink()
        load_task(
            compose(
                "compression", {"data.name": "cifar10", "data.root": str(tmp_path / "cifar"), "paths.cache_dir": str(tmp_path / "d")}
            ).copy()
        )
    with pytest.raises(ConfigError, match=r"dataset folder .*missing does not exist; expected layout: <root>/\{train,test\}"):
        load_task(compose("compression", {"data.name": "imagefolder", "data.root": str(tmp_path / "missing")}))


# -- bad input: one line where it enters ----------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(home, tmp_path):
    for key, value, message in (
        ("prune.sparsity", 1.0, "config key 'prune.sparsity' must be in [0, 1), got 1.0"),
        ("prune.sparsity", -0.1, "config key 'prune.sparsity' must be in [0, 1), got -0.1"),
        ("prune.channels", 1.5, "config key 'prune.channels' must be in [0, 1), got 1.5"),
        # a later review: a torch error inside a FAILED run, or a NAS reward that favours slower models
        ("model.kwargs.channels", [0, 0, 0, 0], "config key 'model.kwargs.channels' must be >= 1, got 0 (in [0, 0, 0, 0])"),
        ("kd.student.kwargs.layers", [1, 0, 1, 1], "config key 'kd.student.kwargs.layers' must be >= 1, got 0 (in [1, 0, 1, 1])"),
        ("nas.alpha", 5, "config key 'nas.alpha' must be <= 0, got 5"),
    ):
        with pytest.raises(ConfigError) as err:
            compose("compression", {key: value})
        assert str(err.value) == message
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "unknown compress.technique 'binarize'; valid: baseline, int8_dynamic, int8_static, int4_weight, qat, prune_unstructured, prune_structured, depthwise, low_rank, nas, kd, student"
        ),
    ):
        check_technique(compose("compression", {"compress.technique": "binarize"}))
    with pytest.raises(
        ConfigError,
        match=r"compress.layers names 'layer9.conv1', which resnet18 does not have; its conv/linear layers: conv1, layer1.0.conv1",
    ):
        CompressionExperiment.check_config(compose("compression", {"compress.technique": "low_rank", "compress.layers": ["layer9.conv1"]}))
    out = cli("train", "compression", "prune.sparsity=1.2")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "lightyard: error: config key 'prune.sparsity' must be in [0, 1), got 1.2"
    ]
    with pytest.raises(ConfigError, match="compress.layers applies to depthwise, int4_weight, low_rank, prune_unstructured, not to kd"):
        check_technique(compose("compression", {"compress.technique": "kd", "compress.layers": ["fc"]}))
    with pytest.raises(
        ConfigError, match=r"names 'fc', a Linear that technique=depthwise cannot split .*; resnet18's: conv1, layer1.0.conv1"
    ):
        check_technique(
            compose("compression", {"compress.technique": "depthwise", "compress.layers": ["fc"]})
        )  # (was an AttributeError, FAILED)
    with pytest.raises(ConfigError, match=r"^lowrank.rank_ratio=1.0 factorises none of compress.layers .*: lower lowrank.rank_ratio$"):
        check_technique(compose("compression", {"compress.technique": "low_rank", "compress.layers": ["fc"], "lowrank.rank_ratio": 1.0}))
    check_technique(compose("compression", {"compress.technique": "low_rank", "compress.layers": ["fc"], "lowrank.rank_ratio": 0.2}))
    with pytest.raises(ConfigError, match=r"^unknown timm model 'resnet999'; did you mean resnet[0-9]*, .*\? list them with"):
        CompressionExperiment.check_config(compose("compression", {"model.name": "resnet999"}))
    with pytest.raises(ConfigError, match=r"^unknown timm model 'notamodel'; list them with"):  # a bench child's, before it opens
        CompressionExperiment.check_config(compose("compression", {"bench.model": "notamodel"}))
    with pytest.raises(ConfigError, match=r"^unknown timm model 'nope'; list them with"):  # (was once the run had opened)
        CompressionExperiment.check_config(compose("compression", {"compress.technique": "kd", "kd.student.name": "nope"}))
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds CIFAR-10's python batches, 32-pixel images; set data.image_size=32$"):
        CompressionExperiment.check_config(
            compose("compression", {"data.name": "cifar10", "data.root": str(tmp_path), "data.image_size": 64})
        )
    with pytest.raises(ConfigError, match=re.escape("model.kwargs.channels gives one width per ResNet stage: 4 numbers, got [8, 8]")):
        CompressionExperiment.check_config(compose("compression", {"model.kwargs": {"channels": [8, 8]}}))


# -- smoke runs through the command line's path ---------------------------------------------------------------------------------------
def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("compression")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def test_train_smoke_int4_is_smaller_and_reuses_the_cached_baseline(home):
    (first,) = train("compression", ["preset=smoke", "technique=int4_weight"])
    m = first.metrics
    # int4's weights are a quarter and a bit of fp32's; the whole .pt2 is larger at this size, where the graph (its
    # unpacking nodes) outweighs the weights — both are logged
    assert 3.5 < m["weights_ratio"] < 8 and m["weights_mb"] < m["size_mb"] and m["size_ratio"] < m["weights_ratio"]
    assert m["params"] == m["nonzero_params"] and m["macs_m"] > 0 and math.isfinite(m["speedup"])
    cached = list((home / "cache" / "compression").glob("baseline-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    (second,) = train("compression", ["preset=smoke", "technique=prune_unstructured", "seed=1"])
    assert [p.stat().st_mtime_ns for p in (home / "cache" / "compression").glob("baseline-*.pt")] == [stamp]  # read, not retrained
    assert second.metrics["baseline_top1"] == m["baseline_top1"]
    assert second.metrics["sparsity"] == pytest.approx(0.5, abs=0.01) and second.metrics["nonzero_params"] < 0.6 * second.metrics["params"]


def test_reproduce_smoke_tabulates_each_technique(home):
    result = run_experiment("reproduce", "compression", ["preset=smoke", "experiment=generated"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    children = {c["compress.technique"]: c for c in _children(result)}
    assert children["prune_structured"]["params"] < 0.5 * children["baseline"]["params"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[0] == "prune_structured"]
    assert row[1] == f"{100 * children['prune_structured']['top1']:.2f}"
    assert "Pareto front (top-1 vs p50_ms)" in result.report


def test_reproduce_smoke_of_the_cifar10_experiment_on_jpeg_zips(home, tmp_path):
    """The default reproduce (experiment=cifar10) on a tiny copy of ../shared/data/cifar10_jpg; its loader:
    test_generated_task_and_cifar_batches_and_imagefolder_zips."""
    root = cifar10_jpg(tmp_path, per_class=(6, 2))
    overrides = [f"root={root}", "data.train_size=0", "data.test_size=0", "finetune.epochs=0.5"]  # the set's 10000 / 2000 / 5
    result = run_experiment("reproduce", "compression", ["preset=smoke", "experiment=cifar10", *overrides])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    children = {c["compress.technique"]: c for c in _children(result)}
    assert set(children) == {"baseline", "prune_structured"}
    client = MlflowClient(tracking_uri=tracking_uri(compose("compression")))
    for child in children.values():  # each read the fixture, not the generated task
        params = client.get_run(child["_run_id"]).data.params
        assert (params["data.name"], params["data.root"]) == ("cifar10", str(root))
        assert 0 <= child["top1"] <= 1 and math.isfinite(child["p50_ms"])
    assert children["prune_structured"]["params"] < 0.5 * children["baseline"]["params"]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[0] == "baseline"]
    assert row[1] == f"{100 * children['baseline']['top1']:.2f}" and row[-1] == "1"
    assert "Pareto front (top-1 vs p50_ms)" in result.report


def test_bench_smoke_reports_same_run_ratios(home):
    result = run_experiment("bench", "compression", ["preset=smoke"])
    assert (result.status, result.total) == ("FINISHED", 1), result.report
    (child,) = _children(result)
    assert child["int8_size_ratio"] > 1
    assert child["sparsity"] == pytest.approx(0.5, abs=0.01) and child["pruned_params_ratio"] > 2
    assert child["compiled"] == 0 and "compiled (0: bench.compile=false" in result.report  # smoke times eager, and says so
