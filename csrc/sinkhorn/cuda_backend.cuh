// The CUDA backend of the Sinkhorn driver (sinkhorn_driver.h): each primitive the driver
// asks for (sweep, reduce, sparsify, sparse product, CG) is one or two kernel launches on
// the caller's stream; the only synchronization is the driver's packed status read.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_reduce.cuh"
#include "common/launch.h"
#include "sinkhorn/cuda_cg.cuh"
#include "sinkhorn/cuda_sweep.cuh"
#include "sinkhorn/workspace.h"

namespace diffkern {
namespace sinkhorn_detail {

// Block-per-element CG up to this many dense entries per element (above, one SM per
// element is slower than the grid-wide solve) and this much shared memory (no opt-in).
constexpr int64_t kCgBlockMaxEntries = int64_t(1) << 17;
constexpr int64_t kSmallProblemEntries = int64_t(1) << 14;  // see newton_cost()
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
    batch_reduce_kernel<kReduceThreads, Term, E>
        <<<static_cast<unsigned>(B_), kReduceThreads, 0, stream_>>>(len, term, e);
    check();
  }

  template <class F>
  void for_each(int64_t len, F f) {
    const int64_t total = B_ * len;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65535));
    for_each_index_kernel<F><<<blocks, 256, 0, stream_>>>(total, len, f);
    check();
  }

  template <class F>
  void for_batch(F f) {
    for_batch_kernel<F><<<diffkern::blocks_for(B_, 128), 128, 0, stream_>>>(B_, f);
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
      const unsigned blocks = static_cast<unsigned>(B_);
      if (std::max(n_, m_) <= kCgSmallBlockMax) {
        cg_block_kernel<kCgSmallBlockThreads>
            <<<blocks, kCgSmallBlockThreads, cg_block_smem(n_, m_), stream_>>>(args);
      } else {
        cg_block_kernel<kCgBlockThreads>
            <<<blocks, kCgBlockThreads, cg_block_smem(n_, m_), stream_>>>(args);
      }
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
    status_ = first_failure(status_, cuda_status(cudaMemsetAsync(s.cg_live, 0, 2 * sizeof(int), stream_)));
    if (!status_.is_ok()) return true;
    void* params[] = {&args};
    status_ = first_failure(status_, cuda_status(cudaLaunchCooperativeKernel(
                                         reinterpret_cast<void*>(cg_fused_kernel), dim3(blocks),
                                         dim3(kCgThreads), params, 0, stream_)));
    return true;
  }

  // The only host synchronization: tolerance-mode checks read per-batch flags.
  void copy_to_host(void* dst, const void* src, size_t bytes) {
    status_ = first_failure(status_,
                            cuda_status(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_)));
    status_ = first_failure(status_, cuda_status(cudaStreamSynchronize(stream_)));
  }
  void copy_device(void* dst, const void* src, size_t bytes) {
    status_ = first_failure(status_,
                            cuda_status(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_)));
  }
  static constexpr bool kHostReadsAreFree = false;  // reading a flag costs no synchronization
  void set_eps(double eps) { eps_ = eps; }
  static constexpr int64_t cg_check_interval() { return 16; }
  // A Newton round's cost in Sinkhorn iterations (JudgeNewton, the probes). Small problems
  // (n m <= 2^14 entries per element) are launch- and latency-bound: a round's ~25 launches,
  // two host reads and a CG solve against an iteration's two launches (H200, the OT sweep's
  // n, m <= 64: 15-25 iterations). Larger ones keep the CPU's yardstick: at n = 1000 a round
  // also costs ~15 iterations, but there the stricter judge and the second probe only added
  // Sinkhorn iterations to the benchmark problems (a 10-iteration phase, or one Newton step
  // more) without saving a round, so they stay as they were measured against the peers.
  double newton_cost() const {
    return n_ * m_ <= kSmallProblemEntries ? 16.0 : kCpuNewtonCost;
  }
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
    return diffkern::blocks_for(rows, kSweepThreads / tpr);
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
  static unsigned row_blocks(int64_t rows) { return diffkern::blocks_for(rows, kWarpsPerBlock); }
  void check() { status_ = first_failure(status_, last_launch_status()); }
};

}  // namespace sinkhorn_detail
}  // namespace diffkern
