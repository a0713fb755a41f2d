"""Lightning glue shared by every gradient pipeline: the MLflow logger and graceful shutdown."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from common.tracking import Tracker


class MlflowRunLogger(Logger):
    """Sends Lightning's metrics (per step and per epoch) to the run a :class:`Tracker` owns.

    The runner logs the resolved config itself, so ``log_hyperparams`` records nothing more.
    """

    def __init__(self, tracker: Tracker | None):
        super().__init__()
        self._tracker = tracker

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self._tracker.run_id if self._tracker else ""

    @property
    @rank_zero_experiment
    def experiment(self) -> Tracker | None:
        return self._tracker

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._tracker is not None:
            self._tracker.log_metrics(metrics, step)


class GracefulShutdown(pl.Callback):
    """On SIGINT or SIGTERM, finish the current batch, write ``interrupted.ckpt`` and stop.

    The checkpoint is written after the batch's optimizer step, with the loops' progress and the
    (stateful) dataloader's position, so a resumed run continues exactly where this one stopped.
    """

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.received: int | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C means: stop now
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): nothing to install
                return

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if received:
            # its own name: ModelCheckpoint's end-of-epoch save would overwrite last.ckpt with a
            # state that looks like a finished epoch
            self.checkpoint_path = self.checkpoint_dir / "interrupted.ckpt"
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # full state: optimizer, loops, loader position
            trainer.should_stop = True
            self.received = self.received or signal.SIGTERM

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
