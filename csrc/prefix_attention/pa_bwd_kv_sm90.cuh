// Backward, KV-centric pass on Hopper (sm_90a, head dim 128, 128 keys per block): the
// walk, masking, split partials and epilogue of bwd_kv_kernel (pa_bwd_kv.cuh), with every
// product on warpgroup MMA (pa_wgmma.cuh). Two warpgroups of 64 keys; per work item (64
// query rows): S^T = K Q^T and dP^T = V dO^T from shared memory, P^T and dS^T in registers
// (the same per-warp fragment layout as the mma.sync kernel: 16 keys per warp), dV += P^T
// dO and dK += dS^T Q with P^T / dS^T from registers, and in the atomic mode dQ += dS K with
// dS^T through shared memory, each warpgroup taking half of dQ's columns over all 128 keys.
//
// Why: bwd_kv_kernel is bound by shared-memory reads (ldmatrix of Q and dO twice, K and V
// per item; bench/NOTES-attention.md); wgmma reads each operand tile once per warpgroup.
#pragma once
#include "prefix_attention/pa_bwd_kv.cuh"
#include "prefix_attention/pa_wgmma.cuh"

namespace diffkern {
namespace pa {

struct Sm90BwdKvConfig {
  static constexpr int D = 128, BN = 128, kThreads = 256;
  static constexpr int kKTile = BN * D * 2;        // K or V
  static constexpr int kQTile = kBwdTile * D * 2;  // Q or dO
  // Q, dO, lse, delta; padded so that every tile starts 1024-byte aligned (the swizzle).
  static constexpr int kStage = 2 * kQTile + 1024;
  static constexpr int kDs = BN * kBwdTile * 2;  // dS^T, BN keys x 64 queries
  static constexpr int kItems = 2 * kKTile + 2 * kStage + kDs;
  static constexpr int kWalk = kItems + 3 * static_cast<int>(sizeof(WalkItem));
  static constexpr int kInfo = kWalk + 128;
  static constexpr int kSmem = kInfo + 128;
  static_assert(2 * kBwdTile * 4 <= 1024, "lse and delta rows fit the stage's padding");
};

template <class T>
__global__ void __launch_bounds__(Sm90BwdKvConfig::kThreads, 1)
    bwd_kv_sm90_kernel(const PrefixAttentionBackward p, float scale_log2, float scale_f,
                       int heads_per_kv, const float* delta, float* dq_accum, int64_t slots,
                       int chunks, float* partials) {
#if DK_PA_WGMMA_DEVICE
  using C = Sm90BwdKvConfig;
  constexpr int D = C::D, BN = C::BN;
  constexpr int B = kBwdTile, NT = B / 8, DT = D / 8;  // B: query rows per work item
  constexpr int kThreads = C::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_sm90[];
  unsigned char* const smem = smem_sm90;
  const uint32_t sK = smem_u32(smem), sV = sK + C::kKTile, sStages = sV + C::kKTile;
  const uint32_t sDs = sStages + 2 * C::kStage;
  const unsigned char* stage_ptr = smem + 2 * C::kKTile;

  const int R = heads_per_kv;
  KvTileInfo ti0;
  QueryWalk cur;
  if (!kv_block_begin<D, BN, kThreads>(p, R, slots, chunks, partials, ti0, cur)) return;
  load_tile_sw128<D, kThreads, BN>(
      sK, static_cast<const uint16_t*>(p.k.data) + ti0.hk * p.k.head_stride, ti0.ktok0,
      p.k.token_stride, ti0.kvalid);
  load_tile_sw128<D, kThreads, BN>(
      sV, static_cast<const uint16_t*>(p.v.data) + ti0.hk * p.v.head_stride, ti0.ktok0,
      p.v.token_stride, ti0.kvalid);

  const KvWalkSmem ws{reinterpret_cast<WalkItem*>(smem + C::kItems),
                      reinterpret_cast<QueryWalk*>(smem + C::kWalk),
                      reinterpret_cast<KvTileInfo*>(smem + C::kInfo)};
  const KvTileInfo* info = ws.info;
  kv_walk_start<D, kThreads, true>(p, delta, R, cur, ti0, ws, sStages, C::kQTile);
  __syncthreads();  // ring[1] (the loop's first lookahead)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kr0 = warp * 16;  // this warp's keys (rows of S^T, dK, dV)
  const int wg = warp / 4;    // warpgroup: keys 64 wg .. 64 wg + 63
  const uint32_t k_rows = sK + wg * 64 * 128, v_rows = sV + wg * 64 * 128;  // A operands
  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int it = 0;; ++it) {
    const WalkItem* item = ws.ring + it % 3;
    const bool more =
        kv_advance<D, kThreads, true>(p, delta, R, it, ws, sStages, C::kStage, C::kQTile);
    fence_async_smem();  // this thread's cp.async writes, visible to wgmma after the barrier
    __syncthreads();
    const int qvalid = item->valid;
    const bool causal = item->own != 0;
    const int qrel = item->qrel;  // own tiles: query tile - diagonal query tile, >= 0
    const int st = it & 1;
    const uint32_t sQ = sStages + st * C::kStage, sdO = sQ + C::kQTile;
    const float* rows = reinterpret_cast<const float*>(stage_ptr + st * C::kStage + 2 * C::kQTile);

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys x 64 queries: A = K or V
    // rows (K-major), B = Q or dO rows (K-major), both from shared memory.
    float s[NT][4], dp[NT][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<T, B>(&s[0][0], sw128_desc(k_rows + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
                     sw128_desc(sQ + (kk / 4) * B * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<T, B>(&dp[0][0], sw128_desc(v_rows + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
                     sw128_desc(sdO + (kk / 4) * B * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    fence_regs(dp);
    uint32_t pp[NT][2], pd[NT][2];
    kv_p_ds<T, BN>(s, dp, rows, info->kvalid, qvalid, causal, qrel, kr0, g, t, scale_log2, pp, pd);
    // dV += P^T dO, dK += dS^T Q: A = P^T or dS^T from registers (pp / pd hold the
    // m16n8k16 A fragments in order: k-step kk is pp[2 kk .. 2 kk + 1]), B = dO or Q with
    // the query rows as the reduction index (MN-major).
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk)
      wgmma_rs_t<T, D>(&dv[0][0], &pp[2 * kk][0], sw128_desc(sdO + kk * 16 * 128, B * 128, 1024));
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk)
      wgmma_rs_t<T, D>(&dk[0][0], &pd[2 * kk][0], sw128_desc(sQ + kk * 16 * 128, B * 128, 1024));
    wgmma_commit();
    float dq[B / 16 * 2][4];  // this warpgroup's half of dQ: 64 query rows x 64 columns
    if (dq_accum != nullptr) {
      // dQ += dS K: dS^T (keys x queries) goes to shared memory, where it is the MN-major A
      // operand; B = K with the keys as the reduction index (MN-major), this warpgroup's
      // 64 columns. Each warpgroup sums over all BN keys before its atomics.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(smem + (sDs - sK) + sw128(BN, kr0 + g + 8 * r, nt) + 4 * t) =
              pd[nt][r];
      fence_async_smem();
      __syncthreads();
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_ss_tt<T, 64>(&dq[0][0], sw128_desc(sDs + kk * 16 * 128, 16, 1024),
                           sw128_desc(sK + wg * BN * 128 + kk * 16 * 128, 16, 1024), kk > 0);
      wgmma_commit();
    }
    wgmma_wait<0>();
    fence_regs(dk);
    fence_regs(dv);
    fence_regs(pp);
    fence_regs(pd);
    if (dq_accum != nullptr) {
      fence_regs(dq);
      const int qrow = warp % 4 * 16 + g;
      float* dq_row = dq_accum + ((item->tok0 + qrow) * p.shape.num_heads_q + item->h) * D +
                      wg * 64 + 2 * t;
      const int row_stride = p.shape.num_heads_q * D;  // floats per token
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (qrow + 8 * r >= qvalid) continue;
#pragma unroll
        for (int j = 0; j < B / 16 * 2; ++j)
          red_add_v2(dq_row + r * 8 * row_stride + 8 * j, dq[j][2 * r] * scale_f,
                     dq[j][2 * r + 1] * scale_f);
      }
    }
    __syncthreads();  // the stage and dS are rewritten next iteration
    if (!more) break;
  }

  // The epilogue's constants from shared memory (KvTileInfo).
  kv_epilogue<T, D, BN>(p, smem, *info, dk, dv, kr0, g, t, lane, scale_f, partials);
#else
  // Launched only on a 9.0 device of a build with sm_90a SASS (see fwd_sm90_kernel).
  __trap();
#endif
}
}  // namespace pa
}  // namespace diffkern
