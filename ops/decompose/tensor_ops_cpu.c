/* Tensor contractions of CP-ALS and Tucker-HOOI (see tensor_ops_cpu.h). */
#include "tensor_ops_cpu.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cpu/gemm_cpu.h"
#include "rng.h"

/* Below this many multiply-adds a whole batch of products runs on the
 * calling thread: waking the pool (an OpenMP team under torch, whose idle
 * threads spin) costs more than it saves, and was measured to make a HOOI
 * sweep of a 24³ tensor 30x slower. */
#define SMALL_WORK (double)(1 << 20)

/* col [T] = A_lo[:, r] ⊗ ... ⊗ A_{hi-1}[:, r] (mode lo varies slowest, as in
 * X's row-major order), T = Π I_m; hi > lo. Expanded in place from the last
 * mode outwards: block i of the longer vector is a[i] times the shorter
 * one, written from the last block down so that block 0, which overlaps
 * the source, is scaled last. */
static void kron_col(const fct_dims* d, int lo, int hi, const double* const* A, int64_t r,
                     double* col) {
  int64_t len = d->dim[hi - 1];
  memcpy(col, A[hi - 1] + r * len, (size_t)len * sizeof(double));
  for (int m = hi - 2; m >= lo; --m) {
    const double* a = A[m] + r * d->dim[m];
    for (int64_t i = d->dim[m] - 1; i >= 0; --i) {
      double s = a[i];
      double* dst = col + i * len;
      for (int64_t j = 0; j < len; ++j) dst[j] = s * col[j];
    }
    len *= d->dim[m];
  }
}

int fct_cp_split(const fct_dims* d) {
  if (d->N < 2) return 1;
  int best = 1;
  int64_t best_max = INT64_MAX, left = 1, total = fct_dims_numel(d);
  for (int h = 1; h < d->N; ++h) {
    left *= d->dim[h - 1];
    int64_t right = total / (left > 0 ? left : 1);
    int64_t mx = left > right ? left : right;
    if (mx < best_max) best_max = mx, best = h;
  }
  return best;
}

void fct_cp_group_dims(const fct_dims* d, int h, int group, fct_dims* sub) {
  int lo = group ? h : 0, hi = group ? d->N : h;
  sub->N = hi - lo;
  for (int m = lo; m < hi; ++m) sub->dim[m - lo] = d->dim[m];
}

void fct_cp_kr(const fct_dims* d, int h, int group, const double* const* A, int64_t R,
               double* KR) {
  int lo = group ? h : 0, hi = group ? d->N : h;
  int64_t T = 1;
  for (int m = lo; m < hi; ++m) T *= d->dim[m];
  for (int64_t r = 0; r < R; ++r) kron_col(d, lo, hi, A, r, KR + r * T);
}

void fct_mttkrp_half(const double* P, const fct_dims* sub, int n, const double* const* A,
                     int64_t R, double* M, double* scratch) {
  int64_t L, Rt, In = sub->dim[n], T = fct_dims_numel(sub);
  fct_dims_split(sub, n, &L, &Rt);
  double* kl = scratch;
  double* kr = kl + T;
  double* w = kr + T;
  for (int64_t r = 0; r < R; ++r) {
    const double* Pr = P + r * T; /* row-major [L, I_n, Rt] */
    double* Mr = M + r * In;
    /* By whether modes follow / precede n, not by Rt, L > 1: modes of size
     * 1 still scale by their factors' entries (±1 once normalised), and
     * skipping them flipped signs (tests/python/test_fuzz_decompose.py). */
    const double* v = Pr;
    if (n + 1 < sub->N) { /* w [L·I_n] = Pr [L·I_n, Rt]·kr */
      kron_col(sub, n + 1, sub->N, A, r, kr);
      fct_la_gemv(true, Rt, L * In, 1.0, Pr, Rt, kr, 1, 0.0, w, 1);
      v = w;
    }
    if (n > 0) { /* M[:, r] = v [L, I_n]ᵀ·kl */
      kron_col(sub, 0, n, A, r, kl);
      fct_la_gemv(false, In, L, 1.0, v, In, kl, 1, 0.0, Mr, 1);
    } else {
      memcpy(Mr, v, (size_t)In * sizeof(double));
    }
  }
}

void fct_mode_product_t(const double* X, const fct_dims* d, int n, const double* U, int64_t Rn,
                        double* Y) {
  int64_t L, Rt, In = d->dim[n];
  fct_dims_split(d, n, &L, &Rt);
  if (Rt == 1) {
    /* Y [L, Rn] = X [L, I_n]·U, i.e. column-major Yᵀ = Uᵀ·Xᵀ. */
    fct_la_gemm(true, false, Rn, L, In, 1.0, U, In, X, In, 0.0, Y, Rn);
    return;
  }
  if (L == 1 || (double)L * Rt * Rn * In < SMALL_WORK) {
    /* one GEMM, or slabs too small to be worth waking the thread pool:
     * column-major Y_lᵀ [Rt, Rn] = X_lᵀ [Rt, I_n]·U */
    for (int64_t l = 0; l < L; ++l)
      fct_la_gemm(false, false, Rt, Rn, In, 1.0, X + l * In * Rt, Rt, U, In, 0.0,
                  Y + l * Rn * Rt, Rt);
    return;
  }
  /* Slabs, row-major: Y_l [Rn, Rt] = Uᵀ [Rn, I_n]·X_l [I_n, Rt]; small
   * ones spread over the thread pool one per task. */
  fct_mat Ut = {(char*)U, Rn, In, In, 1};
  fct_mat Xl = {(char*)X, In, Rt, Rt, 1};
  fct_mat Yl = {(char*)Y, Rn, Rt, Rt, 1};
  fct_cpu_gemm_batched(FCT_F64, &Ut, &Xl, &Yl, 0.0, L, 0, In * Rt, Rn * Rt);
}

/* G [I_n, I_n] = Y_(n)·Y_(n)ᵀ = Σ_l Y_lᵀ·Y_l over slabs Y_l [I_n, Rt]. */
static void mode_gram(const double* Y, const fct_dims* d, int n, double* G) {
  int64_t L, Rt, In = d->dim[n];
  fct_dims_split(d, n, &L, &Rt);
  if (Rt == 1) {
    fct_la_syrk(false, In, L, 1.0, Y, In, 0.0, G, In);
    return;
  }
  if (L == 1 || (double)L * Rt * In * In < SMALL_WORK) {
    for (int64_t l = 0; l < L; ++l)
      fct_la_syrk(true, In, Rt, 1.0, Y + l * In * Rt, Rt, l ? 1.0 : 0.0, G, In);
    return;
  }
  /* G = Σ_l Y_l·Y_lᵀ (row-major slabs): a deterministic pooled reduction. */
  fct_mat A = {(char*)Y, In, Rt, Rt, 1};
  fct_mat B = {(char*)Y, Rt, In, 1, Rt};
  fct_mat C = {(char*)G, In, In, In, 1};
  fct_cpu_gemm_reduce(FCT_F64, &A, &B, &C, 0.0, L, In * Rt, In * Rt);
}

static int64_t ints_as_doubles(int64_t n) { return (n + 1) / 2 + 1; }

int64_t fct_top_left_sv_scratch(const fct_dims* d, int n, int64_t k) {
  int64_t In = d->dim[n], P = fct_dims_numel(d) / (In > 0 ? In : 1);
  int64_t lw, liw;
  if (In <= P) {
    fct_la_syevr_lwork(In, k, &lw, &liw);
    return In * In + k + lw + ints_as_doubles(2 * k + liw) + k + fct_la_orth_lwork(In, k);
  }
  int64_t kk = k < P ? k : P;
  fct_la_syevr_lwork(P, kk, &lw, &liw);
  int64_t ow = fct_la_orth_lwork(In, k);
  return (n ? In * P : 0) + P * P + P * kk + kk + lw + ints_as_doubles(2 * kk + liw) + k + ow;
}

int fct_top_left_sv(const double* Y, const fct_dims* d, int n, int64_t k, double* U,
                    double* s2, uint64_t seed, uint64_t stream, double* scratch) {
  int64_t In = d->dim[n], P = fct_dims_numel(d) / (In > 0 ? In : 1);
  int64_t lw, liw;
  if (In <= P) {
    fct_la_syevr_lwork(In, k, &lw, &liw);
    double* G = scratch;
    double* w = G + In * In;
    double* work = w + k;
    int* iw = (int*)(work + lw);
    mode_gram(Y, d, n, G);
    int info = fct_la_syevr_top(In, k, G, In, w, U, In, iw, work, lw, iw + 2 * k, liw);
    if (info) return info;
    if (s2)
      for (int64_t j = 0; j < k; ++j) s2[j] = w[j] > 0 ? w[j] : 0.0;
    /* dsyevr's inverse iteration (an index range takes dstebz + dstein) was
     * seen to return columns of norm ~1e3 for a cluster of zero eigenvalues
     * (k above the unfolding's rank: tests/python/test_fuzz_decompose.py),
     * with info 0. So UᵀU is checked (In·k² flops, G being free again: a
     * few % of the eigensolver's 4/3·In³) and a U that is not orthonormal is
     * repaired by Householder QR, which keeps the leading good columns and
     * completes them orthonormally: beyond the rank any completion is
     * right. */
    fct_la_syrk(true, k, In, 1.0, U, In, 0.0, G, k);
    double defect = 0;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < k; ++i) {
        double dev = fabs(G[i + j * k] - (i == j ? 1.0 : 0.0));
        defect = dev > defect || isnan(dev) ? dev : defect;
      }
    if (!(defect <= 1e-10)) {
      /* past the ints: see fct_top_left_sv_scratch */
      double* tau = scratch + In * In + k + lw + ints_as_doubles(2 * k + liw);
      fct_la_orth(In, k, U, In, tau, tau + k, fct_la_orth_lwork(In, k));
    }
    return 0;
  }
  /* I_n > P: the unfolding, row-major [I_n, P] (column-major Ycm [P, I_n]). */
  int64_t kk = k < P ? k : P;
  fct_la_syevr_lwork(P, kk, &lw, &liw);
  double* cur = scratch;
  const double* Ycm = Y;
  if (n) {
    int64_t L, Rt;
    fct_dims_split(d, n, &L, &Rt);
    double* Yp = cur;
    cur += In * P;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t i = 0; i < In; ++i)
        memcpy(Yp + i * P + l * Rt, Y + (l * In + i) * Rt, (size_t)Rt * sizeof(double));
    Ycm = Yp;
  }
  double* G = cur;
  double* V = G + P * P;
  double* w = V + P * kk;
  double* work = w + kk;
  int* iw = (int*)(work + lw);
  double* tau = work + lw + ints_as_doubles(2 * kk + liw);
  double* owork = tau + k;
  int64_t olw = fct_la_orth_lwork(In, k);
  fct_la_syrk(false, P, In, 1.0, Ycm, P, 0.0, G, P); /* Y_(n)ᵀ·Y_(n) */
  int info = fct_la_syevr_top(P, kk, G, P, w, V, P, iw, work, lw, iw + 2 * kk, liw);
  if (info) return info;
  fct_la_gemm(true, false, In, kk, P, 1.0, Ycm, P, V, P, 0.0, U, In); /* Y_(n)·V */
  double cut = (w[0] > 0 ? w[0] : 0) * (double)P * DBL_EPSILON;
  for (int64_t j = 0; j < k; ++j) {
    double* col = U + j * In;
    if (j < kk && w[j] > cut) {
      double inv = 1.0 / sqrt(w[j]);
      for (int64_t i = 0; i < In; ++i) col[i] *= inv;
    } else { /* beyond the rank: any direction, made orthogonal below */
      for (int64_t i = 0; i < In; ++i)
        col[i] = fct_rng_normal(seed, stream, (uint64_t)(i + j * In));
    }
    if (s2) s2[j] = j < kk && w[j] > 0 ? w[j] : 0.0;
  }
  fct_la_orth(In, k, U, In, tau, owork, olw);
  return 0;
}
