"""Where does the time of one dk.ot.sinkhorn solve go? Kernel counts and GPU time per kernel
(torch.profiler), host synchronizations, and the wall clock, for the bench problems.

    python bench/ot_profile.py [--n 1000] [--eps 1e-3] [--dtype float32] [--batch 1]
                               [--method sns] [--device auto|cpu|cuda] [--repeats 10]
                               [--json PATH]

Wall clock: median of --repeats solves after 3 warm-up solves (bench/_harness.py). On CUDA
also the host layers: the same solve entered through the public function, the custom op,
and the C++ entry with every buffer preallocated; the differences are each layer's host
overhead. --json writes those numbers (not the profiler tables).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import diffkern as dk  # noqa: E402


def problem(batch, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(batch, n, 2, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = C / C.amax((1, 2), keepdim=True)
    return C.to(dtype).to(device)


def wall(fn, device, repeats):
    """Median wall seconds of fn() (synchronized on CUDA), after 3 warm-up calls."""
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return H.measure(call, clock="wall", warmup=3, repeats=repeats).median


def main(argv=None):
    p = H.parser(__doc__, devices=("auto", "cpu", "cuda"), device_default="auto", repeats=10,
                 plot=False)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", default="sns")
    args = p.parse_args(argv)
    (dev,) = H.devices(args.device)
    C = problem(args.batch, args.n, getattr(torch, args.dtype), dev)
    C = C[0] if args.batch == 1 else C
    solve = lambda: dk.ot.sinkhorn(C, eps=args.eps, tol=1e-6, method=args.method)  # noqa: E731
    t_wall = wall(solve, dev, args.repeats)
    res = solve()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        solve()
        if dev == "cuda":
            torch.cuda.synchronize()
    out = {"device": H.gpu_name() if dev == "cuda" else H.cpu_name(), "n": args.n,
           "batch": args.batch, "eps": args.eps, "dtype": args.dtype, "method": args.method,
           "wall_s": t_wall, "iterations": res.iterations.max().item(),
           "newton": res.newton_steps.max().item()}
    print(f"{dev} n={args.n} B={args.batch} eps={args.eps} {args.dtype} {args.method}: "
          f"wall {t_wall * 1e3:.3f} ms, iterations {out['iterations']}, "
          f"newton {out['newton']}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if dev == "cuda"
                                    else "self_cpu_time_total", row_limit=25))
    if dev == "cuda":
        # Host side: runtime calls (launches, copies, synchronizations) and torch ops.
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        out["host_layers_s"] = host_layers(C, args)
    H.write_json(args.json, out)


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
    out = {}
    for name, fn in layers.items():
        out[name] = wall(fn, "cuda" if C.is_cuda else "cpu", args.repeats)
        print(f"host layers: {name:28s} median {out[name] * 1e3:.3f} ms")
    return out


if __name__ == "__main__":
    main()
