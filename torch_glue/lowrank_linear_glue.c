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
#include <string.h>

#include "glue_common.h"
#include "tensor_view.h"
#include "fct_tensor.h"

/* Input handles arrive owned by the kernel: record them for release. */
static void take_inputs(fct_call* c, const StableIValue* stack, int n, AtenTensorHandle* h,
                        DLTensor* dl) {
  for (int i = 0; i < n; ++i) {
    h[i] = (AtenTensorHandle)(uintptr_t)stack[i];
    c->owned.h[c->owned.n++] = h[i];
    fct_torch_view(h[i], &dl[i]);
  }
}

static bool numel_zero(const DLTensor* t) { return fct_numel(t) == 0; }

void fct_lowrank_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[4];
  DLTensor d[4]; /* x, U, V, bias */
  take_inputs(&c, stack, 4, in, d);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  const DLTensor* bias = numel_zero(&d[3]) ? NULL : &d[3];

  /* Outputs y [*lead, out], t [*lead, r], shaped only when x, U, V have sane
   * ranks; otherwise the query below names the bad argument. */
  AtenTensorHandle out[2] = {NULL, NULL};
  DLTensor dy, dt;
  bool sane = d[0].ndim >= 1 && d[0].ndim <= 8 && d[1].ndim == 2 && d[2].ndim == 2;
  if (sane) {
    int64_t shape[8];
    int32_t dtype;
    aoti_torch_get_dtype(in[0], &dtype);
    for (int i = 0; i < d[0].ndim - 1; ++i) shape[i] = d[0].shape[i];
    shape[d[0].ndim - 1] = d[1].shape[0];
    out[0] = fct_call_empty(&c, dtype, d[0].ndim, shape);
    shape[d[0].ndim - 1] = d[2].shape[0];
    out[1] = out[0] ? fct_call_empty(&c, dtype, d[0].ndim, shape) : NULL;
    if (!out[1]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(out[0], &dy);
    fct_torch_view(out[1], &dt);
  }
  size_t bytes = 0;
  fct_status st = fct_lowrank_linear_forward_workspace(&c.ctx, &d[0], &d[1], &d[2], bias,
                                                       sane ? &dy : NULL, sane ? &dt : NULL,
                                                       &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK) st = fct_lowrank_linear_forward(&c.ctx, &d[0], &d[1], &d[2], bias, &dy, &dt);
  fct_call_end(&c, st, out, 2);
  stack[0] = (StableIValue)(uintptr_t)out[0];
  stack[1] = (StableIValue)(uintptr_t)out[1];
}

void fct_lowrank_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                        uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[5];
  DLTensor d[5]; /* grad_y, x, U, V, t */
  take_inputs(&c, stack, 5, in, d);
  bool need[4];
  for (int i = 0; i < 4; ++i) need[i] = (stack[5 + i] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);

  /* grad_x like x, grad_U like U, grad_V like V, grad_bias [out]; an empty
   * [0] tensor stands for a gradient not asked for. */
  const DLTensor* like[4] = {&d[1], &d[2], &d[3], NULL};
  AtenTensorHandle out[4];
  DLTensor dg[4];
  DLTensor* pg[4] = {NULL, NULL, NULL, NULL};
  int32_t dtype;
  aoti_torch_get_dtype(in[1], &dtype);
  bool sane = d[1].ndim >= 1 && d[1].ndim <= 8 && d[2].ndim == 2 && d[3].ndim == 2;
  for (int i = 0; i < 4; ++i) {
    int64_t zero = 0, nout = sane ? d[2].shape[0] : 0;
    bool make = need[i] && sane;
    if (make && i < 3)
      out[i] = fct_call_empty(&c, dtype, like[i]->ndim, like[i]->shape);
    else if (make)
      out[i] = fct_call_empty(&c, dtype, 1, &nout);
    else
      out[i] = fct_call_empty(&c, dtype, 1, &zero);
    if (!out[i]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    if (make) {
      fct_torch_view(out[i], &dg[i]);
      pg[i] = &dg[i];
    }
  }
  /* Asked-for gradients with insane ranks: pass a NULL output so the query
   * names the bad input (x, U or V are checked before any output). */
  size_t bytes = 0;
  fct_status st = fct_lowrank_linear_backward_workspace(&c.ctx, &d[0], &d[1], &d[2], &d[3],
                                                        &d[4], pg[0], pg[1], pg[2], pg[3],
                                                        &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_lowrank_linear_backward(&c.ctx, &d[0], &d[1], &d[2], &d[3], &d[4], pg[0], pg[1],
                                     pg[2], pg[3]);
  fct_call_end(&c, st, out, 4);
  for (int i = 0; i < 4; ++i) stack[i] = (StableIValue)(uintptr_t)out[i];
}

/* ------------------------------------------------------------------------- */
/* The flat-parameter variants                                               */
/* ------------------------------------------------------------------------- */
static const char kFlatWhat[] = "V [rank, in] then U [out_features, rank]";

/* Carves V [r, in] and U [out, r] (in = the last dim of x) out of `flat`. */
static void lowrank_views(fct_call* c, int64_t out, int64_t r, const DLTensor* flat,
                          const DLTensor* x, fct_carve* cv) {
  if (out < 1)
    fct_glue_fail(c, FCT_ERR_INVALID_VALUE, "out_features: expected >= 1, got %lld",
                  (long long)out);
  if (r < 1) fct_glue_fail(c, FCT_ERR_INVALID_VALUE, "rank: expected >= 1, got %lld", (long long)r);
  if (x->ndim < 1 || x->ndim > FCT_MAX_DIMS)
    fct_glue_fail(c, FCT_ERR_SHAPE, "x: expected 1 to %d dims, got %d", FCT_MAX_DIMS, x->ndim);
  fct_carve_init(cv);
  fct_carve_add(cv, 2, (int64_t[2]){r, x->shape[x->ndim - 1]});
  fct_carve_add(cv, 2, (int64_t[2]){out, r});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kFlatWhat))
    fct_call_end(c, FCT_ERR_SHAPE, NULL, 0);
}

void fct_lowrank_linear_flat_kernel(StableIValue* stack, uint64_t num_args,
                                    uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, in, d);
  int64_t out, r;
  memcpy(&out, &stack[3], sizeof out);
  memcpy(&r, &stack[4], sizeof r);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  lowrank_views(&c, out, r, &d[1], &d[0], &cv);
  const DLTensor* bias = numel_zero(&d[2]) ? NULL : &d[2];

  AtenTensorHandle res[2] = {NULL, NULL};
  DLTensor dy, dt;
  int64_t shape[FCT_MAX_DIMS];
  int nd;
  if (!fct_batched_shape(&d[0], out, shape, &nd)) fct_call_end(&c, FCT_ERR_SHAPE, NULL, 0);
  int32_t dtype;
  aoti_torch_get_dtype(in[0], &dtype);
  res[0] = fct_call_empty(&c, dtype, nd, shape);
  shape[nd - 1] = r;
  res[1] = res[0] ? fct_call_empty(&c, dtype, nd, shape) : NULL;
  if (!res[1]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
  fct_torch_view(res[0], &dy);
  fct_torch_view(res[1], &dt);
  size_t bytes = 0;
  const DLTensor *V = cv.in[0], *U = cv.in[1];
  fct_status st = fct_lowrank_linear_forward_workspace(&c.ctx, &d[0], U, V, bias, &dy, &dt,
                                                       &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK) st = fct_lowrank_linear_forward(&c.ctx, &d[0], U, V, bias, &dy, &dt);
  fct_call_end(&c, st, res, 2);
  stack[0] = (StableIValue)(uintptr_t)res[0];
  stack[1] = (StableIValue)(uintptr_t)res[1];
}

void fct_lowrank_linear_flat_backward_kernel(StableIValue* stack, uint64_t num_args,
                                             uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[4];
  DLTensor d[4]; /* grad_y, x, weights, t */
  fct_take_tensors(&c, stack, 4, in, d);
  int64_t out, r;
  memcpy(&out, &stack[4], sizeof out);
  memcpy(&r, &stack[5], sizeof r);
  bool need_x = (stack[6] & 0xff) != 0, need_w = (stack[7] & 0xff) != 0,
       need_b = (stack[8] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  lowrank_views(&c, out, r, &d[2], &d[1], &cv);
  fct_grads g;
  fct_alloc_grads(&c, in[1], &d[1], &cv, &gcv, out, need_x, need_w, need_b, kFlatWhat, &g);
  const DLTensor *V = cv.in[0], *U = cv.in[1];
  DLTensor* gV = need_w ? gcv.out[0] : NULL;
  DLTensor* gU = need_w ? gcv.out[1] : NULL;
  size_t bytes = 0;
  fct_status st = fct_lowrank_linear_backward_workspace(&c.ctx, &d[0], &d[1], U, V, &d[3], g.gx,
                                                        gU, gV, g.gb, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_lowrank_linear_backward(&c.ctx, &d[0], &d[1], U, V, &d[3], g.gx, gU, gV, g.gb);
  fct_call_end(&c, st, g.res, 3);
  for (int i = 0; i < 3; ++i) stack[i] = (StableIValue)(uintptr_t)g.res[i];
}
