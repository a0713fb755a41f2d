"""End-to-end logging against a real `mlflow server` on 127.0.0.1."""

import pytest
from mlflow.tracking import MlflowClient

from common.runner import train


def test_run_params_metrics_and_artifacts_read_back(mlflow_server, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (result,) = train("toy", ["model.lr=0.05", "run_name=readback", "logger.log_checkpoints=true"])
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "readback"
    assert run.data.params["model.lr"] == "0.05" and run.data.params["trainer.max_epochs"] == "2"
    assert run.data.tags["lightyard.pipeline"] == "toy"
    assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["git_dirty"] in {"true", "false"}
    assert run.data.metrics["val_acc"] == pytest.approx(result.metrics["val_acc"])  # what the trainer had, read back
    per_step = client.get_metric_history(result.run_id, "train_loss_step")
    assert len(per_step) >= 2 and len({m.step for m in per_step}) == len(per_step)
    assert len(client.get_metric_history(result.run_id, "train_loss_epoch")) == 2
    assert run.data.metrics["memory/bytes_per_trainable_param"] == 8
    assert "checkpoints/last.ckpt" in {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    config_yaml = client.download_artifacts(result.run_id, "config.yaml", str(home))
    assert "lr: 0.05" in open(config_yaml).read()


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
