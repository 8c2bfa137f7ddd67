// Backward, KV-centric pass (pa_bwd.cuh, pass 2): dK, dV in registers per key tile, and
// in the non-deterministic mode dQ by float32 atomics.
#pragma once
#include "prefix_attention/pa_bwd_common.cuh"

namespace diffkern {
namespace pa {

// The query tiles that see one key tile of segment `seg` (key tile kt), each for the R
// query heads of the KV head, in a fixed order. With the key tile split in `chunks`
// (pa_bwd.cuh), chunk c walks the suffixes [c G / chunks, (c + 1) G / chunks) of the
// group, and chunk 0 also the segment's own tiles first; a chunk may be empty (done at once).
struct QueryWalk {
  // Tile indices in int: a segment of 2^37 tokens could not be held in memory, and the
  // walk is live across the whole loop (registers the hd128 kernel does not have).
  int tile, ntiles;
  int64_t q_start, length;
  int64_t next_suffix, suffix_end;
  int r;
  bool own, done;

  __device__ __forceinline__ void enter(const PrefixSegments& s, int64_t sg) {
    q_start = s.q_start[sg];
    length = s.length[sg];
    ntiles = static_cast<int>((length + kBwdTile - 1) / kBwdTile);
  }
  __device__ __forceinline__ void start(const PrefixSegments& s, const PrefixGroups& gr,
                                        int64_t sg, int64_t kt, int chunk, int chunks) {
    r = 0;
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
        const int64_t first = gr.first_suffix[lo], g = gr.num_suffixes[lo];
        next_suffix = first + chunk * g / chunks;
        suffix_end = first + (chunk + 1) * g / chunks;
      }
    }
    if (chunk == 0) {
      enter(s, sg);
      tile = static_cast<int>(kt);  // BM == BN: the diagonal query tile
      own = true;
    } else {
      next_segment(s);
    }
  }
  // The first tile of the next suffix that has one, or done.
  __device__ __forceinline__ void next_segment(const PrefixSegments& s) {
    own = false;
    tile = 0;
    while (next_suffix < suffix_end) {
      enter(s, next_suffix++);
      if (ntiles > 0) return;
    }
    done = true;
  }
  __device__ __forceinline__ void advance(const PrefixSegments& s, int heads_per_kv) {
    if (++r < heads_per_kv) return;
    r = 0;
    if (++tile < ntiles) return;
    next_segment(s);
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
    bwd_kv_kernel(const PrefixAttentionBackward p, float scale_log2, float scale_f,
                  int heads_per_kv, const float* delta, float* dq_accum, int64_t slots,
                  int chunks, float* partials) {
  // scale_f (the shape's double as float) and heads_per_kv (Hq / Hkv) come as parameters
  // so they stay in the constant bank: as values computed here they were spilled (ptxas).
  using C = BwdKvConfig<D>;
  constexpr int B = kBwdTile, NT = B / 8, DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem), sV = sK + C::kTile, sStages = sV + C::kTile;
  const uint32_t sDs = sStages + 2 * C::kStage;
  const unsigned char* stage_ptr = smem + 2 * C::kTile;

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
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_64, pass_slot);
  if (tr.seg < 0 || (p.segments.prefix_length[tr.seg] == 0) != prefix_pass) return;
  const int64_t kt = tr.tile;  // earlier key tiles are seen by more of their own queries
  // Split (prefix pass, chunks > 1): float32 partials to slot `chunk`, summed by
  // bwd_split_reduce_kernel; else dk, dv directly.
  const bool split = prefix_pass && chunks > 1;
  const int64_t slot_stride = ntok * hkv * D;  // one (T, Hkv, D) float32 array
  const int64_t kseg_start = p.segments.q_start[tr.seg];
  const int64_t k0 = kt * B;
  const int64_t klen = p.segments.length[tr.seg];
  const int kvalid = static_cast<int>(klen - k0 < B ? klen - k0 : B);
  const int64_t ktok0 = kseg_start + k0;

  QueryWalk cur;
  cur.start(p.segments, p.groups, tr.seg, kt, chunk, prefix_pass ? chunks : 1);
  if (cur.done) {  // an empty chunk (chunk > 0 only): its partials are zeros
    float* dst = partials + 2 * chunk * slot_stride + hk * D;
    for (int i = threadIdx.x; i < kvalid * (D / 4); i += kBwdThreads) {
      const int64_t off = (ktok0 + i / (D / 4)) * hkv * D + i % (D / 4) * 4;
      *reinterpret_cast<float4*>(dst + off) = make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(dst + slot_stride + off) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    return;
  }

  load_tile<D, kBwdThreads>(sK, static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride,
                            kseg_start + k0, p.k.token_stride, B, kvalid);
  load_tile<D, kBwdThreads>(sV, static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride,
                            kseg_start + k0, p.v.token_stride, B, kvalid);

  // Loads a work item's Q, dO (async) and its rows' lse, delta (plain loads).
  auto issue = [&](const QueryWalk& w, int st) {
    const int h = hk * R + w.r;
    const int64_t tok0 = w.q_start + static_cast<int64_t>(w.tile) * B;
    const int64_t left = w.length - static_cast<int64_t>(w.tile) * B;
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
    const int64_t qoff = static_cast<int64_t>(cur.tile) * B;
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
              const float a0 = acc[x][2 * r] * scale_f, a1 = acc[x][2 * r + 1] * scale_f;
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

  if (split) {
    // Unscaled float32 partials straight from the fragments: a quad writes 32 contiguous
    // bytes of a row per dt (full sectors); the reduce applies the scale once.
    float* dst = partials + 2 * chunk_of_block() * slot_stride + hk * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = kr0 + g + 8 * r;
      if (row >= kvalid) continue;
      const int64_t off = (ktok0 + row) * hkv * D + 2 * t;
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
      const int row = kr0 + g + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dk[dt][2 * r] * scale_f, dk[dt][2 * r + 1] * scale_f);
      *reinterpret_cast<uint32_t*>(smem + C::kTile + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dk.data) + hk * p.dk.head_stride, ktok0,
                p.dk.token_stride, kr0, 16, kvalid, lane, 32);
  store_tile<D>(smem + C::kTile, static_cast<uint16_t*>(p.dv.data) + hk * p.dv.head_stride,
                ktok0, p.dv.token_stride, kr0, 16, kvalid, lane, 32);
}

}  // namespace pa
}  // namespace diffkern
