/*
 * Low-rank linear entry points: y = x·Vᵀ·Uᵀ + b and its gradients.
 * Order in each entry point: check arguments, plan (views, packing, workspace
 * layout), return early when empty, compute on the backend, check finiteness.
 * Kernels: ops/cpu/lowrank_linear_cpu.c, ops/cuda/lowrank_linear_cuda.cu.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "linear_common.h"

/* An input that BLAS may have to read from a packed copy in the workspace. */
typedef struct operand {
  const char* name;
  const DLTensor* t;
  fct_mat* view;
  bool pack;
  size_t off;
} operand;

/* Workspace layout of one call. Offsets are relative to ctx->workspace. */
typedef struct layout {
  operand ops[5];
  int nops;
  size_t off_t, off_gt, off_scratch;
  bool t_in_ws, gt_in_ws, scratch;
  size_t bytes;
} layout;

static void add_operand(layout* L, const char* name, const DLTensor* t, fct_mat* view) {
  operand* o = &L->ops[L->nops++];
  o->name = name;
  o->t = t;
  o->view = view;
  bool folds = fct_fold(t, view);
  o->pack = !folds || !fct_mat_blas_ok(view) || view->rs > INT_MAX || view->cs > INT_MAX;
}

/* Bytes of a dense [rows, cols] matrix of dtype dt, or FCT_ERR_OVERFLOW. */
static fct_status dense_bytes(fct_context* ctx, const char* name, int64_t rows, int64_t cols,
                              fct_dtype dt, size_t* bytes) {
  size_t n;
  if (!fct_mul_ok((size_t)rows, (size_t)cols, &n) || !fct_mul_ok(n, fct_dtype_bytes(dt), bytes))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: workspace size overflows", name);
  return FCT_OK;
}

static fct_status finish_layout(fct_context* ctx, layout* L, const fct_lowrank_plan* p,
                                bool t_ws, bool gt_ws) {
  size_t cur = 0, b;
  for (int i = 0; i < L->nops; ++i) {
    operand* o = &L->ops[i];
    if (!o->pack) continue;
    TRY(dense_bytes(ctx, o->name, o->view->rows, o->view->cols, p->dt, &b));
    o->off = fct_ws_take(&cur, b);
  }
  L->t_in_ws = t_ws;
  L->gt_in_ws = gt_ws;
  if (t_ws) {
    TRY(dense_bytes(ctx, "t", p->M, p->r, p->dt, &b));
    L->off_t = fct_ws_take(&cur, b);
  }
  if (gt_ws) {
    TRY(dense_bytes(ctx, "grad_t", p->M, p->r, p->dt, &b));
    L->off_gt = fct_ws_take(&cur, b);
  }
  L->scratch = ctx->flags & FCT_FLAG_CHECK_FINITE;
  if (L->scratch) L->off_scratch = fct_ws_take(&cur, 256);
  L->bytes = cur;
  return FCT_OK;
}

/* Points the plan at the workspace and packs the inputs that need it. */
static fct_status bind(fct_context* ctx, const fct_backend* be, layout* L, fct_lowrank_plan* p) {
  if (ctx->workspace_bytes < L->bytes || (L->bytes > 0 && !ctx->workspace))
    return fct_fail(ctx, FCT_ERR_WORKSPACE, "workspace: expected at least %zu bytes, got %zu%s",
                    L->bytes, ctx->workspace ? ctx->workspace_bytes : (size_t)0,
                    ctx->workspace ? "" : " (NULL)");
  /* Without a workspace every region in it is empty: NULL, not NULL + off. */
  char* ws = (char*)ctx->workspace;
#define WS_AT(off) (ws ? ws + (off) : NULL)
  for (int i = 0; i < L->nops; ++i) {
    operand* o = &L->ops[i];
    if (!o->pack) continue;
    TRY(be->pack(ctx, o->t, WS_AT(o->off)));
    *o->view = fct_dense(WS_AT(o->off), o->view->rows, o->view->cols);
  }
  if (L->t_in_ws) p->t = fct_dense(WS_AT(L->off_t), p->M, p->r);
  if (L->gt_in_ws) p->gt = fct_dense(WS_AT(L->off_gt), p->M, p->r);
  p->scratch = L->scratch ? WS_AT(L->off_scratch) : NULL;
#undef WS_AT
  return FCT_OK;
}

static fct_status check_matrix(fct_context* ctx, const char* name, const DLTensor* t,
                               const DLTensor* ref, const char* what) {
  TRY(fct_check_tensor(ctx, name, t, 2));
  if (t->ndim != 2)
    return fct_fail(ctx, FCT_ERR_NDIM, "%s: expected 2 dims %s, got %d", name, what, t->ndim);
  return fct_check_same(ctx, name, t, "x", ref);
}

/* Checks x, U, V and fills the sizes of the plan. */
static fct_status check_factors(fct_context* ctx, const DLTensor* x, const DLTensor* U,
                                const DLTensor* V, fct_lowrank_plan* p) {
  TRY(fct_check_tensor(ctx, "x", x, 1));
  TRY(check_matrix(ctx, "V", V, x, "[r, in]"));
  TRY(check_matrix(ctx, "U", U, x, "[out, r]"));
  memset(p, 0, sizeof *p);
  p->dt = fct_dtype_of(x->dtype);
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
                               const DLTensor* t, fct_lowrank_plan* p, layout* L) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  TRY(check_factors(ctx, x, U, V, p));
  if (bias) {
    TRY(fct_check_vector(ctx, "bias", bias, x, p->out, "out, the first dim of U"));
    p->bias = fct_data(bias);
    p->bias_stride = fct_vector_stride(bias);
  }
  TRY(fct_check_batched(ctx, "y", y, x, p->out, "out, the first dim of U"));
  TRY(fct_check_output(ctx, "y", y, &p->y));
  if (t) {
    TRY(fct_check_batched(ctx, "t", t, x, p->r, "r, the first dim of V"));
    TRY(fct_check_output(ctx, "t", t, &p->t));
  }
  const char* names[] = {"x", "U", "V", "bias", "t", "y"};
  const DLTensor* ts[] = {x, U, V, bias, t, y};
  TRY(fct_check_disjoint_all(ctx, 5, names, ts, 6));
  TRY(fct_check_disjoint_all(ctx, 4, names, ts, 5));

  memset(L, 0, sizeof *L);
  add_operand(L, "x", x, &p->x);
  add_operand(L, "U", U, &p->U);
  add_operand(L, "V", V, &p->V);
  return finish_layout(ctx, L, p, t == NULL, false);
}

fct_status fct_lowrank_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                                const DLTensor* U, const DLTensor* V,
                                                const DLTensor* bias, const DLTensor* y,
                                                const DLTensor* t, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  fct_lowrank_plan p;
  layout L;
  TRY(forward_plan(&c, x, U, V, bias, y, t, &p, &L));
  *bytes = L.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_linear_forward(fct_context* ctx, const DLTensor* x, const DLTensor* U,
                                      const DLTensor* V, const DLTensor* bias, DLTensor* y,
                                      DLTensor* t) {
  fct_lowrank_plan p;
  layout L;
  const fct_backend* be;
  TRY(forward_plan(ctx, x, U, V, bias, y, t, &p, &L));
  TRY(fct_backend_for(ctx, "x", x, &be));
  if (p.M == 0) return FCT_OK;
  TRY(bind(ctx, be, &L, &p));
  TRY(be->lowrank_forward(ctx, &p));
  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    const char* names[] = {"x", "U", "V", "bias"};
    const DLTensor* ins[] = {x, U, V, bias};
    TRY(fct_check_finite(ctx, be, p.scratch, "y", y, names, ins, 4));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                const DLTensor* U, const DLTensor* V, const DLTensor* t,
                                const DLTensor* gx, const DLTensor* gU, const DLTensor* gV,
                                const DLTensor* gb, fct_lowrank_plan* p, layout* L) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  TRY(check_factors(ctx, x, U, V, p));
  TRY(fct_check_batched(ctx, "grad_y", g, x, p->out, "out, the first dim of U"));
  if (t) TRY(fct_check_batched(ctx, "t", t, x, p->r, "r, the first dim of V"));
  if (gx) {
    TRY(fct_check_batched(ctx, "grad_x", gx, x, p->in, "in, the last dim of x"));
    TRY(fct_check_output(ctx, "grad_x", gx, &p->gx));
  }
  if (gU) {
    TRY(check_matrix(ctx, "grad_U", gU, x, "[out, r]"));
    if (gU->shape[0] != p->out || gU->shape[1] != p->r)
      return fct_fail(ctx, FCT_ERR_SHAPE, "grad_U: expected the shape of U [%lld, %lld]",
                      (long long)p->out, (long long)p->r);
    TRY(fct_check_output(ctx, "grad_U", gU, &p->gU));
  }
  if (gV) {
    TRY(check_matrix(ctx, "grad_V", gV, x, "[r, in]"));
    if (gV->shape[0] != p->r || gV->shape[1] != p->in)
      return fct_fail(ctx, FCT_ERR_SHAPE, "grad_V: expected the shape of V [%lld, %lld]",
                      (long long)p->r, (long long)p->in);
    TRY(fct_check_output(ctx, "grad_V", gV, &p->gV));
  }
  if (gb) {
    fct_mat m;
    TRY(fct_check_vector(ctx, "grad_bias", gb, x, p->out, "out, the first dim of U"));
    TRY(fct_check_output(ctx, "grad_bias", gb, &m));
    p->gb = m.data;
  }
  const char* names[] = {"grad_y", "x", "U", "V", "t", "grad_x", "grad_U", "grad_V", "grad_bias"};
  const DLTensor* ts[] = {g, x, U, V, t, gx, gU, gV, gb};
  for (int i = 5; i < 9; ++i) TRY(fct_check_disjoint_all(ctx, i, names, ts, 9));

  bool need_gt = gx || gV;
  bool need_t = gU != NULL;
  bool recompute_t = need_t && !t;
  memset(L, 0, sizeof *L);
  if (gx || gU || gV || gb) add_operand(L, "grad_y", g, &p->g);
  if (gV || recompute_t) add_operand(L, "x", x, &p->x);
  if (need_gt) add_operand(L, "U", U, &p->U);
  if (gx || recompute_t) add_operand(L, "V", V, &p->V);
  if (need_t && t) add_operand(L, "t", t, &p->t);
  p->t_ready = need_t && t;
  return finish_layout(ctx, L, p, recompute_t, need_gt);
}

fct_status fct_lowrank_linear_backward_workspace(const fct_context* ctx, const DLTensor* g,
                                                 const DLTensor* x, const DLTensor* U,
                                                 const DLTensor* V, const DLTensor* t,
                                                 const DLTensor* gx, const DLTensor* gU,
                                                 const DLTensor* gV, const DLTensor* gb,
                                                 size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  fct_lowrank_plan p;
  layout L;
  TRY(backward_plan(&c, g, x, U, V, t, gx, gU, gV, gb, &p, &L));
  *bytes = L.bytes;
  return FCT_OK;
}

fct_status fct_lowrank_linear_backward(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                       const DLTensor* U, const DLTensor* V, const DLTensor* t,
                                       DLTensor* gx, DLTensor* gU, DLTensor* gV, DLTensor* gb) {
  fct_lowrank_plan p;
  layout L;
  const fct_backend* be;
  TRY(backward_plan(ctx, g, x, U, V, t, gx, gU, gV, gb, &p, &L));
  TRY(fct_backend_for(ctx, "x", x, &be));
  if (!gx && !gU && !gV && !gb) return FCT_OK;
  TRY(bind(ctx, be, &L, &p));
  /* Finiteness is checked on what scales with the batch: grad_x (whose
   * diagnosis names grad_y when that is where NaN came from), or grad_y when
   * grad_x is not asked for. A NaN in x, U or V was already caught by the
   * forward, and scanning the weight gradients would cost as much as
   * computing them when M is small. */
  TRY(be->lowrank_backward(ctx, &p));
  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    const char* names[] = {"grad_y", "x", "U", "V"};
    const DLTensor* ins[] = {g, x, U, V};
    if (gx) return fct_check_finite(ctx, be, p.scratch, "grad_x", gx, names, ins, 4);
    TRY(fct_check_finite_grad(ctx, be, p.scratch, g, "lowrank_linear"));
  }
  return FCT_OK;
}
