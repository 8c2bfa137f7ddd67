// Forward kernel (FlashAttention-2 tiling on mma.sync): one block = one query tile of
// BM = 128 rows of one query head (warps and rows per warp: FwdConfig); K/V tiles of
// BN keys stream through shared memory with cp.async, two stages (tile j + 1 loads while tile j is multiplied). The softmax is online in fp32
// and in the log2 domain (scores pre-multiplied by scale * log2 e, exp2): each thread
// keeps the running maximum and sum of its two rows (OnlineLogSumExp's add/merge, with
// the merge across the 4 lanes of a row done once at the end).
#pragma once
#include "common/cuda_check.cuh"
#include "common/launch.h"
#include "prefix_attention/pa_device.cuh"
#include "prefix_attention/pa_kernels.h"

namespace diffkern {
namespace pa {

// MT = 16-row m-tiles per warp. MT = 1: 8 warps, Q fragments held in registers. MT = 2:
// 4 warps of 32 rows, Q re-read from shared memory each key tile, but every K/V fragment
// loaded from shared memory feeds 4 mma instead of 2 (shared-memory bandwidth, not the
// tensor cores, bounds the MT = 1 loop on Hopper).
#ifndef DK_PA_FWD_MT
#define DK_PA_FWD_MT 2
#endif
#ifndef DK_PA_FWD_BN
#define DK_PA_FWD_BN 64
#endif
template <int D, int MT = DK_PA_FWD_MT>
struct FwdConfig {
  static constexpr int BM = 128, BN = DK_PA_FWD_BN, WARPS = 8 / MT, THREADS = WARPS * 32;
  static constexpr int kTileQ = BM * D * 2, kTileKV = BN * D * 2;
  static constexpr int kSmem = kTileQ + 4 * kTileKV;  // Q, then K0 V0 K1 V1
  static constexpr int kMinBlocks = MT == 1 ? 1 : 2;
};

// The forward's key-tile list: the same tiles as KeyTiles, but everything the key loop
// needs per tile is a 32-bit count relative to the segment, and only the two 64-bit
// token bases stay live (KeyTiles keeps four int64 fields plus q0 across the loop, and
// the hd128 forward, with 128 output accumulators and 64 scores live, spilled them).
// Tile j starts at token base(j) + j * BN; it holds BN keys except the last prefix tile
// and the last own tile. Own tile j holds key offsets [(j - num_prefix) BN, ...) of the
// segment, query row r of the tile is offset q0 + r = (diag - num_prefix) BN + r, so the
// causal test koff + col > q0 + row is col > row - (j - diag) BN: 32-bit and exact.
template <int BN>
struct FwdKeyTiles {
  int64_t prefix_base, own_base;
  int num_prefix, count, prefix_last_valid, own_last_valid, diag;

  __device__ __forceinline__ FwdKeyTiles(const PrefixSegments& s, int64_t seg, int64_t q0,
                                         int bm) {
    const int64_t prefix_length = s.prefix_length[seg], length = s.length[seg];
    num_prefix = static_cast<int>((prefix_length + BN - 1) / BN);
    const int64_t last = q0 + bm < length ? q0 + bm : length;
    const int own = static_cast<int>((last + BN - 1) / BN);  // >= 1: a row sees itself
    count = num_prefix + own;
    prefix_base = s.prefix_start[seg];
    own_base = s.q_start[seg] - static_cast<int64_t>(num_prefix) * BN;
    const int64_t pleft = prefix_length - static_cast<int64_t>(num_prefix - 1) * BN;
    prefix_last_valid = static_cast<int>(pleft < BN ? pleft : BN);
    const int64_t oleft = length - static_cast<int64_t>(own - 1) * BN;
    own_last_valid = static_cast<int>(oleft < BN ? oleft : BN);
    diag = num_prefix + static_cast<int>(q0 / BN);  // q0 is a multiple of BM >= BN
  }
  __device__ __forceinline__ int64_t start(int j) const {
    return (j < num_prefix ? prefix_base : own_base) + static_cast<int64_t>(j) * BN;
  }
  __device__ __forceinline__ int valid(int j) const {
    return j == num_prefix - 1 ? prefix_last_valid : j == count - 1 ? own_last_valid : BN;
  }
};

// The query tile a forward block works on: block -> query head h (and its KV head hk) and,
// heaviest first, the tile of BM rows at offset q0 of segment seg (q_valid rows, from
// token q_tok0). Shared by fwd_kernel and the Hopper forward (pa_fwd_sm90.cuh).
struct FwdQueryTile {
  int64_t seg, q0, q_tok0;
  int h, hk, q_valid;
};
// False for a surplus block (the grid is sized from shapes alone).
template <int BM>
__device__ __forceinline__ bool fwd_query_tile(const PrefixAttentionForward& p, FwdQueryTile& t) {
  const int hq = p.shape.num_heads_q;
  const int64_t bid = blockIdx.x;
  t.h = static_cast<int>(bid % hq);
  const TileRef tr = find_tile(p.segments, p.segments.order_tiles_128, bid / hq);
  if (tr.seg < 0) return false;
  t.seg = tr.seg;
  const int64_t len = p.segments.length[t.seg];
  // Later tiles of a segment see more keys (causal): run them first.
  t.q0 = ((len + BM - 1) / BM - 1 - tr.tile) * BM;
  t.q_valid = static_cast<int>(len - t.q0 < BM ? len - t.q0 : BM);
  t.hk = t.h / (hq / p.shape.num_heads_kv);
  t.q_tok0 = p.segments.q_start[t.seg] + t.q0;
  return true;
}

template <class T, int D>
__global__ void __launch_bounds__(FwdConfig<D>::THREADS, FwdConfig<D>::kMinBlocks)
    fwd_kernel(const PrefixAttentionForward p, float scale_log2) {
  using C = FwdConfig<D>;
  constexpr int MT = DK_PA_FWD_MT;
  constexpr int BM = C::BM, BN = C::BN, NT = BN / 8, DT = D / 8;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sKV = sQ + C::kTileQ;

  FwdQueryTile qt;
  if (!fwd_query_tile<BM>(p, qt)) return;
  const int h = qt.h, hk = qt.hk, q_valid = qt.q_valid;
  const int64_t q_tok0 = qt.q_tok0;
  const FwdKeyTiles<BN> keys(p.segments, qt.seg, qt.q0, BM);

  const uint16_t* qb = static_cast<const uint16_t*>(p.q.data) + h * p.q.head_stride;
  const uint16_t* kb = static_cast<const uint16_t*>(p.k.data) + hk * p.k.head_stride;
  const uint16_t* vb = static_cast<const uint16_t*>(p.v.data) + hk * p.v.head_stride;

  auto issue_kv = [&](int j) {
    const int64_t start = keys.start(j);
    const int valid = keys.valid(j);
    const uint32_t stage = sKV + static_cast<uint32_t>(j & 1) * 2 * C::kTileKV;
    load_tile<D, C::THREADS>(stage, kb, start, p.k.token_stride, BN, valid);
    load_tile<D, C::THREADS>(stage + C::kTileKV, vb, start, p.v.token_stride, BN, valid);
  };

  load_tile<D, C::THREADS>(sQ, qb, q_tok0, p.q.token_stride, BM, q_valid);
  issue_kv(0);  // count >= 1: every row sees itself
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = warp * 16 * MT;  // this warp's rows in the tile

  uint32_t qf[MT == 1 ? D / 16 : 1][4];
  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  for (int j = 0; j < keys.count; ++j) {
    if (j + 1 < keys.count) {
      issue_kv(j + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (MT == 1) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldsm_x4(qf[kk], sQ + swz<D>(row0 + lane % 16, kk * 2 + lane / 16));
      }
    }
    const uint32_t sK = sKV + static_cast<uint32_t>(j & 1) * 2 * C::kTileKV;
    const uint32_t sV = sK + C::kTileKV;

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (MT == 1) {
          a[0][0] = qf[kk][0]; a[0][1] = qf[kk][1]; a[0][2] = qf[kk][2]; a[0][3] = qf[kk][3];
        } else {
          ldsm_x4(a[mt], sQ + swz<D>(row0 + mt * 16 + lane % 16, kk * 2 + lane / 16));
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm_x4(b, sK + swz<D>(np * 16 + (lane / 16) * 8 + lane % 8, kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * np], a[mt], b);
          mma16816<T>(s[mt][2 * np + 1], a[mt], b + 2);
        }
      }
    }

    // Masking (see FwdKeyTiles): key column col of row `row` is out when col > lim, with
    // lim = kvalid - 1, lowered to row - jrel BN on and after the diagonal tile (jrel >= 0;
    // before it every key precedes every row of the tile).
    const int kvalid = keys.valid(j);
    const int jrel = j - keys.diag;
    const bool need_mask = kvalid < BN || (jrel >= 0 && jrel * BN + BN - 1 > row0);
    float alpha[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {m_run[mt][0], m_run[mt][1]};
      // Per row, the last kept column less this lane's 2t: the element test is then a
      // compare against a constant (col = nt 8 + 2t + (e & 1)).
      int lim[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        lim[r] = kvalid - 1;
        if (jrel >= 0) lim[r] = min(lim[r], row0 + mt * 16 + g + r * 8 - jrel * BN);
        lim[r] -= 2 * t;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][nt][e] * scale_log2;
          if (need_mask && nt * 8 + (e & 1) > lim[e >> 1]) x = -INFINITY;
          s[mt][nt][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
      float base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = quad_max(mx[r]);
        // A row with no key yet keeps m = -inf: use 0 so exp2 gives 0, not NaN.
        base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
        alpha[mt][r] = exp2_fast(m_run[mt][r] - base[r]);
        m_run[mt][r] = mx[r];
        l_run[mt][r] *= alpha[mt][r];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2_fast(s[mt][nt][e] - base[e >> 1]);
          s[mt][nt][e] = pe;
          l_run[mt][e >> 1] += pe;
        }
      }
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[mt][i][0] *= alpha[mt][0]; o[mt][i][1] *= alpha[mt][0];
        o[mt][i][2] *= alpha[mt][1]; o[mt][i][3] *= alpha[mt][1];
      }
    }
    // V fragment addresses: one base per kk; the dp-th chunk pair is base ^ (dp << 5)
    // (swz's XOR touches address bits 4..7 only; every tile base is 1024-aligned).
    // The empty asm makes the base opaque so the compiler recomputes the 8 addresses
    // instead of holding 8 loop-invariant registers across the key loop.
    uint32_t v_row = sV + swz<D>(((lane / 8) % 2) * 8 + lane % 8, lane / 16);
    asm volatile("" : "+r"(v_row));
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t v_base = v_row + kk * 16 * D * 2;
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, v_base ^ static_cast<uint32_t>(dp << 5));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(o[mt][2 * dp], a[mt], b);
          mma16816<T>(o[mt][2 * dp + 1], a[mt], b + 2);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Normalize, write LSE (natural log), stage the warp's rows in its own part of sQ (only
  // this warp read them) and store 16-byte vectors.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_run[mt][r]);
      inv[r] = 1.f / l;
      const int row = row0 + mt * 16 + g + r * 8;
      if (t == 0 && row < q_valid)
        p.lse[h * p.shape.total_tokens + q_tok0 + row] = (m_run[mt][r] + log2f(l)) * kLn2;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + mt * 16 + g + r * 8;
        *reinterpret_cast<uint32_t*>(smem + swz<D>(row, dt) + 4 * t) =
            pack2<T>(o[mt][dt][2 * r] * inv[r], o[mt][dt][2 * r + 1] * inv[r]);
      }
    }
  }
  __syncwarp();
  store_tile<D>(smem, static_cast<uint16_t*>(p.out.data) + h * p.out.head_stride, q_tok0,
                p.out.token_stride, row0, 16 * MT, q_valid, lane, 32);
}

template <class T, int D>
Status launch_fwd(const PrefixAttentionForward& p, cudaStream_t stream) {
  if constexpr (D == 128) {
    if (fwd_on_sm90(p.shape)) return launch_fwd_sm90<T>(p, stream);
  }
  using C = FwdConfig<D>;
  const int64_t slots = ceil_div(p.shape.total_tokens, C::BM) + p.segments.count;
  const int64_t blocks = slots * p.shape.num_heads_q;
  if (blocks > 2147483647) return Status::invalid_argument;
  const float scale_log2 = static_cast<float>(p.shape.scale * kLog2e);
  DK_CUDA_TRY(cudaFuncSetAttribute(fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   C::kSmem));
  fwd_kernel<T, D><<<static_cast<unsigned>(blocks), C::THREADS, C::kSmem, stream>>>(p, scale_log2);
  return last_launch_status();
}

}  // namespace pa
}  // namespace diffkern
