"""Docker's engine cannot run here: check the files agree with the README and each other."""

import re
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfiles_install_like_the_readme_and_run_as_non_root():
    readme = (ROOT / "README.md").read_text()
    assert "make install" in readme and "make demo" in readme and "make test" in readme
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "docker" / name).read_text()
        assert re.search(r"^RUN make install\b", text, re.M), name
        assert re.search(r"^USER lightyard$", text, re.M), name
        assert text.index("USER lightyard") < text.index("RUN make install"), name
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), f"{name}: base image must be pinned"
    assert "nvidia/cuda" in (ROOT / "docker" / "Dockerfile").read_text()


def test_compose_has_mlflow_server_and_gpu_trainer():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mlflow", "trainer"}
    mlflow = services["mlflow"]
    assert "--backend-store-uri sqlite:" in mlflow["command"] and "--artifacts-destination" in mlflow["command"]
    assert {v.split(":")[0] for v in mlflow["volumes"]} <= set(compose["volumes"])
    assert "healthcheck" in mlflow and all(p.startswith("127.0.0.1:") for p in mlflow["ports"])
    trainer = services["trainer"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    device = trainer["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"
    assert mlflow["image"].split(":")[1] == "v" + version("mlflow")  # the server's MLflow is the lock's
    assert trainer["image"].startswith("lightyard/trainer:${LIGHTYARD_IMAGE_TAG")
