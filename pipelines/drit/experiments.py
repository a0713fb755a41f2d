"""One grid point of the DRIT bench (the reproduce children are ordinary ``lightyard train`` runs; grids and tables are
in conf/drit.yaml).

``speed_point`` times, in one process and interleaved round by round, ``bench.steps`` training iterations of the
LightningModule (``Trainer.fit``: manual optimisation, Lightning's optimiser wrappers, logging) against a hand-written
loop of the same step (:func:`pipelines.drit.model.train_iteration` with plain ``loss.backward`` / ``opt.step`` and
the same three Adam optimisers) on the same batches of the run's data. The clock runs from the second batch to the
last of each round (the first warms up); the fastest round of each counts."""

from __future__ import annotations

import copy
import os
import time

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from common.hardware import resolve_accelerator
from common.tracking import Tracker
from pipelines.drit.data import UnpairedDataModule
from pipelines.drit.model import StepHooks, train_iteration
from pipelines.drit.module import DRITModule, loss_weights


class _Clock(pl.Callback):
    def __init__(self, device: torch.device):
        self.device, self.start, self.seconds = device, None, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:
            self._sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self._sync()
        self.seconds = time.perf_counter() - self.start


def speed_point(cfg: DictConfig, tracker: Tracker | None) -> dict[str, float]:
    """Iterations/s of both loops and their ratio (target: Lightning ≥ 0.95 × hand loop)."""
    if int(cfg.threads) == 0:  # torch's default, one thread per core (an earlier child of this process may have set 1)
        torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(resolve_accelerator(str(cfg.trainer.accelerator)))
    steps = int(cfg.bench.steps) + 1  # + the warm-up batch
    data = UnpairedDataModule(cfg)
    data.setup("fit")
    module = DRITModule(cfg)
    module.channels = data.channels
    from pipelines.drit.module import build_net

    module.net = build_net(cfg, data.channels)
    loop_net = copy.deepcopy(module.net).to(device)
    loader = data.train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    while len(batches) < steps:
        batches += batches[: steps - len(batches)]

    o = cfg.optim
    opts = {
        "content_d": torch.optim.Adam(
            loop_net.dis_c.parameters(), lr=o.content_lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        ),
        "d": torch.optim.Adam(loop_net.discriminator_parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay),
        "eg": torch.optim.Adam(
            loop_net.encoder_generator_parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        ),
    }
    clip_params = {"content_d": list(loop_net.dis_c.parameters())}
    hooks = StepHooks(
        backward=lambda loss, inputs, retain_graph=False: loss.backward(inputs=inputs, retain_graph=retain_graph),
        zero_grad=lambda name: opts[name].zero_grad(set_to_none=True),
        step=lambda name: opts[name].step(),
        clip=lambda name, norm: torch.nn.utils.clip_grad_norm_(clip_params[name], norm),
    )
    weights = loss_weights(cfg)
    iteration = 0

    def hand_round() -> float:
        nonlocal iteration
        start = None
        for i, (x, y, idx) in enumerate(batches):
            if i == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            batch = (x.to(device), y.to(device), idx)
            train_iteration(loop_net, batch, iteration, cfg.seed, weights, o.d_iter, cfg.model.content_noise, o.content_clip, hooks)
            iteration += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    class _Fixed(pl.LightningDataModule):  # the same batches as the hand loop, through Lightning's fit loop
        channels = data.channels

        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None)  # (a bare list would read as several loaders)

    def lightning_round() -> float:
        clock = _Clock(device)
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps),
            callbacks=[clock],
        )
        trainer.fit(module, datamodule=_Fixed())
        return clock.seconds

    best = {"lightning": float("inf"), "loop": float("inf")}
    for round_ in range(int(cfg.bench.repeats) + 1):  # round 0 warms up (allocator, kernels)
        for name, run in (("lightning", lightning_round), ("loop", hand_round)):
            seconds = run()
            if round_ > 0:
                best[name] = min(best[name], seconds)
    timed = steps - 1
    out = {
        "lightning_it_per_s": timed / best["lightning"],
        "loop_it_per_s": timed / best["loop"],
        "torch_threads": float(torch.get_num_threads()),
    }
    out["lightning_over_loop"] = out["lightning_it_per_s"] / out["loop_it_per_s"]
    print(
        f"Lightning {out['lightning_it_per_s']:.2f} it/s vs hand loop {out['loop_it_per_s']:.2f} it/s: "
        f"{out['lightning_over_loop']:.3f}× ({out['torch_threads']:.0f} threads)",
        flush=True,
    )
    return out
