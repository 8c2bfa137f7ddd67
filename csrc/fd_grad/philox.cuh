// Philox-4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw, "Parallel
// Random Numbers: As Easy as 1, 2, 3" (SC '11), written here from the paper's description:
// a 128-bit counter and a 64-bit key map to 128 random bits through 10 rounds of
//   (c0, c1, c2, c3) -> (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
// with the key bumped by the Weyl constants (W0, W1) between rounds. No state: the output
// is a pure function of (counter, key), the same on the CPU and the GPU (integer math only).
//
// Tested against the known-answer vectors of Random123's tests/kat_vectors (the three
// "philox4x32 10" lines: counter and key all zeros, all 0xffffffff, and the hex digits of
// pi; https://github.com/DEShawResearch/random123), see tests/test_fd_grad.py and
// checks/fd_grad.py.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace diffkern {
namespace philox {

struct U32x4 {
  uint32_t v[4];
};

constexpr uint32_t kM0 = 0xD2511F53u;  // multipliers of the two 32x32 -> 64 products
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // key schedule: golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // and sqrt(3) - 1, as 32-bit fractions
constexpr int kRounds = 10;

DK_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// One Philox-4x32-10 evaluation: 4 random 32-bit words of (counter, key).
DK_HOST_DEVICE U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kM0, c.v[0], hi0, lo0);
    mul_hi_lo(kM1, c.v[2], hi1, lo1);
    c = U32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

}  // namespace philox
}  // namespace diffkern
