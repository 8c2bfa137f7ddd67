// Device building blocks of the shared-prefix attention kernels (sm80+): the m16n8k16
// tensor-core product, ldmatrix fragment loads, cp.async tile copies into a swizzled
// shared-memory layout, and the heaviest-first schedule lookup. Raw PTX, see
// prefix_attention_cuda.cu for why.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/half_types.h"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace pa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two floats rounded to one 32-bit register of two 16-bit values (low half = first).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, BFloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<uint32_t*>(&v);
  }
  return r;
}

// c += a * b for one 16x8 tile, 16-bit inputs, float32 accumulators. Fragment layouts
// (g = lane / 4, t = lane % 4): a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
// b = {B[2t..][g], B[2t+8..][g]}, c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
template <class T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte asynchronous copy; when !valid nothing is read and the destination is zeroed
// (rows past a segment's end must be finite zeros: P = 0 times garbage could be NaN).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// 4-byte variant (lse, delta rows), zero-filled when !valid.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// dst[0..3] += v0..v3 as one vector reduction (sm_90+, PTX ISA 8.1 red .v4.f32; dst
// 16-byte aligned); each element is an independent relaxed atomic add, no return value.
__device__ __forceinline__ void red_add_v4(float* dst, float v0, float v1, float v2, float v3) {
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n"
               ::"l"(dst), "f"(v0), "f"(v1), "f"(v2), "f"(v3)
               : "memory");
}
// dst[0..1] += v0, v1 (8-byte aligned), the same way.
__device__ __forceinline__ void red_add_v2(float* dst, float v0, float v1) {
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(v0), "f"(v1)
               : "memory");
}
#endif

// Shared-memory tiles are rows of D 16-bit values (D / 8 chunks of 16 bytes); chunk c of
// row r lives at chunk c ^ (r % 8), so the 8 rows an ldmatrix reads hit 8 distinct bank
// groups in both the plain and the transposed loads (needs D / 8 >= 8 chunks per row).
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// Copies rows [0, rows) of a (token, head) slice into a swizzled tile; rows >= valid are
// zero-filled. 64-bit offsets: token * stride can pass 2^31.
template <int D, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const uint16_t* base, int64_t token0,
                                          int64_t token_stride, int rows, int valid) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < rows * kChunks; i += THREADS) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid;
    const uint16_t* src = ok ? base + (token0 + r) * token_stride + c * 8 : base;
    cp_async16(tile + swz<D>(r, c), src, ok);
  }
}

// Stores rows [0, valid) of a swizzled tile to a (token, head) slice, 16 bytes per access.
// Only `lanes` threads starting at `first` take part (a warp storing its own rows).
template <int D>
__device__ __forceinline__ void store_tile(const unsigned char* tile, uint16_t* base,
                                           int64_t token0, int64_t token_stride, int row0,
                                           int rows, int valid, int lane, int lanes) {
  constexpr int kChunks = D / 8;
  for (int i = lane; i < rows * kChunks; i += lanes) {
    const int r = row0 + i / kChunks, c = i % kChunks;
    if (r >= valid) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(tile + swz<D>(r, c));
    *reinterpret_cast<uint4*>(base + (token0 + r) * token_stride + c * 8) = v;
  }
}

// The query tile a block works on, from the heaviest-first schedule: `order_tiles` is the
// exclusive prefix sum of the tiles of the segments in `order`; slot -> the last entry
// whose start is <= slot (zero-tile segments share their start with the next, so the last
// one is the segment that owns the slot). Surplus slots (the grid is sized from shapes
// alone) get seg = -1.
struct TileRef {
  int64_t seg;
  int64_t tile;  // rank of the tile within the segment in schedule order
};
__device__ __forceinline__ TileRef find_tile(const PrefixSegments& s, const int64_t* order_tiles,
                                             int64_t slot) {
  if (s.count <= 0 || slot >= order_tiles[s.count]) return {-1, 0};
  int64_t lo = 0, hi = s.count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (order_tiles[mid] <= slot) lo = mid; else hi = mid - 1;
  }
  return {s.order[lo], slot - order_tiles[lo]};
}

// The keys a query tile reads, as a list of key tiles of BN: first the prefix
// [prefix_start, prefix_start + prefix_length) in full (no causal mask), then the
// segment's own keys up to the tile's last row (causal). Tile j covers `valid` keys from
// token `start`; `offset` is the keys' offset in the segment (causal tiles only).
template <int BN>
struct KeyTiles {
  int64_t prefix_start, prefix_length, q_start, length;
  // Tile counts in int (a segment of 2^37 tokens could not be held in memory): the struct
  // is live across the kernels' key loops, where the hd128 forward runs out of registers.
  int num_prefix, count;

  __device__ __forceinline__ KeyTiles(const PrefixSegments& s, int64_t seg, int64_t q0, int bm) {
    prefix_start = s.prefix_start[seg];
    prefix_length = s.prefix_length[seg];
    q_start = s.q_start[seg];
    length = s.length[seg];
    num_prefix = static_cast<int>((prefix_length + BN - 1) / BN);
    const int64_t last = q0 + bm < length ? q0 + bm : length;
    count = num_prefix + static_cast<int>((last + BN - 1) / BN);
  }
  __device__ __forceinline__ void get(int j, int64_t& start, int& valid, bool& causal,
                                      int64_t& offset) const {
    if (j < num_prefix) {
      start = prefix_start + static_cast<int64_t>(j) * BN;
      const int64_t left = prefix_length - static_cast<int64_t>(j) * BN;
      valid = left < BN ? static_cast<int>(left) : BN;
      causal = false;
      offset = 0;
    } else {
      offset = static_cast<int64_t>(j - num_prefix) * BN;
      start = q_start + offset;
      const int64_t left = length - offset;
      valid = left < BN ? static_cast<int>(left) : BN;
      causal = true;
    }
  }
};

// 2^x by the hardware approximation (relative error ~2^-22, far under bf16/fp16 rounding;
// 2^-inf = 0): exp2f without --use_fast_math adds range fixes around it on every score.
#ifndef DK_PA_EXP2_APPROX
#define DK_PA_EXP2_APPROX 1
#endif
__device__ __forceinline__ float exp2_fast(float x) {
#if DK_PA_EXP2_APPROX
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// Reduction over the 4 lanes of a quad (the lanes that share a row of an mma tile).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace pa
}  // namespace diffkern
