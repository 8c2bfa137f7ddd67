"""Small CUDA workload for compute-sanitizer (memcheck, racecheck): every log-Bessel op,
both dtypes, plain / broadcast / non-contiguous / offset inputs and an odd size that does
not fill the last block. Sizes stay tiny: the sanitizer slows kernels down ~100x.

    compute-sanitizer --tool memcheck python scripts/sanitizer_smoke.py

DK_SANITIZE_FAMILIES="ot" (default "log_bessel ot") limits the families exercised.
"""
import os
import sys

import torch

import diffkern as dk
from diffkern import _C


def main() -> int:
    if not torch.cuda.is_available() or not dk.build_info()["cuda"]:
        print("sanitizer_smoke: no CUDA device or no CUDA kernels in this build", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    public = [dk.log_iv, dk.log_kv, dk.log_ive, dk.log_kve, dk.bessel_iv_ratio]
    families = os.environ.get("DK_SANITIZE_FAMILIES", "log_bessel ot").split()
    calls = 0
    for dtype in (torch.float32, torch.float64) if "log_bessel" in families else ():
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
            # Also every raw op, including the derivatives the autograd formulas use.
            shape = torch.broadcast_shapes(v.shape, x.shape)
            for op_name, op in _C.LOG_BESSEL_OPS.items():
                out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
                _C.log_bessel(op, v, x, out, 0, torch.cuda.current_stream(dev).cuda_stream)
                calls += 1
        # Gradients exercise the backward kernels through autograd.
        v = rand(64)
        x = rand(64).requires_grad_(True)
        for fn in public:
            (g,) = torch.autograd.grad(fn(v, x).sum(), x)
            calls += 1
        # A side stream: the op must launch on the current stream, not the default one.
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            y = dk.log_kv(rand(257), rand(257))
        s.synchronize()
        calls += 1
        del y, g
    if "ot" in families:
        calls += _ot_cases(dev, gen)
    torch.cuda.synchronize()
    print(f"sanitizer_smoke: {calls} calls ok")
    return 0


def _ot_cases(dev, gen) -> int:
    """dk.ot.sinkhorn on tiny problems: both methods and dtypes, n != m, a batch with
    zero-mass entries, fixed-iteration mode, and one backward pass (implicit gradient)."""
    calls = 0
    for dtype in (torch.float32, torch.float64):
        C = torch.rand(3, 37, 29, generator=gen, dtype=dtype).to(dev)
        a = torch.rand(3, 37, generator=gen, dtype=torch.float64).to(dev)
        a[:, 5] = 0
        a = a / a.sum(1, keepdim=True)
        for method in ("sinkhorn", "sns"):
            res = dk.ot.sinkhorn(C, a, None, eps=0.05, method=method, tol=1e-5, max_iter=2000)
            assert torch.isfinite(res.plan).all(), method
            res = dk.ot.sinkhorn(C, a, None, eps=0.05, method=method, max_iter=25,
                                 fixed_iterations=True)
            calls += 2
    # Above 2^17 dense entries SNS solves its Newton systems grid-wide (cooperative CG).
    C = torch.rand(380, 360, generator=gen, dtype=torch.float32).to(dev)
    res = dk.ot.sinkhorn(C, eps=0.02, method="sns", tol=1e-5, max_iter=200)
    assert torch.isfinite(res.plan).all() and bool(res.newton_steps > 0), "grid-wide CG"
    calls += 1
    C = torch.rand(17, 13, generator=gen, dtype=torch.float64).to(dev).requires_grad_(True)
    (dk.ot.sinkhorn(C, eps=0.1, tol=1e-9).cost).backward()
    return calls + 1


if __name__ == "__main__":
    sys.exit(main())
