"""dk.zo with torch.distributed: 2 processes on gloo (CPU), in the normal suite (~10-20 s:
two fresh interpreters importing torch dominate).

The ranks run the scenarios of _zo_dist_worker.py with group="auto"; this process runs the
same scenarios alone (group=None, torch.distributed not initialised) as the reference.
Checked: (a) the distributed results equal the single-process ones bit for bit, (b) the
replicas are identical, (c) each step made exactly one collective call, an all_gather of a
float64 vector of a few scalars, and failures reach every rank as errors.
"""
import copy
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
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


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
    if sys.platform.startswith("linux"):  # loopback: sandboxes may not resolve the hostname
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
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


# ---------------------------------------------------------------- any world size, simulated
# Real processes cost seconds each; the split and the exchange are pure logic around one
# all_gather, so W ranks are simulated by W threads sharing a fake all_gather (a barrier
# collecting every thread's vector). This covers world sizes 3 to 5, blocks of uneven size
# and ranks with nothing to evaluate.

class _FakeGroup:
    def __init__(self, world):
        import threading
        self.world, self.rows = world, [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = 0


def _fake_all_gather(out, vec, group=None):
    rank = _THREAD.rank
    group.rows[rank] = vec.clone()
    group.barrier.wait()
    for r in range(group.world):
        out[r].copy_(group.rows[r])
    if rank == 0:
        group.calls += 1
    group.barrier.wait()  # nobody overwrites rows before everyone has read them


import threading  # noqa: E402

_THREAD = threading.local()


def _simulate(world, fn, monkeypatch):
    from diffkern import _zo_distributed as D
    group = _FakeGroup(world)
    monkeypatch.setattr(torch.distributed, "all_gather", _fake_all_gather)
    monkeypatch.setattr(D, "resolve", lambda fname, g: None if g is None else D.Split(
        group, _THREAD.rank, world, torch.device("cpu")))
    results, errors = [None] * world, [None] * world

    def run(rank):
        _THREAD.rank = rank
        try:
            results[rank] = fn()
        except BaseException as e:  # noqa: B036 - reported below
            errors[rank] = e
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    first = [e for e in errors if e is not None and
             not isinstance(e, threading.BrokenBarrierError)] + [e for e in errors if e]
    if first:
        raise first[0]
    return results, group.calls


def test_split_blocks_partition_every_count():
    from diffkern._zo_distributed import Split
    for world in range(1, 7):
        for count in range(0, 14):
            blocks = [Split(None, r, world, torch.device("cpu")).block(count)
                      for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [hi - lo for lo, hi in blocks]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [3, 4, 5])
@pytest.mark.parametrize("kw", [
    dict(num_directions=1),                                        # 2 points < world
    dict(num_directions=4, distribution="sphere", estimator="rge"),
    dict(num_directions=3, estimator="rge", mode="forward", batch_size=2),
    dict(estimator="cge", coordinates=[torch.tensor([1, 3]), None]),
], ids=["spsa-1", "sphere-4", "forward-batched-3", "cge"])
def test_any_world_size_equals_one_process(world, kw, monkeypatch):
    g = torch.Generator().manual_seed(3)
    initial = [torch.randn(2, 3, generator=g).to(torch.bfloat16), torch.randn(3, generator=g)]
    # One replica per simulated rank: the list path perturbs its tensors in place.
    replicas = [[p.clone() for p in initial] for _ in range(world + 1)]
    batched = "batch_size" in kw

    def estimate(ps, group):
        def loss(*args):
            a, b = args if batched else ps
            return (a.float().sin() * 2).sum() + (b * b).sum()
        return dk.zo.grad(loss, ps, group=group, **kw)

    import diffkern as dk
    kw = dict(kw, seed=6) if kw.get("estimator") != "cge" else kw
    ref = estimate(replicas[world], None)
    results, calls = _simulate(world, lambda: estimate(replicas[_THREAD.rank], "auto"),
                               monkeypatch)
    assert calls == 1
    for res in results:
        assert torch.equal(res.losses, ref.losses)
        assert _same_bits(res.grads, ref.grads)


@pytest.mark.parametrize("world", [3])
def test_any_world_size_zosgd_steps_equal_one_process(world, monkeypatch):
    import diffkern as dk

    torch.manual_seed(0)  # the model is built here: threads share torch's generator
    initial = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                  torch.nn.Linear(4, 1)).to(torch.float16)
    x = torch.randn(8, 3).to(torch.float16)
    copies = [copy.deepcopy(initial) for _ in range(world + 1)]

    def run(group):
        net = copies[_THREAD.rank if group else world]
        opt = dk.zo.ZOSGD(net, lr=0.1, momentum=0.5, num_directions=2, seed=2, group=group)
        for _ in range(3):
            opt.step(lambda: net(x).float().square().mean())
        return [p.detach().clone() for p in net.parameters()]

    ref = run(None)
    results, calls = _simulate(world, lambda: run("auto"), monkeypatch)
    assert calls == 3
    for r in results:
        assert _same_bits(r, ref)
