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
  fct_call c = {0};
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, d);
  tt_args a;
  take_args(stack + 3, &a);
  fct_call_start(&c, 0);
  fct_carve cv;
  int64_t out;
  tt_views(&c, &a, &d[1], &d[0], &cv, &out);

  DLTensor* y = fct_batched_result(&c, &d[0], out); /* NULL: the query names x */
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tt_linear_forward, &d[0], a.im.n, cv.in,
               fct_nullable(&d[2]), y);
}

void fct_tt_linear_backward_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* grad_y, x, weights */
  fct_take_tensors(&c, stack, 3, d);
  tt_args a;
  take_args(stack + 3, &a);
  bool need[3]; /* x, weights, bias */
  fct_slot_bools(stack + 6, 3, need);
  fct_call_start(&c, 1);
  fct_carve cv, gcv;
  int64_t out;
  tt_views(&c, &a, &d[2], &d[1], &cv, &out);

  fct_grads g;
  fct_alloc_grads(&c, &d[1], &cv, &gcv, out, need, kWhat, &g);
  DLTensor* const* gG = need[1] ? gcv.out : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tt_linear_backward, &d[0], &d[1], a.im.n, cv.in, g.gx,
               fct_out_views(gG), g.gb);
}
