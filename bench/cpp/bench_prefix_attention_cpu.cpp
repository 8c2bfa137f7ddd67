// Google Benchmark of the CPU shared-prefix attention kernels (exact, double accumulation):
// one group of a P-token prompt and G completions of S tokens, float32, 8 query / 2 KV heads,
// head dim 64. items/s = useful FLOPs per second (4 D per visible query-key pair forward,
// 10 D forward+backward: the math's count, not the kernel's recomputation).
//   ./bench_prefix_attention_cpu --benchmark_format=json --benchmark_out=prefix_attention_cpu.json
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "prefix_attention/prefix_attention.h"

namespace {

using namespace diffkern;

constexpr int kHq = 8, kHkv = 2, kD = 64;

// The index arrays diffkern.PrefixLayout would build for one group (prefix segment, then
// the G suffix segments); the CPU kernels do not read the schedule, so it is left out.
struct OneGroup {
  std::vector<int64_t> q_start, length, prefix_start, prefix_length, g_prefix{0}, g_first{1}, g_num;
  int64_t tokens = 0;
  double pairs = 0;  // visible (query, key) pairs per head
  OneGroup(int64_t P, int64_t S, int64_t G) : g_num{G} {
    q_start.push_back(0), length.push_back(P), prefix_start.push_back(0), prefix_length.push_back(0);
    for (int64_t i = 0; i < G; ++i) {
      q_start.push_back(P + i * S), length.push_back(S), prefix_start.push_back(0);
      prefix_length.push_back(P);
    }
    tokens = P + G * S;
    pairs = 0.5 * P * (P + 1) + G * (S * double(P) + 0.5 * S * (S + 1));
  }
  PrefixSegments segments() const {
    PrefixSegments s;
    s.q_start = q_start.data(), s.length = length.data(), s.prefix_start = prefix_start.data();
    s.prefix_length = prefix_length.data(), s.count = int64_t(q_start.size());
    return s;
  }
  PrefixGroups groups() const { return PrefixGroups{g_prefix.data(), g_first.data(), g_num.data(), 1}; }
};

std::vector<float> random_values(int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(gen);
  return v;
}

void run(benchmark::State& state, bool backward) {
  const OneGroup g(state.range(0), state.range(1), state.range(2));
  const int64_t T = g.tokens;
  std::vector<float> q = random_values(T * kHq * kD, 1), k = random_values(T * kHkv * kD, 2),
                     v = random_values(T * kHkv * kD, 3), out(q.size()), dout = random_values(T * kHq * kD, 4),
                     dq(q.size()), dk(k.size()), dv(v.size()), lse(static_cast<size_t>(T * kHq));
  PrefixAttentionShape shape;
  shape.total_tokens = T, shape.num_heads_q = kHq, shape.num_heads_kv = kHkv, shape.head_dim = kD;
  shape.scale = 1.0 / std::sqrt(double(kD));
  auto tensor = [](std::vector<float>& x, int heads) { return AttentionTensor{x.data(), heads * kD, kD}; };
  PrefixAttentionForward f;
  f.shape = shape, f.segments = g.segments(), f.groups = g.groups();
  f.q = tensor(q, kHq), f.k = tensor(k, kHkv), f.v = tensor(v, kHkv), f.out = tensor(out, kHq);
  f.lse = lse.data();
  PrefixAttentionBackward b;
  b.shape = shape, b.segments = f.segments, b.groups = f.groups;
  b.q = f.q, b.k = f.k, b.v = f.v, b.out = f.out, b.dout = tensor(dout, kHq), b.lse = lse.data();
  b.dq = tensor(dq, kHq), b.dk = tensor(dk, kHkv), b.dv = tensor(dv, kHkv);
  for (auto _ : state) {
    Status st = prefix_attention_forward_cpu(f, 0);
    if (st.is_ok() && backward) st = prefix_attention_backward_cpu(b, 0);
    if (!st.is_ok()) {
      state.SkipWithError(status_message(st));
      break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(dq.data());
  }
  const double flops = g.pairs * kHq * kD * (backward ? 10.0 : 4.0);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * flops));
}

}  // namespace

int main(int argc, char** argv) {
  // (P, S, G): a short and a long prompt, 8 completions each.
  // (P, S, G): a short and a long prompt, 8 completions each. Real time: the kernels run
  // on every OpenMP thread, the CPU-time column counts the calling thread's only.
  for (auto [P, S, G] : {std::tuple<int64_t, int64_t, int64_t>{256, 64, 8}, {1024, 128, 8}}) {
    for (bool bwd : {false, true})
      benchmark::RegisterBenchmark(bwd ? "ForwardBackward/float32" : "Forward/float32", run, bwd)
          ->Args({P, S, G})
          ->ArgNames({"P", "S", "G"})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
