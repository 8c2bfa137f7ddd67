"""One rank of the 2-process gloo test of dk.zo's distributed directions (run by
tests/test_zo_distributed.py as ``python _zo_dist_worker.py RANK WORLD INIT_FILE OUT_DIR``).

Each scenario is a function of (group) so the test can run the very same code in one
process with ``group=None`` as the reference. Every collective call of torch.distributed
made during a scenario is recorded (name, and for gathers the tensor's size and dtype), to
show that one all_gather of a few float64 scalars per step is all that crosses the network.
"""
import json
import os
import sys

import torch
from torch import nn

import diffkern as dk

STEPS = 4
_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce",
                "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
                "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
                "monitored_barrier", "all_gather_object", "broadcast_object_list",
                "gather_object", "scatter_object_list")


def _mlp(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    x, y = torch.randn(16, 5).to(dtype), torch.randn(16, 3)
    return net, lambda: (net(x).float() - y).square().mean()


def zosgd_module(group):
    """ZOSGD on a bf16 module (hook path), momentum and weight decay, 3 directions: 6
    evaluations a step, so the ranks' blocks cut through direction 1."""
    net, loss = _mlp(torch.bfloat16)
    opt = dk.zo.ZOSGD(net, lr=0.05, momentum=0.9, weight_decay=0.01, num_directions=3,
                      seed=21, group=group)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(STEPS):
        opt.step(loss)
        sched.step()
    return [p.detach().clone() for p in net.parameters()], opt.history


def zosgd_sphere_groups(group):
    """ZOSGD on fp32 tensors in two param groups, sphere directions (norms travel as the
    auxiliary scalars), 1 direction: 2 evaluations a step."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 3, generator=g), torch.randn(4, generator=g)
    loss = lambda: (a.sin().sum() + (b * b).sum()) ** 2
    opt = dk.zo.ZOSGD([dict(params=[a]), dict(params=[b], lr=0.01)], lr=0.02,
                      distribution="sphere", seed=5, group=group)
    for _ in range(STEPS):
        opt.step(loss)
    return [a, b], opt.history


def grad_forward_batched(group):
    """dk.zo.grad, forward RGE (1 + 3 evaluations: uneven blocks), batched."""
    g = torch.Generator().manual_seed(2)
    ps = [torch.randn(6, generator=g), torch.randn(2, 3, generator=g)]
    res = dk.zo.grad(lambda u, v: (u.tanh() * u).sum() + (v * v).sum(), ps,
                     estimator="rge", mode="forward", num_directions=3, seed=8,
                     batch_size=2, group=group)
    return res.grads, res.losses


def grad_cge(group):
    """dk.zo.grad, CGE on float64, a coordinate subset: 2 * 5 evaluations."""
    theta = torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(3, 3)
    res = dk.zo.grad(lambda: (theta.exp() * theta).sum(), [theta], estimator="cge",
                     coordinates=[torch.tensor([0, 2, 4, 5, 8])], group=group)
    return res.grads, res.losses


SCENARIOS = dict(zosgd_module=zosgd_module, zosgd_sphere_groups=zosgd_sphere_groups,
                 grad_forward_batched=grad_forward_batched, grad_cge=grad_cge)


def _record(dist, log):
    for name in _COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def wrapper(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values())
                       if isinstance(a, torch.Tensor)]
            log.append(dict(name=_name, numel=[t.numel() for t in tensors],
                            dtype=[str(t.dtype) for t in tensors]))
            return _real(*args, **kwargs)
        setattr(dist, name, wrapper)


def _errors(dist, rank):
    """Failures must reach every rank as errors (no rank left waiting in a collective)."""
    out = {}
    theta = torch.randn(4) if rank else torch.zeros(4)  # replicas that differ
    try:
        dk.zo.grad(lambda: theta.sum(), [theta], seed=1)
    except Exception as e:
        out["params_differ"] = f"{type(e).__name__}: {e}"
    theta = torch.zeros(4)

    def fails_on_rank_1():
        if rank == 1:
            raise KeyError("rank one broke")
        return theta.sum()
    try:
        dk.zo.grad(fails_on_rank_1, [theta], seed=1, num_directions=2)
    except Exception as e:
        out["loss_fails"] = f"{type(e).__name__}: {e}"
    torch.manual_seed(100 + rank)  # seed=None: each rank draws its own
    try:
        dk.zo.grad(lambda: theta.sum(), [theta])
    except Exception as e:
        out["seed_differs"] = f"{type(e).__name__}: {e}"
    out["theta_after"] = theta.tolist()
    return out


def main():
    rank, world, init_file, out_dir = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                       sys.argv[4])
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        log = []
        _record(dist, log)
        results, calls = {}, {}
        for name, fn in SCENARIOS.items():
            del log[:]
            # group="auto" finds the default group; one scenario passes it explicitly.
            results[name] = fn(dist.group.WORLD if name == "grad_cge" else "auto")
            calls[name] = list(log)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        errors = _errors(dist, rank)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(calls=calls, errors=errors), f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The results are on disk and the process group is destroyed; leave without the
    # interpreter's teardown: there, about one run in ten on the 2-core CI machine, a gloo
    # thread of torch's (not diffkern's) aborts the process ("terminate called without an
    # active exception", exit -6) after everything has finished (seen with a print after
    # destroy_process_group).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
