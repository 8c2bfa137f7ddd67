// Bindings of the finite-difference family (csrc/fd_grad/fd_grad.h): checks of what memory
// safety needs on the arrays that come in (the descriptor array, norms, outputs), then one
// core call. The descriptor rows' contents (data pointers, numel, dtype codes, prefix
// column) are built by python/diffkern/_zo_kernels.py from tensors it checked: the core
// trusts them, and so do we (reading a device descriptor here would synchronize).
#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/array_arg.h"
#include "bindings/core_call.h"
#include "fd_grad/fd_grad.h"

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
namespace {

std::string prefixed(const char* fn, const std::string& what) { return std::string(fn) + ": " + what; }

fd::Distribution require_distribution(int d, const char* fn) {
  if (d < 0 || d >= fd::kNumDistributions)
    throw nb::value_error(prefixed(fn, "distribution: expected 0 (gaussian) or 1 (rademacher), got " +
                                           std::to_string(d)).c_str());
  return static_cast<fd::Distribution>(d);
}

bool is_dtype(const ArrayInfo& a, nb::dlpack::dtype_code code, int bits) {
  return a.dtype.code == static_cast<uint8_t>(code) && a.dtype.bits == bits && a.dtype.lanes == 1;
}

void require_device_cpu_or_cuda(const ArrayInfo& a, const char* fn) { require_same_device(a, a, fn); }

// The (num_tensors, 5) int64 descriptor array, C-contiguous, on the CPU or a GPU.
ArrayInfo descriptor_arg(nb::handle obj, int64_t total_groups, const char* fn) {
  ArrayInfo d = array_arg(obj, "descriptors", fn);
  if (!is_dtype(d, nb::dlpack::dtype_code::Int, 64))
    throw nb::type_error(prefixed(fn, "descriptors: expected dtype int64, got " + describe_dtype(d)).c_str());
  if (d.ndim != 2 || d.shape[1] != kFdDescriptorColumns)
    throw nb::value_error(prefixed(fn, "descriptors: expected shape (num_tensors, " +
                                           std::to_string(kFdDescriptorColumns) + "), got " +
                                           describe_shape(d)).c_str());
  require_device_cpu_or_cuda(d, fn);
  require_c_contiguous(d, fn);
  if (total_groups < 0 || (d.shape[0] == 0 && total_groups != 0))
    throw nb::value_error(prefixed(fn, "total_groups: expected >= 0 (0 for an empty list), got " +
                                           std::to_string(total_groups)).c_str());
  return d;
}

// Where the call runs: on the descriptor array's device, or, for a host descriptor array
// with cuda_device >= 0, on that GPU with the rows passed by value in the kernel's
// parameters (at most FD_INLINE_ROWS rows; fd_grad.h, FdRowsIn::host). The returned
// array info stands for that device in the device checks of the other arguments.
struct LaunchSite {
  ArrayInfo where;
  FdRowsIn rows_in;
};
LaunchSite launch_site(const ArrayInfo& desc, int cuda_device, const char* fn) {
  if (cuda_device < 0) return {desc, FdRowsIn::device};
  if (desc.device_type != kDeviceCpu)
    throw nb::value_error(prefixed(fn, "cuda_device: the descriptors must be in host memory to be "
                                       "passed by value, got " + describe_device(desc)).c_str());
  if (desc.shape[0] > kFdInlineRows)
    throw nb::value_error(prefixed(fn, "cuda_device: at most " + std::to_string(kFdInlineRows) +
                                           " descriptor rows go by value, got " +
                                           std::to_string(desc.shape[0])).c_str());
  ArrayInfo where = desc;
  where.device_type = kDeviceCuda;
  where.device_id = cuda_device;
  return {where, FdRowsIn::host};
}

// A float64 array of at least `min_numel` elements on the call's device, contiguous; null for None.
const double* norm_arg(nb::handle obj, const ArrayInfo& desc, int64_t min_numel, const char* fn,
                       ArrayInfo& keep) {
  if (obj.is_none()) return nullptr;
  keep = array_arg(obj, "norm_sq", fn);
  if (!is_dtype(keep, nb::dlpack::dtype_code::Float, 64))
    throw nb::type_error(prefixed(fn, "norm_sq: expected dtype float64, got " + describe_dtype(keep)).c_str());
  require_same_device(desc, keep, fn);
  require_c_contiguous(keep, fn);
  if (keep.numel() < min_numel)
    throw nb::value_error(prefixed(fn, "norm_sq: expected at least " + std::to_string(min_numel) +
                                           " elements, got " + std::to_string(keep.numel())).c_str());
  return static_cast<const double*>(keep.data);
}

// The (num_tensors,) int64 array of source data pointers, in desc's memory; null for None.
const int64_t* sources_arg(nb::handle obj, const ArrayInfo& desc, const char* fn, ArrayInfo& keep) {
  if (obj.is_none()) return nullptr;
  keep = array_arg(obj, "sources", fn);
  if (!is_dtype(keep, nb::dlpack::dtype_code::Int, 64))
    throw nb::type_error(prefixed(fn, "sources: expected dtype int64, got " + describe_dtype(keep)).c_str());
  require_same_device(desc, keep, fn);
  require_c_contiguous(keep, fn);
  if (keep.ndim != 1 || keep.shape[0] != desc.shape[0])
    throw nb::value_error(prefixed(fn, "sources: expected shape (" + std::to_string(desc.shape[0]) +
                                           ",) (one pointer per descriptor row), got " +
                                           describe_shape(keep)).c_str());
  return static_cast<const int64_t*>(keep.data);
}

void fd_perturb(nb::handle desc_obj, int64_t total_groups, uint64_t seed, uint32_t k, float scale,
                int distribution, nb::handle norm_obj, nb::handle sources_obj, int num_threads,
                uintptr_t stream, int cuda_device) {
  constexpr const char* fn = "fd_perturb";
  const fd::Distribution dist = require_distribution(distribution, fn);
  const ArrayInfo desc = descriptor_arg(desc_obj, total_groups, fn);
  const LaunchSite site = launch_site(desc, cuda_device, fn);
  ArrayInfo norm_keep, sources_keep;
  const double* norm = norm_arg(norm_obj, site.where, 1, fn, norm_keep);
  const int64_t* src = sources_arg(sources_obj, desc, fn, sources_keep);
  const auto* d = static_cast<const int64_t*>(desc.data);
  const int64_t n = desc.shape[0];
  if (total_groups == 0) return;
  call_core([&] { return std::string(fn); }, site.where, num_threads, stream, kFdGroupElems * total_groups,
            [&](int t) { return fd_perturb_cpu(d, src, n, total_groups, seed, k, scale, dist, norm, t); },
            [&](void* s) {
              return fd_perturb_cuda(d, src, n, total_groups, seed, k, scale, dist, norm, s,
                                     site.rows_in);
            });
}

void fd_update(nb::handle desc_obj, int64_t total_groups,
               const std::vector<std::tuple<uint64_t, uint32_t, float>>& terms, float lr,
               float weight_decay, int distribution, nb::handle norm_obj, int64_t norm_stride,
               int num_threads, uintptr_t stream, int cuda_device) {
  constexpr const char* fn = "fd_update";
  const fd::Distribution dist = require_distribution(distribution, fn);
  if (terms.empty() || terms.size() > static_cast<size_t>(kFdMaxUpdateTerms))
    throw nb::value_error(prefixed(fn, "terms: expected 1 to " + std::to_string(kFdMaxUpdateTerms) +
                                           " (seed, k, coeff) triples, got " +
                                           std::to_string(terms.size())).c_str());
  const ArrayInfo desc = descriptor_arg(desc_obj, total_groups, fn);
  const LaunchSite site = launch_site(desc, cuda_device, fn);
  if (!norm_obj.is_none() && norm_stride < 0)
    throw nb::value_error(prefixed(fn, "norm_stride: expected >= 0, got " + std::to_string(norm_stride)).c_str());
  ArrayInfo norm_keep;
  const int num_terms = static_cast<int>(terms.size());
  const double* norm = norm_arg(norm_obj, site.where, (num_terms - 1) * norm_stride + 1, fn, norm_keep);
  std::vector<FdTerm> t(terms.size());
  for (size_t m = 0; m < terms.size(); ++m)
    t[m] = FdTerm{std::get<0>(terms[m]), std::get<1>(terms[m]), std::get<2>(terms[m])};
  const auto* d = static_cast<const int64_t*>(desc.data);
  const int64_t n = desc.shape[0];
  if (total_groups == 0) return;
  call_core([&] { return std::string(fn); }, site.where, num_threads, stream, kFdGroupElems * total_groups * num_terms,
            [&](int th) {
              return fd_update_cpu(d, n, total_groups, t.data(), num_terms, lr, weight_decay, dist,
                                   norm, norm_stride, th);
            },
            [&](void* s) {
              return fd_update_cuda(d, n, total_groups, t.data(), num_terms, lr, weight_decay, dist,
                                    norm, norm_stride, s, site.rows_in);
            });
}

void fd_directions(uint64_t seed, uint32_t k, uint32_t tensor_id, int distribution, nb::handle out_obj,
                   int num_threads, uintptr_t stream) {
  constexpr const char* fn = "fd_directions";
  const fd::Distribution dist = require_distribution(distribution, fn);
  const ArrayInfo out = array_arg(out_obj, "out", fn, Access::write);
  if (!is_dtype(out, nb::dlpack::dtype_code::Float, 32))
    throw nb::type_error(prefixed(fn, "out: expected dtype float32, got " + describe_dtype(out)).c_str());
  require_device_cpu_or_cuda(out, fn);
  require_c_contiguous(out, fn);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  auto* o = static_cast<float*>(out.data);
  call_core([&] { return std::string(fn); }, out, num_threads, stream, numel,
            [&](int t) { return fd_directions_cpu(seed, k, tensor_id, numel, dist, o, t); },
            [&](void* s) { return fd_directions_cuda(seed, k, tensor_id, numel, dist, o, s); });
}

void fd_sum_sq(nb::handle desc_obj, int64_t total_groups, uint64_t seed, uint32_t k,
               int distribution, nb::handle out_obj, int num_threads, uintptr_t stream,
               int cuda_device) {
  constexpr const char* fn = "fd_sum_sq";
  const fd::Distribution dist = require_distribution(distribution, fn);
  const ArrayInfo desc = descriptor_arg(desc_obj, total_groups, fn);
  const LaunchSite site = launch_site(desc, cuda_device, fn);
  const ArrayInfo out = array_arg(out_obj, "out", fn, Access::write);
  if (!is_dtype(out, nb::dlpack::dtype_code::Float, 64))
    throw nb::type_error(prefixed(fn, "out: expected dtype float64, got " + describe_dtype(out)).c_str());
  require_same_device(site.where, out, fn);
  require_c_contiguous(out, fn);
  if (out.numel() != kFdSumSqPartials + 1)
    throw nb::value_error(prefixed(fn, "out: expected " + std::to_string(kFdSumSqPartials + 1) +
                                           " elements (FD_SUM_SQ_PARTIALS + 1), got " +
                                           std::to_string(out.numel())).c_str());
  const auto* d = static_cast<const int64_t*>(desc.data);
  const int64_t n = desc.shape[0];
  auto* o = static_cast<double*>(out.data);
  call_core([&] { return std::string(fn); }, site.where, num_threads, stream, kFdGroupElems * total_groups,
            [&](int t) { return fd_sum_sq_cpu(d, n, total_groups, seed, k, dist, o, t); },
            [&](void* s) {
              return fd_sum_sq_cuda(d, n, total_groups, seed, k, dist, o, s, site.rows_in);
            });
}

// Philox-4x32-10 of one (counter, key), on the host: for the known-answer tests.
std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> fd_philox(
    std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> counter, std::tuple<uint32_t, uint32_t> key) {
  const philox::U32x4 c{{std::get<0>(counter), std::get<1>(counter), std::get<2>(counter),
                         std::get<3>(counter)}};
  const philox::U32x4 r = philox::philox4x32_10(c, std::get<0>(key), std::get<1>(key));
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

// z of each lane's 16 random bits by the Gaussian map of directions.cuh (host table): for
// the tests, which check the map on chosen bit patterns against the generator's table.
std::vector<float> fd_gaussian_from_bits(const std::vector<uint32_t>& bits) {
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    if (bits[i] > 0xffffu)
      throw nb::value_error(prefixed("fd_gaussian_from_bits", "bits[" + std::to_string(i) +
                                     "]: expected a 16-bit value, got " +
                                     std::to_string(bits[i])).c_str());
    out[i] = fd::gaussian_from_bits(bits[i], fd::gaussian_table());
  }
  return out;
}

}  // namespace

void bind_fd_grad(nb::module_& m) {
  m.attr("FD_DESCRIPTOR_COLUMNS") = kFdDescriptorColumns;
  m.attr("FD_GROUP_ELEMS") = kFdGroupElems;
  m.attr("FD_MAX_UPDATE_TERMS") = kFdMaxUpdateTerms;
  m.attr("FD_INLINE_ROWS") = kFdInlineRows;
  m.attr("FD_SUM_SQ_PARTIALS") = kFdSumSqPartials;
  m.attr("FD_DISTRIBUTIONS") = [] {
    nb::dict d;
    d["gaussian"] = static_cast<int>(fd::Distribution::gaussian);
    d["rademacher"] = static_cast<int>(fd::Distribution::rademacher);
    return d;
  }();
  m.attr("FD_DTYPE_CODES") = [] {  // the storage dtypes a descriptor row may name
    nb::dict d;
    d["float32"] = static_cast<int>(DType::float32);
    d["float16"] = static_cast<int>(DType::float16);
    d["bfloat16"] = static_cast<int>(DType::bfloat16);
    return d;
  }();
  m.def("fd_perturb", &fd_perturb, nb::arg("descriptors"), nb::arg("total_groups"), nb::arg("seed"),
        nb::arg("k"), nb::arg("scale"), nb::arg("distribution"), nb::arg("norm_sq").none() = nb::none(),
        nb::arg("sources").none() = nb::none(), nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        nb::arg("cuda_device") = -1,
        "theta_t[i] = source_t[i] + scale * z(seed, k, t, i) over every tensor of the descriptor\n"
        "array (see csrc/fd_grad/fd_grad.h for its rows), in float32, rounded once to storage;\n"
        "sources: None (in place) or an int64 array of one source data pointer per row.\n"
        "cuda_device >= 0: host descriptors (and sources) of at most FD_INLINE_ROWS rows, run\n"
        "on that GPU with the rows passed by value (no device copy).");
  m.def("fd_update", &fd_update, nb::arg("descriptors"), nb::arg("total_groups"), nb::arg("terms"),
        nb::arg("lr"), nb::arg("weight_decay"), nb::arg("distribution"),
        nb::arg("norm_sq").none() = nb::none(), nb::arg("norm_stride") = 0,
        nb::arg("num_threads") = 0, nb::arg("stream") = 0, nb::arg("cuda_device") = -1,
        "theta <- theta - lr * (sum_j c_j z(seed_j, k_j, t, i) + weight_decay * theta);\n"
        "terms: list of (seed, k, c) triples (at most FD_MAX_UPDATE_TERMS).");
  m.def("fd_directions", &fd_directions, nb::arg("seed"), nb::arg("k"), nb::arg("tensor_id"),
        nb::arg("distribution"), nb::arg("out"), nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        "out[i] = z(seed, k, tensor_id, i) for a C-contiguous float32 out (flat index i).");
  m.def("fd_sum_sq", &fd_sum_sq, nb::arg("descriptors"), nb::arg("total_groups"), nb::arg("seed"),
        nb::arg("k"), nb::arg("distribution"), nb::arg("out"), nb::arg("num_threads") = 0,
        nb::arg("stream") = 0, nb::arg("cuda_device") = -1,
        "out[0] = sum of z^2 over the listed tensors (float64, deterministic order);\n"
        "out[1:] the FD_SUM_SQ_PARTIALS partial sums.");
  m.def("fd_gaussian_from_bits", &fd_gaussian_from_bits, nb::arg("bits"),
        "The Gaussian value of each lane's 16 random bits (the map of csrc/fd_grad/directions.cuh).");
  m.def("fd_philox", &fd_philox, nb::arg("counter"), nb::arg("key"),
        "Philox-4x32-10 of a 4-word counter and a 2-word key (the known-answer tests).");
}

}  // namespace bindings
}  // namespace diffkern
