// Backward, KV-centric pass (pa_bwd.cuh, pass 2): dK, dV in registers per key tile, and
// in the non-deterministic mode dQ by float32 atomics. A block holds BN = 64 or 128 keys
// (BN / 16 warps of 16 keys each) and walks query tiles of kBwdTile = 64 rows.
#pragma once
#include "prefix_attention/pa_bwd_common.cuh"
#include "prefix_attention/pa_wgmma.cuh"  // the Hopper kernel's tile layout (kv_issue_item)

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
  // Constants of the block that walk_item needs: kept with the walk (in shared memory in
  // bwd_kv_kernel) rather than in registers across the loop.
  int diag_tile, h0;  // the query tile holding the key tile's first key; first query head

  __device__ __forceinline__ void enter(const PrefixSegments& s, int64_t sg) {
    q_start = s.q_start[sg];
    length = s.length[sg];
    ntiles = static_cast<int>((length + kBwdTile - 1) / kBwdTile);
  }
  __device__ __forceinline__ void start(const PrefixSegments& s, const PrefixGroups& gr,
                                        int64_t sg, int diag_tile, int chunk, int chunks) {
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
      tile = diag_tile;  // the first query tile that sees the key tile's first key
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

// One work item of the walk as the block's threads need it (bwd_kv_kernel keeps three in
// shared memory; valid == 0 marks the end of the walk).
struct WalkItem {
  int64_t tok0;  // first query token of the tile
  int valid;     // query rows in the tile, 0: no item
  int h;         // query head
  int qrel;      // query tile - diagonal query tile (own tiles; the causal mask's offset)
  int own;       // the key tile's own segment: causal
};

// The key tile's constants that the mask and the epilogue need, kept in shared memory
// across the walk (in registers they were spilled).
struct KvTileInfo {
  int64_t ktok0;  // first key token
  int kvalid;     // keys in the tile
  int hk;         // KV head
  int chunk;      // the block's chunk (0 outside the prefix pass)
  int split;      // partials instead of dk, dv
};

template <int D, int BN>
struct BwdKvConfig {
  static_assert(BN == 64 || BN == 128, "keys per block");
  static constexpr int kThreads = BN / 16 * 32;  // a warp per 16 keys
  static constexpr int kKTile = BN * D * 2;      // K or V
  static constexpr int kQTile = kBwdTile * D * 2;  // Q or dO
  static constexpr int kStage = 2 * kQTile + 2 * kBwdTile * 4;  // Q, dO, lse, delta
  static constexpr int kDs = BN * kBwdTile * 2;                 // dS^T, BN keys x 64 queries
  // The walk's state and a ring of 3 items, after dS (all offsets above are multiples of 256).
  static constexpr int kItems = 2 * kKTile + 2 * kStage + kDs;
  static constexpr int kWalk = kItems + 3 * static_cast<int>(sizeof(WalkItem));
  static_assert(sizeof(QueryWalk) <= 128 && sizeof(KvTileInfo) <= 128, "walk area");
  static constexpr int kInfo = kWalk + 128;
  static constexpr int kSmem = kInfo + 128;
};

__device__ __forceinline__ WalkItem walk_item(const QueryWalk& w) {
  WalkItem it{0, 0, 0, 0, 0};
  if (w.done) return it;
  const int64_t qoff = static_cast<int64_t>(w.tile) * kBwdTile;
  const int64_t left = w.length - qoff;
  it.tok0 = w.q_start + qoff;
  it.valid = static_cast<int>(left < kBwdTile ? left : kBwdTile);
  it.h = w.h0 + w.r;
  it.qrel = w.tile - w.diag_tile;
  it.own = w.own ? 1 : 0;
  return it;
}

// The key tile a KV-kernel block works on (KvTileInfo) and the start of its walk. False:
// the block has nothing to do (a block of the other pass, a surplus slot, or an empty chunk,
// whose zero partials this writes). Shared by bwd_kv_kernel and bwd_kv_sm90_kernel.
template <int D, int BN, int THREADS>
__device__ __forceinline__ bool kv_block_begin(const PrefixAttentionBackward& p, int heads_per_kv,
                                               int64_t slots, int chunks, float* partials,
                                               KvTileInfo& ti, QueryWalk& cur) {
  constexpr int B = kBwdTile;
  const int hkv = p.shape.num_heads_kv;
  const int64_t bid = blockIdx.x;
  const int hk = static_cast<int>(bid % hkv);
  // Two passes over the schedule: key tiles of prefix segments (seen by their own queries
  // and by every suffix of the group: the heavy ones here) first, each as `chunks`
  // adjacent blocks (chunk 0, the heaviest, first), then the rest; a block of the other
  // pass exits at once.
  const int64_t prefix_blocks = slots * chunks * hkv;
  const bool prefix_pass = bid < prefix_blocks;
  const int64_t pass_slot = prefix_pass ? bid / hkv / chunks : (bid - prefix_blocks) / hkv;
  const int chunk = prefix_pass ? static_cast<int>(bid / hkv % chunks) : 0;
  const TileRef tr = find_tile(
      p.segments, BN == 64 ? p.segments.order_tiles_64 : p.segments.order_tiles_128, pass_slot);
  if (tr.seg < 0 || (p.segments.prefix_length[tr.seg] == 0) != prefix_pass) return false;
  const int64_t kt = tr.tile;  // earlier key tiles are seen by more of their own queries
  // Split (prefix pass, chunks > 1): float32 partials to slot `chunk`, summed by
  // bwd_split_reduce_kernel; else dk, dv directly.
  const bool split = prefix_pass && chunks > 1;
  const int64_t k0 = kt * BN;
  const int64_t klen = p.segments.length[tr.seg];
  const int kvalid = static_cast<int>(klen - k0 < BN ? klen - k0 : BN);
  // The query tile holding key k0 (BN is a multiple of B): the own walk starts there.
  const int diag_tile = static_cast<int>(kt) * (BN / B);
  const int64_t ktok0 = p.segments.q_start[tr.seg] + k0;
  ti = KvTileInfo{ktok0, kvalid, hk, chunk, split ? 1 : 0};

  cur.start(p.segments, p.groups, tr.seg, diag_tile, chunk, prefix_pass ? chunks : 1);
  cur.diag_tile = diag_tile;
  cur.h0 = hk * heads_per_kv;
  if (cur.done) {  // an empty chunk (chunk > 0 only): its partials are zeros
    const int64_t slot_stride = p.shape.total_tokens * hkv * D;  // one (T, Hkv, D) array
    float* dst = partials + 2 * chunk * slot_stride + hk * D;
    for (int i = threadIdx.x; i < kvalid * (D / 4); i += THREADS) {
      const int64_t off = (ktok0 + i / (D / 4)) * hkv * D + i % (D / 4) * 4;
      *reinterpret_cast<float4*>(dst + off) = make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(dst + slot_stride + off) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    return false;
  }
  return true;
}

// Loads a work item's Q and dO tiles into a stage (kSw128: the wgmma layout of
// pa_wgmma.cuh, else pa_device.cuh's), and its rows' lse and delta after them.
template <int D, int THREADS, bool kSw128>
__device__ __forceinline__ void kv_issue_item(const PrefixAttentionBackward& p, const float* delta,
                                              const WalkItem& w, uint32_t base,
                                              uint32_t q_tile_bytes) {
  constexpr int B = kBwdTile;
  const int h = w.h;
  const int64_t tok0 = w.tok0;
  const int valid = w.valid;
  const int64_t ntok = p.shape.total_tokens;
  const uint16_t* q = static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride;
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout.data) + h * p.dout.head_stride;
  if constexpr (kSw128) {
    load_tile_sw128<D, THREADS, B>(base, q, tok0, p.q.token_stride, valid);
    load_tile_sw128<D, THREADS, B>(base + q_tile_bytes, dout, tok0, p.dout.token_stride, valid);
  } else {
    load_tile<D, THREADS>(base, q, tok0, p.q.token_stride, B, valid);
    load_tile<D, THREADS>(base + q_tile_bytes, dout, tok0, p.dout.token_stride, B, valid);
  }
  // Asynchronous too: a plain load here would stall every item on global latency.
  const uint32_t rows = base + 2 * q_tile_bytes;
  for (int i = threadIdx.x; i < B; i += THREADS) {
    const bool ok = i < valid;
    cp_async4(rows + 4 * i, ok ? p.lse + h * ntok + tok0 + i : p.lse, ok);
    cp_async4(rows + 4 * (B + i), ok ? delta + h * ntok + tok0 + i : delta, ok);
  }
}

// The walk runs one item ahead of the loads, in thread 0 alone, on state kept in shared
// memory: items it and it + 1 are in the ring when iteration it starts, and thread 0
// writes item it + 2 over item it - 1 (read by all before the previous iteration's last
// barrier). No walk state is live in registers across the loop body, where the hd128
// kernels (128 dK/dV accumulators, 64 scores) spilled it. Returns item 0.
__device__ __forceinline__ WalkItem kv_walk_begin(const PrefixSegments& s, int heads_per_kv,
                                                  QueryWalk cur, const KvTileInfo& ti,
                                                  WalkItem* ring, QueryWalk* walk,
                                                  KvTileInfo* info) {
  const WalkItem first = walk_item(cur);
  if (threadIdx.x == 0) {
    *info = ti;
    ring[0] = first;
    cur.advance(s, heads_per_kv);
    ring[1] = walk_item(cur);
    *walk = cur;
  }
  return first;
}
// Thread 0, iteration it: item it + 2 into the ring.
__device__ __forceinline__ void kv_walk_ahead(const PrefixSegments& s, int heads_per_kv, int it,
                                              WalkItem* ring, QueryWalk* walk) {
  if (threadIdx.x != 0) return;
  QueryWalk w = *walk;
  if (!w.done) w.advance(s, heads_per_kv);
  ring[(it + 2) % 3] = walk_item(w);
  *walk = w;
}

// The walk's ring of 3 items, its state and the key tile's info, in shared memory.
struct KvWalkSmem {
  WalkItem* ring;
  QueryWalk* walk;
  KvTileInfo* info;
};
// Before the loop: the ring and the first item's loads (its stage 0), for kv_advance.
template <int D, int THREADS, bool kSw128>
__device__ __forceinline__ void kv_walk_start(const PrefixAttentionBackward& p, const float* delta,
                                              int heads_per_kv, const QueryWalk& cur,
                                              const KvTileInfo& ti, const KvWalkSmem& w,
                                              uint32_t stages, uint32_t q_tile_bytes) {
  const WalkItem first = kv_walk_begin(p.segments, heads_per_kv, cur, ti, w.ring, w.walk, w.info);
  kv_issue_item<D, THREADS, kSw128>(p, delta, first, stages, q_tile_bytes);
  cp_async_commit();
}
// Iteration it's loads: item it + 1's tiles into stage (it + 1) & 1 while thread 0 walks
// to item it + 2, then the wait for item it's (the caller's barrier publishes them).
// Returns whether item it + 1 exists.
template <int D, int THREADS, bool kSw128>
__device__ __forceinline__ bool kv_advance(const PrefixAttentionBackward& p, const float* delta,
                                           int heads_per_kv, int it, const KvWalkSmem& w,
                                           uint32_t stages, uint32_t stage_bytes,
                                           uint32_t q_tile_bytes) {
  const WalkItem* next = w.ring + (it + 1) % 3;
  const bool more = next->valid > 0;
  if (more) {
    kv_issue_item<D, THREADS, kSw128>(p, delta, *next, stages + ((it + 1) & 1) * stage_bytes,
                                      q_tile_bytes);
    cp_async_commit();
  }
  kv_walk_ahead(p.segments, heads_per_kv, it, w.ring, w.walk);  // overlaps the loads above
  if (more) cp_async_wait<1>(); else cp_async_wait<0>();
  return more;
}

// P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta) for one warp's 16 keys x B queries, from
// the m16n8 C fragments s, dp (the mma.sync and the wgmma accumulators alike), rounded to
// 16-bit pairs ({row g, row g + 8} per n-tile: the A fragments of the dV / dK products and
// the dS^T store use these pairs; 32 registers instead of 64 floats live through them).
// Masked entries are exactly 0. Masking in 32 bits relative to the key tile: the own walk
// starts at the diagonal query tile (kt BN / B), so qoff - k0 = qrel B with qrel >= 0, and
// the causal test k0 + key > qoff + q is q < key - qrel B. Per key row the kept queries are
// then [lo, hi) (hi = 0 for a key past kvalid), hoisted out of the element loop and less
// this lane's 2t, so each element compares a constant column nt 8 + (e & 1). Same masked
// set as the 64-bit form (the 64-bit terms were spilled in the hd128 kernel).
template <class T, int BN, int NT>
__device__ __forceinline__ void kv_p_ds(const float (&s)[NT][4], const float (&dp)[NT][4],
                                        const float* rows, int kvalid, int qvalid, bool causal,
                                        int qrel, int kr0, int g, int t, float scale_log2,
                                        uint32_t (&pp)[NT][2], uint32_t (&pd)[NT][2]) {
  constexpr int B = kBwdTile;
  const bool need_mask = kvalid < BN || qvalid < B || (causal && kr0 + 15 > qrel * B);
  int lo[2], hi[2];
  const int key0 = kr0 + g;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    lo[r] = (causal ? key - qrel * B : 0) - 2 * t;
    hi[r] = (key < kvalid ? qvalid : 0) - 2 * t;
  }
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
}

// The end of a KV-kernel block: float32 partials (split) or dK (times scale) and dV in the
// tensors' dtype, from the m16n8 C fragments of this warp's 16 keys; the latter staged
// through the warp's own rows of the first 2 x BN x D x 2 bytes of shared memory (the K and
// V tiles, read by no one any more) in pa_device.cuh's swizzle.
template <class T, int D, int BN>
__device__ __forceinline__ void kv_epilogue(const PrefixAttentionBackward& p, unsigned char* smem,
                                            const KvTileInfo& ti, const float (&dk)[D / 8][4],
                                            const float (&dv)[D / 8][4], int kr0, int g, int t,
                                            int lane, float scale_f, float* partials) {
  constexpr int DT = D / 8, kKTile = BN * D * 2;
  const int hkv = p.shape.num_heads_kv;
  const int row0 = kr0 + g;
  if (ti.split) {
    // Unscaled float32 partials straight from the fragments: a quad writes 32 contiguous
    // bytes of a row per dt (full sectors); the reduce applies the scale once.
    const int64_t slot_stride = p.shape.total_tokens * hkv * D;  // one (T, Hkv, D) array
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
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dk[dt][2 * r] * scale_f, dk[dt][2 * r + 1] * scale_f);
      *reinterpret_cast<uint32_t*>(smem + kKTile + swz<D>(row, dt) + 4 * t) =
          pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.dk.data) + ti.hk * p.dk.head_stride, ti.ktok0,
                p.dk.token_stride, kr0, 16, ti.kvalid, lane, 32);
  store_tile<D>(smem + kKTile, static_cast<uint16_t*>(p.dv.data) + ti.hk * p.dv.head_stride,
                ti.ktok0, p.dv.token_stride, kr0, 16, ti.kvalid, lane, 32);
}

// 64 keys: 4 warps, 2 blocks per SM; 128 keys: 8 warps, 1 block per SM (the same warps per
// SM; each Q/dO tile loaded and each dQ row reduced once per 128 keys instead of per 64).
template <class T, int D, int BN>
__global__ void __launch_bounds__(BwdKvConfig<D, BN>::kThreads, BN == 64 ? 2 : 1)
    bwd_kv_kernel(const PrefixAttentionBackward p, float scale_log2, float scale_f,
                  int heads_per_kv, const float* delta, float* dq_accum, int64_t slots,
                  int chunks, float* partials) {
  // scale_f (the shape's double as float) and heads_per_kv (Hq / Hkv) come as parameters
  // so they stay in the constant bank: as values computed here they were spilled (ptxas).
  using C = BwdKvConfig<D, BN>;
  constexpr int B = kBwdTile, NT = B / 8, DT = D / 8;  // B: query rows per work item
  constexpr int kThreads = C::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem), sV = sK + C::kKTile, sStages = sV + C::kKTile;
  const uint32_t sDs = sStages + 2 * C::kStage;
  const unsigned char* stage_ptr = smem + 2 * C::kKTile;

  const int R = heads_per_kv;
  KvTileInfo ti0;
  QueryWalk cur;
  if (!kv_block_begin<D, BN, kThreads>(p, R, slots, chunks, partials, ti0, cur)) return;
  load_tile<D, kThreads>(sK, static_cast<const uint16_t*>(p.k.data) + ti0.hk * p.k.head_stride,
                         ti0.ktok0, p.k.token_stride, BN, ti0.kvalid);
  load_tile<D, kThreads>(sV, static_cast<const uint16_t*>(p.v.data) + ti0.hk * p.v.head_stride,
                         ti0.ktok0, p.v.token_stride, BN, ti0.kvalid);

  const KvWalkSmem ws{reinterpret_cast<WalkItem*>(smem + C::kItems),
                      reinterpret_cast<QueryWalk*>(smem + C::kWalk),
                      reinterpret_cast<KvTileInfo*>(smem + C::kInfo)};
  const KvTileInfo* info = ws.info;
  kv_walk_start<D, kThreads, false>(p, delta, R, cur, ti0, ws, sStages, C::kQTile);
  __syncthreads();  // ring[1] (the loop's first lookahead)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kr0 = warp * 16;  // this warp's keys (rows of S^T, dK, dV)
  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  for (int it = 0;; ++it) {
    const WalkItem* item = ws.ring + it % 3;
    const bool more =
        kv_advance<D, kThreads, false>(p, delta, R, it, ws, sStages, C::kStage, C::kQTile);
    __syncthreads();
    const int qvalid = item->valid;
    const bool causal = item->own != 0;
    const int qrel = item->qrel;  // own tiles: query tile - diagonal query tile, >= 0
    const int st = it & 1;
    const uint32_t sQ = sStages + st * C::kStage, sdO = sQ + C::kQTile;
    const float* rows = reinterpret_cast<const float*>(stage_ptr + st * C::kStage + 2 * C::kQTile);

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
    uint32_t pp[NT][2], pd[NT][2];
    kv_p_ds<T, BN>(s, dp, rows, info->kvalid, qvalid, causal, qrel, kr0, g, t, scale_log2, pp, pd);
    // dV += P^T dO, dK += dS^T Q (B operands: dO, Q rows are the reduction index).
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk) {
      const uint32_t ap[4] = {pp[2 * kk][0], pp[2 * kk][1], pp[2 * kk + 1][0], pp[2 * kk + 1][1]};
      const uint32_t as[4] = {pd[2 * kk][0], pd[2 * kk][1], pd[2 * kk + 1][0], pd[2 * kk + 1][1]};
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
      // dQ += dS K: dS^T goes through shared memory so each warp can take 16 query rows
      // and D / kDSplit columns (4 warps: all columns; 8 warps: half each), summing over
      // all BN keys before its atomics.
      constexpr int kDSplit = BN / 64, kDPairs = D / 16 / kDSplit;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(smem + (sDs - sK) + swz<B>(kr0 + g + 8 * r, nt) + 4 * t) =
              pd[nt][r];
      __syncthreads();
      const int qr0 = warp % (B / 16) * 16;
      const int dd0 = warp / (B / 16) * kDPairs;  // first 16-column pair of this warp
      uint32_t af[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        ldsm_x4_t(af[kk], sDs + swz<B>(kk * 16 + (lane / 16) * 8 + lane % 8,
                                        qr0 / 8 + (lane / 8) % 2));
      // One 64-bit pointer per item (this lane's first row; the second is 8 rows on, an
      // int stride): the per-element 64-bit (token, head) index math was spilled.
      const int row_stride = p.shape.num_heads_q * D;  // floats per token
      const int qrow = qr0 + g;
      float* dq_row =
          dq_accum + ((item->tok0 + qrow) * p.shape.num_heads_q + item->h) * D;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // sm_90 vector reductions, 4 contiguous floats each: the quad's lanes t and t ^ 1
      // swap halves so that an even lane owns columns 2t..2t+3 of the first n-tile of a
      // 16-column pair and an odd lane columns 8 + 2(t - 1).. of the second: one red.v4
      // per row and pair instead of two red.v2 (same addends, the atomics' order was
      // already unordered in this mode).
      const bool odd = t & 1;
      float* dq_lane = dq_row + (odd ? 8 + 2 * (t - 1) : 2 * t);
#else
      float* dq_lane = dq_row + 2 * t;
#endif
#pragma unroll
      for (int di = 0; di < kDPairs; ++di) {
        const int dd = dd0 + di;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t b[4];
          ldsm_x4_t(b, sK + swz<D>(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, dd * 2 + lane / 16));
          mma16816<T>(acc[0], af[kk], b);
          mma16816<T>(acc[1], af[kk], b + 2);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* dst = dq_lane + r * 8 * row_stride + dd * 16;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          // Every lane shuffles (the row test below differs between quads, not within one).
          const float s0 = odd ? acc[0][2 * r] : acc[1][2 * r];
          const float s1 = odd ? acc[0][2 * r + 1] : acc[1][2 * r + 1];
          const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
          const float r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
          if (qrow + 8 * r >= qvalid) continue;
          const float v0 = odd ? r0 : acc[0][2 * r], v1 = odd ? r1 : acc[0][2 * r + 1];
          const float v2 = odd ? acc[1][2 * r] : r0, v3 = odd ? acc[1][2 * r + 1] : r1;
          red_add_v4(dst, v0 * scale_f, v1 * scale_f, v2 * scale_f, v3 * scale_f);
#else
          if (qrow + 8 * r >= qvalid) continue;
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            atomicAdd(dst + x * 8, acc[x][2 * r] * scale_f);
            atomicAdd(dst + x * 8 + 1, acc[x][2 * r + 1] * scale_f);
          }
#endif
        }
      }
    }
    __syncthreads();  // the stage and dS are rewritten next iteration
    if (!more) break;
  }

  // The epilogue's constants from shared memory (KvTileInfo).
  kv_epilogue<T, D, BN>(p, smem, *info, dk, dv, kr0, g, t, lane, scale_f, partials);
}

}  // namespace pa
}  // namespace diffkern
