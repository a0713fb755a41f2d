"""LightningModule for full-batch node classification, and the same steps as a lean loop for sweeps.

Protocol: Adam; every epoch one training step on the whole graph, then validation and test accuracy
in eval mode (dropout off; the reference code evaluates in training mode); the reported test accuracy
is the one at the epoch of best validation accuracy.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from torch_geometric.data import Data

from common.config import ConfigError
from common.data import check_root_is_read
from common.hardware import check_manual_step
from pipelines.hog_gcn.data import REAL, checked_raw
from pipelines.hog_gcn.model import MODELS, HOGGCN, build_model, loss_terms


def check_model(cfg: DictConfig) -> None:
    if cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model.name '{cfg.model.name}'; valid: {', '.join(MODELS)}")
    if cfg.model.hog.lp_labels not in ("train", "pseudo"):
        raise ConfigError(f"model.hog.lp_labels must be train or pseudo, got '{cfg.model.hog.lp_labels}'")
    unknown = [g for g in cfg.bench.graphs if g not in cfg.bench.overhead_graphs]
    if unknown or cfg.bench.graph not in cfg.bench.overhead_graphs:
        raise ConfigError(
            f"bench.graphs / bench.graph must name entries of bench.overhead_graphs ({', '.join(cfg.bench.overhead_graphs)}), got {unknown or cfg.bench.graph}"
        )
    if cfg.data.name == "csbm" and cfg.data.degree >= cfg.data.nodes:  # n·degree/2 edges are drawn: a huge value overflows torch
        raise ConfigError(f"data.degree (mean degree) must be below data.nodes={cfg.data.nodes}, got {cfg.data.degree}")
    if cfg.callbacks.checkpoint.monitor:  # its metrics reach Lightning only at the last epoch (HogGCNModule.on_train_batch_end)
        raise ConfigError(
            "hog_gcn keeps the best epoch itself (every epoch: best_val_acc, test_acc_at_best_val); "
            f"leave callbacks.checkpoint.monitor null (got {cfg.callbacks.checkpoint.monitor})"
        )
    check_manual_step(
        cfg.trainer, "hog_gcn, whose module steps its optimizer itself (Lightning clips and accumulates only the steps it takes)"
    )
    check_root_is_read(cfg.data, "csbm", ("csbm", *REAL))
    if cfg.data.name != "csbm":
        checked_raw(cfg.data.name, cfg.data.root)  # a real dataset's folder and files, checked before anything runs


def make_model(cfg: DictConfig, graph: Data) -> torch.nn.Module:
    classes = int(graph.y.max()) + 1
    return build_model(cfg.model, graph.num_features, classes, graph.edge_index, graph.num_nodes)


def label_input(model, graph: Data, cfg: DictConfig, generator: torch.Generator):
    """(Y⁽⁰⁾, nodes scored by L_lp) for HOG-GCN's label propagation, or (None, None) for other models.

    Paper variant: half of the training labels (redrawn every epoch) are propagated and the other half
    is scored, so a node never predicts its own label through a self-loop or a 2-hop return path.
    Code variant (``pseudo``): the MLP's argmax labels, fixed after its pre-training, for every node.
    """
    if not isinstance(model, HOGGCN):
        return None, None
    classes = model.layers[-1].neighbour.out_features
    if model.lp_labels == "pseudo":
        if len(model.pseudo_labels) == 0:
            return None, None
        return F.one_hot(model.pseudo_labels, classes).float(), graph.train_mask
    train = torch.nonzero(graph.train_mask).flatten()
    order = train[torch.randperm(len(train), generator=generator).to(train.device)]
    cut = int(len(order) * cfg.model.hog.lp_input_fraction)
    Y0 = torch.zeros(graph.num_nodes, classes, device=graph.x.device)
    Y0[order[:cut], graph.y[order[:cut]]] = 1.0
    target = torch.zeros_like(graph.train_mask)
    target[order[cut:]] = True
    return Y0, target


def training_loss(model, graph: Data, epoch: int, cfg: DictConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """L = L_gcn + λ L_mlp + γ L_lp (Eq. 12); only L_mlp while HOG-GCN's MLP is being pre-trained."""
    h = cfg.model.hog
    if isinstance(model, HOGGCN) and model.lp_labels == "pseudo" and epoch == h.mlp_pretrain_epochs:
        with torch.no_grad():
            model.pseudo_labels = model.mlp(graph.x).argmax(-1)
    Y0, target = label_input(model, graph, cfg, generator)
    out = model(graph.x, Y0)
    terms = loss_terms(out, graph.y, graph.train_mask, target)
    if isinstance(model, HOGGCN) and epoch < h.mlp_pretrain_epochs:
        total = terms["mlp"]
    else:
        total = terms["gcn"] + h.lam * terms.get("mlp", 0.0) + h.gamma * terms.get("lp", 0.0)
    return {"loss": total, **{f"loss_{k}": v.detach() for k, v in terms.items()}}


@torch.no_grad()
def accuracies(model, graph: Data) -> dict[str, float]:
    was_training = model.training
    model.eval()
    predicted = model(graph.x)["logits"].argmax(-1)
    model.train(was_training)
    return {
        f"{split}_acc": float((predicted[graph[f"{split}_mask"]] == graph.y[graph[f"{split}_mask"]]).float().mean())
        for split in ("train", "val", "test")
    }


def optimizer(cfg: DictConfig, model) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def split_seed(cfg: DictConfig, split: int) -> int:
    """Each split is its own seed (``seed + split``): initial weights, dropout and the L_lp label draws."""
    return int(cfg.seed) + int(split)


def fit_split(cfg: DictConfig, graph: Data, split: int) -> dict[str, float]:
    """Train one model on one split without Lightning's per-epoch overhead (used by reproduce's hundreds of runs).

    The same steps as :class:`HogGCNModule` (``training_loss``, ``accuracies``, ``optimizer``) in the same
    random order, so both give the same model for the same config (tested)."""
    epochs = split_epochs(cfg, graph, split)
    best = next(epochs)  # the model is built: the clock counts training and evaluation
    start = time.perf_counter()
    last = deque(epochs, maxlen=1)  # runs the epochs, keeps the best after the last
    return {**(last[0] if last else best), "seconds": time.perf_counter() - start}


def split_epochs(cfg: DictConfig, graph: Data, split: int) -> Iterator[dict[str, float]]:
    """fit_split's loop one epoch at a time (the overhead bench interleaves it with Lightning's steps): yields
    once the model is built (``{}``), then the best epoch so far (by validation accuracy) after each epoch."""
    torch.manual_seed(split_seed(cfg, split))
    g = graph.clone()
    for key in ("train_mask", "val_mask", "test_mask"):
        g[key] = graph[key][:, split]
    model = make_model(cfg, g).to(g.x.device)
    opt = optimizer(cfg, model)
    generator = torch.Generator().manual_seed(split_seed(cfg, split))
    best: dict[str, float] = {}
    yield best
    for epoch in range(cfg.trainer.max_epochs):
        model.train()
        opt.zero_grad()
        training_loss(model, g, epoch, cfg, generator)["loss"].backward()
        opt.step()
        acc = accuracies(model, g)
        if acc["val_acc"] > best.get("val_acc", -1.0):
            best = {**acc, "best_epoch": epoch}
        yield best


class HogGCNModule(pl.LightningModule):
    """Any of HOG-GCN and the baselines (``model.name``), trained full-batch on one split."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_model(cfg)

    @classmethod
    def skeleton(cls, cfg: DictConfig) -> torch.nn.Module:
        """The parameter names freeze=[…] will see (the network is built in setup, sized by the graph): a 3-node path's,
        on the CPU (building it computes with the edges; tiny)."""
        with torch.device("cpu"):
            return torch.nn.ModuleDict({"model": build_model(cfg.model, 2, 2, torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), 3)})

    def __init__(self, cfg: DictConfig):
        super().__init__()
        check_model(cfg)
        self.cfg = cfg
        self.model: torch.nn.Module | None = None
        # made in setup, not here: under ddp_spawn the module is pickled to the workers, and a Generator's state
        # travels as a temporary shared-memory tensor freed before a worker maps it ("unable to resize file")
        self.generator: torch.Generator | None = None
        self.best_val = -1.0
        self.best: dict[str, float] = {}
        self.automatic_optimization = False  # see training_step

    def setup(self, stage: str) -> None:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(split_seed(self.cfg, self.cfg.data.split))
        if self.model is None:
            torch.manual_seed(split_seed(self.cfg, self.cfg.data.split))  # as fit_split: the split's own seed
            self.model = make_model(self.cfg, self.trainer.datamodule.graph)

    def training_step(self, dataloader_iter) -> torch.Tensor:
        """The epoch's one optimizer step, on the whole graph (its evaluation follows in on_train_batch_end).

        The step is written out (Lightning's manual optimisation) and takes the graph from the iterator, so
        Lightning's closure and batch-transfer hooks stay out of it: ~0.08 of Lightning's ~0.23 ms a step on a
        trivial module, ~0.2 ms after a graph's step has cooled the caches (hog_gcn's README, the overhead bench)."""
        graph = next(dataloader_iter)[0]
        if graph.x.device != self.device:  # moved in place on the first epoch (PyG's Data.to), found there after
            graph = self.trainer.strategy.batch_to_device(graph)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        terms = training_loss(self.model, graph, self.current_epoch, self.cfg, self.generator)
        self.manual_backward(terms["loss"])
        optimizer.step()
        self._terms = {f"train/{k}": v.detach() for k, v in terms.items()}
        return terms["loss"]  # detached by Lightning: common.callbacks.FiniteLoss checks it

    def __setattr__(self, name, value) -> None:
        # Lightning sets _current_fx_name around every hook, ~40 times a step; nn.Module.__setattr__'s
        # parameter/buffer/module checks cost ~0.1 ms of a small graph's ~6 ms step (a plain str needs none)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def on_train_batch_end(self, outputs, graph, batch_idx) -> None:
        """Full batch: the epoch's evaluation right after its one optimizer step, as fit_split does, with no
        validation loop around it (Lightning's per-epoch loop and per-key logging cost more than a small graph's
        epoch). Here, not in training_step: outside its autocast (fp32, as fit_split), and after the callbacks' hook,
        so the epoch at which GracefulShutdown stops the fit is logged as the run's last."""
        acc = accuracies(self.model, graph)
        metrics = {**self._terms, **acc}
        if acc["val_acc"] > self.best_val:
            self.best_val = acc["val_acc"]
            self.best = {"best_epoch": float(self.current_epoch), "test_acc_at_best_val": acc["test_acc"]}
        metrics.update(self.best, best_val_acc=self.best_val)
        epoch, trainer = self.current_epoch, self.trainer
        last = epoch + 1 == trainer.max_epochs or trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if last:  # the run's summary (callback_metrics)
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        elif (epoch + 1) % trainer.log_every_n_steps == 0:  # on every rank: the mean is a collective
            # every trainer.log_every_n_steps epochs (Lightning's own knob) straight to the logger, as self.log
            # would (rank mean, step = epoch): a key in self.log's collection costs a reset every epoch after
            # its first, ~0.2 ms a step for these ten keys; the best is tracked every epoch
            reduce = trainer.strategy.reduce
            values = {
                k: float(reduce(torch.as_tensor(v, device=self.device, dtype=torch.float32), reduce_op="mean")) for k, v in metrics.items()
            }
            for logger in self.loggers:
                logger.log_metrics({**values, "epoch": epoch}, step=epoch)

    def configure_optimizers(self):
        return optimizer(self.cfg, self.model)

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["best_val"], checkpoint["best"] = self.best_val, self.best
        checkpoint["lp_generator"] = self.generator.get_state()  # L_lp's label draws continue exactly on resume

    def on_load_checkpoint(self, checkpoint) -> None:
        self.best_val, self.best = checkpoint.get("best_val", -1.0), checkpoint.get("best", {})
        if "lp_generator" in checkpoint:
            self.generator.set_state(checkpoint["lp_generator"])
