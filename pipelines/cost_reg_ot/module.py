"""LightningModule: one training step = one outer iteration of the proximal scheme (manual optimization)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from common.config import ConfigError
from common.hardware import check_manual_step
from pipelines.cost_reg_ot.data import GENERATED, REAL, PairedData, check_source, real_folder
from pipelines.cost_reg_ot.model import (
    REGULARIZERS,
    barycentric_projection,
    cost_matrix,
    cross_moment,
    final_plan,
    gromov_baseline,
    initial_map,
    objective,
    prox_step,
    relatively_unchanged,
    sinkhorn,
    stochastic_step,
    uniform_weights,
)

METHODS = ("prox", "stochastic", "gw", "entropic_gw", "fgw")


# -- evaluation ---------------------------------------------------------------------------------
def foscttm(projected: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of samples closer than the true match (ties count half), averaged over both directions
    (SCOT-style), with n − 1 candidates per sample. Row i of both inputs is the same cell; lower is better."""
    d = torch.cdist(projected, target)
    true = d.diagonal()
    n = len(d)
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    rows = (((d < true[:, None]) + 0.5 * (d == true[:, None])) * off).sum(1) / (n - 1)
    cols = (((d < true[None, :]) + 0.5 * (d == true[None, :])) * off).sum(0) / (n - 1)
    return float((rows.mean() + cols.mean()) / 2)


def label_transfer_accuracy(projected, x_labels, target, y_labels, k: int = 5) -> float:
    """k-NN (majority of the k nearest targets) label of each projected source point vs its own label."""
    nearest = torch.cdist(projected, target).topk(min(k, len(target)), largest=False).indices
    votes = y_labels[nearest]
    predicted = torch.mode(votes, dim=1).values
    return float((predicted == x_labels).double().mean())


def support_recovery(found: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of a boolean support against the true one."""
    hits = (found & true).sum().item()
    return hits / max(found.sum().item(), 1), hits / max(true.sum().item(), 1)


def evaluate(data: PairedData, P: torch.Tensor, M: torch.Tensor | None, k: int) -> dict[str, float]:
    projected = barycentric_projection(P, data.Y)
    metrics = {"foscttm": foscttm(projected, data.Y)}
    if data.x_labels is not None:
        metrics["label_transfer"] = label_transfer_accuracy(projected, data.x_labels, data.Y, data.y_labels, k)
    if M is not None:
        metrics["zero_fraction"] = float((M.abs() <= 1e-12).double().mean())
        if data.true_map is not None:
            # entries of M estimate M*Σ_x, so the feature (column) support is the recoverable one
            true = data.true_map.to(M).abs() > 0
            metrics["feature_precision"], metrics["feature_recall"] = support_recovery(M.abs().sum(0) > 1e-12, true.any(0))
            metrics["entry_precision"], metrics["entry_recall"] = support_recovery(M.abs() > 1e-12, true)
    return metrics


def check_solver(solver: DictConfig) -> None:
    """Names against their registries; the ranges (ε > 0, λ ≥ 0, …) are conf/cost_reg_ot.yaml's checks."""
    if solver.method not in METHODS:
        raise ConfigError(f"unknown solver.method '{solver.method}'; valid: {', '.join(METHODS)}")
    if solver.regularizer not in REGULARIZERS:
        raise ConfigError(f"unknown solver.regularizer '{solver.regularizer}'; valid: {', '.join(REGULARIZERS)}")


class CostRegOTModule(pl.LightningModule):
    """Fits M (and the coupling P) by the alternating proximal scheme; baselines solve once through POT."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Called by the runner (and for every grid point of reproduce/bench) before any MLflow run starts."""
        from pipelines.cost_reg_ot.model import BASELINES

        check_solver(cfg.solver)
        check_source(cfg.data)
        valid = (*REGULARIZERS, *BASELINES)
        if cfg.reproduce.method not in valid:
            raise ConfigError(f"unknown reproduce method '{cfg.reproduce.method}'; valid: {', '.join(valid)}")
        check_manual_step(cfg.trainer, "cost_reg_ot's closed-form prox updates")
        if cfg.reproduce.dataset not in (*GENERATED, *REAL):
            raise ConfigError(f"unknown reproduce.dataset '{cfg.reproduce.dataset}'; valid: {', '.join([*GENERATED, *REAL])}")
        if cfg.get("experiment") == "reference_scgem" and cfg.reproduce.dataset != "scGEM":
            raise ConfigError("experiment reference_scgem runs the reference code's scGEM setting; leave reproduce.dataset out")
        if cfg.reproduce.dataset in REAL:  # a grid point on a real pair: its folder before the parent run opens
            real_folder(cfg.reproduce.real_root, cfg.reproduce.dataset)

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """No parameter for freeze=[…]: M is a buffer the closed-form prox updates."""
        return torch.nn.Module()

    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_solver(cfg.solver)
        self.cfg = cfg
        self.automatic_optimization = False  # the M-update is a closed-form prox, not a gradient step
        self.register_buffer("M", torch.zeros(0, dtype=torch.float64))
        self.P: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._potentials = None
        self._calm = 0
        self._last_objective: float | None = None
        self.final_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        datamodule.setup(stage)
        pair = datamodule.pair
        if self.M.numel() == 0:  # (a resumed run loads M from the checkpoint after this)
            self.M = initial_map(pair.X.shape[1], pair.Y.shape[1], pair.X)

    def configure_optimizers(self):
        return None

    def training_step(self, batch: PairedData, batch_idx: int):
        s = self.cfg.solver
        self._iterations = batch_idx + 1
        X, Y = batch.X, batch.Y
        a, b = uniform_weights(X), uniform_weights(Y)
        shared = batch.shared()
        if shared is None and X.shape[1] == Y.shape[1]:
            shared = (X, Y)  # the same feature space on both sides
        if (s.method == "fgw" or (s.method == "stochastic" and s.fused > 0)) and shared is None:
            raise ConfigError(
                f"solver.method={s.method}{' with solver.fused > 0' if s.method == 'stochastic' else ''} needs features "
                f"both sides measure: give data.x_shared and data.y_shared (X has {X.shape[1]} columns, Y {Y.shape[1]})"
            )
        if s.method in {"gw", "entropic_gw", "fgw"}:
            result = gromov_baseline(
                X,
                Y,
                s.method,
                s.eps,
                shared=shared if s.method == "fgw" else None,
                max_iter=s.max_iter,
                tol=s.tol,
                patience=s.patience,
                sinkhorn_iter=s.sinkhorn_iter,
            )
            if result.failed:
                raise FloatingPointError(f"{s.method} failed: {result.failed}")
            self.P = result.P
            self.M = cross_moment(X, Y, self.P)  # the map GW-IP implies (A(P)), for inspection only
            self._iterations = result.iterations
            self.log_dict({"solver_seconds": result.seconds, "converged": float(result.converged)})
            return self._finish(batch)
        if s.method == "stochastic":
            generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + batch_idx)
            self.M = stochastic_step(
                X,
                Y,
                self.M,
                s.eps,
                s.regularizer,
                s.lam,
                s.rank,
                s.fused,
                s.batch_size,
                s.step_size,
                generator,
                *(shared if s.fused > 0 else (None, None)),
            )
            self.P, self._potentials = sinkhorn(a, b, cost_matrix(X, Y, self.M), s.eps, self._potentials, s.sinkhorn_iter, s.sinkhorn_tol)
            value = objective(X, Y, a, b, self.M, self.P, s.eps, s.regularizer, s.lam)
        else:  # the step model.solve takes, so both give the same (M, P) (tested)
            # the previous step's n × m buffer takes the next (as model.solve: an n × m allocation per step costs page
            # faults); P itself is formed by the final plan only
            step = prox_step(
                X,
                Y,
                a,
                b,
                self.M,
                s.eps,
                s.regularizer,
                s.lam,
                s.rank,
                self._potentials,
                s.sinkhorn_iter,
                s.sinkhorn_tol,
                out=self._buffer,
                momentum=s.sinkhorn_momentum,
                plan=False,
            )
            self.M, self._buffer, self._potentials, value = step.M, step.buffer, step.potentials, step.objective
        if not torch.isfinite(torch.tensor(value)):
            raise FloatingPointError(f"objective became {value} at iteration {self.global_step}; increase solver.eps")
        # manual optimization without a torch optimizer leaves global_step at 0: log by iteration
        self.log("objective", value, prog_bar=True, logger=False)
        if self.logger is not None:
            self.logger.log_metrics({"objective": value, "zero_fraction": float((self.M.abs() <= 1e-12).double().mean())}, step=batch_idx)
        previous, self._last_objective = self._last_objective, value
        self._calm = self._calm + 1 if relatively_unchanged(previous, value, s.tol) else 0
        if self._calm >= s.patience or batch_idx == s.max_iter - 1:
            if s.method == "prox":  # as model.solve: the final plan belongs to the final M
                self.P, self._potentials = final_plan(
                    X, Y, a, b, self.M, s.eps, self._potentials, s.sinkhorn_iter, s.sinkhorn_tol, self._buffer, s.sinkhorn_momentum
                )
            self.log("converged", float(self._calm >= s.patience))
            return self._finish(batch)
        return None

    def _finish(self, batch: PairedData) -> None:
        self.final_metrics = evaluate(batch, self.P, self.M, self.cfg.evaluation.knn)
        self.log_dict(self.final_metrics)
        self.log("iterations", float(self._iterations))
        self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint) -> None:
        # the loop position is Lightning's; the solver's own state (warm start, convergence count) is ours, so a
        # resumed solve takes the same Sinkhorn iterations as an uninterrupted one
        checkpoint["solver_state"] = {"potentials": self._potentials, "calm": self._calm, "last_objective": self._last_objective}

    def on_load_checkpoint(self, checkpoint) -> None:
        state = checkpoint.get("solver_state", {})
        self._potentials = state.get("potentials")
        self._calm, self._last_objective = state.get("calm", 0), state.get("last_objective")
