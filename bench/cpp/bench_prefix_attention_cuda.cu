// CUDA microbenchmark of the shared-prefix attention kernels: forward, backward (atomic
// dQ) and backward (deterministic) at the issue's GRPO shapes (P, S, G), bf16, 32 query
// heads, head dim 128, plus a GQA row (8 KV heads); median of `repeats` launches after
// warm-up with the shared CUDA-event timer. Useful TFLOP/s counts 4 * D * Hq per visible
// query-key pair for the forward and 2.5x that for the backward. Q/K/V of one shape are
// over 100 MB, well past the L2, so inputs need no rotation.
//   ./bench_prefix_attention_cuda [--repeats R] [--warmup W] [--json PATH]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "common/half_types.h"
#include "cuda_timer.h"
#include "prefix_attention/prefix_attention.h"

namespace {

using namespace diffkern;

struct Options {
  int repeats = 30;
  int warmup = 5;
  std::string json;
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
    if (!std::strcmp(argv[i], "--repeats")) o.repeats = std::atoi(next("--repeats"));
    else if (!std::strcmp(argv[i], "--warmup")) o.warmup = std::atoi(next("--warmup"));
    else if (!std::strcmp(argv[i], "--json")) o.json = next("--json");
    else {
      std::fprintf(stderr, "usage: %s [--repeats R] [--warmup W] [--json PATH]\n", argv[0]);
      std::exit(2);
    }
  }
  if (o.repeats <= 0 || o.warmup < 0) {
    std::fprintf(stderr, "--repeats must be positive, --warmup non-negative\n");
    std::exit(2);
  }
  return o;
}

// One group [prefix, suffix x G] in the layout of prefix_attention.h, on the device.
struct DeviceLayout {
  std::vector<int64_t*> arrays;
  PrefixSegments seg;
  PrefixGroups groups;
  int64_t tokens = 0;
  double pairs = 0;  // visible query-key pairs

  DeviceLayout(int64_t P, int64_t S, int64_t G) {
    std::vector<int64_t> q_start, length, p_start, p_len;
    q_start.push_back(0), length.push_back(P), p_start.push_back(0), p_len.push_back(0);
    for (int64_t i = 0; i < G; ++i) {
      q_start.push_back(P + i * S), length.push_back(S), p_start.push_back(0), p_len.push_back(P);
    }
    tokens = P + G * S;
    pairs = 0.5 * P * (P + 1) + G * (S * P + 0.5 * S * (S + 1));
    const int64_t n = static_cast<int64_t>(length.size());
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return p_len[a] + length[a] > p_len[b] + length[b];
    });
    auto tiles = [&](int64_t b) {
      std::vector<int64_t> cum(1, 0);
      for (int64_t i : order) cum.push_back(cum.back() + (length[i] + b - 1) / b);
      return cum;
    };
    const std::vector<int64_t> g_pref{0}, g_first{1}, g_num{G};
    const int64_t* ptr[10];
    int k = 0;
    for (const std::vector<int64_t>* v : {&q_start, &length, &p_start, &p_len, &order}) ptr[k++] = upload(*v);
    ptr[k++] = upload(tiles(64));
    ptr[k++] = upload(tiles(128));
    for (const std::vector<int64_t>* v : {&g_pref, &g_first, &g_num}) ptr[k++] = upload(*v);
    seg = {ptr[0], ptr[1], ptr[2], ptr[3], n, ptr[4], ptr[5], ptr[6]};
    groups = {ptr[7], ptr[8], ptr[9], 1};
  }
  const int64_t* upload(const std::vector<int64_t>& v) {
    int64_t* d = nullptr;
    DK_BENCH_CUDA(cudaMalloc(&d, v.size() * sizeof(int64_t)));
    DK_BENCH_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
    arrays.push_back(d);
    return d;
  }
  ~DeviceLayout() {
    for (int64_t* d : arrays) cudaFree(d);
  }
};

// (T, H, D) bf16 filled with uniform values in [-1, 1) from a fixed LCG (never zeros).
void* random_tensor(int64_t elems, uint64_t seed) {
  std::vector<BFloat16> h(static_cast<size_t>(elems));
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& x : h) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = BFloat16::from_float(static_cast<float>((s >> 40) * (2.0 / 16777216.0) - 1.0));
  }
  void* d = nullptr;
  DK_BENCH_CUDA(cudaMalloc(&d, elems * 2));
  DK_BENCH_CUDA(cudaMemcpy(d, h.data(), elems * 2, cudaMemcpyHostToDevice));
  return d;
}

void check(Status st, const char* what) {
  if (!st.is_ok()) {
    std::fprintf(stderr, "%s failed: %s (cuda error %d)\n", what, status_message(st), st.cuda_error());
    std::exit(1);
  }
}

void run_shape(const Options& o, int64_t P, int64_t S, int64_t G, int hkv, cudaStream_t stream,
               std::vector<bench::JsonObject>& rows) {
  constexpr int kHeads = 32, kDim = 128;
  DeviceLayout L(P, S, G);
  const int64_t T = L.tokens;
  PrefixAttentionShape shape;
  shape.total_tokens = T;
  shape.num_heads_q = kHeads;
  shape.num_heads_kv = hkv;
  shape.head_dim = kDim;
  shape.scale = 1.f / std::sqrt(static_cast<float>(kDim));
  shape.dtype = DType::bfloat16;
  auto tensor = [&](void* data, int heads) {
    return AttentionTensor{data, int64_t(heads) * kDim, kDim};
  };
  std::vector<void*> bufs;
  auto make = [&](int heads, uint64_t seed) {
    bufs.push_back(random_tensor(T * heads * kDim, seed));
    return tensor(bufs.back(), heads);
  };
  PrefixAttentionForward f;
  f.shape = shape, f.segments = L.seg, f.groups = L.groups;
  f.q = make(kHeads, 1), f.k = make(hkv, 2), f.v = make(hkv, 3), f.out = make(kHeads, 4);
  DK_BENCH_CUDA(cudaMalloc(&f.lse, T * kHeads * sizeof(float)));
  PrefixAttentionBackward b;
  b.shape = shape, b.segments = L.seg, b.groups = L.groups;
  b.q = f.q, b.k = f.k, b.v = f.v, b.out = f.out, b.lse = f.lse;
  b.dout = make(kHeads, 5), b.dq = make(kHeads, 6), b.dk = make(hkv, 7), b.dv = make(hkv, 8);
  const int64_t ws_bytes = prefix_attention_backward_workspace_bytes(shape, L.seg.count, 1, false);
  DK_BENCH_CUDA(cudaMalloc(&b.workspace, ws_bytes));  // the larger of the two modes

  check(prefix_attention_forward_cuda(f, stream), "prefix_attention_forward_cuda");
  const double fwd_flop = 4.0 * kDim * kHeads * L.pairs;
  const struct {
    const char* name;
    double flop;
    bool deterministic;
    bool forward;
  } passes[] = {{"forward", fwd_flop, false, true},
                {"backward", 2.5 * fwd_flop, false, false},
                {"backward_det", 2.5 * fwd_flop, true, false}};
  for (const auto& pass : passes) {
    b.deterministic = pass.deterministic;
    auto launch = [&](int) {
      if (pass.forward) check(prefix_attention_forward_cuda(f, stream), "forward");
      else check(prefix_attention_backward_cuda(b, stream), "backward");
    };
    const bench::CudaTiming t = bench::time_launches(stream, o.warmup, o.repeats, launch);
    const double tflops = pass.flop / (t.median_ms * 1e-3) / 1e12;
    std::printf("(%5lld, %4lld, %2lld) %2d/%-2d %-13s %10.3f %10.3f %9.1f\n",
                static_cast<long long>(P), static_cast<long long>(S), static_cast<long long>(G),
                kHeads, hkv, pass.name, t.median_ms, t.min_ms, tflops);
    rows.push_back(bench::JsonObject()
                       .num("P", static_cast<long long>(P))
                       .num("S", static_cast<long long>(S))
                       .num("G", static_cast<long long>(G))
                       .num("heads_q", kHeads)
                       .num("heads_kv", hkv)
                       .str("pass", pass.name)
                       .num("median_ms", t.median_ms)
                       .num("min_ms", t.min_ms)
                       .num("tflops", tflops));
  }
  for (void* p : bufs) DK_BENCH_CUDA(cudaFree(p));
  DK_BENCH_CUDA(cudaFree(f.lse));
  DK_BENCH_CUDA(cudaFree(b.workspace));
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const cudaDeviceProp prop = bench::current_device();
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::printf("prefix_attention_cuda on %s (sm_%d%d), bf16, head dim 128, %d repeats after %d warm-up\n",
              prop.name, prop.major, prop.minor, o.repeats, o.warmup);
  std::printf("%-18s %-5s %-13s %10s %10s %9s\n", "(P, S, G)", "heads", "pass", "median_ms",
              "min_ms", "TFLOP/s");
  std::vector<bench::JsonObject> rows;
  const int64_t shapes[][3] = {{1024, 512, 8}, {4096, 512, 8}, {8192, 512, 16}, {4096, 1024, 4}};
  for (const auto& s : shapes) run_shape(o, s[0], s[1], s[2], 32, stream, rows);
  run_shape(o, 4096, 512, 8, 8, stream, rows);  // GQA
  DK_BENCH_CUDA(cudaStreamDestroy(stream));
  if (!o.json.empty()) {
    const auto header = bench::JsonObject()
                            .str("benchmark", "prefix_attention_cuda")
                            .str("device", prop.name)
                            .num("repeats", o.repeats)
                            .num("warmup", o.warmup);
    if (!bench::write_json(o.json, header, rows)) return 1;
  }
  return 0;
}
