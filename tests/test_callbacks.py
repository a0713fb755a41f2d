"""Memory ledger, freezing, precision and DDP with the toy module (CPU)."""

import ctypes
import os
import pickle
import sys

import lightning.pytorch as pl
import pytest
import torch

from common.config import ConfigError
from common.freezing import freeze, freeze_when_built
from common.hardware import resolve_precision, skip_failing_nvml_check, trainer_kwargs
from common.memory import MemoryProfiler
from common.runner import compose, train
from tests.toy.module import ToyData, ToyModule


def _fit(cfg, callbacks=(), **trainer_kwargs):
    pl.seed_everything(cfg.seed, verbose=False)
    module, data = ToyModule(cfg), ToyData(cfg)
    freeze_when_built(module, cfg.freeze)  # as the runner does
    kwargs = dict(
        max_epochs=cfg.trainer.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module, data)
    return module, trainer


def test_interleaved_steps_gives_each_loop_its_own_clock(monkeypatch):
    """The overhead benches' clock: one hand step as each Lightning step begins, each step on its own side. A hand step
    of 30 ms against Lightning steps of 5 ms (a sleep in the toy's training step) must land on the hand side."""
    import time

    from common.callbacks import InterleavedSteps

    def hand():
        while True:
            time.sleep(0.03)
            yield

    step = ToyModule.training_step
    monkeypatch.setattr(ToyModule, "training_step", lambda self, batch, i: (time.sleep(0.005), step(self, batch, i))[1])
    cfg = compose("toy", {"trainer.max_epochs": 2, "data.batch_size": 8})  # 8 steps an epoch
    rounds = [InterleavedSteps(hand())]
    _, trainer = _fit(cfg, callbacks=rounds)
    assert len(rounds[0].hand_steps) == len(rounds[0].lightning_steps) == trainer.global_step > 1
    out = InterleavedSteps.summary(rounds)
    assert min(rounds[0].hand_steps) >= 0.03 and min(rounds[0].lightning_steps) >= 0.005
    assert out["hand_steps_per_s"] < out["lightning_steps_per_s"] and out["lightning_over_hand"] > 1
    assert out["steps"] == trainer.global_step


@pytest.mark.parametrize("optimizer, momentum, expected", [("sgd", 0.0, 8), ("sgd", 0.9, 12), ("adamw", 0.0, 16)])
@pytest.mark.parametrize("frozen", [[], ["embed"]])
def test_memory_ledger_bytes_per_trainable_parameter(optimizer, momentum, expected, frozen):
    cfg = compose("toy", {"model.optimizer": optimizer, "model.momentum": momentum, "freeze": frozen})
    profiler = MemoryProfiler()
    module, _ = _fit(cfg, [profiler], max_steps=3)
    ledger = profiler.ledger
    embed = sum(p.numel() for p in module.embed.parameters())
    total = sum(p.numel() for p in module.parameters())
    assert ledger["bytes_per_trainable_param"] == expected
    assert ledger["trainable_params"] == total - (embed if frozen else 0)
    assert ledger["frozen_params"] == (embed if frozen else 0)
    assert ledger["grad_bytes"] == 4 * ledger["trainable_params"]
    assert ledger["optimizer_state_bytes"] == (expected - 8) * ledger["trainable_params"]
    assert ledger["param_bytes"] == 4 * total
    assert "fit" in profiler.peaks and profiler.peaks["fit"]["peak_rss_mb"] > 10


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    cfg = compose("toy", {"model.optimizer": "adamw", "freeze": ["embed.weight"]})
    module, trainer = _fit(cfg, max_steps=2)
    assert module.embed.weight.grad is None and not module.embed.weight.requires_grad
    assert module.embed.bias.requires_grad and module.embed.bias.grad is not None
    state = trainer.optimizers[0].state
    assert module.embed.weight not in state and module.embed.bias in state


def test_freeze_patterns_and_errors():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    assert freeze(model, ["1.*.weight"]) == ["1.0.weight", "1.1.weight"]
    with pytest.raises(ConfigError, match="freeze pattern 'stem' matches no parameter; top-level modules: 0, 1"):
        freeze(model, ["stem"])


def test_precision_resolution(monkeypatch):
    precision, notice = resolve_precision("bf16-mixed", "cpu")
    assert precision == "32-true" and notice.startswith("precision bf16-mixed asked for on cpu: running in 32-bit")
    assert "running in 32-bit" in resolve_precision("16-mixed", "cpu")[1]
    assert resolve_precision("32", "cpu") == ("32-true", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "old GPU")
    assert resolve_precision("auto", "cuda") == ("16-mixed", None)
    precision, notice = resolve_precision("bf16-mixed", "cuda")
    assert precision == "16-mixed" and "loss scaling" in notice
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == ("bf16-mixed", None)


def test_the_runners_profiler_is_one_shared_no_op_and_survives_pickling():
    """ddp_spawn pickles the Trainer with its profiler; each hook call gets the same context, built once."""
    cfg = compose("toy", {"trainer.max_epochs": 1})
    profiler = pickle.loads(pickle.dumps(trainer_kwargs(cfg.trainer)[0]["profiler"]))
    assert profiler.profile("[LightningModule]ToyModule.training_step") is profiler.profile("run_training_epoch")
    module, _ = _fit(cfg, profiler=profiler)
    assert module.trainer.profiler is profiler and module.trainer.state.finished


@pytest.mark.parametrize(
    "loadable, before, lightning, after",
    [(False, "1", True, "0"), (True, "1", True, "1"), (False, None, True, None), (False, "1", False, "1")],
)
@pytest.mark.parametrize("hip", [None, "6.2"])
def test_the_nvml_based_cuda_check_is_dropped_only_where_nvml_cannot_load(monkeypatch, loadable, before, lightning, after, hip):
    """Lightning's NVML-based check makes every torch.cuda.is_available() (each Adam step) dlopen libnvidia-ml where no
    driver is installed, then ask the CUDA runtime anyway: there, and only there, torch asks the runtime directly; not
    before Lightning is imported (which sets the variable again)."""
    tried = []
    monkeypatch.setattr(torch.version, "hip", hip)  # a ROCm build asks AMD SMI, never NVML: nothing to drop
    if hip:
        after = before
    if not lightning:
        monkeypatch.delitem(sys.modules, "lightning.fabric")

    def cdll(name):
        tried.append(name)
        if not loadable:
            raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    if before is None:
        monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", before)
    skip_failing_nvml_check()
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == after
    assert tried == (["libnvidia-ml.so.1"] if before == "1" and lightning and not hip else [])


def test_the_runner_drops_the_failing_nvml_check(home, monkeypatch):
    """Through the runner, on this machine: Lightning's variable stays only where NVML loads (or on a ROCm build)."""
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        expected = "1"
    except OSError:
        expected = "1" if torch.version.hip else "0"
    (result,) = train("toy", ["trainer.max_epochs=1"])
    assert result.status == "FINISHED" and os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == expected


def test_ddp_two_cpu_processes_match_one_process_on_the_same_global_batch():
    # Under DDP Lightning shuffles with DistributedSampler(seed); our EpochShuffleSampler draws the same
    # permutation, so one process with batch 8 and two with batch 4 each see the same global batches.
    overrides = {"trainer.max_epochs": 2, "model.momentum": 0.9}
    single_cfg = compose("toy", {**overrides, "data.batch_size": 8, "data.shuffle": True})
    single, _ = _fit(single_cfg)
    ddp_cfg = compose("toy", {**overrides, "data.batch_size": 4, "data.shuffle": False})
    for attempt in range(3):
        # a known flake of gloo under ddp_spawn on this machine: a worker occasionally aborts at interpreter exit
        # ("terminate called without an active exception") after fit has finished; only that abort is retried
        try:
            ddp, trainer = _fit(ddp_cfg, strategy="ddp_spawn", devices=2)
            break
        except torch.multiprocessing.ProcessExitedException as err:
            if "SIGABRT" not in str(err) or attempt == 2:
                raise
    assert trainer.world_size == 2
    for (name, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    pl.seed_everything(single_cfg.seed, verbose=False)
    assert not torch.allclose(single.head.weight, ToyModule(single_cfg).head.weight)  # it did train
