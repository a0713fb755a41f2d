"""iiot_sic_aloha: closed forms, simulator vs analysis vs the per-slot reference, bad input, a full run."""

import math
import re

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from common.config import ConfigError
from common.grid import run_experiment
from common.report import children_rows
from common.runner import compose, train
from common.tracking import tracking_uri
from pipelines.iiot_sic_aloha.analysis import (
    analyze,
    best_transmit_probability,
    decoding_table,
    sic_tail_probability,
    leave_one_out_products,
    threshold_aloha_mean_field,
)
from pipelines.iiot_sic_aloha.data import Scenario, scenario_from_config
from pipelines.iiot_sic_aloha.model import (
    RandomStream,
    _chunk_stats,
    _decode_events,
    _report_events,
    decode,
    simulate,
    threshold_deliveries,
)
from pipelines.iiot_sic_aloha.module import SicAlohaExperiment
from pipelines.iiot_sic_aloha.reference import simulate_reference

NOISELESS = 1e12  # ρ so large that e^{−γ/ρ} = 1: the classic collision channel


def test_slotted_aloha_throughput_and_aoi_closed_forms():
    n, p = 10, 0.1
    scenario = Scenario(n, (1.0,) * n, transmit_prob=p, snr=NOISELESS)  # generate-at-will, attempt w.p. p
    tau = p * (1 - p) ** (n - 1)
    analysis = analyze(scenario, "aloha")
    assert analysis["throughput"] == pytest.approx(n * tau, rel=1e-9)
    assert analysis["mean_aoi"] == pytest.approx(1 / tau, rel=1e-9)
    sim = simulate(scenario, "aloha", 40_000, 8, seed=1).summary(0.999)
    assert abs(sim["throughput"][0] - n * tau) <= sim["throughput"][1]
    assert abs(sim["mean_aoi"][0] - 1 / tau) <= sim["mean_aoi"][1]
    assert abs(sim["p_age_violation"][0] - (1 - tau) ** 20) <= sim["p_age_violation"][1]


@pytest.mark.parametrize("k, gamma", [(2, 1.0), (4, 2.0), (3, 0.5)])
def test_rayleigh_capture_probability(k, gamma):
    snr, draws = 10.0, 200_000
    gains = torch.empty(draws, k, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(k))
    decoded = decode(snr * gains, "capture", gamma)[:, 0].double()
    expected = math.exp(-gamma / snr) * (1 + gamma) ** (-(k - 1))
    assert abs(decoded.mean().item() - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)


@pytest.mark.parametrize(
    "scheme,gamma,residual,stages",
    [("aloha", 1.0, 0.0, None), ("capture", 0.5, 0.0, None), ("sic", 1.0, 0.0, None), ("sic", 0.3, 0.1, None), ("sic", 0.3, 0.0, 2)],
)
def test_event_decoder_equals_the_per_slot_receiver(scheme, gamma, residual, stages):
    """The simulator's event form (one sort, segment sums) against the dense per-slot receiver."""
    g = torch.Generator().manual_seed(3)
    slots, nodes = 4000, 12
    active = torch.rand(slots, nodes, generator=g) < 0.3
    rx = torch.rand(slots, nodes, generator=g).log_().mul_(-5.0) * active
    rx[0, :3] = 2.0  # an exact tie: the decision cannot depend on the order of equal powers
    rx[0, 3:] = 0.0
    slot, node = (rx > 0).nonzero(as_tuple=True)
    scenario = Scenario(nodes, (0.3,) * nodes, threshold=gamma, csi_residual=residual, max_sic_stages=stages)
    events = _decode_events(slot, rx[slot, node], scheme, scenario, slots)
    dense = decode(rx, scheme, gamma, residual, stages)
    assert events.any() and torch.equal(events, dense[slot, node])
    assert not dense[rx == 0].any()


@pytest.mark.parametrize("seed", range(3))
def test_threshold_aloha_fixed_point_equals_slot_by_slot_stepping(seed):
    """The event form of age-dependent access against a plain loop over slots, on the same draws."""
    g = torch.Generator().manual_seed(seed)
    nodes, slots, gamma_threshold = 6, 400, 8
    candidate = torch.rand(slots, nodes, generator=g) < 0.2  # a report and the coin < τ
    clears = torch.rand(slots, nodes, generator=g) < 0.8
    age0 = torch.randint(1, 16, (nodes,), generator=g)
    expected, age = torch.zeros(slots, nodes, dtype=torch.bool), age0.clone()
    for t in range(slots):
        real = candidate[t] & (age >= gamma_threshold)
        if real.sum() == 1 and clears[t][real].all():
            expected[t] = real
        age = torch.where(expected[t], 1, age + 1)
    node, slot = candidate.t().nonzero(as_tuple=True)  # (node, slot) order
    delivered = threshold_deliveries(node, slot, slot, clears[slot, node], -age0[node], gamma_threshold, slots)
    assert expected.sum() > 10 and torch.equal(delivered, expected[slot, node])


def test_report_events_come_in_node_slot_order_with_their_keys():
    q = torch.tensor([0.3, 0.0, 1.0, 0.05])  # a silent node, a node reporting every slot
    generated, node, slot, slot_key = _report_events(q, 2, 50, 1.0, RandomStream(0))
    per_node = torch.bincount(node, minlength=8)
    assert torch.equal(per_node.double(), generated) and per_node[[1, 5]].sum() == 0 and (per_node[[2, 6]] == 50).all()
    position = node * 50 + slot
    assert (position[1:] > position[:-1]).all() and torch.equal(slot_key, slot + node // 4 * 50)
    generated, node, _, _ = _report_events(q, 2, 50, 0.5, RandomStream(0))
    assert (generated >= torch.bincount(node, minlength=8)).all() and generated[[2, 6]].tolist() == [50, 50]


def test_chunk_statistics_equal_slot_by_slot_bookkeeping():
    """Interval sums (triangle numbers, telescoping peaks) against ages stepped slot by slot."""
    g = torch.Generator().manual_seed(0)
    R, N, size, deadline = 2, 4, 80, 6
    sent = torch.rand(R * N, size, generator=g) < 0.2
    delivered = sent & (torch.rand(R * N, size, generator=g) < 0.5)
    delivered[0] = False  # a node that never delivers
    sent[1, 0] = delivered[1, 0] = True  # a delivery in the first slot
    age0 = torch.randint(1, 15, (R, N), generator=g, dtype=torch.int32)  # some already over D
    node, slot = sent.nonzero(as_tuple=True)  # (node, slot) order
    generated = torch.rand(R * N, generator=g, dtype=torch.float64)
    age, got = _chunk_stats(node, slot, delivered[node, slot], age0, size, deadline, generated)
    expected = {name: torch.zeros(R * N, dtype=torch.float64) for name in ("age_sum", "over", "peak_sum")}
    a = age0.view(-1).double()
    for t in range(size):
        expected["peak_sum"] += torch.where(delivered[:, t], a, 0.0)  # the age just before the reset
        a = torch.where(delivered[:, t], 1.0, a + 1)
        expected["age_sum"] += a
        expected["over"] += (a > deadline).double()
    expected["deliveries"], expected["generated"] = delivered.sum(1).double(), generated
    assert torch.equal(age.view(-1), a.int())
    for name, value in expected.items():
        assert torch.equal(got[name].view(-1), value), name


def test_streams_split_the_replications_deterministically():
    scenario = Scenario(6, (0.2,) * 6, csi_residual=0.1)
    both = simulate(scenario, "sic", 3000, 5, warmup=100, chunk_slots=700, seed=3, streams=2)
    first = simulate(scenario, "sic", 3000, 3, warmup=100, chunk_slots=700, seed=3)
    second = simulate(scenario, "sic", 3000, 2, warmup=100, chunk_slots=700, seed=3 + 1000003)
    assert np.array_equal(both.per_node_aoi, np.concatenate([first.per_node_aoi, second.per_node_aoi]))
    for metric, values in both.per_replication.items():
        assert np.array_equal(values, np.concatenate([first.per_replication[metric], second.per_replication[metric]]))


def test_sic_closed_form_spot_values_from_the_notes():
    assert [round(sic_tail_probability(2, m, 10, 1), 3) for m in (1, 2)] == [0.905, 0.741]
    assert [round(sic_tail_probability(4, m, 100, 1), 3) for m in (1, 2, 3, 4)] == [0.495, 0.364, 0.350, 0.323]


@pytest.mark.parametrize("gamma, residual", [(1.0, 0.05), (2.0, 0.05), (1.0, 0.3)])
def test_sic_imperfect_csi_closed_form_matches_monte_carlo(gamma, residual):
    exact, is_exact = decoding_table("sic", 6, 10.0, gamma, residual)
    assert is_exact
    gains = torch.empty(400_000, 6, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(3))
    decoded = decode(10.0 * gains, "sic", gamma, residual).sum(-1).double()
    assert abs(decoded.mean().item() - exact[6]) < 4 * decoded.std().item() / math.sqrt(len(decoded))


def test_analysis_inside_simulation_confidence_interval_on_a_grid():
    inside, margins = [], []
    for i, (a, gamma, residual) in enumerate([(0.05, 1.0, 0.0), (0.2, 1.0, 0.05), (0.1, 2.0, 0.0)]):
        scenario = Scenario(12, (a,) * 12, snr=10.0, threshold=gamma, csi_residual=residual)
        for scheme in ("aloha", "capture", "sic"):
            analysis = analyze(scenario, scheme)
            for metric, (mean, half) in simulate(scenario, scheme, 30_000, 8, seed=10 + i).summary(0.99).items():
                inside.append(abs(mean - analysis[metric]) <= half)
                margins.append(abs(mean - analysis[metric]) / half)
    # 99% intervals: nearly all inside, and nothing far outside (about 4σ)
    assert sum(inside) / len(inside) >= 0.9, margins
    assert max(margins) < 1.5, margins


def test_heterogeneous_nodes_follow_the_poisson_binomial_analysis():
    q = (0.02,) * 6 + (0.2,) * 4
    scenario = Scenario(10, q, snr=10.0)
    analysis = analyze(scenario, "sic")
    result = simulate(scenario, "sic", 40_000, 8, seed=5)
    for (mean, half), exact in zip(result.per_node(0.999), analysis["per_node_aoi"]):
        assert abs(mean - exact) <= half
    assert analysis["per_node_aoi"][0] > 3 * analysis["per_node_aoi"][-1]  # rare reporters are older


def _welch_p(a, b):
    return stats.ttest_ind(a, b, equal_var=False).pvalue


@pytest.mark.parametrize("scheme", ["sic", "threshold_aloha"])
def test_vectorized_and_reference_simulators_agree(scheme):
    scenario = Scenario(8, (0.15,) * 8, snr=10.0, threshold=1.0, csi_residual=0.05)
    reference = [simulate_reference(scenario, scheme, 6000, warmup=500, seed=s) for s in range(5)]
    vectorized = simulate(scenario, scheme, 6000, 10, warmup=500, seed=7).per_replication
    for metric in ("throughput", "mean_aoi", "p_age_violation", "p_report_violation"):
        p = _welch_p([r[metric] for r in reference], vectorized[metric])
        assert p > 1e-3, (metric, p)


def test_leave_one_out_products_equal_the_direct_products_zeros_included():
    rng = np.random.default_rng(0)
    for x in (np.array([0.3]), rng.random(2), np.array([0.5, 0.0, 0.25, 0.0]), rng.random(20)):
        direct = np.array([np.prod(np.delete(x, i)) for i in range(len(x))])
        np.testing.assert_allclose(leave_one_out_products(x), direct, rtol=1e-12, atol=0)


def test_threshold_aloha_mean_field_close_to_simulation():
    scenario = Scenario(20, (0.1,) * 20, snr=10.0)
    approx = threshold_aloha_mean_field(scenario)
    sim = simulate(scenario, "threshold_aloha", 20_000, 4, seed=2).summary()
    assert sim["mean_aoi"][0] == pytest.approx(approx["mean_aoi"], rel=0.05)
    assert sim["throughput"][0] == pytest.approx(approx["throughput"], rel=0.05)


def test_tuning_finds_the_classic_aloha_optimum():
    scenario = Scenario(20, (0.5,) * 20, snr=NOISELESS)
    p, aoi = best_transmit_probability(scenario, "aloha")
    assert p * 0.5 == pytest.approx(1 / 20, rel=0.02)  # activity a = q p = 1/N
    assert aoi == pytest.approx(20 * (20 / 19) ** 19, rel=1e-3)  # ≈ e·N at the optimum


def test_sic_beats_aloha_and_threshold_aloha_at_the_default_setting():
    scenario = scenario_from_config(compose("iiot_sic_aloha").sim)
    sic, aloha, threshold = (analyze(scenario, s) for s in ("sic", "aloha", "threshold_aloha"))
    for other in (aloha, threshold):
        assert sic["mean_aoi"] < other["mean_aoi"] and sic["throughput"] > other["throughput"]
        assert sic["p_age_violation"] < other["p_age_violation"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"sim.event_prob": 1.5}, "config key 'sim.event_prob' must be in (0, 1], got 1.5"),
        ({"sim.event_prob": 0}, "config key 'sim.event_prob' must be in (0, 1], got 0"),
        ({"sim.num_nodes": 0}, "config key 'sim.num_nodes' must be in [1, 1000000], got 0"),
        ({"sim.num_nodes": 10**8}, "config key 'sim.num_nodes' must be in [1, 1000000], got 100000000"),
        ({"sim.deadline": -1}, "config key 'sim.deadline' must be >= 0, got -1"),
        ({"sim.streams": 0}, "config key 'sim.streams' must be >= 1, got 0"),
        ({"sim.chunk_slots": 0}, "config key 'sim.chunk_slots' must be >= 1, got 0"),
        ({"sim.confidence": 2}, "config key 'sim.confidence' must be in (0, 1), got 2"),
        ({"sim.replications": 1}, "config key 'sim.replications' must be >= 2, got 1"),
    ],
)
def test_bad_parameters_give_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        compose("iiot_sic_aloha", override)  # the ranges are checked where the config is composed
    assert str(err.value) == message


def test_one_rate_per_node_is_checked_against_the_node_count():
    with pytest.raises(ConfigError, match="sim.event_probs has 2 values for 20 nodes"):
        SicAlohaExperiment.check_config(compose("iiot_sic_aloha", {"sim.event_probs": [0.1, 0.2]}))


def test_a_bad_probability_is_one_line(home):
    """A ConfigError before any run (the command line prints it as one line, exit 2: tests/test_config.py)."""
    with pytest.raises(ConfigError, match=re.escape("config key 'sim.transmit_prob' must be in (0, 1], got -0.2")):
        train("iiot_sic_aloha", ["sim.transmit_prob=-0.2"])
    for override, message in (  # each failed after the simulation had run (or, the SNR, as an OverflowError)
        ("sim.schemes=[]", "config key 'sim.schemes' must be a non-empty list, got []"),
        ("tune.age_threshold_factors=[]", "config key 'tune.age_threshold_factors' must be a non-empty list, got []"),
        ("sim.snr_db=1e308", "config key 'sim.snr_db' must be in [-100, 100], got 1e+308"),
        ("sim.streams=9", "sim.streams=9 exceeds sim.replications=4: a stream runs whole replications"),  # was: 4 ran, 9 logged
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            train("iiot_sic_aloha", [override])


def test_train_logs_metrics_tables_and_figures(home):
    (result,) = train("iiot_sic_aloha", ["sim.slots=3000", "sim.num_nodes=8", "trainer.enable_progress_bar=false"])
    client = MlflowClient(tracking_uri=tracking_uri(compose("iiot_sic_aloha")))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for scheme in ("aloha", "capture", "sic", "threshold_aloha"):
        assert run.data.metrics[f"{scheme}/throughput"] > 0
        assert f"{scheme}/mean_aoi_analysis" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "tables")} | {
        a.path for a in client.list_artifacts(result.run_id, "figures")
    }
    assert {"tables/simulation_vs_analysis.md", "tables/tuning.md", "figures/per_node_aoi.png"} <= artifacts
    assert run.data.metrics["sic/mean_aoi"] < run.data.metrics["aloha/mean_aoi"]
    with pytest.raises(ConfigError, match=re.escape("is FINISHED; nothing to resume (rerun it for a new run)")):  # no .ckpt hint
        train("iiot_sic_aloha", [f"resume={result.run_id}"])


def _children(result):
    client = MlflowClient(tracking_uri=tracking_uri(compose("iiot_sic_aloha")))
    return children_rows(client, result.run_id, client.get_run(result.run_id).info.experiment_id)


def _table_rows(report: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in report.splitlines() if line.startswith("|")]


def test_reproduce_smoke_children_are_simulator_runs_and_the_report_counts_them(home):
    result = run_experiment("reproduce", "iiot_sic_aloha", ["preset=smoke"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 8, 8), result.report
    children = _children(result)
    # N ∈ {5, 10}, q = 0.2, ρ = 10 dB, each with perfect and imperfect CSI; the imperfect child simulates SIC alone
    assert sorted(str(sorted(c[k] for k in c if k.startswith("sim."))) for c in children) == sorted(
        str(sorted([v, eps])) for v in (5, 10, 0.2, 10.0) for eps in (0.0, 0.05)
    )
    for child in children:
        schemes = {k.split("/")[0] for k in child if k.endswith("/mean_aoi")}
        assert schemes == ({"sic"} if child["sim.csi_residual"] == 0.05 else {"aloha", "capture", "sic", "threshold_aloha"})
    # ε costs SIC throughput in the exact analysis, at every point
    for axis, value in (("sim.num_nodes", 5), ("sim.num_nodes", 10), ("sim.event_prob", 0.2), ("sim.snr_db", 10.0)):
        perfect, imperfect = (next(c for c in children if c.get(axis) == value and c["sim.csi_residual"] == eps) for eps in (0.0, 0.05))
        assert imperfect["sic/throughput_analysis"] < perfect["sic/throughput_analysis"]
    # the agreement table counts exactly the comparisons whose analysis lies inside the simulation's CI
    exact = [
        abs(c[f"{s}/{m}"] - c[f"{s}/{m}_analysis"]) <= c[f"{s}/{m}_ci"]
        for c in children
        for s in ("aloha", "capture", "sic")
        if f"{s}/mean_aoi" in c
        for m in ("mean_aoi", "throughput", "p_age_violation", "p_report_violation")
    ]
    rows = _table_rows(result.report)
    assert ["exact", str(len(exact)), str(sum(exact))] == next(r for r in rows if r[0] == "exact")[:3] and len(exact) == 64
    claim = next(r for r in rows if r[:2] == ["SIC, perfect CSI", "slotted ALOHA"])
    wins = sum(c["sic/mean_aoi"] < c["aloha/mean_aoi"] for c in children if "aloha/mean_aoi" in c)
    assert claim[2] == f"{wins}/4"
    client = MlflowClient(tracking_uri=tracking_uri(compose("iiot_sic_aloha")))
    assert "figures/aoi_throughput_violation.png" in {a.path for a in client.list_artifacts(result.run_id, "figures")}


def test_bench_smoke_times_both_simulators_in_one_run(home):
    result = run_experiment("bench", "iiot_sic_aloha", ["preset=smoke"])
    assert (result.status, result.total) == ("FINISHED", 1), result.report
    (child,) = _children(result)
    assert child["bench.scheme"] == "sic" and child["reference_node_slots_per_s"] > 0
    assert child["speedup"] == pytest.approx(child["vectorized_node_slots_per_s"] / child["reference_node_slots_per_s"])
    assert next(r for r in _table_rows(result.report) if r[0] == "SIC")[1] == "20"  # nodes


def test_a_signal_during_a_threaded_simulation_stops_it_at_the_next_chunk():
    """The streams run in worker threads; a signal reaches the main thread only. Ctrl+C during a long warm-up was
    ignored (the pool waited for every stream to finish its slots) and the run stayed RUNNING."""
    import signal
    import time

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, handler)
    scenario = Scenario(6, (0.2,) * 6, csi_residual=0.1)
    start = time.perf_counter()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Stop):
            simulate(scenario, "sic", 100, replications=4, warmup=10**12, chunk_slots=50, streams=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < 10


@pytest.mark.slow  # ~20 s; the reference values' own checks are the unit tests above
def test_reference_experiment_smoke_compares_simulation_with_the_analysis(home):
    result = run_experiment("reproduce", "iiot_sic_aloha", ["preset=smoke", "experiment=reference"])
    assert (result.status, result.finished, result.total) == ("FINISHED", 8, 8), result.report
    throughput = result.report.split("### S (pkt/slot)")[1].split("###")[0]
    rows = [r for r in _table_rows(throughput) if len(r) == 9 and r[0].replace(".", "").isdigit()]
    assert rows and any(r[0].startswith("paper") for r in _table_rows(throughput))  # ours beside the notes' values
    pairs = [(float(row[i]), float(row[i + 1])) for row in rows for i in (3, 5, 7) if "–" not in (row[i], row[i + 1])]
    assert len(pairs) >= 3 and all(abs(sim - exact) < 0.1 for sim, exact in pairs), pairs  # simulation vs exact analysis
