/*
 * Boxed torch kernels of the Tucker linear ops (schemas in register.c):
 *   factorch::tucker_linear(x, weights, bias, in_modes, out_modes, in_ranks, out_ranks) -> y
 *   factorch::tucker_linear_backward(grad_y, x, weights, in_modes, out_modes, in_ranks,
 *                                    out_ranks, need_x, need_weights, need_bias)
 *       -> (gx, gweights, gb)
 * weights: the flat parameter, core [s_0..s_(q-1), t_0..t_(p-1)] (S x T),
 * then V_k [i_k, t_k] for the input modes, then U_k [o_k, s_k] for the
 * output modes, each row-major, back to back. The C ops: ops/tucker_linear.c.
 */
#include "glue_common.h"

static const char kWhat[] =
    "the Tucker core [out_ranks..., in_ranks...] then the factors [mode, rank] of in_modes then "
    "out_modes";

typedef struct tk_args {
  fct_ints im, om, ir, orr;
} tk_args;

static void take_args(const StableIValue* slots, tk_args* a) {
  fct_take_ints(slots[0], FCT_MAX_MODES, &a->im);
  fct_take_ints(slots[1], FCT_MAX_MODES, &a->om);
  fct_take_ints(slots[2], FCT_MAX_MODES, &a->ir);
  fct_take_ints(slots[3], FCT_MAX_MODES, &a->orr);
}

/* Checks the shape arguments and carves core, V_k, U_k out of `flat`. */
static void tk_views(fct_call* c, const tk_args* a, const DLTensor* flat, const DLTensor* x,
                     fct_carve* cv, int64_t* out) {
  if (!fct_check_ints(c, "in_modes", &a->im, 1, FCT_MAX_MODES, "input mode sizes") ||
      !fct_check_ints(c, "out_modes", &a->om, 1, FCT_MAX_MODES, "output mode sizes") ||
      !fct_check_ints(c, "in_ranks", &a->ir, a->im.n, a->im.n, "ranks (one per input mode)") ||
      !fct_check_ints(c, "out_ranks", &a->orr, a->om.n, a->om.n, "ranks (one per output mode)"))
    fct_call_end(c, FCT_ERR_INVALID_VALUE, NULL, 0);
  int64_t S = 1, T = 1;
  *out = 1;
  bool over = false;
  for (int k = 0; k < a->im.n; ++k) over |= __builtin_mul_overflow(T, a->ir.v[k], &T);
  for (int k = 0; k < a->om.n; ++k) {
    over |= __builtin_mul_overflow(S, a->orr.v[k], &S);
    over |= __builtin_mul_overflow(*out, a->om.v[k], out);
  }
  if (over) fct_glue_fail(c, FCT_ERR_OVERFLOW, "in_ranks/out_ranks: the core size overflows");
  fct_carve_init(cv);
  fct_carve_add(cv, 2, (int64_t[2]){S, T});
  for (int k = 0; k < a->im.n; ++k) fct_carve_add(cv, 2, (int64_t[2]){a->im.v[k], a->ir.v[k]});
  for (int k = 0; k < a->om.n; ++k) fct_carve_add(cv, 2, (int64_t[2]){a->om.v[k], a->orr.v[k]});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_end(c, FCT_ERR_SHAPE, NULL, 0);
}

void fct_tucker_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, in, d);
  tk_args a;
  take_args(stack + 3, &a);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  int64_t out;
  tk_views(&c, &a, &d[1], &d[0], &cv, &out);
  const DLTensor* bias = fct_numel(&d[2]) == 0 ? NULL : &d[2];
  int n_in = a.im.n, n_out = a.om.n;

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
  fct_status st = fct_tucker_linear_forward_workspace(&c.ctx, &d[0], cv.in[0], n_in, cv.in + 1,
                                                      n_out, cv.in + 1 + n_in, bias,
                                                      sane ? &dy : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_tucker_linear_forward(&c.ctx, &d[0], cv.in[0], n_in, cv.in + 1, n_out,
                                   cv.in + 1 + n_in, bias, &dy);
  fct_call_end(&c, st, res, 1);
  stack[0] = (StableIValue)(uintptr_t)res[0];
}

void fct_tucker_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                       uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* grad_y, x, weights */
  fct_take_tensors(&c, stack, 3, in, d);
  tk_args a;
  take_args(stack + 3, &a);
  bool need_x = (stack[7] & 0xff) != 0, need_w = (stack[8] & 0xff) != 0,
       need_b = (stack[9] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  int64_t out;
  tk_views(&c, &a, &d[2], &d[1], &cv, &out);
  int n_in = a.im.n, n_out = a.om.n;

  fct_grads g;
  fct_alloc_grads(&c, in[1], &d[1], &cv, &gcv, out, need_x, need_w, need_b, kWhat, &g);
  DLTensor* gx = g.gx;
  DLTensor* gcore = need_w ? gcv.out[0] : NULL;
  DLTensor* const* gV = need_w ? gcv.out + 1 : NULL;
  DLTensor* const* gU = need_w ? gcv.out + 1 + n_in : NULL;
  DLTensor* gb = g.gb;
  size_t bytes = 0;
  fct_status st = fct_tucker_linear_backward_workspace(
      &c.ctx, &d[0], &d[1], cv.in[0], n_in, cv.in + 1, n_out, cv.in + 1 + n_in, gx, gcore,
      (const DLTensor* const*)gV, (const DLTensor* const*)gU, gb, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_tucker_linear_backward(&c.ctx, &d[0], &d[1], cv.in[0], n_in, cv.in + 1, n_out,
                                    cv.in + 1 + n_in, gx, gcore, gV, gU, gb);
  fct_call_end(&c, st, g.res, 3);
  for (int i = 0; i < 3; ++i) stack[i] = (StableIValue)(uintptr_t)g.res[i];
}
