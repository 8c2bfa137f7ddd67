// Finite-difference gradient family, core kernels (no Python, no torch): seeded random
// directions (directions.cuh) applied to a list of tensors in one pass, regenerated
// whenever needed, never stored.
//
// The tensor list: a descriptor array of int64, one row of kDescriptorColumns per tensor,
// in the memory of the device that runs the kernel (host memory for the CPU entry points):
//   row[0] data pointer (contiguous storage of row[1] elements)
//   row[1] numel (>= 0; past 2^31 is fine: every index is 64-bit)
//   row[2] storage dtype, a DType code: float32, float16 or bfloat16 (math is float32)
//   row[3] tensor id t (0 <= t < 2^32): the t of z(seed, k, t, i); ids need not be distinct
//          from other calls' ids, and are what make a tensor's direction independent of
//          its position in the list
//   row[4] first group of the tensor in the flattened group space: the sum of
//          ceil(numel / kFdGroupElems) over the rows before it (so rows are in order of
//          this column; a group is the 8 elements of one Philox call, directions.cuh)
// and `total_groups` = row[4] + ceil(row[1] / kFdGroupElems) of the last row. The core trusts the
// contents (the bindings check the array's shape, dtype and device; Python builds the rows
// from tensors it checked); distinct rows must not overlap in memory.
//
// The CUDA entry points that take a descriptor array also take it in host memory when it has
// at most kFdInlineRows rows (rows_in = FdRowsIn::host; `sources` then in host memory too):
// the rows then travel by value in the kernel's parameters, with no device array and no
// copy (dk.zo's module hooks launch once per module of a few tensors, where building and
// copying a device array cost more than the kernel).
//
// Every entry point returns a Status, never allocates, and never synchronizes: the CUDA
// ones launch on `stream` (a cudaStream_t) on the current device and return
// Status::unsupported in builds without CUDA. CPU ones use num_threads OpenMP threads
// (<= 0: OpenMP's default).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"
#include "fd_grad/directions.cuh"

namespace diffkern {

constexpr int kFdDescriptorColumns = 5;
constexpr int kFdGroupElems = fd::kGroupElems;
// Rows a CUDA launch can take by value (48 bytes each with its source pointer: 1.5 KB of
// kernel parameters, within the 4 KB every CUDA version allows, next to the terms' 1 KB).
constexpr int kFdInlineRows = 32;
enum class FdRowsIn : int { device = 0, host = 1 };
// Terms of one update call: the CUDA kernel takes them by value (no device copy).
constexpr int kFdMaxUpdateTerms = 64;
// sum_sq's output: [total, partial_0, ..., partial_{P-1}]. The partition of the group space
// into P ranges depends only on total_groups, so the sum is the same run to run.
constexpr int kFdSumSqPartials = 1024;

// One direction of an update: coefficient c of z(seed, k, ., .).
struct FdTerm {
  uint64_t seed;
  uint32_t k;
  float coeff;
};

// Optional sphere normalisation: when `norm_sq` is not null, a direction's coefficient
// (scale, or c_j) is first multiplied, in float32, by the float32 value of
// 1 / sqrt(norm_sq[0]) computed in double (norm_sq: sum_sq's output, in the kernel's
// memory, read by the kernel: no host round trip). For update, term j reads
// norm_sq[j * norm_stride].

// theta_t[i] <- round(source_t[i] + scale * z(seed, k, t, i)), in float32 then rounded once
// to the storage dtype. `sources` is null (in place: source_t = theta_t) or num_tensors
// data pointers (as int64, in the kernel's memory), source t of the same numel and dtype as
// row t, equal to its data pointer or not overlapping any row: perturbing into a scratch
// copy reads and writes each element once (a copy followed by an in-place perturb would
// move the bytes twice).
Status fd_perturb_cpu(const int64_t* desc, const int64_t* sources, int64_t num_tensors,
                      int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                      fd::Distribution dist, const double* norm_sq, int num_threads);
Status fd_perturb_cuda(const int64_t* desc, const int64_t* sources, int64_t num_tensors,
                       int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                       fd::Distribution dist, const double* norm_sq, void* stream,
                       FdRowsIn rows_in = FdRowsIn::device);

// theta <- round(theta - lr * (g + weight_decay * theta)), g = sum_j c_j z(seed_j, k_j, t, i)
// accumulated in float32 in the order of `terms` (from 0). 0 < num_terms <= kFdMaxUpdateTerms;
// `terms` is host memory for both entry points.
Status fd_update_cpu(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                     const FdTerm* terms, int num_terms, float lr, float weight_decay,
                     fd::Distribution dist, const double* norm_sq, int64_t norm_stride,
                     int num_threads);
Status fd_update_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      const FdTerm* terms, int num_terms, float lr, float weight_decay,
                      fd::Distribution dist, const double* norm_sq, int64_t norm_stride,
                      void* stream, FdRowsIn rows_in = FdRowsIn::device);

// out[i] = z(seed, k, t, i) for i < numel, float32.
Status fd_directions_cpu(uint64_t seed, uint32_t k, uint32_t tensor_id, int64_t numel,
                         fd::Distribution dist, float* out, int num_threads);
Status fd_directions_cuda(uint64_t seed, uint32_t k, uint32_t tensor_id, int64_t numel,
                          fd::Distribution dist, float* out, void* stream);

// out[0] = sum over the listed tensors of z^2 (double), out[1 + p] the partial sum of range
// p (kFdSumSqPartials + 1 doubles). Only the rows' numel and id are read, not the data.
Status fd_sum_sq_cpu(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                     uint64_t seed, uint32_t k, fd::Distribution dist, double* out,
                     int num_threads);
Status fd_sum_sq_cuda(const int64_t* desc, int64_t num_tensors, int64_t total_groups,
                      uint64_t seed, uint32_t k, fd::Distribution dist, double* out, void* stream,
                      FdRowsIn rows_in = FdRowsIn::device);

}  // namespace diffkern
