// Pieces shared by the CPU forward and backward of shared-prefix attention: the tiles
// (work items) the OpenMP loops run over, element access, and the per-row online softmax
// over a block of keys. Everything computes in double whatever the storage type: the CPU
// kernel is the reference the CUDA kernels are tested against.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/online_lse.cuh"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace prefix_cpu {

// Clones of the tile functions for wider vector units, picked at load time (the build
// targets baseline x86-64). Floating-point contraction stays off (ISO C++ mode), so a
// clone changes speed, not the order of operations, on a given machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DK_PREFIX_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DK_PREFIX_CPU_CLONES
#endif

constexpr int64_t kQueryTile = 32;  // query rows that share one pass over a key block
constexpr int64_t kKeyTile = 64;    // keys loaded (as double) once per block

// Rows [begin, end) (offsets within the segment) of one segment.
struct Tile {
  int64_t segment;
  int64_t begin;
  int64_t end;
  int64_t work;  // for the heaviest-first order only
};

// Every segment cut into tiles of `tile` rows, heaviest first (ties in segment order, so
// the list is the same every run): with a dynamic schedule the long tiles (a suffix tile
// sees the whole prefix) start first instead of becoming the tail. The order only decides
// which thread computes a tile, never how: results do not depend on it.
template <class WorkOf>
std::vector<Tile> make_tiles(const PrefixSegments& s, int64_t tile, WorkOf&& work_of) {
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < s.count; ++i) {
    for (int64_t b = 0; b < s.length[i]; b += tile) {
      const int64_t e = std::min(b + tile, s.length[i]);
      tiles.push_back(Tile{i, b, e, work_of(i, b, e)});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.work > b.work; });
  return tiles;
}

template <class T>
inline const T* row_ptr(const AttentionTensor& a, int64_t token, int64_t head) {
  return static_cast<const T*>(a.data) + token * a.token_stride + head * a.head_stride;
}
template <class T>
inline T* row_out(const AttentionTensor& a, int64_t token, int64_t head) {
  return static_cast<T*>(a.data) + token * a.token_stride + head * a.head_stride;
}

// `n` consecutive tokens from `token` of one head, as double rows of length d.
template <class T>
inline void load_rows(const AttentionTensor& a, int64_t token, int64_t n, int64_t head, int d,
                      double* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* src = row_ptr<T>(a, token + r, head);
    for (int c = 0; c < d; ++c) dst[r * d + c] = static_cast<double>(src[c]);
  }
}

// Eight partial sums in a fixed pattern: the compiler vectorizes them (a single running
// sum is a chain of dependent adds it may not reorder), and the order, hence the bits,
// stays the same on every run and thread.
inline double dot(const double* a, const double* b, int d) {
  constexpr int kLanes = 8;
  double part[kLanes] = {};
  int c = 0;
  for (; c + kLanes <= d; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[c + l] * b[c + l];
  double s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; c < d; ++c) s += a[c] * b[c];
  return s;
}

// The keys a query row reads, as (first token, count) ranges: its group's prefix, then its
// own segment up to and including itself.
struct KeyRanges {
  int64_t start[2];
  int64_t count[2];
};
inline KeyRanges key_ranges(const PrefixSegments& s, int64_t seg, int64_t last_offset) {
  return KeyRanges{{s.prefix_start[seg], s.q_start[seg]}, {s.prefix_length[seg], last_offset + 1}};
}

// One query row's softmax state while it streams over key blocks: the shared online
// log-sum-exp (running max and scaled sum) plus the weighted sum of values, rescaled
// together whenever the maximum moves.
struct RowSoftmax {
  OnlineLogSumExp lse;

  // Adds keys with scaled scores x[0..n) and values v (n rows of length d) to acc.
  void add_block(const double* x, int64_t n, const double* v, int d, double* acc) {
    double bm = -INFINITY;
    for (int64_t j = 0; j < n; ++j) bm = x[j] > bm ? x[j] : bm;
    if (bm == -INFINITY) return;
    const double nm = bm > lse.mx ? bm : lse.mx;
    const double alpha = std::exp(lse.mx - nm);  // 0 on the first block (mx = -inf)
    if (alpha != 1.0)
      for (int c = 0; c < d; ++c) acc[c] *= alpha;
    double ps = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double p = std::exp(x[j] - nm);
      ps += p;
      for (int c = 0; c < d; ++c) acc[c] += p * v[j * d + c];
    }
    lse.merge(nm, ps);  // nm >= lse.mx: the same rescaling as acc's
  }
};

}  // namespace prefix_cpu
}  // namespace diffkern
