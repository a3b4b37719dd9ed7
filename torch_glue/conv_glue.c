/*
 * Boxed torch kernels of the convolution chain (schemas in register.c):
 *   factorch::conv_chain(x, weights, bias, stages, out_shape, keep) -> (y, saved)
 *   factorch::conv_chain_backward(grad_y, x, weights, saved, stages, need_x,
 *                                 need_weights, need_bias) -> (gx, gweights, gb)
 * stages: FCT_STAGE_INTS ints per stage, in the order of fct_conv_stage's
 * fields (factorch.h). weights: the flat parameter, each stage's weight
 * [out_channels, in_channels / groups, kh, kw] row-major, back to back.
 * y = [N, *out_shape]; saved: the intermediates for the backward ([0] when
 * keep is false). The C op: ops/conv_chain.c.
 */
#include <stdio.h>

#include "glue_common.h"

#define FCT_STAGE_INTS 16

static const char kWhat[] = "each stage's weight [out_channels, in_channels / groups, kh, kw]";

typedef struct cv_args {
  int n;
  fct_conv_stage st[FCT_MAX_STAGES];
  int64_t saved_per_image; /* elements the forward keeps per image */
} cv_args;

/* Reads and checks the stage list; on a malformed one raises naming `stages`. */
static void take_stages(fct_call* c, StableIValue slot, cv_args* a) {
  int64_t v[FCT_MAX_STAGES * FCT_STAGE_INTS];
  int got = 0;
  size_t total = fct_take_int_array(slot, FCT_MAX_STAGES * FCT_STAGE_INTS, v, &got);
  if (total == 0 || total % FCT_STAGE_INTS || total > (size_t)FCT_MAX_STAGES * FCT_STAGE_INTS ||
      (size_t)got != total)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE,
                  "stages: expected %d ints per stage for 1 to %d stages, got %zu ints",
                  FCT_STAGE_INTS, FCT_MAX_STAGES, total);
  a->n = (int)(total / FCT_STAGE_INTS);
  for (int s = 0; s < a->n; ++s) {
    const int64_t* q = v + s * FCT_STAGE_INTS;
    fct_conv_stage st = {q[0], q[1], q[2],  q[3],  q[4],  q[5],  q[6],  q[7],
                         q[8], q[9], q[10], q[11], q[12], q[13], q[14], q[15]};
    a->st[s] = st;
  }
  fct_context q = {0}; /* c->ctx is set up later, by fct_call_start */
  q.error = c->error;
  q.error_bytes = sizeof c->error;
  fct_status chk = fct_conv_chain_check(&q, a->n, a->st, &a->saved_per_image);
  if (chk != FCT_OK) fct_call_raise(c, chk);
}

/* Carves each stage's weight out of `flat`. */
static void cv_views(fct_call* c, const cv_args* a, const DLTensor* flat, const DLTensor* x,
                     fct_carve* cv) {
  fct_carve_init(cv);
  for (int s = 0; s < a->n; ++s) {
    const fct_conv_stage* st = &a->st[s];
    fct_carve_add(cv, 4,
                  (int64_t[4]){st->out_channels, st->in_channels / st->groups, st->kh, st->kw});
  }
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_raise(c, FCT_ERR_SHAPE);
}

void fct_conv_chain_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, d);
  cv_args a;
  int64_t out_shape[FCT_MAX_DIMS];
  int n_out = 0;
  size_t out_total = fct_take_int_array(stack[4], FCT_MAX_DIMS - 1, out_shape, &n_out);
  bool keep = fct_slot_bool(stack[5]);
  take_stages(&c, stack[3], &a);
  if (out_total < 1 || out_total > FCT_MAX_DIMS - 1 || (size_t)n_out != out_total)
    fct_call_fail(&c, FCT_ERR_INVALID_VALUE, "out_shape: expected 1 to %d sizes, got %zu",
                  FCT_MAX_DIMS - 1, out_total);
  /* out_shape must hold what the last stage writes per image. Checked here,
   * before y is allocated from it: the C op could only name y (an argument
   * the caller never passed), and huge sizes (2^62, or a product overflowing
   * int64) would fail the allocation as "out of memory?". */
  int64_t per_y = 1;
  bool out_ok = true;
  for (int i = 0; i < n_out; ++i)
    out_ok = out_ok && out_shape[i] >= 0 && !__builtin_mul_overflow(per_y, out_shape[i], &per_y);
  int64_t last = fct_conv_stage_out_numel(&a.st[a.n - 1]);
  if (!out_ok || per_y != last) {
    char got[160] = "";
    for (int i = 0, len = 0; i < n_out && len + 24 < (int)sizeof got; ++i)
      len += snprintf(got + len, sizeof got - (size_t)len, "%s%lld", i ? ", " : "",
                      (long long)out_shape[i]);
    fct_call_fail(&c, FCT_ERR_SHAPE,
                  "out_shape: expected non-negative sizes multiplying to %lld (the elements per "
                  "image the last stage writes), got [%s]",
                  (long long)last, got);
  }
  fct_call_start(&c, 0);
  fct_carve cv;
  cv_views(&c, &a, &d[1], &d[0], &cv);

  int64_t N = d[0].ndim >= 1 ? d[0].shape[0] : 0;
  int64_t shape[FCT_MAX_DIMS];
  shape[0] = N;
  for (int i = 0; i < n_out; ++i) shape[i + 1] = out_shape[i]; /* checked above */
  int64_t saved_n = 0;
  if (keep && __builtin_mul_overflow(N, a.saved_per_image, &saved_n))
    fct_call_fail(&c, FCT_ERR_OVERFLOW, "x: N times the saved activations overflows");
  DLTensor* y = fct_call_result(&c, n_out + 1, shape);
  DLTensor* saved = fct_call_result(&c, 1, &saved_n); /* [0] unless keep */
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_conv_chain_forward, &d[0], a.n, a.st, cv.in,
               fct_nullable(&d[2]), y, keep ? saved : NULL);
}

void fct_conv_chain_backward_kernel(StableIValue* stack, uint64_t num_args,
                                    uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[4]; /* grad_y, x, weights, saved */
  fct_take_tensors(&c, stack, 4, d);
  cv_args a;
  take_stages(&c, stack[4], &a);
  bool need[3]; /* x, weights, bias */
  fct_slot_bools(stack + 5, 3, need);
  fct_call_start(&c, 1);
  fct_carve cv, gcv;
  cv_views(&c, &a, &d[2], &d[1], &cv);
  int64_t cy = d[0].ndim >= 2 ? d[0].shape[1] : 0;
  fct_grads g;
  fct_alloc_grads(&c, &d[1], &cv, &gcv, cy, need, kWhat, &g);
  /* An empty saved is absent only for one stage; the op names it otherwise. */
  const DLTensor* saved = a.n == 1 ? fct_nullable(&d[3]) : &d[3];
  DLTensor* const* gw = need[1] ? gcv.out : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_conv_chain_backward, &d[0], &d[1], a.n, a.st, cv.in,
               saved, g.gx, fct_out_views(gw), g.gb);
}
