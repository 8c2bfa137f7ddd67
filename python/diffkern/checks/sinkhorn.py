"""sinkhorn family: entropic optimal transport (``diffkern.ot.sinkhorn``).

Checks: the SNS plan against a plain float64 log-domain Sinkhorn written in torch, the
paper's iteration count on its random assignment problem, and (``--full``) SNS's wall
clock against our own Sinkhorn on that problem.
"""
from __future__ import annotations

import math
import os

import torch

import diffkern as dk

from ._timing import median_time

ALIASES = ("ot",)

# GPU_CHECK_OT_DEVICE=cuda (read when the GPU check lists the benchmarks) skips the CPU
# half of bench/ot.py, which is most of its time.
_BENCH_DEVICE = os.environ.get("GPU_CHECK_OT_DEVICE", "all")
GPU_BENCHMARKS = [
    dict(name="bench-ot", timeout_s=420,
         argv=["bench/ot.py", "--device", _BENCH_DEVICE, "--repeats", "11",
               "--json", "{results}/bench_ot.json", "--plot", "{results}/ot.png"]),
    # Where the time of one solve goes (a kernel table per problem, in the log).
    dict(name="profile-ot-1e-2", timeout_s=120,
         argv=["bench/ot_profile.py", "--n", "1000", "--eps", "1e-2"]),
    dict(name="profile-ot-1e-3", timeout_s=120,
         argv=["bench/ot_profile.py", "--n", "1000", "--eps", "1e-3"]),
    dict(name="profile-ot-batch", timeout_s=120,
         argv=["bench/ot_profile.py", "--n", "256", "--batch", "64", "--eps", "1e-3"]),
]


def _dense_reference(C: torch.Tensor, eps: float, max_iter: int = 2000) -> torch.Tensor:
    """Plan of plain float64 log-domain Sinkhorn (uniform weights), independent of ours.

    Stops once the row marginals are off by <= 1e-14 in L1 (the columns are exact after
    each g-update), i.e. at the float64 fixed point: ~100 sweeps for the 60x50 problem below.
    """
    n, m = C.shape
    la = torch.full((n,), -math.log(n), dtype=torch.float64, device=C.device)
    lb = torch.full((m,), -math.log(m), dtype=torch.float64, device=C.device)
    g = torch.zeros(m, dtype=torch.float64, device=C.device)
    for it in range(max_iter):
        f = eps * la - eps * torch.logsumexp((g[None, :] - C) / eps, 1)
        g = eps * lb - eps * torch.logsumexp((f[:, None] - C) / eps, 0)
        if it % 10 == 9:
            plan = torch.exp((f[:, None] + g[None, :] - C) / eps)
            if (plan.sum(1) - 1 / n).abs().sum().item() <= 1e-14:
                break
    return torch.exp((f[:, None] + g[None, :] - C) / eps)


def run(device: str, quick: bool = True) -> list[dict]:
    dev = torch.device(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    # Point clouds in the unit square, squared distances scaled to max 1.
    x = torch.rand(60, 2, generator=gen, dtype=torch.float64)
    y = torch.rand(50, 2, generator=gen, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    C = (C / C.max()).to(dev)
    res = dk.ot.sinkhorn(C, eps=0.05, tol=1e-12)
    ref = _dense_reference(C, 0.05)
    err = (res.plan - ref).abs().max().item() / ref.max().item()
    rows.append(dict(check="SNS plan vs dense float64 Sinkhorn (60x50, eps 0.05)",
                     value=err, reference="max rel. error; limit 1e-9",
                     status="ok" if err <= 1e-9 else "fail"))

    # The paper's setting: random assignment n = 500, C ~ U[0, 1], eta = 1/eps = 1200.
    n = 500
    C = torch.rand(n, n, generator=gen, dtype=torch.float64).to(dev)
    out = {}

    def sns():
        out["sns"] = dk.ot.sinkhorn(C, eps=1 / 1200, tol=1e-10, method="sns")

    t_sns = median_time(sns, dev, repeats=1 if quick else 3, warmup=0 if quick else 1)
    res = out["sns"]
    ok = bool(res.converged) and int(res.iterations) <= 40
    rows.append(dict(check="SNS iterations to L1 error 1e-10 (n=500, eta=1200)",
                     value=f"{int(res.iterations)} ({int(res.newton_steps)} Newton)",
                     reference="paper: 29; limit 40", status="ok" if ok else "fail"))
    if quick:
        rows.append(dict(check="SNS wall clock to 1e-10 (n=500, eta=1200, float64)",
                         value=f"{t_sns * 1e3:.1f} ms", reference="--full compares with Sinkhorn",
                         status="info"))
    else:
        def sk():
            out["sk"] = dk.ot.sinkhorn(C, eps=1 / 1200, tol=1e-6, method="sinkhorn",
                                       max_iter=100000)

        # One solve of hundreds of sweeps is its own average; repeats would only multiply a
        # CPU run's tens of seconds on a loaded machine.
        t_sk = median_time(sk, dev, repeats=1, warmup=1 if dev.type == "cuda" else 0)
        rows.append(dict(check="SNS (to 1e-10) vs Sinkhorn (to 1e-6) wall clock (n=500)",
                         value=f"{t_sns * 1e3:.1f} ms",
                         reference=f"Sinkhorn {t_sk * 1e3:.1f} ms, {int(out['sk'].iterations)} it",
                         status="info"))
    return rows


def sanitizer_workload(device: str) -> int:
    """For compute-sanitizer (runs on the CPU too): dk.ot.sinkhorn on tiny problems, both
    methods and dtypes, n != m, a batch with zero-mass entries, fixed-iteration mode, the
    grid-wide (cooperative) Newton solve, and one backward pass (implicit gradient)."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    calls = 0
    for dtype in (torch.float32, torch.float64):
        C = torch.rand(3, 37, 29, generator=gen, dtype=dtype).to(dev)
        a = torch.rand(3, 37, generator=gen, dtype=torch.float64).to(dev)
        a[:, 5] = 0
        a = a / a.sum(1, keepdim=True)
        for method in ("sinkhorn", "sns"):
            res = dk.ot.sinkhorn(C, a, None, eps=0.05, method=method, tol=1e-5, max_iter=2000)
            assert torch.isfinite(res.plan).all(), method
            dk.ot.sinkhorn(C, a, None, eps=0.05, method=method, max_iter=25,
                           fixed_iterations=True)
            calls += 2
    # Above 2^17 dense entries SNS solves its Newton systems grid-wide (cooperative CG). A
    # point cloud at a small eps: Sinkhorn needs thousands of iterations, so SNS's probes do
    # not leave it to Sinkhorn and it takes Newton steps.
    x = torch.rand(380, 2, generator=gen, dtype=torch.float32)
    y = torch.rand(360, 2, generator=gen, dtype=torch.float32)
    C = (torch.cdist(x, y) ** 2).to(dev)
    res = dk.ot.sinkhorn(C, eps=2e-3, method="sns", tol=1e-5, max_iter=200)
    assert torch.isfinite(res.plan).all() and bool(res.newton_steps > 0), "grid-wide CG"
    calls += 1
    C = torch.rand(17, 13, generator=gen, dtype=torch.float64).to(dev).requires_grad_(True)
    dk.ot.sinkhorn(C, eps=0.1, tol=1e-9).cost.backward()
    return calls + 1
