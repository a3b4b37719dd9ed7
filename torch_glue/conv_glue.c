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
#include <string.h>

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
    fct_glue_fail(c, FCT_ERR_INVALID_VALUE,
                  "stages: expected %d ints per stage for 1 to %d stages, got %zu ints",
                  FCT_STAGE_INTS, FCT_MAX_STAGES, total);
  a->n = (int)(total / FCT_STAGE_INTS);
  for (int s = 0; s < a->n; ++s) {
    const int64_t* q = v + s * FCT_STAGE_INTS;
    fct_conv_stage st = {q[0], q[1], q[2],  q[3],  q[4],  q[5],  q[6],  q[7],
                         q[8], q[9], q[10], q[11], q[12], q[13], q[14], q[15]};
    a->st[s] = st;
  }
  fct_context q = {0}; /* c->ctx is set up later, by fct_call_begin */
  q.error = c->error;
  q.error_bytes = sizeof c->error;
  fct_status chk = fct_conv_chain_check(&q, a->n, a->st, &a->saved_per_image);
  if (chk != FCT_OK) fct_call_end(c, chk, NULL, 0);
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
  if (!fct_carve_bind(c, cv, flat, x, "weights", kWhat)) fct_call_end(c, FCT_ERR_SHAPE, NULL, 0);
}

void fct_conv_chain_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[3];
  DLTensor d[3]; /* x, weights, bias */
  fct_take_tensors(&c, stack, 3, in, d);
  cv_args a;
  int64_t out_shape[FCT_MAX_DIMS];
  int n_out = 0;
  size_t out_total = fct_take_int_array(stack[4], FCT_MAX_DIMS - 1, out_shape, &n_out);
  bool keep = (stack[5] & 0xff) != 0;
  take_stages(&c, stack[3], &a);
  if (out_total < 1 || out_total > FCT_MAX_DIMS - 1 || (size_t)n_out != out_total)
    fct_glue_fail(&c, FCT_ERR_INVALID_VALUE, "out_shape: expected 1 to %d sizes, got %zu",
                  FCT_MAX_DIMS - 1, out_total);
  /* out_shape must hold what the last stage writes per image. Checked here,
   * before y is allocated from it: the C op could only name y (an argument
   * the caller never passed), and huge sizes (2^62, or a product overflowing
   * int64) failed the allocation as "out of memory?" instead. */
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
    fct_glue_fail(&c, FCT_ERR_SHAPE,
                  "out_shape: expected non-negative sizes multiplying to %lld (the elements per "
                  "image the last stage writes), got [%s]",
                  (long long)last, got);
  }
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv;
  cv_views(&c, &a, &d[1], &d[0], &cv);
  const DLTensor* bias = fct_numel(&d[2]) == 0 ? NULL : &d[2];

  int32_t dtype;
  aoti_torch_get_dtype(in[0], &dtype);
  int64_t N = d[0].ndim >= 1 ? d[0].shape[0] : 0;
  int64_t shape[FCT_MAX_DIMS];
  shape[0] = N;
  for (int i = 0; i < n_out; ++i) shape[i + 1] = out_shape[i]; /* checked above */
  int64_t saved_n = 0;
  if (keep && __builtin_mul_overflow(N, a.saved_per_image, &saved_n))
    fct_glue_fail(&c, FCT_ERR_OVERFLOW, "x: N times the saved activations overflows");
  AtenTensorHandle res[2] = {fct_call_empty(&c, dtype, n_out + 1, shape),
                             fct_call_empty(&c, dtype, 1, keep ? &saved_n : &(int64_t){0})};
  if (!res[0] || !res[1]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
  DLTensor dy, ds;
  fct_torch_view(res[0], &dy);
  fct_torch_view(res[1], &ds);
  size_t bytes = 0;
  fct_status st = fct_conv_chain_forward_workspace(&c.ctx, &d[0], a.n, a.st, cv.in, bias, &dy,
                                                   keep ? &ds : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_conv_chain_forward(&c.ctx, &d[0], a.n, a.st, cv.in, bias, &dy, keep ? &ds : NULL);
  fct_call_end(&c, st, res, 2);
  stack[0] = (StableIValue)(uintptr_t)res[0];
  stack[1] = (StableIValue)(uintptr_t)res[1];
}

void fct_conv_chain_backward_kernel(StableIValue* stack, uint64_t num_args,
                                    uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[4];
  DLTensor d[4]; /* grad_y, x, weights, saved */
  fct_take_tensors(&c, stack, 4, in, d);
  cv_args a;
  take_stages(&c, stack[4], &a);
  bool need_x = (stack[5] & 0xff) != 0, need_w = (stack[6] & 0xff) != 0,
       need_b = (stack[7] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_carve cv, gcv;
  cv_views(&c, &a, &d[2], &d[1], &cv);
  int64_t cy = d[0].ndim >= 2 ? d[0].shape[1] : 0;
  fct_grads g;
  fct_alloc_grads(&c, in[1], &d[1], &cv, &gcv, cy, need_x, need_w, need_b, kWhat, &g);
  const DLTensor* saved = fct_numel(&d[3]) == 0 && a.n == 1 ? NULL : &d[3];
  DLTensor* const* gw = need_w ? gcv.out : NULL;
  size_t bytes = 0;
  fct_status st = fct_conv_chain_backward_workspace(&c.ctx, &d[0], &d[1], a.n, a.st, cv.in,
                                                    saved, g.gx, (const DLTensor* const*)gw,
                                                    g.gb, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_conv_chain_backward(&c.ctx, &d[0], &d[1], a.n, a.st, cv.in, saved, g.gx, gw, g.gb);
  fct_call_end(&c, st, g.res, 3);
  for (int i = 0; i < 3; ++i) stack[i] = (StableIValue)(uintptr_t)g.res[i];
}
