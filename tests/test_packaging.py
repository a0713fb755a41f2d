"""A non-editable install carries the configs (#23): the wheel holds conf/*.yaml and runs from anywhere."""

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # a pip install into a new virtual environment
def test_a_non_editable_install_lists_and_trains(tmp_path):
    """The wheel `pip install .` would install, put on the path of this venv's dependencies (a fresh venv of its
    own would download torch again) and run from an unrelated folder: no file of the checkout is used."""
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("lightyard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"conf/base.yaml", "conf/iiot_sic_aloha.yaml", "common/cli.py"} <= set(names)
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "LIGHTYARD_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}

    def lightyard(*args):
        return subprocess.run(
            [sys.executable, "-m", "common.cli", *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = subprocess.run(
        [sys.executable, "-c", "import common.config as c; print(c.CONF_DIR)"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip() == str(target / "conf")  # the installed copy, not the checkout's
    listed = lightyard("list")
    assert listed.returncode == 0 and "| iiot_sic_aloha " in listed.stdout
    trained = lightyard("train", "iiot_sic_aloha", "preset=smoke")
    assert trained.returncode == 0, trained.stderr[-2000:]
