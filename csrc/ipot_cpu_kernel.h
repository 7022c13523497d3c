// The IPOT CPU kernel for one instruction set: csrc/ipot_cpu.cpp includes
// this file once per set (AVX-512, AVX2, baseline), inside a namespace of its
// own, with UF_LANES defined and the target selected; it picks one at run
// time.  Rows of the compact block are padded to whole vectors of UF_LANES
// floats.  Needs Workspace (csrc/ipot_cpu.cpp) and simd.h (included here).
#include "simd.h"

void vexp_array(const float* in, float* out, int64_t count) {
  int64_t c = 0;
  for (; c + kLanes <= count; c += kLanes) st(out + c, vexp(ld(in + c)));
  if (c < count) {
    float buf[kLanes] = {};
    std::copy(in + c, in + count, buf);
    st(buf, vexp(ld(buf)));
    std::copy(buf, buf + (count - c), out + c);
  }
}


// delta_j = 1 / (n * sum_i Q_ij sigma_i) on the n real columns, 0 on the padding.
UF_INL void delta_from(const float* __restrict tmp, float* __restrict delta, int64_t n,
                       int64_t L) {
  const float nl = static_cast<float>(n);
  for (int64_t j = 0; j < n; ++j) delta[j] = 1.0f / (nl * tmp[j]);
  for (int64_t j = n; j < L; ++j) delta[j] = 0.0f;
}

// sigma for one row from its dot product with delta; then (k > 1) its share of Q^T sigma.
UF_INL void sigma_sweep(const float* __restrict Q, const float* __restrict delta,
                        float* __restrict sigma, float* __restrict tmp, int64_t m, int64_t L) {
  const float ml = static_cast<float>(m);
  const int64_t nv = L / kLanes;
  for (int64_t c = 0; c < nv; ++c) st(tmp + c * kLanes, vf{});
  for (int64_t i = 0; i < m; ++i) {
    const float* q = Q + i * L;
    vf s = {};
    for (int64_t c = 0; c < nv; ++c) s += ld(delta + c * kLanes) * ld(q + c * kLanes);
    const float g = 1.0f / (ml * hsum(s));
    sigma[i] = g;
    for (int64_t c = 0; c < nv; ++c)
      st(tmp + c * kLanes, ld(tmp + c * kLanes) + ld(q + c * kLanes) * g);
  }
}

// One iteration's pass over the rows (Q, delta fixed on entry):
//   sigma_i = 1 / (m * sum_j delta_j Q_ij)
//   T_ij = (delta_j Q_ij) sigma_i;  Q_ij <- A_ij T_ij, or T_ij on the last iteration
//   tmp_j += Q_ij sigma_i  (the next delta's Q^T sigma)
// Rows of any length, four at a time: the dot products, then the update.
// `rows` rows from these pointers on; ml is the example's m (the normaliser).
UF_INL void rows_any(const float* __restrict A, float* __restrict Q, const float* __restrict delta,
                     float* __restrict sigma, float* __restrict tmp, int64_t rows, float ml,
                     int64_t L, bool last) {
  const int64_t m = rows;
  const int64_t nv = L / kLanes;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    float* q0 = Q + i * L;
    const float* a0 = A + i * L;
    vf s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t c = 0; c < nv; ++c) {
      const int64_t o = c * kLanes;
      const vf d = ld(delta + o);
      s0 += d * ld(q0 + o);
      s1 += d * ld(q0 + L + o);
      s2 += d * ld(q0 + 2 * L + o);
      s3 += d * ld(q0 + 3 * L + o);
    }
    const float g0 = 1.0f / (ml * hsum(s0)), g1 = 1.0f / (ml * hsum(s1));
    const float g2 = 1.0f / (ml * hsum(s2)), g3 = 1.0f / (ml * hsum(s3));
    sigma[i] = g0;
    sigma[i + 1] = g1;
    sigma[i + 2] = g2;
    sigma[i + 3] = g3;
    for (int64_t c = 0; c < nv; ++c) {
      const int64_t o = c * kLanes;
      const vf d = ld(delta + o);
      const vf t0 = (d * ld(q0 + o)) * g0, t1 = (d * ld(q0 + L + o)) * g1;
      const vf t2 = (d * ld(q0 + 2 * L + o)) * g2, t3 = (d * ld(q0 + 3 * L + o)) * g3;
      if (last) {
        st(q0 + o, t0);
        st(q0 + L + o, t1);
        st(q0 + 2 * L + o, t2);
        st(q0 + 3 * L + o, t3);
      } else {
        const vf x0 = ld(a0 + o) * t0, x1 = ld(a0 + L + o) * t1;
        const vf x2 = ld(a0 + 2 * L + o) * t2, x3 = ld(a0 + 3 * L + o) * t3;
        st(q0 + o, x0);
        st(q0 + L + o, x1);
        st(q0 + 2 * L + o, x2);
        st(q0 + 3 * L + o, x3);
        st(tmp + o, ld(tmp + o) + ((x0 * g0 + x1 * g1) + (x2 * g2 + x3 * g3)));
      }
    }
  }
  for (; i < m; ++i) {
    float* q = Q + i * L;
    const float* a = A + i * L;
    vf s = {};
    for (int64_t c = 0; c < nv; ++c) s += ld(delta + c * kLanes) * ld(q + c * kLanes);
    const float g = 1.0f / (ml * hsum(s));
    sigma[i] = g;
    for (int64_t c = 0; c < nv; ++c) {
      const int64_t o = c * kLanes;
      const vf t = (ld(delta + o) * ld(q + o)) * g;
      if (last) {
        st(q + o, t);
      } else {
        const vf x = ld(a + o) * t;
        st(q + o, x);
        st(tmp + o, ld(tmp + o) + x * g);
      }
    }
  }
}

// The same pass for rows of NV vectors (L = kLanes NV), R rows at a time,
// each row read once: u = delta * Q stays in registers for its sum and the
// update (Q <- (A u) sigma_i, and (A u) sigma_i^2 into Q^T sigma); delta and
// Q^T sigma stay in registers for the whole pass.
template <int NV, int R>
UF_INL void rows_fixed(const float* __restrict A, float* __restrict Q,
                       const float* __restrict delta, float* __restrict sigma,
                       float* __restrict tmp, int64_t m, bool last) {
  constexpr int64_t L = NV * kLanes;
  const float ml = static_cast<float>(m);
  vf d[NV], t[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    d[c] = ld(delta + c * kLanes);
    t[c] = vf{};
  }
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    float* q0 = Q + i * L;
    const float* a0 = A + i * L;
    vf u[R][NV];
    float g[R], h[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      vf s = {};
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) {
        u[r][c] = d[c] * ld(q0 + r * L + c * kLanes);
        s += u[r][c];
      }
      g[r] = 1.0f / (ml * hsum(s));
      h[r] = g[r] * g[r];
      sigma[i + r] = g[r];
    }
    if (last) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) st(q0 + r * L + c * kLanes, u[r][c] * g[r]);
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const vf x = ld(a0 + r * L + c * kLanes) * u[r][c];
          st(q0 + r * L + c * kLanes, x * g[r]);
          t[c] += x * h[r];
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) st(tmp + c * kLanes, t[c]);
  if (i < m) rows_any(A + i * L, Q + i * L, delta, sigma + i, tmp, m - i, ml, L, last);
}

// The iterations on one example's compact block.  A and Q are m x L (Q
// starts equal to A, both zero in columns >= n); on return Q holds the plan
// T = delta * Q * sigma (zero in the padding columns).
void ipot_block(const float* __restrict A, float* __restrict Q, float* __restrict delta,
                       float* __restrict sigma, float* __restrict tmp, int64_t m, int64_t n,
                       int64_t L, int64_t iteration, int64_t k) {
  const float ml = static_cast<float>(m);
  const int64_t nv = L / kLanes;
  // T0 = 1 so Q = A; sigma0 = 1/m; first delta from Q^T sigma0.
  for (int64_t c = 0; c < nv; ++c) st(tmp + c * kLanes, vf{});
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < nv; ++c)
      st(tmp + c * kLanes, ld(tmp + c * kLanes) + ld(Q + i * L + c * kLanes) * (1.0f / ml));
  delta_from(tmp, delta, n, L);

  for (int64_t it = 0; it < iteration; ++it) {
    for (int64_t kk = 0; kk + 1 < k; ++kk) {  // extra inner sweeps with Q fixed
      sigma_sweep(Q, delta, sigma, tmp, m, L);
      delta_from(tmp, delta, n, L);
    }
    const bool last = it + 1 == iteration;
    for (int64_t c = 0; c < nv; ++c) st(tmp + c * kLanes, vf{});
    switch (nv) {
#if UF_LANES == 16  // 32 vector registers: rows of up to 8 vectors stay in registers
      case 1: rows_fixed<1, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 2: rows_fixed<2, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 3: rows_fixed<3, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 4: rows_fixed<4, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 5: rows_fixed<5, 2>(A, Q, delta, sigma, tmp, m, last); break;
      case 6: rows_fixed<6, 2>(A, Q, delta, sigma, tmp, m, last); break;
      case 7: rows_fixed<7, 2>(A, Q, delta, sigma, tmp, m, last); break;
      case 8: rows_fixed<8, 2>(A, Q, delta, sigma, tmp, m, last); break;
#else  // 16 vector registers (AVX2, SSE2, NEON): up to 4 vectors
      case 1: rows_fixed<1, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 2: rows_fixed<2, 4>(A, Q, delta, sigma, tmp, m, last); break;
      case 3: rows_fixed<3, 2>(A, Q, delta, sigma, tmp, m, last); break;
      case 4: rows_fixed<4, 2>(A, Q, delta, sigma, tmp, m, last); break;
#endif
      default: rows_any(A, Q, delta, sigma, tmp, m, ml, L, last); break;
    }
    if (!last) delta_from(tmp, delta, n, L);
  }
}

// A = exp(-Cc / beta) (the reference's float32 -C / beta, then exp) on the
// m x L compact costs, zero in the padding columns j >= n.
void exp_block(const float* __restrict Cc, float* __restrict A, int64_t m, int64_t n,
                      int64_t L, float beta) {
  const vf b = splat(beta);
  const vi lane = lane_index();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < L; o += kLanes) {
      const vf a = vexp(-(ld(Cc + i * L + o) / b));
      st(A + i * L + o, lane + static_cast<int32_t>(o) < static_cast<int32_t>(n) ? a : vf{});
    }
  }
}

// sum over the block of Cc * T (both zero in the padding columns)
double trace_block(const float* __restrict Cc, const float* __restrict T, int64_t m,
                          int64_t L) {
  double acc = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    vf s = {};
    for (int64_t o = 0; o < L; o += kLanes) s += ld(Cc + i * L + o) * ld(T + i * L + o);
    acc += hsum(s);
  }
  return acc;
}

// Cb: this example's float32 cost [M, N] with strides (sCm, sCn);
// out (optional): its [N, M] output slab, fully written here (zeros off the
// real block); dist (optional): sum over the real block of C * T.
void ipot_example(const float* Cb, int64_t sCm, int64_t sCn, float beta, const bool* tpad,
                  int64_t stp, const bool* ipad, int64_t sip, int64_t M, int64_t N,
                  int64_t iteration, int64_t k, float* out, float* dist, Workspace& ws) {
  ws.rows.clear();
  ws.cols.clear();
  for (int64_t i = 0; i < M; ++i)
    if (!tpad[i * stp]) ws.rows.push_back(i);
  for (int64_t j = 0; j < N; ++j)
    if (!ipad[j * sip]) ws.cols.push_back(j);
  const int64_t m = static_cast<int64_t>(ws.rows.size());
  const int64_t n = static_cast<int64_t>(ws.cols.size());
  if (dist) *dist = 0.0f;
  if (m == 0 || n == 0) {
    if (out) std::fill(out, out + N * M, 0.0f);
    return;
  }
  const int64_t L = (n + kLanes - 1) / kLanes * kLanes;
  ws.Cc.resize(m * L);
  ws.A.resize(m * L);
  ws.Q.resize(m * L);
  ws.delta.resize(L);
  ws.tmp.resize(L);
  ws.sigma.resize(m);
  float* Cc = ws.Cc.data();
  float* A = ws.A.data();
  float* Q = ws.Q.data();
  // the real block's costs, compact (rows: real tokens, columns: real regions)
  const bool cols_prefix = sCn == 1 && ws.cols[n - 1] == n - 1;
  for (int64_t i = 0; i < m; ++i) {
    const float* crow = Cb + ws.rows[i] * sCm;
    float* cc = Cc + i * L;
    if (cols_prefix) {
      std::copy(crow, crow + n, cc);
    } else {
      for (int64_t j = 0; j < n; ++j) cc[j] = crow[ws.cols[j] * sCn];
    }
    std::fill(cc + n, cc + L, 0.0f);
  }
  exp_block(Cc, A, m, n, L, beta);
  std::copy(A, A + m * L, Q);
  ipot_block(A, Q, ws.delta.data(), ws.sigma.data(), ws.tmp.data(), m, n, L, iteration, k);
  if (dist) *dist = static_cast<float>(trace_block(Cc, Q, m, L));
  if (!out) return;
  // out is [N, M]: out[col, row] = T[i, j], zeros elsewhere; every row of out
  // written once, front to back (it is usually not in cache: no second pass)
  const bool rows_prefix = ws.rows[m - 1] == m - 1;
  int64_t next = 0;  // first row of out not written yet
  for (int64_t j = 0; j < n; ++j) {
    const int64_t col = ws.cols[j];
    std::fill(out + next * M, out + col * M, 0.0f);
    float* orow = out + col * M;
    if (rows_prefix) {
      for (int64_t i = 0; i < m; ++i) orow[i] = Q[i * L + j];
      std::fill(orow + m, orow + M, 0.0f);
    } else {
      std::fill(orow, orow + M, 0.0f);
      for (int64_t i = 0; i < m; ++i) orow[ws.rows[i]] = Q[i * L + j];
    }
    next = col + 1;
  }
  std::fill(out + next * M, out + N * M, 0.0f);
}
