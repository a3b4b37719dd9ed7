/*
 * Boxed torch kernels of the Tucker linear ops (schemas in register.c):
 *   factorch::tucker_linear(x, weights, bias, in_modes, out_modes, in_ranks, out_ranks, keep)
 *       -> (y, states)
 *   factorch::tucker_linear_backward(grad_y, x, weights, states, in_modes, out_modes,
 *                                    in_ranks, out_ranks, need_x, need_weights, need_bias)
 *       -> (gx, gweights, gb)
 * states: what the forward keeps for the backward (fct_tucker_linear_states:
 * M·(T + S) elements), [0] unless keep and the shapes keep states; an empty
 * states makes the backward recompute.
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
    fct_call_raise(c, FCT_ERR_INVALID_VALUE);
  int64_t S = 1, T = 1;
  *out = 1;
  bool over = false;
  for (int k = 0; k < a->im.n; ++k) over |= __builtin_mul_overflow(T, a->ir.v[k], &T);
  for (int k = 0; k < a->om.n; ++k) {
    over |= __builtin_mul_overflow(S, a->orr.v[k], &S);
    over |= __builtin_mul_overflow(*out, a->om.v[k], out);
  }
  if (over) fct_call_fail(c, FCT_ERR_OVERFLOW, "in_ranks/out_ranks: the core size overflows");
  fct_carve_init(cv);
  fct_carve_add(cv, 2, (int64_t[2]){S, T});
  for (int k = 0; k < a->im.n; ++k) fct_carve_add(cv, 2, (int64_t[2]){a->im.v[k], a->ir.v[k]});
  for (int k = 0; k < a->om.n; ++k) fct_carve_add(cv, 2, (int64_t[2]){a->om.v[k], a->orr.v[k]});
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_raise(c, FCT_ERR_SHAPE);
}

void fct_tucker_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, d);
  tk_args a;
  take_args(stack + 3, &a);
  fct_call_start(&c, 0);
  fct_carve cv;
  int64_t out;
  tk_views(&c, &a, &d[1], &d[0], &cv, &out);
  int n_in = a.im.n, n_out = a.om.n;

  bool keep = fct_slot_bool(stack[7]);
  int64_t per_row = 0, M = 1, states_n = 0;
  if (keep && fct_tucker_linear_states(n_in, a.im.v, a.ir.v, n_out, a.om.v, a.orr.v,
                                       &per_row) != FCT_OK)
    per_row = 0; /* the op names the bad argument */
  for (int i = 0; i + 1 < d[0].ndim; ++i) /* the op checks M < 2^31 */
    if (__builtin_mul_overflow(M, d[0].shape[i], &M)) M = 0;
  if (d[0].ndim < 1 || __builtin_mul_overflow(M, per_row, &states_n)) states_n = 0;
  DLTensor* y = fct_batched_result(&c, &d[0], out); /* NULL: the query names x */
  DLTensor* states = y ? fct_call_result(&c, 1, &states_n) : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tucker_linear_forward, &d[0], cv.in[0], n_in,
               cv.in + 1, n_out, cv.in + 1 + n_in, fct_nullable(&d[2]), y,
               per_row > 0 ? states : NULL);
}

void fct_tucker_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                       uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* grad_y, x, weights, states */
  fct_take_tensors(&c, stack, 4, d);
  tk_args a;
  take_args(stack + 4, &a);
  bool need[3]; /* x, weights, bias */
  fct_slot_bools(stack + 8, 3, need);
  fct_call_start(&c, 1);
  fct_carve cv, gcv;
  int64_t out;
  tk_views(&c, &a, &d[2], &d[1], &cv, &out);
  int n_in = a.im.n, n_out = a.om.n;

  fct_grads g;
  fct_alloc_grads(&c, &d[1], &cv, &gcv, out, need, kWhat, &g);
  DLTensor* gcore = need[1] ? gcv.out[0] : NULL;
  DLTensor* const* gV = need[1] ? gcv.out + 1 : NULL;
  DLTensor* const* gU = need[1] ? gcv.out + 1 + n_in : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_tucker_linear_backward, &d[0], &d[1], cv.in[0], n_in,
               cv.in + 1, n_out, cv.in + 1 + n_in, fct_nullable(&d[3]), g.gx, gcore,
               fct_out_views(gV),
               fct_out_views(gU), g.gb);
}
