// CUDA kernels of the Newton steps' linear solves: sparse products with the sparsified plan
// and conjugate gradients on the Schur complement, per iteration, grid-wide in one
// cooperative launch, or one block per batch element for small problems.
#pragma once
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "sinkhorn/cuda_sweep.cuh"
#include "sinkhorn/solver_steps.cuh"
#include "sinkhorn/workspace.h"

namespace diffkern {
namespace sinkhorn_detail {

namespace cg = cooperative_groups;

// y_r = diag_r * xd_r + sign * scale_r * sum_e v_e x[idx_e]   (v^2 with `square`);
// diag/xd/scale may be null (then 0, -, 1).
struct SpmvTerms {
  const double* diag = nullptr;
  const double* xd = nullptr;
  const double* scale = nullptr;
  double sign = 1.0;
  bool square = false;
};

__device__ __forceinline__ void spmv_row(int64_t br, int lane, const int64_t* __restrict__ cnt,
                                         const int32_t* __restrict__ idx,
                                         const float* __restrict__ val, int64_t R, int64_t K,
                                         const double* __restrict__ x, const SpmvTerms& t,
                                         double* y) {
  const int64_t b = br / R;
  const int32_t* ix = idx + br * K;
  const float* v = val + br * K;
  const double* xb = x + b * K;
  const int64_t c = cnt[br];
  double acc = 0;
  for (int64_t e = lane; e < c; e += 32) {
    const double ve = static_cast<double>(v[e]);
    acc += (t.square ? ve * ve : ve) * xb[ix[e]];
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    double out = t.sign * (t.scale ? t.scale[br] : 1.0) * acc;
    if (t.diag) out += t.diag[br] * t.xd[br];
    y[br] = out;
  }
}

__global__ void spmv_kernel(const int64_t* __restrict__ cnt, const int32_t* __restrict__ idx,
                            const float* __restrict__ val, int64_t R, int64_t K, int64_t rows,
                            const double* __restrict__ x, SpmvTerms t, double* y,
                            const int* __restrict__ mask) {
  const int64_t br = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (br >= rows || !mask[br / R]) return;
  spmv_row(br, threadIdx.x % 32, cnt, idx, val, R, K, x, t, y);
}

constexpr int kCgThreads = 512;

// One CG iteration's vector work for batch element b, by one block of kCgThreads:
// pq = p.q, alpha = rz/pq, x += alpha p, r -= alpha q, z = M r, rz' = r.z, stop test,
// p = z + (rz'/rz) p. Thread 0 stores rz' and the flag. Returns whether CG goes on.
__device__ bool cg_vector_update(int64_t b, const BatchScalars& s, double* __restrict__ x,
                                 double* __restrict__ r, double* __restrict__ z,
                                 double* __restrict__ p, const double* __restrict__ q,
                                 const double* __restrict__ precond, int64_t m, int cur,
                                 double* shared) {
  const int next = 1 - cur;
  const int64_t o = b * m;
  double pq = 0;
  for (int64_t j = threadIdx.x; j < m; j += kCgThreads) pq += p[o + j] * q[o + j];
  pq = block_sum<kCgThreads>(pq, shared);
  const double alpha = pq > 0 ? s.rz[cur][b] / pq : 0.0;
  double rz = 0;
  for (int64_t j = threadIdx.x; j < m; j += kCgThreads) {
    const int64_t k = o + j;
    x[k] += alpha * p[k];
    r[k] -= alpha * q[k];
    z[k] = precond[k] * r[k];
    rz += r[k] * z[k];
  }
  rz = block_sum<kCgThreads>(rz, shared);
  const bool go_on = rz > s.cg_tol2[b] * s.rz0[b];
  if (go_on) {
    const double beta = rz / s.rz[cur][b];
    for (int64_t j = threadIdx.x; j < m; j += kCgThreads) p[o + j] = z[o + j] + beta * p[o + j];
  }
  __syncthreads();  // every thread has read s.cg_active[b] and s.rz[cur][b]
  if (threadIdx.x == 0) {
    s.rz[next][b] = rz;
    s.cg_active[b] = go_on;
  }
  return go_on;
}

__global__ void cg_step_kernel(BatchScalars s, double* x, double* r, double* z, double* p,
                               const double* q, const double* precond, int64_t m, int cur) {
  __shared__ double shared[kCgThreads / 32];
  const int64_t b = blockIdx.x;
  if (!s.cg_active[b]) return;  // uniform over the block
  cg_vector_update(b, s, x, r, z, p, q, precond, m, cur, shared);
}

// The whole CG solve in one cooperative launch (tolerance mode): the three phases of an
// iteration (rows product, columns product, per-batch vector update) are separated by grid
// barriers (~1 us each) instead of kernel boundaries (~3-5 us each on short problems), and
// the loop ends on the device when no batch element is still iterating: no host checks.
struct CgFusedArgs {
  BatchScalars s;
  Workspace w;
  int64_t batch, n, m, max_iter;
};

__global__ void __launch_bounds__(kCgThreads) cg_fused_kernel(CgFusedArgs A) {
  __shared__ double shared[kCgThreads / 32];
  cg::grid_group grid = cg::this_grid();
  const BatchScalars& s = A.s;
  const Workspace& w = A.w;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (kCgThreads / 32);
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * (kCgThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  SpmvTerms rows;
  rows.scale = w.inv_a;
  SpmvTerms cols;
  cols.diag = w.c;
  cols.xd = w.p;
  cols.sign = -1.0;
  int cur = 0;
  for (int64_t k = 0; k < A.max_iter; ++k) {
    for (int64_t br = warp_id; br < A.batch * A.n; br += warps_total)
      if (s.cg_active[br / A.n])
        spmv_row(br, lane, w.row_cnt, w.row_idx, w.row_val, A.n, A.m, w.p, rows, w.tmp);
    grid.sync();
    for (int64_t br = warp_id; br < A.batch * A.m; br += warps_total)
      if (s.cg_active[br / A.m])
        spmv_row(br, lane, w.col_cnt, w.col_idx, w.col_val, A.m, A.n, w.tmp, cols, w.q);
    grid.sync();
    for (int64_t b = blockIdx.x; b < A.batch; b += gridDim.x) {
      if (!s.cg_active[b]) continue;  // uniform over the block
      const bool go_on = cg_vector_update(b, s, w.x, w.r, w.z, w.p, w.q, w.precond, A.m, cur,
                                          shared);
      if (go_on && threadIdx.x == 0) atomicAdd(&s.cg_live[k & 1], 1);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) s.cg_live[(k + 1) & 1] = 0;  // read last round
    grid.sync();
    if (*static_cast<volatile int*>(&s.cg_live[k & 1]) == 0) break;
    cur = 1 - cur;
  }
}

// The whole CG solve of one batch element by one block, for small problems (tolerance and
// fixed mode: a plain launch, so graph-capturable). The grid-wide solve above pays three
// grid barriers per iteration (~2-3 us each with hundreds of blocks) for products that are
// tiny here: at B = 64, n = 256 its iterations took ~12 us. Here the barriers are
// __syncthreads, the vectors p, D_a^-1 P_s p and q live in shared memory, x, r and the
// preconditioner in registers, and the sparse rows (read every iteration) stay in L1.
// Rows are taken by groups of kCgGroup lanes (rows hold tens of entries at these sizes).
// Two block sizes: 1024 threads, and 128 for tiny problems (max(n, m) <= 128; the OT sweep's
// problems), where 1024 threads would leave 31 of 32 warps idle in every one of the
// iteration's seven barriers and two 32-warp block sums (the iteration's latency chain).
constexpr int kCgBlockThreads = 1024;
constexpr int kCgSmallBlockThreads = 128;
constexpr int kCgSmallBlockMax = 128;  // max(n, m) up to which the small block solves
constexpr int kCgPerThread = 2;  // vector entries per thread: m <= 2 * threads
constexpr int kCgGroup = 8;
static_assert(kCgSmallBlockMax <= kCgPerThread * kCgSmallBlockThreads, "m must fit the block");

// sum_e val_e x[idx_e] over one sparse row by the kCgGroup lanes of a group (gl: lane in
// the group); every lane of the warp must call (the shuffles take the full warp).
__device__ __forceinline__ double group_row_dot(int64_t cnt, const int32_t* __restrict__ idx,
                                                const float* __restrict__ val, const double* x,
                                                int gl) {
  double acc = 0;
  for (int64_t e = gl; e < cnt; e += kCgGroup) acc += static_cast<double>(val[e]) * x[idx[e]];
  for (int off = kCgGroup / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFull, acc, off);
  return acc;
}

// Shared memory of cg_block_kernel: p (m), tmp (n), q (m) doubles.
inline size_t cg_block_smem(int64_t n, int64_t m) { return sizeof(double) * (2 * m + n); }

template <int kThreads>
__global__ void __launch_bounds__(kThreads) cg_block_kernel(CgFusedArgs A) {
  extern __shared__ double vec[];
  __shared__ double red[kThreads / 32];
  const int64_t b = blockIdx.x;
  const BatchScalars& s = A.s;
  const Workspace& w = A.w;
  if (!s.cg_active[b]) return;  // uniform over the block
  const int64_t n = A.n, m = A.m;
  double* p = vec;
  double* tmp = vec + m;
  double* q = tmp + n;
  double x[kCgPerThread], r[kCgPerThread], pre[kCgPerThread];
  const int64_t o = b * m;
#pragma unroll
  for (int u = 0; u < kCgPerThread; ++u) {
    const int64_t j = threadIdx.x + u * kThreads;
    x[u] = r[u] = pre[u] = 0;
    if (j < m) {
      x[u] = w.x[o + j];
      r[u] = w.r[o + j];
      pre[u] = w.precond[o + j];
      p[j] = w.p[o + j];
    }
  }
  double rz = s.rz[0][b];
  const double stop = s.cg_tol2[b] * s.rz0[b];
  const int group = threadIdx.x / kCgGroup, gl = threadIdx.x % kCgGroup;
  constexpr int kGroups = kThreads / kCgGroup;
  __syncthreads();
  for (int64_t k = 0; k < A.max_iter; ++k) {
    // tmp = D_a^-1 P_s p, then q = D_c p - P_s^T tmp.
    for (int64_t i0 = 0; i0 < n; i0 += kGroups) {
      const int64_t i = i0 + group;
      const int64_t br = b * n + i;
      const double acc = group_row_dot(i < n ? w.row_cnt[br] : 0, w.row_idx + br * m,
                                       w.row_val + br * m, p, gl);
      if (i < n && gl == 0) tmp[i] = w.inv_a[br] * acc;
    }
    __syncthreads();
    for (int64_t j0 = 0; j0 < m; j0 += kGroups) {
      const int64_t j = j0 + group;
      const int64_t bc = o + j;
      const double acc = group_row_dot(j < m ? w.col_cnt[bc] : 0, w.col_idx + bc * n,
                                       w.col_val + bc * n, tmp, gl);
      if (j < m && gl == 0) q[j] = w.c[bc] * p[j] - acc;
    }
    __syncthreads();
    double pq = 0;
#pragma unroll
    for (int u = 0; u < kCgPerThread; ++u) {
      const int64_t j = threadIdx.x + u * kThreads;
      if (j < m) pq += p[j] * q[j];
    }
    pq = block_sum<kThreads>(pq, red);
    const double alpha = pq > 0 ? rz / pq : 0.0;
    double z[kCgPerThread];
    double rz_new = 0;
#pragma unroll
    for (int u = 0; u < kCgPerThread; ++u) {
      const int64_t j = threadIdx.x + u * kThreads;
      z[u] = 0;
      if (j < m) {
        x[u] += alpha * p[j];
        r[u] -= alpha * q[j];
        z[u] = pre[u] * r[u];
        rz_new += r[u] * z[u];
      }
    }
    rz_new = block_sum<kThreads>(rz_new, red);
    const bool go_on = rz_new > stop;
    if (go_on) {
      const double beta = rz_new / rz;
#pragma unroll
      for (int u = 0; u < kCgPerThread; ++u) {
        const int64_t j = threadIdx.x + u * kThreads;
        if (j < m) p[j] = z[u] + beta * p[j];
      }
    }
    rz = rz_new;
    __syncthreads();  // p is complete before the next products read it
    if (!go_on) break;
  }
#pragma unroll
  for (int u = 0; u < kCgPerThread; ++u) {
    const int64_t j = threadIdx.x + u * kThreads;
    if (j < m) w.x[o + j] = x[u];
  }
  if (threadIdx.x == 0) s.cg_active[b] = 0;
}

}  // namespace sinkhorn_detail
}  // namespace diffkern
