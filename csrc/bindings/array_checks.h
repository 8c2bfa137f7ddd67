// Checks shared by every family's bindings, on ArrayInfo (array_arg.h makes one from any
// array object), with errors that name the function, the argument, what was expected and
// what was received. Header-only so each bind_<family>.cpp stays a thin list of checks
// plus one core call.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>

#include "common/broadcast.h"
#include "common/dtype.h"

namespace diffkern {
namespace bindings {

namespace nb = nanobind;

constexpr int kDeviceCpu = 1;   // kDLCPU
constexpr int kDeviceCuda = 2;  // kDLCUDA

// Everything the checks need from an array, copied out of the DLPack tensor once.
struct ArrayInfo {
  const char* name = "";  // argument name, for messages
  void* data = nullptr;   // first element (byte offset applied)
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as DLPack defines them
  nb::dlpack::dtype dtype{};
  int device_type = 0;
  int device_id = 0;
  bool read_only = false;
  // Keeps a DLPack / buffer-protocol view alive for the call (empty for torch tensors,
  // whose memory the caller's reference keeps alive).
  nb::ndarray<nb::ro> view;

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
};

inline std::string describe_dtype(nb::dlpack::dtype t) {
  using C = nb::dlpack::dtype_code;
  std::string s;
  switch (static_cast<C>(t.code)) {
    case C::Int: s = "int" + std::to_string(t.bits); break;
    case C::UInt: s = "uint" + std::to_string(t.bits); break;
    case C::Float: s = "float" + std::to_string(t.bits); break;
    case C::Bfloat: s = "bfloat" + std::to_string(t.bits); break;
    case C::Complex: s = "complex" + std::to_string(t.bits); break;
    case C::Bool: return "bool";
    default: s = "dtype(code=" + std::to_string(t.code) + ", bits=" + std::to_string(t.bits) + ")";
  }
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

inline std::string describe_dtype(const ArrayInfo& a) {
  return describe_dtype(a.dtype);
}

inline std::string describe_device(int type, int id) {
  switch (type) {
    case kDeviceCpu: return "cpu";
    case kDeviceCuda: return "cuda:" + std::to_string(id);
    case 3: return "cuda_host";
    case 10: return "rocm:" + std::to_string(id);
    case 13: return "cuda_managed:" + std::to_string(id);
    default: return "dlpack_device(" + std::to_string(type) + "):" + std::to_string(id);
  }
}

inline std::string describe_shape(const int64_t* shape, int ndim) {
  std::string s = "(";
  for (int d = 0; d < ndim; ++d) {
    s += std::to_string(shape[d]);
    if (d + 1 < ndim || ndim == 1) s += ",";
    if (d + 1 < ndim) s += " ";
  }
  return s + ")";
}
inline std::string describe_shape(const ArrayInfo& a) { return describe_shape(a.shape, a.ndim); }

inline std::string describe_type(nb::handle obj) {
  return nb::type_name(obj.type()).c_str();
}

inline std::string describe_device(const ArrayInfo& a) {
  return describe_device(a.device_type, a.device_id);
}

// The core's DType of a floating array; false for any other element type.
inline bool core_dtype(nb::dlpack::dtype t, DType* out) {
  using C = nb::dlpack::dtype_code;
  if (t.lanes != 1) return false;
  if (t.code == static_cast<uint8_t>(C::Float)) {
    if (t.bits == 32) return *out = DType::float32, true;
    if (t.bits == 64) return *out = DType::float64, true;
    if (t.bits == 16) return *out = DType::float16, true;
  }
  if (t.code == static_cast<uint8_t>(C::Bfloat) && t.bits == 16) return *out = DType::bfloat16, true;
  return false;
}

// float32 -> DType::float32, float64 -> DType::float64, anything else: TypeError.
inline DType require_float_dtype(const ArrayInfo& a, const char* fn) {
  DType d;
  if (core_dtype(a.dtype, &d) && (d == DType::float32 || d == DType::float64)) return d;
  throw nb::type_error((std::string(fn) + ": " + a.name + ": expected dtype float32 or float64, got " +
                        describe_dtype(a))
                           .c_str());
}

inline void require_same_dtype(const ArrayInfo& ref, const ArrayInfo& a, const char* fn) {
  if (a.dtype != ref.dtype) {
    throw nb::type_error((std::string(fn) + ": " + a.name + ": expected dtype " +
                          describe_dtype(ref) + " (the dtype of " + ref.name + "), got " +
                          describe_dtype(a))
                             .c_str());
  }
}

// CPU or CUDA only, and every array on the same device as `ref`.
inline void require_same_device(const ArrayInfo& ref, const ArrayInfo& a, const char* fn) {
  if (a.device_type != kDeviceCpu && a.device_type != kDeviceCuda) {
    throw nb::value_error((std::string(fn) + ": " + a.name + ": expected a cpu or cuda array, got " +
                           describe_device(a))
                              .c_str());
  }
  if (a.device_type != ref.device_type ||
      (a.device_type == kDeviceCuda && a.device_id != ref.device_id)) {
    throw nb::value_error((std::string(fn) + ": " + a.name + ": expected device " +
                           describe_device(ref) + " (the device of " + ref.name + "), got " +
                           describe_device(a))
                              .c_str());
  }
}

// Row-major contiguous; strides of size-1 dimensions do not matter (torch may report any).
inline bool is_c_contiguous(const ArrayInfo& a) {
  int64_t expected = 1;
  for (int d = a.ndim - 1; d >= 0; --d) {
    if (a.shape[d] != 1 && a.strides[d] != expected) return false;
    expected *= a.shape[d];
  }
  return true;
}

inline void require_c_contiguous(const ArrayInfo& a, const char* fn) {
  if (a.numel() != 0 && !is_c_contiguous(a)) {
    throw nb::value_error((std::string(fn) + ": " + a.name +
                           ": expected a C-contiguous array, got shape " + describe_shape(a) +
                           " with strides " + describe_shape(a.strides, a.ndim) + " (elements)")
                              .c_str());
  }
}

// NumPy broadcasting of a's and b's shapes into `shape` (returns its ndim).
inline int broadcast_shapes(const ArrayInfo& a, const ArrayInfo& b, int64_t* shape, const char* fn) {
  const int ndim = a.ndim > b.ndim ? a.ndim : b.ndim;
  for (int d = 0; d < ndim; ++d) {
    const int da = d - (ndim - a.ndim), db = d - (ndim - b.ndim);
    const int64_t sa = da >= 0 ? a.shape[da] : 1, sb = db >= 0 ? b.shape[db] : 1;
    if (sa != sb && sa != 1 && sb != 1) {
      throw nb::value_error((std::string(fn) + ": " + a.name + " and " + b.name +
                             ": shapes " + describe_shape(a) + " and " + describe_shape(b) +
                             " do not broadcast (dimension " + std::to_string(d) + ": " +
                             std::to_string(sa) + " vs " + std::to_string(sb) + ")")
                                .c_str());
    }
    shape[d] = sa == 1 ? sb : sa;
  }
  return ndim;
}

inline void require_shape(const ArrayInfo& out, const int64_t* shape, int ndim,
                          const std::string& why, const char* fn) {
  bool same = out.ndim == ndim;
  for (int d = 0; same && d < ndim; ++d) same = out.shape[d] == shape[d];
  if (!same) {
    throw nb::value_error((std::string(fn) + ": " + out.name + ": expected shape " +
                           describe_shape(shape, ndim) + " (" + why + "), got " +
                           describe_shape(out))
                              .c_str());
  }
}

// Strides of `a` over an output of `shape` (ndim >= a.ndim): 0 where a is broadcast.
inline void broadcast_strides(const ArrayInfo& a, int ndim, int64_t* strides) {
  for (int d = 0; d < ndim; ++d) {
    const int da = d - (ndim - a.ndim);
    strides[d] = (da < 0 || a.shape[da] == 1) ? 0 : a.strides[da];
  }
}

// Drops size-1 dimensions and merges neighbours that both inputs walk contiguously, so the
// kernels' per-element index math (one div/mod per dimension) runs on as few dimensions as
// possible: plain same-shape contiguous inputs become one dimension.
inline void coalesce(BinaryBroadcast& g) {
  int n = 0;
  for (int d = 0; d < g.ndim; ++d) {
    if (g.sizes[d] == 1) continue;
    if (n > 0) {
      const int p = n - 1;  // previous kept (outer) dimension
      if (g.a_strides[p] == g.a_strides[d] * g.sizes[d] &&
          g.b_strides[p] == g.b_strides[d] * g.sizes[d]) {
        g.sizes[p] *= g.sizes[d];
        g.a_strides[p] = g.a_strides[d];
        g.b_strides[p] = g.b_strides[d];
        continue;
      }
    }
    g.sizes[n] = g.sizes[d];
    g.a_strides[n] = g.a_strides[d];
    g.b_strides[n] = g.b_strides[d];
    ++n;
  }
  for (int d = n; d < g.ndim; ++d) g.sizes[d] = g.a_strides[d] = g.b_strides[d] = 0;
  g.ndim = n;
}

// Geometry of out = f(a, b): out's shape must equal the broadcast of a's and b's shapes.
inline BinaryBroadcast binary_broadcast(const ArrayInfo& a, const ArrayInfo& b, const ArrayInfo& out,
                                        const char* fn) {
  int64_t shape[kMaxDims];
  const int ndim = broadcast_shapes(a, b, shape, fn);
  require_shape(out, shape, ndim,
                std::string("the broadcast of ") + a.name + " " + describe_shape(a) + " and " +
                    b.name + " " + describe_shape(b),
                fn);
  BinaryBroadcast g;
  g.ndim = ndim;
  for (int d = 0; d < ndim; ++d) g.sizes[d] = shape[d];
  broadcast_strides(a, ndim, g.a_strides);
  broadcast_strides(b, ndim, g.b_strides);
  coalesce(g);
  return g;
}

}  // namespace bindings
}  // namespace diffkern
