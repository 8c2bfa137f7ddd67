// What the CPU and CUDA kernels of fd_grad.h do to one group of kGroupElems = 8 elements
// (one Philox call), written once for both: locating a group's tensor, loading and storing its
// elements in any storage dtype, and the perturb / update / sum-of-squares arithmetic.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/half_types.h"
#include "common/host_device.h"
#include "fd_grad/directions.cuh"
#include "fd_grad/fd_grad.h"

namespace diffkern {
namespace fd {

// The fields of one descriptor row (see fd_grad.h).
struct Row {
  void* data;
  int64_t numel;
  int dtype;
  uint32_t id;
  int64_t first_group;
};

DK_HOST_DEVICE Row read_row(const int64_t* desc, int64_t r) {
  const int64_t* p = desc + r * kFdDescriptorColumns;
  return Row{reinterpret_cast<void*>(static_cast<uintptr_t>(p[0])), p[1], static_cast<int>(p[2]),
             static_cast<uint32_t>(p[3]), p[4]};
}

// Groups of a tensor of n elements (the last one may be partial).
DK_HOST_DEVICE int64_t groups_of(int64_t n) { return (n + kGroupElems - 1) / kGroupElems; }

DK_HOST_DEVICE int64_t first_group(const int64_t* desc, int64_t r) {
  return desc[r * kFdDescriptorColumns + 4];
}

// The last row whose first group is <= g (rows of zero elements are skipped past, since the
// next row starts at the same group): binary search over the prefix column.
DK_HOST_DEVICE int64_t find_row(const int64_t* desc, int64_t num_rows, int64_t g) {
  int64_t lo = 0, hi = num_rows;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first_group(desc, mid) <= g) lo = mid;
    else hi = mid;
  }
  return lo;
}

// From row r (whose first group is <= g), forward to g's row: a block's groups are
// consecutive, so this is zero or a few steps from the block's first row.
DK_HOST_DEVICE int64_t advance_row(const int64_t* desc, int64_t num_rows, int64_t r, int64_t g) {
  while (r + 1 < num_rows && first_group(desc, r + 1) <= g) ++r;
  return r;
}

// The (up to) 8 elements of group j of a tensor of n elements, as float; returns how many
// there are. Element by element (the CUDA kernels move the aligned bulk as 16-byte units,
// fd_vector_io.cuh; this is the CPU's path and the GPU's path for edges). Unrolled with a
// predicate rather than a loop to `count`: a dynamic index into x would put x in local
// memory on the GPU (measured: 3x slower perturb).
template <class T>
DK_HOST_DEVICE int load_group(const T* data, int64_t n, int64_t j, float (&x)[kGroupElems]) {
  const int64_t base = kGroupElems * j;
  const int count = n - base >= kGroupElems ? kGroupElems : static_cast<int>(n - base);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < kGroupElems; ++l)
    if (l < count) x[l] = to_compute(data[base + l]);
  return count;
}

template <class T>
DK_HOST_DEVICE void store_group(T* data, int64_t j, int count, const float (&x)[kGroupElems]) {
  const int64_t base = kGroupElems * j;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < kGroupElems; ++l)
    if (l < count) data[base + l] = from_compute<T>(x[l]);
}

// 1 / sqrt(norm_sq) as float, or 1 without a norm.
DK_HOST_DEVICE float inverse_norm(const double* norm_sq) {
  if (norm_sq == nullptr) return 1.0f;
  return static_cast<float>(1.0 / sqrt(*norm_sq));
}

// Storage dtype dispatch inside a kernel (the bindings allow exactly these three).
template <class F>
DK_HOST_DEVICE void with_storage(int dtype, void* data, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::float32: f(static_cast<float*>(data)); break;
    case DType::float16: f(static_cast<Float16*>(data)); break;
    case DType::bfloat16: f(static_cast<BFloat16*>(data)); break;
    default: break;  // refused by the bindings
  }
}

// x <- x + scale * z for the 8 values of group j (lanes past the tensor's end are computed
// and never stored), each product and sum rounded once in float32. `table`: as for
// group_directions (here and below).
template <class Table>
DK_HOST_DEVICE void perturb_values(const Row& row, int64_t j, uint64_t seed, uint32_t k,
                                   float scale, Distribution dist, const Table& table,
                                   float (&x)[kGroupElems]) {
  const Float8 z = group_directions(dist, seed, k, row.id, static_cast<uint64_t>(j), table);
  for (int l = 0; l < kGroupElems; ++l) x[l] = add_rn(x[l], mul_rn(scale, z.v[l]));
}

// Coefficient m of an update: c_m, times its direction's inverse norm for sphere directions
// (norm_sq not null).
DK_HOST_DEVICE float term_coeff(const FdTerm* terms, int m, const double* norm_sq,
                                int64_t norm_stride) {
  return norm_sq == nullptr ? terms[m].coeff
                            : mul_rn(terms[m].coeff, inverse_norm(norm_sq + m * norm_stride));
}

// x <- x - lr * (sum_m c_m z_m + wd * x), terms accumulated in order from 0.
template <class Table>
DK_HOST_DEVICE void update_values(const Row& row, int64_t j, const FdTerm* terms, int num_terms,
                                  float lr, float wd, Distribution dist, const double* norm_sq,
                                  int64_t norm_stride, const Table& table,
                                  float (&x)[kGroupElems]) {
  float g[kGroupElems] = {};
  for (int m = 0; m < num_terms; ++m) {
    const Float8 z = group_directions(dist, terms[m].seed, terms[m].k, row.id,
                                      static_cast<uint64_t>(j), table);
    const float c = term_coeff(terms, m, norm_sq, norm_stride);
    for (int l = 0; l < kGroupElems; ++l) g[l] = add_rn(g[l], mul_rn(c, z.v[l]));
  }
  for (int l = 0; l < kGroupElems; ++l)
    x[l] = sub_rn(x[l], mul_rn(lr, add_rn(g[l], mul_rn(wd, x[l]))));
}

// Load (from `source`, of row's numel and dtype), transform, store (into the row) one
// group in storage type T (the CPU kernels' path: the table is the host's).
template <class T>
DK_HOST_DEVICE void perturb_group(const Row& row, const void* source, int64_t j, uint64_t seed,
                                  uint32_t k, float scale, Distribution dist) {
  float x[kGroupElems] = {};
  const int count = load_group(static_cast<const T*>(source), row.numel, j, x);
  perturb_values(row, j, seed, k, scale, dist, gaussian_table(), x);
  store_group(static_cast<T*>(row.data), j, count, x);
}

// Row r's source: its own data (in place) or sources[r].
DK_HOST_DEVICE const void* row_source(const int64_t* sources, int64_t r, const Row& row) {
  return sources == nullptr ? row.data
                            : reinterpret_cast<const void*>(static_cast<uintptr_t>(sources[r]));
}

template <class T>
DK_HOST_DEVICE void update_group(const Row& row, int64_t j, const FdTerm* terms, int num_terms,
                                 float lr, float wd, Distribution dist, const double* norm_sq,
                                 int64_t norm_stride) {
  T* data = static_cast<T*>(row.data);
  float x[kGroupElems] = {};
  const int count = load_group(data, row.numel, j, x);
  update_values(row, j, terms, num_terms, lr, wd, dist, norm_sq, norm_stride, gaussian_table(), x);
  store_group(data, j, count, x);
}

// Sum of z^2 over the valid elements of group j (double, lane order).
DK_HOST_DEVICE double sum_sq_group(const Row& row, int64_t j, uint64_t seed, uint32_t k,
                                   Distribution dist, const uint16_t* table) {
  const Float8 z = group_directions(dist, seed, k, row.id, static_cast<uint64_t>(j), table);
  const int64_t rest = row.numel - kGroupElems * j;
  const int count = rest >= kGroupElems ? kGroupElems : static_cast<int>(rest);
  double s = 0.0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < kGroupElems; ++l)
    if (l < count) s += static_cast<double>(z.v[l]) * z.v[l];
  return s;
}

// Range p of sum_sq's fixed partition of [0, total) into kFdSumSqPartials parts.
DK_HOST_DEVICE int64_t partition_begin(int64_t total, int64_t p) {
  const int64_t q = total / kFdSumSqPartials, r = total % kFdSumSqPartials;
  return p * q + (p < r ? p : r);
}

}  // namespace fd
}  // namespace diffkern
