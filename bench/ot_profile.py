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
    if dev == "cuda":
        # Host side: runtime calls (launches, copies, synchronizations) and torch ops.
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        host_layers(C, args)


def host_layers(C, args):
    """Wall clock of the same solve entered at three layers: the public function (input
    checks, result object), the custom op (allocations, transposed copy), and the C++ entry
    with every buffer preallocated; the differences are each layer's host overhead."""
    from diffkern import _C, ot
    from diffkern._ops import current_stream_handle, num_threads
    B = args.batch
    Cb = C if C.dim() == 3 else C[None]
    _, n, m = Cb.shape
    a = torch.full((B, n), 1.0 / n, dtype=torch.float64, device=C.device)
    b = torch.full((B, m), 1.0 / m, dtype=torch.float64, device=C.device)
    g0 = torch.zeros(B, m, dtype=torch.float64, device=C.device)
    method = ot._METHODS[args.method]
    cost = Cb.contiguous()
    cost_t = cost.transpose(1, 2).contiguous()
    f = torch.empty(B, n, dtype=torch.float64, device=C.device)
    g = g0.clone()
    err = torch.empty(B, dtype=torch.float64, device=C.device)
    it = torch.empty(B, dtype=torch.int64, device=C.device)
    nw = torch.empty(B, dtype=torch.int64, device=C.device)
    ws = torch.empty(_C.sinkhorn_workspace_bytes(B, n, m, method), dtype=torch.uint8,
                     device=C.device)
    stream = current_stream_handle(cost)

    def raw():
        g.zero_()
        _C.sinkhorn_solve(cost, cost_t, a, b, f, g, err, it, nw, ws, float(args.eps), method,
                          1e-6, 10000, 10, False, 20, False, ot._CG_MAX_ITER, 0, num_threads(),
                          stream)

    layers = {
        "public dk.ot.sinkhorn": lambda: dk.ot.sinkhorn(C, eps=args.eps, tol=1e-6,
                                                         method=args.method),
        "custom op _solve": lambda: ot._solve(cost, a, b, g0, float(args.eps), method, 1e-6,
                                              10000, 10, False, 20, False, 0),
        "C++ entry (buffers ready)": raw,
    }
    for name, fn in layers.items():
        sync = torch.cuda.synchronize if C.is_cuda else (lambda: None)
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"host layers: {name:28s} median {ts[len(ts) // 2] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
