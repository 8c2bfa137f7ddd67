// Backward kernels (FlashAttention-2 style), all on `stream`, no allocation:
//   1. bwd_delta_kernel: delta = rowsum(dO * O) per (query head, token), float32.
//   2. bwd_kv_kernel: one block per key tile of BN = 64 keys and KV head, 4 warps of 16
//      keys. It walks every query tile that sees the key tile -- its own segment's tiles
//      from the diagonal on (causal), then, for a prefix segment, every tile of every
//      suffix of its group (no mask) -- for each query head of the KV head (GQA), and
//      accumulates dK, dV in registers, so a prefix's gradient sums over its G members
//      without any K/V copy. Q/dO tiles stream through two shared-memory stages.
//      Non-deterministic mode: dQ += dS K goes to a float32 workspace by atomicAdd.
//   3. Deterministic mode instead: bwd_dq_kernel, query-centric like the forward, recomputes
//      P and dS for its query tile and sums dQ over the key tiles in a fixed order.
//   4. dq_convert_kernel (non-deterministic mode): float32 workspace -> dq.
// Not done yet: splitting a prefix key tile over several blocks when G is large (today one
// block walks its own tiles and all G suffixes; with many heads, heaviest-first order keeps
// that from being the long pole at the issue's shapes). Planned form: chunk c of C (C from
// shapes, <= 4) takes the suffixes [c G / C, (c + 1) G / C) (chunk 0 also the own tiles) and
// writes float32 partial dK/dV to workspace slot c; a reduce kernel sums c = 0..C-1 in
// that order (deterministic) and writes dk/dv. Workspace C x T x Hkv x D x 8 bytes.
#pragma once
#include "common/cuda_check.cuh"
#include "common/launch.h"
#include "prefix_attention/pa_device.cuh"
#include "prefix_attention/pa_kernels.h"

namespace diffkern {
namespace pa {

constexpr int kBwdThreads = 128;  // 4 warps
constexpr int kBwdTile = 64;      // BM = BN = 64 in both backward kernels

template <class T>
__device__ __forceinline__ float load_f(const uint16_t* ptr) {
  return to_compute(T{*ptr});
}

template <class T, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const PrefixAttentionBackward p,
                                                        float* delta) {
  const int64_t rows = p.shape.total_tokens * p.shape.num_heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t tok = row / p.shape.num_heads_q;
  const int h = static_cast<int>(row % p.shape.num_heads_q);
  const uint16_t* o = static_cast<const uint16_t*>(p.out.data) + tok * p.out.token_stride +
                      h * p.out.head_stride;
  const uint16_t* d = static_cast<const uint16_t*>(p.dout.data) + tok * p.dout.token_stride +
                      h * p.dout.head_stride;
  float acc = 0.f;
  for (int i = lane; i < D; i += 32) acc += load_f<T>(o + i) * load_f<T>(d + i);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[h * p.shape.total_tokens + tok] = acc;
}

// The query tiles that see one key tile of segment `seg` (key tile kt), each for the R
// query heads of the KV head, in a fixed order.
struct QueryWalk {
  int64_t seg, tile, ntiles, q_start, length;
  int64_t next_suffix, suffix_end;
  int r;
  bool own, done;

  __device__ __forceinline__ void enter(const PrefixSegments& s, int64_t sg) {
    seg = sg;
    q_start = s.q_start[sg];
    length = s.length[sg];
    ntiles = (length + kBwdTile - 1) / kBwdTile;
  }
  __device__ __forceinline__ void start(const PrefixSegments& s, const PrefixGroups& gr,
                                        int64_t sg, int64_t kt) {
    enter(s, sg);
    tile = kt;  // BM == BN: the diagonal query tile
    r = 0;
    own = true;
    done = false;
    next_suffix = suffix_end = 0;
    if (s.prefix_length[sg] == 0 && gr.count > 0) {
      // Is this segment a group's prefix? Groups are sorted by prefix_segment.
      int64_t lo = 0, hi = gr.count - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (gr.prefix_segment[mid] < sg) lo = mid + 1; else hi = mid;
      }
      if (gr.prefix_segment[lo] == sg) {
        next_suffix = gr.first_suffix[lo];
        suffix_end = next_suffix + gr.num_suffixes[lo];
      }
    }
  }
  __device__ __forceinline__ void advance(const PrefixSegments& s, int heads_per_kv) {
    if (++r < heads_per_kv) return;
    r = 0;
    if (++tile < ntiles) return;
    own = false;
    tile = 0;
    while (next_suffix < suffix_end) {
      enter(s, next_suffix++);
      if (ntiles > 0) return;
    }
    done = true;
  }
};

template <int D>
struct BwdKvConfig {
  static constexpr int kTile = kBwdTile * D * 2;
  static constexpr int kStage = 2 * kTile + 2 * kBwdTile * 4;  // Q, dO, lse*log2e, delta
  static constexpr int kDs = kBwdTile * kBwdTile * 2;
  static constexpr int kSmem = 2 * kTile + 2 * kStage + kDs;  // K, V, 2 stages, dS
};

template <class T, int D>
__global__ void __launch_bounds__(kBwdThreads, 2)
    bwd_kv_kernel(const PrefixAttentionBackward p, float scale_log2, const float* delta,
                  float* dq_accum, int64_t slots) {
  using C = BwdKvConfig<D>;
  constexpr int B = kBwdTile, NT = B / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem), sV = sK + C::kTile, sStages = sV + C::kTile;
  const uint32_t sDs = sStages + 2 * C::kStage;
  const unsigned char* stage_ptr = smem + 2 * C::kTile;

  const int hkv = p.shape.num_heads_kv;
  const int R = p.shape.num_heads_q / hkv;
  const int64_t ntok = p.shape.total_tokens;
  const int64_t bid = blockIdx.x;
  const int hk = static_cast<int>(bid % hkv);
  // Two passes over the schedule: key tiles of prefix segments (seen by their own queries
  // and by every suffix of the group: the heavy ones here) first, then the rest; a block
  // of the other pass exits at once.
  const int64_t pass_slot = bid / hkv;
  const bool prefix_pass = pass_slot < slots;
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_64,
                               prefix_pass ? pass_slot : pass_slot - slots);
  if (tr.seg < 0 || (p.segments.prefix_length[tr.seg] == 0) != prefix_pass) return;
  const int64_t kt = tr.tile;  // earlier key tiles are seen by more of their own queries
  const int64_t kseg_start = p.segments.q_start[tr.seg];
  const int64_t k0 = kt * B;
  const int64_t klen = p.segments.length[tr.seg];
  const int kvalid = static_cast<int>(klen - k0 < B ? klen - k0 : B);

  load_tile<D, kBwdThreads>(sK, static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride,
                            kseg_start + k0, p.k.token_stride, B, kvalid);
  load_tile<D, kBwdThreads>(sV, static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride,
                            kseg_start + k0, p.v.token_stride, B, kvalid);

  // Loads a work item's Q, dO (async) and its rows' lse, delta (plain loads).
  auto issue = [&](const QueryWalk& w, int st) {
    const int h = hk * R + w.r;
    const int64_t tok0 = w.q_start + w.tile * B;
    const int64_t left = w.length - w.tile * B;
    const int valid = static_cast<int>(left < B ? left : B);
    const uint32_t base = sStages + st * C::kStage;
    load_tile<D, kBwdThreads>(base, static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride,
                              tok0, p.q.token_stride, B, valid);
    load_tile<D, kBwdThreads>(base + C::kTile,
                              static_cast<const uint16_t*>(p.dout.data) + h * p.dout.head_stride,
                              tok0, p.dout.token_stride, B, valid);
    // Asynchronous too: a plain load here would stall every item on global latency.
    const uint32_t rows = base + 2 * C::kTile;
    for (int i = threadIdx.x; i < B; i += kBwdThreads) {
      const bool ok = i < valid;
      cp_async4(rows + 4 * i, ok ? p.lse + h * ntok + tok0 + i : p.lse, ok);
      cp_async4(rows + 4 * (B + i), ok ? delta + h * ntok + tok0 + i : delta, ok);
    }
  };

  QueryWalk cur;
  cur.start(p.segments, p.groups, tr.seg, kt);
  issue(cur, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kr0 = warp * 16;  // this warp's keys (rows of S^T, dK, dV)
  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int it = 0; !cur.done; ++it) {
    QueryWalk nxt = cur;
    nxt.advance(p.segments, R);
    if (!nxt.done) {
      issue(nxt, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = it & 1;
    const uint32_t sQ = sStages + st * C::kStage, sdO = sQ + C::kTile;
    const float* rows = reinterpret_cast<const float*>(stage_ptr + st * C::kStage + 2 * C::kTile);
    const int64_t qoff = cur.tile * B;
    const int64_t left = cur.length - qoff;
    const int qvalid = static_cast<int>(left < B ? left : B);
    const bool causal = cur.own;
    const int h = hk * R + cur.r;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + swz<D>(kr0 + lane % 16, kk * 2 + lane / 16));
      ldsm_x4(av, sV + swz<D>(kr0 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        const int brow = np * 16 + (lane / 16) * 8 + lane % 8, bch = kk * 2 + (lane / 8) % 2;
        uint32_t b[4];
        ldsm_x4(b, sQ + swz<D>(brow, bch));
        mma16816<T>(s[2 * np], ak, b);
        mma16816<T>(s[2 * np + 1], ak, b + 2);
        ldsm_x4(b, sdO + swz<D>(brow, bch));
        mma16816<T>(dp[2 * np], av, b);
        mma16816<T>(dp[2 * np + 1], av, b + 2);
      }
    }
    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta); masked entries are exactly 0.
    const bool need_mask = kvalid < B || qvalid < B || (causal && k0 + kr0 + 15 > qoff);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = nt * 8 + 2 * t + (e & 1);
        const int key = kr0 + g + (e >> 1) * 8;
        float pe = exp2_fast(s[nt][e] * scale_log2 - rows[q] * kLog2e);
        if (need_mask && (key >= kvalid || q >= qvalid || (causal && k0 + key > qoff + q)))
          pe = 0.f;
        s[nt][e] = pe;
        dp[nt][e] = pe * (dp[nt][e] - rows[B + q]);
      }
    }
    // dV += P^T dO, dK += dS^T Q (B operands: dO, Q rows are the reduction index).
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk) {
      const uint32_t ap[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t as[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]),
                              pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                              pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        const int brow = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, bch = dd * 2 + lane / 16;
        uint32_t b[4];
        ldsm_x4_t(b, sdO + swz<D>(brow, bch));
        mma16816<T>(dv[2 * dd], ap, b);
        mma16816<T>(dv[2 * dd + 1], ap, b + 2);
        ldsm_x4_t(b, sQ + swz<D>(brow, bch));
        mma16816<T>(dk[2 * dd], as, b);
        mma16816<T>(dk[2 * dd + 1], as, b + 2);
      }
    }
    if (dq_accum != nullptr) {
      // dQ += dS K: dS^T goes through shared memory so each warp can take 16 query rows.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(smem + (sDs - sK) + swz<B>(kr0 + g + 8 * r, nt) + 4 * t) =
              pack2<T>(dp[nt][2 * r], dp[nt][2 * r + 1]);
      __syncthreads();
      const int qr0 = warp * 16;
      uint32_t af[B / 16][4];
#pragma unroll
      for (int kk = 0; kk < B / 16; ++kk)
        ldsm_x4_t(af[kk], sDs + swz<B>(kk * 16 + (lane / 16) * 8 + lane % 8,
                                        warp * 2 + (lane / 8) % 2));
      const int64_t tok0 = cur.q_start + qoff;
#pragma unroll
      for (int dd = 0; dd < DT / 2; ++dd) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < B / 16; ++kk) {
          uint32_t b[4];
          ldsm_x4_t(b, sK + swz<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, dd * 2 + lane / 16));
          mma16816<T>(acc[0], af[kk], b);
          mma16816<T>(acc[1], af[kk], b + 2);
        }
#pragma unroll
        for (int x = 0; x < 2; ++x)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int q = qr0 + g + 8 * r;
            if (q < qvalid) {
              float* dst = dq_accum + ((tok0 + q) * p.shape.num_heads_q + h) * D +
                           (2 * dd + x) * 8 + 2 * t;
              const float a0 = acc[x][2 * r] * p.shape.scale, a1 = acc[x][2 * r + 1] * p.shape.scale;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a0, a1));  // one vector red
#else
              atomicAdd(dst, a0);
              atomicAdd(dst + 1, a1);
#endif
            }
          }
      }
    }
    __syncthreads();  // the stage and dS are rewritten next iteration
    cur = nxt;
  }

  // dK (times scale) and dV, staged through this warp's own rows of sK / sV.
  const int64_t ktok0 = kseg_start + k0;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = kr0 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dk[dt][2 * r] * p.shape.scale, dk[dt][2 * r + 1] * p.shape.scale);
      *reinterpret_cast<uint32_t*>(smem + C::kTile + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dk.data) + hk * p.dk.head_stride, ktok0,
                p.dk.token_stride, kr0, 16, kvalid, lane, 32);
  store_tile<D>(smem + C::kTile, static_cast<uint16_t*>(p.dv.data) + hk * p.dv.head_stride,
                ktok0, p.dv.token_stride, kr0, 16, kvalid, lane, 32);
}

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

  auto issue_kv = [&](int64_t j) {
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

  for (int64_t j = 0; j < keys.count; ++j) {
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
          pack2<T>(dq[dt][2 * r] * p.shape.scale, dq[dt][2 * r + 1] * p.shape.scale);
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dq.data) + h * p.dq.head_stride, q_tok0,
                p.dq.token_stride, row0, 16, q_valid, lane, 32);
}

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

template <class T, int D>
Status launch_bwd(const PrefixAttentionBackward& p, cudaStream_t stream) {
  const PrefixAttentionShape& s = p.shape;
  const float scale_log2 = s.scale * kLog2e;
  float* delta = static_cast<float*>(p.workspace);
  float* dq_accum = p.deterministic
                        ? nullptr
                        : reinterpret_cast<float*>(static_cast<char*>(p.workspace) +
                                                   delta_bytes(s));
  const int64_t slots = ceil_div(s.total_tokens, kBwdTile) + p.segments.count;
  const int64_t kv_blocks = 2 * slots * s.num_heads_kv, q_blocks = slots * s.num_heads_q;
  const int64_t delta_blocks = ceil_div(s.total_tokens * s.num_heads_q, 8);
  const int64_t pairs = s.total_tokens * s.num_heads_q * (D / 2);
  if (q_blocks > 2147483647 || kv_blocks > 2147483647 || delta_blocks > 2147483647 || ceil_div(pairs, 256) > 2147483647)
    return Status::invalid_argument;

  if (dq_accum != nullptr)
    DK_CUDA_TRY(cudaMemsetAsync(dq_accum, 0, dq_accum_bytes(s), stream));
  bwd_delta_kernel<T, D><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(p, delta);
  if (const Status ls = last_launch_status(); !ls.is_ok()) return ls;

  DK_CUDA_TRY(cudaFuncSetAttribute(bwd_kv_kernel<T, D>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   BwdKvConfig<D>::kSmem));
  bwd_kv_kernel<T, D><<<static_cast<unsigned>(kv_blocks), kBwdThreads, BwdKvConfig<D>::kSmem,
                        stream>>>(p, scale_log2, delta, dq_accum, slots);
  if (const Status ls = last_launch_status(); !ls.is_ok()) return ls;

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
