"""stg_kd: spatial and temporal adjacency on hand-made boxes and features, the block structure of G_st, the distillation
loss against a hand computation, beam 1 = greedy and batched = one clip at a time, the COCO scores on a two-caption example
(BLEU-1 by hand), the generated clips' captions against their content, the feature-folder loader on a fixture in the
layout and its one-line errors, and smoke runs of reproduce and bench."""

import json
import re
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from common.config import ConfigError
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.stg_kd.data import COLOURS, SHAPES, VERBS, generate_clips, read_folder, words
from pipelines.stg_kd.metrics import caption_scores, java_available
from pipelines.stg_kd.model import (
    EOS,
    PAD,
    Captioner,
    STGKD,
    beam_search,
    greedy_decode,
    kd_loss,
    spatial_adjacency,
    st_adjacency,
    temporal_adjacency,
)


# -- graphs -------------------------------------------------------------------------------------------------------------
def test_spatial_adjacency_is_the_row_softmax_of_iou_over_real_objects():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 9.0, 9.0]])
    mask = torch.tensor([True, True, True, False])  # the last slot is padding (its box must not count)
    g = spatial_adjacency(boxes.view(1, 1, 4, 4), mask.view(1, 1, 4))[0, 0]
    iou01 = 2.0 / 6.0  # overlap 1×2, union 4 + 4 − 2
    row0 = torch.tensor([math.e, math.exp(iou01), 1.0]) / (math.e + math.exp(iou01) + 1.0)
    row2 = torch.tensor([1.0, 1.0, math.e]) / (2.0 + math.e)
    assert torch.allclose(g[0, :3], row0, atol=1e-6) and torch.allclose(g[2, :3], row2, atol=1e-6)
    assert torch.allclose(g[:3].sum(1), torch.ones(3)) and g[3].abs().sum() == 0 and g[:, 3].abs().sum() == 0


def test_temporal_adjacency_reads_the_next_frame_by_cosine_and_g_st_is_directed():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 2.0]]])  # [T=2, K=2, D=2]
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    tm = temporal_adjacency(f[None], mask)[0, 0]
    c = 1 / math.sqrt(2)
    assert torch.allclose(tm[0], torch.tensor([math.exp(c), 1.0]) / (math.exp(c) + 1.0), atol=1e-6)
    assert torch.allclose(tm[1], torch.tensor([math.exp(c), math.e]) / (math.exp(c) + math.e), atol=1e-6)
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]).expand(2, 2, 4)[None]
    g = st_adjacency(boxes, f[None], mask)[0]  # nodes: frame 0 → 0, 1; frame 1 → 2, 3
    assert torch.allclose(g[:2, 2:], tm) and g[2:, :2].abs().sum() == 0  # t → t+1 only
    assert torch.allclose(g[:2, :2], spatial_adjacency(boxes, mask)[0, 0]) and torch.allclose(g[2:, 2:].sum(1), torch.ones(2))


def test_kd_loss_is_the_temperature_scaled_kl_from_teacher_to_student_over_real_steps():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    targets = torch.tensor([[4, 5, PAD]])  # the third step is padding
    t = 2.0
    total = 0.0
    for step in range(2):
        p = torch.softmax(teacher[0, step] / t, -1)
        q = torch.softmax(student[0, step] / t, -1)
        total += float((p * (p / q).log()).sum())
    assert kd_loss(student, teacher, targets, t).item() == pytest.approx(t * t * total / 2, rel=1e-6)
    assert kd_loss(teacher, teacher, targets, t).item() == pytest.approx(0.0, abs=1e-7)


# -- decoding -----------------------------------------------------------------------------------------------------------
def _captioner(seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(vocab=12, d_model=16, heads=2, layers=1, ff=32, dropout=0.0, max_src=4, max_len=8).eval()


def test_beam_one_is_greedy_and_batched_beams_equal_one_clip_at_a_time():
    cap = _captioner()
    src = torch.randn(6, 4, 16)
    assert torch.equal(beam_search(cap, src, 1, 7), greedy_decode(cap, src, 7))
    batched = beam_search(cap, src, 3, 7)
    for i in range(6):
        single = beam_search(cap, src[i : i + 1], 3, 7)[0]
        n = min(len(single), batched.shape[1])
        assert torch.equal(batched[i, :n], single[:n]) and (batched[i, n:] == PAD).all()


def test_beam_search_finds_a_better_sequence_than_greedy_when_one_exists():
    """Scores log P of the returned sequence by teacher forcing: the beam's is never below greedy's."""
    cap = _captioner(3)
    src = torch.randn(16, 4, 16)

    def logp(seq: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([torch.ones(len(seq), 1, dtype=torch.long), seq], 1)
        lp = cap(src, None, tokens[:, :-1]).log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        alive = torch.ones_like(lp, dtype=torch.bool)  # up to and including the first EOS
        alive[:, 1:] = (tokens[:, 1:-1] != EOS).cumprod(1).bool() & (tokens[:, 1:-1] != PAD)
        return (lp * alive).sum(1)

    with torch.no_grad():
        greedy, beam = greedy_decode(cap, src, 5), beam_search(cap, src, 4, 5)
        width = max(greedy.shape[1], beam.shape[1])
        pad = lambda s: torch.cat([s, torch.full((len(s), width - s.shape[1]), PAD)], 1)
        assert (logp(pad(beam)) >= logp(pad(greedy)) - 1e-5).all()


def test_each_variant_builds_the_branches_it_needs_and_runs():
    batch = {"scene": torch.randn(2, 3, 10), "obj_feats": torch.randn(2, 3, 4, 6), "boxes": torch.rand(2, 3, 4, 4).sort(-1)[0][..., [0, 1, 2, 3]],
             "obj_mask": torch.rand(2, 3, 4) > 0.3}  # fmt: skip
    tokens = torch.randint(1, 9, (2, 5))
    expected = {"scene": {"scene"}, "object": {"object"}, "fused": {"fused"}, "stg_kd": {"scene", "object"}}
    for variant, branches in expected.items():
        out = STGKD(variant, 9, 10, 6, 3, 6, d_model=16, heads=2, layers=1, ff=16)(batch, tokens)
        assert set(out) == branches and all(v.shape == (2, 5, 9) for v in out.values())


# -- scores -------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not java_available(), reason="the COCO toolkit's PTB tokeniser and METEOR need Java")
def test_coco_scores_on_a_two_caption_example():
    refs = {
        "1": ["A red circle approaches a blue square.", "the red circle moves toward the blue square"],
        "2": ["a green triangle follows a yellow circle"],
    }
    hyps = {"1": "a red circle approaches a blue square", "2": "a green square follows a circle"}
    s = caption_scores(refs, hyps)
    # BLEU-1 by hand: 12 of 13 candidate words clipped-match; closest reference lengths 7 + 7 = 14 > 13 → BP = e^(1 − 14/13)
    assert s["bleu1"] == pytest.approx(math.exp(1 - 14 / 13) * 12 / 13, rel=1e-6)
    assert 0 < s["bleu4"] < s["bleu1"] and 0 < s["meteor"] < 1 and 0 < s["rouge_l"] < 1 and s["cider"] > 0


# -- data ---------------------------------------------------------------------------------------------------------------
def _data_cfg(**kw):
    base = compose("stg_kd", {"preset": "smoke"}).data
    return OmegaConf.merge(base, kw)


def test_generated_captions_name_the_actors_and_the_interaction():
    clips = generate_clips(24, _data_cfg(frames=6), seed=1)
    assert clips["video"].shape == (24, 6, 3, 40, 40) and (clips["boxes"] >= 0).all() and (clips["boxes"] <= 1).all()
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for kind, captions, labels in zip(clips["kinds"], clips["captions"], clips["labels"]):
        actors = {names[labels[0]], names[labels[1]]}
        for caption in captions:
            text = " ".join(words(caption))
            assert all(a in text for a in actors), (caption, actors)
            assert any(v in text for v in VERBS[kind]) or (kind == "collide" and text.endswith("collide"))


def _fixture(root, videos=("v1", "v2", "v3"), frames=5, k=3):
    (root / "features_2d").mkdir(parents=True)
    (root / "objects").mkdir()
    info = {"videos": [{"video_id": v, "split": s} for v, s in zip(videos, ("train", "validate", "test"))],
            "sentences": [{"video_id": v, "caption": f"a man rides a horse {i}"} for v in videos for i in range(2)]}  # fmt: skip
    (root / "captions.json").write_text(json.dumps(info))
    rng = np.random.default_rng(0)
    for v in videos:
        np.save(root / "features_2d" / f"{v}.npy", rng.random((frames, 6), dtype=np.float32))
        xy = rng.uniform(0, 100, (frames, k, 2))
        boxes = np.concatenate([xy, xy + 20], -1).astype(np.float32)
        np.savez(
            root / "objects" / f"{v}.npz",
            boxes=boxes,
            features=rng.random((frames, k, 4), dtype=np.float32),
            frame_size=np.array([160, 120]),
        )
    return root


def test_folder_loader_reads_the_layout_resamples_frames_and_pads_objects(tmp_path, capsys):
    root = _fixture(tmp_path / "msvd")
    out = read_folder(str(root), _data_cfg(name="folder", root=str(root), frames=4, max_objects=5))
    assert (
        out["train"]["ids"] == ["v1"]
        and out["val"]["ids"] == ["v2"]
        and out["test"]["captions"] == [["a man rides a horse 0", "a man rides a horse 1"]]
    )
    assert out["train"]["scene"].shape == (1, 4, 6) and out["train"]["obj_feats"].shape == (1, 4, 5, 4)
    assert out["train"]["obj_mask"][0].sum(1).tolist() == [3, 3, 3, 3] and out["train"]["boxes"].max() <= 1
    raw = np.load(root / "features_2d" / "v1.npy")
    assert torch.allclose(out["train"]["scene"][0], torch.from_numpy(raw[[0, 1, 3, 4]]))  # linspace(0, 4, 4) rounded
    assert "fewer 2D feature rows" not in capsys.readouterr().err
    out = read_folder(str(root), _data_cfg(name="folder", root=str(root), frames=8, max_objects=5))
    assert out["train"]["scene"].shape == (1, 8, 6)  # 5 rows spread over 8 frames: repeated, and said
    assert "3 of 3 videos (e.g. 'v1') have fewer 2D feature rows than data.frames=8: rows repeated" in capsys.readouterr().err


def test_folder_bad_inputs_are_one_line_each(tmp_path):
    cfg = lambda root: _data_cfg(name="folder", root=str(root))
    missing = _fixture(tmp_path / "a")
    (missing / "features_2d" / "v2.npy").unlink()
    with pytest.raises(ConfigError, match=r"features_2d/v2.npy is missing: 2D frame features of video 'v2'"):
        read_folder(str(missing), cfg(missing))
    outside = _fixture(tmp_path / "b")
    with np.load(outside / "objects" / "v3.npz") as z:
        boxes = z["boxes"].copy()
        feats = z["features"]
    boxes[2, 1] = [150.0, 10.0, 175.0, 30.0]
    np.savez(outside / "objects" / "v3.npz", boxes=boxes, features=feats, frame_size=np.array([160, 120]))
    with pytest.raises(ConfigError, match=r"v3.npz: box \[150.0, 10.0, 175.0, 30.0\] of frame 2 lies outside the 160×120 frame"):
        read_folder(str(outside), cfg(outside))
    empty = _fixture(tmp_path / "c")
    info = json.loads((empty / "captions.json").read_text())
    info["sentences"] = [s for s in info["sentences"] if s["video_id"] != "v1"]
    (empty / "captions.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="video 'v1' has no captions"):
        read_folder(str(empty), cfg(empty))
    # np.load reads either format whatever the file's name; each mistake below failed deep in the loader, unnamed
    latin = _fixture(tmp_path / "d")
    (latin / "captions.json").write_bytes((latin / "captions.json").read_bytes().replace(b"rides", b"rid\xe9s"))
    with pytest.raises(
        ConfigError, match=r"captions.json: the captions file is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"
    ):
        read_folder(str(latin), cfg(latin))
    fs3 = _fixture(tmp_path / "e")
    with np.load(fs3 / "objects" / "v1.npz") as z:
        arrays = dict(z)
    np.savez(fs3 / "objects" / "v1.npz", **{**arrays, "frame_size": np.array([160, 120, 3])})
    with pytest.raises(ConfigError, match=re.escape("v1.npz: 'frame_size' is [160.0, 120.0, 3.0]; expected [W, H], two positive numbers")):
        read_folder(str(fs3), cfg(fs3))
    np.savez(fs3 / "objects" / "v1.npz", **{**arrays, "frame_size": np.array([0, 0])})  # boxes ÷ 0: NaN, then "diverged"
    with pytest.raises(ConfigError, match=re.escape("v1.npz: 'frame_size' is [0.0, 0.0]; expected [W, H], two positive numbers")):
        read_folder(str(fs3), cfg(fs3))
    for mask in (np.nan, 0.3):  # astype(bool) read both as "a real object"
        np.savez(fs3 / "objects" / "v1.npz", **arrays, mask=np.full(arrays["boxes"].shape[:2], mask))
        with pytest.raises(ConfigError, match=r"v1.npz: 'mask' must hold 0/1 or booleans \(1: a real object\), got values like"):
            read_folder(str(fs3), cfg(fs3))
    np.savez(fs3 / "objects" / "v1.npz", **arrays, mask=np.ones(arrays["boxes"].shape[:2]))  # float 0/1: fine
    read_folder(str(fs3), cfg(fs3))
    np.savez(fs3 / "objects" / "v1.npz", **arrays)
    big = np.zeros((5, 6))
    big[0, 0] = 1e300  # finite in float64, inf in float32: trained to a nan loss ("diverged")
    np.save(fs3 / "features_2d" / "v1.npy", big)
    with pytest.raises(ConfigError, match=re.escape("v1.npy: 'features_2d' holds NaN or infinite values (or values beyond float32's")):
        read_folder(str(fs3), cfg(fs3))
    for bad in (np.zeros((5, 6), np.complex64), np.zeros((5, 0))):  # cast to real silently / no scene features at all
        np.save(fs3 / "features_2d" / "v1.npy", bad)
        with pytest.raises(
            ConfigError, match=re.escape(f"v1.npy: 'features_2d' has shape {bad.shape} and dtype {bad.dtype}; expected 2 non-empty")
        ):
            read_folder(str(fs3), cfg(fs3))
    assert words("Ein Hund fährt Rad, l'été 2 Кошка") == ["ein", "hund", "fährt", "rad", "l'été", "2", "кошка"]
    npy = _fixture(tmp_path / "f")
    with open(npy / "objects" / "v1.npz", "wb") as f:
        np.save(f, arrays["boxes"])
    with pytest.raises(ConfigError, match=re.escape("v1.npz holds an array (np.save's .npy format); expected an np.savez archive")):
        read_folder(str(npy), cfg(npy))
    npz = _fixture(tmp_path / "g")
    with open(npz / "features_2d" / "v2.npy", "wb") as f:
        np.savez(f, a=np.zeros((5, 6)))
    with pytest.raises(ConfigError, match=re.escape("v2.npy holds an archive (np.savez's .npz format); expected one np.save array")):
        read_folder(str(npz), cfg(npz))
    cut = _fixture(tmp_path / "h")  # half an archive: zipfile's BadZipFile, with no file named
    (cut / "objects" / "v1.npz").write_bytes((cut / "objects" / "v1.npz").read_bytes()[:300])
    with pytest.raises(ConfigError, match=r"v1.npz is not a readable NumPy file, truncated or damaged \(BadZipFile: "):
        read_folder(str(cut), cfg(cut))
    twice = _fixture(tmp_path / "i")  # the last listing won: a test video trained
    info = json.loads((twice / "captions.json").read_text())
    info["videos"].append({"video_id": "v3", "split": "train"})
    (twice / "captions.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=re.escape("video 'v3' is listed in both 'test' and 'train'; give each video one split")):
        read_folder(str(twice), cfg(twice))
    info["videos"].pop()
    info["sentences"][0]["caption"] = None  # became the word "None"
    (twice / "captions.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=re.escape("a caption of video 'v1' is None, not text")):
        read_folder(str(twice), cfg(twice))


def test_bad_values_are_one_line(home):
    with pytest.raises(ConfigError, match="config key 'model.variant' must be one of scene|object|fused|stg_kd, got 'teacher'"):
        compose("stg_kd", {"model.variant": "teacher"})
    from pipelines.stg_kd.module import STGKDModule

    with pytest.raises(
        ConfigError, match=re.escape("decode.max_len=12 is longer than the captions the decoder is built for (data.max_words=1)")
    ):
        STGKDModule.check_config(compose("stg_kd", {"data.max_words": 1}))  # was a tensor size mismatch after training
    with pytest.raises(
        ConfigError, match=re.escape("data.scene_grid=50 exceeds the 10×10 feature map of a 40-pixel frame; use at most 10")
    ):
        STGKDModule.check_config(compose("stg_kd", {"data.scene_grid": 50}))  # was a run to BLEU 0, FINISHED
    with pytest.raises(ConfigError, match=r"^the generated clips need over \d+ GiB to make \(data.feature_width=1000000, .*; lower them$"):
        STGKDModule.check_config(compose("stg_kd", {"data.feature_width": 1000000}))  # was an allocation error in a FAILED run
    from pipelines.stg_kd.data import FeatureCNN

    cnn = FeatureCNN(4, 2)  # the check's map side is the body's, at odd and even sizes
    assert [cnn.body(torch.zeros(1, 3, s, s)).shape[-1] for s in (9, 10, 11, 12, 40)] == [
        FeatureCNN.map_side(s) for s in (9, 10, 11, 12, 40)
    ]
    with pytest.raises(ConfigError, match=r"data.name=folder needs data.root=<folder>; expected layout: <root>/captions.json"):
        train("stg_kd", ["preset=smoke", "data.name=folder"])  # the pipeline's own check, before any run starts
    assert not MlflowClient(tracking_uri=tracking_uri(compose("stg_kd"))).search_experiments(filter_string="name LIKE '%stg_kd%'")


# -- the experiment path --------------------------------------------------------------------------------------------------
def test_reproduce_and_bench_smoke(home):
    result = run_experiment("reproduce", "stg_kd", ["preset=smoke"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 2, 2), result.report
    client = MlflowClient(tracking_uri=tracking_uri(compose("stg_kd")))
    children = children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)
    assert sorted(c["model.variant"] for c in children) == ["scene", "stg_kd"]
    assert all({"test/cider", "test/bleu4", "test/rouge_l", "val/cider"} <= set(c) for c in children)
    assert "test_object/cider" in next(c for c in children if c["model.variant"] == "stg_kd")
    assert "52.2 MSVD" in result.report and "CIDEr-D" in result.report
    run = next(c for c in children if c["model.variant"] == "stg_kd")
    assert [a.path for a in client.list_artifacts(run["_run_id"], "panels")] == ["panels/test_captions.png"]
    bench = run_experiment("bench", "stg_kd", ["preset=smoke"])
    assert (bench.status, bench.total) == ("FINISHED", 2), bench.report
    rows = children_rows(client, bench.run_id, client.get_run(bench.run_id).info.experiment_id)
    assert all(r["identical"] == 1.0 and "speedup" in r for r in rows)  # (a time: its size is the bench's, not a test's)


def test_without_java_the_run_says_its_scores_are_not_the_toolkits(home, monkeypatch):
    import pipelines.stg_kd.metrics
    import pipelines.stg_kd.module

    monkeypatch.setattr(pipelines.stg_kd.module, "java_available", lambda: False)
    monkeypatch.setattr(pipelines.stg_kd.metrics, "java_available", lambda: False)
    (result,) = train("stg_kd", ["preset=smoke"])
    assert "test/meteor" not in result.metrics and "test/cider" in result.metrics
    tags = MlflowClient(tracking_uri=tracking_uri(compose("stg_kd"))).get_run(result.run_id).data.tags
    assert "Java not found: captions are scored on whitespace tokens" in tags["lightyard.notice"]


def test_java_token_count_lines_are_dropped_and_other_stderr_kept(capfd):
    """The PTB tokeniser's Java process prints a count line per scoring on our stderr; only that line is dropped."""
    import subprocess
    import sys

    from pipelines.stg_kd.metrics import java_stderr_without_counts

    script = "import sys; sys.stderr.write('PTBTokenizer tokenized 12 tokens at 153.69 tokens per second.\\nreal problem\\n')"
    with java_stderr_without_counts():
        subprocess.run([sys.executable, "-c", script], check=True)
    assert capfd.readouterr().err == "real problem\n"


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_and_resume_equal_an_uninterrupted_run(home, workers):
    """Two epochs of three steps, killed after step 2 (the checkpoint lands at the first epoch's end); the monitored
    checkpoint (val/cider) no longer leaves last.ckpt at the best epoch: the resumed and the uninterrupted run both end
    at step 6 with equal weights. The LR schedule counts the steps (common.hardware.total_steps), and the generators
    are restored after the resumed fit has made its loader's iterator (callbacks.RngState)."""
    from tests.resume_check import assert_exact_resume

    overrides = ["preset=smoke", "trainer.max_epochs=2", f"data.num_workers={workers}"]
    assert_exact_resume(home, "stg_kd", overrides, kill_at_step=2, total_steps=6)
