"""hog_gcn on CUDA (skipped without a GPU; tests/gpu/run_all.sh runs them and `lightyard bench hog_gcn` on a GPU machine).

hog_gcn trains in fp32 on every device (conf/hog_gcn.yaml: trainer.precision), so the paper preset's CUDA run is
checked against the same run on the CPU rather than for bf16."""

import pytest
import torch

from common.runner import compose, train
from pipelines.hog_gcn.data import build_graph
from pipelines.hog_gcn.module import fit_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
# dropout off: CUDA draws its own dropout masks; everything else (initial weights, the L_lp label draws) is the same
PAPER = {"preset": "paper", "model.dropout": 0.0, "trainer.max_epochs": 30}


@pytest.mark.parametrize("model", ["hog_gcn", "gcn"])
def test_paper_preset_trains_on_cuda_as_on_the_cpu(model):
    """fit_split (reproduce's loop) on the paper preset's model: the same accuracies on CUDA as on the CPU, up to the
    order of CUDA's scatter sums (sparse HOG-GCN's sampled matmuls included)."""
    cfg = compose("hog_gcn", {**PAPER, "model.name": model})
    graph = build_graph(cfg)
    cpu = fit_split(cfg, graph, 0)
    gpu = fit_split(cfg, graph.to(DEVICE), 0)
    assert cpu["val_acc"] > 0.35  # it learned: the default CSBM has 5 classes (GCN ~0.44, HOG-GCN ~0.61 here)
    for key in ("train_acc", "val_acc", "test_acc"):
        assert gpu[key] == pytest.approx(cpu[key], abs=0.02), key


def test_lightning_run_on_cuda_under_ddp_matches_the_lean_loop(home):
    """`lightyard train hog_gcn preset=paper` on one GPU under the DDP strategy: FINISHED, with the lean loop's
    best epoch accuracies on the same device."""
    values = {**PAPER, "model.name": "hog_gcn", "trainer.accelerator": DEVICE, "trainer.devices": 1, "trainer.strategy": "ddp"}
    (result,) = train("hog_gcn", [f"{k}={v}" for k, v in values.items()])
    assert result.status == "FINISHED"
    cfg = compose("hog_gcn", values)
    lean = fit_split(cfg, build_graph(cfg).to(DEVICE), cfg.data.split)
    assert result.metrics["best_val_acc"] == pytest.approx(lean["val_acc"], abs=0.02)
    assert result.metrics["test_acc_at_best_val"] == pytest.approx(lean["test_acc"], abs=0.03)
