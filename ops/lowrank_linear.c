/*
 * Low-rank linear entry points: y = x·Vᵀ·Uᵀ + b and its gradients.
 * Order in each entry point: check arguments, plan (views, packing, workspace
 * layout), return early when empty, compute as a sequence of the backend's
 * primitives (gemm, fill_rows, column_sums: backend.h), check finiteness.
 * Device independent, like the CP/Tucker/TT entry points.
 */
#include <string.h>

#include "op_common.h"

/* Sizes of one call, the inputs BLAS reads (each read in place or packed
 * into the workspace; .t is NULL for one the call does not read) and the
 * workspace regions: t [M, r] when the caller gives none (forward) or it
 * must be recomputed (backward), grad_t [M, r], the finite check's scratch. */
typedef struct lowrank_plan {
  int64_t M, in, out, r;
  size_t es;
  fct_param x, g, U, V, t;
  bool t_ready; /* backward: t holds x·Vᵀ already */
  bool cuda;
  bool t_ws, gt_ws, scratch;
  size_t off_t, off_gt, off_scratch;
  size_t bytes;
} lowrank_plan;

/* Carves the regions in the order: packed inputs, t, grad_t, scratch. */
static fct_status lay_out(fct_context* ctx, lowrank_plan* p) {
  fct_layout L;
  memset(&L, 0, sizeof L);
  fct_param* ins[] = {&p->g, &p->x, &p->U, &p->V, &p->t};
  for (int i = 0; i < 5; ++i)
    if (ins[i]->t) fct_param_lay_out(ins[i], &L, p->es);
  if (p->t_ws) p->off_t = fct_layout_take(&L, p->M * p->r, p->es);
  if (p->gt_ws) p->off_gt = fct_layout_take(&L, p->M * p->r, p->es);
  p->scratch = ctx->flags & FCT_FLAG_CHECK_FINITE;
  if (p->scratch && p->cuda) p->off_scratch = fct_layout_take(&L, FCT_CHECK_SCRATCH, 1);
  return fct_layout_done(ctx, &L, &p->bytes);
}

/* Checks the workspace and packs the inputs that need it. */
static fct_status bind(const fct_exec* e, lowrank_plan* p) {
  FCT_TRY(fct_check_workspace(e->ctx, p->bytes));
  fct_param* ins[] = {&p->g, &p->x, &p->U, &p->V, &p->t};
  for (int i = 0; i < 5; ++i)
    if (ins[i]->t) FCT_TRY(fct_param_bind(e, ins[i]));
  return FCT_OK;
}

static fct_status check_matrix(fct_context* ctx, const char* name, const DLTensor* t,
                               const DLTensor* ref, const char* what) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 2));
  if (t->ndim != 2)
    return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected 2 dims %s, got %d", name, what, t->ndim);
  return fct_check_same(ctx, name, t, "x", ref);
}

/* Checks x, U, V and fills the sizes of the plan. */
static fct_status check_factors(fct_context* ctx, const DLTensor* x, const DLTensor* U,
                                const DLTensor* V, lowrank_plan* p) {
  FCT_TRY(fct_check_tensor(ctx, "x", x, 1));
  FCT_TRY(check_matrix(ctx, "V", V, x, "[r, in]"));
  FCT_TRY(check_matrix(ctx, "U", U, x, "[out, r]"));
  memset(p, 0, sizeof *p);
  p->es = fct_dtype_bytes(fct_dtype_of(x->dtype));
  p->cuda = x->device.device_type == kDLCUDA;
  p->in = x->shape[x->ndim - 1];
  p->r = V->shape[0];
  p->out = U->shape[0];
  if (V->shape[1] != p->in)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "V: expected [r, in] with in = %lld (the last dim of x), got [%lld, %lld]",
                    (long long)p->in, (long long)V->shape[0], (long long)V->shape[1]);
  if (U->shape[1] != p->r)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "U: expected [out, r] with r = %lld (the first dim of V), got [%lld, %lld]",
                    (long long)p->r, (long long)U->shape[0], (long long)U->shape[1]);
  p->M = 1;
  for (int i = 0; i < x->ndim - 1; ++i) {
    if (__builtin_mul_overflow(p->M, x->shape[i], &p->M))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "x: the batch size overflows int64");
  }
  if (!fct_fits_int(p->M) || !fct_fits_int(p->in) || !fct_fits_int(p->out) ||
      !fct_fits_int(p->r))
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "x/U/V: sizes (M=%lld, in=%lld, out=%lld, r=%lld) must each be < 2^31 for "
                    "BLAS",
                    (long long)p->M, (long long)p->in, (long long)p->out, (long long)p->r);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, const DLTensor* U,
                               const DLTensor* V, const DLTensor* bias, const DLTensor* y,
                               const DLTensor* t, lowrank_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_factors(ctx, x, U, V, p));
  fct_mat m;
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, p->out, "out, the first dim of U"));
  FCT_TRY(fct_check_batched(ctx, "y", y, x, p->out, "out, the first dim of U"));
  FCT_TRY(fct_check_output(ctx, "y", y, &m));
  if (t) {
    FCT_TRY(fct_check_batched(ctx, "t", t, x, p->r, "r, the first dim of V"));
    FCT_TRY(fct_check_output(ctx, "t", t, &m));
  }
  const char* names[] = {"x", "U", "V", "bias", "y", "t"};
  const DLTensor* ts[] = {x, U, V, bias, y, t};
  FCT_TRY(fct_check_outputs_disjoint(ctx, 4, names, ts, 6));

  fct_param_init_rows(&p->x, x, p->M, p->in);
  fct_param_init(&p->U, U, p->out, p->r, false);
  fct_param_init(&p->V, V, p->r, p->in, false);
  p->t_ws = t == NULL;
  return lay_out(ctx, p);
}

fct_status fct_lowrank_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                                const DLTensor* U, const DLTensor* V,
                                                const DLTensor* bias, const DLTensor* y,
                                                const DLTensor* t, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  lowrank_plan p;
  FCT_TRY(forward_plan(&c, x, U, V, bias, y, t, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_linear_forward(fct_context* ctx, const DLTensor* x, const DLTensor* U,
                                      const DLTensor* V, const DLTensor* bias, DLTensor* y,
                                      DLTensor* t) {
  lowrank_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, U, V, bias, y, t, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  if (p.M == 0) return FCT_OK;
  FCT_TRY(bind(&e, &p));
  fct_mat Y, T;
  fct_fold(y, &Y);
  if (t) fct_fold(t, &T);
  else T = fct_ws_mat(&e, p.off_t, p.M, p.r);
  fct_mat Vt = fct_mat_t(p.V.m), Ut = fct_mat_t(p.U.m);
  FCT_TRY(fct_x_gemm(&e, &p.x.m, &Vt, &T, 0.0)); /* t [M, r] = x [M, in] · Vᵀ [in, r] */
  if (bias)
    FCT_TRY(e.be->fill_rows(ctx, e.device, e.dt, &Y, fct_data(bias), fct_vector_stride(bias)));
  FCT_TRY(fct_x_gemm(&e, &T, &Ut, &Y, bias ? 1.0 : 0.0)); /* y [M, out] (+)= t · Uᵀ */
  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    const char* names[] = {"x", "U", "V", "bias"};
    const DLTensor* ins[] = {x, U, V, bias};
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, names, ins, 4));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                const DLTensor* U, const DLTensor* V, const DLTensor* t,
                                const DLTensor* gx, const DLTensor* gU, const DLTensor* gV,
                                const DLTensor* gb, lowrank_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(check_factors(ctx, x, U, V, p));
  fct_mat m;
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, p->out, "out, the first dim of U"));
  if (t) FCT_TRY(fct_check_batched(ctx, "t", t, x, p->r, "r, the first dim of V"));
  if (gx) {
    FCT_TRY(fct_check_batched(ctx, "grad_x", gx, x, p->in, "in, the last dim of x"));
    FCT_TRY(fct_check_output(ctx, "grad_x", gx, &m));
  }
  if (gU) {
    FCT_TRY(check_matrix(ctx, "grad_U", gU, x, "[out, r]"));
    if (gU->shape[0] != p->out || gU->shape[1] != p->r)
      return fct_fail(ctx, FCT_ERR_SHAPE, "grad_U: expected the shape of U [%lld, %lld]",
                      (long long)p->out, (long long)p->r);
    FCT_TRY(fct_check_output(ctx, "grad_U", gU, &m));
  }
  if (gV) {
    FCT_TRY(check_matrix(ctx, "grad_V", gV, x, "[r, in]"));
    if (gV->shape[0] != p->r || gV->shape[1] != p->in)
      return fct_fail(ctx, FCT_ERR_SHAPE, "grad_V: expected the shape of V [%lld, %lld]",
                      (long long)p->r, (long long)p->in);
    FCT_TRY(fct_check_output(ctx, "grad_V", gV, &m));
  }
  if (gb) {
    FCT_TRY(fct_check_vector(ctx, "grad_bias", gb, x, p->out, "out, the first dim of U"));
    FCT_TRY(fct_check_output(ctx, "grad_bias", gb, &m));
  }
  const char* names[] = {"grad_y", "x", "U", "V", "t", "grad_x", "grad_U", "grad_V", "grad_bias"};
  const DLTensor* ts[] = {g, x, U, V, t, gx, gU, gV, gb};
  FCT_TRY(fct_check_outputs_disjoint(ctx, 5, names, ts, 9));

  /* What each gradient reads: grad_bias: grad_y; grad_U: grad_y and
   * t = x·Vᵀ (given, or computed again); grad_V: grad_t = grad_y·U and x;
   * grad_x: grad_t and V. */
  bool need_gt = gx || gV;
  bool need_t = gU != NULL;
  bool recompute_t = need_t && !t;
  if (gx || gU || gV || gb) fct_param_init_rows(&p->g, g, p->M, p->out);
  if (gV || recompute_t) fct_param_init_rows(&p->x, x, p->M, p->in);
  if (need_gt) fct_param_init(&p->U, U, p->out, p->r, false);
  if (gx || recompute_t) fct_param_init(&p->V, V, p->r, p->in, false);
  if (need_t && t) fct_param_init_rows(&p->t, t, p->M, p->r);
  p->t_ready = need_t && t;
  p->t_ws = recompute_t;
  p->gt_ws = need_gt;
  return lay_out(ctx, p);
}

fct_status fct_lowrank_linear_backward_workspace(const fct_context* ctx, const DLTensor* g,
                                                 const DLTensor* x, const DLTensor* U,
                                                 const DLTensor* V, const DLTensor* t,
                                                 const DLTensor* gx, const DLTensor* gU,
                                                 const DLTensor* gV, const DLTensor* gb,
                                                 size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  lowrank_plan p;
  FCT_TRY(backward_plan(&c, g, x, U, V, t, gx, gU, gV, gb, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_linear_backward(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                       const DLTensor* U, const DLTensor* V, const DLTensor* t,
                                       DLTensor* gx, DLTensor* gU, DLTensor* gV, DLTensor* gb) {
  lowrank_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, g, x, U, V, t, gx, gU, gV, gb, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  if (!gx && !gU && !gV && !gb) return FCT_OK;
  FCT_TRY(bind(&e, &p));
  const fct_mat* G = &p.g.m;
  if (gb) FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, G, fct_data(gb))); /* gb [out] = Σ_M g */
  if (gU) {
    fct_mat T = p.t_ready ? p.t.m : fct_ws_mat(&e, p.off_t, p.M, p.r);
    if (!p.t_ready) {
      fct_mat Vt = fct_mat_t(p.V.m);
      FCT_TRY(fct_x_gemm(&e, &p.x.m, &Vt, &T, 0.0)); /* t [M, r] = x · Vᵀ */
    }
    fct_mat Gt = fct_mat_t(*G), GU;
    fct_fold(gU, &GU);
    FCT_TRY(fct_x_gemm(&e, &Gt, &T, &GU, 0.0)); /* gU [out, r] = gᵀ [out, M] · t */
  }
  /* Keyed on the outputs, not on grad_t's memory: grad_t is NULL when it is
   * empty and there is no workspace, yet grad_x (r == 0) or grad_V (M == 0)
   * must still be written as zeros. */
  if (gx || gV) {
    fct_mat GT = fct_ws_mat(&e, p.off_gt, p.M, p.r);
    FCT_TRY(fct_x_gemm(&e, G, &p.U.m, &GT, 0.0)); /* gt [M, r] = g [M, out] · U */
    if (gV) {
      fct_mat GTt = fct_mat_t(GT), GV;
      fct_fold(gV, &GV);
      FCT_TRY(fct_x_gemm(&e, &GTt, &p.x.m, &GV, 0.0)); /* gV [r, in] = gtᵀ · x */
    }
    if (gx) {
      fct_mat GX;
      fct_fold(gx, &GX);
      FCT_TRY(fct_x_gemm(&e, &GT, &p.V.m, &GX, 0.0)); /* gx [M, in] = gt · V */
    }
  }
  /* Finiteness is checked on what scales with the batch: grad_x (whose
   * diagnosis names grad_y when that is where NaN came from), or grad_y when
   * grad_x is not asked for. A NaN in x, U or V was already caught by the
   * forward, and scanning the weight gradients would cost as much as
   * computing them when M is small. */
  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    char* scratch = fct_ws_at(&e, p.off_scratch);
    const char* names[] = {"grad_y", "x", "U", "V"};
    const DLTensor* ins[] = {g, x, U, V};
    if (gx) return fct_check_finite(ctx, e.be, scratch, "grad_x", gx, names, ins, 4);
    FCT_TRY(fct_check_finite_grad(ctx, e.be, scratch, g, "lowrank_linear"));
  }
  return FCT_OK;
}
