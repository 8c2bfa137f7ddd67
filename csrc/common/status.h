// Status returned by every core entry point. The core never throws across its C++
// boundary; the bindings turn a bad status into a Python exception. A CUDA failure carries
// the cudaError_t value, so users see cudaGetErrorString's text, not just "CUDA error".
#pragma once

namespace diffkern {

class Status {
 public:
  enum class Code : int {
    ok = 0,
    invalid_argument = 1,  // a size, stride, dtype or pointer the core cannot accept
    unsupported = 2,       // valid request, but this build cannot do it (e.g. no CUDA)
    cuda_error = 3,        // a CUDA runtime call or kernel launch failed (see cuda_error())
  };

  // Written `Status::ok` etc. at call sites, like the enum this class replaced.
  static const Status ok;
  static const Status invalid_argument;
  static const Status unsupported;

  constexpr Status() = default;
  constexpr explicit Status(Code code, int cuda_error = 0) : code_(code), cuda_error_(cuda_error) {}
  // A failed CUDA call: `error` is its cudaError_t (kept as int: this header needs no CUDA).
  static constexpr Status cuda(int error) { return Status(Code::cuda_error, error); }

  constexpr Code code() const { return code_; }
  constexpr int cuda_error() const { return cuda_error_; }
  constexpr bool is_ok() const { return code_ == Code::ok; }
  // Statuses compare by code: any CUDA failure equals any other.
  friend constexpr bool operator==(Status a, Status b) { return a.code_ == b.code_; }
  friend constexpr bool operator!=(Status a, Status b) { return a.code_ != b.code_; }

 private:
  Code code_ = Code::ok;
  int cuda_error_ = 0;
};

inline constexpr Status Status::ok{Status::Code::ok};
inline constexpr Status Status::invalid_argument{Status::Code::invalid_argument};
inline constexpr Status Status::unsupported{Status::Code::unsupported};

// Keeps the first failure: `first_failure(s, next())` in a sequence of steps.
constexpr Status first_failure(Status so_far, Status next) { return so_far.is_ok() ? next : so_far; }

// Short text of the code (the bindings add the CUDA error string where there is one).
inline const char* status_message(Status s) {
  switch (s.code()) {
    case Status::Code::ok: return "ok";
    case Status::Code::invalid_argument: return "invalid argument";
    case Status::Code::unsupported: return "not supported by this build";
    case Status::Code::cuda_error: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace diffkern
