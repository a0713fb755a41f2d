"""Shared by the per-pipeline resume tests: SIGTERM after a step, resume, compare with an uninterrupted run."""

import torch
from mlflow.tracking import MlflowClient

from common.runner import compose
from common.tracking import tracking_uri
from tests.conftest import cli, lightyard


def assert_exact_resume(home, pipeline: str, overrides: list[str], kill_at_step: int, total_steps: int) -> tuple[dict, dict]:
    env = {"LIGHTYARD_HOME": str(home)}
    killed = lightyard("train", pipeline, *overrides, f"kill_at_step={kill_at_step}", env=env)
    assert killed.returncode == 143, killed.stderr[-2000:]
    client = MlflowClient(tracking_uri=tracking_uri(compose(pipeline)))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    resumed = cli("train", pipeline, f"resume={run.info.run_id}")  # in this process: saves a start-up
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and "error" not in finished.data.tags  # the resume cleared the KILLED error
    reference = cli("train", pipeline, *overrides, "run_name=reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    (ref,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.info.run_name == "reference"]
    a, b = (
        torch.load(home / "outputs" / pipeline / r / "checkpoints" / "last.ckpt", weights_only=True)
        for r in (run.info.run_id, ref.info.run_id)
    )
    assert a["global_step"] == b["global_step"] == total_steps
    for name, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], value), name
    return a, b  # (resumed, uninterrupted) final checkpoints, for the pipeline's own state
