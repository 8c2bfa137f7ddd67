// Bindings of shared-prefix attention (csrc/prefix_attention/prefix_attention.h): what memory
// safety needs on every array (dtypes, devices, shapes, strides: head dim contiguous,
// element strides as int64), the params struct, one core call. Python
// (diffkern/attention.py) checks what the user meant, allocates every output and the CUDA
// workspace with torch and passes the current stream. The layout's index arrays are built
// by diffkern.PrefixLayout; their contents are checked here on the CPU (cheap, no device
// round trip) and trusted on CUDA (reading them would synchronize with the host).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>

#include "bindings/array_arg.h"
#include "bindings/core_call.h"
#include "prefix_attention/prefix_attention.h"

namespace nb = nanobind;

namespace diffkern {
namespace bindings {
namespace {

[[noreturn]] void fail_value(const char* fn, const std::string& what) {
  throw nb::value_error((std::string(fn) + ": " + what).c_str());
}

// A (tokens, heads, head_dim) tensor of the attention's dtype and device; the head dim
// contiguous (unless it has one element), the other strides free.
AttentionTensor attention_tensor(const ArrayInfo& a, const ArrayInfo& ref, int64_t heads,
                                 int64_t head_dim, int64_t tokens, const char* fn) {
  const int64_t shape[3] = {tokens, heads, head_dim};
  require_shape(a, shape, 3, "(tokens, heads, head_dim)", fn);
  require_same_dtype(ref, a, fn);
  require_same_device(ref, a, fn);
  if (head_dim > 1 && a.strides[2] != 1 && a.numel() != 0)
    fail_value(fn, std::string(a.name) + ": expected a contiguous last (head) dimension, got strides " +
                       describe_shape(a.strides, 3) + " (elements)");
  // The CUDA kernels copy 16-byte vectors (prefix_attention.h): Python copies a tensor
  // that does not fit, so reaching this is a caller that skipped diffkern.prefix_attention.
  if (a.device_type == kDeviceCuda && a.numel() != 0 &&
      (reinterpret_cast<uintptr_t>(a.data) % 16 != 0 || a.strides[0] % 8 != 0 ||
       a.strides[1] % 8 != 0))
    fail_value(fn, std::string(a.name) + ": expected 16-byte aligned data and token/head strides "
                       "that are multiples of 8 elements on CUDA, got strides " +
                       describe_shape(a.strides, 3) + " (elements)");
  return AttentionTensor{a.data, a.strides[0], a.strides[1]};
}

void require_int64(const ArrayInfo& a, const ArrayInfo& ref, const int64_t* shape, int ndim,
                   const char* why, const char* fn) {
  if (a.dtype.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Int) || a.dtype.bits != 64 ||
      a.dtype.lanes != 1)
    throw nb::type_error((std::string(fn) + ": " + a.name + ": expected dtype int64, got " +
                          describe_dtype(a)).c_str());
  require_shape(a, shape, ndim, why, fn);
  require_same_device(ref, a, fn);
  require_c_contiguous(a, fn);
}

// The layout's two flat index arrays (diffkern/_prefix_layout.py): segment_index
// (7 S + 2,) = q_start, length, prefix_start, prefix_length, order (S each), order_tiles_64,
// order_tiles_128 (S + 1 each); group_index (3 NG,) = prefix_segment, first_suffix,
// num_suffixes (NG each). int64, C-contiguous, on the device of q.
struct Layout {
  PrefixSegments segments;
  PrefixGroups groups;
};

Layout layout_args(nb::handle seg_o, nb::handle groups_o, const ArrayInfo& q, int64_t tokens,
                   const char* fn) {
  const ArrayInfo seg = array_arg(seg_o, "segment_index", fn),
                  groups = array_arg(groups_o, "group_index", fn);
  const int64_t seg_n = seg.ndim == 1 ? seg.shape[0] : -1, grp_n = groups.ndim == 1 ? groups.shape[0] : -1;
  if (seg_n < 2 || (seg_n - 2) % 7 != 0)
    fail_value(fn, "segment_index: expected shape (7 * num_segments + 2,), got " + describe_shape(seg));
  if (grp_n < 0 || grp_n % 3 != 0)
    fail_value(fn, "group_index: expected shape (3 * num_groups,), got " + describe_shape(groups));
  const int64_t S = (seg_n - 2) / 7, NG = grp_n / 3;
  const int64_t seg_shape[1] = {seg_n}, grp_shape[1] = {grp_n};
  require_int64(seg, q, seg_shape, 1, "(7 * num_segments + 2,)", fn);
  require_int64(groups, q, grp_shape, 1, "(3 * num_groups,)", fn);
  const auto* s = static_cast<const int64_t*>(seg.data);
  const auto* g = static_cast<const int64_t*>(groups.data);
  Layout l;
  l.segments = PrefixSegments{s, s + S, s + 2 * S, s + 3 * S, S, s + 4 * S, s + 5 * S,
                              s + 6 * S + 1};
  l.groups = PrefixGroups{g, g + NG, g + 2 * NG, NG};
  if (q.device_type == kDeviceCpu) {
    // Every range the core will index must lie inside the tensors.
    for (int64_t i = 0; i < S; ++i) {
      const int64_t qs = s[i], len = s[S + i], ps = s[2 * S + i], pl = s[3 * S + i];
      if (qs < 0 || len < 0 || qs > tokens - len || ps < 0 || pl < 0 || ps > tokens - pl ||
          l.segments.order[i] < 0 || l.segments.order[i] >= S)
        fail_value(fn, "segment_index: segment " + std::to_string(i) + " (start " +
                           std::to_string(qs) + ", length " + std::to_string(len) +
                           ", prefix start " + std::to_string(ps) + ", prefix length " +
                           std::to_string(pl) + ") does not lie inside the " +
                           std::to_string(tokens) +
                           " tokens (build layouts with diffkern.PrefixLayout)");
    }
    for (int64_t i = 0; i < NG; ++i) {
      const int64_t ps = g[i], first = g[NG + i], n = g[2 * NG + i];
      if (ps < 0 || ps >= S || first < 0 || n < 0 || first > S - n)
        fail_value(fn, "group_index: group " + std::to_string(i) + " names segments outside [0, " +
                           std::to_string(S) + ") (build layouts with diffkern.PrefixLayout)");
    }
  }
  return l;
}

PrefixAttentionShape make_shape(const ArrayInfo& q, const ArrayInfo& k, double scale,
                                const char* fn) {
  if (q.ndim != 3) fail_value(fn, "q: expected shape (tokens, heads_q, head_dim), got " + describe_shape(q));
  if (k.ndim != 3) fail_value(fn, "k: expected shape (tokens, heads_kv, head_dim), got " + describe_shape(k));
  DType dtype;
  if (!core_dtype(q.dtype, &dtype))
    throw nb::type_error((std::string(fn) + ": q: expected a floating dtype, got " + describe_dtype(q)).c_str());
  if (q.device_type == kDeviceCpu && dtype != DType::float32 && dtype != DType::float64)
    throw nb::type_error((std::string(fn) + ": q: expected float32 or float64 on the CPU, got " +
                          describe_dtype(q)).c_str());
  const int64_t hq = q.shape[1], hkv = k.shape[1], d = q.shape[2];
  if (hkv < 1 || hq % hkv != 0 || hq > INT32_MAX || d < 1 || d > INT32_MAX)
    fail_value(fn, "k: expected heads_kv >= 1 dividing heads_q and head_dim >= 1, got q " +
                       describe_shape(q) + " and k " + describe_shape(k));
  PrefixAttentionShape sh;
  sh.total_tokens = q.shape[0];
  sh.num_heads_q = static_cast<int>(hq);
  sh.num_heads_kv = static_cast<int>(hkv);
  sh.head_dim = static_cast<int>(d);
  sh.scale = scale;
  sh.dtype = dtype;
  return sh;
}

float* lse_arg(const ArrayInfo& lse, const ArrayInfo& q, const PrefixAttentionShape& sh,
               const char* fn) {
  if (lse.dtype.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Float) || lse.dtype.bits != 32 ||
      lse.dtype.lanes != 1)
    throw nb::type_error((std::string(fn) + ": lse: expected dtype float32, got " + describe_dtype(lse)).c_str());
  const int64_t shape[2] = {sh.num_heads_q, sh.total_tokens};
  require_shape(lse, shape, 2, "(heads_q, tokens)", fn);
  require_same_device(q, lse, fn);
  require_c_contiguous(lse, fn);
  return static_cast<float*>(lse.data);
}

void forward(nb::handle q_o, nb::handle k_o, nb::handle v_o, nb::handle out_o, nb::handle lse_o,
             nb::handle seg_o, nb::handle groups_o, double scale, int num_threads,
             uintptr_t stream) {
  constexpr const char* fn = "prefix_attention_forward";
  const ArrayInfo q = array_arg(q_o, "q", fn), k = array_arg(k_o, "k", fn), v = array_arg(v_o, "v", fn),
                  out = array_arg(out_o, "out", fn, Access::write),
                  lse = array_arg(lse_o, "lse", fn, Access::write);
  require_same_device(q, q, fn);
  PrefixAttentionForward p;
  p.shape = make_shape(q, k, scale, fn);
  const int64_t T = p.shape.total_tokens, hq = p.shape.num_heads_q, hkv = p.shape.num_heads_kv,
                d = p.shape.head_dim;
  p.q = attention_tensor(q, q, hq, d, T, fn);
  p.k = attention_tensor(k, q, hkv, d, T, fn);
  p.v = attention_tensor(v, q, hkv, d, T, fn);
  p.out = attention_tensor(out, q, hq, d, T, fn);
  p.lse = lse_arg(lse, q, p.shape, fn);
  const Layout l = layout_args(seg_o, groups_o, q, T, fn);
  p.segments = l.segments;
  p.groups = l.groups;
  if (T == 0 || hq == 0) return;
  call_core([&] { return std::string(fn); }, q, num_threads, stream, T * hq * d,
            [&](int t) { return prefix_attention_forward_cpu(p, t); },
            [&](void* s) { return prefix_attention_forward_cuda(p, s); });
}

void backward(nb::handle dout_o, nb::handle q_o, nb::handle k_o, nb::handle v_o, nb::handle out_o,
              nb::handle lse_o, nb::handle seg_o, nb::handle groups_o, nb::handle dq_o,
              nb::handle dk_o, nb::handle dv_o,
              nb::handle ws_o, double scale, bool deterministic, int num_threads,
              uintptr_t stream) {
  constexpr const char* fn = "prefix_attention_backward";
  const ArrayInfo q = array_arg(q_o, "q", fn), k = array_arg(k_o, "k", fn), v = array_arg(v_o, "v", fn),
                  out = array_arg(out_o, "out", fn), dout = array_arg(dout_o, "dout", fn),
                  lse = array_arg(lse_o, "lse", fn), dq = array_arg(dq_o, "dq", fn, Access::write),
                  dk = array_arg(dk_o, "dk", fn, Access::write),
                  dv = array_arg(dv_o, "dv", fn, Access::write),
                  ws = array_arg(ws_o, "workspace", fn, Access::write);
  require_same_device(q, q, fn);
  PrefixAttentionBackward p;
  p.shape = make_shape(q, k, scale, fn);
  const int64_t T = p.shape.total_tokens, hq = p.shape.num_heads_q, hkv = p.shape.num_heads_kv,
                d = p.shape.head_dim;
  p.q = attention_tensor(q, q, hq, d, T, fn);
  p.k = attention_tensor(k, q, hkv, d, T, fn);
  p.v = attention_tensor(v, q, hkv, d, T, fn);
  p.out = attention_tensor(out, q, hq, d, T, fn);
  p.dout = attention_tensor(dout, q, hq, d, T, fn);
  p.dq = attention_tensor(dq, q, hq, d, T, fn);
  p.dk = attention_tensor(dk, q, hkv, d, T, fn);
  p.dv = attention_tensor(dv, q, hkv, d, T, fn);
  p.lse = lse_arg(lse, q, p.shape, fn);
  const Layout l = layout_args(seg_o, groups_o, q, T, fn);
  p.segments = l.segments;
  p.groups = l.groups;
  p.deterministic = deterministic;
  if (ws.dtype.code != static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) || ws.dtype.bits != 8)
    throw nb::type_error((std::string(fn) + ": workspace: expected dtype uint8, got " + describe_dtype(ws)).c_str());
  require_same_device(q, ws, fn);
  require_c_contiguous(ws, fn);
  if (q.device_type == kDeviceCuda) {
    const int64_t need = prefix_attention_backward_workspace_bytes(
        p.shape, p.segments.count, p.groups.count, deterministic);
    if (ws.numel() < need)
      fail_value(fn, "workspace: expected at least " + std::to_string(need) + " bytes, got " +
                         std::to_string(ws.numel()));
  }
  p.workspace = ws.numel() ? ws.data : nullptr;
  p.workspace_bytes = ws.numel();
  if (T == 0 || hq == 0) return;
  call_core([&] { return std::string(fn); }, q, num_threads, stream, T * hq * d,
            [&](int t) { return prefix_attention_backward_cpu(p, t); },
            [&](void* s) { return prefix_attention_backward_cuda(p, s); });
}

int64_t workspace_bytes(int64_t tokens, int64_t heads_q, int64_t heads_kv, int64_t head_dim,
                        const std::string& dtype, int64_t num_segments, int64_t num_groups,
                        bool deterministic) {
  PrefixAttentionShape sh;
  sh.total_tokens = tokens;
  sh.num_heads_q = static_cast<int>(heads_q);
  sh.num_heads_kv = static_cast<int>(heads_kv);
  sh.head_dim = static_cast<int>(head_dim);
  if (dtype == "float32") sh.dtype = DType::float32;
  else if (dtype == "float64") sh.dtype = DType::float64;
  else if (dtype == "float16") sh.dtype = DType::float16;
  else if (dtype == "bfloat16") sh.dtype = DType::bfloat16;
  else fail_value("prefix_attention_backward_workspace_bytes", "dtype: expected float32, float64, "
                  "float16 or bfloat16, got " + dtype);
  return prefix_attention_backward_workspace_bytes(sh, num_segments, num_groups, deterministic);
}

}  // namespace

void bind_prefix_attention(nb::module_& m) {
  m.def("prefix_attention_forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse"), nb::arg("segment_index"), nb::arg("group_index"),
        nb::arg("scale"), nb::arg("num_threads") = 0,
        nb::arg("stream") = 0,
        "Shared-prefix attention forward (csrc/prefix_attention/prefix_attention.h): writes\n"
        "out (T, Hq, D) and lse (Hq, T) float32. q (T, Hq, D), k, v (T, Hkv, D): one dtype and\n"
        "device, head dim contiguous. segment_index (7 S + 2,), group_index (3 NG,): int64,\n"
        "C-contiguous (diffkern.PrefixLayout builds them).");
  m.def("prefix_attention_backward", &backward, nb::arg("dout"), nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("out"), nb::arg("lse"), nb::arg("segment_index"),
        nb::arg("group_index"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
        nb::arg("workspace"), nb::arg("scale"), nb::arg("deterministic") = false,
        nb::arg("num_threads") = 0, nb::arg("stream") = 0,
        "Shared-prefix attention backward: writes dq (T, Hq, D), dk, dv (T, Hkv, D) in full.\n"
        "workspace: uint8, at least prefix_attention_backward_workspace_bytes(...) bytes.");
  m.def("prefix_attention_backward_workspace_bytes", &workspace_bytes, nb::arg("tokens"),
        nb::arg("heads_q"), nb::arg("heads_kv"), nb::arg("head_dim"), nb::arg("dtype"),
        nb::arg("num_segments"), nb::arg("num_groups"), nb::arg("deterministic"),
        "Bytes of device workspace the CUDA backward needs (0 for CPU-only builds).");
}

}  // namespace bindings
}  // namespace diffkern
