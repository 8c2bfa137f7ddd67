// CUDA microbenchmark of log_bessel_cuda: every op x {float64, float32}, timed with the
// shared CUDA-event timer (cuda_timer.h): median and minimum of `repeats` launches after
// warm-up, items/s from the median. Inputs rotate over buffer sets whose total size exceeds
// the L2 cache, so a launch never finds its inputs already cached.
//   ./bench_log_bessel_cuda [--n N] [--repeats R] [--warmup W] [--json PATH]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_args.h"
#include "bench_inputs.h"
#include "cuda_timer.h"

namespace {

using namespace diffkern;

struct Options {
  long long n = 1LL << 22;
  long long repeats = 50;
  long long warmup = 5;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  o.json = bench::parse_args(argc, argv, {{"n", &o.n, 1}, {"repeats", &o.repeats, 1},
                                          {"warmup", &o.warmup, 0}});
  return o;
}

template <class T>
void run_dtype(const Options& o, int l2_bytes, cudaStream_t stream,
               std::vector<bench::JsonObject>& rows) {
  const DType dtype = sizeof(T) == 8 ? DType::float64 : DType::float32;
  const char* dtype_name = sizeof(T) == 8 ? "float64" : "float32";
  const size_t bytes = static_cast<size_t>(o.n) * sizeof(T);
  // Enough (v, x, out) sets that cycling through them evicts the L2 between reuses.
  const int sets = std::max(1, std::min(8, static_cast<int>(2 * size_t(l2_bytes) / (3 * bytes)) + 1));

  std::vector<T> hv, hx;
  std::vector<T*> dv(sets), dx(sets), dout(sets);
  for (int s = 0; s < sets; ++s) {
    bench::make_inputs<T>(o.n, hv, hx, 1234 + s);
    DK_BENCH_CUDA(cudaMalloc(&dv[s], bytes));
    DK_BENCH_CUDA(cudaMalloc(&dx[s], bytes));
    DK_BENCH_CUDA(cudaMalloc(&dout[s], bytes));
    DK_BENCH_CUDA(cudaMemcpy(dv[s], hv.data(), bytes, cudaMemcpyHostToDevice));
    DK_BENCH_CUDA(cudaMemcpy(dx[s], hx.data(), bytes, cudaMemcpyHostToDevice));
  }
  const BinaryBroadcast g = bench::flat_geometry(o.n);

  for (int op = 0; op < kNumLogBesselOps; ++op) {
    const auto lop = static_cast<LogBesselOp>(op);
    auto launch = [&](int i) {
      const int s = i % sets;
      const Status st = log_bessel_cuda(lop, dtype, dv[s], dx[s], dout[s], g, stream);
      if (st != Status::ok) {
        std::fprintf(stderr, "log_bessel_cuda(%s, %s) failed: %s\n", kLogBesselOpNames[op],
                     dtype_name, status_message(st));
        std::exit(1);
      }
    };
    const bench::CudaTiming t = bench::time_launches(stream, static_cast<int>(o.warmup), static_cast<int>(o.repeats), launch);
    const double items_per_s = static_cast<double>(o.n) / (t.median_ms * 1e-3);
    std::printf("%-12s %-8s %12.4f %12.4f %14.4g\n", kLogBesselOpNames[op], dtype_name,
                t.median_ms, t.min_ms, items_per_s);
    rows.push_back(bench::JsonObject()
                       .str("op", kLogBesselOpNames[op])
                       .str("dtype", dtype_name)
                       .num("median_ms", t.median_ms)
                       .num("min_ms", t.min_ms)
                       .num("items_per_s", items_per_s));
  }
  for (int s = 0; s < sets; ++s) {
    DK_BENCH_CUDA(cudaFree(dv[s]));
    DK_BENCH_CUDA(cudaFree(dx[s]));
    DK_BENCH_CUDA(cudaFree(dout[s]));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const cudaDeviceProp prop = bench::current_device();
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::printf("log_bessel_cuda on %s (sm_%d%d), n = %lld, %lld repeats after %lld warm-up\n",
              prop.name, prop.major, prop.minor, static_cast<long long>(o.n), o.repeats, o.warmup);
  std::printf("%-12s %-8s %12s %12s %14s\n", "op", "dtype", "median_ms", "min_ms", "items/s");
  std::vector<bench::JsonObject> rows;
  run_dtype<double>(o, prop.l2CacheSize, stream, rows);
  run_dtype<float>(o, prop.l2CacheSize, stream, rows);
  DK_BENCH_CUDA(cudaStreamDestroy(stream));

  if (!o.json.empty()) {
    const auto header = bench::JsonObject()
                            .str("benchmark", "log_bessel_cuda")
                            .str("device", prop.name)
                            .num("n", static_cast<long long>(o.n))
                            .num("repeats", o.repeats)
                            .num("warmup", o.warmup);
    if (!bench::write_json(o.json, header, rows)) return 1;
  }
  return 0;
}
