// Google Benchmark of fd_perturb_cpu: fp32 / fp16 / bf16 storage, Gaussian and Rademacher,
// 1 thread and all OpenMP threads, over a list of mixed-size tensors (2^21 elements in all).
// Reports bytes/s (read + write of the parameters) and a memcpy of the same bytes.
//   ./bench_fd_grad_cpu --benchmark_format=json --benchmark_out=cpu.json
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fd_grad/fd_grad.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using namespace diffkern;

// Weights, biases and norms, like a transformer's layers.
const std::vector<int64_t> kSizes = {1 << 20, 1024, 1024, 1 << 19, 511, (1 << 19) - 515};

struct List {
  std::vector<std::vector<char>> storage;
  std::vector<int64_t> desc;
  int64_t total_groups = 0, bytes = 0;
};

List make_list(DType dtype) {
  const int64_t elem = dtype == DType::float32 ? 4 : 2;
  List l;
  for (size_t t = 0; t < kSizes.size(); ++t) {
    l.storage.emplace_back(static_cast<size_t>(kSizes[t] * elem), 0);
    l.desc.insert(l.desc.end(), {static_cast<int64_t>(reinterpret_cast<uintptr_t>(l.storage.back().data())),
                                 kSizes[t], static_cast<int64_t>(dtype), static_cast<int64_t>(t),
                                 l.total_groups});
    l.total_groups += (kSizes[t] + kFdGroupElems - 1) / kFdGroupElems;
    l.bytes += kSizes[t] * elem;
  }
  return l;
}

void perturb(benchmark::State& state, DType dtype, fd::Distribution dist, int threads) {
  List l = make_list(dtype);
  const int64_t n = static_cast<int64_t>(kSizes.size());
  uint32_t k = 0;
  for (auto _ : state) {
    const Status s = fd_perturb_cpu(l.desc.data(), nullptr, n, l.total_groups, 42, k++, 1e-3f, dist,
                                    nullptr, threads);
    if (s != Status::ok) {
      state.SkipWithError(status_message(s));
      break;
    }
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * l.bytes);
}

void copy(benchmark::State& state, DType dtype) {
  List l = make_list(dtype);
  std::vector<char> dst(static_cast<size_t>(l.bytes)), src(static_cast<size_t>(l.bytes), 1);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), dst.size());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * l.bytes);
}

}  // namespace

int main(int argc, char** argv) {
#if defined(_OPENMP)
  const int all_threads = omp_get_max_threads();
#else
  const int all_threads = 1;
#endif
  const std::pair<DType, const char*> dtypes[] = {
      {DType::float32, "float32"}, {DType::float16, "float16"}, {DType::bfloat16, "bfloat16"}};
  for (const auto& entry : dtypes) {
    const DType dtype = entry.first;  // (lambdas may not capture structured bindings in C++17)
    const char* name = entry.second;
    for (int threads : {1, all_threads}) {
      for (const auto& d : {std::pair{fd::Distribution::gaussian, "gaussian"},
                            std::pair{fd::Distribution::rademacher, "rademacher"}}) {
        const fd::Distribution dist = d.first;
        const char* dname = d.second;
        benchmark::RegisterBenchmark(
            (std::string("perturb/") + name + "/" + dname + "/threads:" + std::to_string(threads)).c_str(),
            [=](benchmark::State& s) { perturb(s, dtype, dist, threads); })
            ->UseRealTime();
      }
    }
    benchmark::RegisterBenchmark((std::string("memcpy/") + name).c_str(),
                                 [=](benchmark::State& s) { copy(s, dtype); })
        ->UseRealTime();
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
