/*
 * Boxed torch kernels of the low-rank linear ops (schemas in register.c):
 *   factorch::lowrank_linear(x, U, V, bias) -> (y, t)
 *   factorch::lowrank_linear_backward(grad_y, x, U, V, t, need_x, need_U,
 *                                     need_V, need_bias) -> (gx, gU, gV, gb)
 * Inputs become DLTensor views (no copies); outputs and workspace come from
 * torch's allocator; the C ops are in ops/lowrank_linear.c.
 */
#include "lowrank_linear_glue.h"

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
