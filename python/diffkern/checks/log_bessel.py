"""log_bessel family: log I_v, log K_v (``diffkern.special``) and von Mises-Fisher on top
(``diffkern.distributions``).

Checks: accuracy at points spread over every branch against mpmath, log_ive throughput
against ``log(torch.special.i0e)`` on the same data, the vMF concentration round trip
kappa -> A_p(kappa) -> kappa against the limit the data allow, the vMF estimator's rate,
and the vMF sampler's mean against A_p(kappa).
"""
from __future__ import annotations

import math

import torch

import diffkern as dk
from diffkern import _C
from diffkern._ops import current_stream_handle
from diffkern.distributions import VonMisesFisher, concentration_from_mean_resultant_length

from ._timing import median_time

GPU_BENCHMARKS = [
    dict(name="bench-log-bessel", timeout_s=300,
         argv=["bench/log_bessel.py", "--device", "all",
               "--json", "{results}/bench_log_bessel.json"]),
    dict(name="bench-vmf", timeout_s=180,
         argv=["bench/vmf.py", "--device", "all", "--json", "{results}/bench_vmf.json"]),
    # Per-call cost on one-element tensors (issue 8, item 4: <= 2x torch.special.i0e).
    dict(name="bench-overhead", timeout_s=150,
         argv=["bench/overhead.py", "--device", "all", "--json", "{results}/bench_overhead.json"]),
]

# (v, x, log I_v(x), log K_v(x)) from mpmath at 50 digits (tests/reference/ regenerates
# such values): small and large orders and arguments, the uniform-asymptotic region,
# x -> 0 with v > 0 (a result near -3462 where I_v itself underflows), and x = 1e5.
_POINTS = [
    (0.0, 1.0, 0.23591435850717865, -0.8650643989067881),
    (1.0, 2.0, 0.4641344735461597, -1.967071302560514),
    (0.5, 10.0, 7.9297689182371505, -10.925501193852295),
    (7.5, 40.0, 36.52982566179444, -40.92906793366392),
    (30.0, 30.0, 13.192839754910693, -17.633809979566315),
    (250.0, 165.0, -5.013437763367393, -1.3819628247423854),
    (5.0, 1e-300, -3462.1308671366505, 3459.828282043656),
    (0.01, 1e-20, -0.46175818245833894, 3.8676354383995317),
    (0.3, 1e5, 99993.32459953432, -100005.53067217984),
]
_MAX_REL_ERROR = 1e-14  # float64, relative to max(|value|, 1)


def run(device: str, quick: bool = True) -> list[dict]:
    dev = torch.device(device)
    return _accuracy(dev) + _throughput(dev, quick) + _vmf(dev, quick)


def _accuracy(dev: torch.device) -> list[dict]:
    pts = torch.tensor([p[:2] for p in _POINTS], dtype=torch.float64, device=dev)
    ref = torch.tensor([p[2:] for p in _POINTS], dtype=torch.float64)
    rows = []
    for col, fn in enumerate((dk.log_iv, dk.log_kv)):
        got = fn(pts[:, 0], pts[:, 1]).cpu()
        want = ref[:, col]
        err = ((got - want).abs() / want.abs().clamp_min(1)).max().item()
        # NaN compares false: a NaN result fails.
        rows.append(dict(check=f"{fn.__name__} max rel. error, float64, {len(_POINTS)} points",
                         value=err, reference=f"mpmath 50 digits; limit {_MAX_REL_ERROR:g}",
                         status="ok" if err <= _MAX_REL_ERROR else "fail"))
    return rows


def _throughput(dev: torch.device, quick: bool) -> list[dict]:
    # Random v in [1e-2, 1e4], x in [1e-3, 1e5] (log-uniform): every branch is visited, so
    # the rate is a mix, not the best case. The baseline covers order 0 only.
    n = (1_000_000 if quick else 10_000_000) if dev.type == "cuda" else \
        (200_000 if quick else 1_000_000)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = (10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 2)).to(dev)
    x = (10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 3)).to(dev)
    t_ours = median_time(lambda: dk.log_ive(v, x), dev)
    t_base = median_time(lambda: torch.special.i0e(x).log(), dev)
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    return [dict(check=f"log_ive evals/s (float64, random v and x, n={n:.0e}{threads})",
                 value=n / t_ours,
                 reference=f"log(torch.special.i0e), order 0 only: {n / t_base:.3g}/s",
                 status="info")]


def _vmf(dev: torch.device, quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    n = 10_000 if quick else 1_000_000
    p = torch.randint(2, 32769, (n,), generator=gen).to(torch.float64).to(dev)
    kappa = (10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 13 - 6)).to(dev)
    r = dk.bessel_iv_ratio(p / 2 - 1, kappa)
    est = concentration_from_mean_resultant_length(r, p)
    # kappa is determined by r = A_p(kappa) only up to the rounding of r: the limit grows
    # like eps / (1 - r) as r -> 1 (kappa -> inf).
    rel = ((est - kappa) / kappa).abs()
    limit = torch.clamp(4 * torch.finfo(torch.float64).eps / (1 - r), min=1e-12)
    worst = (rel / limit).max().item()
    rows.append(dict(check=f"vMF kappa round trip, max error / data limit (n={n:.0e})",
                     value=worst,
                     reference="kappa -> A_p(kappa) -> kappa, p in [2, 32768], "
                               "kappa in [1e-6, 1e7]; limit 1",
                     status="ok" if worst <= 1 else "fail"))
    # The round trip above was the warm-up.
    t = median_time(lambda: concentration_from_mean_resultant_length(r, p), dev,
                    repeats=1 if quick else 3, warmup=0)
    rows.append(dict(check=f"vMF concentration estimates/s (float64, n={n:.0e})",
                     value=n / t, reference="reference paper's CPU figure: 3.4e6/s",
                     status="info"))
    m = 5_000 if quick else 100_000
    d = VonMisesFisher(torch.eye(3, dtype=torch.float64, device=dev)[0],
                       torch.tensor(5.0, dtype=torch.float64, device=dev))
    # A fixed draw, so the check cannot fail at random; the caller's RNG state is kept.
    cuda_ids = [torch.cuda.current_device() if dev.index is None else dev.index] \
        if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(0)
        xs = d.sample((m,))
    mean, want = xs[:, 0].mean().item(), d.mean[0].item()
    se = math.sqrt(d.variance[0].item() / m)
    ok = bool(torch.isfinite(xs).all()) and abs(mean - want) < 5 * se
    rows.append(dict(check=f"vMF sampler mean (p=3, kappa=5, {m} samples)", value=mean,
                     reference=f"A_3(5) = {want:.4f} +- 5 s.e. ({5 * se:.1e})",
                     status="ok" if ok else "fail"))
    return rows


def sanitizer_workload(device: str) -> int:
    """For compute-sanitizer (runs on the CPU too, minus the side stream): every
    log-Bessel op, both dtypes: plain, broadcast, scalar, non-contiguous, offset, zero-size
    and an odd size that does not fill the last block; the raw ops (with the derivatives
    the autograd formulas use), backward passes, and a side stream."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    public = [dk.log_iv, dk.log_kv, dk.log_ive, dk.log_kve, dk.bessel_iv_ratio]
    calls = 0
    for dtype in (torch.float32, torch.float64):
        def rand(*shape, lo=0.05, hi=30.0):
            return (lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)).to(dev)

        cases = {
            "same shape, odd size": (rand(1037), rand(1037)),
            "broadcast (5,1) x (7,)": (rand(5, 1), rand(7)),
            "scalar order": (rand(()), rand(33, 3)),
            "non-contiguous": (rand(9, 16)[:, ::3], rand(18, 9).t()[:, ::3]),
            "storage offset": (rand(300)[17:], rand(300)[:-17]),
            "zero size": (rand(0, 4), rand(4)),
        }
        for name, (v, x) in cases.items():
            for fn in public:
                out = fn(v, x)
                calls += 1
                assert out.shape == torch.broadcast_shapes(v.shape, x.shape), (fn.__name__, name)
            shape = torch.broadcast_shapes(v.shape, x.shape)
            for op in _C.LOG_BESSEL_OPS.values():
                out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
                _C.log_bessel(op, v, x, out, 0, current_stream_handle(out))
                calls += 1
        v = rand(64)
        x = rand(64).requires_grad_(True)
        for fn in public:
            torch.autograd.grad(fn(v, x).sum(), x)
            calls += 1
        if dev.type == "cuda":  # the op must launch on the current stream, not the default
            s = torch.cuda.Stream(dev)
            with torch.cuda.stream(s):
                dk.log_kv(rand(257), rand(257))
            s.synchronize()
            calls += 1
    return calls
