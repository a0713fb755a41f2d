"""Lightning glue shared by every gradient pipeline: the MLflow logger, graceful shutdown, and the overhead benches'
step-by-step clock."""

from __future__ import annotations

import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar
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
    """On SIGINT, SIGTERM or SIGHUP, finish the current batch, write ``interrupted.ckpt`` and stop.

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
        from common.runner import stop_signals

        for signum in (signal.SIGINT, *stop_signals()):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): nothing to install
                return

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if received and not trainer.should_stop:
            trainer.should_stop = True
            self.received = self.received or signal.SIGTERM
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # the epoch's last batch: a checkpoint saved here restores as "batch not completed" and the resumed
                # run would take one step fewer (every full-batch epoch is such a batch); save at the epoch's end
                self._save_at_epoch_end = True
                return
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if getattr(self, "_save_at_epoch_end", False):
            self._save_at_epoch_end = False
            self._save(trainer)

    def _save(self, trainer) -> None:
        # its own name: ModelCheckpoint's end-of-epoch save would overwrite last.ckpt with a
        # state that looks like a finished epoch
        self.checkpoint_path = self.checkpoint_dir / "interrupted.ckpt"
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # full state: optimizer, loops, loader position

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class FitProgressBar(ProgressBar):
    """One bar for the whole fit (optimizer steps, with the latest metrics), instead of Lightning's bar per epoch
    plus one per validation pass: full-batch pipelines take one step per epoch and would print hundreds of bars."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        total = trainer.estimated_stepping_batches
        self._bar = tqdm(
            total=None if total == float("inf") else int(total),
            initial=self._done(trainer, pl_module),
            desc=f"fit {pl_module.__class__.__name__}",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15.0,
            leave=True,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is not None:
            self._bar.n = self._done(trainer, pl_module)
            metrics = {
                k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"
            }
            self._bar.set_postfix(epoch=trainer.current_epoch, **dict(list(metrics.items())[:4]), refresh=False)
            self._bar.refresh() if self._bar.n == self._bar.total else self._bar.update(0)

    @staticmethod
    def _done(trainer, pl_module) -> int:
        """Steps so far: optimizer steps, or batches for a module that steps itself (its global_step counts its own
        optimizer calls, or none: cost_reg_ot's bar ended at 0/100), the unit estimated_stepping_batches counts."""
        if pl_module.automatic_optimization:
            return trainer.global_step
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RngState(pl.Callback):
    """Random generator states (torch CPU and CUDA, numpy, random) in every checkpoint, restored on resume:
    dropout, augmentation and sampling continue on the draws an uninterrupted run would have made.

    Restored at ``on_train_start``, not when the checkpoint is read: by then the fit has built its loaders and made
    their iterators (each draws a base seed from torch's generator), which an uninterrupted run had done before the
    checkpoint. After an epoch-end checkpoint it had not yet made the next epoch's: those draws are made again here."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        from common import rng

        return rng.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        from common import rng

        state, self._pending = self._pending, None
        if state is None:
            return
        rng.set_state(state)
        if trainer.fit_loop.restarted_on_epoch_end or trainer.fit_loop.resumed_on_epoch_end:
            loaders = trainer.train_dataloader  # one loader, or a list / dict of them
            loaders = loaders.values() if isinstance(loaders, dict) else loaders if isinstance(loaders, (list, tuple)) else [loaders]
            for loader in loaders:
                if isinstance(loader, torch.utils.data.DataLoader) and not (loader.persistent_workers and loader.num_workers):
                    torch.empty((), dtype=torch.int64).random_()  # the base seed its next epoch's iterator draws


class TrainingDiverged(RuntimeError):
    """A training loss turned nan or inf: the run ends FAILED instead of FINISHED with a broken model's test metrics."""


class FiniteLoss(pl.Callback):
    """Fails the run on a nan/inf training loss: the step's returned loss every ``log_every_n_steps`` batches (no
    device sync on other steps), and at the epoch's end every logged ``train*loss*`` value (every ``train*`` value of a
    manually optimised module: drit's steps return no loss). Each decision is a collective: all DDP ranks stop together."""

    def __init__(self) -> None:
        self.every, self.batches = 1, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.every = max(1, trainer.log_every_n_steps)

    def _stop_if(self, trainer, bad: list[str]) -> None:
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            where = ", ".join(bad) or "a training loss on another rank"
            raise TrainingDiverged(
                f"training diverged: {where} at step {trainer.global_step} (epoch {trainer.current_epoch}); lower the learning rate or check the data"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.batches += 1  # (not batch_idx: a full-batch graph's epochs are all batch 0)
        if (self.batches - 1) % self.every or not isinstance(loss, torch.Tensor):
            return
        value = loss.detach().float()
        self._stop_if(trainer, [] if bool(torch.isfinite(value).all()) else [f"the loss is {value.flatten()[0].item()}"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import torch

        bad = [
            f"{k} is {float(v)}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("train")
            and ("loss" in k or not pl_module.automatic_optimization)  # a manual step's logs are its losses (drit: train/d, train/eg)
            and getattr(v, "numel", lambda: 0)() == 1
            and not torch.isfinite(v).item()
        ]
        self._stop_if(trainer, bad)


class KillAtStep(pl.Callback):
    """Fault injection for resume tests (``kill_at_step=N``): SIGTERM to this process after optimizer step N
    (after batch N for a manually optimised module, whose step count is its own)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = trainer.global_step if pl_module.automatic_optimization else trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if done == self.step and trainer.is_global_zero:
            import os

            os.kill(os.getpid(), signal.SIGTERM)


class InterleavedSteps(pl.Callback):
    """Lightning's loop against a hand loop of the same step, in turn step by step in one process (the overhead
    benches): as each Lightning step begins, one hand step runs (``next(hand)``). The hand step is the clock around
    it, the Lightning step the clock from its end to the next one's start, so everything Lightning does between steps
    counts (the last ends at ``on_train_end``). A burst of other work on a shared machine lands on both sides alike;
    fit after fit, it lands on whichever loop runs then. On CUDA each side waits for its own kernels."""

    # Trainer arguments for the same arithmetic and the same single step as a plain hand loop: fp32 (``precision: auto``
    # is bf16-mixed on CUDA), no clipping, no accumulation
    SAME_STEP = {"precision": "32-true", "gradient_clip_val": None, "accumulate_grad_batches": 1}

    def __init__(self, hand: Iterator) -> None:
        self.hand = hand
        self.hand_steps: list[float] = []
        self.lightning_steps: list[float] = []
        self._resumed: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        cuda = pl_module.device.type == "cuda"  # kernels run asynchronously: each side waits for its own
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        start = time.perf_counter()
        if self._resumed is not None:
            self.lightning_steps.append(start - self._resumed)
        next(self.hand)
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        self._resumed = time.perf_counter()
        self.hand_steps.append(self._resumed - start)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._resumed is not None:  # the last Lightning step's end
            self.lightning_steps.append(time.perf_counter() - self._resumed)
            self._resumed = None

    @staticmethod
    def summary(rounds: list[InterleavedSteps]) -> dict[str, float]:
        """Each side's median step over the rounds: steps/s, their ratio and Lightning's extra ms a step."""
        hand = statistics.median([t for r in rounds for t in r.hand_steps])
        lightning = statistics.median([t for r in rounds for t in r.lightning_steps])
        return {
            "hand_steps_per_s": 1 / hand,
            "lightning_steps_per_s": 1 / lightning,
            "lightning_over_hand": hand / lightning,
            "lightning_extra_ms_per_step": 1000 * (lightning - hand),
            "steps": float(sum(len(r.lightning_steps) for r in rounds)),
        }
