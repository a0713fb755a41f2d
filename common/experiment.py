"""The interface for pipelines that are not trained by gradient (simulators, solvers).

They go through the same ``lightyard train``, config, sweeps and MLflow logging as the
Lightning pipelines: the runner builds the experiment from the resolved config, hands it the
run's :class:`~common.tracking.Tracker`, and logs the returned metrics as the run's result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from omegaconf import DictConfig

from common.tracking import Tracker


class NonGradientExperiment(ABC):
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @classmethod  # noqa: B027  (an optional hook: nothing to check by default)
    def check_config(cls, cfg: DictConfig) -> None:
        """Raise ConfigError for bad parameters before any MLflow run starts (default: nothing to check)."""

    def prepare(self) -> None:  # noqa: B027  (an optional hook: nothing to read by default)
        """Read and check the data before the MLflow run opens, so that an error in its content is one line with no
        FAILED run behind it (the runner calls this for a single run; a grid's child reads its data inside its own
        run, beside its siblings). It must draw nothing from the global random streams, and ``run`` must call it too."""

    @abstractmethod
    def run(self, tracker: Tracker) -> dict[str, float]:
        """Do the work, log what it produces (metrics per step, figures, tables), return final metrics."""
