"""dk.zo with torch.distributed: 2 processes on gloo (CPU), in the normal suite (~10-20 s:
two fresh interpreters importing torch dominate).

The ranks run the scenarios of _zo_dist_worker.py with group="auto"; this process runs the
same scenarios alone (group=None, torch.distributed not initialised) as the reference.
Checked: (a) the distributed results equal the single-process ones bit for bit, (b) the
replicas are identical, (c) each step made exactly one collective call, an all_gather of a
float64 vector of a few scalars, and failures reach every rank as errors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _zo_dist_worker as W

WORLD = 2
HERE = Path(__file__).resolve().parent


def _bits(t):
    t = t.detach()
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    return t.reshape(-1).view(ints[t.element_size()])


def _same_bits(xs, ys):
    return len(xs) == len(ys) and all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))
                                      for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo_dist")
    init = out / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_zo_dist_worker.py"), str(r),
                               str(WORLD), str(init), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish in 120 s (a collective waiting forever?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    meta = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return results, meta


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: CPU reductions may depend on the thread count
    try:
        return {name: fn(None) for name, fn in W.SCENARIOS.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_distributed_equals_single_process_bit_for_bit(ranks, reference, name):
    results, _ = ranks
    ref_tensors, ref_extra = reference[name]
    for r in range(WORLD):
        tensors, extra = results[r][name]
        assert _same_bits(tensors, ref_tensors), f"rank {r} differs from one process"
        if isinstance(extra, torch.Tensor):  # the losses of dk.zo.grad, all of them
            assert torch.equal(extra, ref_extra)
        else:  # ZOSGD's history: same seeds, directions and coefficients
            assert extra == ref_extra
    # (b) replicas identical, and the run moved the weights at all
    assert _same_bits(results[0][name][0], results[1][name][0])


def test_replicas_moved():
    net, _ = W._mlp(torch.bfloat16)
    initial = [p.detach() for p in net.parameters()]
    final, _ = W.zosgd_module(None)
    assert not _same_bits(initial, final)


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_only_one_all_gather_of_scalars_per_step(ranks, name):
    _, meta = ranks
    steps = W.STEPS if name.startswith("zosgd") else 1
    for r in range(WORLD):
        calls = meta[r]["calls"][name]
        assert [c["name"] for c in calls] == ["all_gather"] * steps
        for c in calls:
            # the input vector (the output list holds WORLD more of the same): a header of
            # 5 scalars and 2 per evaluation of the largest block, float64
            sent = c["numel"][-1]
            assert c["dtype"][-1] == "torch.float64"
            assert sent <= 5 + 2 * 5, c


def test_failures_raise_on_every_rank(ranks):
    _, meta = ranks
    e0, e1 = meta[0]["errors"], meta[1]["errors"]
    for e in (e0, e1):
        assert e["params_differ"].startswith("RuntimeError: diffkern.zo.grad: the parameters "
                                             "differ between rank 0 and rank(s) [1]")
        assert e["seed_differs"].startswith("ValueError: diffkern.zo.grad: the ranks called "
                                            "with different arguments")
        assert e["theta_after"] == [0.0] * 4
    assert e0["loss_fails"].startswith("RuntimeError: diffkern.zo.grad: loss_fn failed on "
                                       "rank(s) [1] of 2")
    assert e1["loss_fails"] == "KeyError: 'rank one broke'"


def test_group_argument_errors():
    import diffkern as dk
    theta = torch.zeros(3)
    with pytest.raises(ValueError, match="diffkern.zo.grad: group must be 'auto', None or"):
        dk.zo.grad(lambda: theta.sum(), [theta], group="world")
    with pytest.raises(TypeError, match="diffkern.zo.grad: group must be"):
        dk.zo.grad(lambda: theta.sum(), [theta], group=3)
    with pytest.raises(TypeError, match="diffkern.zo.ZOSGD: group must be"):
        dk.zo.ZOSGD([theta], lr=0.1, group=object())
    # "auto" without torch.distributed initialised: this process alone.
    assert dk.zo.grad(lambda: theta.sum(), [theta], seed=0, group="auto").losses.numel() == 2
