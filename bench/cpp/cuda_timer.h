// The one CUDA timer of the C++ microbenchmarks (bench_<family>_cuda.cu), plus the JSON
// rows they write. Why not NVBench: README.md.
//
// time_launches(): `warmup` untimed launches, then `repeats` launches each between its own
// pair of CUDA events on `stream`, synchronized one at a time (so host time between
// launches never lands inside a measurement); median and minimum in milliseconds. A
// `setup(i)` runs before launch i's start event (resetting state is not timed). Callers
// rotate their inputs by the launch index so a launch does not find them in L2.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#define DK_BENCH_CUDA(call)                                                              \
  do {                                                                                   \
    cudaError_t err_ = (call);                                                           \
    if (err_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                 \
                   cudaGetErrorString(err_));                                            \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

namespace diffkern {
namespace bench {

struct CudaTiming {
  double median_ms = 0, min_ms = 0;
  int runs = 0;
};

struct NoSetup {
  void operator()(int) const {}
};

template <class Launch, class Setup = NoSetup>
CudaTiming time_launches(cudaStream_t stream, int warmup, int repeats, Launch&& launch,
                         Setup&& setup = Setup()) {
  for (int i = 0; i < warmup; ++i) {
    setup(i);
    launch(i);
  }
  DK_BENCH_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  DK_BENCH_CUDA(cudaEventCreate(&start));
  DK_BENCH_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms(static_cast<size_t>(std::max(repeats, 1)));
  for (size_t r = 0; r < ms.size(); ++r) {
    const int i = warmup + static_cast<int>(r);  // keep rotating past the warm-up inputs
    setup(i);
    DK_BENCH_CUDA(cudaEventRecord(start, stream));
    launch(i);
    DK_BENCH_CUDA(cudaEventRecord(stop, stream));
    DK_BENCH_CUDA(cudaEventSynchronize(stop));
    DK_BENCH_CUDA(cudaEventElapsedTime(&ms[r], start, stop));
  }
  DK_BENCH_CUDA(cudaEventDestroy(start));
  DK_BENCH_CUDA(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  CudaTiming t;
  t.median_ms = ms[ms.size() / 2];
  t.min_ms = ms.front();
  t.runs = static_cast<int>(ms.size());
  return t;
}

// Name and properties of the current device (for the header line and the JSON).
inline cudaDeviceProp current_device() {
  int device = 0;
  DK_BENCH_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  DK_BENCH_CUDA(cudaGetDeviceProperties(&prop, device));
  return prop;
}

// A flat JSON object of string and number fields: one benchmark row, or the header.
class JsonObject {
 public:
  JsonObject& str(const char* key, const std::string& value) {
    fields_.emplace_back(key, quote(value));
    return *this;
  }
  JsonObject& num(const char* key, double value) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", value);
    fields_.emplace_back(key, buf);
    return *this;
  }
  JsonObject& num(const char* key, long long value) {
    fields_.emplace_back(key, std::to_string(value));
    return *this;
  }
  JsonObject& num(const char* key, int value) { return num(key, static_cast<long long>(value)); }
  std::string body() const {  // "k": v, ... without braces
    std::string s;
    for (size_t i = 0; i < fields_.size(); ++i)
      s += (i ? ", " : "") + quote(fields_[i].first) + ": " + fields_[i].second;
    return s;
  }

 private:
  static std::string quote(const std::string& v) {
    std::string s = "\"";
    for (char c : v) {
      if (c == '"' || c == '\\') s += '\\';
      s += c;
    }
    return s + "\"";
  }
  std::vector<std::pair<std::string, std::string>> fields_;
};

// {header fields..., "results": [rows...]} to `path`; false (with perror) if it cannot.
inline bool write_json(const std::string& path, const JsonObject& header,
                       const std::vector<JsonObject>& rows) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::perror(path.c_str());
    return false;
  }
  const std::string head = header.body();
  std::fprintf(f, "{%s%s\"results\": [\n", head.c_str(), head.empty() ? "" : ", ");
  for (size_t i = 0; i < rows.size(); ++i)
    std::fprintf(f, "  {%s}%s\n", rows[i].body().c_str(), i + 1 < rows.size() ? "," : "");
  std::fprintf(f, "]}\n");
  std::fclose(f);
  return true;
}

}  // namespace bench
}  // namespace diffkern
