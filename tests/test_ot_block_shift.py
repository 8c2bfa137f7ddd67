"""SNS's block shift (sinkhorn_driver.h block_shift): a problem on which the search runs.

Problem #259 of bench/soak_ot.py (seed 0), written out here so the test does not depend on
the generator: 8 x 8 integer costs, Dirichlet(1/2) marginals, eps = 1.4e-4 x max C. Sinkhorn
needs ~5,500 iterations; SNS's Sinkhorn chunks go flat and the per-column shift searches
(the verbose log says so), then Newton finishes. Checked: the search really ran, the plan
meets the tolerance (measured here from the returned plan, not from the solver's report),
the solution agrees with Sinkhorn's, and two solves give the same bits."""
import pytest
import torch

import diffkern as dk

C = [[2, 3, 0, 2, 3, 0, 3, 1], [0, 3, 3, 1, 0, 3, 3, 1], [3, 1, 2, 1, 2, 1, 3, 1],
     [1, 3, 1, 2, 2, 1, 2, 0], [0, 2, 0, 2, 3, 2, 1, 2], [0, 0, 0, 1, 0, 3, 0, 3],
     [1, 1, 3, 1, 1, 1, 1, 1], [1, 3, 2, 0, 1, 1, 3, 1]]
A = [0.0516320671685813, 0.3166500645644544, 0.07002155444408702, 0.14570871937726745,
     0.020127634449150958, 0.08181401336015309, 0.27212709159048615, 0.04191885504581973]
B = [0.0012583000710347278, 0.25602715810748383, 0.21541775552927978, 0.006894490497172634,
     0.0016627066742275756, 0.12487407533936012, 0.07099206388257884, 0.32287344989886263]
EPS = 0.000433765859407846
TOL = 1e-6


def _problem():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return t(C), t(A), t(B)


def _l1_marginal_error(plan, a, b):
    return float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum())


def test_block_shift_runs_and_the_plan_meets_the_tolerance(capfd):
    c, a, b = _problem()
    res = dk.ot.sinkhorn(c, a, b, eps=EPS, method="sns", tol=TOL, max_iter=100_000, verbose=2)
    log = capfd.readouterr().err
    assert "bracket trials" in log, "the block shift did not search on this problem"
    assert bool(res.converged)
    assert _l1_marginal_error(res.plan, a, b) <= TOL
    assert int(res.iterations) < 1000  # Sinkhorn alone: ~5,500


def test_block_shift_solution_matches_sinkhorn_and_is_deterministic():
    c, a, b = _problem()
    runs = [dk.ot.sinkhorn(c, a, b, eps=EPS, method="sns", tol=TOL, max_iter=100_000)
            for _ in range(2)]
    assert torch.equal(runs[0].f, runs[1].f) and torch.equal(runs[0].g, runs[1].g)
    ref = dk.ot.sinkhorn(c, a, b, eps=EPS, method="sinkhorn", tol=1e-9, max_iter=100_000)
    assert bool(ref.converged)
    assert float(runs[0].cost) == pytest.approx(float(ref.cost), rel=1e-6, abs=1e-9)
    assert (runs[0].plan - ref.plan).abs().sum() <= 1e-5
