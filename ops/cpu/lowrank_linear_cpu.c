/* CPU kernels of the low-rank linear layer (float32, float64).
 * Entry points and checks: ops/lowrank_linear.c. */
#include <string.h>

#include "backend.h"
#include "gemm_cpu.h"

/* y [M, out] rows = bias [out] (stride bs). */
static void fill_bias(fct_dtype dt, const fct_mat* y, const char* bias, int64_t bs) {
  for (int64_t i = 0; i < y->rows; ++i) {
    if (dt == FCT_F32) {
      float* row = (float*)y->data + i * y->rs;
      const float* b = (const float*)bias;
      for (int64_t j = 0; j < y->cols; ++j) row[j] = b[j * bs];
    } else {
      double* row = (double*)y->data + i * y->rs;
      const double* b = (const double*)bias;
      for (int64_t j = 0; j < y->cols; ++j) row[j] = b[j * bs];
    }
  }
}

/* gb [out] = column sums of g [M, out], accumulated in float64 for accuracy
 * (g is read row by row, so the sums stay in cache for typical widths). */
static void column_sums(fct_dtype dt, const fct_mat* g, char* gb) {
  enum { CHUNK = 512 };
  double acc[CHUNK];
  for (int64_t j0 = 0; j0 < g->cols; j0 += CHUNK) {
    int64_t nj = g->cols - j0 < CHUNK ? g->cols - j0 : CHUNK;
    memset(acc, 0, sizeof acc);
    for (int64_t i = 0; i < g->rows; ++i) {
      if (dt == FCT_F32) {
        const float* row = (const float*)g->data + i * g->rs + j0 * g->cs;
        for (int64_t j = 0; j < nj; ++j) acc[j] += row[j * g->cs];
      } else {
        const double* row = (const double*)g->data + i * g->rs + j0 * g->cs;
        for (int64_t j = 0; j < nj; ++j) acc[j] += row[j * g->cs];
      }
    }
    for (int64_t j = 0; j < nj; ++j) {
      if (dt == FCT_F32) ((float*)gb)[j0 + j] = (float)acc[j];
      else ((double*)gb)[j0 + j] = acc[j];
    }
  }
}

static fct_status forward(fct_context* ctx, const fct_lowrank_plan* p) {
  (void)ctx;
  fct_mat Vt = fct_mat_t(p->V), Ut = fct_mat_t(p->U);
  fct_cpu_gemm(p->dt, &p->x, &Vt, &p->t, 0.0); /* t [M, r] = x [M, in] · Vᵀ [in, r] */
  if (p->bias) fill_bias(p->dt, &p->y, p->bias, p->bias_stride);
  fct_cpu_gemm(p->dt, &p->t, &Ut, &p->y, p->bias ? 1.0 : 0.0); /* y [M, out] += t · Uᵀ */
  return FCT_OK;
}

static fct_status backward(fct_context* ctx, const fct_lowrank_plan* p) {
  (void)ctx;
  if (p->gb) column_sums(p->dt, &p->g, p->gb); /* gb [out] = Σ_M g */
  if (p->gU.data) {
    if (!p->t_ready) {
      fct_mat Vt = fct_mat_t(p->V);
      fct_cpu_gemm(p->dt, &p->x, &Vt, &p->t, 0.0); /* t [M, r] = x · Vᵀ */
    }
    fct_mat gT = fct_mat_t(p->g);
    fct_cpu_gemm(p->dt, &gT, &p->t, &p->gU, 0.0); /* gU [out, r] = gᵀ [out, M] · t */
  }
  if (p->gx.data || p->gV.data) { /* gt may be an empty workspace (M or r = 0) */
    fct_cpu_gemm(p->dt, &p->g, &p->U, &p->gt, 0.0); /* gt [M, r] = g [M, out] · U */
    if (p->gV.data) {
      fct_mat gtT = fct_mat_t(p->gt);
      fct_cpu_gemm(p->dt, &gtT, &p->x, &p->gV, 0.0); /* gV [r, in] = gtᵀ · x */
    }
    if (p->gx.data) fct_cpu_gemm(p->dt, &p->gt, &p->V, &p->gx, 0.0); /* gx = gt · V */
  }
  return FCT_OK;
}

/* Defined in strided_cpu.c. */
fct_status fct_cpu_pack(fct_context* ctx, const DLTensor* src, char* dst);
fct_status fct_cpu_count_nonfinite(fct_context* ctx, const DLTensor* t, char* scratch,
                                   int64_t* count);

const fct_backend fct_cpu_backend = {
    .pack = fct_cpu_pack,
    .lowrank_forward = forward,
    .lowrank_backward = backward,
    .count_nonfinite = fct_cpu_count_nonfinite,
};
