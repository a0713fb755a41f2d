"""`make ui-screenshot PIPELINE=<name>`: a smoke reproduce grid into a scratch store, MLflow's UI on loopback, and
headless Chromium's screenshot of the grid's children compared (parallel coordinates of the grid's params and
metrics) into pipelines/<name>/mlflow_comparison.png. Not part of the suite (it needs Debian's `chromium`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
]


def main(pipeline: str, out: Path, experiment_args: list[str]) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui-screenshot: needs Debian's chromium (apt-get install chromium)")
    home = Path(tempfile.mkdtemp(prefix="lightyard-shot-"))
    env = {**os.environ, "LIGHTYARD_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [sys.executable, "-m", "common.cli", "reproduce", pipeline, "preset=smoke", *experiment_args], cwd=ROOT, env=env, check=True
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "ui", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(f"lightyard/{pipeline}")
        children = [r.info.run_id for r in client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` != ''")]
        url = f"{base}/#/compare-runs?runs={json.dumps(children)}&experiments={json.dumps([experiment.experiment_id])}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                check=True,
                capture_output=True,
                timeout=180,
            )
        print(f"{out}: {len(children)} child runs of {pipeline} compared ({url})")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    name = sys.argv[1]
    main(name, ROOT / "pipelines" / name / "mlflow_comparison.png", sys.argv[2:])
