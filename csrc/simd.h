// 16-lane float32 vector helpers for the CPU kernels (GCC/Clang vector
// extensions: one AVX-512 register, two AVX2 or four SSE registers; the
// compiler lowers them for whichever target a function is compiled for).
// No torch dependency: tests/test_simd_helpers.py compiles this header alone.
#pragma once
#include <cstdint>

#define UF_INL static inline __attribute__((always_inline))

namespace uniter_fast {
namespace simd {

constexpr int64_t kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(64)));

UF_INL vf splat(float x) { return vf{} + x; }
UF_INL vf ld(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
UF_INL void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
// Tree reduction (GCC's own reduction epilogue sums the 16 lanes one by one).
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && \
    !defined(UNITER_FAST_PORTABLE_SHUFFLE)
UF_INL float hsum(vf v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}
#else  // GCC < 12 has no __builtin_shufflevector: full-width __builtin_shuffle steps
UF_INL float hsum(vf v) {
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}
#endif

// exp(x) lane-wise in float32: x = n ln2 + r with |r| <= ln2 / 2 (two-part
// ln2, exact n ln2_hi), e^r by its degree-7 Taylor polynomial (truncation
// 5e-9 relative), times 2^n applied as two normal powers of two so results
// down to the subnormal range round once.  exp(>88.73) = inf, exp(<-104) = 0,
// NaN stays NaN.
UF_INL vf vexp(vf x) {
  vf xc = x < splat(-110.0f) ? splat(-110.0f) : x;
  xc = xc > splat(89.0f) ? splat(89.0f) : xc;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf fn = (xc * splat(1.44269504088896341f) + shifter) - shifter;
  vf r = xc - fn * splat(0.693359375f);
  r = r - fn * splat(-2.12194440e-4f);
  vf p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vi n = __builtin_convertvector(fn, vi);
  const vi n1 = n >> 1;
  const vi b1 = (n1 + 127) << 23;
  const vi b2 = ((n - n1) + 127) << 23;
  vf s1, s2;
  __builtin_memcpy(&s1, &b1, sizeof s1);
  __builtin_memcpy(&s2, &b2, sizeof s2);
  const vf res = (p * s1) * s2;
  return x != x ? x : res;
}

}  // namespace simd
}  // namespace uniter_fast
