// Google Benchmark of log_bessel_cpu: every op x {float64, float32} x {1 thread, all
// OpenMP threads} on 1e5 (v, x) points. Reports items/s (elements per second).
//   ./bench_log_bessel_cpu --benchmark_format=json --benchmark_out=cpu.json
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "bench_inputs.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using namespace diffkern;
constexpr int64_t kPoints = 100000;

template <class T>
void run(benchmark::State& state, LogBesselOp op, int num_threads) {
  std::vector<T> v, x, out(static_cast<size_t>(kPoints));
  bench::make_inputs<T>(kPoints, v, x);
  const BinaryBroadcast g = bench::flat_geometry(kPoints);
  const DType dtype = sizeof(T) == 8 ? DType::float64 : DType::float32;
  for (auto _ : state) {
    const Status s = log_bessel_cpu(op, dtype, v.data(), x.data(), out.data(), g, num_threads);
    if (s != Status::ok) {
      state.SkipWithError(status_message(s));
      break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kPoints);
}

}  // namespace

int main(int argc, char** argv) {
#if defined(_OPENMP)
  const int all_threads = omp_get_max_threads();
#else
  const int all_threads = 1;
#endif
  for (int op = 0; op < kNumLogBesselOps; ++op) {
    for (int threads : {1, all_threads}) {
      const std::string suffix = std::string("/threads:") + std::to_string(threads);
      const auto lop = static_cast<LogBesselOp>(op);
      benchmark::RegisterBenchmark(
          (std::string("log_bessel_cpu/") + kLogBesselOpNames[op] + "/float64" + suffix).c_str(),
          [lop, threads](benchmark::State& s) { run<double>(s, lop, threads); })
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();  // OpenMP threads do the work: CPU time of the main thread lies
      benchmark::RegisterBenchmark(
          (std::string("log_bessel_cpu/") + kLogBesselOpNames[op] + "/float32" + suffix).c_str(),
          [lop, threads](benchmark::State& s) { run<float>(s, lop, threads); })
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
      if (all_threads == 1) break;  // one machine thread: the two variants coincide
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
