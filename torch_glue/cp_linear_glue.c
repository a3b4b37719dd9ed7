/*
 * Boxed torch kernels of the CP linear ops (schemas in register.c):
 *   factorch::cp_linear(x, weights, bias, in_modes, out_modes, rank) -> (y, z)
 *   factorch::cp_linear_backward(grad_y, x, weights, z, in_modes, out_modes, rank,
 *                                need_x, need_weights, need_bias) -> (gx, gweights, gb)
 * weights: the flat parameter, A_0 [i_0, R] .. A_(p-1), then B_0 [o_0, R] ..
 * B_(q-1), each row-major, back to back. The C ops: ops/cp_linear.c.
 */
#include "glue_common.h"

static const char kWhat[] = "the CP factors [mode, rank] of in_modes then out_modes";

/* Reads and checks the shape arguments; carves the factor views of `flat`. */
static void cp_views(fct_call* c, const fct_ints* im, const fct_ints* om, int64_t R,
                     const DLTensor* flat, const DLTensor* x, fct_carve* cv, int64_t* out) {
  if (!fct_check_ints(c, "in_modes", im, 1, FCT_MAX_MODES, "input mode sizes") ||
      !fct_check_ints(c, "out_modes", om, 1, FCT_MAX_MODES, "output mode sizes"))
    fct_call_raise(c, FCT_ERR_INVALID_VALUE);
  if (R < 1) fct_call_fail(c, FCT_ERR_INVALID_VALUE, "rank: expected >= 1, got %lld", (long long)R);
  fct_carve_init(cv);
  for (int k = 0; k < im->n; ++k) fct_carve_add(cv, 2, (int64_t[2]){im->v[k], R});
  for (int k = 0; k < om->n; ++k) fct_carve_add(cv, 2, (int64_t[2]){om->v[k], R});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_raise(c, FCT_ERR_SHAPE);
  *out = 1;
  for (int k = 0; k < om->n; ++k)
    if (__builtin_mul_overflow(*out, om->v[k], out))
      fct_call_fail(c, FCT_ERR_OVERFLOW, "out_modes: the product overflows int64");
}

void fct_cp_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, d);
  fct_ints im, om;
  fct_take_ints(stack[3], FCT_MAX_MODES, &im);
  fct_take_ints(stack[4], FCT_MAX_MODES, &om);
  int64_t R = fct_slot_int(stack[5]);
  fct_call_start(&c, 0);
  fct_carve cv;
  int64_t out;
  cp_views(&c, &im, &om, R, &d[1], &d[0], &cv, &out);

  /* y [*lead, out], z [*lead, R]; not made when x's rank is bad (the query
   * then names x). */
  DLTensor* y = fct_batched_result(&c, &d[0], out);
  DLTensor* z = y ? fct_batched_result(&c, &d[0], R) : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_cp_linear_forward, &d[0], im.n, cv.in, om.n,
               cv.in + im.n, fct_nullable(&d[2]), y, z);
}

void fct_cp_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                   uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* grad_y, x, weights, z */
  fct_take_tensors(&c, stack, 4, d);
  fct_ints im, om;
  fct_take_ints(stack[4], FCT_MAX_MODES, &im);
  fct_take_ints(stack[5], FCT_MAX_MODES, &om);
  int64_t R = fct_slot_int(stack[6]);
  bool need[3]; /* x, weights, bias */
  fct_slot_bools(stack + 7, 3, need);
  fct_call_start(&c, 1);
  fct_carve cv, gcv;
  int64_t out;
  cp_views(&c, &im, &om, R, &d[2], &d[1], &cv, &out);

  fct_grads g;
  fct_alloc_grads(&c, &d[1], &cv, &gcv, out, need, kWhat, &g);
  DLTensor* const* gA = need[1] ? gcv.out : NULL;
  DLTensor* const* gB = need[1] ? gcv.out + im.n : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_cp_linear_backward, &d[0], &d[1], im.n, cv.in, om.n,
               cv.in + im.n, fct_nullable(&d[3]), g.gx, fct_out_views(gA), fct_out_views(gB),
               g.gb);
}
