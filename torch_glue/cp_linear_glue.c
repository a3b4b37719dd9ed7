/*
 * Boxed torch kernels of the CP linear ops (schemas in register.c):
 *   factorch::cp_linear(x, weights, bias, in_modes, out_modes, rank) -> (y, z)
 *   factorch::cp_linear_backward(grad_y, x, weights, z, in_modes, out_modes, rank,
 *                                need_x, need_weights, need_bias) -> (gx, gweights, gb)
 * weights: the flat parameter, A_0 [i_0, R] .. A_(p-1), then B_0 [o_0, R] ..
 * B_(q-1), each row-major, back to back. The C ops: ops/cp_linear.c.
 */
#include <string.h>

#include "glue_common.h"

static const char kWhat[] = "the CP factors [mode, rank] of in_modes then out_modes";

/* Reads and checks the shape arguments; carves the factor views of `flat`. */
static void cp_views(fct_call* c, const fct_ints* im, const fct_ints* om, int64_t R,
                     const DLTensor* flat, const DLTensor* x, fct_carve* cv, int64_t* out) {
  if (!fct_check_ints(c, "in_modes", im, 1, FCT_MAX_MODES, "input mode sizes") ||
      !fct_check_ints(c, "out_modes", om, 1, FCT_MAX_MODES, "output mode sizes"))
    fct_call_end(c, FCT_ERR_INVALID_VALUE, NULL, 0);
  if (R < 1) fct_glue_fail(c, FCT_ERR_INVALID_VALUE, "rank: expected >= 1, got %lld", (long long)R);
  fct_carve_init(cv);
  for (int k = 0; k < im->n; ++k) fct_carve_add(cv, 2, (int64_t[2]){im->v[k], R});
  for (int k = 0; k < om->n; ++k) fct_carve_add(cv, 2, (int64_t[2]){om->v[k], R});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_end(c, FCT_ERR_SHAPE, NULL, 0);
  *out = 1;
  for (int k = 0; k < om->n; ++k)
    if (__builtin_mul_overflow(*out, om->v[k], out))
      fct_glue_fail(c, FCT_ERR_OVERFLOW, "out_modes: the product overflows int64");
}

void fct_cp_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, in, d);
  fct_ints im, om;
  fct_take_ints(stack[3], FCT_MAX_MODES, &im);
  fct_take_ints(stack[4], FCT_MAX_MODES, &om);
  int64_t R;
  memcpy(&R, &stack[5], sizeof R);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  int64_t out;
  cp_views(&c, &im, &om, R, &d[1], &d[0], &cv, &out);
  const DLTensor* bias = fct_numel(&d[2]) == 0 ? NULL : &d[2];

  AtenTensorHandle res[2] = {NULL, NULL};
  DLTensor dy, dz;
  int64_t shape[FCT_MAX_DIMS];
  int nd;
  bool sane = fct_batched_shape(&d[0], out, shape, &nd);
  if (sane) {
    int32_t dtype;
    aoti_torch_get_dtype(in[0], &dtype);
    res[0] = fct_call_empty(&c, dtype, nd, shape);
    shape[nd - 1] = R;
    res[1] = res[0] ? fct_call_empty(&c, dtype, nd, shape) : NULL;
    if (!res[1]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(res[0], &dy);
    fct_torch_view(res[1], &dz);
  }
  size_t bytes = 0;
  fct_status st = fct_cp_linear_forward_workspace(&c.ctx, &d[0], im.n, cv.in, om.n,
                                                  cv.in + im.n, bias, sane ? &dy : NULL,
                                                  sane ? &dz : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_cp_linear_forward(&c.ctx, &d[0], im.n, cv.in, om.n, cv.in + im.n, bias, &dy, &dz);
  fct_call_end(&c, st, res, 2);
  stack[0] = (StableIValue)(uintptr_t)res[0];
  stack[1] = (StableIValue)(uintptr_t)res[1];
}

void fct_cp_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                   uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[4];
  DLTensor d[4]; /* grad_y, x, weights, z */
  fct_take_tensors(&c, stack, 4, in, d);
  fct_ints im, om;
  fct_take_ints(stack[4], FCT_MAX_MODES, &im);
  fct_take_ints(stack[5], FCT_MAX_MODES, &om);
  int64_t R;
  memcpy(&R, &stack[6], sizeof R);
  bool need_x = (stack[7] & 0xff) != 0, need_w = (stack[8] & 0xff) != 0,
       need_b = (stack[9] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  int64_t out;
  cp_views(&c, &im, &om, R, &d[2], &d[1], &cv, &out);
  const DLTensor* z = fct_numel(&d[3]) == 0 ? NULL : &d[3];

  fct_grads g;
  fct_alloc_grads(&c, in[1], &d[1], &cv, &gcv, out, need_x, need_w, need_b, kWhat, &g);
  DLTensor* gx = g.gx;
  DLTensor* const* gA = need_w ? gcv.out : NULL;
  DLTensor* const* gB = need_w ? gcv.out + im.n : NULL;
  DLTensor* gb = g.gb;
  size_t bytes = 0;
  fct_status st = fct_cp_linear_backward_workspace(
      &c.ctx, &d[0], &d[1], im.n, cv.in, om.n, cv.in + im.n, z, gx,
      (const DLTensor* const*)gA, (const DLTensor* const*)gB, gb, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_cp_linear_backward(&c.ctx, &d[0], &d[1], im.n, cv.in, om.n, cv.in + im.n, z, gx, gA,
                                gB, gb);
  fct_call_end(&c, st, g.res, 3);
  for (int i = 0; i < 3; ++i) stack[i] = (StableIValue)(uintptr_t)g.res[i];
}
