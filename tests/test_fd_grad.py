"""The fused finite-difference kernels (csrc/fd_grad/, python/diffkern/_zo_kernels.py).

The generator against Random123's published vectors, the documented definition of z
against an independent float64 re-derivation, z as a pure function of (seed, k, t, i), its
statistics, and perturb/update against their formulas evaluated with torch in float32,
bit for bit, in every storage dtype. GPU tests (``cuda``): CPU vs GPU bits, a side stream,
CUDA-graph capture.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffkern import _C
from diffkern import _zo_kernels as zk

STORAGE = [pytest.param(d, id=str(d).split(".")[1])
           for d in (torch.float32, torch.float16, torch.bfloat16)]

# Random123 tests/kat_vectors, the three "philox4x32 10" lines (counter, key, output);
# https://github.com/DEShawResearch/random123
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    assert _C.fd_philox(counter, key) == want


def _cell_rms() -> np.ndarray:
    """|z| of each 15-bit magnitude m by an independent float64 derivation of
    scripts/gen_gaussian_table.py's definition: the RMS of N(0, 1)'s |Z| over the m-th of
    2^15 cells of equal probability (exact to ~1e-7 relative here, far below float16's 2^-11)."""
    from scipy.special import erfinv
    cells = 1 << 15
    x = np.sqrt(2.0) * erfinv(np.arange(cells + 1, dtype=np.float64) / cells)
    with np.errstate(invalid="ignore"):
        xphi = np.where(np.isinf(x), 0.0, x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi))
    return np.sqrt(1.0 + 2.0 * cells * (xphi[:-1] - xphi[1:]))


def _reference_bits(seed: int, k: int, t: int, index) -> np.ndarray:
    """The 16 random bits of the elements ``index`` (an int or an array of flat indices) by
    the definition in directions.cuh, from fd_philox's words: lane l of group j takes half
    l % 2 of word l // 2."""
    index = np.asarray(index, dtype=np.int64)
    words = {}
    for j in np.unique(index // 8).tolist():
        words[j] = _C.fd_philox((j % 2**32, j >> 32, t, k), (seed % 2**32, seed >> 32))
    return np.array([(words[i // 8][(i % 8) // 2] >> (16 * (i % 2))) & 0xFFFF
                     for i in index.tolist()], dtype=np.int64)


def _reference_z(seed: int, k: int, t: int, numel: int, distribution: str) -> np.ndarray:
    """z by the definition in directions.cuh, in float64."""
    h = _reference_bits(seed, k, t, np.arange(numel))
    sign = np.where(h & 0x8000, -1.0, 1.0)
    if distribution == "rademacher":
        return sign
    return sign * _cell_rms()[h & 0x7FFF]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_follow_their_definition(distribution):
    seed, k, t = 0x123456789ABCDEF0, 77, 5
    z = zk.direction(t, torch.empty(1001), seed, k, distribution).double().numpy()
    ref = _reference_z(seed, k, t, 1001, distribution)
    # The table holds each |z| rounded to the nearest float16: within half an ulp, 2^-11
    # relative (2^-25 absolute in float16's subnormal range, where the first cells are).
    np.testing.assert_allclose(z, ref, rtol=2.0**-11 * 1.001, atol=2.0**-25)
    if distribution == "gaussian":  # the sign and the magnitude's index, exactly
        h = _reference_bits(seed, k, t, np.arange(1001))
        assert (np.signbit(z) == (h >> 15).astype(bool)).all()


def test_z_is_a_pure_function_of_seed_k_t_i():
    shapes = [(37,), (4, 5), (1,), (0,), (1023,), (2, 3, 7)]
    alone = [zk.direction(t, torch.empty(s), 11, 3) for t, s in enumerate(shapes)]
    # In one list, in a shuffled list with the same ids, and one tensor on its own.
    params = [torch.zeros(s) for s in shapes]
    zk.perturb_(params, 11, 3, 1.0)
    for a, p in zip(alone, params):
        assert torch.equal(a, p)
    order = [4, 2, 0, 5, 1, 3]
    shuffled = [torch.zeros(shapes[t]) for t in order]
    zk.perturb_(shuffled, 11, 3, 1.0, tensor_ids=order)
    for t, p in zip(order, shuffled):
        assert torch.equal(alone[t], p)
    single = [torch.zeros(shapes[4])]
    zk.perturb_(single, 11, 3, 1.0, tensor_ids=[4])
    assert torch.equal(alone[4], single[0])
    # Chunked into two calls: the same.
    first, second = [torch.zeros(s) for s in shapes[:3]], [torch.zeros(s) for s in shapes[3:]]
    zk.perturb_(first, 11, 3, 1.0)
    zk.perturb_(second, 11, 3, 1.0, tensor_ids=[3, 4, 5])
    for a, p in zip(alone, first + second):
        assert torch.equal(a, p)
    # And different seeds, directions, tensors give different values.
    z = alone[4]
    assert not torch.equal(z, zk.direction(4, z, 12, 3))
    assert not torch.equal(z, zk.direction(4, z, 11, 4))
    assert not torch.equal(z, zk.direction(3, z, 11, 3))


def test_gaussian_moments():
    n = 1_000_000
    z = zk.direction(0, torch.empty(n), 2024, 1).double()
    assert torch.isfinite(z).all()
    mean, var = z.mean().item(), z.var().item()
    kurt = ((z - mean) ** 4).mean().item() / var**2
    # 5 standard errors: var(mean) = 1/n, var(s^2) = 2/n, var(kurtosis) ~ 96/n.
    assert abs(mean) < 5 / math.sqrt(n), mean
    assert abs(var - 1) < 5 * math.sqrt(2 / n), var
    assert abs(kurt - 3) < 5 * math.sqrt(96 / n), kurt
    # The tails: P(|z| > 3) = 0.0026998.
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n), tail
    # sum_sq is the same sum in float64 (fixed order inside: repeatable bits).
    s1 = zk.sum_sq([torch.empty(n)], 2024, 1)
    s2 = zk.sum_sq([torch.empty(n)], 2024, 1)
    assert s1.item() == s2.item()
    assert s1.item() == pytest.approx((z ** 2).sum().item(), rel=1e-12)


def test_gaussian_map_on_every_bit_pattern():
    """All 2^16 inputs of the map: the float16 table against the float64 cell RMS, the
    sign bit, monotone magnitudes, and the moments the contract states (E[z^2] = 1 up to
    the float16 rounding; E[z^4] ~ 3; |z| <= 4.39)."""
    h = np.arange(1 << 16)
    z = np.array(_C.fd_gaussian_from_bits(h.tolist()), dtype=np.float64)
    rms = _cell_rms()
    want = np.where(h & 0x8000, -1.0, 1.0) * rms[h & 0x7FFF]
    np.testing.assert_allclose(z, want, rtol=2.0**-11 * 1.001, atol=2.0**-25)
    # The nearest float16: no other float16 is closer to the float64 value (ties aside).
    mags = np.abs(z[:1 << 15]).astype(np.float16)
    up = np.nextafter(mags, np.float16(np.inf)).astype(np.float64)
    down = np.nextafter(mags, np.float16(0)).astype(np.float64)
    err = np.abs(mags.astype(np.float64) - rms)
    assert (err <= np.abs(up - rms) * (1 + 1e-6)).all() and (err <= np.abs(down - rms) * (1 + 1e-6)).all()
    assert (np.signbit(z) == (h >= 0x8000)).all()  # never -0 for a positive sign bit
    assert (np.diff(z[:1 << 15]) >= 0).all() and (z[:1 << 15] > 0).all()
    assert np.abs(z).max() <= 4.3907
    assert abs(np.mean(z ** 2) - 1) < 1e-6
    assert abs(np.mean(z ** 4) - 3) < 2e-4
    with pytest.raises(ValueError, match="16-bit"):
        _C.fd_gaussian_from_bits([1 << 16])


def test_gaussian_distribution_ks():
    from scipy import stats
    z = zk.direction(3, torch.empty(1_000_000), 77, 5).double().numpy()
    # A fixed seed: the test is deterministic; a broken map fails it by orders of magnitude.
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_rademacher_values_and_balance():
    n = 1_000_000
    z = zk.direction(3, torch.empty(n), 5, 9, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.double().mean().item()) < 5 / math.sqrt(n)
    # Neighbours are independent: no correlation between lanes of a group.
    assert abs((z[:-1] * z[1:]).double().mean().item()) < 5 / math.sqrt(n)
    assert zk.sum_sq([torch.empty(n)], 5, 9, "rademacher").item() == n


def _random_params(dtype, shapes=((7,), (33, 5), (2,), (1024,), (3, 3, 3)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", STORAGE)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_perturb_is_theta_plus_scale_z_rounded_once(dtype, distribution):
    params = _random_params(dtype)
    before = [p.clone() for p in params]
    scale = 1e-3
    zk.perturb_(params, 99, 4, scale, distribution)
    s = torch.tensor(scale, dtype=torch.float32)
    for t, (b, p) in enumerate(zip(before, params)):
        z = zk.direction(t, b, 99, 4, distribution)
        want = (b.float() + s * z).to(dtype)
        assert torch.equal(p.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", STORAGE)
def test_update_is_its_formula(dtype):
    params = _random_params(dtype, seed=1)
    before = [p.clone() for p in params]
    terms = [(1, 0, 0.7), (2**63 + 5, 1, -1.25), (1, 2**32 - 1, 0.03)]
    lr, wd = 1e-2, 0.1
    zk.update_(params, terms, lr, wd)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    for t, (b, p) in enumerate(zip(before, params)):
        theta = b.float()
        g = torch.zeros_like(theta)
        for seed, k, c in terms:
            g = g + f32(c) * zk.direction(t, b, seed, k)
        want = (theta - f32(lr) * (g + f32(wd) * theta)).to(dtype)
        assert torch.equal(p.float(), want.float()), (t, (p.float() - want.float()).abs().max())


def test_sphere_has_unit_norm_over_the_list():
    params = [torch.zeros(s) for s in ((100,), (7, 9), (3,))]
    zk.perturb_(params, 8, 2, 1.0, "sphere")
    norm = math.sqrt(sum((p.double() ** 2).sum().item() for p in params))
    assert norm == pytest.approx(1.0, abs=1e-6)
    # The same direction as the Gaussian one, divided by its norm.
    g = zk.direction(1, params[1], 8, 2)
    r = zk.sum_sq(params, 8, 2).item()
    torch.testing.assert_close(params[1], g * (1 / math.sqrt(r)), rtol=1e-6, atol=0)
    # update with sphere: each term divided by its own norm.
    params = [torch.zeros(50), torch.zeros(13)]
    zk.update_(params, [(3, 1, 1.0)], 1.0, 0.0, "sphere")
    norm = math.sqrt(sum((p.double() ** 2).sum().item() for p in params))
    assert norm == pytest.approx(1.0, abs=1e-6)


def test_odd_sizes_and_empty_tensors_in_the_list():
    shapes = [(0,), (1,), (2,), (3,), (5,), (0, 4), (4097,)]
    params = [torch.zeros(s, dtype=torch.float16) for s in shapes]
    zk.perturb_(params, 1, 1, 1.0)
    for t, p in enumerate(params):
        assert torch.equal(p, zk.direction(t, p, 1, 1).half())


def test_errors_name_the_function_and_argument():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"perturb_: params: expected a non-empty list"):
        zk.perturb_([], 1, 1, 1.0)
    with pytest.raises(TypeError, match=r"perturb_: params\[1\]: expected dtype float32, "
                                        r"float16 or bfloat16, got torch.int64"):
        zk.perturb_([x, torch.zeros(3, dtype=torch.int64)], 1, 1, 1.0)
    with pytest.raises(TypeError, match=r"update_: params\[0\]: expected dtype .*got torch.float64"):
        zk.update_([x.double()], [(1, 1, 1.0)], 0.1)
    with pytest.raises(ValueError, match=r"sum_sq: params\[0\]: expected a contiguous tensor"):
        zk.sum_sq([torch.zeros(4, 4).t()], 1, 1)
    with pytest.raises(ValueError, match=r"params\[1\]: expected a cpu or cuda tensor"):
        zk.perturb_([x, torch.zeros(3, device="meta")], 1, 1, 1.0)
    with pytest.raises(TypeError, match=r"params: expected a list of tensors, got one tensor"):
        zk.perturb_(x, 1, 1, 1.0)
    with pytest.raises(ValueError, match=r"perturb_: seed: expected 0 <= seed < 2\*\*64"):
        zk.perturb_([x], -1, 1, 1.0)
    with pytest.raises(ValueError, match=r"perturb_: k: expected 0 <= k < 2\*\*32"):
        zk.perturb_([x], 1, 2**32, 1.0)
    with pytest.raises(ValueError, match=r"perturb_: scale: expected a finite number"):
        zk.perturb_([x], 1, 1, float("nan"))
    with pytest.raises(ValueError, match=r"perturb_: distribution: expected one of"):
        zk.perturb_([x], 1, 1, 1.0, "uniform")
    with pytest.raises(ValueError, match=r"update_: seeds_ks_coeffs: expected 1 to \d+"):
        zk.update_([x], [], 0.1)
    with pytest.raises(ValueError, match=r"update_: seeds_ks_coeffs: expected 1 to \d+"):
        zk.update_([x], [(1, k, 1.0) for k in range(zk.MAX_UPDATE_TERMS + 1)], 0.1)
    with pytest.raises(ValueError, match=r"perturb_: tensor_ids: expected 1 ids"):
        zk.perturb_([x], 1, 1, 1.0, tensor_ids=[0, 1])
    with pytest.raises(ValueError, match=r"direction: distribution: 'sphere'"):
        zk.direction(0, x, 1, 1, "sphere")
    # The bindings' own checks (reached only by calling _C directly).
    with pytest.raises(TypeError, match=r"fd_perturb: descriptors: expected dtype int64"):
        _C.fd_perturb(torch.zeros(1, 5), 1, 1, 1, 1.0, 0)
    with pytest.raises(ValueError, match=r"fd_perturb: descriptors: expected shape \(num_tensors, 5\)"):
        _C.fd_perturb(torch.zeros(1, 4, dtype=torch.int64), 1, 1, 1, 1.0, 0)
    with pytest.raises(ValueError, match=r"fd_sum_sq: out: expected 1025 elements"):
        _C.fd_sum_sq(torch.zeros(0, 5, dtype=torch.int64), 0, 1, 1, 0, torch.zeros(3, dtype=torch.float64))


def test_version_counter_is_bumped():
    x = torch.zeros(8)
    v = x._version
    zk.perturb_([x], 1, 1, 1.0)
    zk.update_([x], [(1, 1, 1.0)], 0.1)
    assert x._version == v + 2


# ------------------------------------------------------------------------------ CUDA

def _ulp_diff_f32(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in float32 ulps (ordered integer representation)."""
    def ordered(x):
        i = x.contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int((ordered(a) - ordered(b)).abs().max().item()) if a.numel() else 0


@pytest.mark.cuda
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cpu_and_cuda_directions_are_bit_identical(cuda_device, distribution):
    n = 1_000_003
    cpu = zk.direction(7, torch.empty(n), 31, 2, distribution)
    gpu = zk.direction(7, torch.empty(n, device=cuda_device), 31, 2, distribution).cpu()
    ulps = _ulp_diff_f32(cpu, gpu)
    # The math avoids libm and FMA contraction (directions.cuh): the bits must agree.
    assert ulps == 0, f"CPU and CUDA z differ by up to {ulps} float32 ulps"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", STORAGE)
def test_cpu_and_cuda_perturb_update_sum_sq_agree(cuda_device, dtype):
    cpu = _random_params(dtype, seed=3)
    gpu = [p.to(cuda_device) for p in cpu]
    for params in (cpu, gpu):
        zk.perturb_(params, 5, 6, 1e-2)
        zk.update_(params, [(5, 6, 0.5), (9, 1, -0.25)], 1e-3, 0.01)
        zk.perturb_(params, 5, 7, 1e-2, "sphere")
    for c, g in zip(cpu, gpu):
        assert torch.equal(c, g.cpu())
    s_cpu, s_gpu = zk.sum_sq(cpu, 2, 2).item(), zk.sum_sq(gpu, 2, 2).item()
    assert s_gpu == pytest.approx(s_cpu, rel=1e-13)  # summation orders differ, bits may


@pytest.mark.cuda
def test_cuda_side_stream(cuda_device):
    params = [torch.zeros(100_000, device=cuda_device, dtype=torch.bfloat16)]
    want = zk.direction(0, params[0], 4, 4).mul(0.5).bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        zk.perturb_(params, 4, 4, 0.5)
    s.synchronize()
    assert torch.equal(params[0], want)


def replay_captured_perturb(params, replays):
    """Captures perturb_(params, seed 1, k 1, scale 0.25) in a CUDA graph (after a warm-up
    call on a side stream, which builds the descriptors), zeroes the params and replays the
    graph `replays` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: builds and caches the descriptor array
        zk.perturb_(params, 1, 1, 0.0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        zk.perturb_(params, 1, 1, 0.25)
    for p in params:
        p.zero_()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_capture_of_perturb(cuda_device):
    params = [torch.zeros(s, device=cuda_device, dtype=torch.float16) for s in (1000, 37, 4096)]
    replay_captured_perturb(params, 2)
    for t, p in enumerate(params):
        z = zk.direction(t, p, 1, 1)
        once = (0.25 * z).half()
        assert torch.equal(p, (once.float() + torch.tensor(0.25, device=p.device) * z).half())


@pytest.mark.parametrize("dtype", STORAGE)
def test_perturb_into_equals_copy_then_perturb(dtype):
    src = _random_params(dtype, seed=4)
    before = [p.clone() for p in src]
    dst = [torch.empty_like(p) for p in src]
    zk.perturb_into(dst, src, 17, 3, 1e-2, tensor_ids=[5, 6, 7, 8, 9])
    want = [p.clone() for p in src]
    zk.perturb_(want, 17, 3, 1e-2, tensor_ids=[5, 6, 7, 8, 9])
    for d, w, s, b in zip(dst, want, src, before):
        assert torch.equal(d, w)
        assert torch.equal(s, b)  # the source is only read
    # Sphere: the norm of a larger set, passed in, is what normalises.
    norm = zk.sum_sq(src + [torch.empty(10)], 2, 2)
    zk.perturb_into(dst, src, 2, 2, 1.0, "sphere", norm_sq=norm)
    for t, (d, s) in enumerate(zip(dst, src)):
        z = zk.direction(t, s, 2, 2) * torch.tensor(1.0 / norm.sqrt().item(), dtype=torch.float32)
        assert torch.equal(d, (s.float() + z).to(dtype))


def test_perturb_into_errors_name_the_argument():
    a, b = torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"perturb_into: src: expected 1 tensors"):
        zk.perturb_into([a], [a, b], 1, 1, 1.0)
    with pytest.raises(ValueError, match=r"perturb_into: src\[0\]: expected shape \(8,\), dtype"):
        zk.perturb_into([a], [torch.zeros(8, dtype=torch.float16)], 1, 1, 1.0)
    with pytest.raises(ValueError, match=r"perturb_into: src\[0\]: overlaps dst\[0\]"):
        buf = torch.zeros(12)
        zk.perturb_into([buf[:8]], [buf[4:]], 1, 1, 1.0)
    zk.perturb_into([a], [a], 1, 1, 1.0)  # in place is allowed
    assert torch.equal(a, zk.direction(0, a, 1, 1))


def _many_params(seed=7):
    """~60 tensors of random sizes (some empty, some odd), mixed storage dtypes, ~1.5e6
    elements: many CUDA blocks, ranges that start and end inside tensors."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 60_000, (60,), generator=gen).tolist()
    sizes[3], sizes[10], sizes[11] = 0, 1, 3
    storage = (torch.float32, torch.float16, torch.bfloat16)
    dtypes = [storage[n % len(storage)] for n in range(len(sizes))]
    return [torch.randn(n, generator=gen).to(d) for n, d in zip(sizes, dtypes)]


@pytest.mark.cuda
def test_cpu_and_cuda_agree_on_a_long_mixed_list(cuda_device):
    cpu = _many_params()
    gpu = [p.to(cuda_device) for p in cpu]
    for params in (cpu, gpu):
        zk.perturb_(params, 11, 2, 1e-2)
        zk.perturb_(params, 11, 3, 1e-2, "rademacher")
        zk.update_(params, [(11, 2, 0.5), (12, 1, -0.25), (13, 0, 2.0)], 1e-3, 0.01)
        zk.update_(params, [(11, 4, 1.5)], 1e-2, 0.0, "sphere")
    for c, g in zip(cpu, gpu):
        assert torch.equal(c, g.cpu())
    dst_cpu = [torch.empty_like(p) for p in cpu]
    dst_gpu = [torch.empty_like(p) for p in gpu]
    zk.perturb_into(dst_cpu, cpu, 3, 9, 0.5)
    zk.perturb_into(dst_gpu, gpu, 3, 9, 0.5)
    for c, g in zip(dst_cpu, dst_gpu):
        assert torch.equal(c, g.cpu())


def _z_at(seed: int, k: int, t: int, index: np.ndarray, distribution: str) -> np.ndarray:
    """z of the given element indices by the definition, in float32 as the kernels produce
    it (the Gaussian through the library's own map of the 16 bits, which
    test_gaussian_map_on_every_bit_pattern checks)."""
    h = _reference_bits(seed, k, t, index)
    if distribution == "rademacher":
        return np.where(h & 0x8000, -1.0, 1.0).astype(np.float32)
    return np.array(_C.fd_gaussian_from_bits(h.tolist()), dtype=np.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_tensor_past_2_31_elements(cuda_device, dtype):
    """A tensor of 2^31 + 4101 elements (group indices past 2^28, byte offsets past 2^32)
    followed by a small one in the same list: perturb and update write the values the
    definition gives at the head, across the 2^31 boundary and at the tail, and the small
    tensor after it (whose first group is past 2^28) too."""
    n = 2**31 + 4101
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * torch.tensor([], dtype=dtype).element_size():
        pytest.skip("not enough free GPU memory")
    big = torch.zeros(n, dtype=dtype, device=cuda_device)
    small = torch.zeros(37, dtype=dtype, device=cuda_device)
    seed, k = 0xDEADBEEF12345, 9
    zk.perturb_([big, small], seed, k, 1.0, "rademacher", tensor_ids=[3, 4])
    picks = np.array([0, 1, 7, 8, 2**31 - 9, 2**31 - 1, 2**31, 2**31 + 1, n - 5, n - 1],
                     dtype=np.int64)
    got = big[torch.from_numpy(picks).to(cuda_device)].float().cpu().numpy()
    np.testing.assert_array_equal(got, _z_at(seed, k, 3, picks, "rademacher"))
    got_small = small.float().cpu().numpy()
    np.testing.assert_array_equal(got_small, _z_at(seed, k, 4, np.arange(37), "rademacher"))
    # Gaussian: perturb back to zero-plus-z by an update with lr = -1 (x + z), bf16/fp32
    # rounding of z itself is exact only in fp32, so compare after the same rounding.
    big.zero_()
    zk.update_([big], [(seed, k + 1, 1.0)], -1.0, tensor_ids=[3])
    got = big[torch.from_numpy(picks).to(cuda_device)].float().cpu()
    want = torch.from_numpy(_z_at(seed, k + 1, 3, picks, "gaussian")).to(dtype).float()
    assert torch.equal(got, want)
    del big, small
    torch.cuda.empty_cache()


@pytest.mark.cuda
def test_first_call_of_a_process_inside_graph_capture(cuda_device):
    """The Gaussian kernels set their shared-memory attribute once per device at their
    first launch; when that launch is inside a CUDA-graph capture, the capture still works
    and the replay writes what an eager call writes."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from diffkern import _zo_kernels as zk\n"
        "x = torch.zeros(1003, device='cuda', dtype=torch.float16)\n"
        "g = torch.cuda.CUDAGraph()\n"
        "with torch.cuda.graph(g):\n"
        "    zk.perturb_([x], 1, 2, 1.0)\n"
        "    zk.update_([x], [(1, 3, 0.5)], 0.1)\n"
        "g.replay()\n"
        "torch.cuda.synchronize()\n"
        "y = torch.zeros(1003, device='cuda', dtype=torch.float16)\n"
        "zk.perturb_([y], 1, 2, 1.0)\n"
        "zk.update_([y], [(1, 3, 0.5)], 0.1)\n"
        "assert torch.equal(x, y), (x - y).abs().max().item()\n"
        "assert bool((x != 0).any())\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
