// Experiment (METHOD.md: predict, then measure before changing the library): where does the
// library's Gaussian in-place perturb over the OPT-1.3B-sized list (388 fp16 tensors,
// 1.316e9 elements; bench_fd_grad_cuda: 1.458 ms = 84.1% of a device copy) lose the 2-3
// points the single-tensor experiment (gaussian16_variants.cu: u16_gauss_h_x2 86.0%,
// x4 86.6%, uniform 88.8%) did not? Every variant below runs the library's layout (one wave
// of blocks over contiguous ranges of the flattened group space, the row walk with the dtype
// dispatched per row, 16-byte units, 32-bit indices within a row, the next step's units
// loaded before the generator runs) with one or more knobs changed, and is checked bit for
// bit against the library's own launcher (fd_perturb_cuda, included below) on the first run,
// on data that holds a sprinkle of NaN / inf / subnormal elements (so a variant that drops
// the exact NaN path shows mismatches). A faster variant with mismatches is useless except
// as a bound (rows marked "bound").
//
// Knobs (template parameters of var_kernel; the row names say which are changed):
//   threads / min blocks per SM (__launch_bounds__): 256x3 as shipped, 768x1 and 1024x1
//       (one table per SM instead of three: a third of the table fills, 128 KB more L1),
//       512x2;
//   units: 16-byte units (groups of 8 fp16) per thread per step, 2 as shipped, 3;
//   table: h15 = the shipped 64 KB float16 |z| table; f15 = the same 2^15 values as
//       float32 (128 KB: exact, the float16 -> float32 conversion is exact, so it only
//       removes one HADD2.F32 per element); h16 = 2^16 signed float16 z (128 KB: no sign
//       operation, one conversion);
//   nan: lib = the library's check of every unit on load and on store; hoist = the load
//       check only, the store check kept only for a unit that held a NaN or when the scale
//       could make one (|s| >= 2^124 or NaN; otherwise x + s*z is NaN only if x is: z is
//       finite and never 0, |s*z| < 2^127, and inf + finite = inf), so the same bits;
//       none = no check at all (hardware conversions: NaN bits differ; a bound);
//   ld: def (LDG.E.128 as shipped), nc (__ldg, the non-coherent path; safe here since every
//       element is read once, by the thread that then writes it), cs (ld.global.cs,
//       evict-first streaming), na (ld.global.L1::no_allocate);
//   st: def, cs (st.global.cs, streaming);
//   pf: prefetch to L2 (cp.async.bulk.prefetch.L2, sm_90) of the block's step `pf` steps
//       ahead by thread 0 (DRAM requests in flight that hold no registers and no L1);
//   waves: 1 (one wave, as shipped) or 2.
// Also timed: the copy floor (cudaMemcpyAsync D2D of the same bytes), the library's
// Gaussian (lib) and Rademacher (lib_rademacher, not checked) launchers. The whole table is
// run twice (round 1, round 2) to show the run-to-run spread.
//
// SASS before running (nvcc 13.0, sm_90; sass_paths.py path, common fp16 path, one trip =
// 2 groups = 16 elements): base 306 issued instructions, hoist 300, f15 284, h16 274;
// registers (-Xptxas -v): base/hoist 77, u3 80, 768x1 77, 1024x1 and 512x2 64, f15/h16 at
// 768x1 72/68, none spill. "lib" is csrc/ as it is: from the commit that put the signed
// table in the library (the hoisted NaN check was not taken: no gain measured), lib is
// h16+768x1 with the library's NaN check, which base+h16+768x1 copies; base stays the
// old structure (h15, 3 x 256). Measured on the H200 (round 1 / 2, before that commit):
// lib 84.3 / 84.5% of copy, hoist+h16+768x1 90.4 / 90.3%.
//
// Not built by CMake (from the repository root; -Xptxas -v prints registers/spills):
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -lineinfo -I csrc -I bench/cpp \
//        bench/cpp/experiments/fd_perturb_variants.cu -o fd_perturb_variants
//   ./fd_perturb_variants            (~10 s on an H200; 10.6 GB of device memory)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_timer.h"
// The library's kernels and launcher, compiled into this program: the reference bits and
// the "lib" rows (whatever csrc/ holds at this commit).
#include "fd_grad/fd_grad_cuda.cu"

namespace xp {

using namespace diffkern;
using fd::Row;

enum class Table { h15, f15, h16 };
enum class Nan { lib, hoist, none };
enum class Ld { def, nc, cs, na };
enum class St { def, cs };

template <int Thr_, int MinB_, int Units_, Table Tb_, Nan Nn_, Ld L_, St S_, int Pf_, int Waves_>
struct Cfg {
  static constexpr int kThr = Thr_, kMinB = MinB_, kUnits = Units_, kPf = Pf_, kWaves = Waves_;
  static constexpr Table kTable = Tb_;
  static constexpr Nan kNan = Nn_;
  static constexpr Ld kLd = L_;
  static constexpr St kSt = S_;
  static constexpr size_t kSmem = Tb_ == Table::h15 ? 65536 : 131072;
};

// The three tables in global memory (built once from the library's device table).
__device__ __align__(16) uint16_t g_h15[32768];
__device__ __align__(16) float g_f15[32768];
__device__ __align__(16) uint16_t g_h16[65536];

__global__ void build_tables() {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 65536) return;
  const uint16_t m = fd::gaussian_table()[i & 0x7fff];
  if (i < 32768) {
    g_h15[i] = m;
    g_f15[i] = __half2float(__ushort_as_half(m));
  }
  g_h16[i] = static_cast<uint16_t>(m | (i & 0x8000));  // float16 sign bit = bit 15 of h
}

template <Table Tb>
__device__ __forceinline__ const void* table_source() {
  if constexpr (Tb == Table::h15) return g_h15;
  else if constexpr (Tb == Table::f15) return g_f15;
  else return g_h16;
}

template <class C>
__device__ __forceinline__ const void* fill_table() {
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* t = reinterpret_cast<uint4*>(smem);
  const uint4* src = static_cast<const uint4*>(table_source<C::kTable>());
  constexpr int kPieces = static_cast<int>(C::kSmem / 16);
  for (int i = threadIdx.x; i < kPieces; i += C::kThr) t[i] = src[i];
  __syncthreads();
  return t;
}

// z of one lane's 16 bits (same bits for the three tables).
template <Table Tb>
__device__ __forceinline__ float z_of(uint32_t h, const void* table) {
  if constexpr (Tb == Table::h15) {
    return fd::gaussian_from_bits(h, static_cast<const uint16_t*>(table));
  } else if constexpr (Tb == Table::f15) {
    const float m = static_cast<const float*>(table)[h & 0x7fffu];
    return __uint_as_float(__float_as_uint(m) | ((h & 0x8000u) << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<const uint16_t*>(table)[h]));
  }
}

// x <- x + s * z for group j of tensor t (fd::perturb_values with the table kind).
template <Table Tb>
__device__ __forceinline__ void perturb8(uint32_t t, int64_t j, uint64_t seed, uint32_t k,
                                         float s, const void* table, float (&x)[8]) {
  const philox::U32x4 r = fd::group_bits(seed, k, t, static_cast<uint64_t>(j));
#pragma unroll
  for (int l = 0; l < 8; ++l)
    x[l] = fd::add_rn(x[l], fd::mul_rn(s, z_of<Tb>(fd::lane_bits(r, l), table)));
}

template <Ld L>
__device__ __forceinline__ uint4 load_u(const uint4* p) {
  if constexpr (L == Ld::def) {
    return fd::load_unit(p);
  } else if constexpr (L == Ld::nc) {
    return __ldg(p);
  } else if constexpr (L == Ld::cs) {
    uint4 v;
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  } else {
    uint4 v;
    asm("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  }
}

template <St S>
__device__ __forceinline__ void store_u(uint4* p, uint4 v) {
  if constexpr (S == St::def) {
    fd::store_unit(p, v);
  } else {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
}

// Unpack a unit; returns whether it may hold a NaN (the exact conversion was then used).
template <class T, Nan N>
__device__ __forceinline__ bool unpack_x(const uint4& u, float (&x)[fd::kUnitElems<T>]) {
  if constexpr (std::is_same_v<T, Float16> && N != Nan::lib) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = fd::unit_word(u, i);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
    if constexpr (N == Nan::none) {
      return false;
    } else {
      const bool nan = fd::any_nan(x);
      if (nan) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t w = fd::unit_word(u, i);
          x[2 * i] = Float16{static_cast<uint16_t>(w)}.to_float();
          x[2 * i + 1] = Float16{static_cast<uint16_t>(w >> 16)}.to_float();
        }
      }
      return nan;
    }
  } else {
    fd::unpack_unit<T>(u, x);
    return !std::is_same_v<T, float>;  // bfloat16: not checked on load
  }
}

template <class T, Nan N>
__device__ __forceinline__ uint4 pack_x(const float (&x)[fd::kUnitElems<T>], bool check) {
  if constexpr (std::is_same_v<T, Float16> && N != Nan::lib) {
    uint4 u;
    if (N == Nan::hoist && check && fd::any_nan(x)) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        fd::set_unit_word(u, i, uint32_t(from_compute<T>(x[2 * i]).bits) |
                                    (uint32_t(from_compute<T>(x[2 * i + 1]).bits) << 16));
      return u;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
      fd::set_unit_word(u, i, *reinterpret_cast<const uint32_t*>(&h));
    }
    return u;
  } else {
    return fd::pack_unit<T>(x);
  }
}

template <class T, class C>
__device__ __forceinline__ void run_groups(const Row& row, const T* src, T* dst, int64_t a,
                                           int64_t b, uint64_t seed, uint32_t k, float s,
                                           const void* table) {
  for (int64_t j = a + threadIdx.x; j < b; j += C::kThr) {
    float x[8] = {};
    const int count = fd::load_group(src, row.numel, j, x);
    perturb8<C::kTable>(row.id, j, seed, k, s, table, x);
    fd::store_group(dst, j, count, x);
  }
}

template <class T, class C>
__device__ __forceinline__ void run_units(const Row& row, const T* src, T* dst, int64_t j_begin,
                                          int64_t groups, uint64_t seed, uint32_t k, float s,
                                          bool s_safe, const void* table) {
  constexpr int GU = fd::kGroupUnits<T>, E = fd::kUnitElems<T>, U = C::kUnits;
  constexpr int S = U / GU, kThr = C::kThr;
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t done = 0; done < groups; done += kChunk) {
    const uint32_t n = static_cast<uint32_t>(groups - done < kChunk ? groups - done : kChunk);
    const int64_t jc = j_begin + done;
    const uint4* sp = reinterpret_cast<const uint4*>(src + 8 * jc);
    uint4* dp = reinterpret_cast<uint4*>(dst + 8 * jc);
    constexpr uint32_t kStep = static_cast<uint32_t>(S) * kThr;  // groups per block step
    if constexpr (C::kPf > 0) {
      if (threadIdx.x == 0) {
        const uint32_t first = n < kStep * (C::kPf + 1) ? n : kStep * (C::kPf + 1);
        prefetch_l2(sp, first * GU * 16u);
      }
    }
    uint4 cur[U];
    auto load_step = [&](uint32_t g, uint4(&v)[U]) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const uint32_t gi = g + i * kThr;
        if (gi < n) {
#pragma unroll
          for (int q = 0; q < GU; ++q) v[i * GU + q] = load_u<C::kLd>(sp + static_cast<size_t>(gi) * GU + q);
        }
      }
    };
    uint32_t g = threadIdx.x;
    load_step(g, cur);
    for (; g < n; g += kStep) {
      if constexpr (C::kPf > 0) {
        const uint32_t base = g - threadIdx.x + kStep * (C::kPf + 1);
        if (threadIdx.x == 0 && base < n) {
          const uint32_t cnt = n - base < kStep ? n - base : kStep;
          prefetch_l2(sp + static_cast<size_t>(base) * GU, cnt * GU * 16u);
        }
      }
      uint4 next[U];
      load_step(g + kStep, next);
#pragma unroll
      for (int i = 0; i < S; ++i) {
        const uint32_t gi = g + i * kThr;
        if (gi < n) {
          float x[8];
          bool maybe_nan = false;
#pragma unroll
          for (int q = 0; q < GU; ++q)
            maybe_nan |= unpack_x<T, C::kNan>(cur[i * GU + q], *reinterpret_cast<float(*)[E]>(x + q * E));
          perturb8<C::kTable>(row.id, jc + gi, seed, k, s, table, x);
          const bool check = maybe_nan || !s_safe;
#pragma unroll
          for (int q = 0; q < GU; ++q)
            store_u<C::kSt>(dp + static_cast<size_t>(gi) * GU + q,
                            pack_x<T, C::kNan>(*reinterpret_cast<float(*)[E]>(x + q * E), check));
        }
      }
#pragma unroll
      for (int i = 0; i < U; ++i) cur[i] = next[i];
    }
  }
}

template <class T, class C>
__device__ __forceinline__ void run_segment(const Row& row, const void* source, int64_t j0,
                                            int64_t j1, uint64_t seed, uint32_t k, float s,
                                            bool s_safe, const void* table) {
  const T* src = static_cast<const T*>(source);
  T* dst = static_cast<T*>(row.data);
  const int64_t whole = row.numel / 8;
  const int64_t whole_end = j1 < whole ? j1 : whole;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (aligned && j0 < whole_end) {
    run_units<T, C>(row, src, dst, j0, whole_end - j0, seed, k, s, s_safe, table);
    run_groups<T, C>(row, src, dst, whole_end, j1, seed, k, s, table);
  } else {
    run_groups<T, C>(row, src, dst, j0, j1, seed, k, s, table);
  }
}

// groups_kernel of the library (Gaussian, no sphere norm; sources as in the library: null
// for in place, read at run time, so src and dst are not known to alias).
template <class C>
__global__ void __launch_bounds__(C::kThr, C::kMinB)
var_kernel(const int64_t* desc, const int64_t* sources, int64_t num_rows, int64_t total, int64_t per_block,
           uint64_t seed, uint32_t k, float scale) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < total ? begin + per_block : total;
  const void* table = fill_table<C>();
  if (begin >= end) return;
  const float s = fd::mul_rn(scale, fd::inverse_norm(nullptr));
  const bool s_safe = fabsf(s) < 0x1p124f;  // false for NaN
  int64_t r = fd::find_row(desc, num_rows, begin);
  for (int64_t g = begin; g < end && r < num_rows; ++r) {
    const Row row = fd::read_row(desc, r);
    const int64_t row_end = row.first_group + fd::groups_of(row.numel);
    const int64_t seg_end = row_end < end ? row_end : end;
    if (seg_end <= g) continue;
    const void* source = fd::row_source(sources, r, row);
    const int64_t j0 = g - row.first_group, j1 = seg_end - row.first_group;
    switch (static_cast<DType>(row.dtype)) {
      case DType::float16: run_segment<Float16, C>(row, source, j0, j1, seed, k, s, s_safe, table); break;
      case DType::bfloat16: run_segment<BFloat16, C>(row, source, j0, j1, seed, k, s, s_safe, table); break;
      case DType::float32: run_segment<float, C>(row, source, j0, j1, seed, k, s, s_safe, table); break;
      default: break;
    }
    g = seg_end;
  }
}

struct Launch {
  unsigned blocks = 0;
  int64_t per_block = 0;
  int per_sm = 0;
};

template <class C>
Launch prepare(int64_t total, int sms) {
  DK_BENCH_CUDA(cudaFuncSetAttribute(var_kernel<C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(C::kSmem)));
  Launch l;
  DK_BENCH_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&l.per_sm, var_kernel<C>, C::kThr, C::kSmem));
  const int64_t pass = static_cast<int64_t>(C::kThr) * C::kUnits;
  const int64_t passes = (total + pass - 1) / pass;
  const int64_t wave = static_cast<int64_t>(sms) * (l.per_sm > 0 ? l.per_sm : 1) * C::kWaves;
  const int64_t blocks = passes < wave ? passes : wave;
  l.per_block = (passes + blocks - 1) / blocks * pass;
  l.blocks = static_cast<unsigned>((total + l.per_block - 1) / l.per_block);
  return l;
}

// numel of each tensor: bench_fd_grad_cuda.cu's opt_like_sizes(24) (OPT-1.3B: hidden 2048,
// ffn 8192, vocab 50272), 388 tensors.
std::vector<int64_t> opt_like_sizes(int layers) {
  const int64_t h = 2048, f = 8192;
  std::vector<int64_t> s = {50272 * h, 2050 * h};
  for (int l = 0; l < layers; ++l) {
    for (int p = 0; p < 4; ++p) s.insert(s.end(), {h * h, h});
    s.insert(s.end(), {h, h});
    s.insert(s.end(), {f * h, f, h * f, h});
    s.insert(s.end(), {h, h});
  }
  s.insert(s.end(), {h, h});
  return s;
}

// Finite fp16 values of all magnitudes (subnormals included), with one NaN (payloads vary)
// per ~2^20 elements and one inf per ~2^21.
__global__ void fill_data(uint16_t* p, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 29;
    uint16_t h = static_cast<uint16_t>(z);
    const uint32_t tag = static_cast<uint32_t>(z >> 40) & 0xfffffu;
    if (tag == 7) h = static_cast<uint16_t>((h & 0x81ffu) | 0x7c01u);       // NaN
    else if (tag == 9 || tag == 11) h = static_cast<uint16_t>((h & 0x8000u) | 0x7c00u);  // inf
    else if ((h & 0x7c00u) == 0x7c00u) h = static_cast<uint16_t>(h & 0xbfffu);  // finite
    p[i] = h;
  }
}

__global__ void count_mismatch(const uint4* a, const uint4* b, int64_t n, unsigned long long* out) {
  unsigned long long c = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 x = a[i], y = b[i];
    const uint32_t d[4] = {x.x ^ y.x, x.y ^ y.y, x.z ^ y.z, x.w ^ y.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) c += ((d[q] & 0xffffu) != 0) + ((d[q] >> 16) != 0);
  }
  if (c) atomicAdd(out, c);
}

struct Ctx {
  int sms = 0;
  cudaStream_t stream{};
  char *orig = nullptr, *ref = nullptr, *work = nullptr, *copy_dst = nullptr;
  size_t bytes = 0;
  int64_t payload = 0, total_groups = 0, n_tensors = 0;
  int64_t* desc = nullptr;
  const int64_t* no_sources = nullptr;  // in place (a runtime null, as the library gets it)
  unsigned long long* counter = nullptr;
  double copy_ms = 0;
  int warmup = 5, repeats = 30;
  static constexpr uint64_t kSeed = 1234;
  static constexpr float kScale = 1e-3f;
};

unsigned long long mismatches(Ctx& c) {
  DK_BENCH_CUDA(cudaMemsetAsync(c.counter, 0, sizeof(unsigned long long), c.stream));
  count_mismatch<<<c.sms * 8, 256, 0, c.stream>>>(reinterpret_cast<const uint4*>(c.work),
                                                  reinterpret_cast<const uint4*>(c.ref),
                                                  static_cast<int64_t>(c.bytes / 16), c.counter);
  DK_BENCH_CUDA(cudaGetLastError());
  unsigned long long h = 0;
  DK_BENCH_CUDA(cudaMemcpyAsync(&h, c.counter, sizeof h, cudaMemcpyDeviceToHost, c.stream));
  DK_BENCH_CUDA(cudaStreamSynchronize(c.stream));
  return h;
}

void row(const Ctx& c, const char* name, double ms, long long mism, const char* extra) {
  std::printf("%-26s %8.4f %7.1f%%  %11lld  %s\n", name, ms, 100.0 * c.copy_ms / ms, mism, extra);
  std::fflush(stdout);
}

// Reset work to the original data, run `launch(k = 0)` once, count mismatches against the
// library's result, then time `launch(i)` in place.
template <class F>
void measure(Ctx& c, const char* name, const char* extra, F&& launch, bool check = true) {
  long long mism = -1;
  if (check) {
    DK_BENCH_CUDA(cudaMemcpyAsync(c.work, c.orig, c.bytes, cudaMemcpyDeviceToDevice, c.stream));
    launch(0);
    mism = static_cast<long long>(mismatches(c));
  }
  const bench::CudaTiming t = bench::time_launches(c.stream, c.warmup, c.repeats,
                                                   [&](int i) { launch(i + 1); });
  row(c, name, t.median_ms, mism, extra);
}

template <class C>
void variant(Ctx& c, const char* name, const char* note = "") {
  const Launch l = prepare<C>(c.total_groups, c.sms);
  char extra[160];
  std::snprintf(extra, sizeof extra, "%dx%d thr/SM, %u blocks %s", l.per_sm, C::kThr, l.blocks, note);
  measure(c, name, extra, [&](int k) {
    var_kernel<C><<<l.blocks, C::kThr, C::kSmem, c.stream>>>(
        c.desc, c.no_sources, c.n_tensors, c.total_groups, l.per_block, Ctx::kSeed, static_cast<uint32_t>(k), Ctx::kScale);
    DK_BENCH_CUDA(cudaGetLastError());
  });
}

void lib(Ctx& c, fd::Distribution d, const char* name, bool check) {
  measure(c, name, "library launcher", [&](int k) {
    const Status s = fd_perturb_cuda(c.desc, nullptr, c.n_tensors, c.total_groups, Ctx::kSeed,
                                     static_cast<uint32_t>(k), Ctx::kScale, d, nullptr, c.stream);
    if (s != Status::ok) {
      std::fprintf(stderr, "fd_perturb_cuda: %s\n", status_message(s));
      std::exit(1);
    }
  }, check);
}

// Short names for the configurations (threads, min blocks, units, table, nan, ld, st, pf, waves).
using TB = Table;
using base = Cfg<256, 3, 2, TB::h15, Nan::lib, Ld::def, St::def, 0, 1>;
using hoist = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using nonan = Cfg<256, 3, 2, TB::h15, Nan::none, Ld::def, St::def, 0, 1>;
using ld_nc = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::nc, St::def, 0, 1>;
using ld_cs = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::cs, St::def, 0, 1>;
using ld_na = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::na, St::def, 0, 1>;
using st_cs = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::cs, 0, 1>;
using ldst_cs = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::cs, St::cs, 0, 1>;
using pf1 = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::def, 1, 1>;
using pf2 = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::def, 2, 1>;
using pf4 = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::def, 4, 1>;
using waves2 = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::def, 0, 2>;
using u3 = Cfg<256, 3, 3, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using b768 = Cfg<768, 1, 2, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using b768u3 = Cfg<768, 1, 3, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using b1024 = Cfg<1024, 1, 2, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using b512x2 = Cfg<512, 2, 2, TB::h15, Nan::hoist, Ld::def, St::def, 0, 1>;
using f15_768 = Cfg<768, 1, 2, TB::f15, Nan::hoist, Ld::def, St::def, 0, 1>;
using f15_1024 = Cfg<1024, 1, 2, TB::f15, Nan::hoist, Ld::def, St::def, 0, 1>;
using h16_768 = Cfg<768, 1, 2, TB::h16, Nan::hoist, Ld::def, St::def, 0, 1>;
using base_h16_768 = Cfg<768, 1, 2, TB::h16, Nan::lib, Ld::def, St::def, 0, 1>;
using h16_1024 = Cfg<1024, 1, 2, TB::h16, Nan::hoist, Ld::def, St::def, 0, 1>;
using f15_768_pf2_cs = Cfg<768, 1, 2, TB::f15, Nan::hoist, Ld::def, St::cs, 2, 1>;
using h15_256_pf2_cs = Cfg<256, 3, 2, TB::h15, Nan::hoist, Ld::def, St::cs, 2, 1>;

void run_round(Ctx& c, int which) {
  const bench::CudaTiming copy = bench::time_launches(c.stream, c.warmup, c.repeats, [&](int) {
    DK_BENCH_CUDA(cudaMemcpyAsync(c.copy_dst, c.work, static_cast<size_t>(c.payload) * 2,
                                  cudaMemcpyDeviceToDevice, c.stream));
  });
  c.copy_ms = copy.median_ms;
  std::printf("\nround %d: median of %d runs after %d warm-up; mismatches = differing fp16 "
              "elements after one run vs the library (-1: not checked)\n",
              which, c.repeats, c.warmup);
  std::printf("%-26s %8s %8s  %11s  %s\n", "variant", "ms", "of_copy", "mismatches", "launch");
  row(c, "copy (floor)", copy.median_ms, -1, "cudaMemcpyAsync D2D");
  lib(c, fd::Distribution::gaussian, "lib (fd_perturb_cuda)", true);  // vs its own first run
  lib(c, fd::Distribution::rademacher, "lib_rademacher", false);
  variant<base>(c, "base (copy of lib)");
  variant<hoist>(c, "hoist");
  variant<nonan>(c, "nonan", "[bound: NaN bits differ]");
  variant<ld_nc>(c, "hoist+ld_nc");
  variant<ld_cs>(c, "hoist+ld_cs");
  variant<ld_na>(c, "hoist+ld_na");
  variant<st_cs>(c, "hoist+st_cs");
  variant<ldst_cs>(c, "hoist+ld_cs+st_cs");
  variant<pf1>(c, "hoist+pf1");
  variant<pf2>(c, "hoist+pf2");
  variant<pf4>(c, "hoist+pf4");
  variant<waves2>(c, "hoist+waves2");
  variant<u3>(c, "hoist+u3");
  variant<b768>(c, "hoist+768x1");
  variant<b768u3>(c, "hoist+768x1+u3");
  variant<b1024>(c, "hoist+1024x1");
  variant<b512x2>(c, "hoist+512x2");
  variant<f15_768>(c, "hoist+f15+768x1");
  variant<f15_1024>(c, "hoist+f15+1024x1");
  variant<h16_768>(c, "hoist+h16+768x1");
  variant<base_h16_768>(c, "base+h16+768x1");
  variant<h16_1024>(c, "hoist+h16+1024x1");
  variant<h15_256_pf2_cs>(c, "hoist+pf2+st_cs");
  variant<f15_768_pf2_cs>(c, "hoist+f15+768x1+pf2+st_cs");
}

}  // namespace xp

int main() {
  using namespace xp;
  Ctx c;
  const cudaDeviceProp prop = bench::current_device();
  c.sms = prop.multiProcessorCount;
  const std::vector<int64_t> sizes = opt_like_sizes(24);
  // One allocation, tensors at 16-byte aligned offsets (bench_fd_grad_cuda's layout).
  std::vector<int64_t> offsets;
  int64_t elems = 0;
  for (int64_t n : sizes) {
    offsets.push_back(elems);
    elems += (n + 7) / 8 * 8;
  }
  c.bytes = static_cast<size_t>(elems) * 2;
  DK_BENCH_CUDA(cudaMalloc(&c.orig, c.bytes));
  DK_BENCH_CUDA(cudaMalloc(&c.ref, c.bytes));
  DK_BENCH_CUDA(cudaMalloc(&c.work, c.bytes));
  DK_BENCH_CUDA(cudaMalloc(&c.copy_dst, c.bytes));
  DK_BENCH_CUDA(cudaMalloc(&c.counter, sizeof(unsigned long long)));
  DK_BENCH_CUDA(cudaStreamCreate(&c.stream));
  fill_data<<<c.sms * 8, 256, 0, c.stream>>>(reinterpret_cast<uint16_t*>(c.orig), elems);
  build_tables<<<256, 256, 0, c.stream>>>();
  DK_BENCH_CUDA(cudaGetLastError());
  // The list over `ref` (the reference run) and over `work` (every variant), same shapes.
  auto make_desc = [&](char* base) {
    std::vector<int64_t> d;
    int64_t groups = 0;
    for (size_t t = 0; t < sizes.size(); ++t) {
      d.insert(d.end(), {static_cast<int64_t>(reinterpret_cast<uintptr_t>(base + 2 * offsets[t])),
                         sizes[t], static_cast<int64_t>(DType::float16), static_cast<int64_t>(t), groups});
      groups += (sizes[t] + 7) / 8;
    }
    c.total_groups = groups;
    return d;
  };
  c.n_tensors = static_cast<int64_t>(sizes.size());
  for (int64_t n : sizes) c.payload += n;
  const std::vector<int64_t> ref_desc = make_desc(c.ref), work_desc = make_desc(c.work);
  int64_t* ref_desc_dev = nullptr;
  DK_BENCH_CUDA(cudaMalloc(&ref_desc_dev, ref_desc.size() * 8));
  DK_BENCH_CUDA(cudaMalloc(&c.desc, work_desc.size() * 8));
  DK_BENCH_CUDA(cudaMemcpy(ref_desc_dev, ref_desc.data(), ref_desc.size() * 8, cudaMemcpyHostToDevice));
  DK_BENCH_CUDA(cudaMemcpy(c.desc, work_desc.data(), work_desc.size() * 8, cudaMemcpyHostToDevice));
  // Reference: the library's Gaussian perturb, in place, k = 0.
  DK_BENCH_CUDA(cudaMemcpyAsync(c.ref, c.orig, c.bytes, cudaMemcpyDeviceToDevice, c.stream));
  const Status s = fd_perturb_cuda(ref_desc_dev, nullptr, c.n_tensors, c.total_groups, Ctx::kSeed, 0,
                                   Ctx::kScale, fd::Distribution::gaussian, nullptr, c.stream);
  if (s != Status::ok) {
    std::fprintf(stderr, "reference: %s\n", status_message(s));
    return 1;
  }
  DK_BENCH_CUDA(cudaStreamSynchronize(c.stream));
  std::printf("%s (%d SMs): Gaussian perturb in place, %lld fp16 elements in %lld tensors\n",
              prop.name, c.sms, static_cast<long long>(c.payload), static_cast<long long>(c.n_tensors));
  run_round(c, 1);
  run_round(c, 2);
  return 0;
}
