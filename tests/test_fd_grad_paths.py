"""The CUDA kernels' alternative paths give the same bits (csrc/fd_grad/fd_grad_cuda.cu):

- the 16-byte vector path (aligned whole groups; hardware conversions with a NaN check per
  unit) against the element-wise path (a misaligned view takes it for the whole tensor), on
  odd sizes and values that exercise the NaN/inf/overflow fallbacks;
- rows passed by value in the kernel's parameters (short lists) against rows copied to the
  device (longer lists, or ``_INLINE_ROWS = 0``);
- the Gaussian kernels' two tables: the signed 128 KB table (one block of 768 threads per
  SM, where a block may have 128 KB of shared memory) and the 64 KB magnitude table (the
  fallback, forced by ``DK_FD_SMALL_TABLE=1``, which the launcher reads at every launch),
  each against the CPU and against each other. On a device without 128 KB per block both
  runs take the magnitude table.

The CUDA tests skip without a GPU; the binding checks of the by-value path run anywhere.
"""
from __future__ import annotations

import pytest
import torch

from diffkern import _C
from diffkern import _zo_kernels as zk
from tests.test_fd_grad import _many_params, replay_captured_perturb

STORAGE = [pytest.param(d, id=str(d).split(".")[1])
           for d in (torch.float16, torch.bfloat16, torch.float32)]
SIZES = (1, 3, 7, 8, 9, 15, 16, 17, 4097)  # groups of 8: partial, whole, one more
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with NaNs (both signs, other payloads), infinities, subnormals and
    values near the dtype's largest (a perturbation rounds them to inf), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen).to(dtype)
    bits = x.view(_BITS[dtype])
    specials = {torch.float16: [0x7e00, -0x0200, 0x7c01, 0x7c00, -0x0400, 0x0001, 0x7bff],
                torch.bfloat16: [0x7fc0, -0x0040, 0x7f81, 0x7f80, -0x0080, 0x0001, 0x7f7f],
                torch.float32: [0x7fc00000, -0x00400000, 0x7f800001, 0x7f800000, -0x00800000,
                                0x00000001, 0x7f7fffff]}[dtype]
    picks = torch.randint(0, n, (max(1, n // 16),), generator=gen)
    for m, i in enumerate(picks.tolist()):
        bits[i] = specials[m % len(specials)]
    return x


def _placed(x: torch.Tensor, offset: int, device) -> torch.Tensor:
    """x copied into a fresh buffer at `offset` elements from its (aligned) start: a
    contiguous view whose address has the alignment that offset gives."""
    buf = torch.zeros(x.numel() + offset + 8, dtype=x.dtype, device=device)
    view = buf[offset:offset + x.numel()]
    view.copy_(x.to(device))
    return view


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(_BITS[t.dtype])


def _run_all(params: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    zk.perturb_(params, 21, 3, 0.75)
    zk.perturb_(params, 21, 4, 1e4, "rademacher")  # large: rounds to inf in 16-bit storage
    zk.update_(params, [(21, 3, 0.5), (22, 1, -2.0)], 1e-2, 0.1)
    zk.update_(params, [(23, 0, 1.0)], 0.5, 0.0, "rademacher")
    zk.perturb_(params, 24, 1, 0.5, "sphere")
    zk.perturb_into(dst, params, 25, 2, 0.25)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", STORAGE)
def test_vector_and_element_paths_give_the_same_bits(cuda_device, dtype):
    elem = torch.tensor([], dtype=dtype).element_size()
    # (source offset, destination offset) in elements; (0, 0) puts every whole group on the
    # vector path. 1 element, or 8 bytes (off a 16-byte boundary): every group element-wise
    # (a group is 16 or 32 bytes); different offsets for the source and destination of
    # perturb_into: element-wise.
    placements = [(0, 0), (1, 1), (8 // elem, 8 // elem), (0, 1), (1, 0)]
    for n in SIZES:
        x = _values(n, dtype, seed=n)
        results = []
        for src_off, dst_off in placements:
            params = [_placed(x, src_off, cuda_device)]
            dst = [_placed(torch.zeros(n, dtype=dtype), dst_off, cuda_device)]
            _run_all(params, dst)
            results.append(((src_off, dst_off), _bits(params[0]), _bits(dst[0])))
        _, want_p, want_d = results[0]
        for where, got_p, got_d in results[1:]:
            assert torch.equal(got_p, want_p), f"numel {n}, offsets {where}: perturb/update bits differ"
            assert torch.equal(got_d, want_d), f"numel {n}, offsets {where}: perturb_into bits differ"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", STORAGE)
def test_vector_path_agrees_with_the_cpu_on_finite_values(cuda_device, dtype):
    for n in SIZES:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        cpu = [x.clone()]
        gpu = [_placed(x, 0, cuda_device)]
        for params in (cpu, gpu):
            zk.perturb_(params, 5, 6, 1e-2)
            zk.update_(params, [(5, 6, 0.5), (9, 1, -0.25)], 1e-3, 0.01)
            zk.perturb_(params, 5, 7, 1e-2, "rademacher")
        assert torch.equal(_bits(gpu[0]), _bits(cpu[0])), f"numel {n}"


TABLES = [pytest.param("0", id="signed_table"), pytest.param("1", id="magnitude_table")]


def _run_gaussian(params: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    """The kernels that read the table: perturb in place, update (several terms), perturb
    into a copy."""
    zk.perturb_(params, 41, 3, 0.75)
    zk.update_(params, [(41, 3, 0.5), (42, 1, -2.0), (43, 7, 1.5)], 1e-2, 0.1)
    zk.perturb_into(dst, params, 44, 2, 0.25)


@pytest.mark.cuda
@pytest.mark.parametrize("small_table", TABLES)
def test_gaussian_tables_agree_with_the_cpu(cuda_device, small_table, monkeypatch):
    """A long mixed list (block ranges that start and end inside tensors) and two
    misaligned views (the element-wise path), finite values."""
    monkeypatch.setenv("DK_FD_SMALL_TABLE", small_table)
    gen = torch.Generator().manual_seed(5)
    cpu = _many_params() + [torch.randn(4097, generator=gen).half(),
                            torch.randn(9, generator=gen).bfloat16()]
    gpu = ([p.to(cuda_device, copy=True) for p in cpu[:-2]]
           + [_placed(p, 1, cuda_device) for p in cpu[-2:]])
    cpu_dst = [torch.empty_like(p) for p in cpu]
    gpu_dst = [torch.empty_like(p) for p in gpu]
    _run_gaussian(cpu, cpu_dst)
    _run_gaussian(gpu, gpu_dst)
    for t, (c, g) in enumerate(zip(cpu + cpu_dst, gpu + gpu_dst)):
        assert torch.equal(_bits(g), _bits(c)), f"tensor {t % len(cpu)}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", STORAGE)
def test_gaussian_tables_give_the_same_bits(cuda_device, dtype, monkeypatch):
    """NaN, inf, subnormal and near-overflow values, aligned and misaligned."""
    for n in (9, 4097):
        x = _values(n, dtype, seed=n)
        runs = []
        for small_table in ("0", "1"):
            monkeypatch.setenv("DK_FD_SMALL_TABLE", small_table)
            params = [_placed(x, 0, cuda_device), _placed(x, 1, cuda_device)]
            dst = [_placed(torch.zeros(n, dtype=dtype), 0, cuda_device) for _ in params]
            _run_gaussian(params, dst)
            runs.append([_bits(t) for t in params + dst])
        for i, (a, b) in enumerate(zip(*runs)):
            assert torch.equal(a, b), f"numel {n}, tensor {i}"


def _mixed_list(device, count=5):
    sizes = (4097, 9, 1, 3000, 7, 8, 64)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(sizes[i % len(sizes)], generator=gen).to(dtypes[i % 3]).to(device)
            for i in range(count)]


@pytest.mark.cuda
@pytest.mark.parametrize("count", [5, 40])  # by value; longer than FD_INLINE_ROWS (device)
def test_rows_by_value_and_device_rows_give_the_same_bits(cuda_device, count, monkeypatch):
    runs = []
    for inline_rows in (zk._INLINE_ROWS, 0):
        monkeypatch.setattr(zk, "_INLINE_ROWS", inline_rows)
        params = _mixed_list(cuda_device, count)
        dst = [torch.empty_like(p) for p in params]
        rows = zk._descriptors(params, list(range(count)))
        by_value = inline_rows > 0 and count <= inline_rows
        assert (rows.cuda_device >= 0) == by_value
        assert rows.desc.device.type == ("cpu" if by_value else "cuda")
        _run_all(params, dst)
        norm = zk.sum_sq(params, 3, 4).item()
        runs.append(([_bits(p) for p in params], [_bits(d) for d in dst], norm))
    (p0, d0, n0), (p1, d1, n1) = runs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(a, b) for a, b in zip(d0, d1))
    assert n0 == n1


@pytest.mark.cuda
def test_rows_by_value_under_graph_capture(cuda_device):
    params = [torch.zeros(s, device=cuda_device, dtype=torch.float16) for s in (1000, 37)]
    assert zk._descriptors(params, [0, 1]).cuda_device >= 0
    replay_captured_perturb(params, 1)
    for t, p in enumerate(params):
        assert torch.equal(p, (0.25 * zk.direction(t, p, 1, 1)).half())


def _host_rows(count: int) -> torch.Tensor:
    x = torch.zeros(4)
    rows = [(x.data_ptr(), 4, _C.FD_DTYPE_CODES["float32"], t, t) for t in range(count)]
    return torch.tensor(rows, dtype=torch.int64)


def test_rows_by_value_are_limited_to_fd_inline_rows():
    desc = _host_rows(_C.FD_INLINE_ROWS + 1)
    with pytest.raises(ValueError, match=rf"fd_perturb: cuda_device: at most {_C.FD_INLINE_ROWS} "
                                         rf"descriptor rows go by value, got {desc.shape[0]}"):
        _C.fd_perturb(desc, desc.shape[0], 1, 1, 1.0, 0, cuda_device=0)
    with pytest.raises(ValueError, match=r"fd_update: cuda_device: at most"):
        _C.fd_update(desc, desc.shape[0], [(1, 1, 1.0)], 1.0, 0.0, 0, cuda_device=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's message")
def test_rows_by_value_need_a_cuda_build_or_device():
    desc = _host_rows(2)
    out = torch.empty(_C.FD_SUM_SQ_PARTIALS + 1, dtype=torch.float64)
    # Host rows for a GPU launch: refused with the reason (no CUDA kernels, or no such GPU),
    # never run on the CPU instead.
    with pytest.raises((RuntimeError, ValueError), match=r"cuda"):
        _C.fd_perturb(desc, 2, 1, 1, 1.0, 0, cuda_device=0)
    with pytest.raises((RuntimeError, ValueError), match=r"cuda"):
        _C.fd_sum_sq(desc, 2, 1, 1, 0, out, cuda_device=0)
