// How many chunks the backward splits each prefix key tile's query walk into (host side,
// plain arithmetic; pa_bwd.cuh describes the split itself).
//
// The rule, from shapes only (lengths live on the device; reading them would cost a host
// round trip). Work is counted in (key tile, query tile) pairs, which is what a block of
// bwd_kv_kernel walks; the R query heads per KV head multiply every block alike and cancel.
// Model a group as the GRPO shapes are, its prefix as long as its G suffixes
// together (P = G S; (4096, 512, 8), (8192, 512, 16), (4096, 1024, 4) all are), x key tiles
// per group. Pairs per group: prefix causal x^2/8, suffixes x prefix x^2/4, suffixes causal
// x^2/(8G): x^2 (3G + 1) / (8G), so the average key tile walks x (3G + 1) / (8G). The
// heaviest block, a prefix's first key tile, walks its prefix (x/2) and every suffix (x/2);
// split in C chunks, chunk 0 keeps the prefix and G/C suffixes: x (1 + 1/C) / 2.
// With B key-tile blocks (ceil(T / BN) x Hkv, BN keys per block) and `resident` blocks
// of that kernel running at once (SMs x blocks per SM, from the device at launch), the
// pass lasts at least max(heaviest, B x average / resident). Heaviest-first order hides
// the heavy block only while it is not the larger term, i.e. while 1 + 1/C <= q with
//   q = B (3G + 1) / (4 G resident).
// C = 1 when q >= 2; else the smallest C with 1/C <= q - 1; C = 4 when q <= 1 (chunk 0
// keeps the prefix part, so more chunks stop paying: at most a 2x shorter long pole).
// C never exceeds G (the mean suffixes per group): a chunk needs a suffix to take.
// At the shapes on an H200 (Hkv = 32 or 8) q >= 3: no split; it starts with few KV
// heads (T = 8192, G = 8, hd128: Hkv <= 5) or on GPUs with more SMs per key tile. (BN and
// blocks per SM cancel in q when the warps per SM stay the same: 128 keys, 1 block per SM
// gives the q of 64 keys, 2 blocks per SM.)
//
// DK_PA_BWD_CHUNKS=1..4 in the environment overrides the rule (tests and benchmarks force
// the split with it; not a user setting). Read at every call, by both the workspace sizing
// and the launcher, so they agree.
#pragma once
#include <cstdint>
#include <cstdlib>

#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace pa {

constexpr int kMaxBwdChunks = 4;

// The forced chunk count, or 0 when DK_PA_BWD_CHUNKS is unset or not in 1..4.
inline int forced_bwd_chunks() {
  const char* e = std::getenv("DK_PA_BWD_CHUNKS");
  if (e == nullptr || e[0] < '1' || e[0] > '0' + kMaxBwdChunks || e[1] != '\0') return 0;
  return e[0] - '0';
}

// `resident`: blocks of bwd_kv_kernel that run at once on the device (<= 0: unknown);
// `key_tile`: its keys per block (bwd_kv_key_tile).
inline int bwd_prefix_chunks(const PrefixAttentionShape& s, int64_t num_segments,
                             int64_t num_groups, int64_t resident, int key_tile) {
  if (const int f = forced_bwd_chunks(); f > 0) return f;
  if (num_groups <= 0 || resident <= 0 || s.total_tokens <= 0) return 1;
  const int64_t g = (num_segments - num_groups) / num_groups;  // mean suffixes per group
  if (g < 2) return 1;
  const int64_t blocks = (s.total_tokens + key_tile - 1) / key_tile * s.num_heads_kv;
  const int64_t num = blocks * (3 * g + 1), den = 4 * g * resident;  // q = num / den
  int64_t c;
  if (num >= 2 * den) c = 1;
  else if (num <= den) c = kMaxBwdChunks;
  else c = (den + (num - den) - 1) / (num - den);  // ceil(1 / (q - 1))
  if (c > kMaxBwdChunks) c = kMaxBwdChunks;
  if (c > g) c = g;
  return static_cast<int>(c < 1 ? 1 : c);
}

// Float32 partial dK and dV of every chunk: 2 C x (T, Hkv, D), indexed by token like dk, so
// the offsets need no map from prefix tokens (only prefix rows are written and read).
inline int64_t bwd_partials_bytes(const PrefixAttentionShape& s, int chunks) {
  if (chunks <= 1) return 0;
  const int64_t n = 2 * static_cast<int64_t>(chunks) * s.total_tokens * s.num_heads_kv * s.head_dim;
  return (n * 4 + 255) / 256 * 256;
}

}  // namespace pa
}  // namespace diffkern
