"""ZOSGD with its directions split across ranks: bit-identical replicas and scaling.

    torchrun --nproc_per_node=2 scripts/zo_distributed_check.py              # 2 GPUs, NCCL
    torchrun --nproc_per_node=2 scripts/zo_distributed_check.py --device cpu # gloo, small

What it does (issue 10, "2 GPUs: >= 1.8x the directions per second of one GPU, and the
same final weights, bit for bit, as one GPU running the same seeds"):

1. Rank 0 alone runs ZOSGD (group=None) for --steps steps on an MLP built from a fixed seed
   and times it: the one-device directions per second (the other ranks wait at a barrier).
2. Every rank builds the same model and runs the same steps with group=WORLD: each step's
   2 * --directions evaluations are split across the ranks, one all_gather of scalars per
   step; timed between barriers.
3. Checks: the SHA-256 of every rank's final parameters are equal (replicas identical) and
   equal to rank 0's one-device run (same seeds, same bits); the optimizers' histories too.

Scaling: the evaluations are split, but every rank regenerates all directions in the fused
update (a pass over the parameters per direction) and checksums its parameters once a step,
so the speedup approaches the world size when a forward costs much more than a pass over
the parameters (many rows of data per parameter, as in LLM fine-tuning); the defaults on
cuda (134M bf16 parameters, 16384 rows) are chosen so.

Warm-up steps run first on throwaway copies (cuBLAS handles, allocator), so the timed runs
start from the initial weights at step 0. Rank 0 writes a JSON report (--out) and every rank
exits with status 1 if a check failed. Run without torchrun it is a one-process run (the
"distributed" part then has world size 1).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time

# Deterministic cuBLAS (set before CUDA initialises): the one-device run and the replicas
# must compute the same losses from the same points.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import diffkern as dk  # noqa: E402

_DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="parameter dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--hidden", type=int, default=None, help="MLP width (cuda 4096, cpu 64)")
    p.add_argument("--layers", type=int, default=None, help="hidden layers (cuda 8, cpu 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="rows of data (cuda 16384, cpu 32): the forward must outweigh the "
                        "update, which every rank applies in full")
    p.add_argument("--directions", type=int, default=8, help="directions per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps (cuda 10, cpu 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="zo_distributed_check.json")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.hidden = a.hidden or (4096 if gpu else 64)
    a.layers = a.layers or (8 if gpu else 2)
    a.batch = a.batch or (16384 if gpu else 32)
    a.steps = a.steps or (10 if gpu else 5)
    for name in ("hidden", "layers", "batch", "directions", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


def setup(args):
    """(rank, world, device); initialises the process group under torchrun."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("zo_distributed_check: --device cuda but torch sees no GPU "
                     "(use --device cpu)")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.use_deterministic_algorithms(True)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # same reductions in every process
    if launched:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def build(args, device):
    """(model, data): a function of --seed only, so every rank and the one-device run start
    from the same bits."""
    torch.manual_seed(args.seed)
    layers = [nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)]
    body = []
    for lin in layers:
        body += [lin, nn.GELU()]
    net = nn.Sequential(*body, nn.Linear(args.hidden, 1)).to(device, _DTYPES[args.dtype])
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.hidden, generator=g).to(device, _DTYPES[args.dtype])
    y = torch.randn(args.batch, 1, generator=g).to(device)
    return net, (x, y)


def loss_for(net, data):
    x, y = data
    return lambda: (net(x).float() - y).square().mean()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, net, loss, device, group):
    """(seconds of args.steps ZOSGD steps, optimizer): the timed run."""
    opt = dk.zo.ZOSGD(net, lr=1e-3, num_directions=args.directions, seed=args.seed,
                      group=group)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step(loss)
    sync(device)
    return time.perf_counter() - t0, opt


def warm(args, net, data, device, group):
    if args.warmup:
        spare = copy.deepcopy(net)
        opt = dk.zo.ZOSGD(spare, lr=1e-3, num_directions=args.directions, seed=args.seed + 7,
                          group=group)
        loss = loss_for(spare, data)
        for _ in range(args.warmup):
            opt.step(loss)
        sync(device)
        del spare, opt


def digest(net):
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None):
    args = parse(argv)
    rank, world, device = setup(args)
    distributed = world > 1

    def barrier():
        if distributed:
            dist.barrier()

    net0, _ = build(args, device)
    numel = sum(p.numel() for p in net0.parameters())
    del net0

    # 1. one device (rank 0), the reference bits and the baseline speed
    single = None
    if rank == 0:
        net, data = build(args, device)
        warm(args, net, data, device, None)
        seconds, opt = train(args, net, loss_for(net, data), device, None)
        single = dict(seconds=seconds, directions_per_s=args.directions * args.steps / seconds,
                      digest=digest(net), history=[tuple(e) for e in opt.history])
        del net, opt
    barrier()

    # 2. every rank, the directions split
    net, data = build(args, device)
    warm(args, net, data, device, "auto")
    barrier()
    seconds, opt = train(args, net, loss_for(net, data), device, "auto")
    mine = dict(seconds=seconds, digest=digest(net), history=[tuple(e) for e in opt.history])
    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]

    ok = True
    if rank == 0:
        slowest = max(g["seconds"] for g in gathered)
        rate = args.directions * args.steps / slowest
        replicas = len({g["digest"] for g in gathered}) == 1
        same_as_single = gathered[0]["digest"] == single["digest"]
        same_history = all(g["history"] == single["history"] for g in gathered)
        ok = replicas and same_as_single and same_history
        report = dict(
            world_size=world, backend=dist.get_backend() if distributed else None,
            device=(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            dtype=args.dtype, parameters=numel, hidden=args.hidden, layers=args.layers,
            batch=args.batch, num_directions=args.directions, steps=args.steps,
            torch=torch.__version__,
            single=dict(seconds=single["seconds"], directions_per_s=single["directions_per_s"]),
            distributed=dict(seconds=slowest, directions_per_s=rate,
                             per_rank_seconds=[g["seconds"] for g in gathered]),
            speedup=rate / single["directions_per_s"],
            target_speedup=1.8 if world == 2 else None,
            meets_target=(rate / single["directions_per_s"] >= 1.8) if world == 2 else None,
            replicas_bit_identical=replicas, equals_single_device=same_as_single,
            histories_equal=same_history, digest=gathered[0]["digest"], ok=ok)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps({k: v for k, v in report.items() if k != "digest"}, indent=2))
    if distributed:
        flag = [ok]
        dist.broadcast_object_list(flag, src=0)
        ok = flag[0]
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
