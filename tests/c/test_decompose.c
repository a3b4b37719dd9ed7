/*
 * The decompositions (fct_svd, fct_randomized_svd, fct_cp_als,
 * fct_tucker_hooi, fct_tensor_train) on planted low-rank inputs in float64
 * and float32, with row-major, transposed and gapped (non-foldable) strides;
 * every call gets exactly the workspace its query returned (so ASan sees
 * any overrun). Then determinism, zero inputs, and bad arguments with their
 * status codes and messages.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "test_util.h"

static void* g_ws;
static size_t g_ws_bytes;

/* Exactly `bytes` of workspace (a fresh allocation, so that ASan catches a
 * single byte beyond the query). */
static void set_ws(fct_context* c, size_t bytes) {
  free(g_ws);
  g_ws = bytes ? aligned_alloc(256, (bytes + 255) / 256 * 256) : NULL;
  g_ws_bytes = bytes;
  c->workspace = g_ws;
  c->workspace_bytes = bytes;
}

static uint64_t g_state = 12345;
static double gauss(void) { /* Box-Muller on splitmix64 */
  double u[2];
  for (int i = 0; i < 2; ++i) {
    uint64_t z = (g_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    u[i] = ((double)(z >> 11) + 0.5) / 9007199254740992.0;
  }
  return sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]);
}

static double* gauss_array(int64_t n) {
  double* a = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
  for (int64_t i = 0; i < n; ++i) a[i] = gauss();
  return a;
}

/* Writes dense row-major values into t (any strides) in row-major order. */
static void fill(test_tensor* t, const double* v) {
  int64_t n = tb_numel(t), idx[8] = {0};
  int nd = t->dl.ndim;
  for (int64_t e = 0; e < n; ++e) {
    int64_t rem = e;
    for (int d = nd - 1; d >= 0; --d) {
      idx[d] = rem % t->shape[d];
      rem /= t->shape[d];
    }
    tb_set(t, idx, v[e]);
  }
}

static double frob(const double* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i] * v[i];
  return sqrt(s);
}

static double rel_diff(const double* a, const double* b, int64_t n) {
  double d = 0;
  for (int64_t i = 0; i < n; ++i) d += (a[i] - b[i]) * (a[i] - b[i]);
  double nb = frob(b, n);
  return nb > 0 ? sqrt(d) / nb : sqrt(d);
}

static bool has(const char* needle) { return strstr(test_err, needle) != NULL; }

/* ------------------------------------------------------------------------- */
/* SVD                                                                        */
/* ------------------------------------------------------------------------- */

/* A [m, n] of rank `rank` plus `noise`, decaying spectrum: Σ_j 2^-j u_j v_jᵀ. */
static double* planted_matrix(int64_t m, int64_t n, int64_t rank, double noise) {
  double* A = calloc((size_t)(m * n), sizeof(double));
  double* u = gauss_array(m * rank);
  double* v = gauss_array(n * rank);
  for (int64_t j = 0; j < rank; ++j)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < n; ++c) A[i * n + c] += pow(0.5, (double)j) * u[i * rank + j] * v[c * rank + j];
  for (int64_t e = 0; e < m * n; ++e) A[e] += noise * gauss();
  free(u);
  free(v);
  return A;
}

/* U·diag(S)·Vh as dense [m, n]. */
static double* svd_product(const test_tensor* U, const test_tensor* S, const test_tensor* Vh,
                           int64_t m, int64_t n, int64_t r) {
  double* B = calloc((size_t)(m * n), sizeof(double));
  for (int64_t j = 0; j < r; ++j) {
    double s = tb_get2(S, 0, j);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < n; ++c) B[i * n + c] += tb_get2(U, i, j) * s * tb_get2(Vh, j, c);
  }
  return B;
}

/* max |QᵀQ − I| for Q [rows, cols] (or its transpose when rows_are_vectors). */
static double orth_defect(const test_tensor* Q, int64_t rows, int64_t cols, bool rows_are_vectors) {
  int64_t k = rows_are_vectors ? rows : cols, len = rows_are_vectors ? cols : rows;
  double worst = 0;
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; b < k; ++b) {
      double s = 0;
      for (int64_t i = 0; i < len; ++i)
        s += rows_are_vectors ? tb_get2(Q, a, i) * tb_get2(Q, b, i)
                              : tb_get2(Q, i, a) * tb_get2(Q, i, b);
      double d = fabs(s - (a == b));
      worst = d > worst ? d : worst;
    }
  return worst;
}

typedef struct svd_out {
  test_tensor *U, *S, *Vh;
  fct_decomp_info info;
  fct_status st;
} svd_out;

static svd_out run_svd(const test_tensor* A, int64_t r, int64_t s, bool randomized,
                       const fct_rsvd_options* o) {
  int bits = A->dl.dtype.bits;
  int64_t m = A->shape[0], n = A->shape[1];
  int64_t us[2] = {m, r}, ss[1] = {s}, vs[2] = {r, n};
  svd_out out = {tb_output(bits, 2, us), tb_output(bits, 1, ss), tb_output(bits, 2, vs),
                 {0, 0, 0}, FCT_OK};
  fct_context c = test_ctx(0);
  size_t bytes = 0;
  out.st = randomized ? fct_randomized_svd_workspace(&c, &A->dl, &out.U->dl, &out.S->dl,
                                                     &out.Vh->dl, o, &bytes)
                      : fct_svd_workspace(&c, &A->dl, &out.U->dl, &out.S->dl, &out.Vh->dl,
                                          &bytes);
  if (out.st != FCT_OK) return out;
  set_ws(&c, bytes);
  out.st = randomized
               ? fct_randomized_svd(&c, &A->dl, &out.U->dl, &out.S->dl, &out.Vh->dl, o, &out.info)
               : fct_svd(&c, &A->dl, &out.U->dl, &out.S->dl, &out.Vh->dl, &out.info);
  return out;
}

static void free_svd(svd_out* o) {
  tb_free(o->U);
  tb_free(o->S);
  tb_free(o->Vh);
}

static void test_svd(int bits, int64_t m, int64_t n, int64_t r, const int* order, int64_t gap) {
  char label[128];
  snprintf(label, sizeof label, "svd f%d [%lld, %lld] r=%lld order=%s gap=%lld", bits,
           (long long)m, (long long)n, (long long)r, order ? "T" : "-", (long long)gap);
  int64_t shape[2] = {m, n}, q = m < n ? m : n;
  double* Ad = planted_matrix(m, n, q, 0.0);
  test_tensor* A = tb_new(bits, 2, shape, order, gap);
  fill(A, Ad);
  for (int64_t e = 0; e < m * n; ++e) Ad[e] = tb_get2(A, e / n, e % n); /* as rounded */
  svd_out full = run_svd(A, q, q, false, NULL);
  svd_out o = run_svd(A, r, q, false, NULL);
  CHECK(o.st == FCT_OK && full.st == FCT_OK, "%s: %s", label, test_err);
  if (o.st == FCT_OK && full.st == FCT_OK) {
    double tol = bits == 64 ? 1e-12 : 1e-5;
    /* Eckart–Young: the error is the tail of the singular values. */
    double tail = 0, tot = 0;
    for (int64_t j = 0; j < q; ++j) {
      double s = tb_get2(full.S, 0, j);
      tot += s * s;
      if (j >= r) tail += s * s;
      if (j > 0) CHECK(s <= tb_get2(full.S, 0, j - 1) * (1 + 1e-12), "%s: S not descending", label);
    }
    double want = sqrt(tail / tot);
    /* (float32: the reference S was rounded to float32) */
    CHECK(fabs(o.info.rel_error - want) <= (bits == 64 ? 1e-12 : 1e-6), "%s: rel_error %.15g, tail %.15g", label,
          o.info.rel_error, want);
    double* B = svd_product(o.U, o.S, o.Vh, m, n, r);
    double got = rel_diff(B, Ad, m * n);
    CHECK(fabs(got - want) <= tol * 10 + 1e-12, "%s: ||A − USVh|| / ||A|| = %.15g, want %.15g",
          label, got, want);
    CHECK(orth_defect(o.U, m, r, false) <= tol * 10, "%s: U not orthonormal", label);
    CHECK(orth_defect(o.Vh, r, n, true) <= tol * 10, "%s: Vh not orthonormal", label);
    /* The sign convention: each column's largest entry is positive. */
    for (int64_t j = 0; j < r; ++j) {
      double big = 0, val = 0;
      for (int64_t i = 0; i < m; ++i)
        if (fabs(tb_get2(o.U, i, j)) > big) big = fabs(tb_get2(o.U, i, j)), val = tb_get2(o.U, i, j);
      CHECK(val > 0, "%s: column %lld of U has a negative largest entry", label, (long long)j);
    }
    free(B);
  }
  free_svd(&o);
  free_svd(&full);
  tb_free(A);
  free(Ad);
}

static void test_randomized_svd(int bits, int64_t m, int64_t n, int64_t r, const int* order,
                                int64_t gap) {
  char label[128];
  snprintf(label, sizeof label, "rsvd f%d [%lld, %lld] r=%lld order=%s gap=%lld", bits,
           (long long)m, (long long)n, (long long)r, order ? "T" : "-", (long long)gap);
  int64_t shape[2] = {m, n};
  double* Ad = planted_matrix(m, n, r, 0.0); /* exactly rank r */
  test_tensor* A = tb_new(bits, 2, shape, order, gap);
  fill(A, Ad);
  for (int64_t e = 0; e < m * n; ++e) Ad[e] = tb_get2(A, e / n, e % n);
  fct_rsvd_options o = {5, 2, 0, 42};
  svd_out a = run_svd(A, r, r, true, &o);
  svd_out b = run_svd(A, r, r, true, &o);
  CHECK(a.st == FCT_OK && b.st == FCT_OK, "%s: %s", label, test_err);
  if (a.st == FCT_OK && b.st == FCT_OK) {
    double* B = svd_product(a.U, a.S, a.Vh, m, n, r);
    double got = rel_diff(B, Ad, m * n), tol = bits == 64 ? 1e-10 : 3e-5;
    CHECK(got <= tol, "%s: a rank-%lld matrix recovered to %.3g", label, (long long)r, got);
    CHECK(a.info.rel_error <= (bits == 64 ? 1e-7 : 1e-2), "%s: reported error %.3g", label,
          a.info.rel_error);
    size_t ub = (size_t)(m * r) * (size_t)(bits / 8), vb = (size_t)(r * n) * (size_t)(bits / 8);
    CHECK(!memcmp(a.U->buf, b.U->buf, ub) && !memcmp(a.Vh->buf, b.Vh->buf, vb),
          "%s: the same seed gave different factors", label);
    CHECK(orth_defect(a.U, m, r, false) <= (bits == 64 ? 1e-12 : 1e-5), "%s: U not orthonormal",
          label);
    free(B);
  }
  free_svd(&a);
  free_svd(&b);
  tb_free(A);
  free(Ad);
}

/* Randomized SVD of a matrix with a slowly decaying spectrum is close to
 * the truncated SVD: within 2 % of the optimal error with p = 10, q = 2. */
static void test_randomized_near_optimal(void) {
  int64_t m = 120, n = 80, r = 10, shape[2] = {m, n};
  double* Ad = calloc((size_t)(m * n), sizeof(double));
  double* u = gauss_array(m * n);
  for (int64_t e = 0; e < m * n; ++e) Ad[e] = u[e] / (1.0 + (double)(e % n) * 0.3);
  test_tensor* A = tb_new(64, 2, shape, NULL, 0);
  fill(A, Ad);
  fct_rsvd_options o = {10, 2, 0, 7};
  svd_out rs = run_svd(A, r, r, true, &o);
  svd_out ex = run_svd(A, r, r, false, NULL);
  CHECK(rs.st == FCT_OK && ex.st == FCT_OK, "rsvd near optimal: %s", test_err);
  double* B = svd_product(rs.U, rs.S, rs.Vh, m, n, r);
  double got = rel_diff(B, Ad, m * n);
  CHECK(got <= ex.info.rel_error * 1.02, "rsvd: error %.6f vs optimal %.6f", got,
        ex.info.rel_error);
  CHECK(fabs(rs.info.rel_error - got) <= 1e-7, "rsvd: reported error %.9f, true %.9f",
        rs.info.rel_error, got);
  free(B);
  free(u);
  free(Ad);
  free_svd(&rs);
  free_svd(&ex);
  tb_free(A);
}

/* ------------------------------------------------------------------------- */
/* CP                                                                         */
/* ------------------------------------------------------------------------- */

typedef struct cp_out {
  test_tensor* F[8];
  test_tensor* w;
  double errors[600];
  fct_decomp_info info;
  fct_status st;
} cp_out;

static cp_out run_cp(const test_tensor* X, int64_t R, fct_cp_options o) {
  cp_out out;
  memset(&out, 0, sizeof out);
  int N = X->dl.ndim, bits = X->dl.dtype.bits;
  DLTensor* fp[8];
  for (int k = 0; k < N; ++k) {
    int64_t s[2] = {X->shape[k], R};
    out.F[k] = tb_output(bits, 2, s);
    fp[k] = &out.F[k]->dl;
  }
  int64_t ws[1] = {R};
  out.w = tb_output(bits, 1, ws);
  fct_context c = test_ctx(0);
  size_t bytes = 0;
  out.st = fct_cp_als_workspace(&c, &X->dl, N, (const DLTensor* const*)fp, &out.w->dl, &o, &bytes);
  if (out.st != FCT_OK) return out;
  set_ws(&c, bytes);
  out.st = fct_cp_als(&c, &X->dl, N, fp, &out.w->dl, &o, out.errors, &out.info);
  return out;
}

static void free_cp(cp_out* o, int N) {
  for (int k = 0; k < N; ++k) tb_free(o->F[k]);
  tb_free(o->w);
}

/* Dense [[w; F]] of a 3-mode model. */
static double* cp_full(const cp_out* o, const int64_t* I, int64_t R) {
  double* X = calloc((size_t)(I[0] * I[1] * I[2]), sizeof(double));
  for (int64_t r = 0; r < R; ++r) {
    double w = tb_get2(o->w, 0, r);
    for (int64_t i = 0; i < I[0]; ++i)
      for (int64_t j = 0; j < I[1]; ++j)
        for (int64_t k = 0; k < I[2]; ++k)
          X[(i * I[1] + j) * I[2] + k] +=
              w * tb_get2(o->F[0], i, r) * tb_get2(o->F[1], j, r) * tb_get2(o->F[2], k, r);
  }
  return X;
}

static double* planted_cp(const int64_t* I, int64_t R) {
  double* f[3];
  for (int k = 0; k < 3; ++k) f[k] = gauss_array(I[k] * R);
  double* X = calloc((size_t)(I[0] * I[1] * I[2]), sizeof(double));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < I[0]; ++i)
      for (int64_t j = 0; j < I[1]; ++j)
        for (int64_t k = 0; k < I[2]; ++k)
          X[(i * I[1] + j) * I[2] + k] += f[0][i * R + r] * f[1][j * R + r] * f[2][k * R + r];
  for (int k = 0; k < 3; ++k) free(f[k]);
  return X;
}

static void test_cp(int bits, const int* order, int64_t gap, int init) {
  char label[96];
  snprintf(label, sizeof label, "cp f%d order=%s gap=%lld init=%d", bits, order ? "P" : "-",
           (long long)gap, init);
  int64_t I[3] = {6, 7, 8}, R = 3;
  double* Xd = planted_cp(I, R);
  test_tensor* X = tb_new(bits, 3, I, order, gap);
  fill(X, Xd);
  fct_cp_options o = {500, init, 1e-13, 0.0, 3, 1, 0};
  cp_out a = run_cp(X, R, o);
  CHECK(a.st == FCT_OK, "%s: %s", label, test_err);
  if (a.st == FCT_OK) {
    double* Y = cp_full(&a, I, R);
    double e = rel_diff(Y, Xd, I[0] * I[1] * I[2]);
    CHECK(e <= (bits == 64 ? 1e-6 : 1e-4), "%s: planted rank-3 recovered to %.3g (%d sweeps)",
          label, e, a.info.n_iter);
    CHECK(fabs(e - a.info.rel_error) <= (bits == 64 ? 1e-7 : 1e-3), "%s: reported %.3g, true %.3g",
          label, a.info.rel_error, e);
    for (int k = 0; k < 3; ++k)
      for (int64_t r = 0; r < R; ++r) {
        double s = 0;
        for (int64_t i = 0; i < I[k]; ++i) s += tb_get2(a.F[k], i, r) * tb_get2(a.F[k], i, r);
        CHECK(fabs(s - 1) <= 1e-6, "%s: factor %d column %lld has norm² %.9f", label, k,
              (long long)r, s);
      }
    /* ALS never increases the error (up to rounding of the norm formula). */
    for (int i = 1; i < a.info.n_iter; ++i)
      CHECK(a.errors[i] <= a.errors[i - 1] + 1e-7, "%s: error rose at sweep %d", label, i);
    free(Y);
  }
  free_cp(&a, 3);
  tb_free(X);
  free(Xd);
}

static void test_cp_options(void) {
  int64_t I[3] = {5, 6, 7}, R = 4;
  double* Xd = gauss_array(I[0] * I[1] * I[2]); /* no low-rank structure */
  test_tensor* X = tb_new(64, 3, I, NULL, 0);
  fill(X, Xd);
  /* tol: stops at the first sweep whose change is below tol. */
  fct_cp_options o = {200, FCT_INIT_SVD, 1e-3, 0.0, 1, 1, 0};
  cp_out a = run_cp(X, R, o);
  CHECK(a.st == FCT_OK && a.info.converged && a.info.n_iter < 200, "cp tol: %d sweeps (%s)",
        a.info.n_iter, test_err);
  int n = a.info.n_iter;
  if (n >= 2) {
    CHECK(fabs(a.errors[n - 2] - a.errors[n - 1]) < 1e-3, "cp tol: last change too big");
    for (int i = 1; i < n - 1; ++i)
      CHECK(fabs(a.errors[i - 1] - a.errors[i]) >= 1e-3, "cp tol: should have stopped at %d", i);
  }
  CHECK(a.info.rel_error == a.errors[n - 1], "cp: rel_error is the last of errors");
  /* n_iter_max: exactly that many sweeps with tol 0. */
  fct_cp_options o2 = {7, FCT_INIT_RANDOM, 0.0, 0.0, 1, 1, 0};
  cp_out b = run_cp(X, R, o2);
  CHECK(b.st == FCT_OK && b.info.n_iter == 7 && !b.info.converged, "cp n_iter_max: %d",
        b.info.n_iter);
  /* Same seed, same bits; random init differs from svd init. */
  cp_out c = run_cp(X, R, o2);
  CHECK(!memcmp(b.F[1]->buf, c.F[1]->buf, (size_t)(I[1] * R * 8)) &&
            !memcmp(b.w->buf, c.w->buf, (size_t)(R * 8)),
        "cp: the same seed gave different factors");
  /* l2_reg shrinks the model. */
  fct_cp_options o3 = {30, FCT_INIT_SVD, 0.0, 50.0, 1, 1, 0};
  fct_cp_options o4 = {30, FCT_INIT_SVD, 0.0, 0.0, 1, 1, 0};
  cp_out d = run_cp(X, R, o3), e = run_cp(X, R, o4);
  double nd = 0, ne = 0;
  for (int64_t r = 0; r < R; ++r) nd += fabs(tb_get2(d.w, 0, r)), ne += fabs(tb_get2(e.w, 0, r));
  CHECK(d.st == FCT_OK && nd < ne, "cp l2_reg: weights %.4f not below unregularised %.4f", nd, ne);
  /* normalize_factors = 0: weights 1, the same tensor. */
  fct_cp_options o5 = o4;
  o5.normalize_factors = 0;
  cp_out f = run_cp(X, R, o5);
  double* Y1 = cp_full(&e, I, R);
  double* Y2 = cp_full(&f, I, R);
  CHECK(f.st == FCT_OK && tb_get2(f.w, 0, 0) == 1.0 && rel_diff(Y2, Y1, I[0] * I[1] * I[2]) < 1e-12,
        "cp normalize_factors=0: different model");
  /* A rank above what the tensor holds (rank-2 tensor, R = 4): singular
   * normal equations, finite factors. */
  int64_t J[3] = {4, 4, 4};
  double* Zd = planted_cp(J, 2);
  test_tensor* Z = tb_new(64, 3, J, NULL, 0);
  fill(Z, Zd);
  cp_out g = run_cp(Z, 4, o4);
  bool finite = g.st == FCT_OK;
  for (int k = 0; k < 3 && finite; ++k)
    for (int64_t e2 = 0; e2 < 16; ++e2) finite = isfinite(((double*)g.F[k]->buf)[e2]);
  CHECK(finite && g.info.rel_error < 1e-6, "cp rank-deficient: st %d err %.3g (%s)", g.st,
        g.info.rel_error, test_err);
  free(Y1);
  free(Y2);
  free_cp(&a, 3); free_cp(&b, 3); free_cp(&c, 3); free_cp(&d, 3); free_cp(&e, 3);
  free_cp(&f, 3); free_cp(&g, 3);
  tb_free(X);
  tb_free(Z);
  free(Xd);
  free(Zd);
}

/* ------------------------------------------------------------------------- */
/* Tucker                                                                     */
/* ------------------------------------------------------------------------- */

typedef struct tk_out {
  test_tensor *core, *F[8];
  double errors[200];
  fct_decomp_info info;
  fct_status st;
} tk_out;

static tk_out run_tucker(const test_tensor* X, const int64_t* R, fct_tucker_options o) {
  tk_out out;
  memset(&out, 0, sizeof out);
  int N = X->dl.ndim, bits = X->dl.dtype.bits;
  DLTensor* fp[8];
  for (int k = 0; k < N; ++k) {
    int64_t s[2] = {X->shape[k], R[k]};
    out.F[k] = tb_output(bits, 2, s);
    fp[k] = &out.F[k]->dl;
  }
  out.core = tb_output(bits, N, R);
  fct_context c = test_ctx(0);
  size_t bytes = 0;
  out.st = fct_tucker_hooi_workspace(&c, &X->dl, &out.core->dl, N, (const DLTensor* const*)fp, &o,
                                     &bytes);
  if (out.st != FCT_OK) return out;
  set_ws(&c, bytes);
  out.st = fct_tucker_hooi(&c, &X->dl, &out.core->dl, N, fp, &o, out.errors, &out.info);
  return out;
}

static void free_tk(tk_out* o, int N) {
  for (int k = 0; k < N; ++k) tb_free(o->F[k]);
  tb_free(o->core);
}

/* core ×_0 U0 ×_1 U1 ×_2 U2 for 3 modes (dense doubles from test tensors,
 * or from raw arrays when given). */
static double* tucker_full(const double* core, double* const* U, const int64_t* I,
                           const int64_t* R) {
  double* X = calloc((size_t)(I[0] * I[1] * I[2]), sizeof(double));
  for (int64_t i = 0; i < I[0]; ++i)
    for (int64_t j = 0; j < I[1]; ++j)
      for (int64_t k = 0; k < I[2]; ++k) {
        double s = 0;
        for (int64_t a = 0; a < R[0]; ++a)
          for (int64_t b = 0; b < R[1]; ++b)
            for (int64_t c = 0; c < R[2]; ++c)
              s += core[(a * R[1] + b) * R[2] + c] * U[0][i * R[0] + a] * U[1][j * R[1] + b] *
                   U[2][k * R[2] + c];
        X[(i * I[1] + j) * I[2] + k] = s;
      }
  return X;
}

static double* dense_of(const test_tensor* t) {
  int64_t n = tb_numel(t);
  double* d = malloc((size_t)n * sizeof(double));
  /* tb_get2 folds to [rows, cols]: the last dim is the columns */
  int64_t cols = t->shape[t->dl.ndim - 1];
  for (int64_t e = 0; e < n; ++e) d[e] = tb_get2(t, e / cols, e % cols);
  return d;
}

static void test_tucker(int bits, const int* order, int64_t gap, int64_t I0) {
  char label[96];
  snprintf(label, sizeof label, "tucker f%d order=%s gap=%lld I0=%lld", bits, order ? "P" : "-",
           (long long)gap, (long long)I0);
  int64_t I[3] = {I0, 7, 8}, R[3] = {2, 3, 4};
  double* core = gauss_array(R[0] * R[1] * R[2]);
  double* U[3];
  for (int k = 0; k < 3; ++k) U[k] = gauss_array(I[k] * R[k]); /* not orthonormal: fine */
  double* Xd = tucker_full(core, U, I, R);
  test_tensor* X = tb_new(bits, 3, I, order, gap);
  fill(X, Xd);
  fct_tucker_options o = {50, FCT_INIT_SVD, 1e-12, 0};
  tk_out a = run_tucker(X, R, o);
  CHECK(a.st == FCT_OK, "%s: %s", label, test_err);
  if (a.st == FCT_OK) {
    double* cd = dense_of(a.core);
    double* Ud[3];
    for (int k = 0; k < 3; ++k) Ud[k] = dense_of(a.F[k]);
    double* Y = tucker_full(cd, Ud, I, R);
    double e = rel_diff(Y, Xd, I[0] * I[1] * I[2]);
    CHECK(e <= (bits == 64 ? 1e-6 : 1e-4), "%s: planted recovered to %.3g", label, e);
    for (int k = 0; k < 3; ++k)
      CHECK(orth_defect(a.F[k], I[k], R[k], false) <= (bits == 64 ? 1e-10 : 1e-5),
            "%s: factor %d not orthonormal", label, k);
    free(Y);
    free(cd);
    for (int k = 0; k < 3; ++k) free(Ud[k]);
  }
  free_tk(&a, 3);
  tb_free(X);
  free(Xd);
  free(core);
  for (int k = 0; k < 3; ++k) free(U[k]);
}

static void test_tucker_options(void) {
  int64_t I[3] = {9, 8, 7}, R[3] = {3, 3, 3};
  double* Xd = gauss_array(9 * 8 * 7);
  test_tensor* X = tb_new(64, 3, I, NULL, 0);
  fill(X, Xd);
  fct_tucker_options o = {100, FCT_INIT_RANDOM, 1e-4, 5};
  tk_out a = run_tucker(X, R, o), b = run_tucker(X, R, o);
  CHECK(a.st == FCT_OK && a.info.converged, "tucker tol: not converged (%s)", test_err);
  CHECK(!memcmp(a.core->buf, b.core->buf, 27 * 8), "tucker: the same seed gave different cores");
  for (int i = 1; i < a.info.n_iter; ++i)
    CHECK(a.errors[i] <= a.errors[i - 1] + 1e-7, "tucker: error rose at sweep %d", i);
  /* HOOI never ends above the HOSVD it starts from. */
  fct_tucker_options h = {0, FCT_INIT_SVD, 0, 0};
  tk_out c = run_tucker(X, R, h);
  CHECK(c.st == FCT_OK && c.info.n_iter == 0 && a.info.rel_error <= c.info.rel_error + 1e-9,
        "tucker: HOOI %.6f above HOSVD %.6f", a.info.rel_error, c.info.rel_error);
  /* Full ranks: exact. */
  int64_t F[3] = {9, 8, 7};
  fct_tucker_options o2 = {3, FCT_INIT_SVD, 0, 0};
  tk_out d = run_tucker(X, F, o2);
  CHECK(d.st == FCT_OK && d.info.rel_error < 1e-7, "tucker full rank: error %.3g",
        d.info.rel_error);
  /* A mode larger than the rest (I_0 = 30 > 2·2): the other Gram side. */
  free_tk(&a, 3); free_tk(&b, 3); free_tk(&c, 3); free_tk(&d, 3);
  tb_free(X);
  free(Xd);
}

/* ------------------------------------------------------------------------- */
/* Tensor train                                                               */
/* ------------------------------------------------------------------------- */

typedef struct tt_out {
  test_tensor* cores;
  int64_t ranks[16];
  fct_decomp_info info;
  fct_status st;
} tt_out;

static tt_out run_tt(const test_tensor* X, int N, const int64_t* sizes, const int64_t* caps,
                     double eps) {
  tt_out out;
  memset(&out, 0, sizeof out);
  fct_context c = test_ctx(0);
  int64_t cap = 0;
  out.st = fct_tensor_train_capacity(&c, &X->dl, N, sizes, caps, &cap);
  if (out.st != FCT_OK) return out;
  int64_t cs[1] = {cap};
  out.cores = tb_output(X->dl.dtype.bits, 1, cs);
  size_t bytes = 0;
  out.st = fct_tensor_train_workspace(&c, &X->dl, N, sizes, caps, eps, &out.cores->dl, &bytes);
  if (out.st != FCT_OK) return out;
  set_ws(&c, bytes);
  out.st = fct_tensor_train(&c, &X->dl, N, sizes, caps, eps, &out.cores->dl, out.ranks,
                            &out.info);
  return out;
}

/* Dense tensor of the TT cores in out (modes of sizes n[0..N)). */
static double* tt_full(const tt_out* o, int N, const int64_t* n) {
  const double* base = NULL;
  double* tmp = NULL;
  if (o->cores->dl.dtype.bits == 32) {
    int64_t cnt = o->cores->shape[0];
    tmp = malloc((size_t)cnt * sizeof(double));
    for (int64_t e = 0; e < cnt; ++e) tmp[e] = ((float*)o->cores->buf)[e];
    base = tmp;
  } else {
    base = (const double*)o->cores->buf;
  }
  /* acc [P, r] with P the product of the modes so far */
  int64_t P = 1, r = 1;
  double* acc = malloc(sizeof(double));
  acc[0] = 1;
  const double* core = base;
  for (int k = 0; k < N; ++k) {
    int64_t rn = o->ranks[k + 1];
    double* nxt = calloc((size_t)(P * n[k] * rn), sizeof(double));
    for (int64_t p = 0; p < P; ++p)
      for (int64_t a = 0; a < r; ++a)
        for (int64_t i = 0; i < n[k]; ++i)
          for (int64_t b = 0; b < rn; ++b)
            nxt[(p * n[k] + i) * rn + b] += acc[p * r + a] * core[(a * n[k] + i) * rn + b];
    core += r * n[k] * rn;
    free(acc);
    acc = nxt;
    P *= n[k];
    r = rn;
  }
  free(tmp);
  return acc;
}

static void test_tt(int bits, const int* order, int64_t gap) {
  char label[96];
  snprintf(label, sizeof label, "tt f%d order=%s gap=%lld", bits, order ? "P" : "-",
           (long long)gap);
  /* A planted TT with ranks (1, 2, 3, 2, 1) on a 4x5x6x3 tensor. */
  int64_t n[4] = {4, 5, 6, 3}, rk[5] = {1, 2, 3, 2, 1};
  tt_out planted;
  memset(&planted, 0, sizeof planted);
  int64_t tot = 0;
  for (int k = 0; k < 4; ++k) tot += rk[k] * n[k] * rk[k + 1];
  int64_t cs[1] = {tot};
  planted.cores = tb_output(64, 1, cs);
  double* g = gauss_array(tot);
  memcpy(planted.cores->buf, g, (size_t)tot * sizeof(double));
  memcpy(planted.ranks, rk, sizeof rk);
  double* Xd = tt_full(&planted, 4, n);
  test_tensor* X = tb_new(bits, 4, n, order, gap);
  fill(X, Xd);
  int64_t numel = 4 * 5 * 6 * 3;
  tt_out a = run_tt(X, 4, NULL, NULL, bits == 64 ? 1e-10 : 1e-5);
  CHECK(a.st == FCT_OK, "%s: %s", label, test_err);
  if (a.st == FCT_OK) {
    for (int k = 0; k <= 4; ++k)
      CHECK(a.ranks[k] == rk[k], "%s: rank %d = %lld, planted %lld", label, k,
            (long long)a.ranks[k], (long long)rk[k]);
    double* Y = tt_full(&a, 4, n);
    double e = rel_diff(Y, Xd, numel);
    CHECK(e <= (bits == 64 ? 1e-10 : 1e-5), "%s: planted recovered to %.3g", label, e);
    free(Y);
  }
  /* Caps and eps on a tensor with no TT structure. */
  double* Rd = gauss_array(numel);
  fill(X, Rd);
  for (int64_t e = 0; e < numel; ++e) Rd[e] = tb_get2(X, e / 3, e % 3);
  int64_t caps[5] = {1, 2, 2, 2, 1};
  tt_out b = run_tt(X, 4, NULL, caps, 0.0);
  CHECK(b.st == FCT_OK && b.ranks[1] == 2 && b.ranks[2] == 2 && b.ranks[3] == 2,
        "%s: caps not applied (%s)", label, test_err);
  if (b.st == FCT_OK) {
    double* Y = tt_full(&b, 4, n);
    double e = rel_diff(Y, Rd, numel);
    CHECK(fabs(e - b.info.rel_error) <= (bits == 64 ? 1e-10 : 1e-5),
          "%s: reported error %.12f, true %.12f", label, b.info.rel_error, e);
    free(Y);
  }
  for (int i = 0; i < 3; ++i) {
    double eps = (double[]){0.05, 0.3, 0.6}[i];
    tt_out c = run_tt(X, 4, NULL, NULL, eps);
    CHECK(c.st == FCT_OK, "%s eps %.2f: %s", label, eps, test_err);
    if (c.st == FCT_OK) {
      double* Y = tt_full(&c, 4, n);
      double e = rel_diff(Y, Rd, numel);
      CHECK(e <= eps * (1 + 1e-9) && fabs(e - c.info.rel_error) <= 1e-5,
            "%s: eps %.2f gave error %.4f (reported %.4f)", label, eps, e, c.info.rel_error);
      free(Y);
    }
    tb_free(c.cores);
  }
  /* Merged modes (a TT-matrix's layout): 4x5x6x3 read as 20 x 18. */
  int64_t merged[2] = {20, 18};
  tt_out d = run_tt(X, 2, merged, NULL, 0.0);
  CHECK(d.st == FCT_OK && d.ranks[1] == 18 && d.info.rel_error < 1e-6,
        "%s: merged modes: rank %lld err %.3g (%s)", label, (long long)d.ranks[1],
        d.info.rel_error, test_err);
  tb_free(d.cores);
  tb_free(a.cores);
  tb_free(b.cores);
  tb_free(planted.cores);
  tb_free(X);
  free(g);
  free(Xd);
  free(Rd);
}

/* ------------------------------------------------------------------------- */
/* Zero input, NaN, bad arguments                                             */
/* ------------------------------------------------------------------------- */

/* ------------------------------------------------------------------------- */
/* The algorithms' GPU path, on the CPU                                       */
/* ------------------------------------------------------------------------- */

static bool same_tensor(const test_tensor* a, const test_tensor* b) {
  return tb_numel(a) == tb_numel(b) &&
         memcmp(a->dl.data, b->dl.data, (size_t)tb_numel(a) * (a->dl.dtype.bits / 8)) == 0;
}

/* FACTORCH_TEST_DEVICE_PATH=1 runs CP, Tucker and TT on a CPU engine that
 * claims separate memory: CP's host buffers come from malloc and its
 * Khatri-Rao products and partial contractions go through to_device and
 * to_host, TT reads its singular values through to_host, as on a GPU. The
 * arithmetic is the CPU's, so the results must be the same bits. */
static void test_device_path(void) {
  int64_t s3[3] = {5, 9, 4};
  int P[3] = {2, 0, 1};
  for (int bits = 32; bits <= 64; bits += 32) {
    test_tensor* X = tb_new(bits, 3, s3, P, 1); /* strided: loaded, not read in place */
    double* v = gauss_array(5 * 9 * 4);
    fill(X, v);
    free(v);
    fct_cp_options co = {15, FCT_INIT_SVD, 0, 0.01, 4, 1, 0};
    int64_t R[3] = {3, 2, 4};
    fct_tucker_options to = {3, FCT_INIT_SVD, 0, 0};
    int64_t caps[4] = {1, 3, 2, 1};
    for (int init = FCT_INIT_SVD; init <= FCT_INIT_RANDOM; ++init) {
      co.init = to.init = init;
      cp_out c0 = run_cp(X, 6, co); /* rank 6 > I_2: the small-mode start */
      tk_out t0 = run_tucker(X, R, to);
      tt_out v0 = run_tt(X, 3, NULL, caps, 0.0);
      setenv("FACTORCH_TEST_DEVICE_PATH", "1", 1);
      cp_out c1 = run_cp(X, 6, co);
      tk_out t1 = run_tucker(X, R, to);
      tt_out v1 = run_tt(X, 3, NULL, caps, 0.0);
      unsetenv("FACTORCH_TEST_DEVICE_PATH");
      CHECK(c0.st == FCT_OK && c1.st == FCT_OK && t0.st == FCT_OK && t1.st == FCT_OK &&
                v0.st == FCT_OK && v1.st == FCT_OK,
            "device path f%d init %d: %d %d %d %d %d %d (%s)", bits, init, c0.st, c1.st, t0.st,
            t1.st, v0.st, v1.st, test_err);
      if (c1.st == FCT_OK && c0.st == FCT_OK) {
        bool same = same_tensor(c0.w, c1.w) && c0.info.rel_error == c1.info.rel_error &&
                    c0.info.n_iter == c1.info.n_iter;
        for (int n = 0; n < 3; ++n) same = same && same_tensor(c0.F[n], c1.F[n]);
        CHECK(same, "cp device path f%d init %d: results differ (%.17g vs %.17g)", bits, init,
              c0.info.rel_error, c1.info.rel_error);
      }
      if (t1.st == FCT_OK && t0.st == FCT_OK) {
        bool same = same_tensor(t0.core, t1.core) && t0.info.rel_error == t1.info.rel_error;
        for (int n = 0; n < 3; ++n) same = same && same_tensor(t0.F[n], t1.F[n]);
        CHECK(same, "tucker device path f%d init %d: results differ", bits, init);
      }
      if (v1.st == FCT_OK && v0.st == FCT_OK)
        CHECK(same_tensor(v0.cores, v1.cores) && v0.info.rel_error == v1.info.rel_error &&
                  memcmp(v0.ranks, v1.ranks, sizeof v0.ranks) == 0,
              "tt device path f%d: results differ", bits);
      free_cp(&c0, 3);
      free_cp(&c1, 3);
      free_tk(&t0, 3);
      free_tk(&t1, 3);
      tb_free(v0.cores);
      tb_free(v1.cores);
    }
    tb_free(X);
  }
}

static void test_zero_inputs(void) {
  int64_t s2[2] = {6, 4}, s3[3] = {3, 4, 5};
  test_tensor* A = tb_new(64, 2, s2, NULL, 0);
  memset(A->buf, 0, 25 * 8);
  svd_out o = run_svd(A, 2, 2, false, NULL);
  CHECK(o.st == FCT_OK && o.info.rel_error == 0 && tb_get2(o.S, 0, 0) == 0, "svd zero: %s", test_err);
  fct_rsvd_options ro = {3, 1, 0, 1};
  svd_out p = run_svd(A, 2, 2, true, &ro);
  CHECK(p.st == FCT_OK && p.info.rel_error == 0 && tb_get2(p.S, 0, 0) == 0, "rsvd zero: %s", test_err);
  test_tensor* X = tb_new(64, 3, s3, NULL, 0);
  memset(X->buf, 0, 61 * 8);
  fct_cp_options co = {10, FCT_INIT_SVD, 1e-8, 0, 0, 1, 0};
  cp_out c = run_cp(X, 2, co);
  CHECK(c.st == FCT_OK && c.info.rel_error == 0 && tb_get2(c.w, 0, 0) == 0, "cp zero: %s", test_err);
  int64_t R[3] = {2, 2, 2};
  fct_tucker_options to = {5, FCT_INIT_SVD, 1e-8, 0};
  tk_out t = run_tucker(X, R, to);
  CHECK(t.st == FCT_OK && t.info.rel_error == 0 && orth_defect(t.F[1], 4, 2, false) < 1e-12,
        "tucker zero: %s", test_err);
  tt_out tt = run_tt(X, 3, NULL, NULL, 0.1);
  CHECK(tt.st == FCT_OK && tt.ranks[1] == 1 && tt.info.rel_error == 0, "tt zero: %s", test_err);
  free_svd(&o);
  free_svd(&p);
  free_cp(&c, 3);
  free_tk(&t, 3);
  tb_free(tt.cores);
  tb_free(A);
  tb_free(X);
}

static void expect(fct_status st, fct_status want, const char* needle, const char* what) {
  CHECK(st == want && has(needle), "%s: status %d (want %d), message '%s' lacks '%s'", what, st,
        want, test_err, needle);
}

static void test_bad_arguments(void) {
  int64_t s2[2] = {6, 4}, s3[3] = {3, 4, 5};
  test_tensor* A = tb_new(64, 2, s2, NULL, 0);
  svd_out o = run_svd(A, 5, 5, false, NULL);
  expect(o.st, FCT_ERR_INVALID_VALUE, "rank: expected 1 <= rank <= min(m, n) = 4", "svd rank 5");
  free_svd(&o);
  fct_rsvd_options ro = {-1, 1, 0, 1};
  o = run_svd(A, 2, 2, true, &ro);
  expect(o.st, FCT_ERR_INVALID_VALUE, "n_oversamples", "rsvd p < 0");
  free_svd(&o);
  ((double*)A->buf)[7] = NAN;
  o = run_svd(A, 2, 2, false, NULL);
  expect(o.st, FCT_ERR_NOT_FINITE, "A: holds 1 NaN/Inf", "svd NaN");
  free_svd(&o);
  ro.n_oversamples = 2;
  ((double*)A->buf)[7] = INFINITY;
  o = run_svd(A, 2, 2, true, &ro);
  expect(o.st, FCT_ERR_NOT_FINITE, "A: holds 1 NaN/Inf", "rsvd Inf");
  free_svd(&o);
  ((double*)A->buf)[7] = 0.5;
  /* S longer than min(m, n); a workspace one byte short. */
  o = run_svd(A, 2, 5, false, NULL);
  expect(o.st, FCT_ERR_SHAPE, "S: expected shape [s]", "svd S too long");
  free_svd(&o);
  {
    int64_t us[2] = {6, 2}, ss[1] = {2}, vs[2] = {2, 4};
    test_tensor *U = tb_output(64, 2, us), *S = tb_output(64, 1, ss), *V = tb_output(64, 2, vs);
    fct_context c = test_ctx(0);
    size_t bytes = 0;
    fct_svd_workspace(&c, &A->dl, &U->dl, &S->dl, &V->dl, &bytes);
    set_ws(&c, bytes);
    c.workspace_bytes = bytes - 1;
    expect(fct_svd(&c, &A->dl, &U->dl, &S->dl, &V->dl, NULL), FCT_ERR_WORKSPACE, "workspace",
           "svd small workspace");
    /* an output overlapping the input */
    c = test_ctx(0);
    DLTensor alias = U->dl;
    alias.data = A->buf;
    alias.strides = NULL;
    expect(fct_svd(&c, &A->dl, &alias, &S->dl, &V->dl, NULL), FCT_ERR_LAYOUT, "U:",
           "svd U overlaps A");
    /* a non-contiguous output */
    DLTensor strided = U->dl;
    int64_t st[2] = {1, 6};
    strided.strides = st;
    expect(fct_svd(&c, &A->dl, &strided, &S->dl, &V->dl, NULL), FCT_ERR_LAYOUT, "U: expected a dense",
           "svd strided U");
    /* integer input */
    DLTensor ints = A->dl;
    ints.dtype = (DLDataType){kDLInt, 32, 1};
    expect(fct_svd(&c, &ints, &U->dl, &S->dl, &V->dl, NULL), FCT_ERR_DTYPE,
           "A: expected dtype", "svd int32");
    /* a cuda matrix while the CUDA backend is not loaded */
    DLTensor cu = A->dl, cuU = U->dl, cuS = S->dl, cuV = V->dl;
    cu.device = cuU.device = cuS.device = cuV.device = (DLDevice){kDLCUDA, 0};
    expect(fct_svd(&c, &cu, &cuU, &cuS, &cuV, NULL), FCT_ERR_UNSUPPORTED, "A: is a cuda tensor",
           "svd cuda without backend");
    tb_free(U); tb_free(S); tb_free(V);
  }
  test_tensor* X = tb_new(64, 3, s3, NULL, 0);
  fct_cp_options co = {10, FCT_INIT_SVD, -1, 0, 0, 1, 0};
  cp_out c = run_cp(X, 2, co);
  expect(c.st, FCT_ERR_INVALID_VALUE, "tol:", "cp tol < 0");
  free_cp(&c, 3);
  co.tol = 0;
  co.init = 7;
  c = run_cp(X, 2, co);
  expect(c.st, FCT_ERR_INVALID_VALUE, "init:", "cp init 7");
  free_cp(&c, 3);
  co.init = FCT_INIT_SVD;
  ((double*)X->buf)[3] = NAN;
  c = run_cp(X, 2, co);
  expect(c.st, FCT_ERR_NOT_FINITE, "tensor: holds 1 NaN/Inf", "cp NaN");
  free_cp(&c, 3);
  {
    /* cuda tensors while the CUDA backend is not loaded (this test links
     * libfactorch only) */
    int64_t fs[3][2] = {{3, 2}, {4, 2}, {5, 2}}, ws[1] = {2};
    test_tensor *F[3], *W = tb_output(64, 1, ws);
    DLTensor cu = X->dl, cf[3], cw = W->dl;
    DLTensor* fp[3];
    cu.device = cw.device = (DLDevice){kDLCUDA, 0};
    for (int n = 0; n < 3; ++n) {
      F[n] = tb_output(64, 2, fs[n]);
      cf[n] = F[n]->dl;
      cf[n].device = cu.device;
      fp[n] = &cf[n];
    }
    fct_context cc = test_ctx(0);
    size_t bytes;
    expect(fct_cp_als_workspace(&cc, &cu, 3, (const DLTensor* const*)fp, &cw, &co, &bytes),
           FCT_ERR_UNSUPPORTED, "tensor: is a cuda tensor, but factorch's CUDA backend is not "
           "loaded", "cp cuda without backend");
    for (int n = 0; n < 3; ++n) tb_free(F[n]);
    tb_free(W);
  }
  {
    /* An empty tensor whose other dims multiply past int64 (tests/fuzz):
     * refused before CP's split multiplies them (signed overflow before). */
    int64_t es[3] = {0, 2147483647, 2147483647}, fs[3][2] = {{0, 2}, {2147483647, 2},
                                                             {2147483647, 2}};
    DLTensor E = X->dl, cf[3], cw = X->dl;
    E.shape = es;
    E.strides = NULL;
    int64_t ws[1] = {2};
    cw.shape = ws;
    cw.ndim = 1;
    cw.strides = NULL;
    DLTensor* fp[3];
    for (int n = 0; n < 3; ++n) {
      cf[n] = X->dl;
      cf[n].ndim = 2;
      cf[n].shape = fs[n];
      cf[n].strides = NULL;
      fp[n] = &cf[n];
    }
    fct_context cc = test_ctx(0);
    size_t bytes;
    expect(fct_cp_als_workspace(&cc, &E, 3, (const DLTensor* const*)fp, &cw, &co, &bytes),
           FCT_ERR_OVERFLOW, "tensor: the product of the nonzero dims", "cp empty huge tensor");
  }
  int64_t R[3] = {2, 5, 2};
  fct_tucker_options to = {5, FCT_INIT_SVD, 1e-8, 0};
  tk_out t = run_tucker(X, R, to);
  expect(t.st, FCT_ERR_INVALID_VALUE, "rank[1]: expected 1 <= rank <= 4", "tucker rank too big");
  free_tk(&t, 3);
  ((double*)X->buf)[3] = 1;
  int64_t caps[4] = {2, 2, 2, 1};
  tt_out tt = run_tt(X, 3, NULL, caps, 0);
  expect(tt.st, FCT_ERR_INVALID_VALUE, "first and last TT ranks to be 1", "tt caps ends");
  int64_t sizes[2] = {7, 9};
  tt = run_tt(X, 2, sizes, NULL, 0);
  expect(tt.st, FCT_ERR_SHAPE, "mode_sizes: their product", "tt mode sizes");
  tt = run_tt(X, 3, NULL, NULL, -0.5);
  expect(tt.st, FCT_ERR_INVALID_VALUE, "eps:", "tt eps < 0");
  tb_free(tt.cores);
  tb_free(A);
  tb_free(X);
}

/* ------------------------------------------------------------------------- */
/* OpenBLAS's threads in the long LAPACK calls                               */
/* ------------------------------------------------------------------------- */

/* A stand-in pool that runs every range on the calling thread (no shared
 * state: decompositions run on two threads at once below). */
static int32_t serial_pool(int64_t begin, int64_t end, int64_t grain, fct_parallel_body body,
                           void* arg) {
  (void)grain;
  body(begin, end, arg);
  return 0;
}

static int one_thread(void) { return 1; }
static int two_threads(void) { return 2; }

/* One fct_svd with a workspace and an error buffer of its own. */
typedef struct svd_call {
  const test_tensor* A;
  svd_out out;
  atomic_int done;
} svd_call;

static void* svd_call_run(void* arg) {
  svd_call* c = arg;
  int64_t m = c->A->shape[0], n = c->A->shape[1], r = 40;
  int64_t us[2] = {m, r}, ss[1] = {r}, vs[2] = {r, n};
  c->out.U = tb_output(64, 2, us);
  c->out.S = tb_output(64, 1, ss);
  c->out.Vh = tb_output(64, 2, vs);
  char err[256] = "";
  fct_context ctx = {0};
  ctx.error = err;
  ctx.error_bytes = sizeof err;
  size_t bytes = 0;
  c->out.st = fct_svd_workspace(&ctx, &c->A->dl, &c->out.U->dl, &c->out.S->dl, &c->out.Vh->dl,
                                &bytes);
  void* ws = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  ctx.workspace = ws;
  ctx.workspace_bytes = bytes;
  if (c->out.st == FCT_OK)
    c->out.st = fct_svd(&ctx, &c->A->dl, &c->out.U->dl, &c->out.S->dl, &c->out.Vh->dl, NULL);
  free(ws);
  atomic_store(&c->done, 1);
  return NULL;
}

/* Runs the calls on threads of their own and polls OpenBLAS's thread count
 * (fct_cpu_set_num_threads(0)) until they are done; returns the counts seen
 * (bit c: count c). set_during > 0: asks for that count once a raised one
 * shows. */
static unsigned svd_calls_polled(svd_call* calls, int n, int set_during) {
  pthread_t th[2];
  for (int i = 0; i < n; ++i) {
    atomic_store(&calls[i].done, 0);
    pthread_create(&th[i], NULL, svd_call_run, &calls[i]);
  }
  unsigned seen = 0;
  for (bool all = false; !all;) {
    all = true;
    for (int i = 0; i < n; ++i) all = all && atomic_load(&calls[i].done);
    int now = fct_cpu_set_num_threads(0);
    if (now > 1 && set_during > 0) {
      fct_cpu_set_num_threads(set_during);
      set_during = 0;
    }
    seen |= now >= 0 && now < 32 ? 1u << now : 1u << 31;
    struct timespec ms = {0, 2000000}; /* the poller must not take a core from OpenBLAS */
    nanosleep(&ms, NULL);
  }
  for (int i = 0; i < n; ++i) pthread_join(th[i], NULL);
  return seen;
}

static bool same_svd(const svd_out* a, const svd_out* b) {
  return same_tensor(a->U, b->U) && same_tensor(a->S, b->S) && same_tensor(a->Vh, b->Vh);
}

static double max_abs_diff(const test_tensor* a, const test_tensor* b) {
  double worst = 0;
  const double *x = a->dl.data, *y = b->dl.data;
  for (int64_t e = 0; e < tb_numel(a); ++e) worst = fmax(worst, fabs(x[e] - y[e]));
  return worst;
}

/* Under a host pool OpenBLAS is single-threaded, except in a long LAPACK
 * call, which gets the pool's thread count and sets it back after: seen by
 * polling from another thread. FACTORCH_TEST_LAPACK_THREADS=1 makes the
 * dgesdd of [600, 500] count as long (the real threshold, ~0.6 s of one core,
 * is tested in tests/python/test_decompose.py). The results stay within
 * rounding of the single-threaded ones, and are the same bits for the same
 * count; without the hook this short call is untouched (the same bits as
 * with a pool of one). Two threads decomposing at once share one raise,
 * and a count asked for meanwhile is the one left at the end. */
static void test_lapack_threads(void) {
  int64_t shape[2] = {600, 500};
  test_tensor* A = tb_new(64, 2, shape, NULL, 0);
  double* v = gauss_array(600 * 500);
  fill(A, v);
  free(v);

  setenv("FACTORCH_TEST_LAPACK_THREADS", "1", 1);
  fct_cpu_set_thread_pool(serial_pool, one_thread);
  CHECK(fct_cpu_set_num_threads(0) == 1, "a pool leaves OpenBLAS at %d threads",
        fct_cpu_set_num_threads(0));
  svd_call ref = {A, {0}, 0};
  unsigned seen = svd_calls_polled(&ref, 1, 0);
  CHECK(seen == 1u << 1, "lapack threads: a pool of one raised the count (seen 0x%x)", seen);

  fct_cpu_set_thread_pool(serial_pool, two_threads);
  svd_call one = {A, {0}, 0}, two[2] = {{A, {0}, 0}, {A, {0}, 0}}, plain = {A, {0}, 0};
  seen = svd_calls_polled(&one, 1, 0);
  CHECK((seen & 1u << 2) && !(seen & ~(1u << 1 | 1u << 2)),
        "lapack threads: OpenBLAS ran dgesdd on 0x%x threads (bits), want 2", seen);
  CHECK(fct_cpu_set_num_threads(0) == 1, "lapack threads: %d threads left after the call",
        fct_cpu_set_num_threads(0));
  unsetenv("FACTORCH_TEST_LAPACK_THREADS");
  svd_call_run(&plain);
  CHECK(ref.out.st == FCT_OK && one.out.st == FCT_OK && plain.out.st == FCT_OK,
        "lapack threads: %d %d %d", ref.out.st, one.out.st, plain.out.st);
  if (ref.out.st == FCT_OK && one.out.st == FCT_OK && plain.out.st == FCT_OK) {
    double ds = max_abs_diff(one.out.S, ref.out.S) / tb_get2(ref.out.S, 0, 0);
    double du = max_abs_diff(one.out.U, ref.out.U), dv = max_abs_diff(one.out.Vh, ref.out.Vh);
    CHECK(ds <= 1e-13 && du <= 1e-9 && dv <= 1e-9,
          "lapack threads: 2 threads vs 1: S %.3g (relative), U %.3g, Vh %.3g", ds, du, dv);
    CHECK(same_svd(&plain.out, &ref.out),
          "lapack threads: a short svd changed with the pool's thread count");
  }

  setenv("FACTORCH_TEST_LAPACK_THREADS", "1", 1);
  /* (3 shows once both are done) */
  seen = svd_calls_polled(two, 2, 3);
  CHECK((seen & 1u << 2) && !(seen & ~(1u << 1 | 1u << 2 | 1u << 3)),
        "lapack threads: two svds at once ran on 0x%x threads (bits), want 2", seen);
  CHECK(fct_cpu_set_num_threads(0) == 3,
        "lapack threads: %d threads left after a count of 3 was asked for during the calls",
        fct_cpu_set_num_threads(0));
  for (int i = 0; i < 2; ++i)
    CHECK(two[i].out.st == FCT_OK && one.out.st == FCT_OK && same_svd(&two[i].out, &one.out),
          "lapack threads: svd %d of two at once differs from one alone", i);
  unsetenv("FACTORCH_TEST_LAPACK_THREADS");

  fct_cpu_set_thread_pool(NULL, NULL);
  svd_out* outs[] = {&ref.out, &one.out, &plain.out, &two[0].out, &two[1].out};
  for (size_t i = 0; i < sizeof outs / sizeof outs[0]; ++i) free_svd(outs[i]);
  tb_free(A);
}

int main(void) {
  int T[2] = {1, 0};
  for (int bits = 32; bits <= 64; bits += 32) {
    test_svd(bits, 9, 6, 3, NULL, 0);
    test_svd(bits, 6, 9, 6, NULL, 0);  /* full rank of a wide matrix */
    test_svd(bits, 7, 7, 1, T, 0);     /* column-major */
    test_svd(bits, 8, 5, 2, NULL, 3);  /* gapped rows */
    test_randomized_svd(bits, 40, 30, 4, NULL, 0);
    test_randomized_svd(bits, 25, 50, 3, T, 0);
    test_randomized_svd(bits, 30, 20, 5, NULL, 2); /* not BLAS-readable: packed */
    int P[3] = {2, 0, 1};
    test_cp(bits, NULL, 0, FCT_INIT_SVD);
    test_cp(bits, P, 1, FCT_INIT_SVD);
    test_cp(bits, NULL, 0, FCT_INIT_RANDOM);
    test_tucker(bits, NULL, 0, 6);
    test_tucker(bits, P, 2, 6);
    test_tucker(bits, NULL, 0, 40); /* mode 0 larger than the rest of the core */
    test_tt(bits, NULL, 0);
    int Q[4] = {3, 1, 0, 2};
    test_tt(bits, Q, 1);
  }
  test_randomized_near_optimal();
  test_cp_options();
  test_tucker_options();
  test_device_path();
  test_zero_inputs();
  test_bad_arguments();
  test_lapack_threads(); /* last: it leaves OpenBLAS single-threaded */
  free(g_ws);
  return test_report();
}
