from tests.conftest import lightyard


def test_help_for_every_command():
    top = lightyard("--help")
    assert top.returncode == 0
    for command in ("list", "train", "runs", "ui", "bench", "reproduce", "demo"):
        assert command in top.stdout
        sub = lightyard(command, "--help")
        assert sub.returncode == 0 and "usage: lightyard " + command in sub.stdout


def test_list_shows_pipelines_with_descriptions():
    result = lightyard("list")
    assert result.returncode == 0
    assert "| toy " in result.stdout and "tiny MLP classifier" in result.stdout


def test_runs_on_an_empty_store(home):
    result = lightyard("runs", env={"LIGHTYARD_HOME": str(home)})
    assert result.returncode == 0 and "(no rows)" in result.stdout
