// CPU forward of shared-prefix attention: OpenMP over (query head, query tile); each tile
// streams over its key blocks (the group's prefix, then its own segment causally) with an
// online softmax in double. Every output row is computed by one thread in a fixed order,
// so results are bit-identical whatever the thread count.
#include <cmath>
#include <new>
#include <vector>

#include "common/threads.h"
#include "prefix_attention/cpu_tiles.h"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace {

using namespace prefix_cpu;

template <class T>
DK_PREFIX_CPU_CLONES void forward_tile(const PrefixAttentionForward& p, const Tile& t, int head, double* q,
                  double* k, double* v, double* x, double* acc, RowSoftmax* rows) {
  const PrefixSegments& s = p.segments;
  const int d = p.shape.head_dim;
  const int kv_head = head / (p.shape.num_heads_q / p.shape.num_heads_kv);
  const int64_t q0 = s.q_start[t.segment] + t.begin, n = t.end - t.begin;
  const double scale = p.shape.scale;
  load_rows<T>(p.q, q0, n, head, d, q);
  std::fill(acc, acc + n * d, 0.0);
  for (int64_t r = 0; r < n; ++r) rows[r] = RowSoftmax{};
  const KeyRanges ranges = key_ranges(s, t.segment, t.end - 1);
  for (int part = 0; part < 2; ++part) {
    for (int64_t kb = 0; kb < ranges.count[part]; kb += kKeyTile) {
      const int64_t nk = std::min(kKeyTile, ranges.count[part] - kb);
      load_rows<T>(p.k, ranges.start[part] + kb, nk, kv_head, d, k);
      load_rows<T>(p.v, ranges.start[part] + kb, nk, kv_head, d, v);
      for (int64_t r = 0; r < n; ++r) {
        // Causal within the segment: row offset begin + r sees keys at offsets <= it.
        const int64_t visible = part == 0 ? nk : std::min(nk, t.begin + r - kb + 1);
        if (visible <= 0) continue;
        for (int64_t j = 0; j < visible; ++j) x[j] = scale * dot(q + r * d, k + j * d, d);
        rows[r].add_block(x, visible, v, d, acc + r * d);
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const double inv = 1.0 / rows[r].lse.sum;
    T* o = row_out<T>(p.out, q0 + r, head);
    for (int c = 0; c < d; ++c) o[c] = static_cast<T>(acc[r * d + c] * inv);
    p.lse[head * p.shape.total_tokens + q0 + r] = static_cast<float>(rows[r].lse.value());
  }
}

template <class T>
Status forward(const PrefixAttentionForward& p, int num_threads) {
  const int d = p.shape.head_dim, heads = p.shape.num_heads_q;
  std::vector<Tile> tiles;
  std::vector<double> scratch;
  std::vector<RowSoftmax> rows;
  const int threads = resolve_num_threads(num_threads);
  // Per thread: q tile, k block, v block, scores, accumulators.
  const int64_t per_thread = kQueryTile * d + 2 * kKeyTile * d + kKeyTile + kQueryTile * d;
  try {
    tiles = make_tiles(p.segments, kQueryTile, [&](int64_t seg, int64_t b, int64_t e) {
      return (e - b) * (p.segments.prefix_length[seg] + e);
    });
    scratch.resize(static_cast<size_t>(threads * per_thread));
    rows.resize(static_cast<size_t>(threads * kQueryTile));
  } catch (const std::bad_alloc&) {
    return Status::invalid_argument;  // host memory for the tile list: nothing sensible to do
  }
  const int64_t work = static_cast<int64_t>(tiles.size()) * heads;
#pragma omp parallel num_threads(threads)
  {
#if defined(_OPENMP)
    const int me = omp_get_thread_num();
#else
    const int me = 0;
#endif
    double* q = scratch.data() + me * per_thread;
    double* k = q + kQueryTile * d;
    double* v = k + kKeyTile * d;
    double* x = v + kKeyTile * d;
    double* acc = x + kKeyTile;
    RowSoftmax* r = rows.data() + me * kQueryTile;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w)
      forward_tile<T>(p, tiles[w / heads], static_cast<int>(w % heads), q, k, v, x, acc, r);
  }
  return Status::ok;
}

}  // namespace

Status prefix_attention_forward_cpu(const PrefixAttentionForward& p, int num_threads) {
  if (p.shape.head_dim <= 0 || p.shape.num_heads_kv <= 0 ||
      p.shape.num_heads_q % p.shape.num_heads_kv != 0)
    return Status::invalid_argument;
  if (p.shape.total_tokens == 0 || p.shape.num_heads_q == 0) return Status::ok;
  return dispatch_float(p.shape.dtype, [&](auto tag) {
    return forward<decltype(tag)>(p, num_threads);
  });
}

}  // namespace diffkern
