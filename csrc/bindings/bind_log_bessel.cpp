// Bindings of the log-Bessel family: checks, then one core call with the GIL released.
// Python (diffkern/special.py) allocates `out` with torch and passes the current stream.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings/array_checks.h"
#include "bindings/bindings.h"
#include "bindings/cuda_device.h"
#include "log_bessel/log_bessel.h"

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
namespace {

constexpr const char* kFn = "log_bessel";

// Indexed by LogBesselOp; used in error messages.
constexpr const char* kOpNames[kNumLogBesselOps] = {
    "log_iv", "log_kv", "log_ive", "log_kve", "iv_ratio",
    "dlog_iv_dx", "dlog_kv_dx", "dlog_iv_dv", "dlog_kv_dv", "iv_ratio_dx", "d2log_iv_dx2", "d2log_kv_dx2"};

void require_valid_op(int op) {
  if (op < 0 || op >= kNumLogBesselOps) {
    throw nb::value_error((std::string(kFn) + ": op: expected 0.." +
                           std::to_string(kNumLogBesselOps - 1) + ", got " + std::to_string(op))
                              .c_str());
  }
}

// Checks, then the core call with the GIL released. The caller keeps the memory alive.
void run(int op, const ArrayInfo& v, const ArrayInfo& x, const ArrayInfo& out, int num_threads,
         uintptr_t stream);

void log_bessel(int op, nb::handle v_obj, nb::handle x_obj, nb::handle out_obj, int num_threads,
                uintptr_t stream) {
  require_valid_op(op);
  // The ndarray objects keep the producers' memory alive while the GIL is released.
  const auto v_arr = as_input(v_obj, "v", kFn);
  const auto x_arr = as_input(x_obj, "x", kFn);
  const auto out_arr = as_output(out_obj, "out", kFn);
  run(op, make_info(v_arr, "v", kFn), make_info(x_arr, "x", kFn),
      make_info(out_arr, "out", kFn), num_threads, stream);
}

// Same, from descriptor tuples (see info_from_descriptor); the Python caller holds the
// tensors for the duration of the call.
void log_bessel_described(int op, nb::handle v_desc, nb::handle x_desc, nb::handle out_desc,
                          int num_threads, uintptr_t stream) {
  require_valid_op(op);
  run(op, info_from_descriptor(v_desc, "v", kFn), info_from_descriptor(x_desc, "x", kFn),
      info_from_descriptor(out_desc, "out", kFn), num_threads, stream);
}

void run(int op, const ArrayInfo& v, const ArrayInfo& x, const ArrayInfo& out, int num_threads,
         uintptr_t stream) {
  const DType dtype = require_float_dtype(v, kFn);
  require_same_dtype(v, x, kFn);
  require_same_dtype(v, out, kFn);
  require_same_device(v, v, kFn);
  require_same_device(v, x, kFn);
  require_same_device(v, out, kFn);
  require_c_contiguous(out, kFn);
  const BinaryBroadcast geometry = binary_broadcast(v, x, out, kFn);
  if (out.numel() == 0) return;

  const std::string what = std::string(kFn) + "(" + kOpNames[op] + ")";
  const auto lb_op = static_cast<LogBesselOp>(op);
  Status status = Status::ok;
  if (v.device_type == kDeviceCuda) {
    if (!DIFFKERN_WITH_CUDA) {
      throw std::runtime_error(what + ": got " + describe_device(v.device_type, v.device_id) +
                               " arrays, but this diffkern build has no CUDA kernels "
                               "(rebuild with nvcc available or -Ccmake.define.DIFFKERN_CUDA=ON)");
    }
    nb::gil_scoped_release release;
    CudaDeviceGuard guard(v.device_id);
    if (!guard.ok()) {
      status = Status::cuda_error;
    } else {
      status = log_bessel_cuda(lb_op, dtype, v.data, x.data, out.data, geometry,
                               reinterpret_cast<void*>(stream));
    }
  } else {
    nb::gil_scoped_release release;
    status = log_bessel_cpu(lb_op, dtype, v.data, x.data, out.data, geometry, num_threads);
  }
  if (status != Status::ok) {
    throw std::runtime_error(what + " on " + describe_device(v.device_type, v.device_id) +
                             " failed: " + status_message(status));
  }
}

}  // namespace

void bind_log_bessel(nb::module_& m) {
  m.attr("LOG_BESSEL_OPS") = [] {
    nb::dict d;
    for (int i = 0; i < kNumLogBesselOps; ++i) d[kOpNames[i]] = i;
    return d;
  }();
  m.def("log_bessel", &log_bessel, nb::arg("op"), nb::arg("v"), nb::arg("x"), nb::arg("out"),
        nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        "out[...] = f(v, x) elementwise with NumPy broadcasting; f is LogBesselOp `op`.\n"
        "v, x, out: float32/float64 arrays (any DLPack producer) on one device; out\n"
        "C-contiguous with the broadcast shape. num_threads: CPU threads (<= 0: default).\n"
        "stream: cudaStream_t as an integer (0: legacy default stream).");
  m.def("log_bessel_described", &log_bessel_described, nb::arg("op"), nb::arg("v"), nb::arg("x"),
        nb::arg("out"), nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        "As log_bessel, with each array given as a tuple (data_ptr, shape, strides,\n"
        "dtype_bits, device_type, device_id) (DLPack device codes: 1 CPU, 2 CUDA):\n"
        "the low-overhead path for torch tensors, which the caller keeps alive.");
}

}  // namespace bindings
}  // namespace diffkern
