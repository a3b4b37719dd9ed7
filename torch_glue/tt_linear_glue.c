/*
 * Boxed torch kernels of the Tensor-Train linear ops (schemas in register.c):
 *   factorch::tt_linear(x, weights, bias, in_modes, out_modes, ranks) -> y
 *   factorch::tt_linear_backward(grad_y, x, weights, in_modes, out_modes, ranks,
 *                                need_x, need_weights, need_bias) -> (gx, gweights, gb)
 * weights: the flat parameter, the cores G_k [r_k, i_k, o_k, r_(k+1)]
 * row-major, back to back; ranks holds d + 1 values, the ends 1.
 * The C ops: ops/tt_linear.c.
 */
#include "glue_common.h"

static const char kWhat[] = "the TT cores [r_k, i_k, o_k, r_(k+1)] one after the other";

typedef struct tt_args {
  fct_ints im, om, r;
} tt_args;

static void take_args(const StableIValue* slots, tt_args* a) {
  fct_take_ints(slots[0], FCT_MAX_MODES, &a->im);
  fct_take_ints(slots[1], FCT_MAX_MODES, &a->om);
  fct_take_ints(slots[2], FCT_MAX_MODES + 1, &a->r);
}

static void tt_views(fct_call* c, const tt_args* a, const DLTensor* flat, const DLTensor* x,
                     fct_carve* cv, int64_t* out) {
  fct_tt_lists l = {"in_modes", "input mode sizes", "out_modes",
                    "output mode sizes (as many as in_modes)", &a->im, &a->om, &a->r};
  fct_tt_carve(c, &l, flat, x, kWhat, cv, out);
}

void fct_tt_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, in, d);
  tt_args a;
  take_args(stack + 3, &a);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  int64_t out;
  tt_views(&c, &a, &d[1], &d[0], &cv, &out);
  const DLTensor* bias = fct_numel(&d[2]) == 0 ? NULL : &d[2];

  AtenTensorHandle res[1] = {NULL};
  DLTensor dy;
  int64_t shape[FCT_MAX_DIMS];
  int nd;
  bool sane = fct_batched_shape(&d[0], out, shape, &nd);
  if (sane) {
    int32_t dtype;
    aoti_torch_get_dtype(in[0], &dtype);
    res[0] = fct_call_empty(&c, dtype, nd, shape);
    if (!res[0]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(res[0], &dy);
  }
  size_t bytes = 0;
  fct_status st = fct_tt_linear_forward_workspace(&c.ctx, &d[0], a.im.n, cv.in, bias,
                                                  sane ? &dy : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK) st = fct_tt_linear_forward(&c.ctx, &d[0], a.im.n, cv.in, bias, &dy);
  fct_call_end(&c, st, res, 1);
  stack[0] = (StableIValue)(uintptr_t)res[0];
}

void fct_tt_linear_backward_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* grad_y, x, weights */
  fct_take_tensors(&c, stack, 3, in, d);
  tt_args a;
  take_args(stack + 3, &a);
  bool need_x = (stack[6] & 0xff) != 0, need_w = (stack[7] & 0xff) != 0,
       need_b = (stack[8] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  int64_t out;
  tt_views(&c, &a, &d[2], &d[1], &cv, &out);

  fct_grads g;
  fct_alloc_grads(&c, in[1], &d[1], &cv, &gcv, out, need_x, need_w, need_b, kWhat, &g);
  DLTensor* gx = g.gx;
  DLTensor* const* gG = need_w ? gcv.out : NULL;
  DLTensor* gb = g.gb;
  size_t bytes = 0;
  fct_status st = fct_tt_linear_backward_workspace(&c.ctx, &d[0], &d[1], a.im.n, cv.in, gx,
                                                   (const DLTensor* const*)gG, gb, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_tt_linear_backward(&c.ctx, &d[0], &d[1], a.im.n, cv.in, gx, gG, gb);
  fct_call_end(&c, st, g.res, 3);
  for (int i = 0; i < 3; ++i) stack[i] = (StableIValue)(uintptr_t)g.res[i];
}
