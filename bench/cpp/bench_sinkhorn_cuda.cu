// CUDA-event benchmark of sinkhorn_solve_cuda on the point-cloud problem:
//  - sweep: fixed Sinkhorn iterations; reports time per iteration (two sweeps) and the
//    bandwidth-floor ratio (2 n^2 sizeof(T) bytes per iteration at the measured time).
//  - newton: SNS, 20 warm-up iterations + 1 Newton round, minus the 20 iterations alone.
// Timed with the shared CUDA-event timer (cuda_timer.h): median of 9 solves after 2 warm-up
// solves, g reset before each (outside the timed region).
//   ./bench_sinkhorn_cuda [--json PATH]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_args.h"
#include "cuda_timer.h"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn_problem.h"

namespace {

using namespace diffkern;

bench::JsonObject row(const char* what, const char* dtype, int64_t n, double ms) {
  return bench::JsonObject().str("what", what).str("dtype", dtype)
      .num("n", static_cast<long long>(n)).num("ms", ms);
}

template <class T>
double time_solve(int64_t n, SinkhornMethod method, int64_t max_iter, double eps, int repeats,
                  cudaStream_t stream) {
  const auto hp = bench::make_point_cloud_problem<T>(n);
  SinkhornProblem p;
  p.n = p.m = n;
  p.cost_dtype = sizeof(T) == 8 ? DType::float64 : DType::float32;
  p.eps = eps;
  SinkhornOptions o;
  o.method = method;
  o.max_iter = max_iter;
  o.fixed_iterations = true;
  const size_t cb = sizeof(T) * n * n;
  void *cost, *cost_t, *ws;
  double *a, *b, *f, *g, *err;
  int64_t *it, *nt;
  DK_BENCH_CUDA(cudaMalloc(&cost, cb));
  DK_BENCH_CUDA(cudaMalloc(&cost_t, cb));
  DK_BENCH_CUDA(cudaMemcpy(cost, hp.cost.data(), cb, cudaMemcpyHostToDevice));
  DK_BENCH_CUDA(cudaMemcpy(cost_t, hp.cost_t.data(), cb, cudaMemcpyHostToDevice));
  for (double** v : {&a, &b, &f, &g}) DK_BENCH_CUDA(cudaMalloc(v, sizeof(double) * n));
  DK_BENCH_CUDA(cudaMemcpy(a, hp.a.data(), sizeof(double) * n, cudaMemcpyHostToDevice));
  DK_BENCH_CUDA(cudaMemcpy(b, hp.b.data(), sizeof(double) * n, cudaMemcpyHostToDevice));
  DK_BENCH_CUDA(cudaMalloc(&err, sizeof(double)));
  DK_BENCH_CUDA(cudaMalloc(&it, sizeof(int64_t)));
  DK_BENCH_CUDA(cudaMalloc(&nt, sizeof(int64_t)));
  p.cost = cost;
  p.cost_t = cost_t;
  p.a = a;
  p.b = b;
  DK_BENCH_CUDA(cudaMalloc(&ws, sinkhorn_workspace_bytes(p, o)));
  SinkhornState s{f, g, err, it, nt};
  auto reset = [&](int) { DK_BENCH_CUDA(cudaMemsetAsync(g, 0, sizeof(double) * n, stream)); };
  auto launch = [&](int) {
    if (sinkhorn_solve_cuda(p, o, s, ws, stream) != Status::ok) {
      std::fprintf(stderr, "sinkhorn_solve_cuda failed\n");
      std::exit(1);
    }
  };
  const bench::CudaTiming t = bench::time_launches(stream, 2, repeats, launch, reset);
  for (void* v : {cost, cost_t, ws, static_cast<void*>(a), static_cast<void*>(b),
                  static_cast<void*>(f), static_cast<void*>(g), static_cast<void*>(err),
                  static_cast<void*>(it), static_cast<void*>(nt)})
    DK_BENCH_CUDA(cudaFree(v));
  return t.median_ms;
}

template <class T>
void run_dtype(std::vector<bench::JsonObject>& rows, cudaStream_t stream, double peak_gbs) {
  const char* dt = sizeof(T) == 8 ? "float64" : "float32";
  for (int64_t n : {1000, 4096}) {
    const double t10 = time_solve<T>(n, SinkhornMethod::sinkhorn, 100, 1e-2, 9, stream) / 100;
    const double floor_ms = 2.0 * sizeof(T) * n * n / (peak_gbs * 1e9) * 1e3;
    std::printf("%-26s %-8s n=%-5lld %10.4f ms   (bandwidth floor %.4f ms)\n",
                "sinkhorn iteration", dt, static_cast<long long>(n), t10, floor_ms);
    rows.push_back(row("sinkhorn_iteration", dt, n, t10));
    const double w = time_solve<T>(n, SinkhornMethod::sinkhorn, 20, 1e-3, 9, stream);
    const double wn = time_solve<T>(n, SinkhornMethod::sns, 21, 1e-3, 9, stream);
    std::printf("%-26s %-8s n=%-5lld %10.4f ms\n", "newton step (eps 1e-3)", dt,
                static_cast<long long>(n), wn - w);
    rows.push_back(row("newton_step", dt, n, wn - w));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string json = bench::parse_args(argc, argv, {});
  const cudaDeviceProp prop = bench::current_device();
  int device = 0;
  DK_BENCH_CUDA(cudaGetDevice(&device));
  int mem_clock_khz = 0, bus_bits = 0;
  cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, device);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
  const double peak_gbs = 2.0 * mem_clock_khz * 1e3 * (bus_bits / 8) / 1e9;
  std::printf("device: %s (theoretical DRAM bandwidth %.0f GB/s)\n", prop.name, peak_gbs);
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreate(&stream));
  std::vector<bench::JsonObject> rows;
  run_dtype<float>(rows, stream, peak_gbs);
  run_dtype<double>(rows, stream, peak_gbs);
  DK_BENCH_CUDA(cudaStreamDestroy(stream));
  const auto header =
      bench::JsonObject().str("benchmark", "sinkhorn_cuda").str("device", prop.name);
  if (!json.empty() && !bench::write_json(json, header, rows)) return 1;
  return 0;
}
