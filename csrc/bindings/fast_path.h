// The per-call fast path of small elementwise ops, in C++: when a call needs nothing from
// torch's dispatcher, the bindings check that, allocate the output and run the core in one
// Python-to-C++ crossing (the Python version of the same steps costs ~2 us more per call,
// which is most of a one-element call).
//
// The bindings still link no torch: diffkern/_ops.py registers the few torch callables the
// checks need (register_fast_path), and they are called like any Python object. Whatever
// the fast path cannot decide cheaply (broadcasting, mixed dtypes or devices, subclasses,
// autograd, functorch transforms) returns None, and the Python path takes over; the Python
// caller tests torch.compiler.is_compiling() first, so compiled code never comes here.
#pragma once
#include <nanobind/nanobind.h>

#include "bindings/array_arg.h"

namespace diffkern {
namespace bindings {

struct FastPathHooks {
  bool ready = false;
  nb::object tensor_type;      // torch.Tensor: exactly this type (no subclass, no fake tensor)
  nb::object grad_enabled;     // torch.is_grad_enabled
  nb::object functorch_level;  // torch._C._functorch.maybe_current_level (None: no transform)
  nb::object empty_like;       // torch.empty_like
  nb::object num_threads;      // torch.get_num_threads
  nb::object current_stream;   // (device_index) -> cudaStream_t as int
};

inline FastPathHooks& fast_path_hooks() {
  static FastPathHooks* hooks = new FastPathHooks();  // never destroyed: outlives interpreter teardown order issues
  return *hooks;
}

inline void register_fast_path(nb::object tensor_type, nb::object grad_enabled,
                               nb::object functorch_level, nb::object empty_like,
                               nb::object num_threads, nb::object current_stream) {
  FastPathHooks& h = fast_path_hooks();
  h.tensor_type = std::move(tensor_type);
  h.grad_enabled = std::move(grad_enabled);
  h.functorch_level = std::move(functorch_level);
  h.empty_like = std::move(empty_like);
  h.num_threads = std::move(num_threads);
  h.current_stream = std::move(current_stream);
  h.ready = true;
}

// True when every argument is exactly a torch.Tensor, no functorch transform is active and
// no argument needs autograd: a direct core call then gives the registered op's result.
template <class... Handles>
bool fast_path_allowed(Handles... args) {
  const FastPathHooks& h = fast_path_hooks();
  if (!h.ready) return false;
  if (!(args.type().is(h.tensor_type) && ...)) return false;
  if (!h.functorch_level().is_none()) return false;
  if (nb::cast<bool>(h.grad_enabled())) {
    if ((nb::cast<bool>(args.attr("requires_grad")) || ...)) return false;
  }
  return true;
}

}  // namespace bindings
}  // namespace diffkern
