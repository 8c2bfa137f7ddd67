// CPU backward of shared-prefix attention, two OpenMP passes, no atomics:
//  1. over (query head, query tile): each row's log-sum-exp (recomputed in double: the
//     forward's float32 lse would cost float64 gradients most of their digits),
//     D_i = dO_i . O_i, and dQ_i = scale * sum_j P_ij (dO_i . V_j - D_i) K_j;
//  2. over (KV head, key tile): dK_j and dV_j summed over every query row that reads key j:
//     the query heads sharing the KV head, and the rows of the key's own segment at or
//     after it, plus, for a prefix key, every row of the group's G suffix segments.
// Each output element is summed by one thread in a fixed order: the same bits every run
// and for every thread count (the deterministic flag costs nothing here).
#include <cmath>
#include <new>
#include <vector>

#include "common/threads.h"
#include "prefix_attention/cpu_tiles.h"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace {

using namespace prefix_cpu;

int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Row statistics of pass 1, read by pass 2: (Hq, T) each.
struct RowStats {
  std::vector<double> lse, delta;
};

template <class T>
DK_PREFIX_CPU_CLONES void dq_tile(const PrefixAttentionBackward& p, const Tile& t, int head, double* buf,
             RowStats& st) {
  const PrefixSegments& s = p.segments;
  const int d = p.shape.head_dim;
  const int kv_head = head / (p.shape.num_heads_q / p.shape.num_heads_kv);
  const int64_t q0 = s.q_start[t.segment] + t.begin, n = t.end - t.begin;
  const int64_t T_ = p.shape.total_tokens;
  const double scale = p.shape.scale;
  double* q = buf;
  double* dout = q + kQueryTile * d;
  double* k = dout + kQueryTile * d;
  double* v = k + kKeyTile * d;
  double* dq = v + kKeyTile * d;
  double* o = dq + kQueryTile * d;  // out rows, then reused for nothing else
  load_rows<T>(p.q, q0, n, head, d, q);
  load_rows<T>(p.dout, q0, n, head, d, dout);
  load_rows<T>(p.out, q0, n, head, d, o);
  std::fill(dq, dq + n * d, 0.0);
  double lse[kQueryTile], delta[kQueryTile];
  OnlineLogSumExp acc[kQueryTile];
  for (int64_t r = 0; r < n; ++r) delta[r] = dot(dout + r * d, o + r * d, d);
  const KeyRanges ranges = key_ranges(s, t.segment, t.end - 1);
  // Two sweeps over the same key blocks: the log-sum-exp first, then dQ with exact P.
  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int part = 0; part < 2; ++part) {
      for (int64_t kb = 0; kb < ranges.count[part]; kb += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, ranges.count[part] - kb);
        load_rows<T>(p.k, ranges.start[part] + kb, nk, kv_head, d, k);
        if (sweep == 1) load_rows<T>(p.v, ranges.start[part] + kb, nk, kv_head, d, v);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t visible = part == 0 ? nk : std::min(nk, t.begin + r - kb + 1);
          for (int64_t j = 0; j < visible; ++j) {
            const double x = scale * dot(q + r * d, k + j * d, d);
            if (sweep == 0) {
              acc[r].add(x);
              continue;
            }
            const double pr = std::exp(x - lse[r]);
            const double ds = pr * (dot(dout + r * d, v + j * d, d) - delta[r]);
            for (int c = 0; c < d; ++c) dq[r * d + c] += ds * k[j * d + c];
          }
        }
      }
    }
    if (sweep == 0)
      for (int64_t r = 0; r < n; ++r) lse[r] = acc[r].value();
  }
  for (int64_t r = 0; r < n; ++r) {
    T* out = row_out<T>(p.dq, q0 + r, head);
    for (int c = 0; c < d; ++c) out[c] = static_cast<T>(scale * dq[r * d + c]);
    st.lse[head * T_ + q0 + r] = lse[r];
    st.delta[head * T_ + q0 + r] = delta[r];
  }
}

// Adds to dk/dv (nk keys, double) the rows [r0, r1) of segment `seg` for query `head`;
// `first_key_offset`: the keys' offset within `seg` when they are its own (causal), or -1
// when they are its prefix (all visible).
template <class T>
DK_PREFIX_CPU_CLONES void dkv_rows(const PrefixAttentionBackward& p, int head, int64_t seg, int64_t r0, int64_t r1,
              int64_t first_key_offset, const double* k, const double* v, int64_t nk,
              double* q, double* dout, const RowStats& st, double* dk, double* dv) {
  const int d = p.shape.head_dim;
  const int64_t T_ = p.shape.total_tokens;
  const double scale = p.shape.scale;
  const int64_t start = p.segments.q_start[seg];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t token = start + r;
    load_rows<T>(p.q, token, 1, head, d, q);
    load_rows<T>(p.dout, token, 1, head, d, dout);
    const double lse = st.lse[head * T_ + token], delta = st.delta[head * T_ + token];
    const int64_t visible = first_key_offset < 0 ? nk : std::min(nk, r - first_key_offset + 1);
    for (int64_t j = 0; j < visible; ++j) {
      const double pr = std::exp(scale * dot(q, k + j * d, d) - lse);
      const double ds = pr * (dot(dout, v + j * d, d) - delta);
      for (int c = 0; c < d; ++c) {
        dv[j * d + c] += pr * dout[c];
        dk[j * d + c] += ds * q[c];
      }
    }
  }
}

template <class T>
void dkv_tile(const PrefixAttentionBackward& p, const Tile& t, int kv_head,
              const std::vector<int64_t>& group_of, double* buf, const RowStats& st) {
  const PrefixSegments& s = p.segments;
  const int d = p.shape.head_dim;
  const int ratio = p.shape.num_heads_q / p.shape.num_heads_kv;
  const int64_t k0 = s.q_start[t.segment] + t.begin, nk = t.end - t.begin;
  double* k = buf;
  double* v = k + kKeyTile * d;
  double* dk = v + kKeyTile * d;
  double* dv = dk + kKeyTile * d;
  double* q = dv + kKeyTile * d;
  double* dout = q + d;
  load_rows<T>(p.k, k0, nk, kv_head, d, k);
  load_rows<T>(p.v, k0, nk, kv_head, d, v);
  std::fill(dk, dk + 2 * kKeyTile * d, 0.0);  // dk and dv
  const int64_t g = group_of[t.segment];
  for (int h = kv_head * ratio; h < (kv_head + 1) * ratio; ++h) {
    // Its own segment's rows at or after the tile's first key (causal).
    dkv_rows<T>(p, h, t.segment, t.begin, s.length[t.segment], t.begin, k, v, nk, q, dout, st,
                dk, dv);
    if (g < 0) continue;
    const int64_t first = p.groups.first_suffix[g], last = first + p.groups.num_suffixes[g];
    for (int64_t seg = first; seg < last; ++seg)  // every suffix of the group reads it all
      dkv_rows<T>(p, h, seg, 0, s.length[seg], -1, k, v, nk, q, dout, st, dk, dv);
  }
  for (int64_t j = 0; j < nk; ++j) {
    T* ok = row_out<T>(p.dk, k0 + j, kv_head);
    T* ov = row_out<T>(p.dv, k0 + j, kv_head);
    for (int c = 0; c < d; ++c) {
      ok[c] = static_cast<T>(p.shape.scale * dk[j * d + c]);
      ov[c] = static_cast<T>(dv[j * d + c]);
    }
  }
}

template <class T>
Status backward(const PrefixAttentionBackward& p, int num_threads) {
  const PrefixSegments& s = p.segments;
  const int d = p.shape.head_dim, hq = p.shape.num_heads_q, hkv = p.shape.num_heads_kv;
  const int threads = resolve_num_threads(num_threads);
  // Per thread: pass 1's q, dO, O, dQ tiles and K, V blocks; pass 2's K, V, dK, dV blocks
  // and one q and dO row.
  const int64_t per_thread = std::max(4 * kQueryTile * d + 2 * kKeyTile * d,
                                      4 * kKeyTile * d + 2 * d);
  std::vector<Tile> q_tiles, k_tiles;
  std::vector<double> scratch;
  std::vector<int64_t> group_of;  // segment -> group whose prefix it is, else -1
  RowStats st;
  try {
    const size_t rows = static_cast<size_t>(hq * p.shape.total_tokens);
    st.lse.resize(rows);
    st.delta.resize(rows);
    scratch.resize(static_cast<size_t>(threads * per_thread));
    group_of.assign(static_cast<size_t>(s.count), -1);
    for (int64_t g = 0; g < p.groups.count; ++g) group_of[p.groups.prefix_segment[g]] = g;
    q_tiles = make_tiles(s, kQueryTile, [&](int64_t seg, int64_t b, int64_t e) {
      return (e - b) * (s.prefix_length[seg] + e);
    });
    k_tiles = make_tiles(s, kKeyTile, [&](int64_t seg, int64_t b, int64_t e) {
      int64_t readers = s.length[seg] - b;
      const int64_t g = group_of[seg];
      if (g >= 0)
        for (int64_t i = 0; i < p.groups.num_suffixes[g]; ++i)
          readers += s.length[p.groups.first_suffix[g] + i];
      return (e - b) * readers;
    });
  } catch (const std::bad_alloc&) {
    return Status::invalid_argument;  // host memory for the row statistics
  }
  const int64_t q_work = static_cast<int64_t>(q_tiles.size()) * hq;
  const int64_t k_work = static_cast<int64_t>(k_tiles.size()) * hkv;
#pragma omp parallel num_threads(threads)
  {
    double* buf = scratch.data() + thread_index() * per_thread;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < q_work; ++w)
      dq_tile<T>(p, q_tiles[w / hq], static_cast<int>(w % hq), buf, st);
    // (the implicit barrier: pass 2 reads every row's statistics)
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < k_work; ++w)
      dkv_tile<T>(p, k_tiles[w / hkv], static_cast<int>(w % hkv), group_of, buf, st);
  }
  return Status::ok;
}

}  // namespace

Status prefix_attention_backward_cpu(const PrefixAttentionBackward& p, int num_threads) {
  if (p.shape.head_dim <= 0 || p.shape.num_heads_kv <= 0 ||
      p.shape.num_heads_q % p.shape.num_heads_kv != 0)
    return Status::invalid_argument;
  if (p.shape.total_tokens == 0 || p.shape.num_heads_q == 0) return Status::ok;
  return dispatch_float(p.shape.dtype, [&](auto tag) {
    return backward<decltype(tag)>(p, num_threads);
  });
}

}  // namespace diffkern
