"""fd_grad family: the fused, seeded finite-difference kernels (for ``diffkern.zo``; the
private wrappers are ``diffkern._zo_kernels``).

Checks: Philox-4x32-10 against Random123's known-answer vectors, directions() equal to what
perturb adds to zero tensors (fp32, one list of odd sizes), sum_sq against the float64 sum
of those directions, CPU/CUDA agreement of z (bits) when on cuda, and the perturb rate in
bytes/s next to a torch copy of the same bytes.
"""
from __future__ import annotations

import torch

from diffkern import _C
from diffkern import _zo_kernels as zk

from ._timing import median_time

ALIASES = ("zo", "fd")  # the Python modules built on it: diffkern.zo, diffkern.fd

# bench/zo.py: the fused kernels and dk.zo against a MeZO-style loop (issue 10's targets).
GPU_BENCHMARKS = [
    dict(name="bench-zo", timeout_s=300,
         argv=["bench/zo.py", "--device", "cuda", "--json", "{results}/bench_zo.json",
               "--plot", "{results}/zo.png"]),
    dict(name="bench-zo-hooks", timeout_s=120,
         argv=["bench/zo_hooks.py", "--device", "cuda", "--dtype", "float16", "--unit-bytes",
               "auto", "100000000", "--json", "{results}/bench_zo_hooks.json"]),
    # Where a ZOSGD step's time goes (GPU busy / idle, kernels by kind, host ops).
    dict(name="profile-zo-step", timeout_s=180,
         argv=["bench/zo_profile.py", "--device", "cuda", "--list",
               "--json", "{results}/zo_profile.json"]),
]

# Random123 tests/kat_vectors, "philox4x32 10" lines: (counter, key) -> output.
_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
_SHAPES = [(37,), (4, 5), (1,), (1023,), (2, 3, 7)]


def run(device: str, quick: bool = True) -> list[dict]:
    dev = torch.device(device)
    rows = []
    good = sum(_C.fd_philox(c, k) == want for c, k, want in _KAT)
    rows.append(dict(check="Philox-4x32-10 known answers", value=good,
                     reference=f"Random123 kat_vectors, {len(_KAT)} vectors",
                     status="ok" if good == len(_KAT) else "fail"))
    params = [torch.zeros(s, device=dev) for s in _SHAPES]
    zk.perturb_(params, 17, 3, 1.0)
    zs = [zk.direction(t, p, 17, 3) for t, p in enumerate(params)]
    same = all(torch.equal(p, z) for p, z in zip(params, zs))
    rows.append(dict(check="perturb of zeros == directions (float32, 5 tensors in one launch)",
                     value=int(same), reference="bit-identical", status="ok" if same else "fail"))
    got = zk.sum_sq(params, 17, 3).item()
    want = sum((z.double() ** 2).sum().item() for z in zs)
    err = abs(got - want) / want
    rows.append(dict(check="sum_sq rel. error", value=err,
                     reference="float64 sum of directions^2; limit 1e-12",
                     status="ok" if err <= 1e-12 else "fail"))
    if dev.type == "cuda":
        n = 100_003
        a = zk.direction(2, torch.empty(n), 5, 1)
        b = zk.direction(2, torch.empty(n, device=dev), 5, 1).cpu()
        diff = int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())
        rows.append(dict(check=f"CPU vs CUDA z, max float32 ulp difference (n={n})",
                         value=diff, reference="0 (no libm, no FMA in the math)",
                         status="ok" if diff == 0 else "fail"))
    rows.append(_throughput(dev, quick))
    return rows


def _throughput(dev: torch.device, quick: bool) -> dict:
    # fp16 tensors of mixed sizes, like a transformer's weights, biases and norms.
    if dev.type == "cuda":
        sizes = [4_194_304, 2048, 2048, 16_777_216] * (4 if quick else 16)
    else:
        sizes = [262_144, 1024, 1024, 1_048_576] * (1 if quick else 4)
    params = [torch.zeros(n, dtype=torch.float16, device=dev) for n in sizes]
    flat = torch.zeros(sum(sizes), dtype=torch.float16, device=dev)
    dst = torch.empty_like(flat)
    nbytes = 2 * flat.numel() * flat.element_size()  # read + write
    t = median_time(lambda: zk.perturb_(params, 1, 1, 1e-3), dev)
    t_copy = median_time(lambda: dst.copy_(flat), dev)
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    return dict(check=f"perturb bytes/s (fp16, {len(sizes)} tensors, "
                      f"{flat.numel():.2e} elements{threads})",
                value=nbytes / t,
                reference=f"torch copy of the same bytes: {nbytes / t_copy:.3g} B/s "
                          f"({t_copy / t:.0%} of it)",
                status="info")


def sanitizer_workload(device: str) -> int:
    """Every kernel once or more, for compute-sanitizer (runs on the CPU too): perturb and
    update over mixed dtypes with odd and zero sizes, a storage offset (element-wise path),
    the sphere norm, directions, sum_sq, and a side stream on CUDA."""
    dev = torch.device(device)
    calls = 0
    base = torch.zeros(1001, device=dev, dtype=torch.float16)
    params = [torch.zeros(5, device=dev), torch.zeros(0, device=dev),
              torch.zeros(3, 3, device=dev, dtype=torch.bfloat16), base[1:],  # odd offset
              torch.zeros(4097, device=dev, dtype=torch.float16)]
    for dist in ("gaussian", "rademacher", "sphere"):
        zk.perturb_(params, 3, 1, 0.5, dist)
        zk.update_(params, [(3, 1, 1.0), (4, 2, -0.5)], 0.1, 0.01, dist)
        calls += 2
    for t, p in enumerate(params):
        z = zk.direction(t, p, 3, 1)
        calls += 1
        assert z.shape == p.shape and bool(torch.isfinite(z).all())
    s = zk.sum_sq(params, 3, 1).item()
    calls += 1
    assert s > 0
    fresh = [torch.zeros(7, device=dev)]
    zk.perturb_(fresh, 9, 9, 1.0)
    calls += 1
    assert torch.equal(fresh[0], zk.direction(0, fresh[0], 9, 9))
    if dev.type == "cuda":
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            zk.perturb_(params, 5, 5, 1.0)
        stream.synchronize()
        calls += 1
    return calls
