"""Where does the time of one dk.ot.sinkhorn solve go? Kernel counts and GPU time per kernel
(torch.profiler), host synchronizations, and the wall clock, for the bench problems.

    python bench/ot_profile.py [--n 1000] [--eps 1e-3] [--dtype float32] [--batch 1]
"""
import argparse
import time

import torch

import diffkern as dk


def problem(batch, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(batch, n, 2, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = C / C.amax((1, 2), keepdim=True)
    return C.to(dtype).to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", default="sns")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    C = problem(args.batch, args.n, getattr(torch, args.dtype), dev)
    C = C[0] if args.batch == 1 else C
    solve = lambda: dk.ot.sinkhorn(C, eps=args.eps, tol=1e-6, method=args.method)  # noqa: E731
    for _ in range(3):
        solve()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = solve()
    if dev == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        solve()
        if dev == "cuda":
            torch.cuda.synchronize()
    print(f"{dev} n={args.n} B={args.batch} eps={args.eps} {args.dtype} {args.method}: "
          f"wall {wall * 1e3:.3f} ms, iterations {res.iterations.max().item()}, "
          f"newton {res.newton_steps.max().item()}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if dev == "cuda"
                                    else "self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
