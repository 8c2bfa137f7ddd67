"""Where a dk.zo step's time goes (issue 10): torch.profiler over ZOSGD steps on the
OPT-1.3B-sized model of bench/zo.py part b, against two plain forwards.

    python bench/zo_profile.py [--device cuda|cpu] [--steps 3] [--unit-bytes auto|none|N]
                               [--list] [--quick] [--json PATH]

For each profiled run (two inference forwards under no_grad; ZOSGD steps on the module
path with the given ``hook_unit_bytes``; with ``--list``, ZOSGD on the parameter list) it
reports, per step: the wall time (host clock around a synchronized step), the GPU busy time
(the union of the kernels' intervals in the trace), the GPU idle time inside the step
(wall - busy: where the host, a sync or a copy holds the GPU back), the largest idle gaps
between two GPU activities (with the kernels on either side), the kernel time by kind
(dk's fd_grad kernels, matmuls, the rest) and the top kernels and host ops. The profiler's
own host overhead inflates host-bound gaps: compare runs, not absolute idle times. Why: the
step is 1.6x the floor "2 forwards + 1 copy pass" while the kernels that dk adds account for
about a third of the excess; this says where the rest is.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import zo as B  # noqa: E402  (bench/zo.py: the model and its sizes)

import diffkern as dk  # noqa: E402


def kernel_intervals(trace_path):
    """[(start_us, end_us, name)] of every GPU kernel and memcpy/memset in a chrome trace."""
    with open(trace_path) as fh:
        events = json.load(fh).get("traceEvents", [])
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            out.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "")))
    return sorted(out)


def union_length(intervals):
    total, cur_s, cur_e = 0.0, None, None
    for s, e, _ in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def kind_of(name):
    low = name.lower()
    if "fd_grad" in low or "diffkern" in low or "perturb" in low or "fd::" in low:
        return "dk fd_grad"
    if "gemm" in low or "matmul" in low or "cutlass" in low or "sm90_xmma" in low or "cublas" in low:
        return "matmul"
    if "memcpy" in low or "memset" in low:
        return "copy/set"
    return "other"


def profile(label, fn, steps, device):
    """Profiles ``steps`` calls of fn (after one warm-up call); returns the per-step row."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            sync()
            walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        ivs = kernel_intervals(path)
    busy = union_length(ivs) / 1e3 / steps  # ms per step
    by_kind, by_name = {}, {}
    for s, e, name in ivs:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + (e - s) / 1e3 / steps
        by_name[name] = by_name.get(name, 0.0) + (e - s) / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    # The largest idle gaps between consecutive GPU activities of a step (where the GPU
    # waited for the host), with the kernels on either side.
    gaps, end, prev = [], None, None
    for a, b, name in ivs:
        if end is not None and a - end > 20.0:
            gaps.append((a - end, prev, name))
        if end is None or b > end:
            end, prev = b, name
    gaps.sort(key=lambda g: -g[0])
    host = sorted(((ev.key, ev.self_cpu_time_total / 1e3 / steps, ev.count // steps)
                   for ev in prof.key_averages()), key=lambda r: -r[1])[:15]
    wall = 1e3 * sorted(walls)[len(walls) // 2]
    row = dict(run=label, wall_ms=wall, gpu_busy_ms=busy, gpu_idle_ms=wall - busy,
               kernels_per_step=len(ivs) // steps,
               kernel_ms_by_kind={k: round(v, 3) for k, v in sorted(by_kind.items())},
               top_kernels=[dict(name=n[:120], ms=round(v, 3)) for n, v in top],
               top_host_ops=[dict(op=k[:80], self_ms=round(v, 3), calls=c) for k, v, c in host],
               idle_gaps=[dict(us=round(g, 1), after=a[:90], before=b[:90])
                          for g, a, b in gaps[:12]])
    print(f"\n== {label}: wall {wall:.2f} ms/step, GPU busy {busy:.2f}, idle {wall - busy:.2f}, "
          f"{row['kernels_per_step']} kernels/step", flush=True)
    print("   by kind:", ", ".join(f"{k} {v:.2f}" for k, v in row["kernel_ms_by_kind"].items()))
    for t in row["top_kernels"][:8]:
        print(f"   {t['ms']:8.3f} ms  {t['name'][:100]}")
    print(f"   largest idle gaps (over all {steps} steps):")
    for g in row["idle_gaps"][:8]:
        print(f"   {g['us']:9.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
    print("   host (self CPU ms/step, calls/step):")
    for h in row["top_host_ops"][:10]:
        print(f"   {h['self_ms']:8.3f} ms  {h['calls']:6d}  {h['op']}")
    return row


def main(argv=None):
    ap = H.parser(__doc__, devices=("cuda", "cpu"), device_default="cuda")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--unit-bytes", default="auto",
                    help="hook_unit_bytes of the module path: auto, none or an int")
    ap.add_argument("--list", action="store_true", help="also profile the list path")
    ap.add_argument("--quick", action="store_true", help="the tiny model (smoke run)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device (--device cpu profiles host time only)")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    unit = None if args.unit_bytes == "none" else (
        "auto" if args.unit_bytes == "auto" else int(args.unit_bytes))
    cfg = B.config(args.quick, device)
    model, loss_of, source = B.build_lm(cfg["lm"], device, cfg["dtype"])
    batch, seq = cfg["batch"]
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg["lm"]["vocab_size"], (batch, seq), generator=g).to(device)
    closure = lambda: loss_of(ids)  # noqa: E731
    print(f"{source}, batch {batch} x {seq}, {H.environment()['gpu_name'] or 'CPU'}", flush=True)
    rows = []

    def two_forwards():
        with torch.no_grad():
            closure()
            closure()
    rows.append(profile("2 forwards (no_grad)", two_forwards, args.steps, device))
    opt = dk.zo.ZOSGD(model, lr=1e-7, eps=1e-3, seed=0, history=False, hook_unit_bytes=unit)
    rows.append(profile(f"ZOSGD module, hook_unit_bytes={unit!r}", lambda: opt.step(closure),
                        args.steps, device))
    if args.list:
        opt_l = dk.zo.ZOSGD(B.trainable(model), lr=1e-7, eps=1e-3, seed=0, history=False)
        rows.append(profile("ZOSGD list", lambda: opt_l.step(closure), args.steps, device))
    H.write_json(args.json, dict(environment=H.environment(), model=source, rows=rows))


if __name__ == "__main__":
    main()
