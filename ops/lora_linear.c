/*
 * LoRA linear entry points (factorch.h):
 *   y = base + s · t · Bᵀ,   t = drop(x) · Aᵀ,
 * base = x·Wᵀ + bias (dense), (x·Vᵀ)·Uᵀ + bias (low-rank) or a given
 * base_out, and the gradients. Device independent: checks, plan, workspace
 * layout, then GEMMs and the dropout mask through the backend (backend.h).
 *
 * What the fusion saves over "base layer, then adapter, then add": the
 * adapter's second GEMM accumulates into y (beta = 1), so there is no
 * output-sized temporary and no extra pass over y; the base's bias is
 * written into y before its GEMM (beta = 1 again). In the backward, the
 * adapter's part of grad_x is written first, the dropout mask applied to it
 * in place, and the base's part accumulated on top by its own GEMM. Only
 * t [M, r] (small) is kept between the calls; the mask is regenerated from
 * the seed (ops/lora_dropout.h).
 *
 * Cost: the base's GEMMs plus 2·M·r·(in + out) FLOPs forward; backward
 * 2·M·r·out (grad_t) + 2·M·r·in each for grad_A and grad_x + 2·M·r·out for
 * grad_B, plus whatever base gradients are asked for.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "op_common.h"
#include "lora_dropout.h"

uint64_t fct_lora_dropout_bits(uint64_t seed, uint64_t i) { return fct_dropout_bits(seed, i); }

/* Sizes and scalars of one call. */
typedef struct lora_shape {
  int kind;
  int64_t M, in, out, r, rb; /* rb: the low-rank base's rank, else 0 */
  double scale, p, keep_scale;
  uint64_t seed, threshold;
  bool dropout; /* p > 0 */
  bool cuda;    /* x on a CUDA device */
  size_t es;
} lora_shape;

typedef struct lora_plan {
  lora_shape s;
  fct_param x, g, t;       /* batched inputs (fct_param_init_rows); g, t: backward only */
  fct_param A, B, W, U, V; /* the weights in use */
  bool xd, t_ws, tb, gt, gtb, scratch;
  size_t off_xd, off_t, off_tb, off_gt, off_gtb, off_scratch;
  size_t bytes;
} lora_plan;

/* ------------------------------------------------------------------------- */
/* Checks                                                                     */
/* ------------------------------------------------------------------------- */

static fct_status check_absent(fct_context* ctx, const char* name, const void* t,
                               const char* why) {
  if (!t) return FCT_OK;
  return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "%s: expected NULL (%s)", name, why);
}

/* t must be a [rows, cols] matrix of x's dtype and device. */
static fct_status check_matrix(fct_context* ctx, const char* name, const DLTensor* t,
                               const DLTensor* x, int64_t rows, int64_t cols,
                               const char* what) {
  FCT_TRY(fct_check_param(ctx, name, t, x, 2, what));
  if (t->shape[0] != rows || t->shape[1] != cols)
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: expected %s = [%lld, %lld], got [%lld, %lld]", name,
                    what, (long long)rows, (long long)cols, (long long)t->shape[0],
                    (long long)t->shape[1]);
  return FCT_OK;
}

static fct_status check_options(fct_context* ctx, const fct_lora_options* o, lora_shape* s) {
  if (!o) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "opts: expected fct_lora_options, got NULL");
  if (!isfinite(o->scale))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "scale: expected a finite value, got %g",
                    o->scale);
  if (!(o->dropout >= 0.0 && o->dropout < 1.0))
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "dropout: expected p in [0, 1), got %g",
                    o->dropout);
  s->scale = o->scale;
  s->p = o->dropout;
  s->dropout = o->dropout > 0.0;
  s->seed = o->seed;
  s->threshold = fct_dropout_threshold(o->dropout);
  s->keep_scale = 1.0 / (1.0 - o->dropout);
  return FCT_OK;
}

/* x, A, B, the base's weights and the options; fills s. base_out is the
 * forward's business. */
static fct_status check_shape(fct_context* ctx, const DLTensor* x, const DLTensor* A,
                              const DLTensor* B, const fct_lora_base* base,
                              const fct_lora_options* opts, lora_shape* s) {
  memset(s, 0, sizeof *s);
  FCT_TRY(fct_check_input_rows(ctx, "x", x, &s->M));
  s->in = x->shape[x->ndim - 1];
  s->cuda = x->device.device_type == kDLCUDA;
  FCT_TRY(fct_check_param(ctx, "A", A, x, 2, "[r, in]"));
  s->r = A->shape[0];
  if (A->shape[1] != s->in)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "A: expected [r, in] with in = %lld (the last dim of x), got [%lld, %lld]",
                    (long long)s->in, (long long)A->shape[0], (long long)A->shape[1]);
  if (s->r < 1) return fct_fail(ctx, FCT_ERR_SHAPE, "A: expected a rank r >= 1, got 0");
  FCT_TRY(fct_check_param(ctx, "B", B, x, 2, "[out, r]"));
  s->out = B->shape[0];
  if (B->shape[1] != s->r)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "B: expected [out, r] with r = %lld (the first dim of A), got [%lld, %lld]",
                    (long long)s->r, (long long)B->shape[0], (long long)B->shape[1]);
  if (!base) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "base: expected fct_lora_base, got NULL");
  s->kind = base->kind;
  switch (base->kind) {
    case FCT_LORA_DENSE:
      FCT_TRY(check_matrix(ctx, "W", base->W, x, s->out, s->in, "[out, in]"));
      FCT_TRY(check_absent(ctx, "U", base->U, "the base is dense"));
      FCT_TRY(check_absent(ctx, "V", base->V, "the base is dense"));
      FCT_TRY(check_absent(ctx, "base_out", base->base_out, "the base is dense"));
      break;
    case FCT_LORA_LOWRANK:
      FCT_TRY(check_absent(ctx, "W", base->W, "the base is low-rank"));
      FCT_TRY(fct_check_param(ctx, "U", base->U, x, 2, "[out, rb]"));
      s->rb = base->U->shape[1];
      if (s->rb < 1) return fct_fail(ctx, FCT_ERR_SHAPE, "U: expected a rank rb >= 1, got 0");
      FCT_TRY(check_matrix(ctx, "U", base->U, x, s->out, s->rb, "[out, rb]"));
      FCT_TRY(check_matrix(ctx, "V", base->V, x, s->rb, s->in, "[rb, in]"));
      FCT_TRY(check_absent(ctx, "base_out", base->base_out, "the base is low-rank"));
      break;
    case FCT_LORA_GIVEN:
      FCT_TRY(check_absent(ctx, "W", base->W, "the base output is given"));
      FCT_TRY(check_absent(ctx, "U", base->U, "the base output is given"));
      FCT_TRY(check_absent(ctx, "V", base->V, "the base output is given"));
      FCT_TRY(check_absent(ctx, "bias", base->bias,
                       "the base output is given: its layer adds its own bias"));
      break;
    default:
      return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                      "base.kind: expected FCT_LORA_DENSE, FCT_LORA_LOWRANK or FCT_LORA_GIVEN, "
                      "got %d",
                      (int)base->kind);
  }
  if (base->bias)
    FCT_TRY(fct_check_vector(ctx, "bias", base->bias, x, s->out, "out, the first dim of B"));
  if (!fct_fits_int(s->in) || !fct_fits_int(s->out) || !fct_fits_int(s->r) ||
      !fct_fits_int(s->rb))
    return fct_fail(ctx, FCT_ERR_OVERFLOW,
                    "x/A/B: sizes (in=%lld, out=%lld, r=%lld, rb=%lld) must each be < 2^31 for "
                    "BLAS",
                    (long long)s->in, (long long)s->out, (long long)s->r, (long long)s->rb);
  s->es = fct_dtype_bytes(fct_dtype_of(x->dtype));
  return check_options(ctx, opts, s);
}

/* A C-contiguous batched output [*lead(x), last]. */
static fct_status check_batched_output(fct_context* ctx, const char* name, const DLTensor* t,
                                       const DLTensor* x, int64_t last, const char* last_name) {
  FCT_TRY(fct_check_batched(ctx, name, t, x, last, last_name));
  return fct_check_dense_output(ctx, name, t);
}

static fct_status check_matrix_output(fct_context* ctx, const char* name, const DLTensor* t,
                                      const DLTensor* x, int64_t rows, int64_t cols,
                                      const char* what) {
  FCT_TRY(check_matrix(ctx, name, t, x, rows, cols, what));
  return fct_check_dense_output(ctx, name, t);
}

/* ------------------------------------------------------------------------- */
/* Plan                                                                       */
/* ------------------------------------------------------------------------- */

static void weights_init(lora_plan* p, const DLTensor* A, const DLTensor* B,
                         const fct_lora_base* base) {
  const lora_shape* s = &p->s;
  fct_param_init(&p->A, A, s->r, s->in, false);
  fct_param_init(&p->B, B, s->out, s->r, false);
  if (s->kind == FCT_LORA_DENSE) fct_param_init(&p->W, base->W, s->out, s->in, false);
  if (s->kind == FCT_LORA_LOWRANK) {
    fct_param_init(&p->U, base->U, s->out, s->rb, false);
    fct_param_init(&p->V, base->V, s->rb, s->in, false);
  }
}

static void lay_out(lora_plan* p, fct_layout* L, bool check) {
  const lora_shape* s = &p->s;
  memset(L, 0, sizeof *L);
  fct_param* ins[] = {&p->x, &p->g, &p->t, &p->A, &p->B, &p->W, &p->U, &p->V};
  for (int i = 0; i < 8; ++i)
    if (ins[i]->t) fct_param_lay_out(ins[i], L, s->es);
  if (p->xd) p->off_xd = fct_layout_take(L, s->M * s->in, s->es);
  if (p->t_ws) p->off_t = fct_layout_take(L, s->M * s->r, s->es);
  if (p->tb) p->off_tb = fct_layout_take(L, s->M * s->rb, s->es);
  if (p->gt) p->off_gt = fct_layout_take(L, s->M * s->r, s->es);
  if (p->gtb) p->off_gtb = fct_layout_take(L, s->M * s->rb, s->es);
  p->scratch = check;
  if (check && s->cuda)
    p->off_scratch = fct_layout_take(L, FCT_CHECK_SCRATCH, 1);
}

/* ------------------------------------------------------------------------- */
/* Execution helpers                                                          */
/* ------------------------------------------------------------------------- */

static fct_status batched_bind(const fct_exec* e, fct_param* b, fct_mat* m) {
  FCT_TRY(fct_param_bind(e, b));
  *m = b->m;
  return FCT_OK;
}

static fct_status bind_weights(const fct_exec* e, lora_plan* p) {
  fct_param* ws[] = {&p->A, &p->B, &p->W, &p->U, &p->V};
  for (int i = 0; i < 5; ++i)
    if (ws[i]->t) FCT_TRY(fct_param_bind(e, ws[i]));
  return FCT_OK;
}

/* xd [M, in] = drop(X) in the workspace. */
static fct_status drop_into(const fct_exec* e, const lora_plan* p, const fct_mat* X,
                            fct_mat* XD) {
  *XD = fct_ws_mat(e, p->off_xd, p->s.M, p->s.in);
  return e->be->dropout(e->ctx, e->device, e->dt, X, XD, p->s.seed, p->s.threshold,
                        p->s.keep_scale);
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, const DLTensor* A,
                               const DLTensor* B, const fct_lora_base* base,
                               const fct_lora_options* opts, const DLTensor* y,
                               const DLTensor* t, lora_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  FCT_TRY(check_shape(ctx, x, A, B, base, opts, &p->s));
  const lora_shape* s = &p->s;
  if (s->kind == FCT_LORA_GIVEN) {
    if (!base->base_out)
      return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT,
                      "base_out: expected the base layer's output [..., out], got NULL");
    FCT_TRY(
        fct_check_batched(ctx, "base_out", base->base_out, x, s->out, "out, the first dim of B"));
  }
  FCT_TRY(check_batched_output(ctx, "y", y, x, s->out, "out, the first dim of B"));
  if (t) FCT_TRY(check_batched_output(ctx, "t", t, x, s->r, "r, the first dim of A"));
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "x", x);
  fct_args_add(&a, "A", A);
  fct_args_add(&a, "B", B);
  fct_args_add(&a, "W", base->W);
  fct_args_add(&a, "U", base->U);
  fct_args_add(&a, "V", base->V);
  fct_args_add(&a, "bias", base->bias);
  fct_args_add(&a, "base_out", base->base_out);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  fct_args_add(&a, "t", t);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));

  fct_param_init_rows(&p->x, x, s->M, s->in);
  weights_init(p, A, B, base);
  p->xd = s->dropout;
  p->t_ws = t == NULL;
  p->tb = s->kind == FCT_LORA_LOWRANK;
  fct_layout L;
  lay_out(p, &L, ctx->flags & FCT_FLAG_CHECK_FINITE);
  return fct_layout_done(ctx, &L, &p->bytes);
}

fct_status fct_lora_linear_forward_workspace(const fct_context* ctx, const DLTensor* x,
                                             const DLTensor* A, const DLTensor* B,
                                             const fct_lora_base* base,
                                             const fct_lora_options* opts, const DLTensor* y,
                                             const DLTensor* t, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx; /* the query may write an error message, nothing else */
  lora_plan p;
  FCT_TRY(forward_plan(&c, x, A, B, base, opts, y, t, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lora_linear_forward(fct_context* ctx, const DLTensor* x, const DLTensor* A,
                                   const DLTensor* B, const fct_lora_base* base,
                                   const fct_lora_options* opts, DLTensor* y, DLTensor* t) {
  lora_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, A, B, base, opts, y, t, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const lora_shape* s = &p.s;
  if (s->M == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  FCT_TRY(bind_weights(&e, &p));
  fct_mat X, Y = fct_dense(fct_data(y), s->M, s->out);
  FCT_TRY(batched_bind(&e, &p.x, &X));

  /* The base, written into y. */
  const char* bias = base->bias ? fct_data(base->bias) : NULL;
  int64_t bs = fct_vector_stride(base->bias);
  double beta = bias ? 1.0 : 0.0;
  if (s->kind == FCT_LORA_GIVEN) {
    FCT_TRY(e.be->pack(ctx, base->base_out, Y.data)); /* y [M, out] = base_out */
  } else {
    if (bias) FCT_TRY(e.be->fill_rows(ctx, e.device, e.dt, &Y, bias, bs));
    if (s->kind == FCT_LORA_DENSE) {
      fct_mat Wt = fct_mat_t(p.W.m);
      FCT_TRY(fct_x_gemm(&e, &X, &Wt, &Y, beta)); /* y [M, out] (+)= x · Wᵀ */
    } else {
      fct_mat TB = fct_ws_mat(&e, p.off_tb, s->M, s->rb);
      fct_mat Vt = fct_mat_t(p.V.m), Ut = fct_mat_t(p.U.m);
      FCT_TRY(fct_x_gemm(&e, &X, &Vt, &TB, 0.0)); /* tb [M, rb] = x · Vᵀ */
      FCT_TRY(fct_x_gemm(&e, &TB, &Ut, &Y, beta)); /* y (+)= tb · Uᵀ */
    }
  }

  /* The adapter, accumulated into y. */
  fct_mat XA = X;
  if (s->dropout) FCT_TRY(drop_into(&e, &p, &X, &XA));
  fct_mat T = t ? fct_dense(fct_data(t), s->M, s->r) : fct_ws_mat(&e, p.off_t, s->M, s->r);
  fct_mat At = fct_mat_t(p.A.m), Bt = fct_mat_t(p.B.m);
  FCT_TRY(fct_x_gemm(&e, &XA, &At, &T, 0.0)); /* t [M, r] = drop(x) · Aᵀ */
  FCT_TRY(e.be->gemm_scaled(ctx, e.device, e.dt, s->scale, &T, &Bt, &Y, 1.0)); /* y += s·t·Bᵀ */

  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    const char* names[] = {"x", "A", "B", "W", "U", "V", "bias", "base_out"};
    const DLTensor* ins[] = {x, A, B, base->W, base->U, base->V, base->bias, base->base_out};
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, names, ins, 8));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                const DLTensor* A, const DLTensor* B,
                                const fct_lora_base* base, const fct_lora_options* opts,
                                const DLTensor* t, const fct_lora_grads* gr, lora_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  memset(p, 0, sizeof *p);
  if (!gr) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "grads: expected fct_lora_grads, got NULL");
  FCT_TRY(check_shape(ctx, x, A, B, base, opts, &p->s));
  const lora_shape* s = &p->s;
  FCT_TRY(fct_check_batched(ctx, "grad_y", g, x, s->out, "out, the first dim of B"));
  if (t) FCT_TRY(fct_check_batched(ctx, "t", t, x, s->r, "r, the first dim of A"));
  if (gr->x) FCT_TRY(check_batched_output(ctx, "grad_x", gr->x, x, s->in, "in, the last dim of x"));
  if (gr->A) FCT_TRY(check_matrix_output(ctx, "grad_A", gr->A, x, s->r, s->in, "the shape of A"));
  if (gr->B) FCT_TRY(check_matrix_output(ctx, "grad_B", gr->B, x, s->out, s->r, "the shape of B"));
  if (gr->W) {
    if (s->kind != FCT_LORA_DENSE)
      return check_absent(ctx, "grad_W", gr->W, "the base is not dense");
    FCT_TRY(check_matrix_output(ctx, "grad_W", gr->W, x, s->out, s->in, "the shape of W"));
  }
  if (gr->U || gr->V) {
    if (s->kind != FCT_LORA_LOWRANK)
      return check_absent(ctx, gr->U ? "grad_U" : "grad_V", gr->U ? (void*)gr->U : (void*)gr->V,
                          "the base is not low-rank");
    if (gr->U)
      FCT_TRY(check_matrix_output(ctx, "grad_U", gr->U, x, s->out, s->rb, "the shape of U"));
    if (gr->V)
      FCT_TRY(check_matrix_output(ctx, "grad_V", gr->V, x, s->rb, s->in, "the shape of V"));
  }
  if (gr->bias) {
    if (s->kind == FCT_LORA_GIVEN)
      return check_absent(ctx, "grad_bias", gr->bias, "the base output is given");
    FCT_TRY(fct_check_vector(ctx, "grad_bias", gr->bias, x, s->out, "out, the first dim of B"));
    FCT_TRY(fct_check_dense_output(ctx, "grad_bias", gr->bias));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "grad_y", g);
  fct_args_add(&a, "x", x);
  fct_args_add(&a, "A", A);
  fct_args_add(&a, "B", B);
  fct_args_add(&a, "W", base->W);
  fct_args_add(&a, "U", base->U);
  fct_args_add(&a, "V", base->V);
  fct_args_add(&a, "bias", base->bias);
  fct_args_add(&a, "t", t);
  int first_out = a.n;
  fct_args_add(&a, "grad_x", gr->x);
  fct_args_add(&a, "grad_A", gr->A);
  fct_args_add(&a, "grad_B", gr->B);
  fct_args_add(&a, "grad_W", gr->W);
  fct_args_add(&a, "grad_U", gr->U);
  fct_args_add(&a, "grad_V", gr->V);
  fct_args_add(&a, "grad_bias", gr->bias);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));

  /* What each gradient reads:
   *   grad_B: t (given, or drop(x)·Aᵀ again)   grad_A: grad_t, drop(x)
   *   grad_x: grad_t, A, and the base's weights (low-rank: grad_tb = g·U)
   *   grad_W, grad_V: x                        grad_U: tb = x·Vᵀ again */
  bool lowrank = s->kind == FCT_LORA_LOWRANK;
  bool recompute_t = gr->B && !t;
  bool need_gt = gr->A || gr->x;
  bool need_xa = gr->A || recompute_t; /* drop(x), or x itself when p = 0 */
  bool need_x = need_xa || gr->W || gr->U || gr->V;
  bool need_g = gr->x || gr->A || gr->B || gr->W || gr->U || gr->V || gr->bias;
  if (need_x) fct_param_init_rows(&p->x, x, s->M, s->in);
  if (need_g) fct_param_init_rows(&p->g, g, s->M, s->out);
  if (gr->B && t) fct_param_init_rows(&p->t, t, s->M, s->r);
  fct_param_init(&p->A, A, s->r, s->in, false);
  fct_param_init(&p->B, B, s->out, s->r, false);
  if (gr->x && s->kind == FCT_LORA_DENSE) fct_param_init(&p->W, base->W, s->out, s->in, false);
  if (lowrank && (gr->x || gr->V)) fct_param_init(&p->U, base->U, s->out, s->rb, false);
  if (lowrank && (gr->x || gr->U)) fct_param_init(&p->V, base->V, s->rb, s->in, false);
  p->xd = s->dropout && need_xa;
  p->t_ws = recompute_t;
  p->gt = need_gt;
  p->tb = lowrank && gr->U;
  p->gtb = lowrank && (gr->x || gr->V);
  fct_layout L;
  lay_out(p, &L, ctx->flags & FCT_FLAG_CHECK_FINITE);
  return fct_layout_done(ctx, &L, &p->bytes);
}

fct_status fct_lora_linear_backward_workspace(const fct_context* ctx, const DLTensor* g,
                                              const DLTensor* x, const DLTensor* A,
                                              const DLTensor* B, const fct_lora_base* base,
                                              const fct_lora_options* opts, const DLTensor* t,
                                              const fct_lora_grads* grads, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  lora_plan p;
  FCT_TRY(backward_plan(&c, g, x, A, B, base, opts, t, grads, &p));
  *bytes = p.bytes;
  return FCT_OK;
}

fct_status fct_lora_linear_backward(fct_context* ctx, const DLTensor* g, const DLTensor* x,
                                    const DLTensor* A, const DLTensor* B,
                                    const fct_lora_base* base, const fct_lora_options* opts,
                                    const DLTensor* t, const fct_lora_grads* gr) {
  lora_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, g, x, A, B, base, opts, t, gr, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  const lora_shape* s = &p.s;
  if (!gr->x && !gr->A && !gr->B && !gr->W && !gr->U && !gr->V && !gr->bias) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  FCT_TRY(bind_weights(&e, &p));
  int64_t M = s->M;
  fct_mat X = {0}, G = {0}, XA = {0};
  if (p.x.t) FCT_TRY(batched_bind(&e, &p.x, &X));
  if (p.g.t) FCT_TRY(batched_bind(&e, &p.g, &G));
  /* drop(x), when a gradient reads it (M = 0: nothing to draw). */
  if (p.xd && M > 0) FCT_TRY(drop_into(&e, &p, &X, &XA));
  else if (p.xd) XA = fct_ws_mat(&e, p.off_xd, 0, s->in);
  else XA = X;

  if (gr->bias) /* grad_bias [out] = Σ_rows grad_y */
    FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, &G, fct_data(gr->bias)));
  if (gr->B) { /* grad_B [out, r] = s · grad_yᵀ · t */
    fct_mat T;
    if (t) {
      FCT_TRY(batched_bind(&e, &p.t, &T));
    } else {
      fct_mat At = fct_mat_t(p.A.m);
      T = fct_ws_mat(&e, p.off_t, M, s->r);
      FCT_TRY(fct_x_gemm(&e, &XA, &At, &T, 0.0)); /* t = drop(x) · Aᵀ */
    }
    fct_mat Gt = fct_mat_t(G), GB = fct_dense(fct_data(gr->B), s->out, s->r);
    FCT_TRY(e.be->gemm_scaled(ctx, e.device, e.dt, s->scale, &Gt, &T, &GB, 0.0));
  }
  fct_mat GT = {0};
  if (p.gt) { /* grad_t [M, r] = s · grad_y · B */
    GT = fct_ws_mat(&e, p.off_gt, M, s->r);
    FCT_TRY(e.be->gemm_scaled(ctx, e.device, e.dt, s->scale, &G, &p.B.m, &GT, 0.0));
  }
  if (gr->A) { /* grad_A [r, in] = grad_tᵀ · drop(x) */
    fct_mat GTt = fct_mat_t(GT), GA = fct_dense(fct_data(gr->A), s->r, s->in);
    FCT_TRY(fct_x_gemm(&e, &GTt, &XA, &GA, 0.0));
  }
  fct_mat Gt = fct_mat_t(G);
  if (gr->W) { /* grad_W [out, in] = grad_yᵀ · x */
    fct_mat GW = fct_dense(fct_data(gr->W), s->out, s->in);
    FCT_TRY(fct_x_gemm(&e, &Gt, &X, &GW, 0.0));
  }
  fct_mat GTB = {0};
  if (p.gtb) { /* grad_tb [M, rb] = grad_y · U */
    GTB = fct_ws_mat(&e, p.off_gtb, M, s->rb);
    FCT_TRY(fct_x_gemm(&e, &G, &p.U.m, &GTB, 0.0));
  }
  if (gr->U) { /* grad_U [out, rb] = grad_yᵀ · tb, tb = x · Vᵀ */
    fct_mat TB = fct_ws_mat(&e, p.off_tb, M, s->rb), Vt = fct_mat_t(p.V.m);
    fct_mat GU = fct_dense(fct_data(gr->U), s->out, s->rb);
    FCT_TRY(fct_x_gemm(&e, &X, &Vt, &TB, 0.0));
    FCT_TRY(fct_x_gemm(&e, &Gt, &TB, &GU, 0.0));
  }
  if (gr->V) { /* grad_V [rb, in] = grad_tbᵀ · x */
    fct_mat GTBt = fct_mat_t(GTB), GV = fct_dense(fct_data(gr->V), s->rb, s->in);
    FCT_TRY(fct_x_gemm(&e, &GTBt, &X, &GV, 0.0));
  }
  if (gr->x) {
    /* The adapter's part first, masked in place, then the base's on top. */
    fct_mat GX = fct_dense(fct_data(gr->x), M, s->in);
    FCT_TRY(fct_x_gemm(&e, &GT, &p.A.m, &GX, 0.0)); /* grad_x [M, in] = grad_t · A */
    if (s->dropout)
      FCT_TRY(e.be->dropout(ctx, e.device, e.dt, &GX, &GX, s->seed, s->threshold, s->keep_scale));
    if (s->kind == FCT_LORA_DENSE)
      FCT_TRY(fct_x_gemm(&e, &G, &p.W.m, &GX, 1.0)); /* grad_x += grad_y · W */
    else if (s->kind == FCT_LORA_LOWRANK)
      FCT_TRY(fct_x_gemm(&e, &GTB, &p.V.m, &GX, 1.0)); /* grad_x += grad_tb · V */
  }

  /* Finiteness is checked on what scales with the batch, as the low-rank op
   * does: grad_x when asked for (naming grad_y when that is where NaN came
   * from), else grad_y. */
  if (ctx->flags & FCT_FLAG_CHECK_FINITE) {
    char* scratch = fct_ws_at(&e, p.off_scratch);
    const char* names[] = {"grad_y", "x", "A", "B", "W", "U", "V"};
    const DLTensor* ins[] = {g, x, A, B, base->W, base->U, base->V};
    if (gr->x) return fct_check_finite(ctx, e.be, scratch, "grad_x", gr->x, names, ins, 7);
    FCT_TRY(fct_check_finite_grad(ctx, e.be, scratch, g, "lora_linear"));
  }
  return FCT_OK;
}
