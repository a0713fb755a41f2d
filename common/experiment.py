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

    @abstractmethod
    def run(self, tracker: Tracker) -> dict[str, float]:
        """Do the work, log what it produces (metrics per step, figures, tables), return final metrics."""
