"""drit: shapes through every network, the losses against hand computations (KL, latent regression, mode seeking, the
GAN and content-adversarial terms), every generator loss computed before any of their steps, the per-sample noise,
the embedded domains (layout kept, style changed), loaders on real-format fixtures, one-line bad input, DDP with manual
optimisation against one process with the doubled batch, and a smoke run of train / reproduce / bench."""

import io
import math
import re
import zipfile

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from common.config import ConfigError
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.drit.data import (
    UnpairedDataModule,
    check_data,
    draw_layouts,
    layout_iou,
    layout_mask,
    read_cifar_cat_dog,
    read_folder,
    render,
    style_domain,
)
from pipelines.drit.model import (
    DRIT,
    LossWeights,
    StepHooks,
    draw_noise,
    gan_loss,
    kl_divergence,
    latent_regression,
    linear_decay,
    mode_seeking,
    train_iteration,
)
from pipelines.drit.module import DRITModule, build_net
from tests.conftest import cifar10_jpg


def _cfg(**values):
    return compose("drit", {"preset": "smoke", **values})


def _net(width=4, nz=4, content_dis_layers=1):
    torch.manual_seed(0)
    return DRIT(3, width, 1, nz, 4, 2, 3, content_dis_layers)


# -- networks ------------------------------------------------------------------------------------------------------
def test_shapes_through_every_network_and_the_shared_layers():
    net = _net(content_dis_layers=2)
    x = torch.randn(2, 3, 32, 32)
    zc = net.enc_c(x, "x")
    assert zc.shape == (2, 16, 8, 8) and net.content_shape(32) == (16, 8, 8)
    assert net.enc_c(x, "y").shape == (2, 16, 8, 8)
    # the last content block is one module for both domains; their first layers are not
    assert net.enc_c.shared is net.enc_c.shared and net.enc_c.x[0][1].weight is not net.enc_c.y[0][1].weight
    mu, logvar = net.enc_a["x"](x)
    assert mu.shape == logvar.shape == (2, 4)
    for domain in ("x", "y"):
        assert net.gen(zc, mu, domain).shape == (2, 3, 32, 32)
    outs = net.dis["x"](x)
    assert [o.shape[-1] for o in outs] == [8, 4, 2] and all(o.shape[:2] == (2, 1) for o in outs)  # 3 scales
    assert net.dis_c(zc).shape == (2,)
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.dis.modules())  # no norm in image discriminators
    noise = {
        k: torch.zeros(2, *((16, 8, 8) if k.startswith("c_") else (4,)))
        for k in ("c_x", "c_y", "c_u", "c_v", "e_x", "e_y", "e_u", "e_v", "z", "z2")
    }
    t = net(x, x.flip(0), noise, mode_seeking=True)
    for key in ("u", "v", "x_self", "y_self", "x_rand", "y_rand", "x_rand2", "y_rand2", "x_cycle", "y_cycle"):
        assert t[key].shape == (2, 3, 32, 32), key
    assert "x_rand2" not in net(x, x, noise, mode_seeking=False)
    assert net.gen(zc, mu, "x").abs().max() <= 1  # tanh output


# -- losses against hand computations --------------------------------------------------------------------------------
def test_kl_latent_regression_and_mode_seeking_match_hand_computations():
    mu = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    per_sample = [-0.5 * sum(1 + lv - m**2 - math.exp(lv) for m, lv in zip(mr, lr)) for mr, lr in zip(mu.tolist(), logvar.tolist())]
    assert float(kl_divergence(mu, logvar)) == pytest.approx(sum(per_sample) / 2, rel=1e-6)  # summed over the code, mean over samples
    assert float(kl_divergence(torch.zeros(3, 8), torch.zeros(3, 8))) == 0  # the prior itself
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert float(latent_regression(mu, z)) == pytest.approx((0.5 + 1 + 0 + 2) / 4)
    out1 = torch.zeros(2, 1, 2, 2)
    out2 = torch.tensor([0.4, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).view(2, 1, 2, 2)
    z1, z2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    # sample 0: mean|Δout| = 0.1, mean|Δz| = 1 → 1/(0.1 + 1e-5); sample 1: 1 / 1 → 1/(1 + 1e-5)
    assert float(mode_seeking(out1, out2, z1, z2)) == pytest.approx((1 / (0.1 + 1e-5) + 1 / (1 + 1e-5)) / 2, rel=1e-6)


def test_gan_loss_sums_scales_and_content_adversarial_target_is_one_half():
    logits = [torch.zeros(2, 1, 4, 4), torch.full((2, 1, 2, 2), 2.0)]
    hand = math.log(2) + -math.log(1 / (1 + math.exp(-2)))
    assert float(gan_loss(logits, 1.0)) == pytest.approx(hand, rel=1e-6)
    # BCE(σ(l), 0.5) is minimal (log 2) at l = 0: the encoders want D_c undecided
    assert float(gan_loss(torch.zeros(3), 0.5)) == pytest.approx(math.log(2))
    assert float(gan_loss(torch.full((3,), 1.5), 0.5)) > math.log(2) + 0.1


def test_total_generator_loss_uses_the_notes_weights():
    net = _net()
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    noise = draw_noise(torch.arange(2), 0, 0, net.content_shape(16), 4, 1.0)
    t = net(x, y, noise, True)
    eg, alone = net.generator_losses(t, x, y, LossWeights())
    assert set(eg) == {"gan", "cross_cycle", "self_rec", "kl", "content_l2", "content_adv"}
    assert set(alone) == {"latent", "gan_random", "mode_seeking"}
    hand_cc = 10 * (float((t["x_cycle"] - x).abs().mean()) + float((t["y_cycle"] - y).abs().mean()))
    assert float(eg["cross_cycle"]) == pytest.approx(hand_cc, rel=1e-5)
    hand_kl = 0.01 * (float(kl_divergence(t["mu_x"], t["logvar_x"])) + float(kl_divergence(t["mu_y"], t["logvar_y"])))
    assert float(eg["kl"]) == pytest.approx(hand_kl, rel=1e-5)
    eg0, alone0 = net.generator_losses(t, x, y, LossWeights(content_adv=0.0, mode_seeking=0.0))
    assert "content_adv" not in eg0 and "mode_seeking" not in alone0 and float(alone0["gan_random"]) < float(alone["gan_random"])


def test_noise_follows_the_sample_not_its_position_and_lr_decay_is_linear():
    a = draw_noise(torch.tensor([5, 9]), 1, 3, (2, 2, 2), 4, 1.0)
    b = draw_noise(torch.tensor([9, 7, 5]), 1, 3, (2, 2, 2), 4, 1.0)
    for key in a:
        assert torch.equal(a[key][0], b[key][2]) and torch.equal(a[key][1], b[key][0])
    assert not torch.equal(draw_noise(torch.tensor([5]), 1, 4, (2, 2, 2), 4, 1.0)["z"][0], a["z"][0])  # a new draw each iteration
    assert [linear_decay(e, 10, 5) for e in (0, 5, 6, 10)] == [1.0, 1.0, pytest.approx(1 - 1 / 6), pytest.approx(1 - 5 / 6)]
    assert linear_decay(99, 10, -1) == 1.0


# -- the update protocol --------------------------------------------------------------------------------------------
def test_generator_losses_are_all_computed_before_any_of_their_steps_on_current_pytorch():
    net = _net()
    opts = {
        "content_d": torch.optim.Adam(net.dis_c.parameters(), 1e-3),
        "d": torch.optim.Adam(net.discriminator_parameters(), 1e-3),
        "eg": torch.optim.Adam(net.encoder_generator_parameters(), 1e-3),
    }
    trace, before = [], {k: v.clone() for k, v in net.enc_a.state_dict().items()}
    hooks = StepHooks(
        backward=lambda loss, inputs, retain_graph=False: loss.backward(inputs=inputs, retain_graph=retain_graph),
        zero_grad=lambda n: opts[n].zero_grad(),
        step=lambda n: opts[n].step(),
        clip=lambda n, m: torch.nn.utils.clip_grad_norm_(net.dis_c.parameters(), m),
        trace=trace,
    )
    batch = (torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1, torch.arange(4))
    for it in range(6):
        train_iteration(net, batch, it, 0, LossWeights(), 3, 1.0, 5.0, hooks)
    # iterations 0, 1, 3, 4: D_c alone; 2 and 5: discriminators, D_c, then every E/G loss, then one E/G step
    full = (
        ["loss:d", "step:d", "loss:content_d", "step:content_d"]
        + [
            f"loss:{n}"
            for n in ("gan", "cross_cycle", "self_rec", "kl", "content_l2", "content_adv", "latent", "gan_random", "mode_seeking")
        ]
        + ["step:eg"]
    )
    alone = ["loss:content_d", "step:content_d"]
    assert trace == alone * 2 + full + alone * 2 + full
    assert any(not torch.equal(before[k], v) for k, v in net.enc_a.state_dict().items())  # E_a did move


# -- data -----------------------------------------------------------------------------------------------------------
def test_embedded_domains_share_layout_and_differ_in_style():
    g = torch.Generator().manual_seed(0)
    layouts = draw_layouts(16, 32, g)
    as_x = torch.from_numpy(render(layouts, "x", g).numpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    as_y = torch.from_numpy(render(layouts, "y", g).numpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    # a correct translation (same layout, the other style): the layout is recovered from either rendering ...
    assert layout_iou(layout_mask(as_x), layouts).min() > 0.9 and layout_iou(layout_mask(as_y), layouts).min() > 0.9
    # ... and the style tells the domains apart
    assert style_domain(as_x).tolist() == [0] * 16 and style_domain(as_y).tolist() == [1] * 16
    other = draw_layouts(16, 32, g)
    assert layout_iou(layout_mask(as_y), other).mean() < 0.4  # a translation that lost the layout scores low
    assert layout_iou(layout_mask(torch.zeros_like(as_y)), layouts).mean() < 0.05  # a blank output keeps nothing


def _png(path, channels, size=12, value=100):
    mode = {1: "L", 3: "RGB"}[channels]
    Image.new(mode, (size, size), value if channels == 1 else (value, 50, 20)).save(path)


def test_folder_layout_loader_and_its_one_line_errors(tmp_path):
    for name in ("trainA", "trainB", "testA", "testB"):
        (tmp_path / name).mkdir()
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", 3)
    arrays, channels = read_folder(tmp_path, 8)
    assert channels == 3 and arrays["trainA"].shape == (2, 8, 8, 3) and arrays["trainA"][0, 0, 0].tolist() == [100, 50, 20]
    _png(tmp_path / "trainB" / "gray.png", 1)
    with pytest.raises(ConfigError, match=r"^images of different channel counts: .*gray.png has 1, .*\.png has 3; convert"):
        read_folder(tmp_path, 8)
    (tmp_path / "trainB" / "gray.png").unlink()
    (tmp_path / "trainA" / "loop.png").symlink_to("loop.png")  # read_bytes raised OSError: too many levels of links
    with pytest.raises(ConfigError, match=r"trainA/loop.png is a broken or looping symbolic link, not an image file; remove it"):
        read_folder(tmp_path, 8)
    (tmp_path / "trainA" / "loop.png").unlink()
    (tmp_path / "trainB" / "folder.png").mkdir()  # IsADirectoryError, outside the decode's try
    with pytest.raises(ConfigError, match=r"trainB/folder.png is a folder, not an image file; remove it"):
        read_folder(tmp_path, 8)
    (tmp_path / "trainB" / "folder.png").rmdir()
    from pipelines.drit.module import DRITModule

    folder = {"preset": "smoke", "data.name": "folder", "data.root": str(tmp_path)}  # 2 images a domain, batch 4 at smoke
    with pytest.raises(ConfigError, match=r"trainA and trainB hold 2 and 2 images .* below data.batch_size=4: not one full batch"):
        DRITModule.check_config(compose("drit", folder))  # was: the run opened, then "the training set gives no batch"
    (tmp_path / "testA" / "1.png").unlink()
    with pytest.raises(ConfigError, match=r"testA and testB hold 1 and 2 images .*; FID and KID need at least 2 test images"):
        DRITModule.check_config(compose("drit", {**folder, "data.batch_size": 2}))  # was: FID's error after training
    _png(tmp_path / "testA" / "1.png", 3)
    DRITModule.check_config(compose("drit", {**folder, "data.batch_size": 2}))
    for p in (tmp_path / "testB").iterdir():
        p.unlink()
    (tmp_path / "testB").rmdir()
    with pytest.raises(ConfigError, match=r"lacks testB; expected layout: <root>/trainA, <root>/trainB, <root>/testA, <root>/testB"):
        read_folder(tmp_path, 8)
    with pytest.raises(ConfigError, match="does not exist; expected layout"):
        read_folder(tmp_path / "nowhere", 8)
    with pytest.raises(ConfigError, match=r"lacks testB; expected layout"):  # before a run opens: the pipeline's check
        DRITModule.check_config(compose("drit", {"data.name": "folder", "data.root": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"^config key 'optim.betas' must be a list of 2 values, got \[0.5\]$"):
        compose("drit", {"optim.betas": [0.5]})
    with pytest.raises(ConfigError, match=r"^data.n_train=3 is below data.batch_size=4: not one full batch to train on$"):
        DRITModule.check_config(compose("drit", {"preset": "smoke", "data.n_train": 3}))
    for values, message in (
        ({"model.dis_layers": 10}, "model.dis_layers=10 with model.dis_scales=3 halves the crop (32 px) below the discriminator's kernel"),
        ({"trainer.gradient_clip_val": 1.0}, "trainer.gradient_clip_val does not apply to drit's hand-stepped GAN updates"),
        ({"trainer.accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches does not apply"),
        (
            {"optim.decay_start_epoch": 5},
            "optim.decay_start_epoch=5 needs trainer.max_epochs above it (the lr decays from it to the last epoch), got 5",
        ),  # (no decay, silently)
        ({"optim.decay_start_epoch": 2, "trainer.max_epochs": -1}, "optim.decay_start_epoch=2 needs trainer.max_epochs above it"),
    ):  # each was Lightning's or torch's error after the run had opened
        with pytest.raises(ConfigError, match=re.escape(message)):
            DRITModule.check_config(compose("drit", values))


def test_the_classifier_cache_key_follows_the_images_not_the_folder_name(tmp_path):
    """The domain classifier is cached by the data's identity: new images at the same path give a new key."""
    for name in ("trainA", "trainB", "testA", "testB"):
        (tmp_path / name).mkdir()
        for i in range(2):  # (a batch of 2, and FID's 2 test images a domain)
            _png(tmp_path / name / f"{i}.png", 3, value=100 if name.endswith("A") else 200)
    values = {"data.name": "folder", "data.root": str(tmp_path), "data.load_size": 12, "data.crop_size": 12, "data.batch_size": 2}
    cfg = compose("drit", values)
    before = UnpairedDataModule(cfg).identity()
    assert before == UnpairedDataModule(cfg).identity()  # the same files: the same key
    _png(tmp_path / "trainA" / "0.png", 3, value=200)  # the folder edited in place (A and B now alike)
    assert UnpairedDataModule(cfg).identity()["content"] != before["content"]


def test_cifar_cat_dog_from_zips(tmp_path):
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as archive:
            for cls, value in (("cat", 10), ("dog", 200), ("airplane", 90)):
                for i in range(3):
                    buffer = io.BytesIO()
                    Image.new("RGB", (32, 32), (value, value, value)).save(buffer, format="PNG")
                    archive.writestr(f"{split}/{cls}/{i:04d}.png", buffer.getvalue())
    arrays, channels = read_cifar_cat_dog(tmp_path, 32, limit=2)
    assert channels == 3 and arrays["trainA"].shape == (2, 32, 32, 3) and arrays["testB"].shape == (2, 32, 32, 3)
    assert int(arrays["trainA"].mean()) == 10 and int(arrays["trainB"].mean()) == 200  # A = cat, B = dog, airplanes left out
    # only cat and dog are read: other classes may differ between the splits (the shared classifier check refused
    # that), and a split without cats is one line before a run opens (it was found in setup)
    with zipfile.ZipFile(tmp_path / "test.zip", "w") as archive:
        for cls in ("dog", "cat"):
            archive.writestr(f"test/{cls}/0000.png", buffer.getvalue())
    assert read_cifar_cat_dog(tmp_path, 32)[0]["testA"].shape == (1, 32, 32, 3)
    with zipfile.ZipFile(tmp_path / "test.zip", "w") as archive:
        archive.writestr("test/dog/0000.png", buffer.getvalue())
    with pytest.raises(ConfigError, match=r"no cat images under .*test.zip/test/"):
        check_data(_cfg(**{"data.name": "cifar_cat_dog", "data.root": str(tmp_path)}).data)


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError) as err:  # the command line prints this as `lightyard: error: …` (tests/test_cli.py)
        compose("drit", {"data.batch_size": 1})
    assert str(err.value) == "config key 'data.batch_size' must be >= 2, got 1"
    for values, message in (
        ({"data.batch_size": 3}, "data.batch_size must be even and >= 2"),
        ({"data.name": "folder"}, "data.name=folder needs data.root=<folder>; expected layout: <root>/trainA"),
        ({"data.name": "horses"}, "unknown data.name 'horses'; valid: generated, folder, cifar_cat_dog"),
        ({"data.crop_size": 14}, r"data.crop_size must be a multiple of 4 \(the content code is H/4 × W/4\), got 14"),
        ({"model.content_dis_layers": 2}, "model.content_dis_layers=2 halves the 4×4 content code to 1×1"),
        ({"data.crop_size": 12}, "data.crop_size=12 is too small for any content discriminator: use at least 16"),  # (said: at most 0)
    ):
        with pytest.raises(ConfigError, match=message):
            DRITModule.check_config(_cfg(**values))


# -- DDP with manual optimisation --------------------------------------------------------------------------------------
def _fit(cfg, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    module = DRITModule(cfg)
    module.channels, module.net = 3, build_net(cfg, 3)  # built before fit: ddp_spawn copies the weights back into it
    data = UnpairedDataModule(cfg)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


@pytest.mark.slow  # ~10 s alone (two spawned processes importing torch + Lightning), ~20 s on a loaded machine
def test_ddp_two_cpu_processes_match_one_process_with_the_doubled_batch():
    # Adam's first steps are lr·sign(g) where |g| ≪ ε: a larger ε keeps float-rounding noise in near-zero gradients from
    # flipping signs, while a wrong average (a sum, one rank's gradient) still changes the weights by ~lr
    values = {"data.n_train": 24, "test_after_fit": False, "optim.eps": 1e-3}
    # one process shuffles with EpochShuffleSampler(seed), the DistributedSampler of two the same permutation, rank r
    # taking every second index: the first halves of the two ranks' batches are the first half of the doubled batch
    single, _ = _fit(_cfg(**values, **{"data.batch_size": 8}), devices=1)
    for attempt in range(3):  # gloo under ddp_spawn occasionally aborts at interpreter exit (see tests/test_callbacks.py)
        try:
            ddp, trainer = _fit(_cfg(**values, **{"data.batch_size": 4, "data.shuffle": False}), devices=2, strategy="ddp_spawn")
            break
        except torch.multiprocessing.ProcessExitedException as err:
            if "SIGABRT" not in str(err) or attempt == 2:
                raise
    assert trainer.world_size == 2
    a, b = single.net.state_dict(), ddp.net.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-6), name
    pl.seed_everything(0, verbose=False)
    fresh = build_net(_cfg(), 3)
    assert not torch.allclose(fresh.gen.x[3][0].weight, single.net.gen.x[3][0].weight)  # the generators did train
    assert not torch.allclose(fresh.dis_c.net[0].weight, single.net.dis_c.net[0].weight)


# -- smoke runs through the command line's path -------------------------------------------------------------------------
def test_train_smoke_logs_metrics_grids_and_caches_the_classifier(home):
    (run,) = train("drit", ["preset=smoke"])
    assert {"test/diversity", "test/fid", "test/kid", "test/domain_acc", "test/layout_iou"} <= set(run.metrics)
    client = MlflowClient(tracking_uri=tracking_uri(run.config))
    assert {"train/eg", "train/d", "train/content_d", "train/mode_seeking"} <= set(client.get_run(run.run_id).data.metrics)
    assert {"samples_a2b.png", "samples_b2a.png"} <= {a.path for a in client.list_artifacts(run.run_id)}
    cached = list((home / "cache" / "drit").glob("classifier-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    # freeze=[…] of a whole optimiser group (D_c) and of part of one (G in E+G): no gradient, no Adam state for them
    (frozen,) = train("drit", ["preset=smoke", "seed=1", "loss.mode_seeking=0", "freeze=[net.gen,net.dis_c]"])
    assert [p.stat().st_mtime_ns for p in (home / "cache" / "drit").glob("classifier-*.pt")] == [stamp]  # read, not rebuilt
    names = [n for n, _ in DRITModule.skeleton(compose("drit", {"preset": "smoke"})).named_parameters()]
    ckpt = torch.load(home / "outputs" / "drit" / frozen.run_id / "checkpoints" / "last.ckpt", weights_only=True)
    # the optimisers' parameter order is the model's (D_c; D; E_c, E_a, G): Adam's state names the indices it holds
    groups = [
        [n for n in names if n.startswith(prefixes)] for prefixes in ("net.dis_c.", "net.dis.", ("net.enc_c.", "net.enc_a.", "net.gen."))
    ]
    held = [sorted(names_[i] for i in opt["state"]) for names_, opt in zip(groups, ckpt["optimizer_states"])]
    assert held == [[], sorted(groups[1]), sorted(n for n in groups[2] if not n.startswith("net.gen."))]


def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("drit")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def test_reproduce_and_bench_smoke(home):
    result = run_experiment("reproduce", "drit", ["preset=smoke"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    methods = sorted((c["loss.mode_seeking"], c["model.content_discriminator"]) for c in _children(result))
    assert methods == [(0.0, False), (0.0, True), (1.0, False), (1.0, True)]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    assert [r[:2] for r in rows if r[0] in ("DRIT", "DRIT++")] == [["DRIT", "on"], ["DRIT", "off"], ["DRIT++", "on"], ["DRIT++", "off"]]
    assert any(r[0] == "paper DRIT++ / on" for r in rows)
    bench = run_experiment("bench", "drit", ["preset=smoke"])
    assert (bench.status, bench.total) == ("FINISHED", 1), bench.report
    (child,) = _children(bench)
    assert child["lightning_over_loop"] == pytest.approx(child["lightning_it_per_s"] / child["loop_it_per_s"])
    assert np.isfinite(child["lightning_it_per_s"]) and child["torch_threads"] == 1


def test_reproduce_smoke_of_the_cifar_cat_dog_experiment_on_jpeg_zips(home, tmp_path):
    """experiment=cifar_cat_dog on a tiny copy of ../shared/data/cifar10_jpg; its loader: test_cifar_cat_dog_from_zips."""
    root = cifar10_jpg(tmp_path, per_class=(8, 4))  # 8 cats and 8 dogs to train on (2 batches), 4 of each to test
    overrides = [f"cifar_root={root}", "metrics.classifier.epochs=1", "trainer.max_epochs=1"]  # the set's 20 and 4
    result = run_experiment("reproduce", "drit", ["preset=smoke", "experiment=cifar_cat_dog", *overrides])
    assert (result.status, result.finished, result.total) == ("FINISHED", 4, 4), result.report
    children = _children(result)
    methods = sorted((c["loss.mode_seeking"], c["model.content_discriminator"]) for c in children)
    assert methods == [(0.0, False), (0.0, True), (1.0, False), (1.0, True)]
    client = MlflowClient(tracking_uri=tracking_uri(compose("drit")))
    for child in children:  # each translated the fixture's cats and dogs, not the generated domains
        params = client.get_run(child["_run_id"]).data.params
        assert (params["data.name"], params["data.root"]) == ("cifar_cat_dog", str(root))
        assert all(math.isfinite(child[f"test/{m}"]) for m in ("diversity", "fid", "kid", "domain_acc"))
        assert "test/layout_iou" not in child  # real photos have no known layout to keep
    assert len(list((home / "cache" / "drit").glob("classifier-*.pt"))) == 1  # one domain classifier for the four children
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.report.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[:2] == ["DRIT++", "on"]]
    child = next(c for c in children if c["loss.mode_seeking"] == 1.0 and c["model.content_discriminator"])
    assert row[2] == f"{child['test/diversity']:.3f}" and row[-1] == "1"


@pytest.mark.slow  # ~30 s (the kill, the resume and the reference run); tests/test_faults.py checks the keyed items in the suite
@pytest.mark.parametrize("workers,kill_at", [(0, 3), (2, 3), (2, 2)])
def test_sigterm_and_resume_equal_an_uninterrupted_run(home, workers, kill_at):
    """Killed after batch 3 of 6 (the first epoch's last; the checkpoint lands after batch 4, mid-epoch 2), or after
    batch 2 (the checkpoint lands at the first epoch's end): the resumed weights equal an uninterrupted run's, with and
    without loader workers. Before the items were keyed (epoch, i), a run resumed mid-epoch cropped with epoch 0's draws
    (Lightning skips on_train_epoch_start then) and ended 2e-4 off; with workers, a loader built for the resumed fit
    started on the saved epoch, not the next (workers draw the order at once, before Lightning sets the epoch)."""
    from tests.resume_check import assert_exact_resume

    # manual optimisation: global_step counts each optimiser's steps (content D, D, then E/G every d_iter-th batch)
    overrides = ["preset=smoke", "trainer.max_epochs=2", f"data.num_workers={workers}"]
    assert_exact_resume(home, "drit", overrides, kill_at_step=kill_at, total_steps=10)
