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

  const int hkv = p.shape.num_heads_kv;
  const int R = heads_per_kv;
  const int64_t ntok = p.shape.total_tokens;
  const int64_t bid = blockIdx.x;
  const int hk = static_cast<int>(bid % hkv);
  // Two passes over the schedule: key tiles of prefix segments (seen by their own queries
  // and by every suffix of the group: the heavy ones here) first, each as `chunks`
  // adjacent blocks (chunk 0, the heaviest, first), then the rest; a block of the other
  // pass exits at once.
  const int64_t prefix_blocks = slots * chunks * hkv;
  const bool prefix_pass = bid < prefix_blocks;
  const int64_t pass_slot = prefix_pass ? bid / hkv / chunks : (bid - prefix_blocks) / hkv;
  // Recomputed after the walk rather than kept live through it (it was spilled).
  auto chunk_of_block = [&] { return prefix_pass ? static_cast<int>(bid / hkv % chunks) : 0; };
  const int chunk = chunk_of_block();
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_128, pass_slot);
  if (tr.seg < 0 || (p.segments.prefix_length[tr.seg] == 0) != prefix_pass) return;
  const int64_t kt = tr.tile;  // earlier key tiles are seen by more of their own queries
  // Split (prefix pass, chunks > 1): float32 partials to slot `chunk`, summed by
  // bwd_split_reduce_kernel; else dk, dv directly.
  const bool split = prefix_pass && chunks > 1;
  const int64_t slot_stride = ntok * hkv * D;  // one (T, Hkv, D) float32 array
  const int64_t kseg_start = p.segments.q_start[tr.seg];
  const int64_t k0 = kt * BN;
  const int64_t klen = p.segments.length[tr.seg];
  const int kvalid = static_cast<int>(klen - k0 < BN ? klen - k0 : BN);
  // The query tile holding key k0 (BN is a multiple of B): the own walk starts there.
  const int diag_tile = static_cast<int>(kt) * (BN / B);
  const int64_t ktok0 = kseg_start + k0;

  QueryWalk cur;
  cur.start(p.segments, p.groups, tr.seg, diag_tile, chunk, prefix_pass ? chunks : 1);
  cur.diag_tile = diag_tile;
  cur.h0 = hk * R;
  if (cur.done) {  // an empty chunk (chunk > 0 only): its partials are zeros
    float* dst = partials + 2 * chunk * slot_stride + hk * D;
    for (int i = threadIdx.x; i < kvalid * (D / 4); i += kThreads) {
      const int64_t off = (ktok0 + i / (D / 4)) * hkv * D + i % (D / 4) * 4;
      *reinterpret_cast<float4*>(dst + off) = make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(dst + slot_stride + off) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    return;
  }

  load_tile_sw128<D, kThreads, BN>(sK,
                                   static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride,
                                   kseg_start + k0, p.k.token_stride, kvalid);
  load_tile_sw128<D, kThreads, BN>(sV,
                                   static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride,
                                   kseg_start + k0, p.v.token_stride, kvalid);

  // Loads a work item's Q, dO (async) and its rows' lse, delta (plain loads).
  auto issue = [&](const WalkItem& w, int st) {
    const int h = w.h;
    const int64_t tok0 = w.tok0;
    const int valid = w.valid;
    const uint32_t base = sStages + st * C::kStage;
    load_tile_sw128<D, kThreads, B>(base,
                                    static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride,
                                    tok0, p.q.token_stride, valid);
    load_tile_sw128<D, kThreads, B>(
        base + C::kQTile, static_cast<const uint16_t*>(p.dout.data) + h * p.dout.head_stride,
        tok0, p.dout.token_stride, valid);
    // Asynchronous too: a plain load here would stall every item on global latency.
    const uint32_t rows = base + 2 * C::kQTile;
    for (int i = threadIdx.x; i < B; i += kThreads) {
      const bool ok = i < valid;
      cp_async4(rows + 4 * i, ok ? p.lse + h * ntok + tok0 + i : p.lse, ok);
      cp_async4(rows + 4 * (B + i), ok ? delta + h * ntok + tok0 + i : delta, ok);
    }
  };

  // The walk runs one item ahead of the loads, in thread 0 alone, on state kept in shared
  // memory: items it and it + 1 are in the ring when iteration it starts, and thread 0
  // writes item it + 2 over item it - 1 (read by all before the previous iteration's last
  // barrier). No walk state is live in registers across the loop body, where the hd128
  // kernel (128 dK/dV accumulators, 64 scores) spilled it.
  WalkItem* ring = reinterpret_cast<WalkItem*>(smem + C::kItems);
  QueryWalk* walk = reinterpret_cast<QueryWalk*>(smem + C::kWalk);
  KvTileInfo* info = reinterpret_cast<KvTileInfo*>(smem + C::kInfo);
  {
    const WalkItem first = walk_item(cur);
    if (threadIdx.x == 0) {
      *info = KvTileInfo{ktok0, kvalid, hk, chunk, split ? 1 : 0};
      ring[0] = first;
      cur.advance(p.segments, R);
      ring[1] = walk_item(cur);
      *walk = cur;
    }
    issue(first, 0);
    cp_async_commit();
  }
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
    const WalkItem* item = ring + it % 3;
    const WalkItem* next = ring + (it + 1) % 3;
    const bool more = next->valid > 0;
    if (more) {
      issue(*next, (it + 1) & 1);
      cp_async_commit();
    }
    if (threadIdx.x == 0) {  // item it + 2 (overlaps the loads above)
      QueryWalk w = *walk;
      if (!w.done) w.advance(p.segments, R);
      ring[(it + 2) % 3] = walk_item(w);
      *walk = w;
    }
    if (more) cp_async_wait<1>(); else cp_async_wait<0>();
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
    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta); masked entries are exactly 0.
    // Masking in 32 bits relative to the key tile: the own walk starts at the diagonal
    // query tile (kt BN / B), so qoff - k0 = qrel B with qrel >= 0, and the causal test
    // k0 + key > qoff + q is q < key - qrel B. Per key row the kept queries are then
    // [lo, hi) (hi = 0 for a key past kvalid), hoisted out of the element loop and less
    // this lane's 2t, so each element compares a constant column nt 8 + (e & 1). Same
    // masked set as the 64-bit form (the 64-bit terms were spilled in the hd128 kernel).
    const int kvalid = info->kvalid;
    const bool need_mask = kvalid < BN || qvalid < B || (causal && kr0 + 15 > qrel * B);
    int lo[2], hi[2];
    const int key0 = kr0 + g;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key0 + 8 * r;
      lo[r] = (causal ? key - qrel * B : 0) - 2 * t;
      hi[r] = (key < kvalid ? qvalid : 0) - 2 * t;
    }
    // Rounded to 16-bit pairs at once ({row g, row g + 8} per n-tile: the mma A fragments
    // and the dS^T store use these same pairs): 32 registers instead of 64 floats live
    // through the dV/dK products, where the floats were the peak (same values, rounded once).
    uint32_t pp[NT][2], pd[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float pe[2], ds[2];
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int e = 2 * r + x;
          const int q = nt * 8 + 2 * t + x;
          const int c = nt * 8 + x;
          pe[x] = exp2_fast(s[nt][e] * scale_log2 - rows[q] * kLog2e);
          if (need_mask && (c < lo[r] || c >= hi[r])) pe[x] = 0.f;
          ds[x] = pe[x] * (dp[nt][e] - rows[B + q]);
        }
        pp[nt][r] = pack2<T>(pe[0], pe[1]);
        pd[nt][r] = pack2<T>(ds[0], ds[1]);
      }
    }
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
  const KvTileInfo ti = *info;
  const int row0 = kr0 + g;
  if (ti.split) {
    // Unscaled float32 partials straight from the fragments: a quad writes 32 contiguous
    // bytes of a row per dt (full sectors); the reduce applies the scale once.
    float* dst = partials + 2 * ti.chunk * slot_stride + ti.hk * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row >= ti.kvalid) continue;
      const int64_t off = (ti.ktok0 + row) * hkv * D + 2 * t;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        *reinterpret_cast<float2*>(dst + off + dt * 8) = make_float2(dk[dt][2 * r], dk[dt][2 * r + 1]);
        *reinterpret_cast<float2*>(dst + slot_stride + off + dt * 8) =
            make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
    return;
  }
  // dK (times scale) and dV, staged through this warp's own rows of sK / sV.
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dk[dt][2 * r] * scale_f, dk[dt][2 * r + 1] * scale_f);
      *reinterpret_cast<uint32_t*>(smem + C::kKTile + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dk.data) + ti.hk * p.dk.head_stride, ti.ktok0,
                p.dk.token_stride, kr0, 16, ti.kvalid, lane, 32);
  store_tile<D>(smem + C::kKTile, static_cast<uint16_t*>(p.dv.data) + ti.hk * p.dv.head_stride,
                ti.ktok0, p.dv.token_stride, kr0, 16, ti.kvalid, lane, 32);
#else
  // Launched only on a 9.0 device of a build with sm_90a SASS (see fwd_sm90_kernel).
  __trap();
#endif
}
}  // namespace pa
}  // namespace diffkern
