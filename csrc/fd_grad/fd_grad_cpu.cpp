// CPU kernels of the finite-difference family: OpenMP over the flattened group space of
// all tensors, in blocks of consecutive groups (each block finds its first tensor by binary
// search, then walks forward), the same decomposition as the CUDA kernels.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/threads.h"
#include "fd_grad/fd_grad.h"
#include "fd_grad/fd_group_ops.cuh"

namespace diffkern {
namespace {

using fd::Row;

constexpr int64_t kBlockGroups = 512;  // 4096 elements per OpenMP work item

bool valid_distribution(fd::Distribution d) {
  return static_cast<int>(d) >= 0 && static_cast<int>(d) < fd::kNumDistributions;
}

// f(row, r, j) for every group j of every tensor (row r).
template <class F>
void for_each_group(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                    int num_threads, F&& f) {
  const int64_t blocks = (total_groups + kBlockGroups - 1) / kBlockGroups;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (total_groups > 128)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlockGroups;
    const int64_t end = begin + kBlockGroups < total_groups ? begin + kBlockGroups : total_groups;
    int64_t r = fd::find_row(desc, num_tensors, begin);
    for (int64_t g = begin; g < end; ++g) {
      r = fd::advance_row(desc, num_tensors, r, g);
      const Row row = fd::read_row(desc, r);
      f(row, r, g - row.first_group);
    }
  }
}

bool valid_list(const int64_t* desc, int64_t num_tensors, int64_t total_groups) {
  return total_groups >= 0 && num_tensors >= 0 && (total_groups == 0 || (desc && num_tensors > 0));
}

}  // namespace

Status fd_perturb_cpu(const int64_t* desc, const int64_t* sources, int64_t num_tensors,
                      int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                      fd::Distribution dist, const double* norm_sq, int num_threads) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist))
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  const float s = fd::mul_rn(scale, fd::inverse_norm(norm_sq));
  for_each_group(desc, num_tensors, total_groups, resolve_num_threads(num_threads),
                 [&](const Row& row, int64_t r, int64_t j) {
                   fd::with_storage(row.dtype, row.data, [&](auto* p) {
                     using T = std::remove_pointer_t<decltype(p)>;
                     fd::perturb_group<T>(row, fd::row_source(sources, r, row), j, seed, k, s,
                                          dist);
                   });
                 });
  return Status::ok;
}

Status fd_update_cpu(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                     const FdTerm* terms, int num_terms, float lr, float weight_decay,
                     fd::Distribution dist, const double* norm_sq, int64_t norm_stride,
                     int num_threads) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) ||
      terms == nullptr || num_terms <= 0 || num_terms > kFdMaxUpdateTerms)
    return Status::invalid_argument;
  if (total_groups == 0) return Status::ok;
  for_each_group(desc, num_tensors, total_groups, resolve_num_threads(num_threads),
                 [&](const Row& row, int64_t, int64_t j) {
                   fd::with_storage(row.dtype, row.data, [&](auto* p) {
                     using T = std::remove_pointer_t<decltype(p)>;
                     fd::update_group<T>(row, j, terms, num_terms, lr, weight_decay, dist,
                                         norm_sq, norm_stride);
                   });
                 });
  return Status::ok;
}

Status fd_directions_cpu(uint64_t seed, uint32_t k, uint32_t tensor_id, int64_t numel,
                         fd::Distribution dist, float* out, int num_threads) {
  if (numel < 0 || !valid_distribution(dist)) return Status::invalid_argument;
  if (numel == 0) return Status::ok;
  if (out == nullptr) return Status::invalid_argument;
  const int64_t groups = fd::groups_of(numel);
  num_threads = resolve_num_threads(num_threads);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (groups > 512)
  for (int64_t j = 0; j < groups; ++j) {
    const fd::Float8 z =
        fd::group_directions(dist, seed, k, tensor_id, static_cast<uint64_t>(j), fd::gaussian_table());
    const int64_t rest = numel - fd::kGroupElems * j;
    const int count = rest >= fd::kGroupElems ? fd::kGroupElems : static_cast<int>(rest);
    for (int l = 0; l < count; ++l) out[fd::kGroupElems * j + l] = z.v[l];
  }
  return Status::ok;
}

Status fd_sum_sq_cpu(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                     uint64_t seed, uint32_t k, fd::Distribution dist, double* out,
                     int num_threads) {
  if (!valid_list(desc, num_tensors, total_groups) || !valid_distribution(dist) || !out)
    return Status::invalid_argument;
  num_threads = resolve_num_threads(num_threads);
  double* partials = out + 1;
  // Each partial sums its own range in group order: the result does not depend on threads.
#pragma omp parallel for schedule(dynamic, 8) num_threads(num_threads) if (total_groups > 2048)
  for (int64_t p = 0; p < kFdSumSqPartials; ++p) {
    const int64_t begin = fd::partition_begin(total_groups, p);
    const int64_t end = fd::partition_begin(total_groups, p + 1);
    double s = 0.0;
    if (begin < end) {
      int64_t r = fd::find_row(desc, num_tensors, begin);
      for (int64_t g = begin; g < end; ++g) {
        r = fd::advance_row(desc, num_tensors, r, g);
        const Row row = fd::read_row(desc, r);
        s += fd::sum_sq_group(row, g - row.first_group, seed, k, dist, fd::gaussian_table());
      }
    }
    partials[p] = s;
  }
  double total = 0.0;
  for (int p = 0; p < kFdSumSqPartials; ++p) total += partials[p];
  out[0] = total;
  return Status::ok;
}

}  // namespace diffkern
