// Hopper forward (sm_90a, head dim 128): the same query tiles, schedule, key-tile walk,
// masking and online softmax as fwd_kernel (pa_fwd.cuh), with the two products on
// warpgroup MMA (pa_wgmma.cuh) instead of mma.sync. One block = one query tile of 128 rows
// = 2 warpgroups of 64 rows; K/V tiles of BN keys stream through shared memory with
// cp.async (two K and two V buffers, loads one iteration ahead: see the pipeline below) in
// the 128-byte-swizzled layout wgmma reads directly.
//
// Why it is faster: S = Q K^T reads Q and K from shared memory inside the tensor cores
// (one descriptor per 64 x BN x 16 step, no ldmatrix, no fragment registers), and O += P V
// takes P straight from the softmax's registers. The mma.sync forward spends its issue
// slots on ldmatrix and register staging (bench/NOTES-attention.md).
#pragma once
#include "common/cuda_check.cuh"
#include "common/launch.h"
#include "prefix_attention/pa_device.cuh"
#include "prefix_attention/pa_fwd.cuh"
#include "prefix_attention/pa_wgmma.cuh"

namespace diffkern {
namespace pa {

#ifndef DK_PA_SM90_BN
#define DK_PA_SM90_BN 128
#endif
struct Sm90FwdConfig {
  static constexpr int D = 128, BM = 128, BN = DK_PA_SM90_BN, THREADS = 256;
  static constexpr int kTileQ = BM * D * 2, kTileKV = BN * D * 2;
  static constexpr int kSmem = kTileQ + 4 * kTileKV;  // Q, K0, K1, V0, V1 (1024-aligned)
};

// op over v[0..N) as a balanced tree (N a power of two): log2 N dependent steps, not N - 1.
template <int N, class Op>
__device__ __forceinline__ float tree_reduce(float (&v)[N], Op op) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    float h[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) h[i] = op(v[i], v[i + N / 2]);
    return tree_reduce<N / 2>(h, op);
  }
}

// Masking and online softmax of one S tile (fwd_kernel's, for one 16-row m-tile per warp):
// s becomes P (unnormalized: 2^(scaled score - running maximum)), m_run (log2 domain) and
// l_run move on, and alpha[r] is the factor row r of the output must be rescaled by.
// Most tiles need no mask (every key valid, the whole tile before the diagonal); this
// kernel is bound by issue slots, so they take a shorter path: the row extreme on the raw
// scores (the maximum, or for a negative scale the minimum: kNegScale) and the scale folded
// into the exponent's FFMA, 4 instructions per score instead of 7; the reductions as trees
// (short dependency chains). Tiles with a mask take fwd_kernel's path.
template <int BN, bool kNegScale>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 2], const FwdKeyTiles<BN>& keys,
                                             int j, int row0, int g, int t, float scale_log2,
                                             float (&m_run)[2], float (&l_run)[2],
                                             float (&alpha)[2]) {
  constexpr int NT = BN / 8;
  const int kvalid = keys.valid(j);
  const int jrel = j - keys.diag;
  const bool need_mask = kvalid < BN || (jrel >= 0 && jrel * BN + BN - 1 > row0);
  float mx[2], neg_base[2];
  if (need_mask) {
    int lim[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lim[r] = kvalid - 1;
      if (jrel >= 0) lim[r] = min(lim[r], row0 + g + r * 8 - jrel * BN);
      lim[r] -= 2 * t;
    }
    mx[0] = m_run[0];
    mx[1] = m_run[1];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[4 * nt + e] * scale_log2;
        if (nt * 8 + (e & 1) > lim[e >> 1]) x = -INFINITY;
        s[4 * nt + e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
  } else {
    // Per row, the raw scores' extreme over this tile, as a tree.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        v[nt] = kNegScale ? fminf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1])
                          : fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]);
      const float ext = kNegScale ? tree_reduce<NT>(v, [](float x, float y) { return fminf(x, y); })
                                  : tree_reduce<NT>(v, [](float x, float y) { return fmaxf(x, y); });
      mx[r] = fmaxf(m_run[r], ext * scale_log2);
    }
  }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = quad_max(mx[r]);
    base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with no key yet: exp2 gives 0
    alpha[r] = exp2_fast(m_run[r] - base[r]);
    m_run[r] = mx[r];
    neg_base[r] = -base[r];
  }
  // Unmasked: p = 2^(s scale - base) in one FFMA; masked: s holds scaled scores already.
  const float mul = need_mask ? 1.f : scale_log2;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[4 * nt + e] = exp2_fast(fmaf(s[4 * nt + e], mul, neg_base[e >> 1]));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float v[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) v[nt] = s[4 * nt + 2 * r] + s[4 * nt + 2 * r + 1];
    l_run[r] = l_run[r] * alpha[r] + tree_reduce<NT>(v, [](float x, float y) { return x + y; });
  }
}

// P as the A operand from registers (k-step kk = keys 16 kk .. 16 kk + 15): the C
// fragments of column tiles 2 kk and 2 kk + 1 are the m16n8k16 A fragment.
template <class T, int BN>
__device__ __forceinline__ void pack_p(const float (&s)[BN / 2], uint32_t (&a)[BN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    a[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    a[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    a[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    a[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// The pipeline (FlashAttention-3's intra-warpgroup overlap, without warp specialization).
// Iteration i: issue S(i+1) = Q K(i+1)^T, then O += P(i) V(i); wait for S(i+1) only and run
// its softmax while O += P V still runs on the tensor cores; wait for that, rescale O. Loads:
// group i+3 = {K(i+3), V(i+2)} is issued at the end of iteration i, so every tile has a
// whole iteration to land, in two K and two V buffers (K(i+3) reuses K(i+1)'s, V(i+2)
// V(i)'s, both read to completion before the one barrier per iteration).
template <class T, bool kNegScale>
__global__ void __launch_bounds__(Sm90FwdConfig::THREADS, 1)
    fwd_sm90_kernel(const PrefixAttentionForward p, float scale_log2) {
#if DK_PA_WGMMA_DEVICE
  using C = Sm90FwdConfig;
  constexpr int D = C::D, BM = C::BM, BN = C::BN, DT = D / 8;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + C::kTileQ;          // two K buffers
  const uint32_t sV = sK + 2 * C::kTileKV;     // two V buffers

  FwdQueryTile qt;
  if (!fwd_query_tile<BM>(p, qt)) return;
  const int h = qt.h, hk = qt.hk, q_valid = qt.q_valid;
  const int64_t q_tok0 = qt.q_tok0;
  const FwdKeyTiles<BN> keys(p.segments, qt.seg, qt.q0, BM);

  const uint16_t* qb = static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride;
  const uint16_t* kb = static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride;
  const uint16_t* vb = static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride;
  auto load_k = [&](int j) {
    if (j < keys.count)
      load_tile_sw128<D, C::THREADS, BN>(sK + (j & 1) * C::kTileKV, kb, keys.start(j),
                                         p.k.token_stride, keys.valid(j));
  };
  auto load_v = [&](int j) {
    if (j < keys.count)
      load_tile_sw128<D, C::THREADS, BN>(sV + (j & 1) * C::kTileKV, vb, keys.start(j),
                                         p.v.token_stride, keys.valid(j));
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wg = warp / 4;
  const int row0 = warp * 16;  // this warp's 16 rows: warpgroup wg's rows 64 wg + 16 (warp % 4)
  // Q as the K-major A operand: this warpgroup's 64 rows, k-step kk (16 values).
  const uint32_t q_base = sQ + wg * 64 * 128;
  auto issue_s = [&](float (&s)[BN / 2], int j) {
    const uint32_t k_base = sK + (j & 1) * C::kTileKV;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<T, BN>(s, sw128_desc(q_base + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024),
                      sw128_desc(k_base + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
                      kk > 0);
    wgmma_commit();
  };
  auto loads_visible = [&]() {
    cp_async_wait<0>();
    fence_async_smem();  // this thread's cp.async writes, visible to wgmma after the barrier
    __syncthreads();
  };

  // Prologue: {Q, K0}, then {K1, V0}; S(0) and its softmax; then {K2, V1}.
  load_tile_sw128<D, C::THREADS, BM>(sQ, qb, q_tok0, p.q.token_stride, q_valid);
  load_k(0);
  cp_async_commit();
  load_k(1);
  load_v(0);
  cp_async_commit();
  cp_async_wait<1>();
  fence_async_smem();
  __syncthreads();

  float o[DT * 4];
#pragma unroll
  for (int i = 0; i < DT * 4; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
  float s[BN / 2];
  uint32_t a[BN / 16][4];
  issue_s(s, 0);
  wgmma_wait<0>();
  fence_regs(s);
  softmax_tile<BN, kNegScale>(s, keys, 0, row0, g, t, scale_log2, m_run, l_run, alpha);
  pack_p<T, BN>(s, a);
  loads_visible();  // K1, V0; K0 free
  load_k(2);
  load_v(1);
  cp_async_commit();

  // One pipelined iteration: P(i) in `cur`, the softmax of S(i + 1) into `nxt` (i + 1 <
  // count). Two P buffers used in turn (the loop below is unrolled by two) so that no
  // register copy lands between the wgmma issues: ptxas serializes wgmma when registers
  // an issued wgmma reads are written before its wait.
  // O += P(i) V(i), V MN-major (pa_wgmma.cuh): k-step kk = V rows 16 kk .. 16 kk + 15.
  auto issue_pv = [&](int i, uint32_t (&cur)[BN / 16][4]) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      wgmma_rs_t<T, D>(o, cur[kk], sw128_desc(sV + (i & 1) * C::kTileKV + kk * 16 * 128,
                                               BN * 128, 1024));
    wgmma_commit();
  };
  auto step = [&](int i, uint32_t (&cur)[BN / 16][4], uint32_t (&nxt)[BN / 16][4]) {
    issue_s(s, i + 1);
    issue_pv(i, cur);
    wgmma_wait<1>();
    fence_regs(s);
    softmax_tile<BN, kNegScale>(s, keys, i + 1, row0, g, t, scale_log2, m_run, l_run, alpha);
    pack_p<T, BN>(s, nxt);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(cur);
    // Once a row's maximum has settled, alpha is exactly 1: skip the 64 multiplies when it
    // is so for every row of the warp (issue slots are what this kernel runs out of).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        o[4 * d + 0] *= alpha[0]; o[4 * d + 1] *= alpha[0];
        o[4 * d + 2] *= alpha[1]; o[4 * d + 3] *= alpha[1];
      }
    }
    loads_visible();  // K(i+2), V(i+1) in; K(i+1) and V(i) read by every warp
    load_k(i + 3);
    load_v(i + 2);
    cp_async_commit();
  };
  // The last tile: O += P V only.
  auto last = [&](int i, uint32_t (&cur)[BN / 16][4]) {
    issue_pv(i, cur);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs(cur);
  };
  uint32_t a1[BN / 16][4];
  int i = 0;
  for (; i + 2 < keys.count; i += 2) {
    step(i, a, a1);
    step(i + 1, a1, a);
  }
  if (i + 1 < keys.count) {
    step(i, a, a1);
    last(i + 1, a1);
  } else {
    last(i, a);
  }
  __syncthreads();  // every warp's wgmma done before the Q tile is reused for staging

  // Normalize, write LSE (natural log), stage the rows in the old Q tile in pa_device.cuh's
  // swizzle and store 16-byte vectors, each warp its own rows. (The last loads issued were
  // of tiles past the end: none.)
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = 1.f / l;
    const int row = row0 + g + r * 8;
    if (t == 0 && row < q_valid)
      p.lse[h * p.shape.total_tokens + q_tok0 + row] = (m_run[r] + log2f(l)) * kLn2;
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + g + r * 8;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
          pack2<T>(o[4 * dt + 2 * r] * inv[r], o[4 * dt + 2 * r + 1] * inv[r]);
    }
  }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.out.data) + h * p.out.head_stride, q_tok0,
                p.out.token_stride, row0, 16, q_valid, lane, 32);
#else
  // Compiled for another architecture (sm_80, sm_90 without "a", PTX): the host launches
  // this kernel only on a 9.0 device of a build with sm_90a SASS, which the driver runs.
  // Should a build list both sm_90 and sm_90a and the driver pick the former, fail loudly.
  __trap();
#endif
}

template <class T>
Status launch_fwd_sm90(const PrefixAttentionForward& p, cudaStream_t stream) {
  using C = Sm90FwdConfig;
  const int64_t slots = ceil_div(p.shape.total_tokens, C::BM) + p.segments.count;
  const int64_t blocks = slots * p.shape.num_heads_q;
  if (blocks > 2147483647) return Status::invalid_argument;
  const float scale_log2 = static_cast<float>(p.shape.scale * kLog2e);
  // The softmax's row extreme on raw scores is the maximum for a scale >= 0, the minimum
  // for a negative one (softmax_tile).
  auto kernel = scale_log2 < 0.f ? fwd_sm90_kernel<T, true> : fwd_sm90_kernel<T, false>;
  DK_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  kernel<<<static_cast<unsigned>(blocks), C::THREADS, C::kSmem, stream>>>(p, scale_log2);
  return last_launch_status();
}

}  // namespace pa
}  // namespace diffkern
