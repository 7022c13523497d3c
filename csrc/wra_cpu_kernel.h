// The WRA distance from the embeddings on the CPU, for one instruction set:
// csrc/ipot_cpu.cpp includes this file once per set, after ipot_cpu_kernel.h
// (whose exp_block / ipot_block / trace_block it uses), inside that set's
// namespace.
//
// Per example, only on its real block (m real text rows, n real regions;
// padded rows and columns of the embeddings are never read):
//   r_x = 1 / max(|x_i|, eps), r_y = 1 / max(|y_j|, eps)        (F.normalize's)
//   C_ij = 1 - (x_i . y_j) r_x_i r_y_j                            (small GEMM, in cache)
//   T = IPOT(C), dist = sum C_ij T_ij                             (ipot_cpu_kernel.h)
// and, when a gradient will be needed, what the backward pass takes:
//   P_ij = T_ij r_x_i r_y_j,
//   p_x_i = [|x_i| >= eps] r_x_i^2 sum_j T_ij cos_ij,  p_y_j likewise,
// so that for an upstream gradient g of dist (cos = 1 - C):
//   dx_i = g (p_x_i x_i - sum_j P_ij y_j),  dy_j = g (p_y_j y_j - sum_i P_ij x_i)
// (the gradient of UNITER's F.normalize-matmul-masked_fill cost through T^T).

// 1 / max(|row|, eps) of `count` rows of length D (row r at base + idx[r] * stride),
// and whether |row| >= eps (else the clamp stops the norm's gradient).
void wra_inv_norms(const float* base, int64_t stride, const int64_t* idx, int64_t count,
                   int64_t D, float eps, float* r, float* keep) {
  const int64_t Dv = D / kLanes * kLanes;
  for (int64_t i = 0; i < count; ++i) {
    const float* p = base + idx[i] * stride;
    vf s = {};
    for (int64_t d = 0; d < Dv; d += kLanes) {
      const vf v = ld(p + d);
      s += v * v;
    }
    float ss = hsum(s);
    for (int64_t d = Dv; d < D; ++d) ss += p[d] * p[d];
    const float norm = std::sqrt(ss);
    r[i] = 1.0f / std::max(norm, eps);
    keep[i] = norm >= eps ? 1.0f : 0.0f;
  }
}

// RI x RJ dot products of rows x[0..RI) and y[0..RJ) (length D), into out[r][c].
template <int RI, int RJ>
UF_INL void wra_dot_tile(const float* const* x, const float* const* y, int64_t D,
                         float (*out)[RJ]) {
  const int64_t Dv = D / kLanes * kLanes;
  vf acc[RI][RJ];
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < RJ; ++c) acc[r][c] = vf{};
  for (int64_t d = 0; d < Dv; d += kLanes) {
    vf xv[RI];
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r) xv[r] = ld(x[r] + d);
#pragma GCC unroll 4
    for (int c = 0; c < RJ; ++c) {
      const vf yv = ld(y[c] + d);
#pragma GCC unroll 4
      for (int r = 0; r < RI; ++r) acc[r][c] += xv[r] * yv;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < RJ; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t d = Dv; d < D; ++d) s += x[r][d] * y[c][d];
      out[r][c] = s;
    }
}

#ifndef UF_WRA_TILE_I
#if UF_LANES == 16  // 32 vector registers
#define UF_WRA_TILE_I 4
#define UF_WRA_TILE_J 4
#else               // 16 vector registers
#define UF_WRA_TILE_I 3
#define UF_WRA_TILE_J 4
#endif
#endif
constexpr int kTileI = UF_WRA_TILE_I, kTileJ = UF_WRA_TILE_J;

template <int RI, int RJ>
UF_INL void wra_cost_tile(const float* xb, int64_t sx, const int64_t* rows, const float* yb,
                          int64_t sy, const int64_t* cols, int64_t D, const float* rx,
                          const float* ry, float* Cc, int64_t L, int64_t i0, int64_t j0) {
  const float* xp[RI];
  const float* yp[RJ];
  for (int r = 0; r < RI; ++r) xp[r] = xb + rows[i0 + r] * sx;
  for (int c = 0; c < RJ; ++c) yp[c] = yb + cols[j0 + c] * sy;
  float dots[RI][RJ];
  wra_dot_tile<RI, RJ>(xp, yp, D, dots);
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c)
      Cc[(i0 + r) * L + j0 + c] = 1.0f - (dots[r][c] * rx[i0 + r]) * ry[j0 + c];
}

// Cc (m x L, zero in columns >= n) = 1 - cos of the real rows and columns.
void wra_cost_block(const float* xb, int64_t sx, const int64_t* rows, int64_t m, const float* yb,
                    int64_t sy, const int64_t* cols, int64_t n, int64_t D, const float* rx,
                    const float* ry, float* Cc, int64_t L) {
  int64_t i0 = 0;
  for (; i0 + kTileI <= m; i0 += kTileI) {
    int64_t j0 = 0;
    for (; j0 + kTileJ <= n; j0 += kTileJ)
      wra_cost_tile<kTileI, kTileJ>(xb, sx, rows, yb, sy, cols, D, rx, ry, Cc, L, i0, j0);
    for (; j0 < n; ++j0)
      wra_cost_tile<kTileI, 1>(xb, sx, rows, yb, sy, cols, D, rx, ry, Cc, L, i0, j0);
  }
  for (; i0 < m; ++i0) {
    int64_t j0 = 0;
    for (; j0 + kTileJ <= n; j0 += kTileJ)
      wra_cost_tile<1, kTileJ>(xb, sx, rows, yb, sy, cols, D, rx, ry, Cc, L, i0, j0);
    for (; j0 < n; ++j0) wra_cost_tile<1, 1>(xb, sx, rows, yb, sy, cols, D, rx, ry, Cc, L, i0, j0);
  }
  for (int64_t i = 0; i < m; ++i) std::fill(Cc + i * L + n, Cc + (i + 1) * L, 0.0f);
}

// One example forward.  xb [M, D] (row stride sx), yb [N, D] (row stride sy),
// pads; dist: trace(C T) over the real block.  With P (this example's [M, N]
// slab, zero-filled by the caller) also P, px [M] and py [N] (zero-filled).
void wra_forward_example(const float* xb, int64_t sx, const float* yb, int64_t sy,
                         const bool* tpad, int64_t stp, const bool* ipad, int64_t sip,
                         int64_t M, int64_t N, int64_t D, float eps, float beta,
                         int64_t iteration, int64_t k, float* dist, float* P, float* px,
                         float* py, Workspace& ws) {
  ws.rows.clear();
  ws.cols.clear();
  for (int64_t i = 0; i < M; ++i)
    if (!tpad[i * stp]) ws.rows.push_back(i);
  for (int64_t j = 0; j < N; ++j)
    if (!ipad[j * sip]) ws.cols.push_back(j);
  const int64_t m = static_cast<int64_t>(ws.rows.size());
  const int64_t n = static_cast<int64_t>(ws.cols.size());
  *dist = 0.0f;
  if (m == 0 || n == 0) return;
  const int64_t L = (n + kLanes - 1) / kLanes * kLanes;
  ws.Cc.resize(m * L);
  ws.A.resize(m * L);
  ws.Q.resize(m * L);
  ws.delta.resize(L);
  ws.tmp.resize(L);
  ws.sigma.resize(m);
  ws.rx.resize(m);
  ws.ry.resize(n);
  ws.kx.resize(m);
  ws.ky.resize(n);
  const int64_t* rows = ws.rows.data();
  const int64_t* cols = ws.cols.data();
  float* Cc = ws.Cc.data();
  float* Q = ws.Q.data();
  wra_inv_norms(xb, sx, rows, m, D, eps, ws.rx.data(), ws.kx.data());
  wra_inv_norms(yb, sy, cols, n, D, eps, ws.ry.data(), ws.ky.data());
  wra_cost_block(xb, sx, rows, m, yb, sy, cols, n, D, ws.rx.data(), ws.ry.data(), Cc, L);
  exp_block(Cc, ws.A.data(), m, n, L, beta);
  std::copy(ws.A.begin(), ws.A.begin() + m * L, Q);
  ipot_block(ws.A.data(), Q, ws.delta.data(), ws.sigma.data(), ws.tmp.data(), m, n, L,
             iteration, k);
  *dist = static_cast<float>(trace_block(Cc, Q, m, L));
  if (P == nullptr) return;
  // backward quantities: P = T r_x r_y^T; p_x = k_x r_x^2 sum_j T cos; p_y likewise
  std::fill(ws.tmp.begin(), ws.tmp.begin() + L, 0.0f);   // sum_i T_ij cos_ij per column
  for (int64_t i = 0; i < m; ++i) {
    const float* t = Q + i * L;
    const float* c = Cc + i * L;
    float* prow = P + rows[i] * N;
    const float rxi = ws.rx[i];
    double sx_i = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const float tc = t[j] * (1.0f - c[j]);
      sx_i += tc;
      ws.tmp[j] += tc;
      prow[cols[j]] = (t[j] * rxi) * ws.ry[j];
    }
    px[rows[i]] = ws.kx[i] * rxi * rxi * static_cast<float>(sx_i);
  }
  for (int64_t j = 0; j < n; ++j) py[cols[j]] = ws.ky[j] * ws.ry[j] * ws.ry[j] * ws.tmp[j];
}

// out_i = g (p_i a_i - sum_j W_ij b_j) for the `count` real rows of `a`
// (row idx[i] at abase + idx[i] * sa, written to obase + idx[i] * so), W_ij =
// Wc[i * ldw + j] over the nb real rows of b (at bbase + bidx[j] * sb): a GEMM
// in outer-product form.  For each slice of D (CV vectors) the nb rows of b are
// first packed into a contiguous panel (L1-resident), then every block of RI
// rows accumulates RI x CV vectors in registers over j.
template <int RI, int CV>
UF_INL void wra_axpy_tile(const float* const* a, float* const* o, const float* Wc, int64_t ldw,
                          const float* panel, int64_t nb, const float* p, float g, int64_t d0) {
  constexpr int64_t W = CV * kLanes;
  vf acc[RI][CV];
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) acc[r][c] = vf{};
  for (int64_t j = 0; j < nb; ++j) {
    const float* bj = panel + j * W;
    vf bv[CV];
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) bv[c] = ld(bj + c * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r) {
      const vf w = splat(Wc[r * ldw + j]);
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) acc[r][c] += w * bv[c];
    }
  }
  const vf gv = splat(g);
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r) {
    const vf pr = splat(p[r]);
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) {
      const int64_t d = d0 + c * kLanes;
      st(o[r] + d, gv * (pr * ld(a[r] + d) - acc[r][c]));
    }
  }
}

#ifndef UF_WRA_AXPY_ROWS
#if UF_LANES == 16
#define UF_WRA_AXPY_ROWS 4
#define UF_WRA_AXPY_VECS 4
#else
#define UF_WRA_AXPY_ROWS 4
#define UF_WRA_AXPY_VECS 3
#endif
#endif
constexpr int kAxpyRows = UF_WRA_AXPY_ROWS, kAxpyVecs = UF_WRA_AXPY_VECS;

template <int RI, int CV>
UF_INL void wra_axpy_rows(const float* abase, int64_t sa, float* obase, int64_t so,
                          const int64_t* idx, int64_t i0, const float* Wc, int64_t ldw,
                          const float* panel, int64_t nb, const float* p, float g, int64_t d0) {
  const float* a[RI];
  float* o[RI];
  for (int r = 0; r < RI; ++r) {
    a[r] = abase + idx[i0 + r] * sa;
    o[r] = obase + idx[i0 + r] * so;
  }
  wra_axpy_tile<RI, CV>(a, o, Wc + i0 * ldw, ldw, panel, nb, p + i0, g, d0);
}

template <int CV>
UF_INL void wra_axpy_slice(const float* abase, int64_t sa, float* obase, int64_t so,
                           const int64_t* idx, int64_t count, const float* Wc, int64_t ldw,
                           const float* bbase, int64_t sb, const int64_t* bidx, int64_t nb,
                           const float* p, float g, int64_t d0, float* panel) {
  constexpr int64_t W = CV * kLanes;
  for (int64_t j = 0; j < nb; ++j) std::copy_n(bbase + bidx[j] * sb + d0, W, panel + j * W);
  int64_t i0 = 0;
  for (; i0 + kAxpyRows <= count; i0 += kAxpyRows)
    wra_axpy_rows<kAxpyRows, CV>(abase, sa, obase, so, idx, i0, Wc, ldw, panel, nb, p, g, d0);
  for (; i0 < count; ++i0)
    wra_axpy_rows<1, CV>(abase, sa, obase, so, idx, i0, Wc, ldw, panel, nb, p, g, d0);
}

// `panel`: room for nb * kAxpyVecs * kLanes floats.
void wra_axpy_block(const float* abase, int64_t sa, float* obase, int64_t so, const int64_t* idx,
                    int64_t count, const float* Wc, int64_t ldw, const float* bbase, int64_t sb,
                    const int64_t* bidx, int64_t nb, const float* p, float g, int64_t D,
                    float* panel) {
  constexpr int64_t chunk = kAxpyVecs * kLanes;
  int64_t d0 = 0;
  for (; d0 + chunk <= D; d0 += chunk)
    wra_axpy_slice<kAxpyVecs>(abase, sa, obase, so, idx, count, Wc, ldw, bbase, sb, bidx, nb, p,
                              g, d0, panel);
  for (; d0 + kLanes <= D; d0 += kLanes)
    wra_axpy_slice<1>(abase, sa, obase, so, idx, count, Wc, ldw, bbase, sb, bidx, nb, p, g, d0,
                      panel);
  for (; d0 < D; ++d0) {  // scalar tail of D
    for (int64_t i = 0; i < count; ++i) {
      const float* w = Wc + i * ldw;
      float s = 0.0f;
      for (int64_t j = 0; j < nb; ++j) s += w[j] * bbase[bidx[j] * sb + d0];
      obase[idx[i] * so + d0] = g * (p[i] * abase[idx[i] * sa + d0] - s);
    }
  }
}

// One example backward: dx [M, D] / dy [N, D] (contiguous rows; either may be
// nullptr) from g = d loss / d dist and the forward's P [M, N], px [M], py [N].
void wra_backward_example(float g, const float* xb, int64_t sx, const float* yb, int64_t sy,
                          const bool* tpad, int64_t stp, const bool* ipad, int64_t sip,
                          int64_t M, int64_t N, int64_t D, const float* P, const float* px,
                          const float* py, float* dx, float* dy, Workspace& ws) {
  ws.rows.clear();
  ws.cols.clear();
  for (int64_t i = 0; i < M; ++i)
    if (!tpad[i * stp]) ws.rows.push_back(i);
  for (int64_t j = 0; j < N; ++j)
    if (!ipad[j * sip]) ws.cols.push_back(j);
  const int64_t m = static_cast<int64_t>(ws.rows.size());
  const int64_t n = static_cast<int64_t>(ws.cols.size());
  // padded rows get zero gradient (real rows are written once, below)
  const bool empty = m == 0 || n == 0;
  if (dx)
    for (int64_t i = 0; i < M; ++i)
      if (empty || tpad[i * stp]) std::fill(dx + i * D, dx + (i + 1) * D, 0.0f);
  if (dy)
    for (int64_t j = 0; j < N; ++j)
      if (empty || ipad[j * sip]) std::fill(dy + j * D, dy + (j + 1) * D, 0.0f);
  if (empty) return;
  const int64_t* rows = ws.rows.data();
  const int64_t* cols = ws.cols.data();
  // compact W = P on the real block (m x n) and its transpose (n x m)
  ws.Cc.resize(m * n);
  ws.A.resize(n * m);
  ws.rx.resize(m);
  ws.ry.resize(n);
  for (int64_t i = 0; i < m; ++i) {
    const float* prow = P + rows[i] * N;
    for (int64_t j = 0; j < n; ++j) {
      const float w = prow[cols[j]];
      ws.Cc[i * n + j] = w;
      ws.A[j * m + i] = w;
    }
    ws.rx[i] = px[rows[i]];
  }
  for (int64_t j = 0; j < n; ++j) ws.ry[j] = py[cols[j]];
  ws.Q.resize(std::max(m, n) * kAxpyVecs * kLanes);   // the packed panel
  if (dx)
    wra_axpy_block(xb, sx, dx, D, rows, m, ws.Cc.data(), n, yb, sy, cols, n, ws.rx.data(), g, D,
                   ws.Q.data());
  if (dy)
    wra_axpy_block(yb, sy, dy, D, cols, n, ws.A.data(), m, xb, sx, rows, m, ws.ry.data(), g, D,
                   ws.Q.data());
}
