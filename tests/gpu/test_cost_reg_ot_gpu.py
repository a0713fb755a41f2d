"""cost_reg_ot on CUDA (skipped without a GPU; tests/gpu/run_all.sh runs them and `lightyard bench cost_reg_ot` on a
GPU machine): the solver's GPU path (one GEMM + exp per Sinkhorn pass, not the CPU's cache-sized blocks) reaches the
CPU's map and coupling."""

import pytest
import torch

from pipelines.cost_reg_ot.data import planted_pair, preprocess
from pipelines.cost_reg_ot.model import solve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


@pytest.mark.parametrize(
    "regularizer, lam, factored", [("l12", 0.1, False), ("l1", 1.5, False), ("lowrank", 0.0, False), ("lowrank", 0.0, True)]
)
def test_solver_on_cuda_reaches_the_cpus_solution(regularizer, lam, factored):
    data = preprocess(planted_pair(n=200, seed=0), True, False, True)
    # a fixed number of iterations (tol 0): the two devices sum in different orders, so a stopping rule could end
    # them an iteration apart
    settings = {"eps": 0.05, "regularizer": regularizer, "lam": lam, "rank": 2, "factored": factored, "sinkhorn_tol": 1e-9}
    settings |= {"max_iter": 15, "tol": 0.0, "patience": 15}
    cpu = solve(data.X, data.Y, **settings)
    gpu = solve(data.X.to(DEVICE), data.Y.to(DEVICE), **settings)
    assert gpu.M.device.type == DEVICE and gpu.iterations == cpu.iterations == 15
    torch.testing.assert_close(gpu.M.cpu(), cpu.M, rtol=0, atol=1e-6)
    if not factored:
        torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=0, atol=1e-8)
