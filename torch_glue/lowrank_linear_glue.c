/*
 * Boxed torch kernels of the low-rank linear ops (schemas in register.c):
 *   factorch::lowrank_linear(x, U, V, bias) -> (y, t)
 *   factorch::lowrank_linear_backward(grad_y, x, U, V, t, need_x, need_U,
 *                                     need_V, need_bias) -> (gx, gU, gV, gb)
 * and the same on a layer's one flat parameter (V [r, in] then U [out, r],
 * row-major, back to back: factorch/factorizations.py, LowRank):
 *   factorch::lowrank_linear_flat(x, weights, bias, out_features, rank) -> (y, t)
 *   factorch::lowrank_linear_flat_backward(grad_y, x, weights, t, out_features,
 *       rank, need_x, need_weights, need_bias) -> (gx, gweights, gb)
 * whose backward writes grad_U and grad_V into views of ONE flat gradient (a
 * layer holding views of one parameter would otherwise pay autograd's slice
 * backward: a zero-filled parameter-sized tensor per view, then their sum).
 * Inputs become DLTensor views (no copies); outputs and workspace come from
 * torch's allocator; the C ops are in ops/lowrank_linear.c.
 */
#include "glue_common.h"

void fct_lowrank_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* x, U, V, bias */
  fct_take_tensors(&c, stack, 4, d);
  fct_call_start(&c, 0);

  /* Outputs y [*lead, out], t [*lead, r], shaped only when x, U, V have sane
   * ranks; otherwise the query names the bad argument. */
  bool sane = d[1].ndim == 2 && d[2].ndim == 2;
  DLTensor* y = sane ? fct_batched_result(&c, &d[0], d[1].shape[0]) : NULL;
  DLTensor* t = y ? fct_batched_result(&c, &d[0], d[2].shape[0]) : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_linear_forward, &d[0], &d[1], &d[2],
               fct_nullable(&d[3]), y, t);
}

void fct_lowrank_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                        uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[5]; /* grad_y, x, U, V, t */
  fct_take_tensors(&c, stack, 5, d);
  bool need[4]; /* x, U, V, bias */
  fct_slot_bools(stack + 5, 4, need);
  fct_call_start(&c, 1);

  /* grad_x like x, grad_U like U, grad_V like V, grad_bias [out]; an empty
   * [0] tensor stands for a gradient not asked for. Asked-for gradients of
   * inputs with bad ranks are passed as NULL, so that the query names the
   * bad input (x, U and V are checked before any output). */
  bool sane = d[1].ndim >= 1 && d[1].ndim <= FCT_MAX_DIMS && d[2].ndim == 2 && d[3].ndim == 2;
  int64_t n_out = sane ? d[2].shape[0] : 0;
  DLTensor* g[4];
  for (int i = 0; i < 3; ++i)
    g[i] = fct_call_grad(&c, need[i] && sane, d[i + 1].ndim, d[i + 1].shape);
  g[3] = fct_call_grad(&c, need[3] && sane, 1, &n_out);
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_linear_backward, &d[0], &d[1], &d[2], &d[3],
               &d[4], g[0], g[1], g[2], g[3]);
}

/* ------------------------------------------------------------------------- */
/* The flat-parameter variants                                               */
/* ------------------------------------------------------------------------- */
static const char kFlatWhat[] = "V [rank, in] then U [out_features, rank]";

/* Carves V [r, in] and U [out, r] (in = the last dim of x) out of `flat`. */
static void lowrank_views(fct_call* c, int64_t out, int64_t r, const DLTensor* flat,
                          const DLTensor* x, fct_carve* cv) {
  if (out < 1)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE, "out_features: expected >= 1, got %lld",
                  (long long)out);
  if (r < 1)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE, "rank: expected >= 1, got %lld", (long long)r);
  if (x->ndim < 1 || x->ndim > FCT_MAX_DIMS)
    fct_call_fail(c, FCT_ERR_SHAPE, "x: expected 1 to %d dims, got %d", FCT_MAX_DIMS, x->ndim);
  fct_carve_init(cv);
  fct_carve_add(cv, 2, (int64_t[2]){r, x->shape[x->ndim - 1]});
  fct_carve_add(cv, 2, (int64_t[2]){out, r});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kFlatWhat)) fct_call_raise(c, FCT_ERR_SHAPE);
}

void fct_lowrank_linear_flat_kernel(StableIValue* stack, uint64_t num_args,
                                    uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, d);
  int64_t out = fct_slot_int(stack[3]), r = fct_slot_int(stack[4]);
  fct_call_start(&c, 0);
  fct_carve cv;
  lowrank_views(&c, out, r, &d[1], &d[0], &cv); /* checks x's rank too */
  const DLTensor *V = cv.in[0], *U = cv.in[1];

  DLTensor* y = fct_batched_result(&c, &d[0], out);
  DLTensor* t = fct_batched_result(&c, &d[0], r);
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_linear_forward, &d[0], U, V,
               fct_nullable(&d[2]), y, t);
}

void fct_lowrank_linear_flat_backward_kernel(StableIValue* stack, uint64_t num_args,
                                             uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* grad_y, x, weights, t */
  fct_take_tensors(&c, stack, 4, d);
  int64_t out = fct_slot_int(stack[4]), r = fct_slot_int(stack[5]);
  bool need[3]; /* x, weights, bias */
  fct_slot_bools(stack + 6, 3, need);
  fct_call_start(&c, 1);
  fct_carve cv, gcv;
  lowrank_views(&c, out, r, &d[2], &d[1], &cv);
  fct_grads g;
  fct_alloc_grads(&c, &d[1], &cv, &gcv, out, need, kFlatWhat, &g);
  const DLTensor *V = cv.in[0], *U = cv.in[1];
  DLTensor* gV = need[1] ? gcv.out[0] : NULL;
  DLTensor* gU = need[1] ? gcv.out[1] : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lowrank_linear_backward, &d[0], &d[1], U, V, &d[3],
               g.gx, gU, gV, g.gb);
}
