"""The one path every run takes: config → MLflow run → (Lightning fit/test | experiment.run) → status.

``train`` expands sweeps (``key=a,b``) into a parent run with one child run per grid point,
continues interrupted runs (``resume=<run id | checkpoint>``) and makes sure an MLflow run never
stays RUNNING: FINISHED, KILLED (SIGINT/SIGTERM, with ``interrupted.ckpt`` written) or FAILED (error logged).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import functools
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from common import registry
from common.config import CONF_DIR, ConfigError, check_applies, load_config, set_checked, sweep_points
from common.hardware import global_rank, skip_failing_nvml_check
from common.environment import environment_report, environment_tags
from common.tracking import (
    OPEN_RUNS,
    RUN_ID_PREFIX,
    Heartbeat,
    Tracker,
    check_server,
    find_run,
    stale_reason,
    start_system_metrics,
    tracking_uri,
)


class RunInterrupted(Exception):
    """Raised after a run was stopped by a signal and marked KILLED."""

    NO_CHECKPOINT = "this pipeline keeps no checkpoint"

    def __init__(self, signum: int | str, message: str | None = None):
        if message is None:  # a library re-raising it as type(err)(text) (OmegaConf does): keep it an interruption
            signum, message = (_RECEIVED[-1] if _RECEIVED else signal.SIGTERM), str(signum)
        super().__init__(message)
        self.signum = signum
        self.run_id = ""
        self.pipeline = ""
        self.command = "train"
        self.resumable = True
        self.why_not = self.NO_CHECKPOINT  # said when not resumable
        self.rank = 0  # a DDP process's global rank: only rank 0 holds the run


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    config: DictConfig | None = None


def load_target(path: str) -> Any:
    """``"package.module:attr"`` → the object (experiment points name their function this way in config)."""
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load '{path}' named in the config: {err}") from None


def compose(pipeline_name: str, values: dict[str, Any] | None = None) -> DictConfig:
    return load_config(pipeline_name, values, registry.get(pipeline_name).config)


# -- resume -------------------------------------------------------------------------------------
_NOT_A_RUN = (
    "resume={target} is neither a .ckpt file nor a run id (or its first 6 or more characters) in {uri}; `lightyard runs` lists run ids"
)


def _find_resume(cfg: DictConfig, target: str, values: dict[str, Any]) -> tuple[DictConfig, str, str | None]:
    """Return (config, checkpoint path, run id to reopen or None) for ``resume=target``."""
    path = Path(target)
    if path.suffix == ".ckpt":
        from common.data import require_weights_file  # (torch: only when a checkpoint is named)

        require_weights_file(path, "resume checkpoint")
        saved = path.parent.parent / "config.yaml"
        if saved.exists():
            requested, cfg = cfg.pipeline, _saved_config(saved, values)
            if cfg.get("pipeline") is None:
                raise ConfigError(f"{saved} beside the checkpoint is not a lightyard run's config; move the checkpoint out of that folder")
            if cfg.get("pipeline") != requested:
                raise ConfigError(
                    f"{path} is a checkpoint of {cfg.get('pipeline')} (its run's config.yaml says so), not of {requested}; "
                    f"resume it with: lightyard train {cfg.get('pipeline')} resume={path}"
                )
        return cfg, str(path), None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    try:
        run = client.get_run(target)
    except MlflowException:
        raise ConfigError(_NOT_A_RUN.format(target=target, uri=tracking_uri(cfg))) from None
    owner, kind = run.data.tags.get("lightyard.pipeline"), run.data.tags.get("lightyard.kind")
    command = kind if kind in ("reproduce", "bench") else "train"  # the command that continues it, named at once
    if not owner:
        raise ConfigError(f"run {target} is not a lightyard run")
    if owner != cfg.pipeline:
        known = owner in {p.name for p in registry.all_pipelines()}
        if run.info.status == "FINISHED":
            then = "it is FINISHED: nothing to resume"
        elif command == "train" and known and _non_gradient(owner):
            then = f"and {owner} keeps no checkpoint: rerun it (lightyard train {owner})"
        else:
            then = f"resume it with: lightyard {command} {owner} resume={target}"
            if command == "train" and known:
                try:  # its own pipeline's checks (a checkpoint, not RUNNING): the hint must not be refused in turn
                    _find_resume(compose(owner), target, {})
                except ConfigError as err:
                    then = f"nor can {owner} resume it: {err}"
        raise ConfigError(f"run {target} is a run of {owner}, not of {cfg.pipeline}; {then}")
    if command != "train":
        raise ConfigError(f"run {target} is the parent of a {kind}; resume it with: lightyard {kind} {cfg.pipeline} resume={target}")
    non_gradient = _non_gradient(cfg.pipeline)
    if run.info.status == "FINISHED":
        raise ConfigError(
            f"run {target} is FINISHED; nothing to resume ("
            + ("rerun it for a new run)" if non_gradient else "start a new run, or resume=<path/to.ckpt> to train on from its weights)")
        )
    if run.info.status == "RUNNING" and not stale_reason(run):
        raise ConfigError(
            f"run {target} is still RUNNING (pid {run.data.tags.get('lightyard.pid')} on {run.data.tags.get('lightyard.host')}); "
            "stop it first"
        )
    if non_gradient:
        raise ConfigError(
            f"{cfg.pipeline} runs outside the Lightning runner and keeps no checkpoint to resume from: rerun it "
            "with the same config and seed (what it cached, such as trained stages, is read again)"
        )
    run_dir = Path(run.data.tags.get("lightyard.run_dir", ""))
    # interrupted.ckpt is the exact mid-epoch state; it is deleted once a fit completes
    ckpt = run_dir / "checkpoints" / "interrupted.ckpt"
    ckpt = ckpt if ckpt.is_file() else ckpt.with_name("last.ckpt")
    if not ckpt.is_file():
        raise ConfigError(f"run {target} left no checkpoint to resume from (looked for {ckpt})")
    return _saved_config(run_dir / "config.yaml", values), str(ckpt), target


def _check_progress(cfg: DictConfig, ckpt: str, new_run: bool = False) -> None:
    """A resumed fit cannot end before its checkpoint's epoch: Lightning refused only after the run had reopened, and
    the lowered ``trainer.max_epochs``, saved with the run, then broke every later resume of it. A new run from a
    checkpoint whose fit is complete (``new_run``) is refused too: it trained nothing and ended FINISHED."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # tensors not read
    epoch, steps = int(state.get("epoch", 0)), int(state.get("global_step", 0))
    # epochs whose training ended: an epoch-end checkpoint is written before Lightning counts its epoch processed, and
    # one written at the last batch (a step-interval or validation checkpoint) before it counts either
    fit = state.get("loops", {}).get("fit_loop", {})
    progress = fit.get("epoch_progress", {}).get("current", {})
    trained = int(progress.get("processed", 0))
    if fit.get("epoch_loop.batch_progress", {}).get("is_last_batch") and int(progress.get("started", 0)) > trained:
        trained += 1
    max_epochs, max_steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    if max_epochs not in (None, -1) and max_epochs < epoch:
        raise ConfigError(
            f"trainer.max_epochs={max_epochs} is before the checkpoint's epoch {epoch}; give at least {epoch} (or leave it out to keep the run's)"
        )
    # a new run from a finished fit's checkpoint would train nothing and end FINISHED without a metric (a reopened
    # run may still owe its test stage: Lightning runs it)
    if new_run and max_epochs not in (None, -1) and trained >= max_epochs:
        raise ConfigError(
            f"the checkpoint {ckpt} has trained all {trained} epochs of trainer.max_epochs={max_epochs}: nothing is left to "
            "train; give a larger trainer.max_epochs to train on from it"
        )
    if new_run and max_steps not in (None, -1) and steps >= max_steps:
        raise ConfigError(
            f"the checkpoint {ckpt} has taken all {steps} steps of trainer.max_steps={max_steps}: nothing is left to "
            "train; give a larger trainer.max_steps to train on from it"
        )


# what a resumed fit can take from the command line: how far and where it runs. The rest (optimizer, model, data)
# comes back from the checkpoint, so a new value would be recorded but not used
RESUME_MAY_CHANGE = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.accelerator",
    "threads",
    "launcher.",
    "kill_at_step",
)


def _resume_changes(values: dict[str, Any]) -> list[str]:
    """The keys a resume's command line changes; one line if any is not in :data:`RESUME_MAY_CHANGE`."""
    changed = [k for k in values if k not in {"resume", "preset"}]
    fixed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if fixed:
        raise ConfigError(
            f"a resumed run keeps its settings (the checkpoint restores them): {', '.join(fixed)} cannot change; "
            f"only {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUME_MAY_CHANGE)} can; start a new run for the rest"
        )
    return changed


def _saved_config(path: Path, values: dict[str, Any]) -> DictConfig:
    """The config a run was started with, plus the overrides given now (except resume/preset)."""
    cfg = OmegaConf.load(path)
    if "preset" in values and values["preset"] != cfg.get("preset"):
        raise ConfigError(f"a resumed run keeps its preset ({cfg.get('preset')}); leave preset= out")
    changed = _resume_changes(values)
    for key in changed:
        set_checked(cfg, key, values[key])
    return cfg


# -- one run ------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """A fit's module and datamodule, built (and the data set up) before its MLflow run opens."""

    module: Any = None
    datamodule: Any = None
    rng: dict[str, Any] = field(default_factory=dict)  # the streams as they stood when they were built
    notices: list[str] = field(default_factory=list)  # said while no run was open: kept on the run once it is
    error: Exception | None = None  # a crash while building: raised inside the run, which keeps its traceback

    def add_notice(self, text: str) -> None:  # (notice() records on OPEN_RUNS[-1])
        self.notices.append(text)


@contextlib.contextmanager
def _preparing(prepared: _Prepared):
    """Work before the run opens: its notices kept for the run; a signal stops with no run to mark; a bad value is its
    one line; any other error is kept in ``prepared.error`` and raised inside the run, which keeps its traceback."""
    OPEN_RUNS.append(prepared)
    try:
        with stop_on_signals():
            yield
    except RunInterrupted:
        raise
    except Exception as err:
        if _RECEIVED:  # our signal, which a data reader turned into its own error ("not a readable image")
            raise RunInterrupted(_RECEIVED[-1], f"stopped by signal {_RECEIVED[-1]}") from None
        if isinstance(err, ConfigError):
            raise
        prepared.error = err
    finally:
        OPEN_RUNS.remove(prepared)


def _prepare_experiment(experiment: Any) -> _Prepared:
    """A non-gradient experiment's ``prepare`` (its data read and checked) before its run opens, as :func:`_prepare_fit`
    sets a fit's data up."""
    prepared = _Prepared()
    with _preparing(prepared):
        experiment.prepare()
    return prepared


def _prepare_fit(cfg: DictConfig, pipeline: registry.Pipeline, set_up_data: bool) -> _Prepared:
    """Module and datamodule built, and (``set_up_data``) the data set up, before the run opens, so that an error in
    the data's content (a label out of range, a vocabulary left empty, too few images for a split) is one line with no
    FAILED run behind it. ``setup`` must then be idempotent and not read ``self.trainer`` (ours are and do not); it is
    left to Lightning where a datamodule has a ``prepare_data`` to run first, and under a spawning strategy (the loaded
    data would be pickled to each worker). The random streams are taken as they stand after the data's setup and the
    fit starts from them: the same draws as when Lightning set the data up inside the run (DDP strategies reseed inside
    the fit anyway, before their setup hook)."""
    import lightning.pytorch as pl

    from common import rng
    from common.freezing import freeze_when_built
    from common.hardware import resolve_accelerator
    from common.tracking import notice

    prepared = _Prepared()
    with _preparing(prepared):
        if cfg.get("preset") == "paper" and resolve_accelerator(str(cfg.trainer.accelerator)) == "cpu":
            notice("preset=paper has the paper's settings, sized for GPUs: on this CPU it can take hours (preset=quick is the CPU size)")
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        prepared.datamodule = data = pipeline.load("datamodule")(cfg) if pipeline.datamodule else None
        prepared.module = pipeline.load("module")(cfg)
        freeze_when_built(prepared.module, cfg.freeze)
        spawning = "spawn" in str(cfg.trainer.get("strategy", ""))
        if set_up_data and data is not None and not spawning and not _overrides(data, "prepare_data", pl.LightningDataModule):
            data.setup("fit")
    prepared.rng = rng.get_state()
    return prepared


def _fit_lightning(cfg: DictConfig, prepared: _Prepared, tracker: Tracker | None, run_dir: Path, ckpt_path: str | None) -> dict[str, float]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from common import rng
    from common.callbacks import FiniteLoss, FitProgressBar, GracefulShutdown, KillAtStep, MlflowRunLogger, RngState
    from common.hardware import trainer_kwargs
    from common.memory import MemoryProfiler

    if prepared.error is not None:
        raise prepared.error
    datamodule, module = prepared.datamodule, prepared.module
    rng.set_state(prepared.rng)  # as the data's setup left them: whatever opening the run drew is undone

    checkpoint_dir = run_dir / "checkpoints"
    ckpt_cfg = cfg.callbacks.checkpoint
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,
        save_last=not ckpt_cfg.monitor,
        monitor=ckpt_cfg.monitor,
        mode=ckpt_cfg.mode,
        every_n_train_steps=ckpt_cfg.every_n_train_steps,
        enable_version_counter=False,  # the run folder is ours: last.ckpt is the latest
    )
    # with a monitor, Lightning rewrites last.ckpt only when the metric improved (an older epoch's state then stood
    # as "last": a resume after SIGKILL replayed epochs, and last.ckpt was not the run's end): a second, unmonitored
    # checkpoint writes it every time, after the monitored one (Lightning keeps checkpoint callbacks in this order)
    latest = [] if not ckpt_cfg.monitor else [
        ModelCheckpoint(dirpath=checkpoint_dir, filename="last", every_n_train_steps=ckpt_cfg.every_n_train_steps, enable_version_counter=False)
    ]  # fmt: skip
    shutdown = GracefulShutdown(checkpoint_dir)
    callbacks: list[pl.Callback] = [checkpoint, *latest, shutdown, RngState(), FiniteLoss()] + (
        [FitProgressBar()] if cfg.trainer.enable_progress_bar else []
    )
    if cfg.kill_at_step >= 0:
        callbacks.append(KillAtStep(cfg.kill_at_step))
    if cfg.callbacks.memory_profiler:
        callbacks.append(MemoryProfiler())

    kwargs, notices = trainer_kwargs(cfg.trainer)
    if tracker is not None:
        for text in notices:  # (warned already, where trainer_kwargs resolved them)
            tracker.add_notice(text)
    trainer = pl.Trainer(**kwargs, logger=MlflowRunLogger(tracker), callbacks=callbacks, default_root_dir=str(run_dir))
    if tracker is not None:
        tracker.set_tags({"lightyard.world_size": trainer.world_size, "lightyard.strategy": type(trainer.strategy).__name__})
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if shutdown.received is not None:
        # (a signal after the last step's hook: the fit ran to its end, which its last checkpoint holds)
        where = f"checkpoint: {shutdown.checkpoint_path}" if shutdown.checkpoint_path else "after the fit's last training step"
        where = where if trainer.is_global_zero else f"rank {trainer.global_rank}"  # (rank 0's path is the run's)
        raise RunInterrupted(shutdown.received, f"stopped by signal {shutdown.received}; {where}")
    if trainer.num_training_batches == 0 and trainer.limit_train_batches != 0:  # Lightning skips the fit with a notice
        raise ConfigError(
            "the training set gives no batch (a batch size larger than the training set with drop_last, or a limit of 0 "
            "batches): nothing was trained; lower the batch size or use more training data"
        )
    (checkpoint_dir / "interrupted.ckpt").unlink(missing_ok=True)  # consumed: this fit got to its end

    def scalars() -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}

    metrics = scalars()  # trainer.test replaces callback_metrics: the fit's last val/* and best/* would be lost
    has_test = datamodule is not None and _overrides(datamodule, "test_dataloader", pl.LightningDataModule)
    if cfg.test_after_fit and has_test:
        best = "best" if ckpt_cfg.monitor and checkpoint.best_model_path else None
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
        metrics.update(scalars())
    if tracker is not None and cfg.logger.log_model:
        if checkpoint.best_model_path and ckpt_cfg.monitor:  # the best checkpoint's weights, not the last epoch's
            import torch

            module.load_state_dict(torch.load(checkpoint.best_model_path, weights_only=True, map_location="cpu")["state_dict"])
        tracker.log_model(*module.model_for_export())
    if tracker is not None and cfg.logger.log_checkpoints:
        for file in sorted(checkpoint_dir.glob("*.ckpt")):
            tracker.log_file(file, "checkpoints")
    return metrics


def _overrides(obj: Any, method: str, base: type) -> bool:
    return getattr(type(obj), method) is not getattr(base, method)


_RECEIVED: list[int] = []  # signals stop_on_signals turned into RunInterrupted in this process


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM, SIGHUP and Ctrl+C raise :class:`RunInterrupted` inside this block (main thread only), so
    whatever runs there (data setup, stage-1 pretraining, a grid) ends KILLED instead of dying RUNNING.
    Lightning's fit replaces the SIGTERM handler for its loop with the graceful one (finish the batch)."""

    def stop(signum: int, frame: Any) -> None:
        _RECEIVED.append(signum)  # a library may wrap the exception raised here (MLflow does): run_one checks this
        raise RunInterrupted(signum, f"stopped by signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, stop) for signum in stop_signals()}
    try:
        if _RECEIVED:  # held by held_signals while the run was being opened: the run exists now, so it can end KILLED
            raise RunInterrupted(_RECEIVED[-1], f"stopped by signal {_RECEIVED[-1]}")
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(signal.SIGINT, "stopped by Ctrl+C") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def held_signals():
    """A SIGTERM while a run is being opened is remembered, not fatal (the process would die with the run RUNNING);
    :func:`stop_on_signals` raises it once the run exists."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: _RECEIVED.append(signum)) for signum in stop_signals()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_signals() -> list[int]:
    """SIGTERM, and SIGHUP (a closed terminal or a dropped ssh) unless it is ignored (``nohup``: the run goes on)."""
    hangup = getattr(signal, "SIGHUP", None)  # (not on Windows)
    return [signal.SIGTERM] + ([hangup] if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN else [])


def _run_non_gradient(cfg: DictConfig, run: Callable[[DictConfig, Tracker | None], dict], tracker: Tracker | None) -> dict[str, float]:
    import numpy as np
    import torch

    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    return run(cfg, tracker)


def run_one(
    cfg: DictConfig,
    parent: Tracker | None = None,
    ckpt_path: str | None = None,
    reopen: str | None = None,
    tags: dict[str, str] | None = None,
    target: str | None = None,
) -> RunResult:
    """One run of one config, start to final status.

    ``target`` (``"package.module:function"``, ``function(cfg, tracker) -> metrics``) runs one grid point
    of an experiment instead of the pipeline's module; everything around it (tags, seeds, signals,
    status) is the same as for ``train``.
    """
    from common.experiment import NonGradientExperiment

    pipeline = registry.get(cfg.pipeline)
    is_rank_zero = global_rank() == 0
    _RECEIVED.clear()
    if cfg.threads:  # (before the data's setup, which may compute)
        import torch

        torch.set_num_threads(int(cfg.threads))
    module = load_target(target) if target else pipeline.load("module")
    skip_failing_nvml_check()
    non_gradient = target or (isinstance(module, type) and issubclass(module, NonGradientExperiment))
    experiment = module(cfg) if non_gradient and not target else None
    try:  # (a grid's or sweep's child keeps its data's errors in its own FAILED run, beside its siblings)
        prepared = None if non_gradient else _prepare_fit(cfg, pipeline, set_up_data=parent is None)
        if experiment is not None and parent is None:
            prepared = _prepare_experiment(experiment)
    except RunInterrupted as stop:
        stop.pipeline = cfg.pipeline
        if reopen:  # the run stays KILLED: the same resume= continues it
            stop.run_id = reopen
        else:
            stop.resumable, stop.why_not = False, "no run was opened yet"
        raise
    tracker: Tracker | None = None
    if is_rank_zero:
        with held_signals():
            if reopen:
                tracker = Tracker.reopen(tracking_uri(cfg), reopen)
            else:
                tags = {**({"lightyard.resumed_from": ckpt_path} if ckpt_path else {}), **(tags or {})}
                tracker = Tracker.start(cfg, cfg.run_name or f"{cfg.pipeline}-{cfg.preset}", tags=tags, parent=parent)
        run_dir = Path(cfg.paths.output_dir).resolve() / cfg.pipeline / tracker.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
    else:  # DDP ranks > 0 under torchrun/srun: rank 0's checkpoint folder is broadcast by Lightning; nothing is written
        run_dir = Path(cfg.paths.output_dir).resolve() / cfg.pipeline / "rank_nonzero"  # (a name, never made)

    # a resumed run: its stopped segments' time (duration_s is the run's working time, summed) and metrics (a fit
    # resumed after its last epoch validates no more: val/* and best/* stay the stored ones)
    before = tracker.client.get_run(reopen).data.metrics if reopen and tracker is not None else {}
    start = time.time() - before.get("duration_s", 0.0)
    heartbeat = monitor = None
    if tracker is not None:
        OPEN_RUNS.append(tracker)  # notice() records there
    try:
        with stop_on_signals():
            heartbeat = Heartbeat(tracker, start=start) if tracker is not None else None  # (a thread: it can fail to start)
            if tracker is not None:
                (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
                tracker.set_tags({"lightyard.run_dir": run_dir, "lightyard.key_metrics": ",".join(cfg.logger.key_metrics)})
                tracker.log_config(cfg)
                if not reopen:
                    tracker.log_dataset(cfg)
                tracker.set_tags(environment_tags())  # (a resumed run records where it finished)
                tracker.log_text(environment_report(), "environment.txt")
                if cfg.logger.system_metrics:
                    monitor = start_system_metrics(tracker, float(cfg.logger.system_metrics_interval), resumed=bool(reopen))
            for text in prepared.notices if prepared is not None and tracker is not None else []:
                tracker.add_notice(text)
            if non_gradient:
                if prepared is not None and prepared.error is not None:
                    raise prepared.error
                run = module if target else (lambda c, t: experiment.run(t))
                try:
                    metrics = _run_non_gradient(cfg, run, tracker)
                except RunInterrupted as stop:
                    stop.resumable = False
                    raise
                if tracker is not None:
                    tracker.log_metrics(metrics)
            else:  # Lightning has logged its metrics per step/epoch already
                metrics = _fit_lightning(cfg, prepared, tracker, run_dir, ckpt_path)
                metrics = {**{k: before[k] for k in cfg.logger.key_metrics if k in before}, **metrics}
    except RunInterrupted as stop:
        _end_killed(stop, cfg, tracker, run_dir, start, non_gradient)
        raise
    except SystemExit as err:
        if not isinstance(err.__context__, KeyboardInterrupt):
            _fail(tracker, err, start)
            raise
        # Lightning turns a Ctrl+C during fit into exit(1) after ignoring further SIGINTs
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise _end_killed(RunInterrupted(signal.SIGINT, "stopped by Ctrl+C"), cfg, tracker, run_dir, start, non_gradient) from None
    except BaseException as err:
        if _RECEIVED and not isinstance(err, RunInterrupted):  # our SIGTERM, wrapped by a library on its way up
            stop = RunInterrupted(_RECEIVED[-1], f"stopped by signal {_RECEIVED[-1]}")
            raise _end_killed(stop, cfg, tracker, run_dir, start, non_gradient) from None
        _fail(tracker, err, start)
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if tracker in OPEN_RUNS:
            OPEN_RUNS.remove(tracker)
        if monitor is not None:
            monitor.finish()
    if tracker is not None:
        tracker.log_metrics({"duration_s": time.time() - start})
        tracker.end("FINISHED")
    return RunResult(tracker.run_id if tracker else "", "FINISHED", metrics, cfg)


def _non_gradient(pipeline: str) -> bool:
    from common.experiment import NonGradientExperiment

    module = registry.get(pipeline).load("module")
    return isinstance(module, type) and issubclass(module, NonGradientExperiment)


def _end_killed(stop: RunInterrupted, cfg: DictConfig, tracker, run_dir: Path, start: float, non_gradient: bool) -> RunInterrupted:
    """The run ends KILLED, whichever way the stop arrived (our handler, Lightning's Ctrl+C exit, a wrapped SIGTERM);
    its hint offers resume= only where a checkpoint exists (a stop in data setup or stage-1 pretraining has none)."""
    stop.pipeline, stop.rank = cfg.pipeline, global_rank()
    if non_gradient:  # (a stop wrapped by a library arrives as a new, resumable-looking one)
        stop.resumable, stop.why_not = False, RunInterrupted.NO_CHECKPOINT
    elif stop.resumable and not any((run_dir / "checkpoints").glob("*.ckpt")):
        stop.resumable, stop.why_not = False, "it was stopped before its first checkpoint"
    if tracker is not None:
        stop.run_id = tracker.run_id
        tracker.log_metrics({"duration_s": time.time() - start})
        tracker.end("KILLED", error=str(stop))
    return stop


def _fail(tracker: Tracker | None, err: BaseException, start: float | None = None) -> None:
    if tracker is not None:
        if start is not None:  # a run's (a FAILED run can be resumed from last.ckpt); a grid's parent has none
            tracker.log_metrics({"duration_s": time.time() - start})
        tracker.log_text(traceback.format_exc(), "traceback.txt")
        tracker.end("FAILED", error=f"{type(err).__name__}: {err}")
        if not hasattr(err, "lightyard_run_id"):
            err.lightyard_run_id = tracker.run_id  # the command line names the run that holds the traceback


@functools.lru_cache(maxsize=1)
def _base_fit_length() -> dict[str, Any]:
    """base.yaml's trainer.max_epochs / max_steps (read once: check_run_config runs for every grid child)."""
    trainer = OmegaConf.load(CONF_DIR / "base.yaml").trainer
    return {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}


def check_run_config(cfg: DictConfig, target: str | None = None) -> None:
    """What a composed config can still get wrong, before any run opens: the pipeline's own check, and
    ``logger.log_model`` where there is no model to export."""
    module = registry.get(cfg.pipeline).load("module")
    check = getattr(module, "check_config", None)
    if check:
        check(cfg)
    if not target and cfg.get("freeze"):
        from common.freezing import check_before_run

        check_before_run(module, cfg)
    from common.experiment import NonGradientExperiment

    if isinstance(module, type) and issubclass(module, NonGradientExperiment):  # (the fit's length was ignored silently)
        for key, default in _base_fit_length().items():
            if cfg.trainer[key] != default:
                raise ConfigError(
                    f"trainer.{key} does not apply: {cfg.pipeline} is not trained by the Lightning runner (its own keys set how "
                    "long it trains); leave it unset"
                )
    if cfg.logger.log_model and (target or not hasattr(module, "model_for_export")):
        what = f"grid point {target}" if target else f"{cfg.pipeline}'s module"
        raise ConfigError(
            f"logger.log_model=true but {what} exports no model (a LightningModule's model_for_export()); set logger.log_model=false"
        )


def train(pipeline_name: str, overrides: list[str]) -> list[RunResult]:
    """``lightyard train``: one run, or a sweep (parent run + one child run per grid point)."""
    points = sweep_points(overrides)
    first = compose(pipeline_name, points[0])
    check_server(first)
    if len(points) > first.launcher.max_points and not first.launcher.allow_large:
        raise ConfigError(
            f"this sweep has {len(points)} points (over launcher.max_points={first.launcher.max_points}); add --yes to run it"
        )
    if first.get("experiment") is not None:  # (a grid child's config carries it; a train's never reads it)
        raise ConfigError(
            f"experiment={first.experiment} picks a grid of `lightyard reproduce|bench {pipeline_name}`; `train` runs one config: leave it out"
        )
    early = len(points) > 20  # composing a point takes ~50 ms: a large sweep says its size first, a small one once checked
    print(f"sweep: {len(points)} runs", flush=True) if early else None
    configs = [first, *(compose(pipeline_name, point) for point in points[1:])]  # fail fast on any bad point
    for cfg in configs:
        check_run_config(cfg)
    check_applies(
        pipeline_name,
        configs,
        {k: v for p in points for k, v in p.items() if k not in ("resume", "preset")},
        registry.get(pipeline_name).config,
        command="train",
    )
    print(f"sweep: {len(points)} runs", flush=True) if 1 < len(points) and not early else None
    if len(configs) == 1:
        cfg = configs[0]
        if cfg.resume:
            target, uri = str(cfg.resume), tracking_uri(cfg)
            if RUN_ID_PREFIX.fullmatch(target):  # a prefix of a run id, as report and grid resumes take
                target = find_run(uri, target, _NOT_A_RUN.format(target=target, uri=uri))[1].info.run_id
            sweep = _sweep_parent(cfg, target)
            if sweep is not None:
                return _resume_sweep(pipeline_name, sweep, points[0])
            cfg, ckpt, reopen = _find_resume(cfg, target, points[0])
            _check_progress(cfg, ckpt, new_run=reopen is None)
            return [run_one(cfg, ckpt_path=ckpt, reopen=reopen)]
        return [run_one(cfg)]

    if any(cfg.resume for cfg in configs):
        raise ConfigError("resume= cannot be combined with a sweep; resume the sweep by its parent run's id")
    swept = sorted({k for p in points for k in p if len({str(q[k]) for q in points}) > 1})
    parent_cfg = configs[0]
    tags = {"lightyard.sweep": ",".join(swept), "lightyard.sweep_overrides": json.dumps(overrides)}
    parent = Tracker.start(parent_cfg, parent_cfg.run_name or f"{pipeline_name}-sweep", tags=tags)
    parent.log_text(OmegaConf.to_yaml(parent_cfg), "config.yaml")
    print(f"sweep parent run {parent.run_id} (its child runs carry mlflow.parentRunId; `lightyard runs` lists them)", flush=True)
    return _run_sweep(pipeline_name, parent, points, configs, swept, {}, {})


def _run_sweep(
    pipeline_name: str,
    parent: Tracker,
    points: list[dict],
    configs: list[DictConfig],
    swept: list[str],
    children: dict[int, Any],
    changes: dict[str, Any],
) -> list[RunResult]:
    """The sweep's points in order under ``parent``: a point whose child (``children``, by index) FINISHED is kept, a
    KILLED one with a checkpoint is resumed (with ``changes``, what a resume may change), any other is run anew."""
    results, status = [], "FINISHED"
    try:
        for i, (point, cfg) in enumerate(zip(points, configs)):
            label = " ".join(f"{k}={point[k]}" for k in swept)
            child = children.get(i)
            if child is not None and child.info.status == "FINISHED":
                print(f"[sweep {i + 1}/{len(configs)}] {label}: FINISHED in run {child.info.run_id}", flush=True)
                results.append(RunResult(child.info.run_id, "FINISHED", {k: float(v) for k, v in child.data.metrics.items()}, cfg))
                continue
            print(f"[sweep {i + 1}/{len(configs)}] {label}", flush=True)
            cfg.run_name = cfg.run_name or f"{pipeline_name} {label}"
            tags = {"lightyard.sweep_index": str(i)}
            if child is not None and child.info.status == "KILLED":
                try:
                    resumed, ckpt, reopen = _find_resume(cfg, child.info.run_id, changes)
                except ConfigError:  # stopped before its first checkpoint: run the point again
                    resumed = None
                if resumed is not None:
                    results.append(run_one(resumed, parent=parent, ckpt_path=ckpt, reopen=reopen))
                    continue
            results.append(run_one(cfg, parent=parent, tags=tags))
    except RunInterrupted as stop:
        status = "KILLED"
        stop.run_id, stop.resumable, stop.command = parent.run_id, True, "train"  # the sweep continues from its parent
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        parent.end(status)
    return results


def _sweep_parent(cfg: DictConfig, target: str) -> Any:
    """The MLflow run ``target`` if it is the parent of a ``train`` sweep, else None."""
    if target.endswith(".ckpt"):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=tracking_uri(cfg)).get_run(target)
    except MlflowException:
        return None  # (_find_resume says what is wrong with it)
    return run if run.data.tags.get("lightyard.sweep") is not None else None


def _resume_sweep(pipeline_name: str, run: Any, values: dict[str, Any]) -> list[RunResult]:
    """``train <pipeline> resume=<sweep parent>``: the sweep's points again, from the overrides it recorded; what a
    resume may change (``trainer.max_epochs``, ``launcher.*``…) can be given."""
    from mlflow.tracking import MlflowClient

    if run.data.tags.get("lightyard.pipeline") != pipeline_name:
        raise ConfigError(f"run {run.info.run_id} is a sweep of {run.data.tags.get('lightyard.pipeline')}, not of {pipeline_name}")
    if run.info.status == "FINISHED":
        raise ConfigError(f"sweep {run.info.run_id} is FINISHED; nothing to resume")
    recorded = run.data.tags.get("lightyard.sweep_overrides")
    if recorded is None:
        raise ConfigError(f"sweep {run.info.run_id} predates resumable sweeps (no lightyard.sweep_overrides tag); rerun it")
    extra = {k: values[k] for k in _resume_changes(values)}
    kept = [o for o in json.loads(recorded) if o.partition("=")[0] not in extra]  # (a new length replaces the old)
    overrides = [*kept, *(f"{k}={v}" for k, v in extra.items())]
    points = sweep_points(overrides)
    configs = [compose(pipeline_name, point) for point in points]
    if "preset" in values and values["preset"] != configs[0].preset:  # (the recorded overrides set it: it was ignored)
        raise ConfigError(f"a resumed sweep keeps its preset ({configs[0].preset}); leave preset= out")
    swept = run.data.tags["lightyard.sweep"].split(",") if run.data.tags["lightyard.sweep"] else []
    client = MlflowClient(tracking_uri=tracking_uri(configs[0]))
    found = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", order_by=["attributes.start_time ASC"]
    )
    children = {int(c.data.tags["lightyard.sweep_index"]): c for c in found if "lightyard.sweep_index" in c.data.tags}
    print(
        f"sweep parent run {run.info.run_id} resumed: {sum(c.info.status == 'FINISHED' for c in children.values())} of {len(points)} points FINISHED",
        flush=True,
    )
    parent = Tracker.reopen(tracking_uri(configs[0]), run.info.run_id)
    return _run_sweep(pipeline_name, parent, points, configs, swept, children, extra)
