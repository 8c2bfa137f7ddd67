// Built instead of the CUDA kernels (*.cu) when the library is compiled without CUDA: the
// symbols must exist so the bindings link, and a status (not a crash) says this build has
// no GPU. The CUDA build defines the same functions in the .cu files.
#include "prefix_attention/prefix_attention.h"

namespace diffkern {

Status prefix_attention_forward_cuda(const PrefixAttentionForward&, void*) {
  return Status::unsupported;
}
Status prefix_attention_backward_cuda(const PrefixAttentionBackward&, void*) {
  return Status::unsupported;
}
int64_t prefix_attention_backward_workspace_bytes(const PrefixAttentionShape&, int64_t, int64_t,
                                                  bool) {
  return 0;
}

}  // namespace diffkern
