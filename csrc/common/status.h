// Status codes returned by every core entry point. The core never throws across
// its C++ boundary; the bindings turn a bad status into a Python exception.
#pragma once

namespace diffkern {

enum class Status : int {
  ok = 0,
  invalid_argument = 1,   // a size, stride, dtype or pointer the core cannot accept
  unsupported = 2,        // valid request, but this build cannot do it (e.g. no CUDA)
  cuda_error = 3,         // a CUDA runtime call or kernel launch failed
};

inline const char* status_message(Status s) {
  switch (s) {
    case Status::ok: return "ok";
    case Status::invalid_argument: return "invalid argument";
    case Status::unsupported: return "not supported by this build";
    case Status::cuda_error: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace diffkern
