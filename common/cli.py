"""The ``lightyard`` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import datetime

from pathlib import Path

from common.config import ConfigError

EPILOG = """examples:
  lightyard list
  lightyard train iiot_sic_aloha
  lightyard train iiot_sic_aloha sim.num_nodes=10,20 preset=quick     (a sweep: parent + child runs)
  lightyard train <pipeline> resume=<run id>                             (continue an interrupted run)
  lightyard reproduce <pipeline> [experiment=<name>] [launcher.workers=2]  (a grid: parent + child runs, then tables)
  lightyard reproduce <pipeline> resume=<parent run id>                   (run only the unfinished children)
  lightyard report <parent run id> [<id> ...]                            (rebuild the tables from MLflow; several: min–max)
  lightyard runs --limit 10
  lightyard runs --stale                                                 (mark runs of dead processes KILLED)
  lightyard ui
"""


PRESET_ORDER = {"smoke": 0, "demo": 1, "quick": 2, "paper": 3}  # by size; a pipeline's own presets after them


def _cmd_list(args: argparse.Namespace) -> int:
    from common.registry import all_pipelines
    from common.tables import markdown_table

    rows = []
    for p in all_pipelines():
        cfg = _pipeline_yaml(p.name)
        experiments = cfg.get("experiments") or {}
        by_command = {c: [n for n, e in experiments.items() if e.get("command", "reproduce") == c] for c in ("reproduce", "bench")}
        rows.append(
            {
                "pipeline": p.name,
                "presets (preset=)": ", ".join(sorted(cfg.get("presets") or {}, key=lambda n: (PRESET_ORDER.get(n, 9), n))),
                "reproduce experiments": ", ".join(by_command["reproduce"]) or "-",
                "bench experiments": ", ".join(by_command["bench"]) or "-",
                "description": p.description,
            }
        )
    print(markdown_table(rows))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from common.environment import LOCK_FILE, check_lock, environment_report

    if args.check_lock:
        problems = check_lock()
        for problem in problems:
            print(f"lightyard: error: {problem}", file=sys.stderr)
        if not problems:
            print(f"{LOCK_FILE.name} matches pyproject.toml")
        return 1 if problems else 0
    print(environment_report(), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from common.runner import train

    from common.hardware import global_rank

    results = train(args.pipeline, _with_yes(args))
    if global_rank() == 0:  # under torchrun / srun / fabric run, rank 0 speaks
        _print_results(results)
    return 0


def _with_yes(args: argparse.Namespace) -> list[str]:
    given = _given(args.overrides, "launcher.allow_large")
    return [*args.overrides, "launcher.allow_large=true"] if args.yes and not given else list(args.overrides)


def _print_results(results) -> None:
    from common.tables import markdown_table

    rows = []
    for result in results:
        row = {"run_id": result.run_id, "status": result.status}
        keys = list(result.config.logger.key_metrics) if result.config is not None else []
        for key in keys or sorted(result.metrics)[:4]:
            row[key] = result.metrics.get(key)
        rows.append(row)
    print(markdown_table(rows, title="Runs"))


def _cmd_entry(args: argparse.Namespace) -> int:
    from common.grid import run_experiment

    result = run_experiment(args.command, args.pipeline, _with_yes(args))
    print(result.report)
    print(
        f"parent run {result.run_id}: {result.finished} of {result.total} child runs finished; "
        f"`lightyard report {result.run_id}` rebuilds these tables",
        flush=True,
    )
    if result.failed:
        print(
            f"lightyard: {result.failed} of {result.total} child runs failed (each FAILED in MLflow with its error); "
            f"rerun them with: lightyard {args.command} {args.pipeline} resume={result.run_id}",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from common.grid import report_command

    print(report_command(args.run_id))
    return 0


def run_rows(uri: str, pipeline: str | None = None, limit: int = 20) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from common.tracking import stale_reason

    client = MlflowClient(tracking_uri=uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = f"tags.`lightyard.pipeline` = '{pipeline}'" if pipeline else ""
    runs = client.search_runs(experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    for run in runs:
        info, data = run.info, run.data
        keys = [k for k in data.tags.get("lightyard.key_metrics", "").split(",") if k]
        keys = keys or sorted(k for k in data.metrics if not k.startswith("memory/") and k != "duration_s")[:3]
        rows.append(
            {
                "run_id": info.run_id,
                "pipeline": data.tags.get("lightyard.pipeline", "?"),
                "run_name": info.run_name if len(info.run_name or "") <= 60 else info.run_name[:59] + "…",  # one table row a line
                "status": info.status,
                "started": datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
                "duration_s": round(_worked_s(info, data, time.time(), stale_reason(run) is None), 1),
                "metrics": ", ".join(f"{k}={data.metrics[k]:.4g}" for k in keys if k in data.metrics),
            }
        )
    return rows


def _worked_s(info, data, now: float, alive: bool) -> float:
    """A run's working time: its segments summed (``duration_s``, logged at each segment's end and by its heartbeat)
    and, while it runs, the time since its last beat; the time between a stop and its resume is left out. A RUNNING
    run whose process is gone (``not alive``) stays at its last beat. A grid parent logs no duration_s: start to end."""
    worked, beat = data.metrics.get("duration_s"), data.tags.get("lightyard.heartbeat", "")
    if info.status == "RUNNING" and alive:
        return worked + now - int(beat) if worked is not None and beat.isdigit() else now - info.start_time / 1000
    if info.status == "RUNNING" and worked is None and beat.isdigit():  # dead before its first beat's time was logged
        return int(beat) - info.start_time / 1000
    return worked if worked is not None else ((info.end_time or now * 1000) - info.start_time) / 1000


def _cmd_runs(args: argparse.Namespace) -> int:
    from common.tables import markdown_table
    from common.tracking import project_tracking_uri

    if not 1 <= args.limit <= 50000:  # MLflow's own cap on one search
        raise ConfigError(f"--limit must be in 1..50000, got {args.limit}")
    if args.stale and (args.pipeline or args.limit != 20):
        raise ConfigError("--stale checks every run of the store; give it alone (without --pipeline or --limit)")
    if args.pipeline:
        from common.registry import get

        get(args.pipeline)  # an unknown name is one line listing the registered ones
    uri = project_tracking_uri()
    if args.stale:
        from common.grid import stale_command

        print(markdown_table(stale_command(uri), title=f"Stale runs marked KILLED ({uri})"))
        return 0
    print(markdown_table(run_rows(uri, args.pipeline, args.limit), title=f"Recent runs ({uri})"))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    import socket

    from common.tracking import project_tracking_uri

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    uri = project_tracking_uri()
    if not uri.startswith("sqlite:"):
        raise ConfigError(f"runs are logged to {uri}: open that server in a browser (lightyard ui serves the local store only)")
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except socket.gaierror as err:  # the host, not the port
            raise ConfigError(
                f"cannot serve on {args.host} ({err.strerror}); give --host an address of this machine (default 127.0.0.1)"
            ) from None
        except OSError as err:
            raise ConfigError(f"cannot serve on {args.host}:{args.port} ({err.strerror}); pick another with --port") from None
    # one worker: a local UI for one person (MLflow's default of 4 took ~35 s to answer on 2 cores)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (store: {uri}); Ctrl+C stops it", flush=True)
    os.execv(sys.executable, command)
    return 0


def _demo_in_process(names: list[str], overrides: list[str]) -> list[dict]:
    """One pipeline after another in this process (``--workers 1``)."""
    from common.runner import RunInterrupted, train

    rows = []
    for name in names:
        start = time.time()
        try:
            result = train(name, _demo_overrides(name, overrides))[0]
            status, run_id = result.status, result.run_id
        except (ConfigError, RunInterrupted):
            raise
        except Exception as err:  # one pipeline failing does not hide the others; the exit code says so
            first = str(err).splitlines()[0][:120] if str(err) else ""
            status, run_id = f"FAILED: {type(err).__name__}: {first}", getattr(err, "lightyard_run_id", "–")
        rows.append({"pipeline": name, "status": status, "run_id": run_id, "seconds": round(time.time() - start, 1)})
    return rows


def _demo_child(argv: list[str], log: str) -> None:
    """A demo child: ``lightyard <argv>`` with its console in ``log``; its exit code is the command's."""
    import signal

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # new streams on those descriptors: the inherited ones may be a caller's in-memory capture, or hold its buffer
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the demo parent's handler: the run's own (KILLED) takes over
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _preload_common() -> None:
    """Import what every child needs once, here: forked children then start in a fraction of a second instead of
    spending ~10 s of CPU each on importing torch, Lightning and MLflow (11 pipelines: half the demo on 2 cores)."""

    import common.runner  # noqa: F401  (torch, Lightning, OmegaConf)
    from common.environment import environment_report

    environment_report()  # cached: reading every package's metadata once, not in each child
    # what the runs import lazily: MLflow's SQLite store and monitors, the plot backend
    _import_all(
        "mlflow.tracking",
        "mlflow.store.tracking.sqlalchemy_store",
        "mlflow.system_metrics.system_metrics_monitor",
        "sqlalchemy.dialects.sqlite",
        "matplotlib.backends.backend_agg",
    )


def _import_all(*modules: str) -> None:
    """Import each module that imports; a failing one is the child's to meet and report in its own log."""
    import contextlib
    import importlib

    for module in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def _preload_pipelines(names: list[str]) -> None:
    """The pipelines' own modules and timm (~6 s): imported while the first child already runs."""
    from common.registry import get

    _import_all("timm.models.vision_transformer", "timm.data", "timm.optim")
    for name in names:
        pipeline = get(name)
        _import_all(*(target.partition(":")[0] for target in filter(None, (pipeline.module, pipeline.datamodule))))


def _demo_in_children(names: list[str], overrides: list[str], workers: int, logs: Path) -> list[dict]:
    """``workers`` pipelines at a time, each a ``lightyard train`` child process (forked after the imports are
    done) with its console in ``logs/<name>.log``; a line per pipeline as it ends. A bad override (a config error in a
    child) stops them all and is one line here."""
    import multiprocessing
    import re
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    logs.mkdir(parents=True, exist_ok=True)
    fork = "fork" in multiprocessing.get_all_start_methods()
    # the parent takes one worker's place until it has imported what the children share; the first child starts at
    # once and imports its own on the other core (started after the parent's torch, MLflow and matplotlib, it found
    # that core idle for their ~7 s and then imported Lightning and timm again anyway)
    preloading = fork
    context = multiprocessing.get_context("fork" if fork else "spawn")
    queue, running, rows = list(names), {}, {}
    previous = signal.signal(signal.SIGTERM, stop)  # a SIGTERM to the demo ends the children's runs too
    try:
        while queue or running:
            while queue and len(running) < max(1, workers - preloading):
                name = queue.pop(0)
                sys.stdout.flush()
                sys.stderr.flush()
                # one torch thread each (unless given): children side by side on as many cores
                argv = ["train", name, *_demo_overrides(name, overrides), *([] if _given(overrides, "threads") else ["threads=1"])]
                proc = context.Process(target=_demo_child, args=(argv, str(logs / f"{name}.log")))
                proc.start()
                running[name] = (proc, time.time())
            if preloading:
                _preload_common()
                _preload_pipelines(names)
                preloading = False
                continue
            for name, (proc, start) in list(running.items()):
                if proc.exitcode is None:
                    continue
                proc.join()
                del running[name]
                text = (logs / f"{name}.log").read_text(errors="replace")
                lines = [line for line in text.splitlines() if line.strip()]
                error = next((line for line in reversed(lines) if line.startswith("lightyard: ")), None)
                if proc.exitcode == 2 and error and error.startswith("lightyard: error: "):
                    others = f" (the demo stopped {', '.join(running)} too)" if running else ""
                    raise ConfigError(f"{name}: {error.removeprefix('lightyard: error: ')}{others}")
                found = re.findall(r"^\|\s*([0-9a-f]{32})\s*\|\s*([A-Z]+)\s*\|", text, re.M)
                run_id, status = found[-1] if found else ("–", "FAILED")
                if proc.exitcode != 0:
                    why = (error or (lines[-1] if lines else "no output")).removeprefix("lightyard: ").removeprefix("failed: ")
                    status = f"FAILED: {why[:160]}"
                    run_id = next(iter(re.findall(r"MLflow run ([0-9a-f]{32})", why)), run_id)
                rows[name] = {"pipeline": name, "status": status, "run_id": run_id, "seconds": round(time.time() - start, 1)}
                print(
                    f"{'done' if status == 'FINISHED' else 'FAILED'}  {name:<16} {rows[name]['seconds']:6.1f} s   (console: {logs / name}.log)",
                    flush=True,
                )
            time.sleep(0.2)
    finally:  # Ctrl+C, SIGTERM or a config error: the children end their runs (KILLED) before we leave
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.join(timeout=60)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        signal.signal(signal.SIGTERM, previous)
    return [rows[name] for name in names]


def _given(overrides: list[str], key: str) -> bool:
    """Does the user set ``key`` among the overrides (a key given twice is refused, so ours gives way)?"""
    return any(o.partition("=")[0].strip() == key for o in overrides)


def _demo_overrides(name: str, overrides: list[str]) -> list[str]:
    """The demo's preset unless the user gave one (a key given twice is refused)."""
    return list(overrides) if _given(overrides, "preset") else [_demo_preset(name), *overrides]


def _demo_preset(name: str) -> str:
    return "preset=demo" if _has_preset(name, "demo") else "preset=quick"


def _cmd_demo(args: argparse.Namespace) -> int:
    """Every registered pipeline on its embedded default, demo (else quick) preset; then the runs table."""
    from common.config import lightyard_home
    from common.registry import all_pipelines, get
    from common.tables import markdown_table
    from common.tracking import project_tracking_uri

    registered = [p.name for p in all_pipelines() if not p.name.startswith("_")]
    unknown = [name for name in args.pipelines or [] if name not in registered]
    if unknown:
        raise ConfigError(f"unknown pipeline '{unknown[0]}' in --pipelines (overrides go before it); registered: {', '.join(registered)}")
    names = [name for name in registered if not args.pipelines or name in args.pipelines]
    workers = args.workers if args.workers is not None else min(2, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {workers}")
    started = time.time()
    if workers == 1:
        for name in names:
            print(f"\n=== {name}", flush=True)
        rows = _demo_in_process(names, list(args.overrides))
    else:
        longest_first = sorted(names, key=lambda name: -get(name).demo_seconds)  # the last to start ends soon after
        one = "" if _given(args.overrides, "threads") else " (each with one torch thread)"
        print(f"{len(names)} pipeline{'s' * (len(names) != 1)}, {workers} at a time{one}: {', '.join(longest_first)}", flush=True)
        logs = Path(lightyard_home()) / "outputs" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
        rows = sorted(_demo_in_children(longest_first, list(args.overrides), workers, logs), key=lambda row: row["pipeline"])
    print()
    print(
        markdown_table(
            rows,
            title=f"Demo runs, {time.time() - started:.0f} s in all (each a short run; `lightyard train <pipeline>` runs the quick preset, preset=paper the paper's settings)",
        )
    )
    uri = project_tracking_uri()
    run_ids = [row["run_id"] for row in rows]
    own = [row for row in run_rows(uri, limit=max(50, 5 * len(rows))) if row["run_id"] in run_ids]
    print(markdown_table(own, title=f"In MLflow ({uri})"))
    print("See them in the browser: lightyard ui   (then open http://127.0.0.1:5000)")
    return 0 if all(row["status"] == "FINISHED" for row in rows) else 1


def _pipeline_yaml(pipeline: str):
    """The pipeline's own config file as written (presets and experiments not applied)."""
    from common.config import pipeline_file
    from common.registry import get

    return pipeline_file(pipeline, get(pipeline).config)


def _has_preset(pipeline: str, preset: str) -> bool:
    return preset in (_pipeline_yaml(pipeline).get("presets") or {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightyard",
        description="Run Lightyard's research pipelines and compare them in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library output too (Lightning, MLflow, warnings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", **_said("registered pipelines with a one-line description, their presets and experiments")).set_defaults(
        func=_cmd_list
    )

    common_keys = (
        "preset=smoke|quick|paper (sizes; quick is the default), seed=N, threads=N (0: torch's default), "
        "trainer.accelerator=cpu|cuda, trainer.devices=N"
    )
    p = sub.add_parser(
        "train",
        help="one run, or a sweep over comma-separated values",
        description=(
            "Train (or simulate) one pipeline; every run is logged to MLflow.\n\n"
            f"overrides: any config key as key=value (conf/<pipeline>.yaml), e.g. {common_keys};\n"
            "  key=a,b,c sweeps over values (a parent run with one child per point);\n"
            "  resume=<run id | path.ckpt> continues an interrupted run; freeze=[name,…] freezes parameter groups by name (no gradients, no optimizer state)"
        ),
        epilog="pipelines, their presets and experiments: lightyard list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pipeline")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides key=value; key=a,b,c sweeps")
    p.add_argument("--yes", action="store_true", help="run a sweep larger than launcher.max_points")
    p.set_defaults(func=_cmd_train)

    for name, text in (
        ("bench", "the pipeline's bench grid: speed/memory, one child run per point, same-run ratios"),
        ("reproduce", "the pipeline's experiment grid: one child run per point, tables beside the paper's numbers"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=(
                f"{_said(text)['description']}\n\noverrides: single values only (the grid is the experiment's), e.g. {common_keys};\n"
                "  experiment=<name> picks one of the pipeline's experiments; resume=<parent id> reruns only the points "
                "without a FINISHED child;\n  launcher.workers=N runs N children at once; launcher.name=submitit_local|slurm"
            ),
            epilog="pipelines, their presets and experiments: lightyard list",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("pipeline")
        p.add_argument("overrides", nargs="*", default=[], help="config overrides key=value (single values)")
        p.add_argument("--yes", action="store_true", help="run a grid larger than launcher.max_points")
        p.set_defaults(func=_cmd_entry)

    p = sub.add_parser(
        "runs",
        help="a table of recent runs from MLflow",
        description="A table of recent runs from MLflow (status, key metrics); --stale marks runs whose process died KILLED.",
    )
    p.add_argument("--pipeline", help="only this pipeline's runs")
    p.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    p.add_argument("--stale", action="store_true", help="find runs left RUNNING by a killed process or a lost machine and mark them KILLED")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("report", **_said("rebuild a reproduce/bench parent run's tables and figures from MLflow (no rerun)"))
    p.add_argument(
        "run_id",
        nargs="+",
        help="the parent run id that reproduce/bench printed; several (reruns with the same settings): min–max per cell",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("ui", **_said("start the MLflow UI on the project's store (127.0.0.1)"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("env", **_said("what runs here: lock hash, Python, torch, CUDA, cuDNN, GPUs, packages (for a bug report)"))
    p.add_argument("--check-lock", action="store_true", help="only check that requirements.lock matches pyproject.toml (offline)")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("demo", **_said("every pipeline on its embedded data (demo-sized runs), then the runs table"))
    p.add_argument("overrides", nargs="*", help="overrides applied to every pipeline")
    p.add_argument("--pipelines", nargs="+", help="only these pipelines")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pipelines at once, each in its own process (default: 2 where there are 2 cores; 1 runs them in this process)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def _said(text: str) -> dict[str, str]:
    """A command's line in the top-level help, and the same as the sentence its own --help opens with."""
    return {"help": text, "description": text[0].upper() + text[1:] + "."}


def quiet_console(verbose: bool) -> None:
    """By default the console shows our lines, progress bars and tables; library chatter (Lightning's tips and
    device lines, model summaries, deprecation warnings, MLflow's store messages) only with -v."""
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports to MLflow's servers (set it to false to send them)
    if not sys.stderr.isatty():  # a log file: one progress line every 30 s per bar, not one per update (tqdm reads TQDM_*)
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    if verbose:
        os.environ["LIGHTYARD_VERBOSE"] = "1"
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # children (spawned workers, submitit jobs) stay quiet too
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow resets its logger level when imported
    warnings.filterwarnings("ignore")
    # every library's INFO lines (Lightning's device summary, tips and "configured so 100 %", MLflow's store
    # messages) stop here, whatever handlers the libraries attach when imported; warnings and errors pass
    logging.disable(logging.INFO)
    # torchao (imported by transformers for vocab_kd's teacher) registers enums torch now handles itself: a WARNING a line
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # MLflow logs a database error with its traceback before raising it; the raised error gets its one line from main
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v and --yes anywhere (argparse takes them only before the command / after the overrides); no override has
    # these spellings (an override always holds '=')
    verbose, yes = [a for a in argv if a in ("-v", "--verbose")], [a for a in argv if a == "--yes"]
    args = build_parser().parse_args(verbose + [a for a in argv if a not in ("-v", "--verbose", "--yes")] + yes)
    quiet_console(args.verbose or os.environ.get("LIGHTYARD_VERBOSE", "") not in {"", "0"})
    previous = _stop_on_sigterm()
    try:
        try:
            return args.func(args)
        except BaseException:
            _close_bars()
            raise
    except _Stopped as stop:  # outside a run (the runner's own handlers mark an open run KILLED)
        print(f"lightyard: stopped by signal {stop.signum} (no run was open: rerun it)", file=sys.stderr)
        return 128 + stop.signum
    except ConfigError as err:
        run_id = getattr(err, "lightyard_run_id", None)  # found once a run had opened (the data's content, say)
        print(f"lightyard: error: {err}" + (f" (MLflow run {run_id} marked FAILED)" if run_id else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lightyard: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a crash: the run is FAILED in MLflow with its traceback
        # a run stopped by a signal; only a command that ran something has imported the runner (and torch with it:
        # the others, `list` or `runs`, start in a fraction of a second, and `demo` forks its first child before it)
        runner = sys.modules.get("common.runner")
        if runner is not None and isinstance(err, runner.RunInterrupted):
            return _interrupted(err)
        if os.environ.get("LIGHTYARD_DEBUG", "") not in {"", "0"}:
            raise
        message = " ".join(str(err).split())[:500]
        if isinstance(err, MemoryError) or "can't allocate memory" in message or "out of memory" in message.lower():
            message = f"{message or 'out of memory'} (the settings need more memory than this machine has: lower the sizes)"
        if "database is locked" in message:  # SQLite's busy timeout ran out (5 s)
            from common.tracking import sqlite_store_hint

            message = (
                f"the MLflow store {sqlite_store_hint()} is locked by another process writing to it (a stopped or hung "
                "lightyard or mlflow command on the same store; `fuser <file>` names it): end that process and rerun"
            )
        run_id = getattr(err, "lightyard_run_id", None)
        where = f"traceback.txt in MLflow run {run_id}; " if run_id else ""
        print(f"lightyard: failed: {type(err).__name__}: {message} ({where}LIGHTYARD_DEBUG=1 prints the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _close_bars() -> None:
    """Progress bars a failure or a signal left open (a stage's loop, not a with-block) end on their own line before
    the command's last line, not with it appended to the bar and the bar drawn again below."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


class _Stopped(BaseException):
    def __init__(self, signum: int) -> None:
        self.signum = int(signum)


def _stop_on_sigterm():
    """A SIGTERM while no run is open (importing torch, composing the config) ends the command with one line, not
    silently; returns the handler it replaced (None off the main thread, where handlers cannot be set)."""

    def stop(signum, frame):
        raise _Stopped(signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


def _interrupted(stop) -> int:
    """A run stopped by a signal (marked KILLED where it had opened): one line, with how to continue it."""
    if stop.rank > 0:  # another process of a DDP run (under torchrun or fabric run): rank 0's line names the run
        print(f"lightyard: {stop} (rank 0 reports the run and how to continue it)", file=sys.stderr)
    elif not stop.run_id and not stop.resumable:  # stopped before its run opened
        print(f"lightyard: {stop} ({stop.why_not}: rerun it)", file=sys.stderr)
    elif not stop.resumable:
        print(f"lightyard: {stop} (MLflow run {stop.run_id} marked KILLED; {stop.why_not}: rerun it)", file=sys.stderr)
    else:
        again = f"lightyard {stop.command} {stop.pipeline} resume={stop.run_id}" if stop.run_id else "resume=<run id>"
        print(f"lightyard: {stop} (MLflow run marked KILLED; continue with: {again})", file=sys.stderr)
    return 128 + int(stop.signum)


def cli() -> None:
    """The ``lightyard`` command: :func:`main`, then an exit without the interpreter's teardown."""
    _exit_now(main())


def _exit_now(code: int | None) -> None:
    """Tearing the interpreter down frees every object that torch, Lightning, MLflow and transformers built: 2–5 s of
    CPU after each command on a 2-core machine, for nothing. What a normal exit does before that still happens here:
    the other threads are waited for (thread pools shut down), the exit handlers run (MLflow's, logging's, weakref
    finalizers, multiprocessing's), the console is flushed; then the process ends with the command's status."""
    import atexit
    import contextlib
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # private: what Python's own exit calls first (thread pools' hooks, joins)
    if shutdown is None:  # a Python without it: the normal, slower exit
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`lightyard runs | head`): nothing more to say
            stream.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    cli()
