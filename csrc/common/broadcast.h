// Geometry of an elementwise op with two broadcast inputs and one contiguous output.
// Strides are in elements (not bytes) and may be 0 (broadcast) or negative.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace diffkern {

constexpr int kMaxDims = 8;

struct BinaryBroadcast {
  int ndim = 0;                     // 0 means a single element
  int64_t sizes[kMaxDims] = {};     // output shape, row-major
  int64_t a_strides[kMaxDims] = {}; // first input's strides over the output shape
  int64_t b_strides[kMaxDims] = {}; // second input's strides over the output shape

  DK_HOST_DEVICE int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }

  // True when both inputs are laid out exactly like the (contiguous) output, so the
  // linear index is the offset and offsets() (a division per dimension) can be skipped.
  DK_HOST_DEVICE bool inputs_match_output() const {
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (sizes[d] != 1 && (a_strides[d] != expected || b_strides[d] != expected)) return false;
      expected *= sizes[d];
    }
    return true;
  }

  // Offsets of both inputs for the linear (row-major) output index i.
  DK_HOST_DEVICE void offsets(int64_t i, int64_t& a_off, int64_t& b_off) const {
    a_off = 0;
    b_off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t idx = i % sizes[d];
      i /= sizes[d];
      a_off += idx * a_strides[d];
      b_off += idx * b_strides[d];
    }
  }
};

}  // namespace diffkern
