/* Float64 column-major linear algebra over OpenBLAS + LAPACK (see
 * linalg_cpu.h). */
#include "linalg_cpu.h"

#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/gemm_cpu.h"

static inline int64_t max1(int64_t v) { return v > 1 ? v : 1; }

/* LAPACK's bidiagonal and tridiagonal reductions and its QR panels are
 * sequences of BLAS calls that the host's thread pool cannot split, and
 * under a pool OpenBLAS is single-threaded (gemm_cpu.c): a 4096² SVD ran
 * on one of the cores. So a call of at least LAPACK_THREADS_FLOPS (by the
 * rough counts below; ~0.6 s of one core here: a 1200² SVD) gets OpenBLAS's
 * threads for its duration (fct_cpu_blas_threads_begin). Shorter ones stay
 * on one thread: after a threaded call OpenBLAS's workers spin ~0.1 s,
 * which was measured to slow a loop of small torch matmuls run right after
 * 3x, while a 1024² SVD gained only 0.1 s from a second thread. */
#define LAPACK_THREADS_FLOPS 1.6e10

/* FACTORCH_TEST_LAPACK_THREADS=1 (a test hook) gives every call the
 * threads, so that tests see them on inputs that take milliseconds. */
static int lapack_threads(double flops) {
  if (flops < LAPACK_THREADS_FLOPS) {
    const char* all = getenv("FACTORCH_TEST_LAPACK_THREADS");
    if (!all || strcmp(all, "1") != 0) return 0;
  }
  return fct_cpu_blas_threads_begin();
}

/* geqrf + orgqr of [m, k]: 2·(2·m·k² − 2/3·k³). */
static double orth_flops(int64_t m, int64_t k) {
  return 4.0 * (double)m * (double)k * (double)k - 4.0 / 3.0 * (double)k * (double)k * (double)k;
}

void fct_la_gemm(bool tA, bool tB, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                 double* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) { /* BLAS would do this too, but some builds read A/B anyway */
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) C[i + j * ldc] = beta == 0.0 ? 0.0 : beta * C[i + j * ldc];
    return;
  }
  if (alpha != 1.0) {
    scipy_cblas_dgemm(CblasColMajor, tA ? CblasTrans : CblasNoTrans,
                      tB ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, (blasint)k, alpha, A,
                      (blasint)max1(lda), B, (blasint)max1(ldb), beta, C, (blasint)max1(ldc));
    return;
  }
  /* Column-major C [m, n] is the row-major [n, m] matrix Cᵀ = op(B)ᵀ·op(A)ᵀ;
   * a column-major X [r, c] is the view {X, r, c, 1, ld}. */
  fct_mat a = tA ? (fct_mat){(char*)A, k, m, 1, max1(lda)} : (fct_mat){(char*)A, m, k, 1, max1(lda)};
  fct_mat b = tB ? (fct_mat){(char*)B, n, k, 1, max1(ldb)} : (fct_mat){(char*)B, k, n, 1, max1(ldb)};
  fct_mat opA = tA ? fct_mat_t(a) : a, opB = tB ? fct_mat_t(b) : b;
  fct_mat opAt = fct_mat_t(opA), opBt = fct_mat_t(opB);
  fct_mat c = {(char*)C, n, m, max1(ldc), 1};
  if (c.rows <= 1) c.rs = c.cols > 0 ? c.cols : 1;
  fct_cpu_gemm(FCT_F64, &opBt, &opAt, &c, beta);
}

void fct_la_gemv(bool tA, int64_t m, int64_t n, double alpha, const double* A, int64_t lda,
                 const double* x, int64_t incx, double beta, double* y, int64_t incy) {
  if (m == 0 || n == 0) {
    int64_t len = tA ? n : m;
    for (int64_t i = 0; i < len; ++i) y[i * incy] = beta == 0.0 ? 0.0 : beta * y[i * incy];
    return;
  }
  scipy_cblas_dgemv(CblasColMajor, tA ? CblasTrans : CblasNoTrans, (blasint)m, (blasint)n, alpha,
                    A, (blasint)max1(lda), x, (blasint)incx, beta, y, (blasint)incy);
}

void fct_la_symmetrize(int64_t n, double* C, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = j + 1; i < n; ++i) C[i + j * ldc] = C[j + i * ldc];
}

void fct_la_syrk(bool tA, int64_t n, int64_t k, double alpha, const double* A, int64_t lda,
                 double beta, double* C, int64_t ldc) {
  if (n == 0) return;
  if (k == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < n; ++i) C[i + j * ldc] = beta == 0.0 ? 0.0 : beta * C[i + j * ldc];
    return;
  }
  if (alpha == 1.0 && (double)n * (double)n * (double)k >= (double)(1 << 22)) {
    /* Large: a full GEMM, which the thread pool splits (twice syrk's flops,
     * but spread over every thread rather than one). */
    fct_la_gemm(tA, !tA, n, n, k, 1.0, A, lda, A, lda, beta, C, ldc);
    return;
  }
  scipy_cblas_dsyrk(CblasColMajor, CblasUpper, tA ? CblasTrans : CblasNoTrans, (blasint)n,
                    (blasint)k, alpha, A, (blasint)max1(lda), beta, C, (blasint)max1(ldc));
  fct_la_symmetrize(n, C, ldc);
}

int64_t fct_la_orth_lwork(int64_t m, int64_t k) {
  if (k == 0) return 1;
  double q1 = 0, q2 = 0, a = 0, tau = 0;
  scipy_LAPACKE_dgeqrf_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, &a,
                            (lapack_int)max1(m), &tau, &q1, -1);
  scipy_LAPACKE_dorgqr_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, (lapack_int)k, &a,
                            (lapack_int)max1(m), &tau, &q2, -1);
  int64_t w = (int64_t)(q1 > q2 ? q1 : q2);
  return w > 1 ? w : 1;
}

void fct_la_orth(int64_t m, int64_t k, double* A, int64_t lda, double* tau, double* work,
                 int64_t lwork) {
  if (k == 0 || m == 0) return;
  int begun = lapack_threads(orth_flops(m, k));
  scipy_LAPACKE_dgeqrf_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, A, (lapack_int)lda,
                            tau, work, (lapack_int)lwork);
  scipy_LAPACKE_dorgqr_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, (lapack_int)k, A,
                            (lapack_int)lda, tau, work, (lapack_int)lwork);
  fct_cpu_blas_threads_end(begun);
}

void fct_la_orth_r(int64_t m, int64_t k, double* A, int64_t lda, double* R, double* tau,
                   double* work, int64_t lwork) {
  if (k == 0 || m == 0) return;
  int begun = lapack_threads(orth_flops(m, k));
  scipy_LAPACKE_dgeqrf_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, A, (lapack_int)lda,
                            tau, work, (lapack_int)lwork);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < k; ++i) R[i + j * k] = i <= j && i < m ? A[i + j * lda] : 0.0;
  scipy_LAPACKE_dorgqr_work(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)k, (lapack_int)k, A,
                            (lapack_int)lda, tau, work, (lapack_int)lwork);
  fct_cpu_blas_threads_end(begun);
}

/* B [m, k] = B·R⁻¹, rows split over the thread pool (rows are independent). */
typedef struct trsm_job {
  int64_t m, k, ldr, ldb, step;
  const double* R;
  double* B;
} trsm_job;

static void trsm_rows(int64_t begin, int64_t end, void* arg) {
  const trsm_job* j = arg;
  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t lo = blk * j->step, hi = lo + j->step < j->m ? lo + j->step : j->m;
    if (lo < hi)
      scipy_cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit,
                        (blasint)(hi - lo), (blasint)j->k, 1.0, j->R, (blasint)j->ldr, j->B + lo,
                        (blasint)j->ldb);
  }
}

static void trsm_right_upper(int64_t m, int64_t k, const double* R, int64_t ldr, double* B,
                             int64_t ldb) {
  trsm_job j = {m, k, ldr, ldb, 256, R, B};
  fct_cpu_parallel((m + j.step - 1) / j.step, 1, trsm_rows, &j);
}

/* Blocks of rows of the pooled Gram matrix: fixed, so that the partial sums
 * (added in block order) and hence the bits do not depend on the threads. */
#define GRAM_BLOCKS 8

int64_t fct_la_orth_fast_scratch(int64_t m, int64_t k) {
  return (3 + GRAM_BLOCKS) * k * k + k + fct_la_orth_lwork(m, k);
}

typedef struct gram_job {
  int64_t m, k, ldy;
  const double* Y;
  double* parts; /* GRAM_BLOCKS × [k, k] */
} gram_job;

static void gram_blocks(int64_t begin, int64_t end, void* arg) {
  const gram_job* j = arg;
  for (int64_t b = begin; b < end; ++b) {
    int64_t lo = j->m * b / GRAM_BLOCKS, hi = j->m * (b + 1) / GRAM_BLOCKS;
    double* G = j->parts + b * j->k * j->k;
    if (hi > lo)
      scipy_cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, (blasint)j->k, (blasint)(hi - lo),
                        1.0, j->Y + lo, (blasint)j->ldy, 0.0, G, (blasint)j->k);
    else
      memset(G, 0, (size_t)(j->k * j->k) * sizeof(double));
  }
}

/* G [k, k] (upper triangle) = YᵀY by syrk (half a GEMM's flops): on large
 * inputs, GRAM_BLOCKS row blocks spread over the thread pool. */
static void gram_upper(int64_t m, int64_t k, const double* Y, int64_t ldy, double* G,
                       double* parts) {
  if ((double)m * (double)k * (double)k < (double)(1 << 22)) {
    scipy_cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, (blasint)k, (blasint)m, 1.0, Y,
                      (blasint)max1(ldy), 0.0, G, (blasint)k);
    return;
  }
  gram_job j = {m, k, max1(ldy), Y, parts};
  fct_cpu_parallel(GRAM_BLOCKS, 1, gram_blocks, &j);
  memcpy(G, parts, (size_t)(k * k) * sizeof(double));
  for (int b = 1; b < GRAM_BLOCKS; ++b)
    for (int64_t e = 0; e < k * k; ++e) G[e] += parts[b * k * k + e];
}

/* G [k, k] = YᵀY; returns false when Cholesky of G + shift·I fails, else
 * leaves the factor in G's upper triangle (zeros below). *dev receives
 * max |G − I| before the factorisation: how far Y was from orthonormal. */
static bool gram_chol(int64_t m, int64_t k, const double* Y, int64_t ldy, double* G, bool shift,
                      double* dev, double* parts) {
  gram_upper(m, k, Y, ldy, G, parts);
  double worst = 0, tr = 0;
  for (int64_t j = 0; j < k; ++j) {
    tr += G[j + j * k];
    for (int64_t i = 0; i <= j; ++i) worst = fmax(worst, fabs(G[i + j * k] - (i == j)));
  }
  *dev = worst;
  if (shift) {
    double s = 11.0 * ((double)m * (double)k + (double)k * (double)(k + 1)) * DBL_EPSILON * tr;
    for (int64_t j = 0; j < k; ++j) G[j + j * k] += s;
  }
  if (scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', (lapack_int)k, G, (lapack_int)k) != 0)
    return false;
  for (int64_t j = 0; j < k; ++j) {
    if (!(G[j + j * k] > 0) || !isfinite(G[j + j * k])) return false;
    for (int64_t i = j + 1; i < k; ++i) G[i + j * k] = 0.0;
  }
  return true;
}

/* Round 0 (shifted) brings any Y with cond < ~1/eps to cond < ~1/sqrt(eps);
 * round 1 then leaves it orthonormal to O(eps) when its input was within
 * 1e-2 of orthonormal (the usual case), else round 2 does (CholeskyQR2). */
void fct_la_orth_fast(int64_t m, int64_t k, double* Y, int64_t ldy, double* R, bool basis_only,
                      double* scratch) {
  if (k == 0 || m == 0) return;
  double* G = scratch;
  double* Racc = G + k * k;
  double* T = Racc + k * k;
  double* parts = T + k * k;
  double* tau = parts + GRAM_BLOCKS * k * k;
  double* work = tau + k;
  int64_t lwork = fct_la_orth_lwork(m, k);
  int round = 0, rounds = basis_only ? 1 : 3;
  bool failed = false;
  for (; round < rounds; ++round) {
    double dev;
    if (!gram_chol(m, k, Y, ldy, G, round == 0, &dev, parts)) {
      failed = true;
      break;
    }
    if (round == 1 && dev < 1e-2) rounds = 2;
    trsm_right_upper(m, k, G, k, Y, ldy);
    if (!R) continue;
    if (round == 0) {
      memcpy(Racc, G, (size_t)(k * k) * sizeof(double));
    } else { /* Racc = G·Racc (both upper triangular) */
      scipy_cblas_dtrmm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit,
                        (blasint)k, (blasint)k, 1.0, G, (blasint)k, Racc, (blasint)k);
    }
  }
  if (failed) { /* rank-deficient: Householder on what is left */
    if (R) {
      fct_la_orth_r(m, k, Y, ldy, T, tau, work, lwork);
      if (round == 0) {
        memcpy(Racc, T, (size_t)(k * k) * sizeof(double));
      } else {
        scipy_cblas_dtrmm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit,
                          (blasint)k, (blasint)k, 1.0, T, (blasint)k, Racc, (blasint)k);
      }
    } else {
      fct_la_orth(m, k, Y, ldy, tau, work, lwork);
    }
  }
  if (R) memcpy(R, Racc, (size_t)(k * k) * sizeof(double));
}

int64_t fct_la_eigmin_scratch(int64_t n) {
  if (n == 0) return 1;
  double w = 0, a = 0, ev = 0, z = 0;
  lapack_int iw = 0, found = 0, sup[2];
  scipy_LAPACKE_dsyevr_work(LAPACK_COL_MAJOR, 'N', 'I', 'U', (lapack_int)n, &a,
                            (lapack_int)max1(n), 0.0, 0.0, 1, 1, 0.0, &found, &ev, &z, 1, sup, &w,
                            -1, &iw, -1);
  return (int64_t)w + 1 + n + ((int64_t)iw + 1) / 2 + 2;
}

double fct_la_eigmin(int64_t n, double* A, int64_t lda, double* scratch) {
  if (n == 0) return 0.0;
  double w = 0, a = 0, ev = 0, z = 0;
  lapack_int iw = 0, found = 0, sup[2];
  scipy_LAPACKE_dsyevr_work(LAPACK_COL_MAJOR, 'N', 'I', 'U', (lapack_int)n, &a,
                            (lapack_int)max1(n), 0.0, 0.0, 1, 1, 0.0, &found, &ev, &z, 1, sup, &w,
                            -1, &iw, -1);
  int64_t lw = (int64_t)w + 1, liw = (int64_t)iw + 1;
  double* vals = scratch;
  double* work = vals + n;
  int* iwork = (int*)(work + lw);
  int begun = lapack_threads(4.0 / 3.0 * (double)n * (double)n * (double)n); /* dsytrd */
  lapack_int info = scipy_LAPACKE_dsyevr_work(
      LAPACK_COL_MAJOR, 'N', 'I', 'U', (lapack_int)n, A, (lapack_int)lda, 0.0, 0.0, 1, 1, 0.0,
      &found, vals, &z, 1, sup, work, (lapack_int)lw, iwork, (lapack_int)liw);
  fct_cpu_blas_threads_end(begun);
  return info == 0 && found >= 1 ? vals[0] : 0.0;
}

int64_t fct_la_svdvals_lwork(int64_t n) {
  if (n == 0) return 1;
  double w = 0, a = 0, s = 0, u = 0, vt = 0;
  lapack_int iw = 0;
  scipy_LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'N', (lapack_int)n, (lapack_int)n, &a,
                            (lapack_int)n, &s, &u, 1, &vt, 1, &w, -1, &iw);
  return (int64_t)(w * (1 + 1e-9)) + 1;
}

int fct_la_svdvals(int64_t n, double* A, double* s, double* work, int64_t lwork, int* iwork) {
  if (n == 0) return 0;
  double u = 0, vt = 0;
  int begun = lapack_threads(8.0 / 3.0 * (double)n * (double)n * (double)n); /* dgebrd */
  int info = (int)scipy_LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'N', (lapack_int)n, (lapack_int)n,
                                            A, (lapack_int)n, s, &u, 1, &vt, 1, work,
                                            (lapack_int)lwork, iwork);
  fct_cpu_blas_threads_end(begun);
  return info;
}

void fct_la_mul_upper_right(int64_t m, int64_t k, const double* R, int64_t ldr, double* B,
                            int64_t ldb) {
  if (m == 0 || k == 0) return;
  scipy_cblas_dtrmm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit,
                    (blasint)m, (blasint)k, 1.0, R, (blasint)max1(ldr), B, (blasint)max1(ldb));
}

int64_t fct_la_gesdd_lwork(int64_t m, int64_t n) {
  int64_t q = m < n ? m : n;
  if (q == 0) return 1;
  double w = 0, a = 0, s = 0, u = 0, vt = 0;
  lapack_int iw = 0;
  scipy_LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'S', (lapack_int)m, (lapack_int)n, &a,
                            (lapack_int)max1(m), &s, &u, (lapack_int)max1(m), &vt,
                            (lapack_int)max1(q), &w, -1, &iw);
  /* LAPACK 3.x returns the size as a double, rounded down in some versions:
   * a little slack avoids an off-by-one for large sizes. */
  return (int64_t)(w * (1 + 1e-9)) + 1;
}

int fct_la_gesdd(int64_t m, int64_t n, double* A, int64_t lda, double* s, double* U,
                 int64_t ldu, double* VT, int64_t ldvt, double* work, int64_t lwork, int* iwork) {
  if (m == 0 || n == 0) return 0;
  /* Reduction to bidiagonal form and the products forming U and VT, about
   * 8·p·q² + 2·q³ for q = min(m, n), p = max(m, n): 0.5 s for 1024² here. */
  double q = (double)(m < n ? m : n), p = (double)(m < n ? n : m);
  int begun = lapack_threads(8.0 * p * q * q + 2.0 * q * q * q);
  int info = (int)scipy_LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'S', (lapack_int)m, (lapack_int)n,
                                            A, (lapack_int)lda, s, U, (lapack_int)ldu, VT,
                                            (lapack_int)ldvt, work, (lapack_int)lwork, iwork);
  fct_cpu_blas_threads_end(begun);
  return info;
}

void fct_la_syevr_lwork(int64_t n, int64_t k, int64_t* lwork, int64_t* liwork) {
  if (n == 0 || k == 0) {
    *lwork = *liwork = 1;
    return;
  }
  double w = 0, a = 0, ev = 0, z = 0;
  lapack_int iw = 0, found = 0, sup[2];
  scipy_LAPACKE_dsyevr_work(LAPACK_COL_MAJOR, 'V', 'I', 'U', (lapack_int)n, &a,
                            (lapack_int)max1(n), 0.0, 0.0, (lapack_int)(n - k + 1),
                            (lapack_int)n, 0.0, &found, &ev, &z, (lapack_int)max1(n), sup, &w, -1,
                            &iw, -1);
  *lwork = (int64_t)w + 1;
  *liwork = (int64_t)iw + 1;
}

int fct_la_syevr_top(int64_t n, int64_t k, double* A, int64_t lda, double* w, double* Z,
                     int64_t ldz, int* isuppz, double* work, int64_t lwork, int* iwork,
                     int64_t liwork) {
  if (n == 0 || k == 0) return 0;
  lapack_int found = 0;
  /* dsytrd, then dormtr applying its reflectors to the k eigenvectors. */
  double dn = (double)n;
  int begun = lapack_threads(4.0 / 3.0 * dn * dn * dn + 2.0 * dn * dn * (double)k);
  int info = (int)scipy_LAPACKE_dsyevr_work(
      LAPACK_COL_MAJOR, 'V', 'I', 'U', (lapack_int)n, A, (lapack_int)lda, 0.0, 0.0,
      (lapack_int)(n - k + 1), (lapack_int)n, 0.0, &found, w, Z, (lapack_int)ldz, isuppz, work,
      (lapack_int)lwork, iwork, (lapack_int)liwork);
  fct_cpu_blas_threads_end(begun);
  if (info != 0) return info;
  /* syevr returns them ascending: reverse to descending. */
  for (int64_t a = 0, b = k - 1; a < b; ++a, --b) {
    double t = w[a];
    w[a] = w[b];
    w[b] = t;
    for (int64_t i = 0; i < n; ++i) {
      t = Z[i + a * ldz];
      Z[i + a * ldz] = Z[i + b * ldz];
      Z[i + b * ldz] = t;
    }
  }
  return 0;
}

/* Scratch layout of the solver: Vcopy [R, R], then (fallback only) w [R],
 * Z [R, R], T [m, R], work, isuppz and iwork (ints stored in doubles). */
int64_t fct_la_solve_spd_scratch(int64_t m, int64_t R) {
  int64_t lw, liw;
  fct_la_syevr_lwork(R, R, &lw, &liw);
  return R * R + R + R * R + m * R + lw + (2 * R + liw + 1) / 2 + 2;
}

bool fct_la_solve_spd_right(int64_t m, int64_t R, double* V, int64_t ldv, double* B,
                            int64_t ldb, double* scratch) {
  if (R == 0 || m == 0) return false;
  double* Vc = scratch;
  for (int64_t j = 0; j < R; ++j) memcpy(Vc + j * R, V + j * ldv, (size_t)R * sizeof(double));
  /* V = UᵀU; B·V⁻¹ = B·U⁻¹·U⁻ᵀ: two triangular solves from the right. */
  if (scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', (lapack_int)R, V, (lapack_int)ldv) == 0) {
    bool finite = true;
    for (int64_t j = 0; j < R && finite; ++j) finite = V[j + j * ldv] > 0 && isfinite(V[j + j * ldv]);
    /* A positive definite but badly conditioned V (pivot ratio beyond 1e-7,
     * i.e. condition beyond 1e14) would amplify rounding: use the
     * pseudo-inverse then too. */
    double dmax = 0, dmin = INFINITY;
    for (int64_t j = 0; j < R && finite; ++j) {
      double d = V[j + j * ldv];
      dmax = d > dmax ? d : dmax;
      dmin = d < dmin ? d : dmin;
    }
    if (finite && dmin > dmax * 1e-7) {
      scipy_cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit,
                        (blasint)m, (blasint)R, 1.0, V, (blasint)ldv, B, (blasint)ldb);
      scipy_cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasTrans, CblasNonUnit,
                        (blasint)m, (blasint)R, 1.0, V, (blasint)ldv, B, (blasint)ldb);
      return false;
    }
  }
  /* Pseudo-inverse: V = Z·diag(w)·Zᵀ, B·V⁺ = ((B·Z)·diag(1/w))·Zᵀ. */
  int64_t lw, liw;
  fct_la_syevr_lwork(R, R, &lw, &liw);
  double* w = Vc + R * R;
  double* Z = w + R;
  double* T = Z + R * R;
  double* work = T + m * R;
  int* isuppz = (int*)(work + lw);
  int* iwork = isuppz + 2 * R;
  int info = fct_la_syevr_top(R, R, Vc, R, w, Z, R, isuppz, work, lw, iwork, liw);
  if (info != 0) { /* not expected for a finite symmetric matrix: give zeros */
    for (int64_t j = 0; j < R; ++j) memset(B + j * ldb, 0, (size_t)m * sizeof(double));
    return true;
  }
  double cut = w[0] * (double)R * DBL_EPSILON * 16;
  fct_la_gemm(false, false, m, R, R, 1.0, B, ldb, Z, R, 0.0, T, m);
  for (int64_t j = 0; j < R; ++j) {
    double inv = w[j] > cut && w[j] > 0 ? 1.0 / w[j] : 0.0;
    for (int64_t i = 0; i < m; ++i) T[i + j * m] *= inv;
  }
  fct_la_gemm(false, true, m, R, R, 1.0, T, m, Z, R, 0.0, B, ldb);
  return true;
}
