"""The experiment path: grids of child runs, failures, resume, stale runs, launchers, the report builder."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from common.config import ConfigError
from common.grid import expand, plan, run_experiment
from common.report import build_table
from common.tables import markdown_table
from common.runner import compose
from common.tracking import tracking_uri
from tests.conftest import ROOT, assert_no_run, cli, lightyard, wait_for_run


def _client():
    return MlflowClient(tracking_uri=tracking_uri(compose("toy")))


def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_grid_expands_product_union_when_and_set():
    cfg = compose("toy")
    spec = cfg.experiments.faults.copy()
    assert expand(spec) == [{"seed": s} for s in (0, 1, 2, 3)]
    # a list of grids is their union, in order, with repeats dropped
    spec.grid = [{"model": {"lr": [0.1, 0.2]}, "seed": [0, 1]}, {"model": {"lr": [0.2, 0.3]}, "seed": [1]}]
    points = expand(spec)
    assert points == [
        {"model.lr": 0.1, "seed": 0},
        {"model.lr": 0.1, "seed": 1},
        {"model.lr": 0.2, "seed": 0},
        {"model.lr": 0.2, "seed": 1},
        {"model.lr": 0.3, "seed": 1},
    ]
    _, name, children = plan("reproduce", "toy", {"experiment": "faults", "model.hidden": 4})
    assert name == "faults" and len(children) == 4
    by_seed = {c.point["seed"]: c.values for c in children}
    assert by_seed[1]["crash_at_step"] == 1 and "crash_at_step" not in by_seed[0]
    assert by_seed[2]["kill_at_step"] == 3
    assert all(v["trainer.max_epochs"] == 1 and v["model.hidden"] == 4 for v in by_seed.values())


def test_bad_grid_values_fail_before_any_run(home):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        run_experiment("reproduce", "toy", ["experiment=nope"])
    with pytest.raises(ConfigError, match="runs with `lightyard bench`"):
        run_experiment("reproduce", "toy", ["experiment=score"])
    with pytest.raises(ConfigError, match="expects float"):
        run_experiment("reproduce", "toy", ["experiments.lr.grid.model.lr=[0.1,oops]"])
    with pytest.raises(ConfigError, match="add --yes"):
        run_experiment("reproduce", "toy", ["launcher.max_points=3"])
    # a key the experiment takes from another (data.root: ${reproduce.root}): the advice names what to give here
    with pytest.raises(
        ConfigError, match=r"needs data.root=<folder> \(this reproduce sets data.root from reproduce.root: give root=<…>\)$"
    ):
        run_experiment("reproduce", "setr", ["preset=camvid"])
    with pytest.raises(ConfigError, match=r"give root=<…>, or experiment=generated\)$"):  # the same command's other grid
        run_experiment("reproduce", "compression", ["preset=smoke"])
    # not english_text_long, which reads the same folder; named by the pipeline's shortcut where it has one
    with pytest.raises(ConfigError, match=r"give root=<…>, or experiment=generated\)$"):
        run_experiment("reproduce", "vocab_kd", ["preset=smoke", "experiment=english_text"])
    with pytest.raises(ConfigError, match=r"give root=<…>, or data=generated\)$"):
        run_experiment("reproduce", "hog_gcn", ["data=real"])
    assert (
        not (home / "mlflow").exists()
        or not _client().search_experiments()
        or not _client().search_runs([e.experiment_id for e in _client().search_experiments()])
    )


def test_a_signal_while_the_grid_is_checked_stops_it_in_one_line_with_no_run(home, monkeypatch, capsys):
    """A large grid's configs take a minute to check (300 hog_gcn points): a SIGTERM then is one line, exit 143."""
    import common.grid
    from common.cli import main

    checked = []

    def check(cfg, point):
        checked.append(cfg)
        if len(checked) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through the handler the grid installs

    monkeypatch.setattr(common.grid, "check_run_config", check)
    assert main(["reproduce", "toy"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "lightyard: stopped by signal 15 (no run was opened yet: rerun it)"
    assert len(checked) == 2  # stopped at the signal, not after the grid
    assert_no_run("toy")


def test_failing_child_does_not_stop_the_others_and_resume_runs_only_the_unfinished(home):
    env = {"LIGHTYARD_HOME": str(home)}
    first = lightyard("reproduce", "toy", "experiment=faults", env=env)
    # the third point sends itself SIGTERM mid-epoch: that child and the parent end KILLED
    assert first.returncode == 143, first.stderr[-2000:]
    assert "lightyard reproduce toy resume=" in first.stderr.strip().splitlines()[-1]
    client = _client()
    (parent,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("lightyard.kind") == "reproduce"
    ]
    assert parent.info.status == "KILLED"
    statuses = {json.loads(c.data.tags["lightyard.point"])["seed"]: c.info.status for c in _children(client, parent.info.run_id)}
    assert statuses == {0: "FINISHED", 1: "FAILED", 2: "KILLED"}  # the crash did not stop the grid; seed 3 never started

    resumed = cli("reproduce", "toy", f"resume={parent.info.run_id}")
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # seed 1 crashes again, by construction
    assert "1 of 4 child runs failed" in resumed.stderr
    children = _children(client, parent.info.run_id)
    by_seed = {}
    for c in children:
        by_seed.setdefault(json.loads(c.data.tags["lightyard.point"])["seed"], []).append(c)
    # seed 0 was not rerun; seed 2 continued in its own run from the checkpoint; seed 1 got a new run; seed 3 ran once
    assert [len(by_seed[s]) for s in (0, 1, 2, 3)] == [1, 2, 1, 1]
    assert by_seed[2][0].info.status == "FINISHED" and "error" not in by_seed[2][0].data.tags
    assert sorted(c.info.status for c in by_seed[1]) == ["FAILED", "FAILED"]
    assert sum(1 for c in by_seed[1] if c.data.tags.get("lightyard.superseded")) == 1
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["error"].startswith("1 of 4 child runs failed")
    report = cli("report", parent.info.run_id)
    assert report.returncode == 0 and "| 3    |" in report.stdout and "| 1    |" not in report.stdout


def test_sigkill_leaves_stale_runs_that_runs_stale_and_resume_find(home):
    env = {**os.environ, "LIGHTYARD_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "reproduce", "toy", "experiment=lr", "trainer.max_epochs=30", "data.n=16"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = wait_for_run("toy", "tags.`mlflow.parentRunId` != ''")  # the first child is training
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"RUNNING"} and len(runs) == 2  # the parent and one child, left as ghosts
    stale = cli("runs", "--stale")
    assert stale.returncode == 0 and stale.stdout.count("| KILLED") == 2, stale.stdout
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    assert "stale: process" in client.get_run(parent.info.run_id).data.tags["error"]
    for run in runs:  # ended at its last beat, or at its start when it never beat: not when it was marked
        beat = run.data.tags.get("lightyard.heartbeat", "")
        expected = max(int(beat) * 1000, run.info.start_time) if beat else run.info.start_time
        assert client.get_run(run.info.run_id).info.end_time == expected
    resumed = cli("reproduce", "toy", f"resume={parent.info.run_id[:8]}", "launcher.workers=1")  # a prefix will do
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "4 of 4 child runs to run" in resumed.stdout  # the killed child had no checkpoint yet: it reruns


def test_a_signal_wrapped_by_a_library_between_children_still_ends_the_parent_killed(home, monkeypatch):
    """SIGTERM while a child's config was composed: OmegaConf re-raised our RunInterrupted as type(err)(text), a
    TypeError, so the parent ended FAILED with "RunInterrupted.__init__() missing 1 required positional argument"."""
    import common.grid
    from common.runner import _RECEIVED, RunInterrupted

    def composing(*args, **kwargs):
        _RECEIVED.append(signal.SIGTERM)
        raise ConfigError("conf/toy.yaml: something wrapped the signal")

    def broken(*args, **kwargs):
        raise RuntimeError("the launcher broke")

    monkeypatch.setattr(common.grid, "run_child", composing)
    try:
        with pytest.raises(RunInterrupted) as stop:
            run_experiment("reproduce", "toy", ["experiment=lr"])
        monkeypatch.setattr(common.grid, "run_child", broken)  # the signal above is still recorded: not this grid's
        with pytest.raises(RuntimeError, match="the launcher broke"):
            run_experiment("reproduce", "toy", ["experiment=lr"])
    finally:
        _RECEIVED.clear()  # this process's record of signals: the next test starts without one
    assert stop.value.signum == signal.SIGTERM and stop.value.resumable and stop.value.command == "reproduce"
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    assert client.get_run(stop.value.run_id).info.status == "KILLED"
    statuses = sorted(r.info.status for r in client.search_runs([client.get_experiment_by_name("lightyard/toy").experiment_id]))
    assert statuses == ["FAILED", "KILLED"]  # the second grid failed for its own reason
    assert RunInterrupted("stopped").signum == signal.SIGTERM  # one argument, as a library re-raises it: still a signal
    assert str(RunInterrupted("stopped")) == "stopped"


def test_sigterm_during_a_grid_ends_parent_and_running_child_killed(home):
    env = {**os.environ, "LIGHTYARD_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "reproduce", "toy", "experiment=lr", "trainer.max_epochs=500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_run("toy", "tags.`mlflow.parentRunId` != ''")
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    runs = _client().search_runs([e.experiment_id for e in _client().search_experiments()])
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]


@pytest.mark.slow  # 13 s; parallel children stay in the suite through the submitit local launcher test
def test_workers_run_children_in_separate_processes(home):
    result = run_experiment("bench", "toy", ["launcher.workers=2"])
    assert (result.finished, result.total, result.status) == (4, 4, "FINISHED")
    client = _client()
    pids = {c.data.metrics["pid"] for c in _children(client, result.run_id)}
    assert os.getpid() not in pids and len(pids) >= 1


def test_submitit_local_launcher_runs_a_two_point_grid(home):
    pytest.importorskip("submitit")
    result = run_experiment("bench", "toy", ["launcher.name=submitit_local", "experiments.score.grid.seed=[0]"])
    assert (result.finished, result.total) == (2, 2), result.report
    client = _client()
    children = _children(client, result.run_id)
    assert sorted(c.data.metrics["score"] for c in children) == [32 * 0.1, 64 * 0.1]
    assert all(c.data.metrics["pid"] != os.getpid() for c in children)  # each ran as its own job
    assert (home / "outputs" / "submitit" / result.run_id).is_dir()


def test_report_of_reruns_gives_min_max_per_cell_and_refuses_different_settings(home):
    first = run_experiment("bench", "toy", ["experiment=score"])
    rerun = lightyard("bench", "toy", "experiment=score", "run_name=another", env={"LIGHTYARD_HOME": str(home)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    second = _client().get_run(re.search(r"parent run ([0-9a-f]{32})", rerun.stdout + rerun.stderr).group(1))
    pids = sorted({os.getpid(), *(int(c.data.metrics["pid"]) for c in _children(_client(), second.info.run_id))})
    out = cli("report", first.run_id, second.info.run_id)  # a run name is not a setting
    assert out.returncode == 0, out.stderr
    assert "min–max over 2 runs" in out.stdout and "[here: min–max over 2 runs of each run's cell]" in out.stdout
    assert f"- {second.info.run_id}: FINISHED, 4 finished child runs" in out.stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.stdout.splitlines() if line.startswith("| ")]
    # each run's cell is its mean over seeds 0 and 1 of n · lr + seed (lr 0.1): 3.7 and 6.9 in both; pid: its process
    assert len(pids) == 2 and rows == [["n", "score", "pid"], ["32", "3.7", f"{pids[0]}–{pids[1]}"], ["64", "6.9", f"{pids[0]}–{pids[1]}"]]
    other = run_experiment("bench", "toy", ["experiment=score", "model.lr=0.3"])
    refused = cli("report", first.run_id, other.run_id)
    assert refused.returncode == 2 and "differ in model.lr (0.1 vs 0.3)" in refused.stderr and not refused.stdout.strip()
    mixed = cli("report", first.run_id, run_experiment("reproduce", "toy", ["experiment=lr"]).run_id)
    assert mixed.returncode == 2 and "experiment=lr" in mixed.stderr and "experiment=score" in mixed.stderr
    twice = cli("report", first.run_id, first.run_id[:8])  # a prefix names the same run
    assert twice.returncode == 2 and "is given twice" in twice.stderr and not twice.stdout.strip()
    by_prefix = cli("report", first.run_id[:8], second.info.run_id[:12])
    assert by_prefix.returncode == 0 and by_prefix.stdout == out.stdout, by_prefix.stderr
    short = cli("report", first.run_id[:5])  # under 6 characters: not taken as a prefix
    assert short.returncode == 2 and f"no run {first.run_id[:5]} " in short.stderr


def test_an_ambiguous_run_id_prefix_names_the_runs_it_matches(home, monkeypatch):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    runs = [SimpleNamespace(info=SimpleNamespace(run_id=f"abcdef{i}" + "0" * 25)) for i in range(2)]
    monkeypatch.setattr(MlflowClient, "search_experiments", lambda self, **kw: [SimpleNamespace(experiment_id="0")])
    monkeypatch.setattr(
        MlflowClient, "search_runs", lambda self, ids, filter_string, **kw: runs if "LIKE 'abcdef%'" in filter_string else []
    )
    out = cli("report", "abcdef")
    assert out.returncode == 2 and not out.stdout.strip()
    assert f"run id prefix abcdef matches 2 runs ({runs[0].info.run_id}, {runs[1].info.run_id}); give more of it" in out.stderr


def test_range_cells_are_min_max_of_each_runs_own_cell_and_say_what_is_missing():
    children = [
        {"m": "a", "seed": 0, "acc": 0.5, "_parent": "p", "_index": 0},
        {"m": "a", "seed": 1, "acc": 0.7, "_parent": "p", "_index": 1},  # run p's cell: 0.6
        {"m": "a", "seed": 0, "acc": 0.8, "_parent": "q", "_index": 0},
        {"m": "a", "seed": 1, "acc": 0.9, "_parent": "q", "_index": 1},  # run q's cell: 0.85
        {"m": "b", "seed": 0, "acc": -0.5, "_parent": "p", "_index": 2},
        {"m": "b", "seed": 0, "acc": -0.1, "_parent": "q", "_index": 2},
        {"m": "c", "seed": 0, "acc": 0.3, "_parent": "p", "_index": 3},  # q's child of c failed
        {"m": "c", "seed": 0, "acc": math.nan, "_parent": "q", "_index": 3},
    ]
    rows = build_table(children, {"rows": "m", "metric": "acc", "digits": 2}, parents=2)
    assert rows == [{"m": "a", "acc": "0.60–0.85"}, {"m": "b", "acc": "-0.50 to -0.10"}, {"m": "c", "acc": "0.30 (1 of 2 runs; 1 NaN)"}]
    # a diverged seed within one run: that run's cell is the mean of the others, and the cell says a value was NaN
    children[1]["acc"] = math.nan
    assert build_table(children, {"rows": "m", "metric": "acc", "digits": 2}, parents=2)[0] == {"m": "a", "acc": "0.50–0.85 (1 NaN)"}


def test_a_pipe_in_a_label_or_value_stays_in_its_cell():
    table = markdown_table([{"max |Δ|": 0.5, "note": "a|b"}]).splitlines()
    assert table[0] == "| max \\|Δ\\| | note |" and table[2] == "| 0.5       | a\\|b |"
    assert {len(re.split(r"(?<!\\)\|", line)) for line in table} == {4}  # 2 columns: every line has 3 unescaped pipes


def test_a_nan_seed_is_named_in_its_cell_not_silently_left_out_of_the_mean():
    children = [{"m": "a", "seed": s, "acc": v, "_index": s} for s, v in enumerate([0.5, math.nan, 0.7])]
    children.append({"m": "b", "seed": 0, "acc": math.nan, "_index": 3})
    rows = build_table(children, {"rows": "m", "metric": "acc", "digits": 2, "std": False})
    assert rows == [{"m": "a", "acc": "0.60 (1 NaN)"}, {"m": "b", "acc": "– (1 NaN)"}]


def test_std_false_on_one_metric_shows_its_mean_alone():
    """(a review: vocab_kd's per-metric `std: false` was read by nothing: sizes no seed changes showed "± 0.00")"""
    children = [{"m": "a", "seed": s, "acc": 0.5 + s / 10, "mb": 2.0, "_index": s} for s in range(2)]
    rows = build_table(children, {"rows": "m", "digits": 2, "metrics": ["acc", {"metric": "mb", "std": False}]})
    assert rows == [{"m": "a", "acc": "0.55 ± 0.07", "mb": "2.00"}]


def test_report_builder_matches_hand_computed_mean_and_std():
    children = [
        {"model.name": "gcn", "data.name": "texas", "seed": 0, "acc": 0.5, "_index": 0},
        {"model.name": "gcn", "data.name": "texas", "seed": 1, "acc": 0.7, "_index": 1},
        {"model.name": "gcn", "data.name": "cornell", "seed": 0, "acc": 0.4, "_index": 2},
        {"model.name": "hog", "data.name": "texas", "seed": 0, "acc": 0.8, "_index": 3},
        {"model.name": "hog", "data.name": "texas", "seed": 1, "acc": 0.9, "_index": 4},
        {"model.name": "hog", "data.name": "cornell", "seed": 0, "acc": 0.6, "_index": 5},
    ]
    rows = build_table(
        children,
        {
            "rows": "model.name",
            "columns": "data.name",
            "metric": "acc",
            "scale": 100,
            "digits": 2,
            "best": "max",
            "labels": {"hog": "HOG-GCN"},
            "paper": {"HOG-GCN": {"texas": "85.17"}},
        },
    )
    # mean ± sample std: (50, 70) → 60 ± 14.14; (80, 90) → 85 ± 7.07
    assert rows == [
        {"name": "gcn", "texas": "60.00 ± 14.14", "cornell": "40.00"},
        {"name": "HOG-GCN", "texas": "**85.00 ± 7.07**", "cornell": "**60.00**"},
        {"name": "paper HOG-GCN", "texas": "85.17"},
    ]
    # model selection: per row, the lr with the best mean validation accuracy, then its test accuracy
    sel = [
        {"m": "a", "lr": lr, "seed": s, "val": v, "test": t, "_index": i}
        for i, (lr, s, v, t) in enumerate([(0.1, 0, 0.5, 0.1), (0.1, 1, 0.7, 0.2), (0.3, 0, 0.9, 0.8), (0.3, 1, 0.6, 0.6)])
    ]
    (row,) = build_table(sel, {"rows": "m", "metrics": ["test"], "digits": 1, "select": {"axis": "lr", "by": "val"}})
    assert row == {"m": "a", "test": "0.7 ± 0.1", "chosen lr": "0.3"}


def test_a_grid_points_label_shortens_only_keys_that_stay_clear():
    from common.grid import point_label

    assert (
        point_label({"data.rho": 10, "mgp.enabled": False, "loss.name": "ce", "seed": 0}) == "rho=10 mgp.enabled=False loss.name=ce seed=0"
    )
    assert point_label({"data.split": 3, "model.name": "gcn", "data.name": "texas"}) == "split=3 model.name=gcn data.name=texas"
