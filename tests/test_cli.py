import pytest

from tests.conftest import cli


def test_help_for_every_command():
    top = cli("--help")
    assert top.returncode == 0
    for command in ("list", "train", "runs", "report", "ui", "env", "bench", "reproduce", "demo"):
        assert command in top.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "usage: lightyard " + command in sub.stdout
        # a line saying what the command does, below the usage (ui, env and demo had none)
        described = sub.stdout.split("\n\n")[1]
        assert described[:1].isupper() and not described.startswith(("positional arguments", "options")), command


def test_list_shows_pipelines_with_descriptions():
    result = cli("list")
    assert result.returncode == 0
    assert "| toy " in result.stdout and "tiny MLP classifier" in result.stdout
    toy = next(line for line in result.stdout.splitlines() if line.startswith("| toy "))
    assert "| quick, paper " in toy  # its presets, from conf/toy.yaml, smallest first


def test_runs_on_an_empty_store(home):
    result = cli("runs")
    assert result.returncode == 0 and "(no rows)" in result.stdout


@pytest.mark.slow  # 28 s (two launches); DDP itself stays in the suite (test_callbacks: two gloo processes)
def test_fabric_run_launches_one_ddp_group_from_its_own_options(home):
    """`fabric run --devices=2 common/cli.py train toy`: two processes, one DDP group of world size 2, one MLflow run."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from common.runner import compose
    from common.tracking import tracking_uri
    from tests.conftest import ROOT

    def fabric_run(*overrides: str) -> subprocess.CompletedProcess:
        fabric = Path(sys.executable).with_name("fabric")
        return subprocess.run(
            [str(fabric), "run", "--accelerator=cpu", "--strategy=ddp", "--devices=2", "common/cli.py", "train", "toy", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**__import__("os").environ, "LIGHTYARD_HOME": str(home)},
        )

    result = fabric_run("trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=tracking_uri(compose("toy")))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["lightyard.world_size"] == "2" and run.data.tags["lightyard.strategy"] == "DDPStrategy"
    assert result.stdout.count("### Runs") == 1  # rank 1 prints nothing
    assert [p.name for p in (home / "outputs" / "toy").iterdir()] == [run.info.run_id]  # nor leaves an empty folder
    # a stop: rank 0's line names the run and its resume; rank 1's said "checkpoint: <its own unused folder> (… rerun it)"
    stopped = fabric_run("kill_at_step=3")
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("lightyard: ")]
    assert len(lines) == 2 and "lightyard: stopped by signal 15; rank 1 (rank 0 reports the run and how to continue it)" in lines, lines
    (killed,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.info.status == "KILLED"]
    assert f"(MLflow run marked KILLED; continue with: lightyard train toy resume={killed.info.run_id})" in stopped.stderr


def test_the_quick_exit_still_waits_for_threads_runs_exit_handlers_and_keeps_the_status():
    import subprocess
    import sys

    script = (
        "import atexit, threading, time\n"
        "from common.cli import _exit_now\n"
        "atexit.register(lambda: print('handler'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread'))).start()\n"
        "print('command', end='')\n"
        "_exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "commandthread\nhandler\n"


def test_an_error_ends_open_progress_bars_before_its_line(monkeypatch):
    """A stage's bar left open by an error or a signal (not a with-block) got the command's last line appended to it."""
    from tqdm.auto import tqdm

    from common import cli as command_line
    from common.config import ConfigError

    def fail(args):
        bar = tqdm(total=10, desc="stage 1")  # alive while the error is handled: its frame is in the traceback
        bar.update(3)
        raise ConfigError("bad data")

    monkeypatch.setattr(command_line, "_cmd_list", fail)
    out = cli("list")
    *_, bar, line = out.stderr.replace("\r", "\n").strip().splitlines()
    assert out.returncode == 2 and "stage 1:  30%" in bar and line == "lightyard: error: bad data"
