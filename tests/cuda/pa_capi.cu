// A C ABI over the prefix-attention CUDA entry points for the standalone GPU harness
// (prefix_attention_gpu.py loads it with ctypes), so the kernels can be checked on a GPU
// machine before the bindings exist. One int64 array carries every field:
//   [0] T  [1] Hq  [2] Hkv  [3] D  [4] dtype (2 float16, 3 bfloat16)  [5] segment count
//   [6..12] q_start, length, prefix_start, prefix_length, order, order_tiles_64, _128
//   [13] group count  [14..16] prefix_segment, first_suffix, num_suffixes
//   [17 + 3 i .. 19 + 3 i] data, token stride, head stride of q, k, v, out, dout, dq, dk, dv
//   [41] lse  [42] workspace  [43] deterministic  [44] stream  [45] workspace bytes (-1: unknown)
#include <cstdint>

#include "prefix_attention/prefix_attention.h"

using namespace diffkern;

namespace {
template <class P>
void fill_common(P& p, const int64_t* a, double scale) {
  p.shape.total_tokens = a[0];
  p.shape.num_heads_q = static_cast<int>(a[1]);
  p.shape.num_heads_kv = static_cast<int>(a[2]);
  p.shape.head_dim = static_cast<int>(a[3]);
  p.shape.dtype = static_cast<DType>(a[4]);
  p.shape.scale = static_cast<float>(scale);
  auto ptr = [&](int i) { return reinterpret_cast<const int64_t*>(a[i]); };
  p.segments = {ptr(6), ptr(7), ptr(8), ptr(9), a[5], ptr(10), ptr(11), ptr(12)};
  p.groups = {ptr(14), ptr(15), ptr(16), a[13]};
}
AttentionTensor tensor(const int64_t* a, int i) {
  return {reinterpret_cast<void*>(a[17 + 3 * i]), a[18 + 3 * i], a[19 + 3 * i]};
}
}  // namespace

extern "C" int pa_forward(const int64_t* a, double scale) {
  PrefixAttentionForward p;
  fill_common(p, a, scale);
  p.q = tensor(a, 0);
  p.k = tensor(a, 1);
  p.v = tensor(a, 2);
  p.out = tensor(a, 3);
  p.lse = reinterpret_cast<float*>(a[41]);
  const Status s = prefix_attention_forward_cuda(p, reinterpret_cast<void*>(a[44]));
  return static_cast<int>(s.code()) * 1000 + s.cuda_error();
}

extern "C" int pa_backward(const int64_t* a, double scale) {
  PrefixAttentionBackward p;
  fill_common(p, a, scale);
  p.q = tensor(a, 0);
  p.k = tensor(a, 1);
  p.v = tensor(a, 2);
  p.out = tensor(a, 3);
  p.dout = tensor(a, 4);
  p.dq = tensor(a, 5);
  p.dk = tensor(a, 6);
  p.dv = tensor(a, 7);
  p.lse = reinterpret_cast<const float*>(a[41]);
  p.workspace = reinterpret_cast<void*>(a[42]);
  p.workspace_bytes = a[45];
  p.deterministic = a[43] != 0;
  const Status s = prefix_attention_backward_cuda(p, reinterpret_cast<void*>(a[44]));
  return static_cast<int>(s.code()) * 1000 + s.cuda_error();
}

extern "C" int64_t pa_workspace_bytes(const int64_t* a, int deterministic) {
  PrefixAttentionShape s;
  s.total_tokens = a[0];
  s.num_heads_q = static_cast<int>(a[1]);
  s.num_heads_kv = static_cast<int>(a[2]);
  s.head_dim = static_cast<int>(a[3]);
  s.dtype = static_cast<DType>(a[4]);
  return prefix_attention_backward_workspace_bytes(s, a[5], a[13], deterministic != 0);
}
