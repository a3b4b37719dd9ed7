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
#include "glue_common.h"

/* The options, the seed read from its tensor when dropout is on. */
static void take_options(fct_call* c, const DLTensor* seed, double scale, double p,
                         fct_lora_options* o) {
  o->scale = scale;
  o->dropout = p;
  o->seed = 0;
  if (!(p > 0.0)) return; /* p = 0 needs no seed; bad p is the C op's to name */
  if (seed->device.device_type != kDLCPU || seed->dtype.code != kDLInt ||
      seed->dtype.bits != 64 || fct_numel(seed) != 1)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE,
                  "seed: expected a one-element int64 cpu tensor when dropout > 0, got %d dims of "
                  "%s on %s",
                  seed->ndim, fct_dtype_name(seed->dtype),
                  fct_device_name(seed->device.device_type));
  int64_t v;
  memcpy(&v, fct_data(seed), sizeof v);
  o->seed = (uint64_t)v;
}

/* The base and options from the slots base_kind, scale, dropout (`slots`)
 * and the views W, U, V (wuv[0 .. 2]), base_out, bias (NULL: not read) and
 * seed; the tensors of the other kinds are left NULL. */
static void lora_config(fct_call* c, const StableIValue* slots, const DLTensor* wuv,
                        const DLTensor* base_out, const DLTensor* bias, const DLTensor* seed,
                        fct_lora_base* b, fct_lora_options* o) {
  int64_t kind = fct_slot_int(slots[0]);
  memset(b, 0, sizeof *b);
  if (kind < FCT_LORA_DENSE || kind > FCT_LORA_GIVEN)
    fct_call_fail(c, FCT_ERR_INVALID_VALUE,
                  "base_kind: expected 0 (dense), 1 (low-rank) or 2 (given), got %lld",
                  (long long)kind);
  b->kind = (int32_t)kind;
  if (kind == FCT_LORA_DENSE) b->W = &wuv[0];
  if (kind == FCT_LORA_LOWRANK) {
    b->U = &wuv[1];
    b->V = &wuv[2];
  }
  if (kind == FCT_LORA_GIVEN) b->base_out = base_out;
  b->bias = bias ? fct_nullable(bias) : NULL;
  take_options(c, seed, fct_slot_double(slots[1]), fct_slot_double(slots[2]), o);
}

void fct_lora_linear_kernel(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[9]; /* x, A, B, W, U, V, base_out, bias, seed */
  fct_take_tensors(&c, stack, 9, d);
  fct_call_start(&c, 0);
  fct_lora_base base;
  fct_lora_options opts;
  lora_config(&c, stack + 9, &d[3], &d[6], &d[7], &d[8], &base, &opts);

  /* y [*lead, out], t [*lead, r], shaped only when x, A, B have sane ranks;
   * otherwise the query names the bad argument. */
  bool sane = d[1].ndim == 2 && d[2].ndim == 2;
  DLTensor* y = sane ? fct_batched_result(&c, &d[0], d[2].shape[0]) : NULL;
  DLTensor* t = y ? fct_batched_result(&c, &d[0], d[1].shape[0]) : NULL;
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lora_linear_forward, &d[0], &d[1], &d[2], &base, &opts,
               y, t);
}

void fct_lora_linear_backward_kernel(StableIValue* stack, uint64_t num_args,
                                     uint64_t num_outputs) {
  (void)num_args;
  fct_call c = {0};
  DLTensor d[9]; /* grad_y, x, A, B, W, U, V, t, seed */
  fct_take_tensors(&c, stack, 9, d);
  bool need[7]; /* x, A, B, W, U, V, bias */
  fct_slot_bools(stack + 12, 7, need);
  fct_call_start(&c, 1);
  fct_lora_base base;
  fct_lora_options opts;
  lora_config(&c, stack + 9, &d[4], NULL, NULL, &d[8], &base, &opts);
  const DLTensor* t = fct_numel(&d[7]) == 0 && d[7].ndim == 1 ? NULL : &d[7];

  /* Each gradient shaped as its input (x, A, B, W, U, V: d[1 .. 6]; bias:
   * [out], out = B's first dim); one asked for but of an input with a bad
   * rank is passed as NULL, so that the C op's checks of the inputs name it. */
  DLTensor* g[7];
  for (int i = 0; i < 6; ++i) {
    const DLTensor* like = &d[i + 1];
    bool sane = i == 0 ? like->ndim >= 1 && like->ndim <= FCT_MAX_DIMS : like->ndim == 2;
    g[i] = fct_call_grad(&c, need[i] && sane, like->ndim, like->shape);
  }
  g[6] = fct_call_grad(&c, need[6] && d[3].ndim == 2, 1, d[3].shape);
  fct_lora_grads grads = {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
  FCT_GLUE_RUN(&c, stack, num_outputs, fct_lora_linear_backward, &d[0], &d[1], &d[2], &d[3],
               &base, &opts, t, &grads);
}
