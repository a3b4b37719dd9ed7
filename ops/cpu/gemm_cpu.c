/* Row-major GEMM/GEMV dispatch over OpenBLAS (scipy-openblas32: symbols carry
 * the scipy_ prefix so they never clash with the BLAS inside torch). */
#include "gemm_cpu.h"

#include <cblas.h>
#include <string.h>

/* How BLAS reads a view: row-major as stored (NoTrans, ld = rs), or a
 * column-major view read as the transpose of a row-major one (ld = cs). */
static void blas_form(const fct_mat* m, enum CBLAS_TRANSPOSE* tr, blasint* ld) {
  if (m->cs == 1 && m->rs >= (m->cols > 1 ? m->cols : 1)) {
    *tr = CblasNoTrans;
    *ld = (blasint)m->rs;
  } else {
    *tr = CblasTrans;
    *ld = (blasint)m->cs;
  }
}

static void zero_rows(fct_dtype dt, const fct_mat* C) {
  size_t es = fct_dtype_bytes(dt);
  for (int64_t i = 0; i < C->rows; ++i) memset(C->data + i * C->rs * es, 0, (size_t)C->cols * es);
}

/* y[len] (stride incy) = beta·y + op(Bmat)·vec, where Bmat is the stored
 * matrix of view B (k x n). want_t: multiply by Bᵀ (result length n). */
static void gemv(fct_dtype dt, const fct_mat* B, bool want_t, const char* vec, blasint incv,
                 char* out, blasint incout, double beta) {
  enum CBLAS_TRANSPOSE tr;
  blasint ld;
  blas_form(B, &tr, &ld);
  /* Stored matrix in row-major terms: [B.rows, B.cols] when NoTrans, else
   * [B.cols, B.rows]. */
  blasint sm = tr == CblasNoTrans ? (blasint)B->rows : (blasint)B->cols;
  blasint sn = tr == CblasNoTrans ? (blasint)B->cols : (blasint)B->rows;
  bool stored_t = tr == CblasTrans;
  enum CBLAS_TRANSPOSE op = (want_t != stored_t) ? CblasTrans : CblasNoTrans;
  if (dt == FCT_F32)
    scipy_cblas_sgemv(CblasRowMajor, op, sm, sn, 1.0f, (const float*)B->data, ld,
                      (const float*)vec, incv, (float)beta, (float*)out, incout);
  else
    scipy_cblas_dgemv(CblasRowMajor, op, sm, sn, 1.0, (const double*)B->data, ld,
                      (const double*)vec, incv, beta, (double*)out, incout);
}

/* C [m, n] = a [m] ⊗ b [n] + beta·C, a = A's column, b = B's row. */
static void outer(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                  double beta) {
  for (int64_t i = 0; i < C->rows; ++i) {
    if (dt == FCT_F32) {
      float a = ((const float*)A->data)[i * A->rs];
      const float* b = (const float*)B->data;
      float* c = (float*)C->data + i * C->rs;
      if (beta == 0.0)
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs];
      else
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs] + (float)beta * c[j];
    } else {
      double a = ((const double*)A->data)[i * A->rs];
      const double* b = (const double*)B->data;
      double* c = (double*)C->data + i * C->rs;
      if (beta == 0.0)
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs];
      else
        for (int64_t j = 0; j < C->cols; ++j) c[j] = a * b[j * B->cs] + beta * c[j];
    }
  }
}

void fct_cpu_gemm(fct_dtype dt, const fct_mat* A, const fct_mat* B, const fct_mat* C,
                  double beta) {
  int64_t m = C->rows, n = C->cols, k = A->cols;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0) zero_rows(dt, C);
    return; /* beta == 1: C unchanged */
  }
  /* An outer product (k == 1, e.g. weight gradients of one token): one
   * streaming pass over C; GEMM would pack both operands for nothing. */
  if (k == 1) {
    outer(dt, A, B, C, beta);
    return;
  }
  /* One output row: c = Bᵀ·a (a = A's row, element stride A->cs). */
  if (m == 1 && A->cs >= 1) {
    gemv(dt, B, true, A->data, (blasint)A->cs, C->data, 1, beta);
    return;
  }
  /* One output column: c = A·b (b = B's column, stride B->rs). */
  if (n == 1 && B->rs >= 1) {
    gemv(dt, A, false, B->data, (blasint)B->rs, C->data, (blasint)C->rs, beta);
    return;
  }
  enum CBLAS_TRANSPOSE ta, tb;
  blasint lda, ldb;
  blas_form(A, &ta, &lda);
  blas_form(B, &tb, &ldb);
  if (dt == FCT_F32)
    scipy_cblas_sgemm(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, 1.0f,
                      (const float*)A->data, lda, (const float*)B->data, ldb, (float)beta,
                      (float*)C->data, (blasint)C->rs);
  else
    scipy_cblas_dgemm(CblasRowMajor, ta, tb, (blasint)m, (blasint)n, (blasint)k, 1.0,
                      (const double*)A->data, lda, (const double*)B->data, ldb, beta,
                      (double*)C->data, (blasint)C->rs);
}

int fct_cpu_set_num_threads(int n) {
  if (n > 0) scipy_openblas_set_num_threads(n);
  return scipy_openblas_get_num_threads();
}
