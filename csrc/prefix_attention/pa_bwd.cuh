// Backward kernels (FlashAttention-2 style), all on `stream`, no allocation:
//   1. bwd_delta_kernel: delta = rowsum(dO * O) per (query head, token), float32.
//   2. bwd_kv_kernel: one block per key tile of BN keys and KV head, a warp per 16 keys
//      (BN = 128 or 64: bwd_kv_key_tile in pa_kernels.h). It walks every query tile
//      that sees the key tile -- its own segment's tiles from the diagonal on (causal),
//      then, for a prefix segment, every tile of every suffix of its group (no mask) --
//      for each query head of the KV head (GQA), and
//      accumulates dK, dV in registers, so a prefix's gradient sums over its G members
//      without any K/V copy. Q/dO tiles stream through two shared-memory stages.
//      Non-deterministic mode: dQ += dS K goes to a float32 workspace by atomicAdd.
//      Split prefix key tiles: a prefix key tile is seen by its own query tiles and by
//      those of all G suffixes, so with few blocks in the grid its one block becomes the
//      long pole. With C > 1 chunks (pa_bwd_split.h: the rule, from shapes and the SM
//      count; C <= 4), each prefix key tile is C adjacent blocks: chunk c takes the
//      suffixes [c G / C, (c + 1) G / C) of its group, chunk 0 also the tile's own query
//      tiles, and each writes float32 partial dK/dV (unscaled) to workspace slot c (an
//      empty chunk writes zeros). Non-prefix key tiles are never split.
//   2b. bwd_split_reduce_kernel (C > 1 only): sums slots c = 0..C-1 in that order and writes
//      dk, dv: deterministic in both modes, and the same bits in both modes.
//   3. Deterministic mode instead (and the other mode too with >= kDqKernelMinHeadsPerKv query
//      heads per KV head, pa_kernels.h): bwd_dq_kernel, query-centric like the forward, recomputes
//      P and dS for its query tile and sums dQ over the key tiles in a fixed order. (dQ is
//      untouched by the split: in the atomic mode the chunks' atomics are as unordered as
//      the tiles' always were.)
//   4. dq_convert_kernel (non-deterministic mode): float32 workspace -> dq.
// Workspace: delta, the dQ accumulator (atomic mode), 2 C x T x Hkv x D float32 partials
// (C > 1), 64-bit offsets throughout (pa_kernels.h, pa_bwd_split.h).
#pragma once
#include "prefix_attention/pa_bwd_common.cuh"
#include "prefix_attention/pa_bwd_kv.cuh"  // before _dq: same kernel order as before the split
#include "prefix_attention/pa_bwd_kv_sm90.cuh"
#include "prefix_attention/pa_bwd_dq.cuh"
#include "prefix_attention/pa_bwd_split.cuh"
#include "prefix_attention/pa_bwd_split.h"

namespace diffkern {
namespace pa {

// float32 (T, Hq, D) workspace -> dq in its dtype and strides; 2 elements per thread.
template <class T, int D>
__global__ void dq_convert_kernel(const PrefixAttentionBackward p, const float* dq_accum) {
  const int64_t pairs = p.shape.total_tokens * p.shape.num_heads_q * (D / 2);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int64_t row = i / (D / 2);
  const int d = static_cast<int>(i % (D / 2)) * 2;
  const int64_t tok = row / p.shape.num_heads_q;
  const int h = static_cast<int>(row % p.shape.num_heads_q);
  const float2 v = *reinterpret_cast<const float2*>(dq_accum + row * D + d);
  *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.dq.data) + tok * p.dq.token_stride +
                               h * p.dq.head_stride + d) = pack2<T>(v.x, v.y);
}

template <class T, int D, int BN>
int64_t kv_resident_blocks(int sms) {
  using C = BwdKvConfig<D, BN>;
  int per_sm = 0;
  // The dynamic shared memory above 48 KiB must be allowed before the occupancy query.
  if (sms <= 0 ||
      cudaFuncSetAttribute(bwd_kv_kernel<T, D, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           C::kSmem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bwd_kv_kernel<T, D, BN>, C::kThreads,
                                                    C::kSmem) != cudaSuccess) {
    (void)cudaGetLastError();  // our failed query, not a launch's error: do not leave it
    return 0;
  }
  return static_cast<int64_t>(sms) * per_sm;
}

template <class T, int D>
int64_t bwd_kv_resident_blocks(int key_tile, int sms) {
  return key_tile == 128 ? kv_resident_blocks<T, D, 128>(sms) : kv_resident_blocks<T, D, 64>(sms);
}

// The KV kernel's grid over `slots` key tiles of BN (pass 2 above).
template <class T, int D, int BN>
Status launch_kv(const PrefixAttentionBackward& p, cudaStream_t stream, const float* delta,
                 float* dq_accum, int chunks, float* partials) {
  using C = BwdKvConfig<D, BN>;
  const PrefixAttentionShape& s = p.shape;
  const int64_t slots = ceil_div(s.total_tokens, BN) + p.segments.count;
  const int64_t blocks = (chunks + 1) * slots * s.num_heads_kv;
  if (blocks > 2147483647) return Status::invalid_argument;
  if constexpr (D == 128 && BN == 128) {
    if (bwd_on_sm90(s)) {
      // The same grid, parameters and one block per SM as bwd_kv_kernel<T, 128, 128>.
      using H = Sm90BwdKvConfig;
      DK_CUDA_TRY(cudaFuncSetAttribute(bwd_kv_sm90_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, H::kSmem));
      bwd_kv_sm90_kernel<T><<<static_cast<unsigned>(blocks), H::kThreads, H::kSmem, stream>>>(
          p, static_cast<float>(s.scale * kLog2e), static_cast<float>(s.scale),
          s.num_heads_q / s.num_heads_kv, delta, dq_accum, slots, chunks, partials);
      return last_launch_status();
    }
  }
  DK_CUDA_TRY(cudaFuncSetAttribute(bwd_kv_kernel<T, D, BN>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  bwd_kv_kernel<T, D, BN><<<static_cast<unsigned>(blocks), C::kThreads, C::kSmem, stream>>>(
      p, static_cast<float>(s.scale * kLog2e), static_cast<float>(s.scale),
      s.num_heads_q / s.num_heads_kv, delta, dq_accum, slots, chunks, partials);
  return last_launch_status();
}

template <class T, int D>
Status launch_bwd(const PrefixAttentionBackward& p, cudaStream_t stream) {
  const PrefixAttentionShape& s = p.shape;
  const float scale_log2 = static_cast<float>(s.scale * kLog2e);
  char* ws = static_cast<char*>(p.workspace);
  float* delta = reinterpret_cast<float*>(ws);
  const bool dq_kernel = dq_by_kernel(s, p.deterministic);
  const int64_t fixed_bytes = delta_bytes(s) + (dq_kernel ? 0 : dq_accum_bytes(s));
  float* dq_accum = dq_kernel ? nullptr : reinterpret_cast<float*>(ws + delta_bytes(s));
  const int sms = device_sm_count();
  const int key_tile = bwd_kv_key_tile(s, sms);
  int chunks = bwd_prefix_chunks(s, p.segments.count, p.groups.count,
                                 bwd_kv_resident_blocks<T, D>(key_tile, sms), key_tile);
  // A workspace sized on another device (other SM count) may hold fewer chunks: use what fits.
  while (chunks > 1 && p.workspace_bytes >= 0 &&
         fixed_bytes + bwd_partials_bytes(s, chunks) > p.workspace_bytes)
    --chunks;
  float* partials = chunks > 1 ? reinterpret_cast<float*>(ws + fixed_bytes) : nullptr;
  // Slots of 64-token tiles: the dQ kernel's query tiles and the split reduce's key tiles
  // (the reduce covers every prefix row whatever the KV kernel's key tile).
  const int64_t slots = ceil_div(s.total_tokens, kBwdTile) + p.segments.count;
  const int64_t q_blocks = slots * s.num_heads_q;
  const int64_t delta_blocks = ceil_div(s.total_tokens * s.num_heads_q, 8);
  const int64_t pairs = s.total_tokens * s.num_heads_q * (D / 2);
  if (q_blocks > 2147483647 || (chunks + 1) * slots * s.num_heads_kv > 2147483647 ||
      delta_blocks > 2147483647 || ceil_div(pairs, 256) > 2147483647)
    return Status::invalid_argument;

  if (dq_accum != nullptr)
    DK_CUDA_TRY(cudaMemsetAsync(dq_accum, 0, dq_accum_bytes(s), stream));
  bwd_delta_kernel<T, D><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(p, delta);
  if (const Status ls = last_launch_status(); !ls.is_ok()) return ls;

  if (const Status ks = key_tile == 128
                            ? launch_kv<T, D, 128>(p, stream, delta, dq_accum, chunks, partials)
                            : launch_kv<T, D, 64>(p, stream, delta, dq_accum, chunks, partials);
      !ks.is_ok())
    return ks;
  if (chunks > 1) {
    bwd_split_reduce_kernel<T, D><<<static_cast<unsigned>(slots * s.num_heads_kv), kBwdThreads, 0,
                                    stream>>>(p, partials, chunks);
    if (const Status ls = last_launch_status(); !ls.is_ok()) return ls;
  }

  if (dq_accum != nullptr) {
    dq_convert_kernel<T, D><<<static_cast<unsigned>(ceil_div(pairs, 256)), 256, 0, stream>>>(
        p, dq_accum);
  } else {
    DK_CUDA_TRY(cudaFuncSetAttribute(bwd_dq_kernel<T, D>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     BwdDqConfig<D>::kSmem));
    bwd_dq_kernel<T, D><<<static_cast<unsigned>(q_blocks), kBwdThreads, BwdDqConfig<D>::kSmem,
                          stream>>>(p, scale_log2, delta);
  }
  return last_launch_status();
}

}  // namespace pa
}  // namespace diffkern
