// Bindings of the log-Bessel family: checks, then one core call with the GIL released.
// Python (diffkern/special.py) allocates `out` with torch and passes the current stream.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>

#include "bindings/array_arg.h"
#include "bindings/core_call.h"
#include "bindings/fast_path.h"
#include "log_bessel/log_bessel.h"

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
namespace {

constexpr const char* kFn = "log_bessel";

constexpr const auto& kOpNames = kLogBesselOpNames;

void require_valid_op(int op) {
  if (op < 0 || op >= kNumLogBesselOps) {
    throw nb::value_error((std::string(kFn) + ": op: expected 0.." +
                           std::to_string(kNumLogBesselOps - 1) + ", got " + std::to_string(op))
                              .c_str());
  }
}

// Checks what memory safety needs (dtypes, devices, shapes), then one core call.
// Values (v < 0, x < 0, NaN) are the math's business: the core returns NaN as documented.
void log_bessel(int op, nb::handle v_obj, nb::handle x_obj, nb::handle out_obj, int num_threads,
                uintptr_t stream) {
  require_valid_op(op);
  const ArrayInfo v = array_arg(v_obj, "v", kFn);
  const ArrayInfo x = array_arg(x_obj, "x", kFn);
  const ArrayInfo out = array_arg(out_obj, "out", kFn, Access::write);
  const DType dtype = require_float_dtype(v, kFn);
  require_same_dtype(v, x, kFn);
  require_same_dtype(v, out, kFn);
  require_same_device(v, v, kFn);
  require_same_device(v, x, kFn);
  require_same_device(v, out, kFn);
  require_c_contiguous(out, kFn);
  const BinaryBroadcast geometry = binary_broadcast(v, x, out, kFn);
  if (out.numel() == 0) return;
  const auto lb_op = static_cast<LogBesselOp>(op);
  call_core([&] { return std::string(kFn) + "(" + kOpNames[op] + ")"; }, v, num_threads, stream,
            out.numel(),
            [&](int threads) {
              return log_bessel_cpu(lb_op, dtype, v.data, x.data, out.data, geometry, threads);
            },
            [&](void* s) { return log_bessel_cuda(lb_op, dtype, v.data, x.data, out.data, geometry, s); });
}

// The whole call for the common case (see fast_path.h): v and x plain tensors of one
// shape, dtype (float32/float64) and device, v contiguous, nothing for the dispatcher to
// do. Returns the result, or None when the caller's general path must run.
nb::object log_bessel_fast(int op, nb::handle v_obj, nb::handle x_obj) {
  if (op < 0 || op >= kNumLogBesselOps || !fast_path_allowed(v_obj, x_obj)) return nb::none();
  ArrayInfo v, x;
  try {
    v = array_arg(v_obj, "v", kFn);
    x = array_arg(x_obj, "x", kFn);
  } catch (const nb::builtin_exception&) {
    return nb::none();  // not describable here (too many dimensions ...): the general path
  } catch (const nb::python_error&) {  // says why, naming the public function
    return nb::none();
  }
  DType dtype;
  if (!core_dtype(v.dtype, &dtype) || (dtype != DType::float32 && dtype != DType::float64) ||
      v.dtype != x.dtype || v.device_type != x.device_type || v.device_id != x.device_id ||
      (v.device_type != kDeviceCpu && v.device_type != kDeviceCuda) || v.ndim != x.ndim ||
      !is_c_contiguous(v))
    return nb::none();
  for (int d = 0; d < v.ndim; ++d)
    if (v.shape[d] != x.shape[d]) return nb::none();
  const FastPathHooks& h = fast_path_hooks();
  nb::object out_obj = h.empty_like(v_obj);  // contiguous, like v: same dtype, device, shape
  ArrayInfo out = v;
  out.name = "out";
  out.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(out_obj.attr("data_ptr")()));
  BinaryBroadcast geometry;
  geometry.ndim = v.ndim;
  for (int d = 0; d < v.ndim; ++d) {
    geometry.sizes[d] = v.shape[d];
    geometry.a_strides[d] = v.strides[d];
    geometry.b_strides[d] = x.strides[d];
  }
  coalesce(geometry);
  if (out.numel() == 0) return out_obj;
  const uintptr_t stream =
      v.device_type == kDeviceCuda ? nb::cast<uintptr_t>(h.current_stream(v.device_id)) : 0;
  const int threads = v.device_type == kDeviceCpu ? nb::cast<int>(h.num_threads()) : 0;
  const auto lb_op = static_cast<LogBesselOp>(op);
  call_core([&] { return std::string(kFn) + "(" + kOpNames[op] + ")"; }, v, threads, stream,
            out.numel(),
            [&](int t) { return log_bessel_cpu(lb_op, dtype, v.data, x.data, out.data, geometry, t); },
            [&](void* s) { return log_bessel_cuda(lb_op, dtype, v.data, x.data, out.data, geometry, s); });
  return out_obj;
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
        "v, x, out: float32/float64 arrays (torch tensors or any DLPack producer) on one\n"
        "device; out C-contiguous with the broadcast shape. num_threads: CPU threads (<= 0: default).\n"
        "stream: cudaStream_t as an integer (0: legacy default stream).");
  m.def("log_bessel_fast", &log_bessel_fast, nb::arg("op"), nb::arg("v").none(),
        nb::arg("x").none(),
        "The whole call for plain same-shape tensors when nothing needs torch's dispatcher\n"
        "(see register_fast_path); None when the caller must take its general path.");
}

}  // namespace bindings
}  // namespace diffkern
