// Google Benchmark of sinkhorn_solve_cpu on the point-cloud problem (n = 500, 1000):
//  - Sweep: 10 fixed Sinkhorn iterations (each = a row and a column log-sum-exp sweep);
//    items/s = cost entries swept per second.
//  - NewtonStep: SNS with 20 warm-up iterations and 1 Newton round, minus nothing: compare
//    with Warmup20 (the same 20 iterations alone) to read the Newton step's cost.
//   ./bench_sinkhorn_cpu --benchmark_format=json --benchmark_out=sinkhorn_cpu.json
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "sinkhorn/sinkhorn.h"
#include "sinkhorn_problem.h"

namespace {

using namespace diffkern;

template <class T>
void run(benchmark::State& state, SinkhornMethod method, int64_t max_iter, double eps) {
  const int64_t n = state.range(0);
  const auto hp = bench::make_point_cloud_problem<T>(n);
  SinkhornProblem p;
  p.n = p.m = n;
  p.cost_dtype = sizeof(T) == 8 ? DType::float64 : DType::float32;
  p.cost = hp.cost.data();
  p.cost_t = hp.cost_t.data();
  p.a = hp.a.data();
  p.b = hp.b.data();
  p.eps = eps;
  SinkhornOptions o;
  o.method = method;
  o.max_iter = max_iter;
  o.fixed_iterations = true;
  std::vector<double> f(n), g(n), err(1);
  std::vector<int64_t> it(1), nt(1);
  std::vector<double> ws(sinkhorn_workspace_bytes(p, o) / sizeof(double) + 1);
  SinkhornState s{f.data(), g.data(), err.data(), it.data(), nt.data()};
  for (auto _ : state) {
    std::fill(g.begin(), g.end(), 0.0);
    const Status st = sinkhorn_solve_cpu(p, o, s, ws.data(), 0);
    if (st != Status::ok) {
      state.SkipWithError(status_message(st));
      break;
    }
    benchmark::DoNotOptimize(f.data());
  }
  state.SetItemsProcessed(state.iterations() * max_iter * 2 * n * n);
  state.counters["marginal_error"] = err[0];
}

}  // namespace

int main(int argc, char** argv) {
  for (int64_t n : {500, 1000}) {
    const std::string sz = "/n:" + std::to_string(n);
    benchmark::RegisterBenchmark(("Sweep10/float64" + sz).c_str(), run<double>,
                                 SinkhornMethod::sinkhorn, 10, 1e-2)->Arg(n);
    benchmark::RegisterBenchmark(("Sweep10/float32" + sz).c_str(), run<float>,
                                 SinkhornMethod::sinkhorn, 10, 1e-2)->Arg(n);
    benchmark::RegisterBenchmark(("Warmup20/float64" + sz).c_str(), run<double>,
                                 SinkhornMethod::sinkhorn, 20, 1e-3)->Arg(n);
    benchmark::RegisterBenchmark(("Warmup20+NewtonStep/float64" + sz).c_str(), run<double>,
                                 SinkhornMethod::sns, 21, 1e-3)->Arg(n);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
