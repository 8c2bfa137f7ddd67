// CUDA entry points of shared-prefix attention: checks what the kernels rely on, then
// dispatches (dtype x head dim) to the launchers in pa_fwd.cuh / pa_bwd.cuh.
//
// Why raw PTX (mma.sync m16n8k16 + ldmatrix + cp.async) and not CUTLASS/CuTe: the sm80
// path needs only three instructions and one swizzle, which fit in pa_device.cuh; writing
// them out keeps the build free of a header-only dependency of several hundred files and
// keeps each instantiation's compile time in seconds. Part 2's Hopper path (wgmma, TMA,
// warp specialization) is where CuTe's layouts pay for themselves; it plugs in behind the
// same PrefixAttentionForward/Backward structs and the same segment schedule.
//
// Supported: bfloat16 and float16, head dims 64 and 128, sm80 and newer. float32 on CUDA is
// refused with Status::invalid_argument (the bindings say so to the user): a tensor-core
// path needs 16-bit inputs, and the float32 reference is the CPU kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.cuh"
#include "common/dtype.h"
#include "prefix_attention/pa_bwd_split.h"
#include "prefix_attention/pa_kernels.h"
#include "prefix_attention/prefix_attention.h"

namespace diffkern {
namespace {

bool aligned(const AttentionTensor& a) {
  return reinterpret_cast<uintptr_t>(a.data) % 16 == 0 && a.token_stride % 8 == 0 &&
         a.head_stride % 8 == 0;
}

// What every kernel relies on; the bindings check shapes, devices and dtypes first.
Status check_shape(const PrefixAttentionShape& s, const PrefixSegments& seg) {
  if (s.dtype != DType::float16 && s.dtype != DType::bfloat16) return Status::invalid_argument;
  if (s.head_dim != 64 && s.head_dim != 128) return Status::invalid_argument;
  if (s.num_heads_q <= 0 || s.num_heads_kv <= 0 || s.num_heads_q % s.num_heads_kv != 0)
    return Status::invalid_argument;
  if (s.total_tokens < 0 || seg.count < 0) return Status::invalid_argument;
  return Status::ok;
}

bool has_schedule(const PrefixSegments& s) {
  return s.q_start && s.length && s.prefix_start && s.prefix_length && s.order &&
         s.order_tiles_64 && s.order_tiles_128;
}

template <template <class, int> class Launch, class P>
Status dispatch(const P& p, cudaStream_t stream) {
  const bool bf16 = p.shape.dtype == DType::bfloat16;
  if (p.shape.head_dim == 64)
    return bf16 ? Launch<BFloat16, 64>::run(p, stream) : Launch<Float16, 64>::run(p, stream);
  return bf16 ? Launch<BFloat16, 128>::run(p, stream) : Launch<Float16, 128>::run(p, stream);
}
template <class T, int D>
struct Fwd {
  static Status run(const PrefixAttentionForward& p, cudaStream_t s) {
    return pa::launch_fwd<T, D>(p, s);
  }
};
template <class T, int D>
struct Bwd {
  static Status run(const PrefixAttentionBackward& p, cudaStream_t s) {
    return pa::launch_bwd<T, D>(p, s);
  }
};

}  // namespace

namespace pa {
// An attribute of the current device, or `fallback` when it cannot be queried.
static int current_device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // our failed query, not a launch's error: do not leave it
    return fallback;
  }
  return value;
}
int device_sm_count() { return current_device_attribute(cudaDevAttrMultiProcessorCount, 0); }
bool device_is_sm90() {
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor, 0) == 9 &&
         current_device_attribute(cudaDevAttrComputeCapabilityMinor, -1) == 0;
}
}  // namespace pa

Status prefix_attention_forward_cuda(const PrefixAttentionForward& p, void* stream) {
  const Status st = check_shape(p.shape, p.segments);
  if (!st.is_ok()) return st;
  if (p.shape.total_tokens == 0 || p.segments.count == 0) return Status::ok;
  if (!has_schedule(p.segments) || p.lse == nullptr || !aligned(p.q) || !aligned(p.k) ||
      !aligned(p.v) || !aligned(p.out))
    return Status::invalid_argument;
  return dispatch<Fwd>(p, static_cast<cudaStream_t>(stream));
}

Status prefix_attention_backward_cuda(const PrefixAttentionBackward& p, void* stream) {
  const Status st = check_shape(p.shape, p.segments);
  if (!st.is_ok()) return st;
  if (p.shape.total_tokens == 0 || p.segments.count == 0) return Status::ok;
  // The workspace 16-byte aligned: float4 partials and sm_90 red.v4 dQ reductions into it
  // (a torch allocation is; an odd byte offset into one is not).
  if (!has_schedule(p.segments) || p.lse == nullptr || p.workspace == nullptr ||
      reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0 ||
      (p.groups.count > 0 &&
       (!p.groups.prefix_segment || !p.groups.first_suffix || !p.groups.num_suffixes)))
    return Status::invalid_argument;
  for (const AttentionTensor* a : {&p.q, &p.k, &p.v, &p.out, &p.dout, &p.dq, &p.dk, &p.dv})
    if (!aligned(*a)) return Status::invalid_argument;
  return dispatch<Bwd>(p, static_cast<cudaStream_t>(stream));
}

int64_t prefix_attention_backward_workspace_bytes(const PrefixAttentionShape& shape,
                                                  int64_t num_segments, int64_t num_groups,
                                                  bool deterministic) {
  if (shape.total_tokens <= 0 || shape.num_heads_q <= 0) return 0;
  const int64_t fixed =
      pa::delta_bytes(shape) + (pa::dq_by_kernel(shape, deterministic) ? 0 : pa::dq_accum_bytes(shape));
  // The same key tile and chunk count launch_bwd will choose on this device (it asks the
  // same rules).
  const int sms = pa::device_sm_count();
  const int key_tile = pa::bwd_kv_key_tile(shape, sms);
  int64_t resident = 0;
  const bool bf16 = shape.dtype == DType::bfloat16;
  if (shape.dtype == DType::float16 || bf16) {
    if (shape.head_dim == 64)
      resident = bf16 ? pa::bwd_kv_resident_blocks<BFloat16, 64>(key_tile, sms)
                      : pa::bwd_kv_resident_blocks<Float16, 64>(key_tile, sms);
    else if (shape.head_dim == 128)
      resident = bf16 ? pa::bwd_kv_resident_blocks<BFloat16, 128>(key_tile, sms)
                      : pa::bwd_kv_resident_blocks<Float16, 128>(key_tile, sms);
  }
  const int chunks = pa::bwd_prefix_chunks(shape, num_segments, num_groups, resident, key_tile);
  return fixed + pa::bwd_partials_bytes(shape, chunks);
}

}  // namespace diffkern
