// CUDA kernels of the finite-difference family: one launch over every tensor of the list.
//
// perturb and update are bounded by the generator (10 Philox rounds per 8 elements) and the
// memory traffic once the memory side is organised, so the layout aims at keeping the
// arithmetic units busy and loads in flight (bench/NOTES-zo.md has the measurements):
//  - one wave of blocks (as many as fit at once), each owning one contiguous range of the
//    flattened group space: no partial last wave, and each block starts with one binary
//    search over the descriptors. (The first version had one block per 1024 elements, each
//    starting with a serial binary search by thread 0 behind a __syncthreads: the kernel
//    was latency-bound at 17-22% of the copy bandwidth.)
//  - a block walks the rows its range meets; per row the storage dtype is dispatched once;
//    a row whose source and destination are 16-byte aligned moves as 16-byte units (a group
//    of 8 elements is one unit of 16-bit elements, two of float32; fd_vector_io.cuh),
//    thread-strided with 32-bit indices, two units per thread and step, the next step's
//    units loaded before this step's generator runs; a partial last group, and rows at an
//    odd address (a view), go element-wise;
//  - the distribution and the kind of Gaussian table are template parameters (no per-group
//    dispatch; the Rademacher kernels neither fill nor reserve a table);
//  - the Gaussian table lives in dynamic shared memory (per-lane random lookups). The
//    perturb / update kernels use the signed table (2^16 float16 z, 128 KB: one lookup and
//    one conversion per element) with one block of 768 threads per SM, where a block may
//    have 128 KB (sm_80, sm_90); elsewhere (sm_86 / sm_89: 99 KB), and for the directions
//    and sum-of-squares kernels, the 2^15 float16 magnitudes (64 KB) with blocks of 256, 3
//    per SM. Rademacher kernels: blocks of 256, 4 per SM (3 for the update). The signed
//    table at 768 x 1 took the OPT-1.3B fp16 perturb from 84.4% to 90.3% of the copy
//    bandwidth in bench/cpp/experiments/fd_perturb_variants.cu (bench/NOTES-zo.md).
// No allocation, no synchronization: everything is on `stream`. Short lists travel by
// value in the kernel's parameters (RowList).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_reduce.cuh"
#include "common/launch.h"
#include "fd_grad/fd_grad.h"
#include "fd_grad/fd_group_ops.cuh"
#include "fd_grad/fd_vector_io.cuh"

namespace diffkern {
namespace {

using fd::Distribution;
using fd::Row;

// The Gaussian table a kernel keeps in shared memory: none (Rademacher), the 2^15 float16
// magnitudes of gaussian_table.h as they are (64 KB), or the 2^16 signed float16 z built
// from them (fd::SignedGaussianTable, 128 KB).
enum class SmemTable { none, magnitude, signed_z };
template <SmemTable Tb>
constexpr size_t kTableBytes = Tb == SmemTable::signed_z    ? 2 * sizeof(fd::GaussianTable)
                               : Tb == SmemTable::magnitude ? sizeof(fd::GaussianTable)
                                                            : 0;
// What the kernels that read a table get: a SignedGaussianTable, or the magnitudes'
// address (null without a table).
template <SmemTable Tb>
using TableRef =
    std::conditional_t<Tb == SmemTable::signed_z, fd::SignedGaussianTable, const uint16_t*>;
// The directions and sum-of-squares kernels keep the magnitude table: their many blocks of
// 256 threads each fill one (the grid-stride directions, sum_sq's fixed partition whose
// block size fixes its summation order).
template <Distribution D>
constexpr SmemTable kMagnitudeTable = D == Distribution::gaussian ? SmemTable::magnitude
                                                                  : SmemTable::none;

constexpr int kThreads = 256;  // per block, but in the groups kernels with the signed table
constexpr int kStepUnits = 2;  // 16-byte units per thread per step (run_units, groups_grid)
// Groups per thread per step: 2 of 16-bit elements, 1 of float32.
template <class T>
constexpr int kStepGroups = kStepUnits / fd::kGroupUnits<T>;
// Threads per block and resident blocks per SM the groups kernels are compiled for (the
// register cap: the generator's latency is hidden by other warps, not by more registers).
// With the signed table, one block of 768 per SM: one 128 KB table per SM (227 KB on
// sm_90), the same 85-register cap as 3 x 256. With the magnitude table, 3 blocks of 256,
// what 64 KB per block allows. Rademacher: 4 of 256 (64 registers) for the perturb, 3 for
// the update, which spilled 168 bytes at 64 (nvcc 13.0, sm_90: its loop over the terms
// keeps 8 sums live); at 3 blocks (80 registers: ptxas allocates in steps of 8) it still
// spills 4 bytes (-Xptxas -v, nvcc 13.0, sm_90).
template <SmemTable Tb>
constexpr int kGroupThreads = Tb == SmemTable::signed_z ? 768 : kThreads;
template <SmemTable Tb, bool kUpdate>
constexpr int kMinBlocksPerSm = Tb == SmemTable::signed_z    ? 1
                                : Tb == SmemTable::magnitude ? 3
                                : kUpdate                    ? 3
                                                             : 4;

// Terms of an update, by value in the kernel's parameters (graph-capturable, no copies).
struct Terms {
  FdTerm term[kFdMaxUpdateTerms];
  int count;
};

// The tensor list of a launch: a descriptor array (and source pointers) in device memory,
// or up to kFdInlineRows rows copied into the kernel's parameters by the host. Kernels take
// it as a __grid_constant__ parameter, so pointing into it reads the parameter space
// directly (no per-thread copy); rows are read once per block and segment.
struct RowList {
  const int64_t* desc;     // device rows, unless inline_rows
  const int64_t* sources;  // device source pointers or null (in place), unless inline_rows
  int64_t num_rows;
  bool inline_rows;
  bool inline_sources_given;
  int64_t inline_desc[kFdInlineRows * kFdDescriptorColumns];
  int64_t inline_sources[kFdInlineRows];

  __device__ __forceinline__ const int64_t* rows() const { return inline_rows ? inline_desc : desc; }
  __device__ __forceinline__ const int64_t* source_pointers() const {
    if (!inline_rows) return sources;
    return inline_sources_given ? inline_sources : nullptr;
  }
};

Status make_row_list(const int64_t* desc, const int64_t* sources, int64_t num_rows,
                     FdRowsIn rows_in, RowList& list) {
  std::memset(&list, 0, sizeof list);
  list.num_rows = num_rows;
  if (rows_in == FdRowsIn::device) {
    list.desc = desc;
    list.sources = sources;
    return Status::ok;
  }
  if (rows_in != FdRowsIn::host || num_rows > kFdInlineRows) return Status::invalid_argument;
  list.inline_rows = true;
  if (num_rows > 0)
    std::memcpy(list.inline_desc, desc, sizeof(int64_t) * kFdDescriptorColumns * num_rows);
  if (sources != nullptr && num_rows > 0) {
    list.inline_sources_given = true;
    std::memcpy(list.inline_sources, sources, sizeof(int64_t) * num_rows);
  }
  return Status::ok;
}

// The 16-byte piece `m` of magnitudes (8 float16) with every sign bit set: the negative
// half of the signed table.
__device__ __forceinline__ uint4 negated(uint4 m) {
  constexpr uint32_t kSigns = 0x80008000u;
  return make_uint4(m.x | kSigns, m.y | kSigns, m.z | kSigns, m.w | kSigns);
}

// The kernel's Gaussian table in dynamic shared memory (random per-lane lookups; constant
// memory would serialize them), filled by the whole block in 16-byte pieces from the global
// magnitude table, the single source (the signed table: entries m and m + 2^15 are
// magnitude m without and with the sign bit). A fill per block costs little where it
// matters: the signed-table kernels run one block per SM, so a launch reads 64 KB per SM
// from L2 (8.4 MB on an H200's 132 SMs) against the 2 x 2.6 GB an OPT-1.3B fp16 perturb
// reads and writes. Rademacher kernels have none and launch without the shared memory.
template <SmemTable Tb>
__device__ __forceinline__ TableRef<Tb> shared_gaussian_table() {
  if constexpr (Tb == SmemTable::none) {
    return nullptr;
  } else {
    extern __shared__ __align__(16) unsigned char fd_dynamic_smem[];
    uint4* table = reinterpret_cast<uint4*>(fd_dynamic_smem);
    const uint4* src = reinterpret_cast<const uint4*>(fd::gaussian_table());
    constexpr int kPieces = static_cast<int>(sizeof(fd::GaussianTable) / sizeof(uint4));
    for (int i = threadIdx.x; i < kPieces; i += blockDim.x) {
      const uint4 m = src[i];
      table[i] = m;
      if constexpr (Tb == SmemTable::signed_z) table[kPieces + i] = negated(m);
    }
    __syncthreads();
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(table);
    if constexpr (Tb == SmemTable::signed_z) return fd::SignedGaussianTable{bits};
    else return bits;
  }
}

// Lets Kernel use its table's dynamic shared memory (past the 48 KB default) on the
// current device: once per device and kernel (a bit per device ordinal; the attribute is
// per function and device, and setting it is not a stream operation, so it is done before
// any capture).
template <SmemTable Tb, auto Kernel>
Status allow_table() {
  if constexpr (kTableBytes<Tb> > 0) {
    static std::atomic<uint64_t> done{0};
    int device = 0;
    DK_CUDA_TRY(cudaGetDevice(&device));
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit == 0 || !(done.load(std::memory_order_acquire) & bit)) {
      DK_CUDA_TRY(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kTableBytes<Tb>)));
      done.fetch_or(bit, std::memory_order_acq_rel);
    }
  }
  return Status::ok;
}

// Groups [a, b) of one row, element-wise (a partial last group, a row at an odd address),
// by a block of kThr threads.
template <int kThr, class T, class Op, class Table>
__device__ __forceinline__ void run_groups(const Row& row, const T* src, T* dst, int64_t a,
                                           int64_t b, const Op& op, const Table& table) {
  for (int64_t j = a + threadIdx.x; j < b; j += kThr) {
    float x[fd::kGroupElems] = {};
    const int count = fd::load_group(src, row.numel, j, x);
    op(row, j, table, x);
    fd::store_group(dst, j, count, x);
  }
}

// The `groups` whole groups from group j_begin of a row (src and dst 16-byte aligned), as
// 16-byte units: each thread takes kStepGroups groups per step (kStepUnits units, the
// groups kThr apart), loading the next step's units before running the generator on
// this step's. Indices are 32-bit within chunks of 2^30 groups.
template <int kThr, class T>
__device__ __forceinline__ void load_step(const uint4* s, uint32_t n, uint32_t g,
                                          uint4 (&v)[kStepUnits]) {
  constexpr int S = kStepGroups<T>, GU = fd::kGroupUnits<T>;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const uint32_t gi = g + i * kThr;
    if (gi < n) {
#pragma unroll
      for (int q = 0; q < GU; ++q) v[i * GU + q] = fd::load_unit(s + static_cast<size_t>(gi) * GU + q);
    }
  }
}

template <int kThr, class T, class Op, class Table>
__device__ __forceinline__ void run_units(const Row& row, const T* src, T* dst, int64_t j_begin,
                                          int64_t groups, const Op& op, const Table& table) {
  constexpr int S = kStepGroups<T>, GU = fd::kGroupUnits<T>, E = fd::kUnitElems<T>;
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t done = 0; done < groups; done += kChunk) {
    const uint32_t n = static_cast<uint32_t>(groups - done < kChunk ? groups - done : kChunk);
    const int64_t jc = j_begin + done;
    const uint4* s = reinterpret_cast<const uint4*>(src + fd::kGroupElems * jc);
    uint4* d = reinterpret_cast<uint4*>(dst + fd::kGroupElems * jc);
    uint4 cur[kStepUnits];
    uint32_t g = threadIdx.x;
    load_step<kThr, T>(s, n, g, cur);
    for (; g < n; g += S * kThr) {
      uint4 next[kStepUnits];
      load_step<kThr, T>(s, n, g + S * kThr, next);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const uint32_t gi = g + i * kThr;
        if (gi < n) {
          float x[fd::kGroupElems];
#pragma unroll
          for (int q = 0; q < GU; ++q)
            fd::unpack_unit<T>(cur[i * GU + q], *reinterpret_cast<float(*)[E]>(x + q * E));
          op(row, jc + gi, table, x);
#pragma unroll
          for (int q = 0; q < GU; ++q)
            fd::store_unit(d + static_cast<size_t>(gi) * GU + q,
                           fd::pack_unit<T>(*reinterpret_cast<float(*)[E]>(x + q * E)));
        }
      }
#pragma unroll
      for (int i = 0; i < kStepUnits; ++i) cur[i] = next[i];
    }
  }
}

// Groups [j0, j1) of one row: the whole groups as units when source and destination are
// 16-byte aligned (a group is 16 or 32 bytes, so then every group is), the partial last
// group and misaligned rows element-wise.
template <int kThr, class T, class Op, class Table>
__device__ __forceinline__ void run_segment(const Row& row, const void* source, int64_t j0,
                                            int64_t j1, const Op& op, const Table& table) {
  const T* src = static_cast<const T*>(source);
  T* dst = static_cast<T*>(row.data);
  const int64_t whole = row.numel / fd::kGroupElems;
  const int64_t whole_end = j1 < whole ? j1 : whole;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (aligned && j0 < whole_end) {
    run_units<kThr>(row, src, dst, j0, whole_end - j0, op, table);
    run_groups<kThr>(row, src, dst, whole_end, j1, op, table);
  } else {
    run_groups<kThr>(row, src, dst, j0, j1, op, table);
  }
}

// Runs op(row, j, table, x) on every group of block b's range [b * per_block, ...), x
// holding the group's elements as float read from the row's source (op rewrites them; they
// are stored into the row). The block walks the rows its range meets, the storage dtype
// dispatched once per row.
template <SmemTable Tb, class Op>
__global__ void __launch_bounds__(kGroupThreads<Tb>, kMinBlocksPerSm<Tb, Op::kUpdate>)
groups_kernel(const __grid_constant__ RowList list, int64_t total, int64_t per_block, Op op) {
  static_assert((Tb == SmemTable::none) == (Op::kDistribution == Distribution::rademacher),
                "a table for the Gaussian ops, none for the Rademacher ones");
  constexpr int kThr = kGroupThreads<Tb>;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < total ? begin + per_block : total;
  const TableRef<Tb> table = shared_gaussian_table<Tb>();
  if (begin >= end) return;
  op.prepare();  // per-launch scalars that read device memory (sphere norms)
  const int64_t* desc = list.rows();
  const int64_t* sources = list.source_pointers();
  const int64_t num_rows = list.num_rows;
  int64_t r = fd::find_row(desc, num_rows, begin);
  for (int64_t g = begin; g < end && r < num_rows; ++r) {
    const Row row = fd::read_row(desc, r);
    const int64_t row_end = row.first_group + fd::groups_of(row.numel);
    const int64_t seg_end = row_end < end ? row_end : end;
    if (seg_end <= g) continue;  // an empty row
    const void* source = fd::row_source(sources, r, row);
    const int64_t j0 = g - row.first_group, j1 = seg_end - row.first_group;
    switch (static_cast<DType>(row.dtype)) {
      case DType::float16: run_segment<kThr, Float16>(row, source, j0, j1, op, table); break;
      case DType::bfloat16: run_segment<kThr, BFloat16>(row, source, j0, j1, op, table); break;
      case DType::float32: run_segment<kThr, float>(row, source, j0, j1, op, table); break;
      default: break;  // refused by the bindings
    }
    g = seg_end;
  }
}

template <Distribution D>
struct PerturbOp {
  static constexpr Distribution kDistribution = D;
  static constexpr bool kUpdate = false;
  uint64_t seed;
  uint32_t k;
  float scale;
  const double* norm_sq;
  float s;
  __device__ __forceinline__ void prepare() { s = fd::mul_rn(scale, fd::inverse_norm(norm_sq)); }
  template <class Table>
  __device__ __forceinline__ void operator()(const Row& row, int64_t j, const Table& table,
                                             float (&x)[fd::kGroupElems]) const {
    fd::perturb_values(row, j, seed, k, s, D, table, x);
  }
};

template <Distribution D>
struct UpdateOp {
  static constexpr Distribution kDistribution = D;
  static constexpr bool kUpdate = true;
  Terms terms;
  float lr, wd;
  const double* norm_sq;
  int64_t norm_stride;
  // The terms stay in the kernel's parameter space (read-only: a per-thread copy of 64
  // terms would live in local memory); sphere directions rescale each coefficient by its
  // inverse norm where it is used. One Philox call per group and term (update_values).
  __device__ __forceinline__ void prepare() {}
  template <class Table>
  __device__ __forceinline__ void operator()(const Row& row, int64_t j, const Table& table,
                                             float (&x)[fd::kGroupElems]) const {
    fd::update_values(row, j, terms.term, terms.count, lr, wd, D, norm_sq, norm_stride, table, x);
  }
};

// f(std::integral_constant<Distribution, D>) for the runtime distribution d (validated).
template <class F>
Status with_distribution(Distribution d, F&& f) {
  if (d == Distribution::gaussian)
    return f(std::integral_constant<Distribution, Distribution::gaussian>{});
  return f(std::integral_constant<Distribution, Distribution::rademacher>{});
}

// Grid of the groups kernels: exactly one wave (every block resident at once, each owning
// an equal whole number of passes), so no SM idles through a partial last wave.
struct GroupsGrid {
  unsigned blocks;
  int64_t per_block;
};
template <SmemTable Tb, class Op>
Status groups_grid(int64_t total, GroupsGrid& grid) {
  int device = 0, sm_count = 0, per_sm = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  DK_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, groups_kernel<Tb, Op>, kGroupThreads<Tb>, kTableBytes<Tb>));
  // A step covers 2 groups per thread of 16-bit rows, 1 of float32: sized for the former
  // (the wave has the same number of blocks either way; float32 blocks loop twice as often).
  constexpr int64_t pass = static_cast<int64_t>(kGroupThreads<Tb>) * kStepUnits;
  const int64_t passes = ceil_div(total, pass);
  const int64_t wave = static_cast<int64_t>(sm_count) * std::max(per_sm, 1);
  const int64_t blocks = std::min<int64_t>(passes, wave);
  grid.per_block = ceil_div(passes, blocks) * pass;
  grid.blocks = static_cast<unsigned>(ceil_div(total, grid.per_block));
  return Status::ok;
}

template <SmemTable Tb, class Op>
Status launch_groups_with(const RowList& list, int64_t total, const Op& op, void* stream) {
  Status st = allow_table<Tb, groups_kernel<Tb, Op>>();
  if (st != Status::ok) return st;
  GroupsGrid grid;
  st = groups_grid<Tb, Op>(total, grid);
  if (st != Status::ok) return st;
  groups_kernel<Tb, Op><<<grid.blocks, kGroupThreads<Tb>, kTableBytes<Tb>,
                          static_cast<cudaStream_t>(stream)>>>(list, total, grid.per_block, op);
  return last_launch_status();
}

// Whether the Gaussian groups kernels take the signed table on the current device: where a
// block may opt in to its 128 KB of shared memory (sm_80: 163 KB, sm_90: 227 KB; sm_86 and
// sm_89 have 99 KB and keep the magnitude table), unless DK_FD_SMALL_TABLE=1 forces the
// magnitude table (for the tests, which compare both kinds with the CPU's bits in one
// process). Both are read at every launch, so a change of the variable takes effect at the
// next launch: a getenv and an attribute query the runtime caches, next to the occupancy
// query groups_grid makes anyway.
Status signed_table_fits(bool& fits) {
  int device = 0, optin = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const char* small = std::getenv("DK_FD_SMALL_TABLE");
  const bool forced_small = small != nullptr && std::strcmp(small, "1") == 0;
  fits = !forced_small && static_cast<size_t>(optin) >= kTableBytes<SmemTable::signed_z>;
  return Status::ok;
}

template <class Op>
Status launch_groups(const RowList& list, int64_t total, const Op& op, void* stream) {
  if constexpr (Op::kDistribution == Distribution::rademacher) {
    return launch_groups_with<SmemTable::none>(list, total, op, stream);
  } else {
    bool fits = false;
    const Status st = signed_table_fits(fits);
    if (st != Status::ok) return st;
    return fits ? launch_groups_with<SmemTable::signed_z>(list, total, op, stream)
                : launch_groups_with<SmemTable::magnitude>(list, total, op, stream);
  }
}

template <Distribution D>
__global__ void __launch_bounds__(kThreads)
directions_kernel(uint64_t seed, uint32_t k, uint32_t t, int64_t numel, float* __restrict__ out) {
  const int64_t groups = fd::groups_of(numel);
  const uint16_t* table = shared_gaussian_table<kMagnitudeTable<D>>();
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < groups;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const fd::Float8 z = fd::group_directions(D, seed, k, t, static_cast<uint64_t>(j), table);
    const int64_t rest = numel - fd::kGroupElems * j;
    fd::store_group(out, j, rest >= fd::kGroupElems ? fd::kGroupElems : static_cast<int>(rest),
                    z.v);
  }
}

// Block p sums partition range p (fixed order within the block: each thread's groups in
// order, then block_sum's fixed tree), writing partials[p].
template <Distribution D>
__global__ void __launch_bounds__(kThreads)
sum_sq_partials_kernel(const __grid_constant__ RowList list, int64_t total, uint64_t seed,
                       uint32_t k, double* partials) {
  __shared__ double scratch[kThreads / 32];
  const uint16_t* table = shared_gaussian_table<kMagnitudeTable<D>>();
  const int64_t* desc = list.rows();
  const int64_t num_rows = list.num_rows;
  const int64_t begin = fd::partition_begin(total, blockIdx.x);
  const int64_t end = fd::partition_begin(total, blockIdx.x + 1);
  double s = 0.0;
  if (begin + threadIdx.x < end) {
    int64_t r = fd::find_row(desc, num_rows, begin + threadIdx.x);
    for (int64_t g = begin + threadIdx.x; g < end; g += kThreads) {
      r = fd::advance_row(desc, num_rows, r, g);
      const Row row = fd::read_row(desc, r);
      s += fd::sum_sq_group(row, g - row.first_group, seed, k, D, table);
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

bool valid_distribution(Distribution d) {
  return static_cast<int>(d) >= 0 && static_cast<int>(d) < fd::kNumDistributions;
}

bool valid_list(const int64_t* desc, int64_t num_tensors, int64_t total_groups) {
  return total_groups >= 0 && num_tensors >= 0 &&
         (total_groups == 0 || (desc && num_tensors > 0));
}

}  // namespace

Status fd_perturb_cuda(const int64_t* desc, const int64_t* sources, int64_t num_tensors,
                       int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                       Distribution dist, const double* norm_sq, void* stream, FdRowsIn rows_in) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist))
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  RowList list;
  const Status st = make_row_list(desc, sources, num_tensors, rows_in, list);
  if (st != Status::ok) return st;
  return with_distribution(dist, [&](auto d) {
    constexpr Distribution D = decltype(d)::value;
    return launch_groups(list, total_groups, PerturbOp<D>{seed, k, scale, norm_sq, 0.0f}, stream);
  });
}

Status fd_update_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      const FdTerm* terms, int num_terms, float lr, float weight_decay,
                      Distribution dist, const double* norm_sq, int64_t norm_stride,
                      void* stream, FdRowsIn rows_in) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) ||
      terms == nullptr || num_terms <= 0 || num_terms > kFdMaxUpdateTerms)
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  Terms t{};
  for (int m = 0; m < num_terms; ++m) t.term[m] = terms[m];
  t.count = num_terms;
  RowList list;
  const Status st = make_row_list(desc, nullptr, num_tensors, rows_in, list);
  if (st != Status::ok) return st;
  return with_distribution(dist, [&](auto d) {
    constexpr Distribution D = decltype(d)::value;
    return launch_groups(list, total_groups,
                         UpdateOp<D>{t, lr, weight_decay, norm_sq, norm_stride}, stream);
  });
}

Status fd_directions_cuda(uint64_t seed, uint32_t k, uint32_t tensor_id, int64_t numel,
                          Distribution dist, float* out, void* stream) {
  if (numel < 0 || !valid_distribution(dist)) return Status::invalid_argument;
  if (numel == 0) return Status::ok;
  if (out == nullptr) return Status::invalid_argument;
  int device = 0, sm_count = 0;
  DK_CUDA_TRY(cudaGetDevice(&device));
  DK_CUDA_TRY(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const unsigned blocks = grid_stride_blocks(fd::groups_of(numel), kThreads, sm_count);
  return with_distribution(dist, [&](auto d) {
    constexpr Distribution D = decltype(d)::value;
    constexpr SmemTable Tb = kMagnitudeTable<D>;
    const Status st = allow_table<Tb, directions_kernel<D>>();
    if (st != Status::ok) return st;
    directions_kernel<D><<<blocks, kThreads, kTableBytes<Tb>, static_cast<cudaStream_t>(stream)>>>(
        seed, k, tensor_id, numel, out);
    return last_launch_status();
  });
}

Status fd_sum_sq_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      uint64_t seed, uint32_t k, Distribution dist, double* out, void* stream,
                      FdRowsIn rows_in) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) || !out)
    return Status::invalid_argument;
  RowList list;
  const Status st = make_row_list(desc, nullptr, num_tensors, rows_in, list);
  if (st != Status::ok) return st;
  const auto s = static_cast<cudaStream_t>(stream);
  return with_distribution(dist, [&](auto d) {
    constexpr Distribution D = decltype(d)::value;
    constexpr SmemTable Tb = kMagnitudeTable<D>;
    const Status st = allow_table<Tb, sum_sq_partials_kernel<D>>();
    if (st != Status::ok) return st;
    sum_sq_partials_kernel<D><<<kFdSumSqPartials, kThreads, kTableBytes<Tb>, s>>>(
        list, total_groups, seed, k, out + 1);
    DK_CUDA_TRY(cudaGetLastError());
    sum_sq_total_kernel<<<1, 1, 0, s>>>(out);
    return last_launch_status();
  });
}

}  // namespace diffkern
