// The one way the bindings describe an array to the core: array_arg() turns an argument
// into an ArrayInfo (pointer, shape, strides in elements, dtype, device), by DLPack:
//
// - Fast path: DLPack 1.2's C exchange API. A framework that offers it (torch >= 2.10 does)
//   puts a capsule `__dlpack_c_exchange_api__` on its tensor type, with a C function that
//   fills a non-owning DLTensor for a tensor in tens of nanoseconds. Calling __dlpack__
//   instead costs ~2 us per tensor in torch, which dominates small calls; no libtorch is
//   linked either way. The caller's reference keeps the memory alive for the call.
// - Otherwise (older torch, numpy, cupy, jax, ...): nanobind's ndarray caster (DLPack
//   capsule or buffer protocol), the view kept alive in ArrayInfo::view for the call.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "bindings/array_checks.h"

namespace diffkern {
namespace bindings {

enum class Access { read, write };

namespace dlpack_exchange {

// The C ABI of DLPack's exchange API (dlpack.h, v1.2+), declared here as the spec lays it
// out; nanobind's dlpack::dltensor has DLTensor's layout.
struct Version {
  uint32_t major, minor;
};
struct Header {
  Version version;
  Header* prev_api;
};
using TensorFromObject = int (*)(void* py_object, nb::dlpack::dltensor* out);
struct Api {
  Header header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  TensorFromObject dltensor_from_py_object_no_sync;
  void* current_work_stream;
};

// The API of `type`, or null. Looked up on the type (as the spec asks) and cached per type:
// a call sees one or two array types.
inline const Api* api_of(PyTypeObject* type) {
  struct Entry {
    PyTypeObject* type;
    const Api* api;
  };
  static Entry cache[4] = {};
  for (const Entry& e : cache)
    if (e.type == type) return e.api;
  const Api* api = nullptr;
  PyObject* capsule = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type),
                                             "__dlpack_c_exchange_api__");
  if (capsule) {
    auto* found = static_cast<const Api*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
    // Major version 1 has this layout; later minors only append.
    if (found && found->header.version.major == 1 && found->dltensor_from_py_object_no_sync)
      api = found;
    Py_DECREF(capsule);  // the table is static in the producer: the pointer stays valid
  }
  PyErr_Clear();
  for (Entry& e : cache) {
    if (!e.type) {
      Py_INCREF(type);  // types in the cache live for the process
      e = Entry{type, api};
      break;
    }
  }
  return api;
}

}  // namespace dlpack_exchange

// Fills `info` from a DLTensor (strides null = row-major compact).
inline void fill_from_dltensor(const nb::dlpack::dltensor& t, ArrayInfo& info, const char* name,
                               const char* fn) {
  if (t.ndim > kMaxDims) {
    throw nb::value_error((std::string(fn) + ": " + name + ": expected at most " +
                           std::to_string(kMaxDims) + " dimensions, got " + std::to_string(t.ndim))
                              .c_str());
  }
  info.ndim = t.ndim;
  int64_t compact = 1;
  for (int d = info.ndim - 1; d >= 0; --d) {
    info.shape[d] = t.shape[d];
    info.strides[d] = t.strides ? t.strides[d] : compact;
    compact *= t.shape[d];
  }
  info.data = static_cast<char*>(t.data) + t.byte_offset;
  info.dtype = t.dtype;
  info.device_type = t.device.device_type;
  info.device_id = t.device.device_id;
}

// An array argument of `fn`: a torch tensor or any DLPack / buffer-protocol array.
// Access::write refuses read-only arrays (e.g. numpy.broadcast_to views).
inline ArrayInfo array_arg(nb::handle obj, const char* name, const char* fn,
                           Access access = Access::read) {
  if (const auto* api = dlpack_exchange::api_of(Py_TYPE(obj.ptr()))) {
    nb::dlpack::dltensor t;
    if (api->dltensor_from_py_object_no_sync(obj.ptr(), &t) == 0) {
      ArrayInfo info;
      info.name = name;
      fill_from_dltensor(t, info, name, fn);
      return info;
    }
    // Not describable by DLPack (sparse, meta, a dtype DLPack lacks ...): say why.
    nb::python_error why;
    throw nb::type_error((std::string(fn) + ": " + name + ": cannot be passed to the core: " +
                          why.what())
                             .c_str());
  }
  nb::ndarray<nb::ro> arr;
  if (!nb::try_cast(obj, arr, /*convert=*/false)) {
    throw nb::type_error((std::string(fn) + ": " + name +
                          ": expected an array (torch.Tensor, or anything that supports DLPack "
                          "or the buffer protocol), got " + describe_type(obj))
                             .c_str());
  }
  ArrayInfo info;
  info.name = name;
  nb::dlpack::dltensor t{};
  t.data = const_cast<void*>(arr.data());
  t.device = {arr.device_type(), arr.device_id()};
  t.ndim = static_cast<int32_t>(arr.ndim());
  t.dtype = arr.dtype();
  t.shape = const_cast<int64_t*>(arr.shape_ptr());
  t.strides = const_cast<int64_t*>(arr.stride_ptr());
  fill_from_dltensor(t, info, name, fn);
  if (access == Access::write) {
    nb::ndarray<> writable;
    if (!nb::try_cast(obj, writable, /*convert=*/false)) {
      throw nb::value_error((std::string(fn) + ": " + name +
                             ": expected a writable array, got a read-only " + describe_type(obj))
                                .c_str());
    }
  }
  info.view = std::move(arr);
  return info;
}

}  // namespace bindings
}  // namespace diffkern
