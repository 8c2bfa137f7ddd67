// Backward, deterministic dQ pass (pa_bwd.cuh, pass 3).
#pragma once
#include "prefix_attention/pa_bwd_common.cuh"

namespace diffkern {
namespace pa {

template <int D>
struct BwdDqConfig {
  static constexpr int kTile = kBwdTile * D * 2;
  static constexpr int kSmem = 2 * kTile + 4 * kTile;  // Q, dO, then K0 V0 K1 V1
};

// Deterministic dQ: one block per query tile of 64 rows and query head, the forward's key
// walk, dQ accumulated in registers in a fixed order.
template <class T, int D>
__global__ void __launch_bounds__(kBwdThreads, 2)
    bwd_dq_kernel(const PrefixAttentionBackward p, float scale_log2, const float* delta) {
  using C = BwdDqConfig<D>;
  constexpr int B = kBwdTile, NT = B / 8, DT = D / 8;
  const float scale_f = static_cast<float>(p.shape.scale);  // the shape carries a double
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem), sdO = sQ + C::kTile, sKV = sdO + C::kTile;

  const int hq = p.shape.num_heads_q;
  const int64_t ntok = p.shape.total_tokens;
  const int64_t bid = blockIdx.x;
  const int h = static_cast<int>(bid % hq);
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_64, bid / hq);
  if (tr.seg < 0) return;
  const int64_t len = p.segments.length[tr.seg];
  const int64_t q0 = ((len + B - 1) / B - 1 - tr.tile) * B;
  const int q_valid = static_cast<int>(len - q0 < B ? len - q0 : B);
  const int hk = h / (hq / p.shape.num_heads_kv);
  const KeyTiles<B> keys(p.segments, tr.seg, q0, B);
  const int64_t q_tok0 = keys.q_start + q0;
  const uint16_t* kb = static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride;
  const uint16_t* vb = static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride;

  auto issue_kv = [&](int j) {
    int64_t start, off;
    int valid;
    bool causal;
    keys.get(j, start, valid, causal, off);
    const uint32_t stage = sKV + static_cast<uint32_t>(j & 1) * 2 * C::kTile;
    load_tile<D, kBwdThreads>(stage, kb, start, p.k.token_stride, B, valid);
    load_tile<D, kBwdThreads>(stage + C::kTile, vb, start, p.v.token_stride, B, valid);
  };
  load_tile<D, kBwdThreads>(sQ, static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride,
                            q_tok0, p.q.token_stride, B, q_valid);
  load_tile<D, kBwdThreads>(sdO, static_cast<const uint16_t*>(p.dout.data) + h * p.dout.head_stride,
                            q_tok0, p.dout.token_stride, B, q_valid);
  issue_kv(0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16;
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    const bool ok = row < q_valid;
    lse2[r] = ok ? p.lse[h * ntok + q_tok0 + row] * kLog2e : 0.f;
    dl[r] = ok ? delta[h * ntok + q_tok0 + row] : 0.f;
  }
  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int j = 0; j < keys.count; ++j) {
    if (j + 1 < keys.count) {
      issue_kv(j + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t sK = sKV + static_cast<uint32_t>(j & 1) * 2 * C::kTile, sV = sK + C::kTile;
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ad[4];
      ldsm_x4(aq, sQ + swz<D>(row0 + lane % 16, kk * 2 + lane / 16));
      ldsm_x4(ad, sdO + swz<D>(row0 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const int brow = np * 16 + (lane / 16) * 8 + lane % 8, bch = kk * 2 + (lane / 8) % 2;
        uint32_t b[4];
        ldsm_x4(b, sK + swz<D>(brow, bch));
        mma16816<T>(s[2 * np], aq, b);
        mma16816<T>(s[2 * np + 1], aq, b + 2);
        ldsm_x4(b, sV + swz<D>(brow, bch));
        mma16816<T>(dp[2 * np], ad, b);
        mma16816<T>(dp[2 * np + 1], ad, b + 2);
      }
    }
    int64_t kstart, koff;
    int kvalid;
    bool causal;
    keys.get(j, kstart, kvalid, causal, koff);
    const bool need_mask = kvalid < B || (causal && koff + B - 1 > q0 + row0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1);
        const int row = row0 + g + (e >> 1) * 8;
        float pe = exp2_fast(s[nt][e] * scale_log2 - lse2[e >> 1]);
        if (need_mask && (col >= kvalid || (causal && koff + col > q0 + row))) pe = 0.f;
        dp[nt][e] = pe * (dp[nt][e] - dl[e >> 1]);
      }
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]),
                             pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                             pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                             pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        uint32_t b[4];
        ldsm_x4_t(b, sK + swz<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, dd * 2 + lane / 16));
        mma16816<T>(dq[2 * dd], a, b);
        mma16816<T>(dq[2 * dd + 1], a, b + 2);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row0 + g + 8 * r, dt) + 4 * t) =
          pack2<T>(dq[dt][2 * r] * scale_f, dq[dt][2 * r + 1] * scale_f);
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dq.data) + h * p.dq.head_stride, q_tok0,
                p.dq.token_stride, row0, 16, q_valid, lane, 32);
}

}  // namespace pa
}  // namespace diffkern
