"""MLflow logging shared by every pipeline, trained by gradient or not.

The default store is a SQLite file plus an artifact folder under ``paths.mlflow_dir`` (MLflow 3
refuses plain file stores); ``MLFLOW_TRACKING_URI`` or ``logger.tracking_uri`` points it at a server.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import warnings
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from common.config import ConfigError, flatten
from common.tables import markdown_table


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend, for figures that ``Tracker.log_figure`` logs
    (runs on servers without a display; imported late, matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PROJECT_DIR = Path(__file__).resolve().parents[1]
STATUSES = ("FINISHED", "FAILED", "KILLED")


OPEN_RUNS: list[Tracker] = []  # the run this process is inside (run_one's), where notice() records
_READY: set[str] = set()  # stores this process has checked (reachable server, migrated SQLite schema)


def _given_uri(cfg: DictConfig) -> tuple[str, str] | None:
    """The store the user named (environment first, then config) and how to undo it; None: the local default."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "unset MLFLOW_TRACKING_URI"
    if cfg.logger.tracking_uri:
        return str(cfg.logger.tracking_uri), "drop logger.tracking_uri"
    return None


def tracking_uri(cfg: DictConfig) -> str:
    given = _given_uri(cfg)
    if given:
        uri, source = given
    else:
        mlflow_dir = Path(cfg.paths.mlflow_dir).resolve()
        try:
            mlflow_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(
                f"cannot make the MLflow store folder {mlflow_dir}: a file stands in its path; point LIGHTYARD_HOME "
                "(or paths.root) at a folder"
            ) from None
        except OSError as err:
            raise ConfigError(
                f"cannot make the MLflow store folder {mlflow_dir} ({err.strerror}); point LIGHTYARD_HOME at a writable folder"
            ) from None
        uri, source = f"sqlite:///{mlflow_dir / 'mlflow.db'}", ""
    return ready(uri, source)


def check_server(cfg: DictConfig) -> None:
    """A tracking server checked as soon as the config is known, before the pipeline's imports (a few seconds, not
    the 11–16 s after them that an unreachable one took); a local store is made later, where a run needs it."""
    given = _given_uri(cfg)
    if given and given[0].startswith(("http://", "https://")):
        ready(*given)


SERVER_STORES = {"postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}  # tracking stores besides http(s) and sqlite


def ready(uri: str, source: str = "unset MLFLOW_TRACKING_URI") -> str:
    """Check a store once per process, before any run uses it: a server must answer within seconds (not
    after MLflow's minutes of retries); a new SQLite store is created under a file lock, since two
    commands migrating the same new database at once fail."""
    if uri in _READY:
        return uri
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"MLflow tracking server {uri} does not answer ({reason}); start it, or {source} to log to the local store"
            ) from None
    elif uri.startswith("sqlite:///"):
        import fcntl

        from mlflow.tracking import MlflowClient

        db = Path(uri[len("sqlite:///") :])
        if not db.parent.is_dir():
            raise ConfigError(f"MLflow store {uri}: folder {db.parent.resolve()} does not exist; create it, or {source}")
        try:
            lock = open(db.parent / ".mlflow.db.lock", "w")
        except OSError as err:
            raise ConfigError(f"MLflow store {uri}: cannot write in {db.parent.resolve()} ({err.strerror}); or {source}") from None
        with lock:
            deadline = time.monotonic() + 600  # the schema migration of a new store runs once, here
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another command holds it: migrating, or stopped (Ctrl+Z) while it did
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"MLflow store {uri}: its lock ({db.parent / '.mlflow.db.lock'}) stayed held by another command for "
                            "10 minutes (one stopped with Ctrl+Z?); let it finish, or stop it"
                        ) from None
                    time.sleep(0.2)
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    elif uri.partition("://")[0].split("+")[0] not in SERVER_STORES and not (
        (uri.startswith("file:") or "://" not in uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    ):  # (a folder store MLflow 3 takes only when told to); MLflow's own error for the rest is a page, or minutes later
        raise ConfigError(
            f"MLflow tracking URI {uri!r} is not one we can use: give http(s)://host:port (a server), sqlite:///<file>.db or "
            f"a database URI ({', '.join(sorted(SERVER_STORES))}://…); MLflow 3 refuses plain folders unless "
            f"MLFLOW_ALLOW_FILE_STORE=true; or {source}"
        )
    _READY.add(uri)
    return uri


def project_tracking_uri() -> str:
    """The store `lightyard runs`, `report` and `ui` read: ``MLFLOW_TRACKING_URI``, else the one conf/base.yaml points at."""
    cfg = OmegaConf.load(PROJECT_DIR / "conf" / "base.yaml")
    return tracking_uri(cfg)


def sqlite_store_hint() -> str:
    """The SQLite file a command's store is, for an error message, without opening it (it may be what failed)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri.removeprefix("sqlite:///")
    try:
        return str(Path(OmegaConf.load(PROJECT_DIR / "conf" / "base.yaml").paths.mlflow_dir).resolve() / "mlflow.db")
    except Exception:  # an error message must not fail in turn
        return "(the sqlite file)"


def local_artifact_root(cfg: DictConfig, uri: str) -> str | None:
    """Artifact folder for a local SQLite store; a server decides its own."""
    if not uri.startswith("sqlite:"):
        return None
    root = Path(cfg.paths.mlflow_dir).resolve() / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain"))).lower()}


def notice(text: str) -> None:
    """A setting the run changed or a part of the data it left out, which its numbers depend on (a capped subset, a
    class a split lacks): said on the console by rank 0, and kept on the run's ``lightyard.notice`` tag where the run
    was opened in this process (the console is gone later). Not kept: notices of ddp_spawn's worker processes (printed
    only), and data notices of a decoded cache's later reads (said when the data was first read)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    print(f"notice: {text}", file=sys.stderr, flush=True)
    if OPEN_RUNS:
        OPEN_RUNS[-1].add_notice(text)


class Tracker:
    """One MLflow run: params, metrics, figures, tables, files. Picklable (for DDP spawn)."""

    def __init__(self, uri: str, run_id: str, artifact_root: str | None = None):
        self.uri, self.run_id, self.artifact_root = uri, run_id, artifact_root
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent: "Tracker | None" = None,
    ) -> "Tracker":
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=uri)
        name = cfg.logger.experiment or f"lightyard/{cfg.pipeline}"
        experiment = client.get_experiment_by_name(name)
        if experiment:
            experiment_id = experiment.experiment_id
        else:
            try:
                # a training experiment: MLflow 3's UI then opens on the runs table, not on the GenAI overview
                experiment_id = client.create_experiment(
                    name, artifact_location=local_artifact_root(cfg, uri), tags={"mlflow.experimentKind": "custom_model_development"}
                )
            except Exception:  # another process created it a moment ago
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        # liveness from the first moment: a run SIGKILLed before its first step is found by `runs --stale` too
        all_tags = {"lightyard.pipeline": cfg.pipeline, **git_state(), **liveness_tags(), **(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(uri, run.info.run_id)
        tracker._client = client
        return tracker

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> "Tracker":
        tracker = cls(uri, run_id)
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.set_tags(liveness_tags())  # now owned by this process
        return tracker

    # -- what a run records ---------------------------------------------------------------
    def log_config(self, cfg: DictConfig) -> None:
        """The resolved config as params (flattened) and as ``config.yaml``."""
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
        existing = self.client.get_run(self.run_id).data.params
        changed = {p.key: f"{existing[p.key]} → {p.value}" for p in params if p.key in existing and existing[p.key] != p.value}
        if changed:  # a resume's new length or devices: params cannot change, so a tag says what the run went on with
            self.set_tags({f"lightyard.resumed_with.{k}": v for k, v in changed.items()})
        params = [p for p in params if p.key not in existing]  # a resumed run keeps its params
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.log_text(OmegaConf.to_yaml(cfg), "config.yaml")

    def beat(self, start: float | None = None) -> None:
        """The heartbeat tag, and the run's working time by its clock ``start`` (one write: ``runs`` adds the time since
        the beat to it)."""
        from mlflow.entities import Metric, RunTag

        now = time.time()
        worked = [Metric("duration_s", now - start, int(now * 1000), 0)] if start is not None else []
        self.client.log_batch(self.run_id, metrics=worked, tags=[RunTag("lightyard.heartbeat", str(int(now)))])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), stamp, step or 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) or _is_scalar_tensor(value)
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        pyplot().close(figure)  # logged: pyplot would otherwise keep every figure of a long grid alive
        self.log_bytes(buffer.getvalue(), artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            self.log_file(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_table(self, rows: Iterable[Mapping[str, Any]], artifact_file: str, title: str | None = None) -> str:
        """Rows as a Markdown table artifact (and returned, for printing)."""
        table = markdown_table(list(rows), title=title)
        self.log_text(table, artifact_file)
        return table

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_dataset(self, cfg: DictConfig, context: str = "train") -> None:
        """The run's data as an MLflow dataset input (the runs table's Dataset column): its name, where it comes
        from (the folder, or the generator and its settings) and a digest that tells two runs' data apart."""
        from mlflow.entities import DatasetInput, InputTag

        dataset = describe_dataset(cfg)
        if dataset is not None:
            tag = InputTag("mlflow.data.context", context)
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])

    def log_model(self, model: Any, example: Any) -> None:
        """``model`` (an nn.Module) as the run's MLflow model, with ``example`` (a tensor) as its input example and
        the signature read off one forward pass: ``mlflow.pytorch.load_model("runs:/<id>/model")`` gives it back."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = model.eval()
        with torch.no_grad():
            output = model(example)
        signature = infer_signature(example.cpu().numpy(), output.detach().cpu().numpy())
        mlflow.set_tracking_uri(self.uri)
        # the fluent API logs to an active run; end_run(status="RUNNING") leaves our run open for Tracker.end
        mlflow.start_run(run_id=self.run_id, log_system_metrics=False)
        try:
            mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example.cpu().numpy(),
                signature=signature,
                pip_requirements=[f"torch=={torch.__version__}"],  # not inferred: that spawns a subprocess
                serialization_format="pt2",  # torch.export's program: loading it unpickles nothing
            )
        finally:
            mlflow.end_run(status="RUNNING")

    def add_notice(self, text: str) -> None:
        """Appends to the run's ``lightyard.notice`` tag (one line per notice; a line already there, as a resume says it
        again, once)."""
        lines = (self.client.get_run(self.run_id).data.tags.get("lightyard.notice") or "").splitlines()
        if text not in lines:
            self.set_tags({"lightyard.notice": "\n".join([*lines, text])[:5000]})

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        assert status in STATUSES, status
        if error:
            self.client.set_tag(self.run_id, "error", error[:5000])
        elif status == "FINISHED" and "error" in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, "error")  # a resume finished what an earlier attempt did not
        self.client.set_terminated(self.run_id, status=status)


# -- datasets: what a run trained on ----------------------------------------------------------------
CONTENT_DIGEST_LIMIT = 1 << 30  # bytes; past this a folder's digest reads sizes and mtimes, not every byte


def folder_digest(root: str | Path) -> str:
    """12 hex characters of sha256 over every file's relative path and content (over path, size and mtime when
    the folder holds more than ``CONTENT_DIGEST_LIMIT`` bytes). Cached per process by the folder's listing,
    ctime included: a rewritten file changes its ctime even when its size and mtime are put back."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    listing = []
    for path in files:
        stat = path.stat()
        listing.append((str(path.relative_to(root)) if root.is_dir() else path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return _digest_files(str(root), tuple(listing))


@functools.lru_cache(maxsize=64)
def _digest_files(root: str, listing: tuple) -> str:
    digest = hashlib.sha256()
    by_content = sum(entry[1] for entry in listing) <= CONTENT_DIGEST_LIMIT
    for name, size, mtime, _ in listing:
        digest.update(f"{name}\0{size}\0".encode())
        if not by_content:
            digest.update(str(mtime).encode())
            continue
        with open(Path(root) / name if Path(root).is_dir() else root, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def describe_dataset(cfg: DictConfig) -> Any:
    """An ``mlflow.data`` dataset for the config section ``logger.dataset`` names (``data`` by default): a
    local folder (``<section>.root``) digested by content, or generated data digested by its settings."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    key = cfg.logger.get("dataset")
    section = OmegaConf.select(cfg, key) if key else None
    if not isinstance(section, DictConfig):
        return None
    settings = OmegaConf.to_container(section, resolve=True)
    name = str(settings.get("name") or settings.get("source") or cfg.pipeline)
    root = settings.get("root")
    if root and Path(root).exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local path is a local path
            source = resolve_dataset_source(str(Path(root).resolve()))
        return MetaDataset(source, name=f"{name} ({Path(root).name})", digest=folder_digest(root))
    text = json.dumps(settings, sort_keys=True, default=str)
    source = CodeDatasetSource({"generator": f"{cfg.pipeline}:{key}", "settings": text})
    return MetaDataset(source, name=f"{name} (generated)", digest=hashlib.sha256(text.encode()).hexdigest()[:12])


# -- system metrics: CPU, memory, disk, network and (through NVML) GPU, sampled by MLflow ---------
def start_system_metrics(tracker: Tracker, interval: float, resumed: bool) -> Any:
    """MLflow's system-metrics monitor on ``tracker``'s run (metrics ``system/…``); ``None`` where it cannot
    start. It samples every ``interval`` seconds and logs each sample, so runs shorter than that get none."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(
            tracker.run_id, sampling_interval=interval, samples_before_logging=1, resume_logging=resumed, tracking_uri=tracker.uri
        )
        monitor.start()
    except Exception as err:  # a missing psutil / NVML must not stop a run: say so on the run
        tracker.set_tags({"lightyard.notice.system_metrics": f"not recorded: {type(err).__name__}: {err}"[:500]})
        return None
    return monitor


def _is_scalar_tensor(value: Any) -> bool:
    return hasattr(value, "numel") and value.numel() == 1


# -- liveness: finding runs left RUNNING by SIGKILL or a lost machine -------------------------------
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # a RUNNING run on another machine whose heartbeat is this old is stale


def _process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def liveness_tags() -> dict[str, str]:
    pid = os.getpid()
    return {
        "lightyard.host": socket.gethostname(),
        "lightyard.pid": str(pid),
        "lightyard.pid_start": _process_start(pid),
        "lightyard.heartbeat": str(int(time.time())),
    }


class Heartbeat:
    """Refreshes the run's ``lightyard.heartbeat`` tag every ``HEARTBEAT_S`` from a daemon thread, and its
    ``duration_s`` from the run's clock ``start`` where given: a SIGKILLed segment's time still counts when the run
    is resumed (to the last beat)."""

    def __init__(self, tracker: Tracker, every: float = HEARTBEAT_S, start: float | None = None):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(Tracker(tracker.uri, tracker.run_id), every, start), daemon=True)
        self._thread.start()

    def _beat(self, tracker: Tracker, every: float, start: float | None) -> None:
        while not self._stop.wait(every):
            try:
                tracker.beat(start)
            except Exception:  # a lost store must not kill the run; the next beat tries again
                continue

    def stop(self) -> None:
        self._stop.set()


def stale_reason(run: Any, now: float | None = None) -> str | None:
    """Why a RUNNING run is known dead (its process is gone, or its heartbeat stopped), or None."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    now = time.time() if now is None else now
    pid = tags.get("lightyard.pid", "")
    if tags.get("lightyard.host") == socket.gethostname() and pid.isdigit():
        if _process_start(int(pid)) != tags.get("lightyard.pid_start", ""):
            return f"process {pid} on {tags['lightyard.host']} is gone"
        return None
    beat = tags.get("lightyard.heartbeat", "")
    last = float(beat) if beat.isdigit() else run.info.start_time / 1000
    if now - last > STALE_AFTER_S:
        return f"no heartbeat for {(now - last) / 60:.0f} min"
    return None


def mark_stale(client: Any, runs: Iterable[Any]) -> list[tuple[Any, str]]:
    """Mark each stale RUNNING run KILLED with the reason as its error, ending at its last beat (at its start when it
    never beat: its time is what is known of it, not the days until someone looked); return (run, reason) pairs."""
    marked = []
    for run in runs:
        reason = stale_reason(run)
        if reason:
            beat = run.data.tags.get("lightyard.heartbeat", "")
            end_ms = max(int(beat) * 1000, run.info.start_time) if beat.isdigit() else run.info.start_time
            client.set_tag(run.info.run_id, "error", f"stale: {reason}; marked KILLED")
            client.set_terminated(run.info.run_id, status="KILLED", end_time=end_ms)
            marked.append((run, reason))
    return marked


RUN_ID_PREFIX = re.compile(r"[0-9a-f]{6,31}")  # the start of a run id (32 hex digits) that find_run looks up


def find_run(uri: str, run_id: str, missing: str = ""):
    """(client, run) for a run id or a unique prefix of one (6+ characters, as people copy ids from tables); one line
    when several match, and ``missing`` (or a line of its own) when none does."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        return client, client.get_run(run_id)
    except MlflowException:
        found = []  # not a whole id: perhaps the start of one
    if RUN_ID_PREFIX.fullmatch(run_id):  # a prefix, as people copy ids from tables
        from mlflow.entities import ViewType

        try:  # the runs `lightyard runs` shows, else deleted ones too (get_run finds those); a store without LIKE: none
            ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
            for view in (ViewType.ACTIVE_ONLY, ViewType.ALL) if ids else ():
                found = client.search_runs(ids, filter_string=f"attributes.run_id LIKE '{run_id}%'", run_view_type=view, max_results=6)
                if found:
                    break
        except MlflowException:
            found = []
    if len(found) == 1:
        return client, found[0]
    if found:
        shown = ", ".join(r.info.run_id for r in found[:5]) + (", …" if len(found) > 5 else "")
        raise ConfigError(
            f"run id prefix {run_id} matches {len(found) if len(found) < 6 else 'more than 5'} runs ({shown}); give more of it"
        )
    raise ConfigError(
        missing or f"no run {run_id} in {uri} (a run id, or 6 or more of its first characters); `lightyard runs` lists run ids"
    )
