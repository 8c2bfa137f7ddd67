// CUDA benchmark of the fused finite-difference kernels on an OPT-1.3B-sized parameter list
// (24 decoder layers of 2048 / 8192 features plus embeddings: ~1.3e9 fp16 elements in ~390
// tensors), against a device-to-device cudaMemcpyAsync of the same bytes (the floor: perturb
// reads and writes every parameter once). Rows: perturb (gaussian, rademacher), update with
// 2 terms; bytes/s counts read + write.
//   ./bench_fd_grad_cuda [--repeats R] [--warmup W] [--layers L] [--json PATH]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_args.h"
#include "cuda_timer.h"
#include "fd_grad/fd_grad.h"

namespace {

using namespace diffkern;

struct Options {
  long long repeats = 20;
  long long warmup = 3;
  long long layers = 24;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  o.json = bench::parse_args(argc, argv, {{"repeats", &o.repeats, 1}, {"warmup", &o.warmup, 0},
                                          {"layers", &o.layers, 1}});
  return o;
}

// numel of each tensor of an OPT-1.3B-like model (hidden 2048, ffn 8192, vocab 50272).
std::vector<int64_t> opt_like_sizes(int layers) {
  const int64_t h = 2048, f = 8192;
  std::vector<int64_t> s = {50272 * h, 2050 * h};  // token and position embeddings
  for (int l = 0; l < layers; ++l) {
    for (int p = 0; p < 4; ++p) s.insert(s.end(), {h * h, h});  // q, k, v, out proj + bias
    s.insert(s.end(), {h, h});                                  // attention layer norm
    s.insert(s.end(), {f * h, f, h * f, h});                    // fc1, fc2 + biases
    s.insert(s.end(), {h, h});                                  // final layer norm of the block
  }
  s.insert(s.end(), {h, h});  // final layer norm
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const cudaDeviceProp prop = bench::current_device();
  const std::vector<int64_t> sizes = opt_like_sizes(o.layers);
  // One allocation, tensors at 16-byte aligned offsets (as torch's allocator gives them).
  std::vector<int64_t> offsets;
  int64_t elems = 0;
  for (int64_t n : sizes) {
    offsets.push_back(elems);
    elems += (n + 7) / 8 * 8;
  }
  const size_t bytes = static_cast<size_t>(elems) * 2;
  char *params = nullptr, *copy_dst = nullptr;
  int64_t* desc_dev = nullptr;
  DK_BENCH_CUDA(cudaMalloc(&params, bytes));
  DK_BENCH_CUDA(cudaMalloc(&copy_dst, bytes));
  DK_BENCH_CUDA(cudaMemset(params, 0x2b, bytes));  // every fp16 element 0x2b2b = 0.0567
  std::vector<int64_t> desc, into_desc, sources;
  int64_t total_groups = 0, payload = 0;
  for (size_t t = 0; t < sizes.size(); ++t) {
    desc.insert(desc.end(), {static_cast<int64_t>(reinterpret_cast<uintptr_t>(params + 2 * offsets[t])),
                             sizes[t], static_cast<int64_t>(DType::float16), static_cast<int64_t>(t),
                             total_groups});
    // The same list perturbed out of place: rows point into copy_dst, sources into params.
    into_desc.insert(into_desc.end(), desc.end() - kFdDescriptorColumns, desc.end());
    into_desc[into_desc.size() - kFdDescriptorColumns] =
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(copy_dst + 2 * offsets[t]));
    sources.push_back(desc[desc.size() - kFdDescriptorColumns]);
    total_groups += (sizes[t] + kFdGroupElems - 1) / kFdGroupElems;
    payload += sizes[t];
  }
  const int64_t n_tensors = static_cast<int64_t>(sizes.size());
  DK_BENCH_CUDA(cudaMalloc(&desc_dev, desc.size() * sizeof(int64_t)));
  DK_BENCH_CUDA(cudaMemcpy(desc_dev, desc.data(), desc.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  int64_t *into_desc_dev = nullptr, *sources_dev = nullptr;
  DK_BENCH_CUDA(cudaMalloc(&into_desc_dev, into_desc.size() * sizeof(int64_t)));
  DK_BENCH_CUDA(cudaMemcpy(into_desc_dev, into_desc.data(), into_desc.size() * sizeof(int64_t),
                           cudaMemcpyHostToDevice));
  DK_BENCH_CUDA(cudaMalloc(&sources_dev, sources.size() * sizeof(int64_t)));
  DK_BENCH_CUDA(cudaMemcpy(sources_dev, sources.data(), sources.size() * sizeof(int64_t),
                           cudaMemcpyHostToDevice));
  cudaStream_t stream;
  DK_BENCH_CUDA(cudaStreamCreate(&stream));

  std::printf("fd_grad on %s (sm_%d%d): %lld fp16 elements in %lld tensors, %lld repeats after %lld warm-up\n",
              prop.name, prop.major, prop.minor, static_cast<long long>(payload),
              static_cast<long long>(n_tensors), o.repeats, o.warmup);
  std::printf("%-22s %12s %12s %14s %10s\n", "op", "median_ms", "min_ms", "bytes/s", "of_copy");
  const double moved = 2.0 * static_cast<double>(payload) * 2;  // read + write, fp16
  const bench::CudaTiming copy = bench::time_launches(stream, static_cast<int>(o.warmup), static_cast<int>(o.repeats), [&](int) {
    DK_BENCH_CUDA(cudaMemcpyAsync(copy_dst, params, static_cast<size_t>(payload) * 2,
                                  cudaMemcpyDeviceToDevice, stream));
  });
  std::vector<bench::JsonObject> rows;
  auto report = [&](const char* name, const bench::CudaTiming& t) {
    const double rate = moved / (t.median_ms * 1e-3);
    const double of_copy = copy.median_ms / t.median_ms;
    std::printf("%-22s %12.4f %12.4f %14.4g %9.1f%%\n", name, t.median_ms, t.min_ms, rate, 100 * of_copy);
    rows.push_back(bench::JsonObject().str("op", name).num("median_ms", t.median_ms)
                       .num("min_ms", t.min_ms).num("bytes_per_s", rate).num("fraction_of_copy", of_copy));
  };
  report("memcpy_d2d", copy);
  for (const auto& entry : {std::pair{fd::Distribution::gaussian, "perturb_gaussian"},
                            std::pair{fd::Distribution::rademacher, "perturb_rademacher"}}) {
    const fd::Distribution dist = entry.first;  // (a lambda may not capture a structured binding)
    const char* name = entry.second;
    const bench::CudaTiming t = bench::time_launches(stream, static_cast<int>(o.warmup), static_cast<int>(o.repeats), [&](int i) {
      const Status s = fd_perturb_cuda(desc_dev, nullptr, n_tensors, total_groups, 1234, static_cast<uint32_t>(i),
                                       1e-3f, dist, nullptr, stream);
      if (s != Status::ok) {
        std::fprintf(stderr, "fd_perturb_cuda failed: %s\n", status_message(s));
        std::exit(1);
      }
    });
    report(name, t);
  }
  // Into a scratch copy (what dk.zo's module hooks do): reads params, writes copy_dst.
  const bench::CudaTiming into = bench::time_launches(stream, static_cast<int>(o.warmup), static_cast<int>(o.repeats), [&](int i) {
    const Status s = fd_perturb_cuda(into_desc_dev, sources_dev, n_tensors, total_groups, 1234,
                                     static_cast<uint32_t>(i), 1e-3f, fd::Distribution::gaussian,
                                     nullptr, stream);
    if (s != Status::ok) {
      std::fprintf(stderr, "fd_perturb_cuda (into) failed: %s\n", status_message(s));
      std::exit(1);
    }
  });
  report("perturb_gaussian_into", into);
  const FdTerm terms[2] = {{1234, 0, 0.5f}, {1234, 1, -0.25f}};
  const bench::CudaTiming upd = bench::time_launches(stream, static_cast<int>(o.warmup), static_cast<int>(o.repeats), [&](int) {
    const Status s = fd_update_cuda(desc_dev, n_tensors, total_groups, terms, 2, 1e-6f, 0.0f,
                                    fd::Distribution::gaussian, nullptr, 0, stream);
    if (s != Status::ok) {
      std::fprintf(stderr, "fd_update_cuda failed: %s\n", status_message(s));
      std::exit(1);
    }
  });
  report("update_2_terms", upd);
  if (!o.json.empty()) {
    const bench::JsonObject header = bench::JsonObject().str("device", prop.name)
                                         .num("elements", static_cast<long long>(payload))
                                         .num("tensors", static_cast<long long>(n_tensors));
    if (!bench::write_json(o.json, header, rows)) return 1;
  }
  DK_BENCH_CUDA(cudaFree(desc_dev));
  DK_BENCH_CUDA(cudaFree(into_desc_dev));
  DK_BENCH_CUDA(cudaFree(sources_dev));
  DK_BENCH_CUDA(cudaFree(copy_dst));
  DK_BENCH_CUDA(cudaFree(params));
  DK_BENCH_CUDA(cudaStreamDestroy(stream));
  return 0;
}
