/*
 * Boxed torch kernels of the LoRA linear ops (schemas in register.c):
 *   factorch::lora_linear(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale,
 *                         dropout) -> (y, t)
 *   factorch::lora_linear_backward(grad_y, x, A, B, W, U, V, t, seed, base_kind, scale,
 *                                  dropout, need_x, need_A, need_B, need_W, need_U,
 *                                  need_V, need_bias) -> (gx, gA, gB, gW, gU, gV, gbias)
 * base_kind: 0 dense (W), 1 low-rank (U, V), 2 given (base_out); the tensors
 * of the other kinds are ignored (the Python wrapper passes empty ones), as
 * are an empty bias and, when dropout is 0, the seed. seed: a one-element
 * int64 cpu tensor (drawn from torch's generator by the wrapper) whose bits
 * are the mask's seed. Gradients not asked for come back as empty [0]
 * tensors. The C ops: ops/lora_linear.c.
 */
#include <string.h>

#include "glue_common.h"

static double take_double(StableIValue v) {
  double d;
  memcpy(&d, &v, sizeof d);
  return d;
}

static int64_t take_int(StableIValue v) {
  int64_t i;
  memcpy(&i, &v, sizeof i);
  return i;
}

/* The options, the seed read from its tensor when dropout is on. */
static void take_options(fct_call* c, const DLTensor* seed, double scale, double p,
                         fct_lora_options* o) {
  o->scale = scale;
  o->dropout = p;
  o->seed = 0;
  if (!(p > 0.0)) return; /* p = 0 needs no seed; bad p is the C op's to name */
  if (seed->device.device_type != kDLCPU || seed->dtype.code != kDLInt ||
      seed->dtype.bits != 64 || fct_numel(seed) != 1)
    fct_glue_fail(c, FCT_ERR_INVALID_VALUE,
                  "seed: expected a one-element int64 cpu tensor when dropout > 0, got %d dims of "
                  "%s on %s",
                  seed->ndim, fct_dtype_name(seed->dtype), fct_device_name(seed->device.device_type));
  int64_t v;
  memcpy(&v, fct_data(seed), sizeof v);
  o->seed = (uint64_t)v;
}

/* The base of kind `kind` over the given views (the others left NULL). */
static void make_base(fct_call* c, int64_t kind, const DLTensor* W, const DLTensor* U,
                      const DLTensor* V, const DLTensor* base_out, const DLTensor* bias,
                      fct_lora_base* b) {
  memset(b, 0, sizeof *b);
  if (kind < FCT_LORA_DENSE || kind > FCT_LORA_GIVEN)
    fct_glue_fail(c, FCT_ERR_INVALID_VALUE,
                  "base_kind: expected 0 (dense), 1 (low-rank) or 2 (given), got %lld",
                  (long long)kind);
  b->kind = (int32_t)kind;
  if (kind == FCT_LORA_DENSE) b->W = W;
  if (kind == FCT_LORA_LOWRANK) {
    b->U = U;
    b->V = V;
  }
  if (kind == FCT_LORA_GIVEN) b->base_out = base_out;
  b->bias = bias && fct_numel(bias) != 0 ? bias : NULL;
}

void fct_lora_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[9];
  DLTensor d[9]; /* x, A, B, W, U, V, base_out, bias, seed */
  fct_take_tensors(&c, stack, 9, in, d);
  int64_t kind = take_int(stack[9]);
  double scale = take_double(stack[10]), p = take_double(stack[11]);
  if (!fct_call_begin(&c, in[0])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_lora_base base;
  make_base(&c, kind, &d[3], &d[4], &d[5], &d[6], &d[7], &base);
  fct_lora_options opts;
  take_options(&c, &d[8], scale, p, &opts);

  /* y [*lead, out], t [*lead, r], shaped only when x, A, B have sane ranks;
   * otherwise the query below names the bad argument. */
  AtenTensorHandle res[2] = {NULL, NULL};
  DLTensor dy, dt;
  int64_t shape[FCT_MAX_DIMS];
  int nd;
  bool sane = d[1].ndim == 2 && d[2].ndim == 2 && fct_batched_shape(&d[0], d[2].shape[0], shape, &nd);
  if (sane) {
    int32_t dtype;
    aoti_torch_get_dtype(in[0], &dtype);
    res[0] = fct_call_empty(&c, dtype, nd, shape);
    shape[nd - 1] = d[1].shape[0];
    res[1] = res[0] ? fct_call_empty(&c, dtype, nd, shape) : NULL;
    if (!res[1]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    fct_torch_view(res[0], &dy);
    fct_torch_view(res[1], &dt);
  }
  size_t bytes = 0;
  fct_status st = fct_lora_linear_forward_workspace(&c.ctx, &d[0], &d[1], &d[2], &base, &opts,
                                                    sane ? &dy : NULL, sane ? &dt : NULL, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_lora_linear_forward(&c.ctx, &d[0], &d[1], &d[2], &base, &opts, &dy, &dt);
  fct_call_end(&c, st, res, 2);
  stack[0] = (StableIValue)(uintptr_t)res[0];
  stack[1] = (StableIValue)(uintptr_t)res[1];
}

void fct_lora_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                     uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  fct_call c = {0};
  AtenTensorHandle in[9];
  DLTensor d[9]; /* grad_y, x, A, B, W, U, V, t, seed */
  fct_take_tensors(&c, stack, 9, in, d);
  int64_t kind = take_int(stack[9]);
  double scale = take_double(stack[10]), p = take_double(stack[11]);
  bool need[7]; /* x, A, B, W, U, V, bias */
  for (int i = 0; i < 7; ++i) need[i] = (stack[12 + i] & 0xff) != 0;
  if (!fct_call_begin(&c, in[1])) fct_call_end(&c, FCT_ERR_CUDA, NULL, 0);
  fct_lora_base base;
  make_base(&c, kind, &d[4], &d[5], &d[6], NULL, NULL, &base);
  fct_lora_options opts;
  take_options(&c, &d[8], scale, p, &opts);
  const DLTensor* t = fct_numel(&d[7]) == 0 && d[7].ndim == 1 ? NULL : &d[7];

  /* Each gradient shaped as its input (bias: [out], out = B's first dim);
   * one asked for but of an input with a bad rank is passed as NULL, so
   * that the C op's checks of the inputs name it. */
  const DLTensor* like[6] = {&d[1], &d[2], &d[3], &d[4], &d[5], &d[6]};
  int want_ndim[6] = {-1, 2, 2, 2, 2, 2};
  int32_t dtype;
  aoti_torch_get_dtype(in[1], &dtype);
  AtenTensorHandle res[7];
  DLTensor dg[7];
  DLTensor* pg[7] = {NULL};
  for (int i = 0; i < 7; ++i) {
    bool sane;
    if (i == 6) {
      sane = d[3].ndim == 2;
    } else {
      int nd = like[i]->ndim;
      sane = want_ndim[i] < 0 ? nd >= 1 && nd <= FCT_MAX_DIMS : nd == want_ndim[i];
    }
    bool make = need[i] && sane;
    if (make && i < 6) res[i] = fct_call_empty(&c, dtype, like[i]->ndim, like[i]->shape);
    else if (make) res[i] = fct_call_empty(&c, dtype, 1, &d[3].shape[0]);
    else res[i] = fct_call_none(&c, dtype);
    if (!res[i]) fct_call_end(&c, FCT_ERR_WORKSPACE, NULL, 0);
    if (make) {
      fct_torch_view(res[i], &dg[i]);
      pg[i] = &dg[i];
    }
  }
  fct_lora_grads grads = {pg[0], pg[1], pg[2], pg[3], pg[4], pg[5], pg[6]};
  size_t bytes = 0;
  fct_status st = fct_lora_linear_backward_workspace(&c.ctx, &d[0], &d[1], &d[2], &d[3], &base,
                                                     &opts, t, &grads, &bytes);
  if (st == FCT_OK && !fct_call_workspace(&c, bytes)) st = FCT_ERR_WORKSPACE;
  if (st == FCT_OK)
    st = fct_lora_linear_backward(&c.ctx, &d[0], &d[1], &d[2], &d[3], &base, &opts, t, &grads);
  fct_call_end(&c, st, res, 7);
  for (int i = 0; i < 7; ++i) stack[i] = (StableIValue)(uintptr_t)res[i];
}
