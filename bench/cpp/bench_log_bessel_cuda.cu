// CUDA microbenchmark of log_bessel_cuda: every op x {float64, float32}.
// A small CUDA-event harness (see README.md for why not NVBench): per case, warm-up
// launches, then `repeats` launches each timed by its own event pair; reports the median
// and the minimum, and items/s from the median. Inputs rotate over buffer sets whose total
// size exceeds the L2 cache, so a launch never finds its inputs already cached.
//   ./bench_log_bessel_cuda [--n N] [--repeats R] [--warmup W] [--json PATH]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_inputs.h"

namespace {

using namespace diffkern;

#define BENCH_CUDA(call)                                                              \
  do {                                                                                \
    cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,              \
                   cudaGetErrorString(err_));                                         \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Options {
  int64_t n = int64_t(1) << 22;
  int repeats = 50;
  int warmup = 5;
  std::string json;
};

struct Result {
  std::string op, dtype;
  double median_ms = 0, min_ms = 0, items_per_s = 0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    auto next = [&](const char* flag) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", flag);
        std::exit(2);
      }
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--n")) o.n = std::atoll(next("--n"));
    else if (!std::strcmp(argv[i], "--repeats")) o.repeats = std::atoi(next("--repeats"));
    else if (!std::strcmp(argv[i], "--warmup")) o.warmup = std::atoi(next("--warmup"));
    else if (!std::strcmp(argv[i], "--json")) o.json = next("--json");
    else {
      std::fprintf(stderr, "usage: %s [--n N] [--repeats R] [--warmup W] [--json PATH]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.n <= 0 || o.repeats <= 0 || o.warmup < 0) {
    std::fprintf(stderr, "--n and --repeats must be positive, --warmup non-negative\n");
    std::exit(2);
  }
  return o;
}

template <class T>
std::vector<Result> run_dtype(const Options& o, int l2_bytes, cudaStream_t stream) {
  const DType dtype = sizeof(T) == 8 ? DType::float64 : DType::float32;
  const char* dtype_name = sizeof(T) == 8 ? "float64" : "float32";
  const size_t bytes = static_cast<size_t>(o.n) * sizeof(T);
  // Enough (v, x, out) sets that cycling through them evicts the L2 between reuses.
  const int sets = std::max(1, std::min(8, static_cast<int>(2 * size_t(l2_bytes) / (3 * bytes)) + 1));

  std::vector<T> hv, hx;
  std::vector<T*> dv(sets), dx(sets), dout(sets);
  for (int s = 0; s < sets; ++s) {
    bench::make_inputs<T>(o.n, hv, hx, 1234 + s);
    BENCH_CUDA(cudaMalloc(&dv[s], bytes));
    BENCH_CUDA(cudaMalloc(&dx[s], bytes));
    BENCH_CUDA(cudaMalloc(&dout[s], bytes));
    BENCH_CUDA(cudaMemcpy(dv[s], hv.data(), bytes, cudaMemcpyHostToDevice));
    BENCH_CUDA(cudaMemcpy(dx[s], hx.data(), bytes, cudaMemcpyHostToDevice));
  }
  const BinaryBroadcast g = bench::flat_geometry(o.n);
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));

  std::vector<Result> results;
  for (int op = 0; op < kNumLogBesselOps; ++op) {
    const auto lop = static_cast<LogBesselOp>(op);
    auto launch = [&](int i) {
      const int s = i % sets;
      const Status st = log_bessel_cuda(lop, dtype, dv[s], dx[s], dout[s], g, stream);
      if (st != Status::ok) {
        std::fprintf(stderr, "log_bessel_cuda(%s, %s) failed: %s\n", bench::kOpNames[op],
                     dtype_name, status_message(st));
        std::exit(1);
      }
    };
    for (int i = 0; i < o.warmup; ++i) launch(i);
    BENCH_CUDA(cudaStreamSynchronize(stream));
    std::vector<float> ms(static_cast<size_t>(o.repeats));
    for (int r = 0; r < o.repeats; ++r) {
      BENCH_CUDA(cudaEventRecord(start, stream));
      launch(r);
      BENCH_CUDA(cudaEventRecord(stop, stream));
      BENCH_CUDA(cudaEventSynchronize(stop));
      BENCH_CUDA(cudaEventElapsedTime(&ms[static_cast<size_t>(r)], start, stop));
    }
    std::sort(ms.begin(), ms.end());
    Result res;
    res.op = bench::kOpNames[op];
    res.dtype = dtype_name;
    res.median_ms = ms[ms.size() / 2];
    res.min_ms = ms.front();
    res.items_per_s = static_cast<double>(o.n) / (res.median_ms * 1e-3);
    std::printf("%-12s %-8s %12.4f %12.4f %14.4g\n", res.op.c_str(), res.dtype.c_str(),
                res.median_ms, res.min_ms, res.items_per_s);
    results.push_back(res);
  }
  BENCH_CUDA(cudaEventDestroy(start));
  BENCH_CUDA(cudaEventDestroy(stop));
  for (int s = 0; s < sets; ++s) {
    BENCH_CUDA(cudaFree(dv[s]));
    BENCH_CUDA(cudaFree(dx[s]));
    BENCH_CUDA(cudaFree(dout[s]));
  }
  return results;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int device = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, device));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::printf("log_bessel_cuda on %s (sm_%d%d), n = %lld, %d repeats after %d warm-up\n",
              prop.name, prop.major, prop.minor, static_cast<long long>(o.n), o.repeats, o.warmup);
  std::printf("%-12s %-8s %12s %12s %14s\n", "op", "dtype", "median_ms", "min_ms", "items/s");
  std::vector<Result> all = run_dtype<double>(o, prop.l2CacheSize, stream);
  std::vector<Result> f32 = run_dtype<float>(o, prop.l2CacheSize, stream);
  all.insert(all.end(), f32.begin(), f32.end());
  BENCH_CUDA(cudaStreamDestroy(stream));

  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (!f) {
      std::perror(o.json.c_str());
      return 1;
    }
    std::fprintf(f, "{\n  \"benchmark\": \"log_bessel_cuda\",\n  \"device\": \"%s\",\n", prop.name);
    std::fprintf(f, "  \"n\": %lld,\n  \"repeats\": %d,\n  \"warmup\": %d,\n  \"results\": [\n",
                 static_cast<long long>(o.n), o.repeats, o.warmup);
    for (size_t i = 0; i < all.size(); ++i) {
      const Result& r = all[i];
      std::fprintf(f,
                   "    {\"op\": \"%s\", \"dtype\": \"%s\", \"median_ms\": %.6g, \"min_ms\": %.6g, "
                   "\"items_per_s\": %.6g}%s\n",
                   r.op.c_str(), r.dtype.c_str(), r.median_ms, r.min_ms, r.items_per_s,
                   i + 1 < all.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return 0;
}
