"""One experiment path: ``lightyard reproduce`` and ``lightyard bench`` as grids of child runs.

A pipeline declares its experiments in ``conf/<pipeline>.yaml`` as data::

    experiments:
      table2:
        command: reproduce           # reproduce | bench: which command runs it (its first is that command's default)
        point: pkg.module:function   # optional: function(cfg, tracker) -> metrics, one grid point; default: `train`'s run
        set: {trainer: {max_epochs: 100}}          # overrides every child gets (nested, like the config)
        grid:                        # a mapping of lists (their product) or a list of such mappings (their union)
          data: {name: ${reproduce.datasets}}
          model: {name: [mlp, gcn, hog_gcn]}
        when:                        # overrides for the children whose point matches `if`
          - {if: {data: {name: texas}}, set: {optim: {lr: 0.005}}}
        report: {tables: [...], figures: [...]}    # see common/report.py

Each grid point is an ordinary run of :func:`common.runner.run_one` (config checks, seeds, device,
signals, provenance tags, memory profiler) under one MLflow parent run. A failed child is FAILED with
its error and the grid goes on (unless its first ``STOP_AFTER`` children, run one at a time, fail alike: the rest
are not started); the parent then ends FAILED with the count. ``resume=<parent id>`` runs
only the points without a FINISHED child (KILLED Lightning children continue from their checkpoint).
Children run one after another (``launcher.workers=N``: N processes at once), or through submitit
(``launcher.name=slurm``: one SLURM job per child; ``submitit_local``: the same path on this machine).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from common import registry
from common.config import ConfigError, check_applies, flatten, pipeline_file, shortcut_for, sweep_points
from common.report import INDEX_TAG, POINT_TAG, SUPERSEDED_TAG, build_report, point_key
from common.runner import _RECEIVED, RunInterrupted, _fail, check_run_config, compose, run_one, stop_on_signals
from common.tracking import Heartbeat, Tracker, check_server, find_run, mark_stale, tracking_uri

STOP_AFTER = 3  # a grid whose first children all fail the same way stops there


@dataclass
class Child:
    index: int
    point: dict[str, Any]
    values: dict[str, Any]  # everything the child's config is composed from (user values, set, when, point)
    reopen: str | None = None  # a KILLED child to continue from its checkpoint
    ckpt: str | None = None

    @property
    def label(self) -> str:
        return point_label(self.point)


_GENERIC = {"name", "enabled", "method", "mode", "type"}  # last parts that say nothing alone (livt: "enabled=False name=ce")


def point_label(point: dict[str, Any]) -> str:
    """``data.name=texas model.name=gcn`` → ``data.name=texas model.name=gcn``; unambiguous last parts alone (``split=3``)
    unless generic (``mgp.enabled=False loss.name=ce``)."""
    last = [k.split(".")[-1] for k in point]
    return " ".join(
        f"{short if last.count(short) == 1 and short not in _GENERIC else key}={value}"
        for key, short, value in zip(point, last, point.values())
    )


@dataclass
class GridResult:
    run_id: str
    status: str
    finished: int
    failed: int
    total: int
    report: str


# -- expansion --------------------------------------------------------------------------------------
def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def expand(spec: DictConfig) -> list[dict[str, Any]]:
    """The grid's points in order: ``{dotted key: value}``; a list of grids is their union (repeats dropped)."""
    grids = _container(spec.get("grid")) or {}
    grids = grids if isinstance(grids, list) else [grids]
    points, seen = [], set()
    for grid in grids:
        axes = flatten(grid) if grid else {}
        for key, values in axes.items():
            if isinstance(values, list) and not values:
                raise ConfigError(f"grid axis '{key}' is empty; give it at least one value")
        keys = list(axes)
        for combo in itertools.product(*(v if isinstance(v, list) else [v] for v in axes.values())):
            point = dict(zip(keys, combo))
            if point_key(point) not in seen:
                seen.add(point_key(point))
                points.append(point)
    return points


def _when(spec: DictConfig, point: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rule in _container(spec.get("when")) or []:
        condition = flatten(rule.get("if") or {})
        if all(str(point.get(k)) == str(v) for k, v in condition.items()):
            out.update(flatten(rule.get("set") or {}))
    return out


def experiment_name(cfg: DictConfig, kind: str) -> str:
    experiments = cfg.get("experiments") or {}
    of_kind = [name for name, spec in experiments.items() if spec.get("command") == kind]
    if cfg.experiment:
        if cfg.experiment not in experiments:
            raise ConfigError(
                f"unknown experiment '{cfg.experiment}' for {cfg.pipeline}; {kind} experiments: {', '.join(of_kind) or '(none)'}"
            )
        if experiments[cfg.experiment].get("command") != kind:
            raise ConfigError(
                f"experiment '{cfg.experiment}' of {cfg.pipeline} runs with `lightyard {experiments[cfg.experiment].command}`, not {kind}"
            )
        return str(cfg.experiment)
    if not of_kind:
        raise ConfigError(f"pipeline '{cfg.pipeline}' declares no {kind} experiment in its config")
    return of_kind[0]


def plan(kind: str, pipeline: str, values: dict[str, Any]) -> tuple[DictConfig, str, list[Child]]:
    """Base config, experiment name and every child with its composed values; every child's config is
    composed and checked here, before any run starts."""
    cfg = compose(pipeline, values)
    check_server(cfg)
    name = experiment_name(cfg, kind)
    spec = cfg.experiments[name]
    fixed = flatten(_container(spec.get("set")) or {})
    user = {k: v for k, v in values.items() if k not in {"experiment", "resume"} and not k.startswith("launcher.")}
    points = expand(spec)
    axes = sorted({k for p in points for k in p} & set(user))
    if axes:
        raise ConfigError(
            f"{', '.join(axes)} is an axis of experiment '{name}': change its values in the grid "
            f"(experiments.{name}.grid...) or in the config keys the grid reads, not on the command line"
        )
    children = []
    for i, point in enumerate(points):
        # the experiment's settings, then the command line (it wins over them), then the point itself
        child_values = {**fixed, **_when(spec, point), **user, **point, "experiment": name}
        children.append(Child(i, point, child_values))
    limit = int(cfg.launcher.max_points)
    if len(children) > limit and not cfg.launcher.allow_large:
        raise ConfigError(f"experiment '{name}' has {len(children)} grid points (over launcher.max_points={limit}); add --yes to run it")
    composed = _checked_points(kind, pipeline, name, children, spec.get("point"))
    check_applies(pipeline, composed, user, registry.get(pipeline).config)
    return cfg, name, children


def _checked_points(kind: str, pipeline: str, name: str, children: list[Child], point: Any) -> list[DictConfig]:
    """Every child's config composed and checked: a bad point fails here, before the parent run exists. A large grid
    says so first and shows a bar (300 hog_gcn points take over a minute); a signal meanwhile stops it in one line."""
    from tqdm import tqdm

    if len(children) > 20:
        print(
            f"{kind} {pipeline} experiment={name}: {len(children)} grid points; checking each one's config before any run opens", flush=True
        )
    _RECEIVED.clear()  # (one recorded earlier in this process, an API caller's last run, is not this grid's)
    composed = []
    try:
        with stop_on_signals():
            for child in tqdm(children, desc="checking the grid", unit="point", disable=len(children) <= 20):
                composed.append(compose(pipeline, child.values))
                check_run_config(composed[-1], point)
    except ConfigError as err:
        raise ConfigError(f"{err}{_unset_source(pipeline, kind, name, str(err))}") from None
    except BaseException:
        if not _RECEIVED:
            raise
        stop = RunInterrupted(_RECEIVED[-1], f"stopped by signal {_RECEIVED[-1]}")  # (OmegaConf may have wrapped ours)
        stop.pipeline, stop.command, stop.resumable, stop.why_not = pipeline, kind, False, "no run was opened yet"
        raise stop from None
    return composed


def _unset_source(pipeline: str, kind: str, experiment: str, message: str) -> str:
    """Where an error names a key that the experiment's ``set`` takes from another (``data.root: ${reproduce.root}``),
    the key to give on this command line (its shortcut, ``root=``): the error's own advice names the child's key.
    A hint only: anything unexpected gives none, and the error stands as it was."""
    try:
        path = registry.get(pipeline).config
        experiments = pipeline_file(pipeline, path).experiments
        raw = OmegaConf.select(experiments, f"{experiment}.set", throw_on_resolution_failure=False)
        for key, value in flatten(OmegaConf.to_container(raw, resolve=False) if raw is not None else {}).items():
            source = re.fullmatch(r"\$\{([\w.]+)\}", str(value))
            if source and re.search(rf"(?<![\w.]){re.escape(key)}=<", message):  # (the advice, "needs data.root=<folder>")
                # the same command's experiments that do not read that folder (compression's default reads CIFAR-10)
                others = "|".join(
                    n
                    for n, e in experiments.items()
                    if n != experiment and e.get("command") == kind and value not in str(OmegaConf.to_yaml(e.get("set") or {}))
                )
                instead = f", or {shortcut_for(pipeline, 'experiment', path)}={others}" if others else ""
                return f" (this {kind} sets {key} from {source[1]}: give {shortcut_for(pipeline, source[1], path)}=<…>{instead})"
    except Exception:  # (a hint must not replace the error it adds to)
        return ""
    return ""


# -- one child, wherever it runs --------------------------------------------------------------------
def run_child(
    pipeline: str,
    values: dict[str, Any],
    uri: str,
    parent_id: str,
    point: dict[str, Any],
    index: int,
    reopen: str | None = None,
    ckpt: str | None = None,
) -> str:
    """Run one grid point as a child of ``parent_id``; returns its final status ("FINISHED" or "FAILED: …").
    Picklable: worker processes and submitit jobs call it with the same arguments as the local loop."""
    cfg = compose(pipeline, values)
    cfg.logger.tracking_uri = uri  # the parent's store, wherever this runs (a submitit job on another node too)
    spec = cfg.experiments[cfg.experiment]
    cfg.run_name = cfg.run_name or f"{pipeline} {point_label(point)}"
    tags = {POINT_TAG: point_key(point), INDEX_TAG: str(index), "lightyard.experiment": str(cfg.experiment)}
    try:
        run_one(cfg, parent=Tracker(uri, parent_id), ckpt_path=ckpt, reopen=reopen, tags=tags, target=spec.get("point"))
    except RunInterrupted:
        raise
    except Exception as err:  # the child is FAILED in MLflow with its traceback; the grid goes on
        return f"FAILED: {type(err).__name__}: {err}".splitlines()[0][:300]
    return "FINISHED"


# -- launchers --------------------------------------------------------------------------------------
def _launch_local(pipeline: str, children: list[Child], uri: str, parent_id: str, workers: int) -> list[str]:
    args = [(pipeline, c.values, uri, parent_id, c.point, c.index, c.reopen, c.ckpt) for c in children]
    statuses: list[str] = []
    if workers <= 1:
        for n, (child, a) in enumerate(zip(children, args), 1):
            print(f"[{n}/{len(children)}] {child.label}", flush=True)
            statuses.append(run_child(*a))
            if statuses[-1] != "FINISHED":
                print(f"  child failed: {statuses[-1]}", file=sys.stderr, flush=True)
                if len(statuses) == STOP_AFTER and all(s == statuses[0] for s in statuses):
                    print(
                        f"  the first {STOP_AFTER} children failed alike; the rest are not started (fix it, then resume)",
                        file=sys.stderr,
                        flush=True,
                    )
                    return statuses + ["FAILED: not started"] * (len(children) - len(statuses))
        return statuses
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_child, *a): child for child, a in zip(children, args)}
        done = 0
        for future in as_completed(futures):
            done += 1
            try:
                status = future.result()
            except RunInterrupted as stop:
                status = f"KILLED: {stop}"
            statuses.append(status)
            print(f"[{done}/{len(children)}] {futures[future].label}: {status}", flush=True)
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)  # each running child ends KILLED
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return statuses


def _launch_submitit(pipeline: str, children: list[Child], uri: str, parent_id: str, launcher: DictConfig) -> list[str]:
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher.name=slurm needs submitit: pip install submitit") from None
    folder = Path(launcher.folder) / parent_id
    if launcher.name == "submitit_local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int(launcher.slurm.time_min))
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        s = launcher.slurm
        params = {
            "timeout_min": int(s.time_min),
            "gpus_per_node": int(s.gpus_per_node),
            "cpus_per_task": int(s.cpus_per_task),
            "mem_gb": float(s.mem_gb),
            "slurm_array_parallelism": int(launcher.workers) if launcher.workers > 1 else len(children),
        }
        if s.partition:
            params["slurm_partition"] = str(s.partition)
        if s.account:
            params["slurm_account"] = str(s.account)
        executor.update_parameters(**params, **(_container(s.additional) or {}))
    jobs = [executor.submit(run_child, pipeline, c.values, uri, parent_id, c.point, c.index, c.reopen, c.ckpt) for c in children]
    print(f"submitted {len(jobs)} jobs ({launcher.name}); logs under {folder}", flush=True)
    statuses = []
    try:
        for n, (child, job) in enumerate(zip(children, jobs), 1):
            try:
                status = job.result()
            except Exception as err:  # the job died (node lost, timeout, cancelled)
                status = f"FAILED: job {job.job_id}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
            statuses.append(status)
            print(f"[{n}/{len(children)}] {child.label}: {status}", flush=True)
    except BaseException:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        for job in jobs:  # wait for the cancelled children to mark themselves KILLED
            deadline = time.time() + 60
            while not job.done() and time.time() < deadline:
                time.sleep(0.2)
        raise
    return statuses


def _launch(pipeline: str, children: list[Child], uri: str, parent_id: str, launcher: DictConfig) -> list[str]:
    if launcher.name == "local":
        return _launch_local(pipeline, children, uri, parent_id, int(launcher.workers))
    if launcher.name in ("slurm", "submitit_local"):
        return _launch_submitit(pipeline, children, uri, parent_id, launcher)
    raise ConfigError(f"unknown launcher.name '{launcher.name}'; valid: local, submitit_local, slurm")


# -- the command ------------------------------------------------------------------------------------
def _run_grid(kind: str, cfg: DictConfig, name: str, todo: list[Child], parent: Tracker, total: int) -> GridResult:
    uri = parent.uri
    heartbeat = Heartbeat(parent)
    status = "FINISHED"
    _RECEIVED.clear()  # one recorded earlier in this process (an API caller's last run) is not this grid's
    try:
        with stop_on_signals():
            print(
                f"{kind} {cfg.pipeline} experiment={name}: {len(todo)} of {total} child runs to run "
                f"(parent run {parent.run_id}, launcher {cfg.launcher.name})",
                flush=True,
            )
            statuses = _launch(cfg.pipeline, todo, uri, parent.run_id, cfg.launcher) if todo else []
            failed = [s for s in statuses if s != "FINISHED"]
            line = f"{total - len(failed)} of {total} child runs finished" + (f", {len(failed)} failed" if failed else "")
            report = build_report(parent, cfg, name, status_line=line + ".")
    except RunInterrupted as stop:
        stop.pipeline, stop.run_id, stop.command, stop.resumable = cfg.pipeline, parent.run_id, kind, True
        heartbeat.stop()
        parent.end("KILLED", error=str(stop))
        raise
    except BaseException as err:
        heartbeat.stop()
        if _RECEIVED:  # our signal, wrapped on its way up (a child's config being composed: OmegaConf's error)
            stop = RunInterrupted(_RECEIVED[-1], f"stopped by signal {_RECEIVED[-1]}")
            stop.pipeline, stop.run_id, stop.command, stop.resumable = cfg.pipeline, parent.run_id, kind, True
            parent.end("KILLED", error=str(stop))
            raise stop from None
        _fail(parent, err)
        raise
    heartbeat.stop()
    if failed:
        status = "FAILED"
        parent.end("FAILED", error=f"{len(failed)} of {total} child runs failed; first: {failed[0]}")
    else:
        parent.end("FINISHED")
    return GridResult(parent.run_id, status, total - len(failed), len(failed), total, report)


def _children(client: Any, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)


def run_experiment(kind: str, pipeline: str, overrides: list[str]) -> GridResult:
    """``lightyard reproduce|bench <pipeline> [experiment=<name>] [resume=<parent id>] [launcher.…]``."""
    points = sweep_points(overrides)
    if len(points) > 1:
        raise ConfigError(f"{kind} takes single values, not comma sweeps (got {' '.join(overrides)}); the grid is the experiment's")
    values = points[0]
    if values.get("resume"):
        return resume_experiment(kind, pipeline, str(values["resume"]), values)
    cfg, name, children = plan(kind, pipeline, values)
    parent = Tracker.start(
        cfg,
        cfg.run_name or f"{pipeline} {kind} {name}",
        tags={"lightyard.kind": kind, "lightyard.experiment": name, "lightyard.grid_size": str(len(children))},
    )
    parent.log_config(cfg)
    parent.log_text(
        json.dumps({"kind": kind, "experiment": name, "values": values, "points": [c.point for c in children]}, indent=1, default=str),
        "grid.json",
    )
    return _run_grid(kind, cfg, name, children, parent, len(children))


def _grid_record(client: Any, parent_id: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_id, "grid.json", tmp)
        except Exception:
            try:  # a child: name its parent
                parent = client.get_run(parent_id).data.tags.get("mlflow.parentRunId")
            except Exception:
                parent = None
            hint = f"; its parent is {parent} (lightyard report {parent})" if parent else ""
            raise ConfigError(f"run {parent_id} has no grid.json: it is not the parent run of a reproduce or bench{hint}") from None
        return json.loads(Path(path).read_text())


def resume_experiment(kind: str, pipeline: str, parent_id: str, values: dict[str, Any]) -> GridResult:
    """Run the points of an earlier grid that have no FINISHED child; stale RUNNING children are marked KILLED first."""
    extra = {k: v for k, v in values.items() if k != "resume"}
    uri = tracking_uri(compose(pipeline, {}))
    client, run = find_run(uri, parent_id)
    parent_id, tags = run.info.run_id, run.data.tags  # a prefix given: the whole id from here on
    if tags.get("lightyard.pipeline") != pipeline or tags.get("lightyard.kind") != kind:
        raise ConfigError(
            f"run {parent_id} is a {tags.get('lightyard.kind', 'train run')} of {tags.get('lightyard.pipeline', '?')}, "
            f"not a {kind} of {pipeline}"
        )
    if any(not k.startswith("launcher.") for k in extra):
        raise ConfigError(f"resume={parent_id} reruns that grid as it was; only launcher.* may change (got {', '.join(extra)})")
    if run.info.status == "RUNNING":
        if not mark_stale(client, [run]):
            raise ConfigError(
                f"run {parent_id} is still RUNNING (pid {tags.get('lightyard.pid')} on {tags.get('lightyard.host')}); "
                "stop it first or wait for it"
            )
    record = _grid_record(client, parent_id)
    cfg, name, children = plan(kind, pipeline, {**record["values"], **extra})
    if name != record["experiment"] or [point_key(c.point) for c in children] != [point_key(p) for p in record["points"]]:
        raise ConfigError(f"the {kind} config of {pipeline} changed since run {parent_id} (its grid differs); start a new {kind}")
    existing = _children(client, parent_id)
    mark_stale(client, existing)
    latest: dict[str, Any] = {}
    for child in sorted(existing, key=lambda r: r.info.start_time):
        if POINT_TAG in child.data.tags and not child.data.tags.get(SUPERSEDED_TAG):
            latest[child.data.tags[POINT_TAG]] = client.get_run(child.info.run_id)
    todo = []
    for child in children:
        previous = latest.get(point_key(child.point))
        if previous is None:
            todo.append(child)
            continue
        status = previous.info.status
        if status == "FINISHED":
            continue
        if status == "RUNNING":
            raise ConfigError(f"child run {previous.info.run_id} ({child.label}) is still RUNNING; wait for it or stop it")
        run_dir = Path(previous.data.tags.get("lightyard.run_dir", "/nonexistent"))
        ckpt = run_dir / "checkpoints" / "interrupted.ckpt"
        if status == "KILLED" and ckpt.is_file():
            child.reopen, child.ckpt = previous.info.run_id, str(ckpt)
        else:
            client.set_tag(previous.info.run_id, SUPERSEDED_TAG, "true")
        todo.append(child)
    parent = Tracker.reopen(uri, parent_id)
    return _run_grid(kind, cfg, name, todo, parent, len(children))


def report_command(run_ids: list[str]) -> str:
    """``lightyard report <parent run id>``: rebuild the tables and figures from the store, log them to the parent.
    Several ids (reruns of one experiment with the same settings): the tables with min–max cells, printed only."""
    from common.tracking import project_tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or project_tracking_uri()
    import tempfile

    parents = []
    for given in run_ids:
        client, run = find_run(uri, given)
        run_id = run.info.run_id
        if any(seen.info.run_id == run.info.run_id for seen, _, _ in parents):  # a range of one run twice is no range
            raise ConfigError(f"run {run.info.run_id} is given twice: a range over reruns needs each parent id once")
        record = _grid_record(client, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
        parents.append((run, record, cfg))
    if len(parents) > 1:
        return _range_report(client, parents)
    ((run, record, cfg),) = parents
    statuses = [c.info.status for c in _children(client, run.info.run_id) if not c.data.tags.get(SUPERSEDED_TAG)]
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    line = f"{len(record['points'])} grid points; child runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return build_report(Tracker(uri, run.info.run_id), cfg, record["experiment"], status_line=line + ".")


def _range_report(client: Any, parents: list[tuple[Any, dict, DictConfig]]) -> str:
    """Several parents pooled into one range per cell: only reruns of one experiment with the same settings (a cell
    pooled over different settings would be a range of different things)."""
    from common.report import build_range_report

    first_run, first_record, first_cfg = parents[0]
    reference = _settings(first_cfg)
    for run, record, cfg in parents[1:]:
        if (cfg.pipeline, record["experiment"]) != (first_cfg.pipeline, first_record["experiment"]):
            raise ConfigError(
                f"run {run.info.run_id} is {cfg.pipeline} experiment={record['experiment']}, run {first_run.info.run_id} is "
                f"{first_cfg.pipeline} experiment={first_record['experiment']}: a range pools reruns of one experiment"
            )
        values = _settings(cfg)
        differ = [k for k in dict.fromkeys([*reference, *values]) if reference.get(k, "<unset>") != values.get(k, "<unset>")]
        if differ:
            shown = ", ".join(f"{k} ({_shown(reference.get(k, '<unset>'))} vs {_shown(values.get(k, '<unset>'))})" for k in differ[:5])
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            raise ConfigError(
                f"runs {first_run.info.run_id} and {run.info.run_id} differ in {shown}{more}: a range pools reruns with the "
                "same settings; report them one by one"
            )
    return build_range_report(client, first_cfg, first_record["experiment"], [run for run, _, _ in parents])


_NOT_SETTINGS = (
    "run_name",
    "resume",
    "paths.",
    "logger.",
    "launcher.folder",
    "launcher.slurm.",
    "launcher.max_points",
    "launcher.allow_large",
)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """A run's config less what names, places or logs it (a rerun from another clone or home is the same settings)."""
    return {k: v for k, v in flatten(cfg).items() if not k.startswith(_NOT_SETTINGS)}


def stale_command(uri: str) -> list[dict]:
    """``lightyard runs --stale``: every RUNNING run whose process is gone, marked KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=50000) if ids else []
    return [
        {
            "run_id": run.info.run_id,
            "pipeline": run.data.tags.get("lightyard.pipeline", "?"),
            "run_name": run.info.run_name,
            "why": reason,
            "now": "KILLED",
        }
        for run, reason in mark_stale(client, running)
    ]
