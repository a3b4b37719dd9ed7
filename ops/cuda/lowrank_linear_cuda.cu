/*
 * CUDA kernels of the low-rank linear layer (float32, float64, bfloat16,
 * float16; half types accumulate in float32). Computes exactly what
 * ops/cpu/lowrank_linear_cpu.c does; entry points and checks:
 * ops/lowrank_linear.c.
 */
#include "cuda_common.cuh"

/* GEMMs (gemm_cuda.cu) and the bias / column-sum kernels (rows_cuda.cu) are
 * shared with the tensorized linear ops. */

extern "C" {

static fct_status gemm(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt, const fct_mat* A,
                       const fct_mat* B, const fct_mat* C, double beta) {
  return fct_cuda_gemm(ctx, env, dt, A, B, C, beta);
}

static fct_status fill_bias(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                            const fct_mat* y, const char* bias, int64_t bs) {
  return fct_cuda_fill_rows(ctx, env, dt, y, bias, bs);
}

static fct_status column_sums(fct_context* ctx, const fct_cuda_env* env, fct_dtype dt,
                              const fct_mat* g, char* gb) {
  return fct_cuda_column_sums(ctx, env, dt, g, gb);
}

/* ------------------------------------------------------------------------- */
/* Forward and backward                                                       */
/* ------------------------------------------------------------------------- */

static fct_status forward_on(fct_context* ctx, const fct_cuda_env* env,
                             const fct_lowrank_plan* p) {
  fct_mat Vt = fct_mat_t(p->V), Ut = fct_mat_t(p->U);
  /* t [M, r] = x [M, in] · Vᵀ [in, r] */
  FCT_TRY(gemm(ctx, env, p->dt, &p->x, &Vt, &p->t, 0.0));
  if (p->bias) FCT_TRY(fill_bias(ctx, env, p->dt, &p->y, p->bias, p->bias_stride));
  /* y [M, out] (+)= t [M, r] · Uᵀ [r, out] */
  return gemm(ctx, env, p->dt, &p->t, &Ut, &p->y, p->bias ? 1.0 : 0.0);
}

static fct_status backward_on(fct_context* ctx, const fct_cuda_env* env,
                              const fct_lowrank_plan* p) {
  if (p->gb) FCT_TRY(column_sums(ctx, env, p->dt, &p->g, p->gb)); /* gb [out] = Σ_M g */
  if (p->gU.data) {
    if (!p->t_ready) {
      fct_mat Vt = fct_mat_t(p->V);
      FCT_TRY(gemm(ctx, env, p->dt, &p->x, &Vt, &p->t, 0.0)); /* t [M, r] = x · Vᵀ */
    }
    fct_mat gT = fct_mat_t(p->g);
    FCT_TRY(gemm(ctx, env, p->dt, &gT, &p->t, &p->gU, 0.0)); /* gU [out, r] = gᵀ [out, M] · t */
  }
  /* Keyed on the outputs rather than on gt.data (as the CPU code is): gt is
   * NULL when it is empty and the workspace is NULL, yet grad_x (r == 0) or
   * grad_V (M == 0) must still be written as zeros. */
  if (p->gx.data || p->gV.data) {
    FCT_TRY(gemm(ctx, env, p->dt, &p->g, &p->U, &p->gt, 0.0)); /* gt [M, r] = g [M, out] · U */
    if (p->gV.data) {
      fct_mat gtT = fct_mat_t(p->gt);
      FCT_TRY(gemm(ctx, env, p->dt, &gtT, &p->x, &p->gV, 0.0)); /* gV [r, in] = gtᵀ · x */
    }
    if (p->gx.data)
      FCT_TRY(gemm(ctx, env, p->dt, &p->gt, &p->V, &p->gx, 0.0)); /* gx [M, in] = gt · V */
  }
  return FCT_OK;
}

/* The first non-NULL pointer: tells fct_cuda_enter the tensors' device. */
static const void* first_data(const char* const* ptrs, int n) {
  for (int i = 0; i < n; ++i)
    if (ptrs[i]) return ptrs[i];
  return NULL;
}

fct_status fct_cuda_lowrank_forward(fct_context* ctx, const fct_lowrank_plan* p) {
  const char* ptrs[] = {p->y.data, p->x.data, p->U.data, p->V.data, p->t.data};
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, -1, first_data(ptrs, 5), true, &env));
  return fct_cuda_leave(ctx, &env, forward_on(ctx, &env, p));
}

fct_status fct_cuda_lowrank_backward(fct_context* ctx, const fct_lowrank_plan* p) {
  const char* ptrs[] = {p->g.data, p->x.data, p->U.data, p->V.data,
                        p->gx.data, p->gU.data, p->gV.data, p->gb};
  fct_cuda_env env;
  FCT_TRY(fct_cuda_enter(ctx, -1, first_data(ptrs, 8), true, &env));
  return fct_cuda_leave(ctx, &env, backward_on(ctx, &env, p));
}

} /* extern "C" */
