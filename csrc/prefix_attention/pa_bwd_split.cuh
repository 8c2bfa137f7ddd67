// Backward, reduce pass of the split prefix key tiles (pa_bwd.cuh, pass 2b): sums the
// float32 partial dK/dV of chunks 0..C-1 in that order (the same bits every run, whatever
// order the chunks' blocks ran in) and writes dk (times scale) and dv in their dtype.
#pragma once
#include "prefix_attention/pa_bwd_common.cuh"

namespace diffkern {
namespace pa {

// One block per (schedule slot, KV head), as the KV kernel's prefix pass maps them, so it
// touches exactly the rows the split blocks wrote; 4 values per thread per step.
template <class T, int D>
__global__ void __launch_bounds__(kBwdThreads)
    bwd_split_reduce_kernel(const PrefixAttentionBackward p, const float* partials, int chunks) {
  const int hkv = p.shape.num_heads_kv;
  const int64_t bid = blockIdx.x;
  const int hk = static_cast<int>(bid % hkv);
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_64, bid / hkv);
  if (tr.seg < 0 || p.segments.prefix_length[tr.seg] != 0) return;
  const int64_t k0 = tr.tile * kBwdTile;
  const int64_t left = p.segments.length[tr.seg] - k0;
  const int kvalid = static_cast<int>(left < kBwdTile ? left : kBwdTile);
  const int64_t tok0 = p.segments.q_start[tr.seg] + k0;
  const int64_t slot_stride = p.shape.total_tokens * hkv * D;
  const float scale_f = static_cast<float>(p.shape.scale);
  for (int i = threadIdx.x; i < kvalid * (D / 4); i += kBwdThreads) {
    const int64_t tok = tok0 + i / (D / 4);
    const int d = i % (D / 4) * 4;
    const float* src = partials + (tok * hkv + hk) * D + d;
    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
    for (int c = 0; c < chunks; ++c) {
      const float4 a = *reinterpret_cast<const float4*>(src + 2 * c * slot_stride);
      const float4 b = *reinterpret_cast<const float4*>(src + (2 * c + 1) * slot_stride);
      sk.x += a.x, sk.y += a.y, sk.z += a.z, sk.w += a.w;
      sv.x += b.x, sv.y += b.y, sv.z += b.z, sv.w += b.w;
    }
    uint16_t* dk = static_cast<uint16_t*>(p.dk.data) + tok * p.dk.token_stride +
                   hk * p.dk.head_stride + d;
    uint16_t* dv = static_cast<uint16_t*>(p.dv.data) + tok * p.dv.token_stride +
                   hk * p.dv.head_stride + d;
    // 8-byte stores: strides are multiples of 8 elements and d of 4 (prefix_attention.h).
    *reinterpret_cast<uint2*>(dk) =
        make_uint2(pack2<T>(sk.x * scale_f, sk.y * scale_f), pack2<T>(sk.z * scale_f, sk.w * scale_f));
    *reinterpret_cast<uint2*>(dv) = make_uint2(pack2<T>(sv.x, sv.y), pack2<T>(sv.z, sv.w));
  }
}

}  // namespace pa
}  // namespace diffkern
