"""The lock file against pyproject.toml (offline), and what `lightyard env` prints."""

from common.environment import LOCK_FILE, check_lock, cudnn_version
from tests.conftest import cli

LOCK = """\
numpy==2.1.0 \\
    --hash=sha256:00
    # via lightyard (pyproject.toml)
torch==2.14.1 \\
    --hash=sha256:11
pytest==9.2.0 \\
    --hash=sha256:22
"""


def _project(tmp_path, dependencies, test_extra=('"pytest==9.2.0"',)):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        f"[project]\nname = 'x'\ndependencies = [{', '.join(dependencies)}]\n"
        f"[project.optional-dependencies]\ntest = [{', '.join(test_extra)}]\n"
    )
    lock = tmp_path / "requirements.lock"
    lock.write_text(LOCK)
    return pyproject, lock


def test_lock_check_passes_when_every_pin_is_locked(tmp_path):
    pyproject, lock = _project(tmp_path, ['"torch==2.14.1"', '"numpy>=1.26"'])
    assert check_lock(pyproject, lock, extras=("test",)) == []


def test_lock_check_fails_on_a_changed_pin_an_added_package_or_a_missing_lock(tmp_path):
    pyproject, lock = _project(tmp_path, ['"torch==2.13.0"', '"numpy>=1.26"', '"scipy>=1.11"'], test_extra=('"pytest==9.3.0"',))
    assert check_lock(pyproject, lock, extras=("test",)) == [
        "requirements.lock has torch==2.14.1 but pyproject.toml asks torch==2.13.0: run `make lock`",
        "scipy (scipy>=1.11) is not in requirements.lock: run `make lock`",
        "requirements.lock has pytest==9.2.0 but pyproject.toml asks pytest==9.3.0: run `make lock`",
    ]
    lock.unlink()
    assert check_lock(pyproject, lock) == ["requirements.lock is missing: run `make lock`"]


def test_the_projects_lock_matches_its_pyproject_and_env_prints_it():
    assert LOCK_FILE.is_file() and check_lock() == []
    out = cli("env")
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines()[:8] if line.strip())
    assert out.returncode == 0 and len(lines["lock"]) == 12 and lines["python"].startswith("3.11")
    assert "# installed packages" in out.stdout and "\ntorch==" in out.stdout


def test_cudnn_version_reads_both_packings():
    assert [cudnn_version(v) for v in (92400, 90100, 8907, 8600)] == ["9.24.0", "9.1.0", "8.9.7", "8.6.0"]
