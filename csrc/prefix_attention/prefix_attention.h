// Shared-prefix attention, core entry points (no Python, no torch). The contract between
// the CPU kernel, the CUDA kernels and the bindings; kernels read only what is here.
//
// Packed layout: tokens along dim 0, group after group, [prefix, suffix_1, ..., suffix_G].
// The attention is described by *segments*, one per prefix and one per suffix. A query at
// offset i of segment s attends to
//   keys [prefix_start[s], prefix_start[s] + prefix_length[s])   (its group's whole prefix;
//                                                                   empty for a prefix segment)
//   and keys [q_start[s], q_start[s] + i]                          (causal within itself).
// So a prefix segment is plain causal attention over the prefix, and a suffix segment is
// causal attention over [prefix, suffix] without the prefix being copied. Groups list the
// segments that read a prefix, which the backward needs to accumulate a prefix's dK/dV over
// all G members.
//
// Every index array is int64, in the memory of the device that runs the kernel (host memory
// for the CPU entry points), built once by the Python PrefixLayout (the only host work). The
// core trusts the contents: segments do not overlap, lie inside [0, total_tokens), and a
// segment's prefix range is its group's prefix segment.
//
// Tensors: q (T, Hq, D), k and v (T, Hkv, D), out (T, Hq, D): element strides for the
// token and head dims, the head dim contiguous. Hq is a multiple of Hkv; query head h reads
// KV head h / (Hq / Hkv). CUDA kernels copy 16-byte vectors: every tensor's data pointer
// 16-byte aligned and its token and head strides multiples of 8 elements, or the CUDA entry
// points return Status::invalid_argument. lse is float32 (Hq, T) contiguous: log-sum-exp of the scaled
// scores of each query row (natural log), -inf for a row that sees no key (never happens
// in a valid layout: every query sees itself).
//
// Every entry point returns a Status, never allocates (workspaces come in the params),
// never synchronizes with the host; CUDA ones launch on `stream` on the current device and
// return Status::unsupported in builds without CUDA.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/status.h"

namespace diffkern {

struct PrefixSegments {
  const int64_t* q_start = nullptr;        // first token of the segment
  const int64_t* length = nullptr;         // its tokens (>= 0)
  const int64_t* prefix_start = nullptr;   // first token of the prefix it reads in full
  const int64_t* prefix_length = nullptr;  // 0 for a prefix segment
  int64_t count = 0;
  // Heaviest-first schedule for the CUDA kernels (unused by the CPU kernel): segment
  // indices in decreasing order of work (prefix_length + length), and, for that order,
  // the exclusive prefix sum of the number of query tiles of each block size. Lets a
  // kernel map blockIdx to (segment, tile) on the device without a host round trip; the
  // grid is sized from shapes alone (ceil(T / tile) + count is an upper bound).
  const int64_t* order = nullptr;
  const int64_t* order_tiles_64 = nullptr;   // count + 1 entries
  const int64_t* order_tiles_128 = nullptr;  // count + 1 entries
};

struct PrefixGroups {
  const int64_t* prefix_segment = nullptr;  // index of the group's prefix segment
  const int64_t* first_suffix = nullptr;    // index of its first suffix segment
  const int64_t* num_suffixes = nullptr;    // G of the group (suffix segments are consecutive)
  // Groups are listed in increasing prefix_segment order (the CUDA backward finds the
  // group of a prefix segment by binary search on it).
  int64_t count = 0;
};

struct AttentionTensor {
  void* data = nullptr;
  int64_t token_stride = 0;  // elements
  int64_t head_stride = 0;   // elements
};

struct PrefixAttentionShape {
  int64_t total_tokens = 0;  // T
  int num_heads_q = 0;
  int num_heads_kv = 0;
  int head_dim = 0;
  // Multiplies q.k before the softmax. double so that float64 data keeps 1/sqrt(D) exact
  // (a float scale alone is a 3e-8 relative error); 16-bit kernels read it as float.
  double scale = 0.0;
  DType dtype = DType::float32;  // of q, k, v, out, dout, dq, dk, dv alike
};

struct PrefixAttentionForward {
  PrefixAttentionShape shape;
  PrefixSegments segments;
  PrefixGroups groups;
  AttentionTensor q, k, v, out;
  float* lse = nullptr;  // (Hq, T) float32
};

struct PrefixAttentionBackward {
  PrefixAttentionShape shape;
  PrefixSegments segments;
  PrefixGroups groups;
  AttentionTensor q, k, v, out, dout;
  // From the forward. The CPU backward recomputes each row's log-sum-exp in double
  // instead (float32 lse would cost float64 gradients their last 9 digits) and may
  // ignore it.
  const float* lse = nullptr;
  AttentionTensor dq, dk, dv;  // written in full (not accumulated into)
  // Workspace sized by prefix_attention_backward_workspace_bytes (CUDA: device memory,
  // 16-byte aligned; may be null when that returns 0).
  void* workspace = nullptr;
  // Its size in bytes, or -1: "as prefix_attention_backward_workspace_bytes returns on the
  // launching device". Known, it lets the CUDA backward fall back to fewer split chunks
  // when the workspace was sized on a device with another SM count (pa_bwd_split.h).
  int64_t workspace_bytes = -1;
  bool deterministic = false;  // same bits every run (no floating-point atomics)
};

Status prefix_attention_forward_cpu(const PrefixAttentionForward& p, int num_threads);
Status prefix_attention_backward_cpu(const PrefixAttentionBackward& p, int num_threads);

Status prefix_attention_forward_cuda(const PrefixAttentionForward& p, void* stream);
Status prefix_attention_backward_cuda(const PrefixAttentionBackward& p, void* stream);
// Bytes of device workspace the CUDA backward needs for this shape (depends on shapes and
// counts only, never on lengths' values, so it is known without a host round trip; and on
// the current device's SM count, through the split rule of pa_bwd_split.h).
int64_t prefix_attention_backward_workspace_bytes(const PrefixAttentionShape& shape,
                                                  int64_t num_segments, int64_t num_groups,
                                                  bool deterministic);

}  // namespace diffkern
