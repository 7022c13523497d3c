// Float32 vector helpers of UF_LANES lanes (4, 8 or 16) for the CPU kernels:
// GCC/Clang vector extensions, lowered for whichever instruction set the
// including code is compiled for.  Pick the lane count to match it (16 for
// AVX-512, 8 for AVX2, 4 for SSE2/NEON): wider generic vectors than the
// target's registers compile to slow code.
//
// Included once per instruction set, inside a namespace, after defining
// UF_LANES and including <cstdint> (no include guard, no namespace and no
// system headers of its own).  No torch dependency: tests/test_simd_helpers.py
// compiles it alone at every lane count.

#ifndef UF_LANES
#error "define UF_LANES (4, 8 or 16) before including simd.h"
#endif
#ifndef UF_INL
#define UF_INL static inline __attribute__((always_inline))
#endif

constexpr int64_t kLanes = UF_LANES;
typedef float vf __attribute__((vector_size(4 * UF_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * UF_LANES)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));

UF_INL vf splat(float x) { return vf{} + x; }
UF_INL vf ld(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
UF_INL void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
UF_INL vi lane_index() {
  vi v = {};
  for (int l = 0; l < UF_LANES; ++l) v[l] = l;
  return v;
}

// Tree reduction (GCC's own reduction epilogue sums the lanes one by one).
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && \
    !defined(UNITER_FAST_PORTABLE_SHUFFLE)
UF_INL float hsum(vf v) {
#if UF_LANES == 16
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif UF_LANES == 8
  const vf4 c = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const vf4 c = v;
#endif
  return (c[0] + c[2]) + (c[1] + c[3]);
}
#else  // GCC < 12 has no __builtin_shufflevector: full-width __builtin_shuffle steps
UF_INL float hsum(vf v) {
#if UF_LANES == 16
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#elif UF_LANES == 8
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6});
#else
  v += __builtin_shuffle(v, vi{2, 3, 0, 1});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2});
#endif
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
