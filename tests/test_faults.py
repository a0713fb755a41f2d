"""Kill with SIGTERM mid-epoch, resume, and compare with an uninterrupted run; crashes end FAILED."""

import re
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from common.cli import run_rows
from common.config import ConfigError
from common.runner import train
from common.tracking import tracking_uri
from common.runner import compose
from tests.conftest import cli, lightyard


def _last_weights(home, run_id):
    ckpt = home / "outputs" / "toy" / run_id / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, weights_only=True)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(home):
    """With an LR schedule over trainer.estimated_stepping_batches (as setr, livt, stg_kd, vocab_kd): counting them built
    the training loader before the restore, and Lightning never loaded the saved position into it, so the resumed run
    started its epoch again (common.hardware.total_steps drops that loader)."""
    env = {"LIGHTYARD_HOME": str(home)}
    # 8 batches per epoch; the signal arrives after step 10, i.e. in the middle of epoch 2 of 3
    killed = lightyard("train", "toy", "trainer.max_epochs=3", "model.decay=true", "kill_at_step=10", env=env)
    assert killed.returncode == 143, killed.stderr[-2000:]
    last_line = killed.stderr.strip().splitlines()[-1]
    assert "MLflow run marked KILLED" in last_line

    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    (run,) = client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id])
    assert run.info.status == "KILLED"
    assert last_line.endswith(f"continue with: lightyard train toy resume={run.info.run_id})")
    assert (home / "outputs" / "toy" / run.info.run_id / "checkpoints" / "interrupted.ckpt").is_file()

    client.log_metric(run.info.run_id, "duration_s", 1000.0)  # as if the first segment had worked 1000 s
    started = time.time()
    resumed = cli("train", "toy", f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"  # the resumed training logged into the same run
    # duration_s sums the segments (it was the last one's); `runs` shows it, not the time between start and end
    assert 1000 < run.data.metrics["duration_s"] < 1000 + time.time() - started
    (row,) = [r for r in run_rows(tracking_uri(compose("toy"))) if r["run_id"] == run.info.run_id]
    assert row["duration_s"] == round(run.data.metrics["duration_s"], 1)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")]
    assert max(steps) > 10  # metrics after the resume point landed in that run

    (reference,) = train("toy", ["trainer.max_epochs=3", "model.decay=true"])
    resumed_ckpt, reference_ckpt = _last_weights(home, run.info.run_id), _last_weights(home, reference.run_id)
    assert resumed_ckpt["global_step"] == reference_ckpt["global_step"] == 24
    for name, value in reference_ckpt["state_dict"].items():
        assert torch.equal(resumed_ckpt["state_dict"][name], value), name


def test_a_stop_after_the_last_step_resumes_to_the_stored_key_metrics(home):
    """A signal after the last step's hooks: the fit ran to its end and the run is KILLED (said "checkpoint: None");
    its resume trains and validates nothing, and keeps the stored key metrics (its fit has none)."""
    env = {"LIGHTYARD_HOME": str(home)}
    killed = lightyard("train", "toy", "trainer.max_epochs=3", "kill_at_step=24", env=env)  # 3 epochs of 8 batches
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "lightyard: stopped by signal 15; after the fit's last training step (MLflow run marked KILLED" in killed.stderr
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    (run,) = client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id])
    (resumed,) = train("toy", [f"resume={run.info.run_id}"])
    assert resumed.status == "FINISHED" and resumed.metrics["val_acc"] == run.data.metrics["val_acc"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [7, 15, 23]  # none validated again


def test_a_resume_that_would_end_before_its_checkpoint_is_one_line(tmp_path):
    """(a review's fuzz: Lightning refused after the run had reopened, marked it FAILED, and the lowered value, saved
    with the run, refused every later resume too)"""
    from common.runner import _check_progress

    torch.save({"epoch": 68, "global_step": 680}, tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as err:
        _check_progress(compose("toy", {"trainer.max_epochs": 60}), str(tmp_path / "last.ckpt"))
    assert (
        str(err.value) == "trainer.max_epochs=60 is before the checkpoint's epoch 68; give at least 68 (or leave it out to keep the run's)"
    )
    for fine in (68, 100, -1):
        _check_progress(compose("toy", {"trainer.max_epochs": fine}), str(tmp_path / "last.ckpt"))


def test_a_new_run_from_a_finished_checkpoint_or_another_pipelines_is_refused(home):
    """(the fuzz: both trained nothing and ended FINISHED — the first with no metric, the second as the other pipeline)"""
    (done,) = train("toy", ["trainer.max_epochs=2"])
    ckpt = Path(done.config.paths.output_dir) / "toy" / done.run_id / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"has trained all 2 epochs of trainer.max_epochs=2: nothing is left to train"):
        train("toy", [f"resume={ckpt}"])
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(ckpt))} is a checkpoint of toy .*, not of hog_gcn; resume it with: lightyard train toy"
    ):
        train("hog_gcn", [f"resume={ckpt}"])
    (more,) = train("toy", [f"resume={ckpt}", "trainer.max_epochs=3"])
    assert more.status == "FINISHED" and more.run_id != done.run_id
    with pytest.raises(ConfigError, match=r"^experiment=nope picks a grid of `lightyard reproduce\|bench toy`; `train` runs one config"):
        train("toy", ["experiment=nope"])  # (ran, and FINISHED, ignoring it)
    first, _ = train("toy", ["seed=0,1", "trainer.max_epochs=1"])
    parent = MlflowClient(tracking_uri=tracking_uri(compose("toy"))).get_run(first.run_id).data.tags["mlflow.parentRunId"]
    with pytest.raises(ConfigError, match=f"^sweep {parent} is FINISHED; nothing to resume"):
        train("toy", [f"resume={parent}"])


def test_crash_ends_failed_with_the_error_logged(home):
    with pytest.raises(RuntimeError, match="toy crash"):
        train("toy", ["crash_at_step=3"])
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    (run,) = client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id])
    assert run.info.status == "FAILED"
    assert "toy crash" in run.data.tags["error"]
    assert "traceback.txt" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.metrics["duration_s"] > 0  # a FAILED segment counts in a resumed run's time


def test_a_diverged_loss_or_no_training_batch_ends_failed_not_finished(home):
    """lr=1e12 trained to a nan loss and no batch at all (batch larger than the set) trained nothing; both FINISHED with
    test metrics of a broken model."""
    from common.callbacks import TrainingDiverged

    with pytest.raises(
        TrainingDiverged, match=r"^training diverged: the loss is (nan|inf) at step \d+ \(epoch 0\); lower the learning rate"
    ):
        train("toy", ["model.lr=1e30", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    with pytest.raises(ConfigError, match=r"^the training set gives no batch .*nothing was trained; lower the batch size"):
        train("toy", ["data.n=0", "trainer.max_epochs=1"])
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    runs = client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]


def test_resume_with_unknown_run_id_is_one_clear_line(home, capsys):
    from common.cli import main

    assert main(["train", "toy", "resume=0123abc"]) == 2  # in this process: the subprocess cost 11 s of start-up
    err = capsys.readouterr().err
    assert "neither a .ckpt file nor a run id" in err and "Traceback" not in err


# one batch per epoch (64) and two (32): the kill lands on an epoch's last batch
@pytest.mark.parametrize("batch_size", [64, pytest.param(32, marks=pytest.mark.slow)])
def test_resume_is_exact_when_the_interrupt_lands_on_an_epochs_last_batch(home, batch_size):
    from tests.resume_check import assert_exact_resume

    assert_exact_resume(
        home,
        "toy",
        ["trainer.max_epochs=6", f"data.batch_size={batch_size}", "model.dropout=0.3"],
        kill_at_step=3,
        total_steps=6 * (64 // batch_size),
    )


def test_resume_of_a_finished_run_or_another_pipelines_run_is_refused(home):
    (done,) = train("toy", ["trainer.max_epochs=1"])
    for given in (done.run_id, done.run_id[:8]):  # a unique prefix, as report and grid resumes take
        out = cli("train", "toy", f"resume={given}")
        assert out.returncode == 2 and f"run {done.run_id} is FINISHED; nothing to resume" in out.stderr
    out = cli("train", "hog_gcn", f"resume={done.run_id}")
    # (its hint once named `lightyard train toy resume=…`, refused in turn: a FINISHED run has nothing to resume)
    assert out.returncode == 2 and f"run {done.run_id} is a run of toy, not of hog_gcn; it is FINISHED: nothing to resume" in out.stderr
    assert "Traceback" not in out.stderr
    (simulated,) = train("iiot_sic_aloha", ["preset=smoke"])
    MlflowClient(tracking_uri=tracking_uri(compose("toy"))).set_terminated(simulated.run_id, "KILLED")
    with pytest.raises(ConfigError, match=r"is a run of iiot_sic_aloha, not of toy; and iiot_sic_aloha keeps no checkpoint: rerun it"):
        train("toy", [f"resume={simulated.run_id}"])
    # a stopped gradient run of another pipeline with no checkpoint: its own pipeline's refusal, not a resume= hint
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    bare = client.create_run(client.get_run(done.run_id).info.experiment_id, tags={"lightyard.pipeline": "hog_gcn"}).info.run_id
    client.set_terminated(bare, "KILLED")
    with pytest.raises(ConfigError, match=rf"^run {bare} is a run of hog_gcn, not of toy; nor can hog_gcn resume it: "):
        train("toy", [f"resume={bare}"])
    # another pipeline's reproduce parent: the hint names the command that continues it (train's was refused in turn)
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    parent = client.create_run(
        client.get_run(done.run_id).info.experiment_id,
        tags={"lightyard.pipeline": "toy", "lightyard.kind": "reproduce"},
    )
    client.set_terminated(parent.info.run_id, "KILLED")
    out = cli("train", "hog_gcn", f"resume={parent.info.run_id}")
    assert out.returncode == 2 and f"resume it with: lightyard reproduce toy resume={parent.info.run_id}" in out.stderr


def test_a_resumed_run_refuses_settings_its_checkpoint_would_override(tmp_path):
    """Lightning restores the optimizer (and its lr) from the checkpoint: a new model.lr would be recorded, not used."""
    from omegaconf import OmegaConf

    from common.config import ConfigError
    from common.runner import _saved_config

    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(compose("toy")))
    with pytest.raises(ConfigError, match=r"^a resumed run keeps its settings \(the checkpoint restores them\): model.lr cannot change"):
        _saved_config(saved, {"resume": "x", "model.lr": 0.5})
    assert _saved_config(saved, {"resume": "x", "trainer.max_epochs": 9, "launcher.workers": 2}).trainer.max_epochs == 9


def test_a_sigterm_while_a_run_opens_is_held_then_ends_it_killed():
    """Between MLflow creating the run and the handler that ends it KILLED, a SIGTERM used to kill the process outright
    (the run stayed RUNNING): it is now held and raised once the run exists."""
    import os
    import signal

    from common.runner import _RECEIVED, RunInterrupted, held_signals, stop_on_signals

    _RECEIVED.clear()
    before = signal.getsignal(signal.SIGTERM)
    with held_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread: remembered, not fatal
    assert _RECEIVED == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RunInterrupted, match="stopped by signal 15"):
        with stop_on_signals():
            pass
    assert signal.getsignal(signal.SIGTERM) is before
    _RECEIVED.clear()


class _Draws(torch.utils.data.Dataset):
    """An item made of draws from the global generators, as timm's augmentations make them."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([i, torch.rand(()).item(), random.random(), np.random.rand()], dtype=torch.float64)


def _epoch(loader, epoch, skip_batches=0):
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    return torch.cat(batches[skip_batches:])


def test_a_sigterm_before_any_run_opens_is_one_line(monkeypatch):
    """While the command imports or composes (no run open yet) a SIGTERM killed it without a word (exit 143)."""
    import os
    import signal

    from common import cli as command_line
    from tests.conftest import cli

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(command_line, "_cmd_list", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    out = cli("list")
    assert out.returncode == 143 and out.stderr.strip() == "lightyard: stopped by signal 15 (no run was open: rerun it)"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("workers", [0, 2])
def test_seeded_items_follow_epoch_and_index_not_the_draws_before_them(workers):
    """Augmentation draws of an item are a function of (seed, epoch, index): the same with loader workers (persistent,
    so they never see a dataset attribute set after they started), after unrelated draws from the global generators (a
    prefetched batch's), and after a mid-epoch resume of the loader; they change with the epoch."""
    import random

    import numpy as np

    from common.data import SeededItems, make_loader

    def loader(seed=0):
        return make_loader(SeededItems(_Draws(), seed), 2, shuffle=True, seed=seed, num_workers=workers, item_epochs=True)

    reference = make_loader(SeededItems(_Draws(), 0), 2, shuffle=True, item_epochs=True)  # in this process
    python, numpy = random.getstate(), np.random.get_state()[1].copy()
    first, second = _epoch(reference, 0), _epoch(reference, 1)
    # the loader fetches a batch's keys at once (one fork of the streams): the same items as one key at a time
    keys = [(1, int(i)) for i in second[:, 0]]
    assert torch.equal(torch.stack([reference.dataset[key] for key in keys]), second)
    # the run's streams untouched (torch's moves by the loader iterator's one base-seed draw, as with any dataset)
    assert random.getstate() == python and (np.random.get_state()[1] == numpy).all()
    torch.rand(5), random.random()
    again = loader()
    assert torch.equal(_epoch(again, 0), first) and torch.equal(_epoch(again, 1), second)
    # same items, new draws each epoch and for another seed
    assert sorted(first[:, 0].tolist()) == sorted(second[:, 0].tolist()) == list(range(6))
    by_index = lambda x: x[x[:, 0].argsort()]  # noqa: E731
    assert not torch.equal(by_index(first)[:, 1:], by_index(second)[:, 1:])
    assert not torch.equal(by_index(_epoch(loader(seed=1), 0))[:, 1:], by_index(first)[:, 1:])
    # stopped after one batch of epoch 1, the loader's state restored into a new loader: the rest of epoch 1 as before
    stopped = loader()
    _epoch(stopped, 0)
    stopped.sampler.set_epoch(1)
    iterator = iter(stopped)
    next(iterator)
    saved = stopped.state_dict()
    resumed = loader()
    resumed.load_state_dict(saved)
    assert torch.equal(torch.cat(list(resumed)), second[2:])


def test_a_stopped_sweep_continues_from_its_parent(home):
    """(the fuzz: Ctrl+C in a sweep named only the running child; its other points were lost and resume=<parent> said
    the parent left no checkpoint) The hint names the parent; resume=<parent> keeps FINISHED points, resumes the
    KILLED child and runs the rest."""
    env = {"LIGHTYARD_HOME": str(home)}
    killed = lightyard("train", "toy", "seed=0,1,2", "trainer.max_epochs=2", "kill_at_step=3", env=env)
    assert killed.returncode == 143, killed.stderr[-2000:]
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    runs = client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id])
    (parent,) = [r for r in runs if "lightyard.sweep" in r.data.tags]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (parent.info.status, child.info.status) == ("KILLED", "KILLED")
    assert killed.stderr.strip().endswith(f"continue with: lightyard train toy resume={parent.info.run_id})")
    with pytest.raises(ConfigError, match=r"^a resumed sweep keeps its preset \(quick\); leave preset= out$"):
        train("toy", [f"resume={parent.info.run_id}", "preset=paper"])  # (it was ignored: the recorded preset ran)
    results = train("toy", [f"resume={parent.info.run_id}", "kill_at_step=-1", "preset=quick"])
    assert [r.status for r in results] == ["FINISHED"] * 3 and results[0].run_id == child.info.run_id  # reopened, not rerun
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert sorted(r.config.seed for r in results) == [0, 1, 2]
