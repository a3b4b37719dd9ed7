/* CPU kernels of the low-rank linear layer (float32, float64).
 * Entry points and checks: ops/lowrank_linear.c; the backend table:
 * backend_cpu.c. */
#include <string.h>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

fct_status fct_cpu_lowrank_forward(fct_context* ctx, const fct_lowrank_plan* p) {
  (void)ctx;
  fct_mat Vt = fct_mat_t(p->V), Ut = fct_mat_t(p->U);
  fct_cpu_gemm(p->dt, &p->x, &Vt, &p->t, 0.0); /* t [M, r] = x [M, in] · Vᵀ [in, r] */
  if (p->bias) fct_cpu_fill_rows(p->dt, &p->y, p->bias, p->bias_stride);
  fct_cpu_gemm(p->dt, &p->t, &Ut, &p->y, p->bias ? 1.0 : 0.0); /* y [M, out] += t · Uᵀ */
  return FCT_OK;
}

fct_status fct_cpu_lowrank_backward(fct_context* ctx, const fct_lowrank_plan* p) {
  (void)ctx;
  if (p->gb) fct_cpu_column_sums(p->dt, &p->g, p->gb); /* gb [out] = Σ_M g */
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
