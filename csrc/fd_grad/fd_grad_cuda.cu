// CUDA kernels of the finite-difference family: one launch over every tensor of the list.
//
// perturb and update are compute-bound on the generator (10 Philox rounds per 4 elements
// and the Gaussian map) once the memory side is organised, so the layout aims at keeping
// the arithmetic units busy and loads in flight (bench/NOTES-zo.md has the measurements):
//  - one wave of blocks (as many as fit at once), each owning one contiguous range of the
//    flattened group space: no partial last wave, and each block starts with one binary
//    search over the descriptors. (The first version had one block per 1024 elements, each
//    starting with a serial binary search by thread 0 behind a __syncthreads: the kernel
//    was latency-bound at 17-22% of the copy bandwidth.)
//  - a block walks the rows its range meets; per row the storage dtype is dispatched once
//    and the groups are strided over the threads, two in flight per thread, loaded and
//    stored as one 8- or 16-byte vector each;
//  - the Gaussian table lives in shared memory (per-lane random lookups).
// No allocation, no synchronization: everything is on `stream`.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
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
constexpr int kUnroll = 2;             // groups in flight per thread (run_segment)
// At least 4 resident blocks of 256 threads per SM (caps registers at 64 per thread: the
// generator's latency is hidden by other warps, not by more registers).
constexpr int kMinBlocksPerSm = 4;

// Terms of an update, by value in the kernel's parameters (graph-capturable, no copies).
struct Terms {
  FdTerm term[kFdMaxUpdateTerms];
  int count;
};

// The Gaussian table in shared memory (random per-lane lookups; constant memory would
// serialize them), filled by the whole block; not needed for Rademacher directions.
__device__ __forceinline__ const float* shared_gaussian_table(fd::Distribution dist) {
  __shared__ float table[fd::kGaussianTableFloats];
  if (dist == fd::Distribution::gaussian) {
    const float* src = fd::gaussian_table();
    for (int i = threadIdx.x; i < fd::kGaussianTableFloats; i += blockDim.x) table[i] = src[i];
  }
  __syncthreads();
  return table;
}

// Groups [j0, j1) of one row, thread-strided across the block. Whole groups at aligned
// addresses take the vector path, two at a time (both loads in flight before the
// generator runs); the rest (a partial last group, an unaligned view) the element path.
template <class T, class Op>
__device__ __forceinline__ void run_segment(const Row& row, const void* source, int64_t j0,
                                            int64_t j1, const Op& op, const float* table) {
  using V = fd::Group4<T>;
  struct alignas(sizeof(V)) A { V g; };
  const T* src = static_cast<const T*>(source);
  T* dst = static_cast<T*>(row.data);
  int64_t j = j0 + threadIdx.x;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % sizeof(V) == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % sizeof(V) == 0;
  if (aligned) {
    const int64_t whole = j1 < row.numel / 4 ? j1 : row.numel / 4;
    for (; j + kThreads < whole; j += 2 * kThreads) {
      const V a = reinterpret_cast<const A*>(src + 4 * j)->g;
      const V b = reinterpret_cast<const A*>(src + 4 * (j + kThreads))->g;
      float xa[4], xb[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        xa[l] = to_compute(a.v[l]);
        xb[l] = to_compute(b.v[l]);
      }
      op(row, j, table, xa);
      op(row, j + kThreads, table, xb);
      A oa, ob;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        oa.g.v[l] = from_compute<T>(xa[l]);
        ob.g.v[l] = from_compute<T>(xb[l]);
      }
      *reinterpret_cast<A*>(dst + 4 * j) = oa;
      *reinterpret_cast<A*>(dst + 4 * (j + kThreads)) = ob;
    }
  }
  for (; j < j1; j += kThreads) {
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int count = fd::load_group(src, row.numel, j, x);
    op(row, j, table, x);
    fd::store_group(dst, j, count, x);
  }
}

// Runs op(row, j, table, x) on every group of block b's range [b * per_block, ...), x
// holding the group's elements as float read from the row's source (op rewrites them; they
// are stored into the row). The block walks the rows its range meets, the storage dtype
// dispatched once per row.
template <class Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
groups_kernel(const int64_t* __restrict__ desc, const int64_t* __restrict__ sources,
              int64_t num_rows, int64_t total, int64_t per_block, Op op) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < total ? begin + per_block : total;
  const float* table = shared_gaussian_table(op.dist);
  if (begin >= end) return;
  op.prepare();  // per-launch scalars that read device memory (sphere norms)
  int64_t r = fd::find_row(desc, num_rows, begin);
  for (int64_t g = begin; g < end && r < num_rows; ++r) {
    const Row row = fd::read_row(desc, r);
    const int64_t row_end = row.first_group + (row.numel + 3) / 4;
    const int64_t seg_end = row_end < end ? row_end : end;
    if (seg_end <= g) continue;  // an empty row
    const void* source = fd::row_source(sources, r, row);
    const int64_t j0 = g - row.first_group, j1 = seg_end - row.first_group;
    switch (static_cast<DType>(row.dtype)) {
      case DType::float16: run_segment<Float16>(row, source, j0, j1, op, table); break;
      case DType::bfloat16: run_segment<BFloat16>(row, source, j0, j1, op, table); break;
      case DType::float32: run_segment<float>(row, source, j0, j1, op, table); break;
      default: break;  // refused by the bindings
    }
    g = seg_end;
  }
}

struct PerturbOp {
  uint64_t seed;
  uint32_t k;
  float scale;
  fd::Distribution dist;
  const double* norm_sq;
  float s;
  __device__ __forceinline__ void prepare() { s = fd::mul_rn(scale, fd::inverse_norm(norm_sq)); }
  __device__ __forceinline__ void operator()(const Row& row, int64_t j, const float* table,
                                             float (&x)[4]) const {
    fd::perturb_values(row, j, seed, k, s, dist, table, x);
  }
};

struct UpdateOp {
  Terms terms;
  float lr, wd;
  fd::Distribution dist;
  const double* norm_sq;
  int64_t norm_stride;
  // The terms stay in the kernel's parameter space (read-only: a per-thread copy of 64
  // terms would live in local memory); sphere directions rescale each coefficient by its
  // inverse norm where it is used.
  __device__ __forceinline__ void prepare() {}
  __device__ __forceinline__ void operator()(const Row& row, int64_t j, const float* table,
                                             float (&x)[4]) const {
    fd::update_values(row, j, terms.term, terms.count, lr, wd, dist, norm_sq, norm_stride, table,
                      x);
  }
};

// Grid of the groups kernels: exactly one wave (every block resident at once, each owning
// an equal whole number of passes), so no SM idles through a partial last wave.
struct GroupsGrid {
  unsigned blocks;
  int64_t per_block;
};
template <class Op>
Status groups_grid(int64_t total, GroupsGrid& grid) {
  int device = 0, sm_count = 0, per_sm = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  DK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, groups_kernel<Op>,
                                                             kThreads, 0));
  constexpr int64_t pass = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t passes = ceil_div(total, pass);
  const int64_t wave = static_cast<int64_t>(sm_count) * std::max(per_sm, 1);
  const int64_t blocks = std::min<int64_t>(passes, wave);
  grid.per_block = ceil_div(passes, blocks) * pass;
  grid.blocks = static_cast<unsigned>(ceil_div(total, grid.per_block));
  return Status::ok;
}

__global__ void __launch_bounds__(kThreads)
directions_kernel(uint64_t seed, uint32_t k, uint32_t t, int64_t numel, fd::Distribution dist,
                  float* __restrict__ out) {
  const int64_t groups = (numel + 3) / 4;
  const float* table = shared_gaussian_table(dist);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const fd::Float4 z = fd::group_directions(dist, seed, k, t, static_cast<uint64_t>(j), table);
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
  const float* table = shared_gaussian_table(dist);
  const int64_t begin = fd::partition_begin(total, blockIdx.x);
  const int64_t end = fd::partition_begin(total, blockIdx.x + 1);
  double s = 0.0;
  if (begin + threadIdx.x < end) {
    int64_t r = fd::find_row(desc, num_rows, begin + threadIdx.x);
    for (int64_t g = begin + threadIdx.x; g < end; g += kThreads) {
      r = fd::advance_row(desc, num_rows, r, g);
      const Row row = fd::read_row(desc, r);
      s += fd::sum_sq_group(row, g - row.first_group, seed, k, dist, table);
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
         (total_groups == 0 || (desc && num_tensors > 0));
}

}  // namespace

Status fd_perturb_cuda(const int64_t* desc, const int64_t* sources, int64_t num_tensors,
                       int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                       fd::Distribution dist, const double* norm_sq, void* stream) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist))
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  GroupsGrid grid;
  const Status st = groups_grid<PerturbOp>(total_groups, grid);
  if (st != Status::ok) return st;
  groups_kernel<<<grid.blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      desc, sources, num_tensors, total_groups, grid.per_block,
      PerturbOp{seed, k, scale, dist, norm_sq, 0.0f});
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
  GroupsGrid grid;
  const Status st = groups_grid<UpdateOp>(total_groups, grid);
  if (st != Status::ok) return st;
  groups_kernel<<<grid.blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      desc, nullptr, num_tensors, total_groups, grid.per_block,
      UpdateOp{t, lr, weight_decay, dist, norm_sq, norm_stride});
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
