"""End-to-end logging against a real `mlflow server` on 127.0.0.1."""

import time

import pytest
from mlflow.tracking import MlflowClient

from common.runner import compose, train


def test_run_params_metrics_and_artifacts_read_back(mlflow_server, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (result,) = train(
        "toy",
        [
            "model.lr=0.05",
            "run_name=readback",
            "logger.log_checkpoints=true",
            "logger.log_model=true",
            "logger.system_metrics_interval=0.2",
            "trainer.max_epochs=3",
        ],
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "readback"
    assert run.data.params["model.lr"] == "0.05" and run.data.params["trainer.max_epochs"] == "3"
    assert run.data.tags["lightyard.pipeline"] == "toy"
    assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["git_dirty"] in {"true", "false"}
    assert run.data.metrics["val_acc"] == pytest.approx(result.metrics["val_acc"])  # what the trainer had, read back
    per_step = client.get_metric_history(result.run_id, "train_loss_step")
    assert len(per_step) >= 2 and len({m.step for m in per_step}) == len(per_step)
    assert len(client.get_metric_history(result.run_id, "train_loss_epoch")) == 3
    assert run.data.metrics["memory/bytes_per_trainable_param"] == 8
    assert "checkpoints/last.ckpt" in {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    config_yaml = client.download_artifacts(result.run_id, "config.yaml", str(home))
    assert "lr: 0.05" in open(config_yaml).read()
    # what it ran on: tags and the package list
    import platform
    from importlib.metadata import version

    import torch

    assert run.data.tags["lightyard.env.python"] == platform.python_version() and run.data.tags["lightyard.env.torch"] == torch.__version__
    assert {"lightyard.env.lock", "lightyard.env.cuda", "lightyard.env.cudnn", "lightyard.env.accelerator"} <= set(run.data.tags)
    packages = open(client.download_artifacts(result.run_id, "environment.txt", str(home))).read()
    assert f"torch=={version('torch')}" in packages.splitlines() and "mlflow==" in packages
    # the dataset input (the runs table's Dataset column) and MLflow's system metrics
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "toy (generated)" and data.dataset.source_type == "code" and len(data.dataset.digest) == 12
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # the logged model loads back and computes what the last checkpoint's weights compute
    import mlflow.pytorch

    mlflow.set_tracking_uri(mlflow_server)
    from pathlib import Path

    import mlflow.artifacts

    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model", dst_path=str(home / "m"))).rglob("*")}
    assert "model.pt2" in files and "model.pth" not in files  # a torch.export program, not a pickle
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    weights = torch.load(home / "outputs" / "toy" / result.run_id / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    x = torch.randn(5, 6)
    expected = torch.relu(x @ weights["embed.weight"].T + weights["embed.bias"]) @ weights["head.weight"].T + weights["head.bias"]
    torch.testing.assert_close(model(x), expected)


def test_sweep_2x2_gives_one_parent_and_four_children(mlflow_server, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    results = train("toy", ["model.lr=0.01,0.1", "model.hidden=4,8", "trainer.max_epochs=1", "logger.experiment=sweep"])
    assert len(results) == 4
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    points = {(c.data.params["model.lr"], c.data.params["model.hidden"]) for c in children}
    assert points == {("0.01", "4"), ("0.01", "8"), ("0.1", "4"), ("0.1", "8")}
    assert all(r.info.status == "FINISHED" for r in runs)


def test_one_training_experiment_per_pipeline(mlflow_server, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (result,) = train("toy", ["trainer.max_epochs=1"])
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment(client.get_run(result.run_id).info.experiment_id)
    assert experiment.name == "lightyard/toy"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_dataset_digest_follows_the_data_not_the_name(home, tmp_path):
    """Generated data: the digest is of its settings; a folder: of its files' content (a changed byte with the
    same size and mtime still changes it), so two runs on different data are told apart in the runs table."""
    import os

    from common.runner import compose
    from common.tracking import describe_dataset

    a, b, a_again = (describe_dataset(compose("toy", v)) for v in ({"data.n": 64}, {"data.n": 32}, {"data.n": 64}))
    assert a.digest == a_again.digest != b.digest
    root = tmp_path / "graphs"
    (root / "texas" / "raw").mkdir(parents=True)
    edges = root / "texas" / "raw" / "out1_graph_edges.txt"
    edges.write_text("node_id\tnode_id\n0\t1\n")
    first = describe_dataset(compose("hog_gcn", {"data.name": "texas", "data.root": str(root)}))
    stat = edges.stat()
    edges.write_text("node_id\tnode_id\n0\t2\n")
    os.utime(edges, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = describe_dataset(compose("hog_gcn", {"data.name": "texas", "data.root": str(root)}))
    assert first.source._get_source_type() == "local" and first.name == "texas (graphs)"
    assert first.digest != second.digest


def test_log_model_without_an_exportable_model_is_one_line(home):
    from tests.conftest import cli

    out = cli("train", "hog_gcn", "logger.log_model=true")
    assert out.returncode == 2 and out.stderr.strip() == (
        "lightyard: error: logger.log_model=true but hog_gcn's module exports no model (a LightningModule's model_for_export()); "
        "set logger.log_model=false"
    )


def test_system_metrics_off_with_one_key(home):
    from common.tracking import tracking_uri
    from common.runner import compose

    (result,) = train("toy", ["logger.system_metrics=false", "logger.system_metrics_interval=0.2", "trainer.max_epochs=3"])
    run = MlflowClient(tracking_uri=tracking_uri(compose("toy"))).get_run(result.run_id)
    assert not [k for k in run.data.metrics if k.startswith("system/")] and "val_acc" in run.data.metrics


def test_notices_are_kept_on_the_run(home, monkeypatch, capsys):
    """(they were console lines only: a capped KID subset or a class a split lacks was gone with the terminal)"""
    from common.runner import compose
    from common.tracking import OPEN_RUNS, notice, tracking_uri
    from tests.toy.module import ToyModule

    monkeypatch.setattr(ToyModule, "on_fit_start", lambda self: notice("the data lacks a class"), raising=False)
    (result,) = train("toy", ["trainer.precision=bf16-mixed", "trainer.max_epochs=1"])
    tags = MlflowClient(tracking_uri=tracking_uri(compose("toy"))).get_run(result.run_id).data.tags
    assert tags["lightyard.notice"].splitlines() == [
        "precision bf16-mixed asked for on cpu: running in 32-bit (half precision needs CUDA)",
        "the data lacks a class",
    ]
    assert "notice: the data lacks a class" in capsys.readouterr().err and not OPEN_RUNS  # none recorded after the run


def test_a_resume_with_a_new_length_says_so_on_the_run(home):
    """(params cannot change: a resume with trainer.max_epochs=1 left the run saying 3, and nothing else said otherwise)"""
    from common.runner import compose
    from common.tracking import Tracker

    tracker = Tracker.start(compose("toy", {"trainer.max_epochs": 3}), "resumed")
    tracker.log_config(compose("toy", {"trainer.max_epochs": 3}))
    tracker.log_config(compose("toy", {"trainer.max_epochs": 5}))  # what run_one logs when it reopens the run
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params["trainer.max_epochs"] == "3" and run.data.tags["lightyard.resumed_with.trainer.max_epochs"] == "3 → 5"
    assert [k for k in run.data.tags if k.startswith("lightyard.resumed_with.")] == ["lightyard.resumed_with.trainer.max_epochs"]
    tracker.end("FINISHED")


def test_the_heartbeat_keeps_the_runs_working_time_for_a_sigkilled_segment(home):
    """(a review: a SIGKILLed segment logged no duration_s, so a resumed run's summed time left it out)"""
    from common.cli import _worked_s, run_rows
    from common.tracking import Heartbeat, Tracker, tracking_uri

    tracker = Tracker.start(compose("toy"), "beating")
    beat = Heartbeat(tracker, every=0.05, start=time.time() - 100)  # the run's clock: 100 s worked before this segment
    deadline = time.time() + 30
    while "duration_s" not in tracker.client.get_run(tracker.run_id).data.metrics and time.time() < deadline:
        time.sleep(0.05)
    beat.stop()
    run = tracker.client.get_run(tracker.run_id)
    assert 100 < run.data.metrics["duration_s"] < 100 + 31 and "lightyard.heartbeat" in run.data.tags
    # while it runs, `runs` shows the summed time and the time since the beat (was: since the run's first start, the
    # time between a stop and its resume included)
    (row,) = [r for r in run_rows(tracking_uri(compose("toy"))) if r["run_id"] == tracker.run_id]
    since_beat = time.time() - int(run.data.tags["lightyard.heartbeat"])
    assert run.data.metrics["duration_s"] + since_beat - 0.2 <= row["duration_s"] <= run.data.metrics["duration_s"] + since_beat + 2
    # a RUNNING run whose process is gone stays at its last beat (a review: it grew until `runs --stale`)
    assert _worked_s(run.info, run.data, time.time() + 1000, alive=False) == run.data.metrics["duration_s"]
    tracker.end("KILLED")


@pytest.mark.slow  # 20-25 s: SQLite's 5 s busy timeout, met by several of MLflow's queries in turn
def test_a_store_locked_by_another_writer_is_one_line_naming_the_file(home):
    """A stopped or hung command holding SQLite's write lock: after the busy timeouts (~20 s), one line with the store's
    file and what to do (was MLflow's logged traceback, then SQLAlchemy's error with the SQL statement)."""
    import sqlite3

    from tests.conftest import cli

    assert cli("runs").returncode == 0  # the store exists
    db = home / "mlflow" / "mlflow.db"
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        out = cli("train", "toy", "trainer.max_epochs=1")
    finally:
        holder.rollback()
        holder.close()
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"the MLflow store {db} is locked by another process" in out.stderr
