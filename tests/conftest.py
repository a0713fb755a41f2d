"""Shared fixtures: an isolated project home, the toy pipeline, and a real MLflow server on loopback."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# before anything imports the registry: the toy pipeline is discoverable in-process and in subprocesses
os.environ["LIGHTYARD_PIPELINES"] = "tests.toy"
os.environ.setdefault("LIGHTYARD_HOME", tempfile.mkdtemp(prefix="lightyard-test-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# one intra-op thread in the tests and their subprocesses: on a shared machine torch's default (one per core)
# made tiny-tensor loops 10-30x slower (a factored Sinkhorn test: 133 s against 4.5 s); set before torch loads
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An empty, migrated SQLite MLflow store, made once: creating one costs ~2 s of MLflow's migrations."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A LIGHTYARD_HOME with nothing in it: the first command creates the MLflow store."""
    monkeypatch.setenv("LIGHTYARD_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def home(fresh_home, _empty_store):
    """A fresh LIGHTYARD_HOME for one test, its MLflow store a copy of an empty one (where the default config puts it)."""
    import shutil

    (fresh_home / "mlflow").mkdir()
    shutil.copy(_empty_store, fresh_home / "mlflow" / "mlflow.db")
    return fresh_home


def lightyard(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def saved_bytes(save, *args, **kwargs) -> bytes:
    """The bytes np.save / np.savez write, for a file name they would otherwise extend (.npy, .npz)."""
    import io

    buffer = io.BytesIO()
    save(buffer, *args, **kwargs)
    return buffer.getvalue()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line's ``main`` in this process, its exit code and printed lines as ``lightyard`` returns them:
    for checks that need no process of their own (a subprocess costs 5-10 s of imports on a 2-core machine). Library
    loggers' stream handlers (Lightning's, bound to the real stderr) print into the capture too; the environment and
    logging's disable level that a command sets are restored after it."""
    import contextlib
    import io
    import logging

    from common.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_disable = dict(os.environ), logging.root.manager.disable
    streams = {id(sys.stdout): out, id(sys.stderr): err, id(sys.__stdout__): out, id(sys.__stderr__): err}
    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    rebound = [(h, h.stream) for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler and id(h.stream) in streams]
    os.environ.update(env or {})
    try:
        for handler, stream in rebound:
            handler.setStream(streams[id(stream)])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse (--help, usage errors), as a process would exit
                code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    finally:
        for handler, stream in rebound:
            handler.setStream(stream)
        os.environ.clear()
        os.environ.update(saved_env)
        logging.disable(saved_disable)
    return subprocess.CompletedProcess(["lightyard", *args], code, out.getvalue(), err.getvalue())


def zip_splits(tree: Path, dest: Path, pattern: str = "*.png", folders: bool = False) -> Path:
    """``dest/{train,test}.zip`` holding ``tree/<split>/...`` as the CIFAR zips do (paths start with the split);
    ``folders``: with their folder entries too (``train/``, ``train/cat/``), as ../shared/data/cifar10_jpg's zips hold."""
    import zipfile

    dest.mkdir()
    for split in ("train", "test"):
        with zipfile.ZipFile(dest / f"{split}.zip", "w") as archive:
            if folders:
                for path in [tree / split, *sorted(p for p in (tree / split).rglob("*") if p.is_dir())]:
                    archive.write(path, str(path.relative_to(tree)))
            for path in sorted((tree / split).rglob(pattern)):
                archive.write(path, str(path.relative_to(tree)))
    return dest


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10_jpg(tmp: Path, per_class: tuple[int, int] = (6, 2), classes: tuple[str, ...] = CIFAR10_CLASSES) -> Path:
    """A tiny copy of ../shared/data/cifar10_jpg under ``tmp``: ``{train,test}.zip``, each ``<split>/<class>/NNNN.jpg``
    with its folder entries; 32-pixel JPEGs at quality 75, ``per_class`` (train, test) images of each class, a class a
    colour of its own plus noise. Returns the folder of the zips (the tree they were made from is ``tmp/cifar10_tree``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tree = tmp / "cifar10_tree"
    for split, n in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            (tree / split / name).mkdir(parents=True)
            colour = np.array([25 * c, 230 - 20 * c, 60 + 15 * c])
            for i in range(n):
                pixels = np.clip(colour + rng.integers(-30, 31, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tree / split / name / f"{i:04d}.jpg", quality=75)
    return zip_splits(tree, tmp / "cifar10_jpg", "*.jpg", folders=True)


def assert_no_run(pipeline: str) -> None:
    """The store of ``pipeline``'s config holds no run at all: a refused command opened nothing."""
    from mlflow.tracking import MlflowClient

    from common.runner import compose
    from common.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(compose(pipeline)))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def wait_for_run(pipeline: str, filter_string: str = "", timeout: float = 120, every: float = 0.5):
    """Poll the test home's MLflow store until a run of ``pipeline`` matching ``filter_string`` exists (a command
    started in the background has got that far); returns the client."""
    import time

    from mlflow.tracking import MlflowClient

    from common.runner import compose
    from common.tracking import tracking_uri

    client, deadline = None, time.time() + timeout
    while time.time() < deadline:
        time.sleep(every)
        try:  # the store may not exist yet, or be mid-migration
            client = MlflowClient(tracking_uri=tracking_uri(compose(pipeline)))
            ids = [e.experiment_id for e in client.search_experiments()]
            if ids and client.search_runs(ids, filter_string=filter_string):
                break
        except Exception:
            continue
    return client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with its own SQLite backend and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("mlflow server did not become healthy in 120 s")
    yield uri
    process.terminate()
    process.wait(timeout=30)
    log.close()
