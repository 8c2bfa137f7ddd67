// diffkern._C: build information plus every family's bindings. Nothing here touches CUDA
// at import time, so the module imports on machines without a GPU or driver.
//
// The families are registered from diffkern_families.inc, which CMake writes from the
// folders csrc/<family>/: family F provides `void bind_F(nanobind::module_&)` in
// csrc/bindings/bind_F.cpp, and nothing here names it.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "bindings/cuda_device.h"
#include "bindings/fast_path.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
#define DIFFKERN_FAMILY(name) void bind_##name(nb::module_& m);
#include "diffkern_families.inc"
#undef DIFFKERN_FAMILY
}  // namespace bindings
}  // namespace diffkern

namespace {

nb::list split_archs(const std::string& s) {
  nb::list out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.append(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

nb::dict build_info() {
  nb::dict d;
  d["version"] = DIFFKERN_VERSION;
  d["cuda"] = static_cast<bool>(DIFFKERN_WITH_CUDA);
  d["cuda_archs"] = split_archs(DIFFKERN_CUDA_ARCHS);
#if DIFFKERN_WITH_CUDA
  // CUDART_VERSION is e.g. 13000 for CUDA 13.0.
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string((CUDART_VERSION % 1000) / 10);
#else
  d["cuda_version"] = nb::none();
#endif
  d["openmp"] = static_cast<bool>(DIFFKERN_WITH_OPENMP);
#if defined(_OPENMP)
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp_max_threads"] = 1;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "diffkern compiled core (thin bindings; use the diffkern Python API instead)";
  m.attr("__version__") = DIFFKERN_VERSION;
  m.def("build_info", &build_info,
        "Dict describing this build: version, cuda, cuda_archs, cuda_version, openmp, compiler.");
  m.def("cuda_device_count", &diffkern::bindings::cuda_device_count,
        "Number of CUDA devices this build can use (0 without CUDA support, driver or GPU).");
  m.def("register_fast_path", &diffkern::bindings::register_fast_path, nb::arg("tensor_type"),
        nb::arg("grad_enabled"), nb::arg("functorch_level"), nb::arg("empty_like"),
        nb::arg("num_threads"), nb::arg("current_stream"),
        "The torch callables the C++ fast paths need (diffkern/_ops.py registers them).");
  nb::list families;
#define DIFFKERN_FAMILY(name)             \
  diffkern::bindings::bind_##name(m);     \
  families.append(#name);
#include "diffkern_families.inc"
#undef DIFFKERN_FAMILY
  m.attr("FAMILIES") = nb::tuple(families);
}
