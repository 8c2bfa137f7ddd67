// CUDA kernels of the finite-difference family: one launch over every tensor of the list.
// One thread per group of 4 elements (one Philox call), 256 threads per block; thread 0 of
// a block finds the block's first tensor by binary search over the descriptors' prefix
// column, and each thread walks forward from it (a block's 1024 elements rarely span more
// than one tensor). No allocation, no synchronization: everything is on `stream`.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_reduce.cuh"
#include "common/launch.h"
#include "fd_grad/fd_grad.h"
#include "fd_grad/fd_group_ops.cuh"

namespace diffkern {
namespace {

using fd::Row;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2147483647;  // grid x limit

// Terms of an update, by value in the kernel's parameters (graph-capturable, no copies).
struct Terms {
  FdTerm term[kFdMaxUpdateTerms];
  int count;
};

// This thread's group, its row, or false past the end.
__device__ __forceinline__ bool my_group(const int64_t* desc, int64_t num_rows, int64_t total,
                                         int64_t& g, Row& row) {
  __shared__ int64_t block_row;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads;
  if (threadIdx.x == 0) block_row = fd::find_row(desc, num_rows, first);
  __syncthreads();
  g = first + threadIdx.x;
  if (g >= total) return false;
  row = fd::read_row(desc, fd::advance_row(desc, num_rows, block_row, g));
  return true;
}

__global__ void __launch_bounds__(kThreads)
perturb_kernel(const int64_t* __restrict__ desc, int64_t num_rows, int64_t total, uint64_t seed,
               uint32_t k, float scale, fd::Distribution dist, const double* norm_sq) {
  int64_t g;
  Row row;
  if (!my_group(desc, num_rows, total, g, row)) return;
  const float s = fd::mul_rn(scale, fd::inverse_norm(norm_sq));
  fd::with_storage(row.dtype, row.data, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    fd::perturb_group<T>(row, g - row.first_group, seed, k, s, dist);
  });
}

__global__ void __launch_bounds__(kThreads)
update_kernel(const int64_t* __restrict__ desc, int64_t num_rows, int64_t total, Terms terms,
              float lr, float wd, fd::Distribution dist, const double* norm_sq,
              int64_t norm_stride) {
  int64_t g;
  Row row;
  if (!my_group(desc, num_rows, total, g, row)) return;
  float coeff[kFdMaxUpdateTerms];
  for (int m = 0; m < terms.count; ++m)
    coeff[m] = fd::mul_rn(terms.term[m].coeff,
                          fd::inverse_norm(norm_sq ? norm_sq + m * norm_stride : nullptr));
  fd::with_storage(row.dtype, row.data, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    fd::update_group<T>(row, g - row.first_group, terms.term, coeff, terms.count, lr, wd, dist);
  });
}

__global__ void __launch_bounds__(kThreads)
directions_kernel(uint64_t seed, uint32_t k, uint32_t t, int64_t numel, fd::Distribution dist,
                  float* __restrict__ out) {
  const int64_t groups = (numel + 3) / 4;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const fd::Float4 z = fd::group_directions(dist, seed, k, t, static_cast<uint64_t>(j));
    float x[4] = {z.v[0], z.v[1], z.v[2], z.v[3]};
    const int64_t rest = numel - 4 * j;
    fd::store_group(out, j, rest >= 4 ? 4 : static_cast<int>(rest), x);
  }
}

// Block p sums partition range p (fixed order within the block: each thread's groups in
// order, then block_sum's fixed tree), writing partials[p].
__global__ void __launch_bounds__(kThreads)
sum_sq_partials_kernel(const int64_t* __restrict__ desc, int64_t num_rows, int64_t total,
                       uint64_t seed, uint32_t k, fd::Distribution dist, double* partials) {
  __shared__ double scratch[kThreads / 32];
  const int64_t begin = fd::partition_begin(total, blockIdx.x);
  const int64_t end = fd::partition_begin(total, blockIdx.x + 1);
  double s = 0.0;
  if (begin + threadIdx.x < end) {
    int64_t r = fd::find_row(desc, num_rows, begin + threadIdx.x);
    for (int64_t g = begin + threadIdx.x; g < end; g += kThreads) {
      r = fd::advance_row(desc, num_rows, r, g);
      const Row row = fd::read_row(desc, r);
      s += fd::sum_sq_group(row, g - row.first_group, seed, k, dist);
    }
  }
  s = block_sum<kThreads>(s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[0] = the partials summed in index order by one thread (1024 additions: cheap, and the
// same order as the CPU's).
__global__ void sum_sq_total_kernel(double* out) {
  double total = 0.0;
  for (int p = 0; p < kFdSumSqPartials; ++p) total += out[1 + p];
  out[0] = total;
}

bool valid_distribution(fd::Distribution d) {
  return static_cast<int>(d) >= 0 && static_cast<int>(d) < fd::kNumDistributions;
}

bool valid_list(const int64_t* desc, int64_t num_tensors, int64_t total_groups) {
  return total_groups >= 0 && num_tensors >= 0 &&
         (total_groups == 0 || (desc && num_tensors > 0)) &&
         ceil_div(total_groups, kThreads) <= kMaxBlocks;
}

}  // namespace

Status fd_perturb_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                       uint64_t seed, uint32_t k, float scale, fd::Distribution dist,
                       const double* norm_sq, void* stream) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist))
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  perturb_kernel<<<blocks_for(total_groups, kThreads), kThreads, 0,
                   static_cast<cudaStream_t>(stream)>>>(desc, num_tensors, total_groups, seed, k,
                                                        scale, dist, norm_sq);
  return last_launch_status();
}

Status fd_update_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      const FdTerm* terms, int num_terms, float lr, float weight_decay,
                      fd::Distribution dist, const double* norm_sq, int64_t norm_stride,
                      void* stream) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) ||
      terms == nullptr || num_terms <= 0 || num_terms > kFdMaxUpdateTerms)
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  Terms t{};
  for (int m = 0; m < num_terms; ++m) t.term[m] = terms[m];
  t.count = num_terms;
  update_kernel<<<blocks_for(total_groups, kThreads), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(desc, num_tensors, total_groups, t, lr,
                                                       weight_decay, dist, norm_sq, norm_stride);
  return last_launch_status();
}

Status fd_directions_cuda(uint64_t seed, uint32_t k, uint32_t tensor_id, int64_t numel,
                          fd::Distribution dist, float* out, void* stream) {
  if (numel < 0 || !valid_distribution(dist)) return Status::invalid_argument;
  if (numel == 0) return Status::ok;
  if (out == nullptr) return Status::invalid_argument;
  int device = 0, sm_count = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const unsigned blocks = grid_stride_blocks(ceil_div(numel, 4), kThreads, sm_count);
  directions_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, k, tensor_id, numel, dist, out);
  return last_launch_status();
}

Status fd_sum_sq_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      uint64_t seed, uint32_t k, fd::Distribution dist, double* out,
                      void* stream) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) || !out)
    return Status::invalid_argument;
  const auto s = static_cast<cudaStream_t>(stream);
  sum_sq_partials_kernel<<<kFdSumSqPartials, kThreads, 0, s>>>(desc, num_tensors, total_groups,
                                                               seed, k, dist, out + 1);
  DK_CUDA_TRY(cudaGetLastError());
  sum_sq_total_kernel<<<1, 1, 0, s>>>(out);
  return last_launch_status();
}

}  // namespace diffkern
