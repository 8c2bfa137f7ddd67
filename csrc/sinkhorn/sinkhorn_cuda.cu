// CUDA backend of the Sinkhorn family. The control flow is the shared driver
// (sinkhorn_driver.h); here each primitive is a kernel. Rows (of C or of C^T) are handled by
// one warp each: lanes read consecutive entries (coalesced), then merge by shuffles.
// Per-batch sums are block reductions in a fixed order, so results are deterministic.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_driver.h"
#include "sinkhorn/workspace.h"

namespace diffkern {
namespace sinkhorn_detail {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kReduceThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
namespace cg = cooperative_groups;

// A row of K entries is swept by kTpr threads (kTpr/32 warps), 256 threads per block.
// Short rows are latency-bound: one warp per 1000-entry row keeps only one load in flight
// per lane and 32 dependent exp/add steps (measured 15 us per sweep at n = 1000 on an
// H200); more threads per row and four loads issued before use hide that latency.
constexpr int kSweepThreads = 256;

// The rows of one sweep: row r of the (rows = B*R, K) matrix gets LSE_k(log_plan) and its
// finish_row update.
template <class T>
struct SweepArgs {
  const T* mat;
  int64_t R, K, rows;
  const double* own;
  const double* other;
  const double* w;
  SweepMode mode;
  double eps;
  double* out_pot;
  double* out_sum;
  double* out_term;
  const int* mask;
};

// Sweeps the kSweepThreads / kTpr rows of row block `block` (all threads of the block call).
// Reads own/other through the read-only path: nothing in the same launch writes them.
template <class T, int kTpr>
__device__ __forceinline__ void sweep_row_block(int64_t block, const SweepArgs<T>& A) {
  constexpr int kRowsPerBlock = kSweepThreads / kTpr;
  constexpr int kWarpsPerRow = kTpr / 32;
  __shared__ double s_mx[kRowsPerBlock][kWarpsPerRow];
  __shared__ double s_sum[kRowsPerBlock][kWarpsPerRow];
  const T* __restrict__ mat = A.mat;
  const double* __restrict__ own = A.own;
  const double* __restrict__ other = A.other;
  const int64_t R = A.R, K = A.K, rows = A.rows;
  const double eps = A.eps;
  const int local_row = threadIdx.x / kTpr;
  const int t = threadIdx.x % kTpr;
  const int64_t br = block * kRowsPerBlock + local_row;
  const int* __restrict__ mask = A.mask;
  const bool live = br < rows && mask[br / R];
  const double inv_eps = 1.0 / eps;
  const double o = (live && own) ? own[br] : 0.0;
  LogSumExp acc, acc2;
  if (live && o != -INFINITY) {
    const int64_t b = br / R;
    const T* row = mat + br * K;
    const double* oth = other + b * K;
    for (int64_t k0 = t; k0 < K; k0 += 4 * kTpr) {
      double x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t k = k0 + u * kTpr;
        // Nothing in this launch writes the cost or the other potential: read-only path.
        x[u] = k < K ? log_plan(o, __ldg(oth + k), static_cast<double>(__ldg(row + k)), inv_eps)
                     : -INFINITY;
      }
      acc.add<T>(x[0]);
      acc2.add<T>(x[1]);
      acc.add<T>(x[2]);
      acc2.add<T>(x[3]);
    }
  }
  acc.merge(acc2.mx, acc2.sum);
  for (int off = 16; off > 0; off /= 2) {
    const double mx = __shfl_xor_sync(kFull, acc.mx, off);
    const double sm = __shfl_xor_sync(kFull, acc.sum, off);
    acc.merge(mx, sm);
  }
  if constexpr (kWarpsPerRow > 1) {
    if (t % 32 == 0) {
      s_mx[local_row][t / 32] = acc.mx;
      s_sum[local_row][t / 32] = acc.sum;
    }
    __syncthreads();
    if (t == 0) {
      for (int wi = 1; wi < kWarpsPerRow; ++wi) acc.merge(s_mx[local_row][wi], s_sum[local_row][wi]);
    }
  }
  if (live && t == 0) {
    finish_row(A.mode, acc.value(), A.w[br], eps, A.out_pot ? A.out_pot + br : nullptr,
               A.out_sum ? A.out_sum + br : nullptr, A.out_term + br);
  }
}

template <class T, int kTpr>
__global__ void __launch_bounds__(kSweepThreads) sweep_kernel(SweepArgs<T> A) {
  sweep_row_block<T, kTpr>(blockIdx.x, A);
}

template <class T>
__global__ void sparsify_kernel(const T* __restrict__ mat, int64_t R, int64_t K, int64_t rows,
                                const double* __restrict__ own, const double* __restrict__ other,
                                const double* __restrict__ thr_own,
                                const double* __restrict__ thr_other,
                                const double* __restrict__ log_delta, double eps, int64_t* cnt,
                                int32_t* idx, float* val, const int* __restrict__ mask) {
  const int64_t br = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (br >= rows) return;
  const int64_t b = br / R;
  if (!mask[b]) return;
  const double inv_eps = 1.0 / eps;
  const T* row = mat + br * K;
  const double* oth = other + b * K;
  const double* thr = thr_other + b * K;
  const double o = own[br], to = thr_own[br], ld = log_delta[b];
  int32_t* out_idx = idx + br * K;
  float* out_val = val + br * K;
  int64_t base = 0;
  // Chunks of 32 consecutive entries; a ballot compacts the kept ones in column order.
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const int64_t k = k0 + lane;
    bool keep = false;
    double lp = 0;
    if (k < K) {
      lp = log_plan(o, oth[k], static_cast<double>(row[k]), inv_eps);
      keep = lp >= ld + fmin(to, thr[k]) && lp > kMinLogKept;
    }
    const unsigned ballot = __ballot_sync(kFull, keep);
    if (keep) {
      const int64_t pos = base + __popc(ballot & ((1u << lane) - 1u));
      out_idx[pos] = static_cast<int32_t>(k);
      out_val[pos] = static_cast<float>(exp(lp));
    }
    base += __popc(ballot);
  }
  if (lane == 0) cnt[br] = base;
}

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
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(kFull, acc, off);
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

// Sum over the block (blockDim.x == kThreads), result broadcast to every thread.
constexpr int kCgThreads = 512;
template <int kThreads = kCgThreads>
__device__ double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];  // same order everywhere
  return total;
}

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
  pq = block_sum(pq, shared);
  const double alpha = pq > 0 ? s.rz[cur][b] / pq : 0.0;
  double rz = 0;
  for (int64_t j = threadIdx.x; j < m; j += kCgThreads) {
    const int64_t k = o + j;
    x[k] += alpha * p[k];
    r[k] -= alpha * q[k];
    z[k] = precond[k] * r[k];
    rz += r[k] * z[k];
  }
  rz = block_sum(rz, shared);
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
constexpr int kCgBlockThreads = 1024;
constexpr int kCgPerThread = 2;  // vector entries per thread: m <= 2048
constexpr int kCgGroup = 8;

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

__global__ void __launch_bounds__(kCgBlockThreads) cg_block_kernel(CgFusedArgs A) {
  extern __shared__ double vec[];
  __shared__ double red[kCgBlockThreads / 32];
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
    const int64_t j = threadIdx.x + u * kCgBlockThreads;
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
  constexpr int kGroups = kCgBlockThreads / kCgGroup;
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
      const int64_t j = threadIdx.x + u * kCgBlockThreads;
      if (j < m) pq += p[j] * q[j];
    }
    pq = block_sum<kCgBlockThreads>(pq, red);
    const double alpha = pq > 0 ? rz / pq : 0.0;
    double z[kCgPerThread];
    double rz_new = 0;
#pragma unroll
    for (int u = 0; u < kCgPerThread; ++u) {
      const int64_t j = threadIdx.x + u * kCgBlockThreads;
      z[u] = 0;
      if (j < m) {
        x[u] += alpha * p[j];
        r[u] -= alpha * q[j];
        z[u] = pre[u] * r[u];
        rz_new += r[u] * z[u];
      }
    }
    rz_new = block_sum<kCgBlockThreads>(rz_new, red);
    const bool go_on = rz_new > stop;
    if (go_on) {
      const double beta = rz_new / rz;
#pragma unroll
      for (int u = 0; u < kCgPerThread; ++u) {
        const int64_t j = threadIdx.x + u * kCgBlockThreads;
        if (j < m) p[j] = z[u] + beta * p[j];
      }
    }
    rz = rz_new;
    __syncthreads();  // p is complete before the next products read it
    if (!go_on) break;
  }
#pragma unroll
  for (int u = 0; u < kCgPerThread; ++u) {
    const int64_t j = threadIdx.x + u * kCgBlockThreads;
    if (j < m) w.x[o + j] = x[u];
  }
  if (threadIdx.x == 0) s.cg_active[b] = 0;
}

// One block per batch element: sums term(b, k) over k < len (and |term|), in a fixed order,
// then epilogue(b, sum, abs_sum).
template <class Term, class E>
__global__ void reduce_kernel(int64_t len, Term term, E epilogue) {
  __shared__ double s_sum[kReduceThreads];
  __shared__ double s_abs[kReduceThreads];
  const int64_t b = blockIdx.x;
  double sum = 0, abs_sum = 0;
  for (int64_t k = threadIdx.x; k < len; k += kReduceThreads) {
    const double x = term(b, k);
    sum += x;
    abs_sum += fabs(x);
  }
  s_sum[threadIdx.x] = sum;
  s_abs[threadIdx.x] = abs_sum;
  __syncthreads();
  for (int step = kReduceThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + step];
      s_abs[threadIdx.x] += s_abs[threadIdx.x + step];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) epilogue(b, s_sum[0], s_abs[0]);
}

template <class F>
__global__ void for_each_kernel(int64_t total, int64_t len, F f) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    f(t / len, t % len);
}

template <class F>
__global__ void for_batch_kernel(int64_t batch, F f) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch) f(b);
}

// Block-per-element CG up to this many dense entries per element (above, one SM per
// element is slower than the grid-wide solve) and this much shared memory (no opt-in).
constexpr int64_t kCgBlockMaxEntries = int64_t(1) << 17;
constexpr size_t kCgBlockMaxSmem = 40 * 1024;

class CudaBackend {
 public:
  CudaBackend(int64_t batch, int64_t n, int64_t m, double eps, cudaStream_t stream)
      : B_(batch), n_(n), m_(m), eps_(eps), stream_(stream) {}

  template <class T>
  void sweep(const T* mat, int64_t R, int64_t K, const double* own, const double* other,
             const double* w, SweepMode mode, double* out_pot, double* out_sum, double* out_term,
             const int* mask) {
    const SweepArgs<T> A{mat, R, K, B_ * R, own, other, w, mode, eps_, out_pot, out_sum,
                         out_term, mask};
    with_threads_per_row(R, K, [&](auto tag) {
      constexpr int kTpr = decltype(tag)::value;
      sweep_kernel<T, kTpr><<<blocks_for(A.rows, kTpr), kSweepThreads, 0, stream_>>>(A);
    });
    check();
  }

  template <class Term, class E>
  void reduce(int64_t len, Term term, E e) {
    reduce_kernel<Term, E><<<static_cast<unsigned>(B_), kReduceThreads, 0, stream_>>>(len, term, e);
    check();
  }

  template <class F>
  void for_each(int64_t len, F f) {
    const int64_t total = B_ * len;
    const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
    for_each_kernel<F><<<static_cast<unsigned>(blocks), 256, 0, stream_>>>(total, len, f);
    check();
  }

  template <class F>
  void for_batch(F f) {
    for_batch_kernel<F><<<static_cast<unsigned>((B_ + 127) / 128), 128, 0, stream_>>>(B_, f);
    check();
  }

  template <class T>
  void sparsify(const T* mat, int64_t R, int64_t K, const double* own, const double* other,
                const double* thr_own, const double* thr_other, const double* log_delta,
                int64_t* cnt, int32_t* idx, float* val, const int* mask) {
    const int64_t rows = B_ * R;
    sparsify_kernel<T><<<row_blocks(rows), kWarpsPerBlock * 32, 0, stream_>>>(
        mat, R, K, rows, own, other, thr_own, thr_other, log_delta, eps_, cnt, idx, val, mask);
    check();
  }

  void spmv(const int64_t* cnt, const int32_t* idx, const float* val, int64_t R, int64_t K,
            const double* x, bool square, double* y, const int* mask) {
    SpmvTerms t;
    t.square = square;
    launch_spmv(cnt, idx, val, R, K, x, t, y, mask);
  }

  // q = c p - P_s^T D_a^-1 P_s p (two launches; tmp holds D_a^-1 P_s p).
  void schur_product(const Workspace& w, const double* p, const int* mask) {
    SpmvTerms rows;
    rows.scale = w.inv_a;
    launch_spmv(w.row_cnt, w.row_idx, w.row_val, n_, m_, p, rows, w.tmp, mask);
    SpmvTerms cols;
    cols.diag = w.c;
    cols.xd = p;
    cols.sign = -1.0;
    launch_spmv(w.col_cnt, w.col_idx, w.col_val, m_, n_, w.tmp, cols, w.q, mask);
  }

  void cg_step(const BatchScalars& s, const Workspace& w, int64_t m, int cur) {
    cg_step_kernel<<<static_cast<unsigned>(B_), kCgThreads, 0, stream_>>>(s, w.x, w.r, w.z, w.p,
                                                                          w.q, w.precond, m, cur);
    check();
  }

  // The whole CG solve in one launch; false when that is not possible (then the driver
  // issues the per-iteration kernels). Small problems: one block per batch element (any
  // mode). Otherwise, tolerance mode only: one cooperative grid-wide launch.
  bool cg_fused(const BatchScalars& s, const Workspace& w, int64_t max_iter, bool fixed) {
    CgFusedArgs args{s, w, B_, n_, m_, max_iter};
    if (m_ <= kCgPerThread * kCgBlockThreads && n_ * m_ <= kCgBlockMaxEntries &&
        cg_block_smem(n_, m_) <= kCgBlockMaxSmem) {
      cg_block_kernel<<<static_cast<unsigned>(B_), kCgBlockThreads, cg_block_smem(n_, m_),
                        stream_>>>(args);
      check();
      return true;
    }
    if (fixed) return false;
    if (fused_blocks_ < 0) {
      fused_blocks_ = cooperative_blocks(reinterpret_cast<const void*>(cg_fused_kernel),
                                         kCgThreads);
    }
    if (fused_blocks_ <= 0) return false;
    const int64_t warps = std::max(B_ * n_, B_ * m_);
    const int64_t want = std::max<int64_t>((warps + kCgThreads / 32 - 1) / (kCgThreads / 32), B_);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, fused_blocks_));
    if (cudaMemsetAsync(s.cg_live, 0, 2 * sizeof(int), stream_) != cudaSuccess) {
      status_ = Status::cuda_error;
      return true;
    }
    void* params[] = {&args};
    if (cudaLaunchCooperativeKernel(reinterpret_cast<void*>(cg_fused_kernel), dim3(blocks),
                                    dim3(kCgThreads), params, 0, stream_) != cudaSuccess)
      status_ = Status::cuda_error;
    return true;
  }

  // The only host synchronization: tolerance-mode checks read per-batch flags.
  void copy_to_host(void* dst, const void* src, size_t bytes) {
    if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_) != cudaSuccess ||
        cudaStreamSynchronize(stream_) != cudaSuccess)
      status_ = Status::cuda_error;
  }
  void copy_device(void* dst, const void* src, size_t bytes) {
    if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_) != cudaSuccess)
      status_ = Status::cuda_error;
  }
  static constexpr bool kHostReadsAreFree = false;  // reading a flag costs no synchronization
  void set_eps(double eps) { eps_ = eps; }
  static constexpr int64_t cg_check_interval() { return 16; }
  Status status() const { return status_; }

 private:
  int64_t B_, n_, m_;
  double eps_;
  cudaStream_t stream_;
  Status status_ = Status::ok;
  int fused_blocks_ = -1;  // co-resident blocks of cg_fused_kernel; 0: no cooperative launch

  void launch_spmv(const int64_t* cnt, const int32_t* idx, const float* val, int64_t R, int64_t K,
                   const double* x, const SpmvTerms& t, double* y, const int* mask) {
    const int64_t rows = B_ * R;
    spmv_kernel<<<row_blocks(rows), kWarpsPerBlock * 32, 0, stream_>>>(cnt, idx, val, R, K, rows,
                                                                     x, t, y, mask);
    check();
  }
  // Threads per row of a (B*R, K) sweep: ~8 entries each (at least a warp, at most the
  // block), fewer when there are so many rows that the GPU is full anyway. Calls
  // go(std::integral_constant<int, kTpr>).
  template <class Go>
  void with_threads_per_row(int64_t R, int64_t K, Go go) const {
    const int64_t rows = B_ * R;
    int tpr = 32;
    while (tpr < kSweepThreads && tpr * 8 < K && rows * tpr < (int64_t(1) << 20)) tpr *= 2;
    switch (tpr) {
      case 32: go(std::integral_constant<int, 32>{}); break;
      case 64: go(std::integral_constant<int, 64>{}); break;
      case 128: go(std::integral_constant<int, 128>{}); break;
      default: go(std::integral_constant<int, 256>{}); break;
    }
  }
  static unsigned blocks_for(int64_t rows, int tpr) {
    const int64_t per_block = kSweepThreads / tpr;
    return static_cast<unsigned>((rows + per_block - 1) / per_block);
  }
  // Blocks of `kernel` that fit on the device at once (the cooperative-launch limit);
  // 0 when the device cannot launch cooperatively.
  static int cooperative_blocks(const void* kernel, int threads) {
    int dev = 0, sms = 0, coop = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) !=
            cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return coop ? sms * per_sm : 0;
  }
  static unsigned row_blocks(int64_t rows) {
    return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  }
  void check() {
    if (status_ == Status::ok) status_ = last_launch_status();
  }
};

}  // namespace
}  // namespace sinkhorn_detail

Status sinkhorn_solve_cuda(const SinkhornProblem& p, const SinkhornOptions& o,
                           const SinkhornState& s, void* workspace, void* stream) {
  using namespace sinkhorn_detail;
  if (p.batch < 1 || p.n < 1 || p.m < 1 || !(p.eps > 0) || !p.cost || !p.cost_t || !p.a ||
      !p.b || !s.f || !s.g || !workspace)
    return Status::invalid_argument;
  if (p.n > INT32_MAX || p.m > INT32_MAX || p.batch > INT32_MAX) return Status::invalid_argument;
  Workspace w;
  layout_workspace(p, o, workspace, &w);
  CudaBackend bk(p.batch, p.n, p.m, p.eps, static_cast<cudaStream_t>(stream));
  return dispatch_float(p.cost_dtype, [&](auto t) {
    using T = decltype(t);
    Driver<CudaBackend, T> driver(bk, p, o, s, w);
    return driver.run();
  });
}

}  // namespace diffkern
