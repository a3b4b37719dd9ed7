/*
 * Convolution chain entry points (factorch.h, "Factorized convolutions"):
 * every factorized convolution (CP, Tucker-2, low-rank, TT) is a chain of
 * small convolution stages run image by image in one call. Device
 * independent: checks, plan, workspace layout, then backend primitives
 * (backend.h: im2col/col2im, depthwise kernels, batched GEMMs).
 *
 * How a stage runs, per item [Ci, H, W] -> [Co, OH, OW] (P = OH·OW), each
 * group g of Cig = Ci/groups input and Cog = Co/groups output channels:
 *  - depthwise (Cig = Cog = 1, the CP filters): a direct kernel; im2col
 *    would copy kh·kw times the input to multiply it by one number per row.
 *  - direct (1x1, stride 1, no padding: the channel mixers): the item is
 *    already the [Ci, P] matrix: out_g [Cog, P] = W_g [Cog, Cig] · in_g.
 *  - im2col (anything else): col [Ci·kh·kw, P] = im2col(in), then
 *    out_g [Cog, P] = W_g [Cog, Cig·kh·kw] · col_g, one GEMM per group batched
 *    over the items of a chunk.
 * Backward, per stage from the last: the weight gradient
 *   gW_g += Σ_items gout_g · in_gᵀ (or · col_gᵀ; depthwise: a direct kernel)
 * and the input gradient gin_g = W_gᵀ · gout_g (through col2im for im2col
 * stages, reusing the col buffer once gW is done).
 *
 * Memory: the forward writes the intermediate activations into `saved`
 * (the backward needs each stage's input for its weight gradient; they have
 * rank-sized channel counts, so they are small next to x), or, for
 * inference, into two chunk-sized workspace buffers. A depthwise stage
 * inside the chain (CP's kh x 1 and 1 x kw filters) is not saved: its
 * output costs kh·kw multiply-adds per element to recompute from its input
 * (saved, or itself recomputed), which the backward does chunk by chunk
 * into workspace buffers; for CP that keeps one rank-sized activation per
 * image instead of three. Images are processed in
 * chunks sized so that the chunk's im2col buffer and intermediates stay
 * within 2·FCT_*_CHUNK_BYTES (one image at least), so col is still in cache
 * when its GEMM reads it. On the CPU each thread of the pool takes its own
 * share of the images (plan_layout says why); on CUDA one worker runs the
 * chunks and the device parallelises inside each primitive.
 *
 * Chains that compose into one convolution may instead form its dense
 * kernel and run one dense stage ("form W", end of the file), when the cost
 * model prices that lower for the call's batch.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "op_common.h"

typedef enum { CC_DEPTHWISE, CC_DIRECT, CC_IM2COL } cc_kind;

typedef struct cc_stage {
  fct_conv_stage st;
  cc_kind kind;
  fct_conv_geom geom; /* C = all input channels of an item */
  int64_t Cig, Cog, K, P_in, P;
  int64_t in_numel, out_numel; /* per image */
  int64_t col_numel;           /* per image, im2col stages */
  fct_param w;                 /* [Co, K] (depthwise: [C, kh·kw]) */
  /* The composed stage of "form W" (below): w.m is the formed Wᵀ
   * [Ci·kh·kw, Co] (row stride ld = Co, zero outside the groups' blocks),
   * not a weight tensor; its gradient is written in the same layout. */
  bool wt;
  int64_t ld;
  const char* wd; /* formed W: also as the dense weight [Co, K] (read by the GEMMs), or NULL */
  /* An im2col stage whose input is one kernel-sized patch (one output
   * pixel, no padding or dilation: the basis images of form W): col is the
   * input itself. */
  bool col_is_in;
} cc_stage;

typedef struct cc_plan {
  int S;
  cc_stage s[FCT_MAX_STAGES];
  int64_t N, Cy, Py;
  int64_t saved_per_image, saved_off[FCT_MAX_STAGES]; /* per image, stage s's block */
  bool recompute[FCT_MAX_STAGES]; /* stage s's output is not saved (chain_init) */
  bool any_recompute;
  fct_dtype dt;
  size_t es;
  bool cuda, backward, keep, pack_x, pack_g, check;
  bool gx, gw, gb;
  int64_t Nc;    /* images per chunk */
  int T;         /* workers, each with its own images and workspace region */
  int64_t wnumel; /* elements of all the weights (a worker's gradient partials) */
  size_t off_x, off_g, off_scratch, bytes;
  /* inside each worker's region, which starts at off_worker + w·worker_bytes */
  size_t off_worker, worker_bytes, off_col, off_a, off_b, off_red, red_bytes, off_part;
  size_t off_rc[FCT_MAX_STAGES]; /* backward: stage s's recomputed output (recompute[s]) */
} cc_plan;

#define CC_MAX_WORKERS 64

/* ------------------------------------------------------------------------- */
/* Stage checks                                                               */
/* ------------------------------------------------------------------------- */

static fct_status stage_fail(fct_context* ctx, int i, const char* what, long long a,
                             long long b) {
  return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "stages[%d]: %s (got %lld, %lld)", i, what, a, b);
}

static bool mul3(int64_t a, int64_t b, int64_t c, int64_t* out) {
  int64_t t;
  return !__builtin_mul_overflow(a, b, &t) && !__builtin_mul_overflow(t, c, out);
}

/* Validates stage i and fills its derived sizes. */
static fct_status stage_init(fct_context* ctx, int i, const fct_conv_stage* st, cc_stage* c) {
  memset(c, 0, sizeof *c);
  c->st = *st;
  if (st->batch < 1 || st->in_channels < 1 || st->in_h < 1 || st->in_w < 1 ||
      st->out_channels < 1)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "stages[%d]: batch, in_channels, in_h, in_w and out_channels must be >= 1, "
                    "got %lld, %lld, %lld, %lld, %lld",
                    i, (long long)st->batch, (long long)st->in_channels, (long long)st->in_h,
                    (long long)st->in_w, (long long)st->out_channels);
  if (st->kh < 1 || st->kw < 1) return stage_fail(ctx, i, "kernel sizes must be >= 1", st->kh, st->kw);
  if (st->stride_h < 1 || st->stride_w < 1)
    return stage_fail(ctx, i, "strides must be >= 1", st->stride_h, st->stride_w);
  if (st->dil_h < 1 || st->dil_w < 1)
    return stage_fail(ctx, i, "dilations must be >= 1", st->dil_h, st->dil_w);
  if (st->pad_top < 0 || st->pad_left < 0 || st->pad_bottom < 0 || st->pad_right < 0)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "stages[%d]: paddings must be >= 0, got %lld, %lld, %lld, %lld", i,
                    (long long)st->pad_top, (long long)st->pad_left, (long long)st->pad_bottom,
                    (long long)st->pad_right);
  if (st->groups < 1 || st->in_channels % st->groups || st->out_channels % st->groups)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE,
                    "stages[%d]: groups (%lld) must be >= 1 and divide in_channels (%lld) and "
                    "out_channels (%lld)",
                    i, (long long)st->groups, (long long)st->in_channels,
                    (long long)st->out_channels);
  /* Effective kernel extent and padded input, with overflow checks: every
   * size below is bounded by products checked here. */
  int64_t ekh, ekw, ph, pw;
  if (__builtin_mul_overflow(st->dil_h, st->kh - 1, &ekh) ||
      __builtin_mul_overflow(st->dil_w, st->kw - 1, &ekw) ||
      __builtin_add_overflow(st->in_h, st->pad_top, &ph) ||
      __builtin_add_overflow(ph, st->pad_bottom, &ph) ||
      __builtin_add_overflow(st->in_w, st->pad_left, &pw) ||
      __builtin_add_overflow(pw, st->pad_right, &pw))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "stages[%d]: kernel or padding sizes overflow", i);
  /* ekh >= ph, not ekh + 1 > ph: ekh may be INT64_MAX (kh = 2, huge dil_h). */
  if (ekh >= ph || ekw >= pw)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "stages[%d]: the kernel (%llu x %llu with dilation) is larger than the padded "
                    "input (%lld x %lld)",
                    i, (unsigned long long)ekh + 1, (unsigned long long)ekw + 1, (long long)ph,
                    (long long)pw);
  int64_t OH = (ph - ekh - 1) / st->stride_h + 1, OW = (pw - ekw - 1) / st->stride_w + 1;
  c->Cig = st->in_channels / st->groups;
  c->Cog = st->out_channels / st->groups;
  bool ok = mul3(st->batch, st->in_channels, st->in_h, &c->in_numel) &&
            !__builtin_mul_overflow(c->in_numel, st->in_w, &c->in_numel) &&
            !__builtin_mul_overflow(OH, OW, &c->P) &&
            mul3(st->batch, st->out_channels, c->P, &c->out_numel) &&
            mul3(c->Cig, st->kh, st->kw, &c->K);
  if (!ok) return fct_fail(ctx, FCT_ERR_OVERFLOW, "stages[%d]: sizes overflow int64", i);
  /* Only now: before the checks above it overflowed (UB) for in_h = in_w = 2^40. */
  c->P_in = st->in_h * st->in_w; /* <= in_numel */
  fct_conv_geom g = {st->in_channels, st->in_h, st->in_w, st->kh, st->kw, st->stride_h,
                     st->stride_w, st->pad_top, st->pad_left, st->dil_h, st->dil_w, OH, OW};
  c->geom = g;
  if (c->Cig == 1 && c->Cog == 1 && st->groups > 1)
    c->kind = CC_DEPTHWISE;
  else if (st->kh == 1 && st->kw == 1 && st->stride_h == 1 && st->stride_w == 1 &&
           st->pad_top == 0 && st->pad_left == 0 && st->pad_bottom == 0 && st->pad_right == 0)
    c->kind = CC_DIRECT;
  else
    c->kind = CC_IM2COL;
  c->col_is_in = c->kind == CC_IM2COL && c->P == 1 && st->in_h == st->kh &&
                  st->in_w == st->kw && (st->dil_h == 1 || st->kh == 1) &&
                  (st->dil_w == 1 || st->kw == 1) && st->pad_top == 0 && st->pad_left == 0 &&
                  st->pad_bottom == 0 && st->pad_right == 0;
  if (c->kind == CC_IM2COL) {
    int64_t rows;
    if (!mul3(st->in_channels, st->kh, st->kw, &rows) ||
        !mul3(st->batch, rows, c->P, &c->col_numel))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "stages[%d]: the im2col buffer overflows", i);
  }
  /* BLAS takes int sizes and leading dimensions. */
  if (c->kind != CC_DEPTHWISE &&
      (!fct_fits_int(c->K) || !fct_fits_int(c->P) || !fct_fits_int(c->Cog)))
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "stages[%d]: GEMM sizes must be < 2^31", i);
  return FCT_OK;
}

int64_t fct_conv_stage_out_numel(const fct_conv_stage* stage) {
  if (!stage) return 0;
  cc_stage c;
  fct_context quiet = {0};
  return stage_init(&quiet, 0, stage, &c) == FCT_OK ? c.out_numel : 0;
}

static fct_status chain_init(fct_context* ctx, int n, const fct_conv_stage* stages,
                             cc_plan* p) {
  if (n < 1 || n > FCT_MAX_STAGES)
    return fct_fail(ctx, FCT_ERR_INVALID_VALUE, "stages: expected 1 to %d stages, got %d",
                    FCT_MAX_STAGES, n);
  if (!stages) return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "stages: NULL");
  p->S = n;
  p->saved_per_image = 0;
  for (int i = 0; i < n; ++i) {
    FCT_TRY(stage_init(ctx, i, &stages[i], &p->s[i]));
    if (i > 0 && p->s[i].in_numel != p->s[i - 1].out_numel)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "stages[%d]: reads %lld elements per image (batch·in_channels·in_h·in_w) "
                      "but stages[%d] writes %lld",
                      i, (long long)p->s[i].in_numel, i - 1, (long long)p->s[i - 1].out_numel);
    if (i < n - 1) {
      /* The middle depthwise stages are recomputed, not saved (top). */
      p->recompute[i] = i > 0 && p->s[i].kind == CC_DEPTHWISE;
      p->any_recompute |= p->recompute[i];
      if (p->recompute[i]) continue;
      p->saved_off[i] = p->saved_per_image;
      if (__builtin_add_overflow(p->saved_per_image, p->s[i].out_numel, &p->saved_per_image))
        return fct_fail(ctx, FCT_ERR_OVERFLOW, "stages: the saved activations overflow int64");
    }
  }
  return FCT_OK;
}

fct_status fct_conv_chain_check(fct_context* ctx, int n, const fct_conv_stage* stages,
                                int64_t* saved_per_image) {
  fct_context quiet = {0};
  cc_plan* p = &(cc_plan){0};
  fct_status s = chain_init(ctx ? ctx : &quiet, n, stages, p);
  if (s == FCT_OK && saved_per_image) *saved_per_image = p->saved_per_image;
  return s;
}

/* ------------------------------------------------------------------------- */
/* Tensor checks and plan                                                     */
/* ------------------------------------------------------------------------- */

/* t [N, ...] with x's dtype and device and `per_image` elements per image. */
static fct_status check_images(fct_context* ctx, const char* name, const DLTensor* t,
                               const DLTensor* x, int64_t N, int64_t per_image,
                               const char* what) {
  FCT_TRY(fct_check_tensor(ctx, name, t, 1));
  if (x && t != x) FCT_TRY(fct_check_same(ctx, name, t, "x", x));
  int64_t rest = 1;
  /* fct_check_tensor bounds the product only when no dim is 0: an empty
   * batch of [2^31, 2^31, 2^31] images overflowed here (UB). */
  for (int i = 1; i < t->ndim; ++i)
    if (__builtin_mul_overflow(rest, t->shape[i], &rest))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "%s: elements per image overflow int64", name);
  if (t->shape[0] != N || rest != per_image)
    return fct_fail(ctx, FCT_ERR_SHAPE,
                    "%s: expected [N = %lld, ...] with %lld elements per image (%s), got [%lld, "
                    "...] with %lld",
                    name, (long long)N, (long long)per_image, what, (long long)t->shape[0],
                    (long long)rest);
  return FCT_OK;
}

static fct_status check_weights(fct_context* ctx, const char* list, cc_plan* p,
                                const DLTensor* const* w, const DLTensor* x, bool output) {
  if (!w)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "%s: expected %d tensors, got NULL", list, p->S);
  char nm[48];
  for (int i = 0; i < p->S; ++i) {
    const char* name = fct_item_name(nm, sizeof nm, list, i);
    const fct_conv_stage* st = &p->s[i].st;
    FCT_TRY(fct_check_param(ctx, name, w[i], x, 4, "[out_channels, in_channels / groups, kh, kw]"));
    int64_t want[4] = {st->out_channels, p->s[i].Cig, st->kh, st->kw};
    if (memcmp(w[i]->shape, want, sizeof want) != 0)
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "%s: expected [%lld, %lld, %lld, %lld] (out_channels, in_channels / groups, "
                      "kh, kw of stages[%d]), got [%lld, %lld, %lld, %lld]",
                      name, (long long)want[0], (long long)want[1], (long long)want[2],
                      (long long)want[3], i, (long long)w[i]->shape[0], (long long)w[i]->shape[1],
                      (long long)w[i]->shape[2], (long long)w[i]->shape[3]);
    if (output) FCT_TRY(fct_check_dense_output(ctx, name, w[i]));
  }
  return FCT_OK;
}

/* Checks x, weights, bias, y/grad_y and saved; fills the plan's shape. */
static fct_status plan_shape(fct_context* ctx, const DLTensor* x, int n,
                             const fct_conv_stage* stages, const DLTensor* const* weights,
                             const DLTensor* bias, const DLTensor* y, const char* y_name,
                             const DLTensor* saved, cc_plan* p) {
  if (!ctx) return FCT_ERR_NULL_ARGUMENT;
  FCT_TRY(chain_init(ctx, n, stages, p));
  FCT_TRY(fct_check_tensor(ctx, "x", x, 1));
  p->dt = fct_dtype_of(x->dtype);
  p->es = fct_dtype_bytes(p->dt);
  p->cuda = x->device.device_type == kDLCUDA;
  p->N = x->shape[0];
  FCT_TRY(check_images(ctx, "x", x, NULL, p->N, p->s[0].in_numel,
                   "stages[0].batch·in_channels·in_h·in_w"));
  FCT_TRY(check_weights(ctx, "weights", p, weights, x, false));
  FCT_TRY(fct_check_tensor(ctx, y_name, y, 2));
  FCT_TRY(check_images(ctx, y_name, y, x, p->N, p->s[p->S - 1].out_numel,
                   "what the last stage writes"));
  p->Cy = y->shape[1];
  p->Py = p->Cy ? p->s[p->S - 1].out_numel / p->Cy : 0;
  if (p->Cy < 1 || p->Py * p->Cy != p->s[p->S - 1].out_numel)
    return fct_fail(ctx, FCT_ERR_SHAPE, "%s: dim 1 (%lld) must divide the %lld elements per image",
                    y_name, (long long)p->Cy, (long long)p->s[p->S - 1].out_numel);
  if (bias) FCT_TRY(fct_check_vector(ctx, "bias", bias, x, p->Cy, "C_y: the output's channels"));
  if (saved) {
    int64_t want;
    if (__builtin_mul_overflow(p->N, p->saved_per_image, &want))
      return fct_fail(ctx, FCT_ERR_OVERFLOW, "saved: N·saved_per_image overflows");
    FCT_TRY(fct_check_tensor(ctx, "saved", saved, 1));
    FCT_TRY(fct_check_same(ctx, "saved", saved, "x", x));
    if (fct_numel(saved) != want || !fct_is_contiguous(saved))
      return fct_fail(ctx, FCT_ERR_SHAPE,
                      "saved: expected a C-contiguous tensor of %lld elements (N = %lld images "
                      "times %lld), got %lld elements",
                      (long long)want, (long long)p->N, (long long)p->saved_per_image,
                      (long long)fct_numel(saved));
  }
  for (int i = 0; i < p->S; ++i) {
    cc_stage* c = &p->s[i];
    if (c->kind == CC_DEPTHWISE)
      fct_param_init(&c->w, weights[i], c->st.out_channels, c->st.kh * c->st.kw, true);
    else
      fct_param_init(&c->w, weights[i], c->st.out_channels, c->K, true);
  }
  return FCT_OK;
}

/* Workers, chunk size and workspace layout. On the CPU each pool thread
 * takes a contiguous share of the images and runs them chunk by chunk with
 * serial primitives: one pool dispatch per call, where splitting every GEMM
 * costs a dispatch per primitive (measured 5-10x slower for the 56x56
 * benchmark layers when another process holds a core, each dispatch then
 * waiting for a scheduler tick). Fewer images than threads: one worker, the
 * primitives split themselves. Each worker's region holds the largest im2col
 * buffer and, when intermediates are not kept in `saved` (forward) or for
 * the gradients of the intermediates (backward), two buffers of the largest
 * one, per image of its chunk; in the backward with several workers also
 * its partial weight gradients, summed in worker order at the end
 * (deterministic for a given thread count). layout_for lays it out for at
 * most T workers. */
static fct_status layout_for(fct_context* ctx, cc_plan* p, int T) {
  fct_machine mc = fct_machine_for(p->cuda);
  int64_t col = 0, mid = 0;
  double rc = 0; /* elements per image of the recomputed outputs (sized below with checks) */
  p->wnumel = 0;
  bool rc_bufs = p->backward && p->gw && p->any_recompute;
  for (int i = 0; i < p->S; ++i) {
    if (p->s[i].col_numel > col) col = p->s[i].col_numel;
    if (i < p->S - 1 && p->s[i].out_numel > mid) mid = p->s[i].out_numel;
    if (rc_bufs && p->recompute[i]) rc += (double)p->s[i].out_numel;
    p->wnumel += p->s[i].w.rows * p->s[i].w.cols; /* bounded by the weights' numel */
  }
  if ((int64_t)T > p->N) T = p->N > 0 ? (int)p->N : 1;
  if (T < 1) T = 1;
  int64_t share = (p->N + T - 1) / T; /* images per worker, at most */
  /* Only as many workers as shares: with N = 4 on 3 threads the shares are
   * 2, 2, 0, and a worker without images never writes its partial weight
   * gradients, which the backward sums all the same. ceil(N / share)
   * workers give worker_begin the same share and none of them is empty. */
  if (p->N > 0) T = (int)((p->N + share - 1) / share);
  p->T = T;
  bool buffers = p->backward || !p->keep || p->any_recompute;
  double per_image =
      ((double)col + (buffers ? 2.0 * (double)mid : 0.0) + rc) * (double)p->es;
  double budget = 2.0 * (double)mc.chunk_bytes;
  int64_t Nc = per_image > 0 ? (int64_t)(budget / per_image) : share;
  if (Nc < 1) Nc = 1;
  if (Nc > share) Nc = share > 0 ? share : 1;
  p->Nc = Nc;
  fct_layout L;
  memset(&L, 0, sizeof L);
  for (int i = 0; i < p->S; ++i) fct_param_lay_out(&p->s[i].w, &L, p->es);
  int64_t xn = 0, gn = 0;
  if (p->pack_x && __builtin_mul_overflow(p->N, p->s[0].in_numel, &xn)) L.overflow = true;
  if (p->pack_g && __builtin_mul_overflow(p->N, p->s[p->S - 1].out_numel, &gn)) L.overflow = true;
  if (p->pack_x) p->off_x = fct_layout_take(&L, xn, p->es);
  if (p->pack_g) p->off_g = fct_layout_take(&L, gn, p->es);
  if (p->check && p->cuda) p->off_scratch = fct_layout_take(&L, FCT_CHECK_SCRATCH, 1);
  /* One worker's region, laid out from 0. */
  fct_layout W;
  memset(&W, 0, sizeof W);
  int64_t cn = 0, bn = 0;
  if (__builtin_mul_overflow(Nc, col, &cn) || __builtin_mul_overflow(Nc, mid, &bn))
    W.overflow = true;
  p->off_col = fct_layout_take(&W, cn, p->es);
  if (buffers) {
    p->off_a = fct_layout_take(&W, bn, p->es);
    p->off_b = fct_layout_take(&W, bn, p->es);
  }
  for (int i = 0; rc_bufs && i < p->S; ++i) {
    int64_t n;
    if (!p->recompute[i]) continue;
    if (__builtin_mul_overflow(Nc, p->s[i].out_numel, &n)) W.overflow = true;
    p->off_rc[i] = fct_layout_take(&W, n, p->es);
  }
  /* gemm_reduce keeps partial sums there on CUDA (0 bytes on the CPU). */
  p->red_bytes = 0;
  if (p->backward && p->gw) {
    for (int i = 0; i < p->S; ++i) {
      const cc_stage* c = &p->s[i];
      if (c->kind == CC_DEPTHWISE) continue;
      size_t b = fct_gemm_reduce_scratch(p->cuda, p->dt, c->Cog, c->K, Nc * c->st.batch);
      if (b > p->red_bytes) p->red_bytes = b;
    }
    p->off_red = fct_layout_take(&W, (int64_t)p->red_bytes, 1);
    if (T > 1) p->off_part = fct_layout_take(&W, p->wnumel, p->es);
  }
  FCT_TRY(fct_layout_done(ctx, &W, &p->worker_bytes));
  p->worker_bytes = (p->worker_bytes + FCT_WS_ALIGN - 1) / FCT_WS_ALIGN * FCT_WS_ALIGN;
  int64_t wb;
  if (__builtin_mul_overflow((int64_t)p->worker_bytes, (int64_t)T, &wb)) L.overflow = true;
  p->off_worker = fct_layout_take(&L, wb, 1);
  return fct_layout_done(ctx, &L, &p->bytes);
}

static fct_status plan_layout(fct_context* ctx, cc_plan* p, const fct_backend* be) {
  int T = be->workers && be->parallel ? be->workers() : 1;
  if (T > CC_MAX_WORKERS) T = CC_MAX_WORKERS;
  FCT_TRY(layout_for(ctx, p, T));
  /* Many threads times a large im2col buffer: rather one worker whose
   * primitives split over the threads than gigabytes of workspace. */
  fct_machine mc = fct_machine_for(p->cuda);
  if (p->T > 1 && (double)p->worker_bytes * p->T > 4.0 * (double)mc.workspace_cap)
    FCT_TRY(layout_for(ctx, p, 1));
  return FCT_OK;
}

static void add_inputs(fct_args* a, const DLTensor* x, const cc_plan* p,
                       const DLTensor* const* weights) {
  fct_args_add(a, "x", x);
  fct_args_add_list(a, "weights", p->S, weights);
}

static fct_status bind_weights(const fct_exec* e, cc_plan* p) {
  for (int i = 0; i < p->S; ++i)
    if (!p->s[i].wt) FCT_TRY(fct_param_bind(e, &p->s[i].w));
  return FCT_OK;
}

/* NULL stays NULL: an empty tensor's data, or a workspace that is not
 * there because every region in it is empty. */
static inline char* at(const char* base, int64_t elems, size_t es) {
  return base ? (char*)base + elems * (int64_t)es : NULL;
}
static inline char* at_bytes(const char* base, size_t off) {
  return base ? (char*)base + off : NULL;
}

/* ------------------------------------------------------------------------- */
/* One stage on n items (layouts at the top of the file)                      */
/* ------------------------------------------------------------------------- */

/* Group g's weight as [Cog, K]: rows of the weight, or (formed W) the
 * transposed block (g·K.., g·Cog..) of Wᵀ. */
static fct_mat stage_wg(const cc_stage* c, int64_t g, size_t es) {
  if (c->wd) return fct_dense(at(c->wd, g * c->Cog * c->K, es), c->Cog, c->K);
  if (c->wt) {
    fct_mat b = {at(c->w.m.data, g * c->K * c->ld + g * c->Cog, es), c->K, c->Cog, c->ld, 1};
    return fct_mat_t(b);
  }
  return fct_dense(at(c->w.m.data, g * c->Cog * c->K, es), c->Cog, c->K);
}

/* n items of a stage with one output pixel as the rows of a matrix: cols
 * elements from column `off` of each item, items `stride` elements apart.
 * One GEMM then does what n matrix-vector products would (the basis images
 * of form W are many such items). */
static fct_mat items_mat(const char* base, int64_t n, int64_t cols, int64_t stride, int64_t off,
                         size_t es) {
  fct_mat m = {at(base, off, es), n, cols, stride, 1};
  if (n <= 1) m.rs = cols > 0 ? cols : 1;
  return m;
}

static fct_status stage_forward(const fct_exec* e, const cc_stage* c, int64_t n, const char* in,
                                char* col, char* out) {
  const char* w = c->w.m.data;
  if (c->kind == CC_DEPTHWISE)
    return e->be->depthwise_forward(e->ctx, e->device, e->dt, &c->geom, n, in, w, out);
  const char* src = in;
  int64_t item = c->st.in_channels * c->P_in; /* direct: the item is [Ci, P] */
  if (c->kind == CC_IM2COL && !c->col_is_in) {
    FCT_TRY(e->be->im2col(e->ctx, e->device, e->dt, &c->geom, n, in, col));
    src = col;
    item = c->st.in_channels * c->st.kh * c->st.kw * c->P;
  }
  for (int64_t g = 0; g < c->st.groups; ++g) {
    if (c->P == 1) { /* one output pixel: the items are rows, out_g [n, Cog] = src_g · W_gᵀ */
      fct_mat A = items_mat(src, n, c->K, item, g * c->K, e->es);
      fct_mat B = fct_mat_t(stage_wg(c, g, e->es));
      fct_mat C = items_mat(out, n, c->Cog, c->st.out_channels, g * c->Cog, e->es);
      FCT_TRY(fct_x_gemm(e, &A, &B, &C, 0.0));
      continue;
    }
    fct_mat A = stage_wg(c, g, e->es);
    fct_mat B = fct_dense(at(src, g * c->K * c->P, e->es), c->K, c->P);
    fct_mat C = fct_dense(at(out, g * c->Cog * c->P, e->es), c->Cog, c->P);
    FCT_TRY(fct_x_gemm_batched(e, &A, &B, &C, 0.0, n, 0, item, c->st.out_channels * c->P));
  }
  return FCT_OK;
}

/* gw (nullable) = beta·gw + the weight gradient; gin (nullable) = the input
 * gradient (overwritten). */
static fct_status stage_backward(const fct_exec* e, const cc_plan* p, const cc_stage* c,
                                 int64_t n, const char* in, const char* gout, char* col,
                                 char* red, char* gw, char* gin, double beta) {
  const char* w = c->w.m.data;
  if (c->kind == CC_DEPTHWISE) {
    if (gw)
      FCT_TRY(e->be->depthwise_backward_weight(e->ctx, e->device, e->dt, &c->geom, n, in, gout, gw,
                                           beta));
    if (gin)
      FCT_TRY(e->be->depthwise_backward_input(e->ctx, e->device, e->dt, &c->geom, n, gout, w, gin));
    return FCT_OK;
  }
  bool im2col = c->kind == CC_IM2COL && !c->col_is_in; /* else the item is its own col */
  int64_t item = im2col ? c->st.in_channels * c->st.kh * c->st.kw * c->P
                        : c->st.in_channels * c->P_in;
  int64_t gitem = c->st.out_channels * c->P;
  if (gw) {
    const char* src = in;
    if (im2col) {
      FCT_TRY(e->be->im2col(e->ctx, e->device, e->dt, &c->geom, n, in, col));
      src = col;
    }
    /* gW_g [Cog, K] = beta·gW_g + Σ_items gout_g [Cog, P] · src_gᵀ [P, K]
     * (formed W: its transpose, src_g · gout_gᵀ, into the block of gWᵀ) */
    for (int64_t g = 0; g < c->st.groups; ++g) {
      if (c->P == 1) { /* Σ over the items as one GEMM (items_mat) */
        fct_mat S = items_mat(src, n, c->K, item, g * c->K, e->es);
        fct_mat G = items_mat(gout, n, c->Cog, gitem, g * c->Cog, e->es);
        if (c->wt) { /* gWᵀ_g [K, Cog] = Sᵀ · G */
          fct_mat St = fct_mat_t(S);
          fct_mat C = {at(gw, g * c->K * c->ld + g * c->Cog, e->es), c->K, c->Cog, c->ld, 1};
          FCT_TRY(fct_x_gemm(e, &St, &G, &C, beta));
        } else { /* gW_g [Cog, K] = Gᵀ · S */
          fct_mat Gt = fct_mat_t(G);
          fct_mat C = fct_dense(at(gw, g * c->Cog * c->K, e->es), c->Cog, c->K);
          FCT_TRY(fct_x_gemm(e, &Gt, &S, &C, beta));
        }
        continue;
      }
      if (c->wt) {
        fct_mat A = fct_dense(at(src, g * c->K * c->P, e->es), c->K, c->P);
        fct_mat B = fct_mat_t(fct_dense(at(gout, g * c->Cog * c->P, e->es), c->Cog, c->P));
        fct_mat C = {at(gw, g * c->K * c->ld + g * c->Cog, e->es), c->K, c->Cog, c->ld, 1};
        FCT_TRY(e->be->gemm_reduce(e->ctx, e->device, e->dt, &A, &B, &C, beta, n, item, gitem,
                                   red, p->red_bytes));
        continue;
      }
      fct_mat A = fct_dense(at(gout, g * c->Cog * c->P, e->es), c->Cog, c->P);
      fct_mat B = fct_mat_t(fct_dense(at(src, g * c->K * c->P, e->es), c->K, c->P));
      fct_mat C = fct_dense(at(gw, g * c->Cog * c->K, e->es), c->Cog, c->K);
      FCT_TRY(e->be->gemm_reduce(e->ctx, e->device, e->dt, &A, &B, &C, beta, n, gitem, item, red,
                             p->red_bytes));
    }
  }
  if (!gin) return FCT_OK;
  /* dst_g [K, P] = W_gᵀ [K, Cog] · gout_g [Cog, P], into col (then col2im)
   * or straight into gin. */
  char* dst = im2col ? col : gin;
  for (int64_t g = 0; g < c->st.groups; ++g) {
    if (c->P == 1) { /* dst_g [n, K] = gout_g [n, Cog] · W_g */
      fct_mat A = items_mat(gout, n, c->Cog, gitem, g * c->Cog, e->es);
      fct_mat B = stage_wg(c, g, e->es);
      fct_mat C = items_mat(dst, n, c->K, item, g * c->K, e->es);
      FCT_TRY(fct_x_gemm(e, &A, &B, &C, 0.0));
      continue;
    }
    fct_mat A = fct_mat_t(stage_wg(c, g, e->es));
    fct_mat B = fct_dense(at(gout, g * c->Cog * c->P, e->es), c->Cog, c->P);
    fct_mat C = fct_dense(at(dst, g * c->K * c->P, e->es), c->K, c->P);
    FCT_TRY(fct_x_gemm_batched(e, &A, &B, &C, 0.0, n, 0, gitem, item));
  }
  if (im2col) FCT_TRY(e->be->col2im(e->ctx, e->device, e->dt, &c->geom, n, col, gin));
  return FCT_OK;
}

/* Form W (implemented at the end of the file). */
typedef struct cc_fw {
  bool ok;
  fct_conv_stage dense;                 /* the composed stage on x */
  fct_conv_stage basis[FCT_MAX_STAGES]; /* the chain on the basis images (from stage s0) */
  int s0, nbs;      /* first stage and number of stages the basis runs */
  int64_t NW, NB, Co; /* rows of Wᵀ (Ci·KH·KW), basis images (C_s0·KH·KW), out channels */
} cc_fw;

/* How a sub-plan's stages get their weights. */
typedef enum { SUB_WEIGHTS, SUB_FORMED, SUB_SIZES } cc_sub_w;

typedef struct cc_call {
  cc_plan p; /* the chain: always planned (it checks every argument) */
  cc_fw f;
  bool form_w;
  bool backward, gx, gw, pack_x, pack_g; /* the pass laid out below */
  int64_t nb, chunks, bw, bsaved; /* basis images per chunk, chunks, weight elements, saved/image */
  double cost_chain, cost_form_w;         /* of this pass (0: not priced) */
  size_t off_wt, off_wd, off_gwt, off_b, off_gb, off_w0, off_e, off_bsaved, off_part, off_sub,
      off_dense, bytes;
} cc_call;

static fct_status fw_plan(fct_context* ctx, cc_call* c, cc_sub_w how,
                          const DLTensor* const* weights, bool backward, bool keep, bool gx,
                          bool gw);
static fct_status fw_forward(const fct_exec* e, const cc_call* c, const DLTensor* x,
                             const DLTensor* const* weights, const DLTensor* bias, DLTensor* y);
static fct_status fw_backward(const fct_exec* e, const cc_call* c, const DLTensor* grad_y,
                              const DLTensor* x, const DLTensor* const* weights,
                              DLTensor* grad_x, DLTensor* const* grad_weights,
                              DLTensor* grad_bias);

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_plan(fct_context* ctx, const DLTensor* x, int n,
                               const fct_conv_stage* stages, const DLTensor* const* weights,
                               const DLTensor* bias, const DLTensor* y, const DLTensor* saved,
                               cc_plan* p) {
  memset(p, 0, sizeof *p);
  FCT_TRY(plan_shape(ctx, x, n, stages, weights, bias, y, "y", saved, p));
  FCT_TRY(fct_check_dense_output(ctx, "y", y));
  fct_args a;
  a.n = 0;
  add_inputs(&a, x, p, weights);
  fct_args_add(&a, "bias", bias);
  int first_out = a.n;
  fct_args_add(&a, "y", y);
  fct_args_add(&a, "saved", saved);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  p->keep = saved != NULL;
  p->pack_x = !fct_is_contiguous(x);
  p->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  const fct_backend* be;
  FCT_TRY(fct_backend_for(ctx, "x", x, &be));
  return plan_layout(ctx, p, be);
}

fct_status fct_conv_chain_forward_workspace(const fct_context* ctx, const DLTensor* x, int n,
                                            const fct_conv_stage* stages,
                                            const DLTensor* const* weights, const DLTensor* bias,
                                            const DLTensor* y, const DLTensor* saved,
                                            size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  cc_call* cl = &(cc_call){0};
  FCT_TRY(forward_plan(&c, x, n, stages, weights, bias, y, saved, &cl->p));
  FCT_TRY(fw_plan(&c, cl, SUB_WEIGHTS, weights, false, saved != NULL, false, false));
  *bytes = cl->form_w ? cl->bytes : cl->p.bytes;
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Workers                                                                    */
/* ------------------------------------------------------------------------- */

/* What every worker reads, and each worker's status and messages. */
typedef struct cc_job cc_job;
/* What one worker runs: images [i_begin, i_end) with its region at base. */
typedef fct_status (*cc_images_fn)(const fct_exec* e, const cc_job* j, char* base,
                                   int64_t i_begin, int64_t i_end);

struct cc_job {
  cc_images_fn images;
  const fct_exec* e;
  const cc_plan* p;
  char *xb, *gyb;                       /* dense x and grad_y (read only) */
  char *y, *saved, *gx;                 /* outputs (gx: NULL when not asked for) */
  char* gw[FCT_MAX_STAGES];             /* weight gradients, or NULL */
  const char* bias;
  int64_t bst;
  fct_status st[CC_MAX_WORKERS];
  char err[CC_MAX_WORKERS][256];
};

/* Worker w's exec (own error buffer), region and image range. */
static void worker_begin(cc_job* j, int w, fct_context* wctx, fct_exec* we, char** base,
                         int64_t* i_begin, int64_t* i_end) {
  const cc_plan* p = j->p;
  *wctx = *j->e->ctx;
  wctx->error = j->err[w];
  wctx->error_bytes = sizeof j->err[w];
  *we = *j->e;
  we->ctx = wctx;
  *base = fct_ws_at(j->e, p->off_worker + (size_t)w * p->worker_bytes);
  int64_t share = (p->N + p->T - 1) / p->T;
  *i_begin = w * share < p->N ? w * share : p->N;
  *i_end = *i_begin + share < p->N ? *i_begin + share : p->N;
}

static void worker_body(int64_t w0, int64_t w1, void* arg) {
  cc_job* j = arg;
  for (int64_t w = w0; w < w1; ++w) {
    fct_context wctx;
    fct_exec we;
    char* base;
    int64_t b, e;
    worker_begin(j, (int)w, &wctx, &we, &base, &b, &e);
    j->st[w] = j->images(&we, j, base, b, e);
  }
}

/* j->images on every worker (in the backend's pool when there are several);
 * the first failure is reported in the caller's context. */
static fct_status run_workers(cc_job* j) {
  const cc_plan* p = j->p;
  for (int w = 0; w < p->T; ++w) {
    j->st[w] = FCT_OK;
    j->err[w][0] = 0;
  }
  if (p->T > 1)
    j->e->be->parallel(p->T, 1, worker_body, j);
  else
    worker_body(0, 1, j);
  for (int w = 0; w < p->T; ++w)
    if (j->st[w] != FCT_OK) return fct_fail(j->e->ctx, j->st[w], "%s", j->err[w]);
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Forward                                                                    */
/* ------------------------------------------------------------------------- */

static fct_status forward_images(const fct_exec* e, const cc_job* j, char* base, int64_t i_begin,
                                 int64_t i_end) {
  const cc_plan* p = j->p;
  char* col = at_bytes(base, p->off_col);
  char* buf[2] = {at_bytes(base, p->off_a), at_bytes(base, p->off_b)};
  for (int64_t i0 = i_begin; i0 < i_end; i0 += p->Nc) {
    int64_t nc = i_end - i0 < p->Nc ? i_end - i0 : p->Nc;
    const char* cur = at(j->xb, i0 * p->s[0].in_numel, e->es);
    for (int s = 0; s < p->S; ++s) {
      const cc_stage* c = &p->s[s];
      char* out;
      if (s == p->S - 1)
        out = at(j->y, i0 * c->out_numel, e->es);
      else if (p->keep && !p->recompute[s]) /* stage s's block holds all N images */
        out = at(j->saved, p->N * p->saved_off[s] + i0 * c->out_numel, e->es);
      else
        out = buf[s & 1];
      FCT_TRY(stage_forward(e, c, nc * c->st.batch, cur, col, out));
      cur = out;
    }
    if (j->bias)
      FCT_TRY(e->be->channel_bias(e->ctx, e->device, e->dt, nc, p->Cy, p->Py,
                              at(j->y, i0 * p->Cy * p->Py, e->es), j->bias, j->bst));
  }
  return FCT_OK;
}

fct_status fct_conv_chain_forward(fct_context* ctx, const DLTensor* x, int n,
                                  const fct_conv_stage* stages, const DLTensor* const* weights,
                                  const DLTensor* bias, DLTensor* y, DLTensor* saved) {
  cc_plan p;
  fct_exec e;
  FCT_TRY(forward_plan(ctx, x, n, stages, weights, bias, y, saved, &p));
  cc_call* cl = &(cc_call){0};
  cl->p = p;
  FCT_TRY(fw_plan(ctx, cl, SUB_WEIGHTS, weights, false, saved != NULL, false, false));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  if (p.N == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, cl->form_w ? cl->bytes : p.bytes));
  if (cl->form_w) {
    FCT_TRY(fw_forward(&e, cl, x, weights, bias, y));
  } else {
    FCT_TRY(bind_weights(&e, &p));
    cc_job* j = &(cc_job){0};
    j->e = &e;
    j->p = &p;
    FCT_TRY(fct_x_dense_base(&e, x, p.pack_x, p.off_x, &j->xb));
    j->y = fct_data(y);
    j->saved = saved ? fct_data(saved) : NULL;
    j->bias = bias ? fct_data(bias) : NULL;
    j->bst = fct_vector_stride(bias);
    j->images = forward_images;
    FCT_TRY(run_workers(j));
  }
  if (p.check) {
    fct_args a;
    a.n = 0;
    add_inputs(&a, x, &p, weights);
    fct_args_add(&a, "bias", bias);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "y", y, a.names, a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Backward                                                                   */
/* ------------------------------------------------------------------------- */

static fct_status backward_plan(fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
                                int n, const fct_conv_stage* stages,
                                const DLTensor* const* weights, const DLTensor* saved,
                                const DLTensor* grad_x, const DLTensor* const* grad_weights,
                                const DLTensor* grad_bias, cc_plan* p) {
  memset(p, 0, sizeof *p);
  FCT_TRY(plan_shape(ctx, x, n, stages, weights, NULL, grad_y, "grad_y", saved, p));
  if (p->S > 1 && !saved)
    return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT,
                    "saved: required by the backward of a chain of %d stages (the forward's "
                    "intermediate activations)",
                    p->S);
  p->backward = true;
  p->gx = grad_x != NULL;
  p->gw = grad_weights != NULL;
  p->gb = grad_bias != NULL;
  if (grad_x) {
    FCT_TRY(check_images(ctx, "grad_x", grad_x, x, p->N, p->s[0].in_numel, "as x"));
    FCT_TRY(fct_check_dense_output(ctx, "grad_x", grad_x));
  }
  if (grad_weights) {
    for (int i = 0; i < p->S; ++i)
      if (!grad_weights[i])
        return fct_fail(ctx, FCT_ERR_NULL_ARGUMENT, "grad_weights[%d]: NULL", i);
    FCT_TRY(check_weights(ctx, "grad_weights", p, grad_weights, x, true));
  }
  if (grad_bias) {
    FCT_TRY(fct_check_vector(ctx, "grad_bias", grad_bias, x, p->Cy, "C_y: grad_y's channels"));
    FCT_TRY(fct_check_dense_output(ctx, "grad_bias", grad_bias));
  }
  fct_args a;
  a.n = 0;
  fct_args_add(&a, "grad_y", grad_y);
  add_inputs(&a, x, p, weights);
  fct_args_add(&a, "saved", saved);
  int first_out = a.n;
  fct_args_add(&a, "grad_x", grad_x);
  if (grad_weights)
    fct_args_add_list(&a, "grad_weights", p->S, (const DLTensor* const*)grad_weights);
  fct_args_add(&a, "grad_bias", grad_bias);
  FCT_TRY(fct_args_check_overlaps(ctx, &a, first_out));
  p->keep = true;
  p->pack_x = p->gw && !fct_is_contiguous(x);
  p->pack_g = !fct_is_contiguous(grad_y);
  p->check = ctx->flags & FCT_FLAG_CHECK_FINITE;
  const fct_backend* be;
  FCT_TRY(fct_backend_for(ctx, "x", x, &be));
  return plan_layout(ctx, p, be);
}

fct_status fct_conv_chain_backward_workspace(const fct_context* ctx, const DLTensor* grad_y,
                                             const DLTensor* x, int n,
                                             const fct_conv_stage* stages,
                                             const DLTensor* const* weights,
                                             const DLTensor* saved, const DLTensor* grad_x,
                                             const DLTensor* const* grad_weights,
                                             const DLTensor* grad_bias, size_t* bytes) {
  if (!ctx || !bytes) return FCT_ERR_NULL_ARGUMENT;
  fct_context c = *ctx;
  cc_call* cl = &(cc_call){0};
  FCT_TRY(backward_plan(&c, grad_y, x, n, stages, weights, saved, grad_x, grad_weights, grad_bias,
                    &cl->p));
  FCT_TRY(fw_plan(&c, cl, SUB_WEIGHTS, weights, true, true, grad_x != NULL, grad_weights != NULL));
  *bytes = cl->form_w ? cl->bytes : cl->p.bytes;
  return FCT_OK;
}

static fct_status zero_dense(const fct_exec* e, DLTensor* t) {
  int64_t numel = fct_numel(t);
  if (numel == 0) return FCT_OK;
  fct_mat m = fct_dense(fct_data(t), 1, numel);
  return e->be->zero(e->ctx, e->device, e->dt, &m);
}

/* The input of stage s for the chunk of images starting at i0: x, a block
 * of saved, or the worker's recomputed output of stage s - 1. */
static const char* stage_input(const cc_job* j, const char* base, int s, int64_t i0) {
  const cc_plan* p = j->p;
  size_t es = j->e->es;
  if (s == 0) return at(j->xb, i0 * p->s[0].in_numel, es);
  if (p->recompute[s - 1]) return at_bytes(base, p->off_rc[s - 1]);
  return at(j->saved, p->N * p->saved_off[s - 1] + i0 * p->s[s].in_numel, es);
}

/* Worker w's images, chunk by chunk, stages last to first. Weight
 * gradients go to j->gw directly with one worker, else to the worker's
 * partials (summed afterwards); the first chunk overwrites them. The
 * outputs the forward did not save are recomputed first, per chunk. */
static fct_status backward_images(const fct_exec* e, const cc_job* j, char* base,
                                  int64_t i_begin, int64_t i_end) {
  const cc_plan* p = j->p;
  char* col = at_bytes(base, p->off_col);
  char* red = at_bytes(base, p->off_red);
  char* buf[2] = {at_bytes(base, p->off_a), at_bytes(base, p->off_b)};
  char* gw[FCT_MAX_STAGES];
  int64_t off = 0;
  for (int s = 0; s < p->S; ++s) {
    gw[s] = !p->gw ? NULL : p->T == 1 ? j->gw[s] : at(at_bytes(base, p->off_part), off, e->es);
    off += p->s[s].w.rows * p->s[s].w.cols;
  }
  /* A formed W with groups: the chunks write only the groups' blocks of
   * gWᵀ, the rest is zero. */
  bool acc[FCT_MAX_STAGES];
  for (int s = 0; s < p->S; ++s) {
    acc[s] = gw[s] && p->s[s].wt && p->s[s].st.groups > 1;
    if (acc[s]) {
      fct_mat z = fct_dense(gw[s], p->s[s].w.rows, p->s[s].w.cols);
      FCT_TRY(e->be->zero(e->ctx, e->device, e->dt, &z));
    }
  }
  for (int64_t i0 = i_begin; i0 < i_end; i0 += p->Nc) {
    int64_t nc = i_end - i0 < p->Nc ? i_end - i0 : p->Nc;
    double beta0 = i0 == i_begin ? 0.0 : 1.0;
    const char* g = at(j->gyb, i0 * p->s[p->S - 1].out_numel, e->es);
    for (int s = 0; p->gw && s < p->S; ++s)
      if (p->recompute[s])
        FCT_TRY(stage_forward(e, &p->s[s], nc * p->s[s].st.batch, stage_input(j, base, s, i0), col,
                          at_bytes(base, p->off_rc[s])));
    for (int s = p->S - 1; s >= 0; --s) {
      const cc_stage* c = &p->s[s];
      const char* in = p->gw ? stage_input(j, base, s, i0) : NULL;
      char* gin = NULL;
      if (s > 0)
        gin = buf[s & 1];
      else if (j->gx)
        gin = at(j->gx, i0 * c->in_numel, e->es);
      if (!gw[s] && !gin) break;
      double beta = acc[s] ? 1.0 : beta0;
      FCT_TRY(stage_backward(e, p, c, nc * c->st.batch, in, g, col, red, gw[s], gin, beta));
      g = gin;
    }
  }
  return FCT_OK;
}

/* backward_images on every worker, then (several workers) j->gw[s] =
 * Σ_w partial_w[s]: the partials are the rows of a [T, wnumel] view with
 * rows worker_bytes apart. */
static fct_status run_backward(cc_job* j) {
  const cc_plan* p = j->p;
  const fct_exec* e = j->e;
  j->images = backward_images;
  FCT_TRY(run_workers(j));
  if (!p->gw || p->T == 1) return FCT_OK;
  int64_t rs = (int64_t)(p->worker_bytes / e->es), off = 0;
  for (int s = 0; s < p->S; ++s) {
    int64_t numel = p->s[s].w.rows * p->s[s].w.cols;
    fct_mat part = {fct_ws_at(e, p->off_worker + p->off_part) + off * (int64_t)e->es, p->T, numel,
                    rs, 1};
    FCT_TRY(e->be->column_sums(e->ctx, e->device, e->dt, &part, j->gw[s]));
    off += numel;
  }
  return FCT_OK;
}

/* The chain's backward (the "contract" strategy). */
static fct_status chain_backward(const fct_exec* e, cc_plan* p, const DLTensor* grad_y,
                                 const DLTensor* x, const DLTensor* saved, DLTensor* grad_x,
                                 DLTensor* const* grad_weights, DLTensor* grad_bias) {
  FCT_TRY(bind_weights(e, p));
  cc_job* j = &(cc_job){0};
  j->e = e;
  j->p = p;
  if (p->gw) FCT_TRY(fct_x_dense_base(e, x, p->pack_x, p->off_x, &j->xb));
  FCT_TRY(fct_x_dense_base(e, grad_y, p->pack_g, p->off_g, &j->gyb));
  j->saved = saved ? fct_data(saved) : NULL;
  j->gx = grad_x ? fct_data(grad_x) : NULL;
  for (int s = 0; grad_weights && s < p->S; ++s) j->gw[s] = fct_data(grad_weights[s]);
  if (grad_bias)
    FCT_TRY(e->be->channel_sums(e->ctx, e->device, e->dt, p->N, p->Cy, p->Py, j->gyb,
                                fct_data(grad_bias)));
  return run_backward(j);
}

fct_status fct_conv_chain_backward(fct_context* ctx, const DLTensor* grad_y, const DLTensor* x,
                                   int n, const fct_conv_stage* stages,
                                   const DLTensor* const* weights, const DLTensor* saved,
                                   DLTensor* grad_x, DLTensor* const* grad_weights,
                                   DLTensor* grad_bias) {
  cc_plan p;
  fct_exec e;
  FCT_TRY(backward_plan(ctx, grad_y, x, n, stages, weights, saved, grad_x,
                    (const DLTensor* const*)grad_weights, grad_bias, &p));
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  if (p.N == 0) { /* no images: the gradients of the parameters are zero */
    for (int s = 0; grad_weights && s < p.S; ++s) FCT_TRY(zero_dense(&e, grad_weights[s]));
    if (grad_bias) FCT_TRY(zero_dense(&e, grad_bias));
    return FCT_OK;
  }
  cc_call* cl = &(cc_call){0};
  cl->p = p;
  FCT_TRY(fw_plan(ctx, cl, SUB_WEIGHTS, weights, true, true, grad_x != NULL,
                  grad_weights != NULL));
  FCT_TRY(fct_check_workspace(ctx, cl->form_w ? cl->bytes : p.bytes));
  if (p.check)
    FCT_TRY(fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "conv_chain"));
  if (cl->form_w)
    FCT_TRY(fw_backward(&e, cl, grad_y, x, weights, grad_x, grad_weights, grad_bias));
  else
    FCT_TRY(chain_backward(&e, &p, grad_y, x, saved, grad_x, grad_weights, grad_bias));
  if (p.check && grad_x) {
    fct_args a;
    a.n = 0;
    fct_args_add(&a, "grad_y", grad_y);
    add_inputs(&a, x, &p, weights);
    FCT_TRY(fct_check_finite(ctx, e.be, fct_ws_at(&e, p.off_scratch), "grad_x", grad_x, a.names,
                         a.ts, a.n));
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Form W: the composed kernel from the factors, then one dense stage         */
/* ------------------------------------------------------------------------- */

/* The rule (factorch.h, "form W"): a chain composes exactly into one
 * convolution of x when every stage sees one item (batch 1) holding exactly
 * the previous stage's output [C, OH, OW] and, along each axis, at most one
 * stage is not trivial (kernel, stride or padding other than 1, 1, 0). The
 * trivial stages are pointwise linear maps of the channels, which commute
 * with zero padding, and filters on different axes compose into their outer
 * product; the composed stage takes each axis's kernel, stride, padding and
 * dilation from that axis's non-trivial stage, and groups = the gcd of the
 * stages' groups (each stage maps the channels of one of those blocks to the
 * same block). CP, Tucker-2 and low-rank chains compose; TT's (batch > 1)
 * does not.
 *
 * W is the chain's response to the basis images: run with stride 1, no
 * padding and no dilation on the NW = Ci·KH·KW one-hot images [Ci, KH, KW],
 * the chain writes [NW, Co] = Wᵀ (row (c, i, j), column o; zero outside the
 * groups' blocks), in chunks of nb images (a leading 1x1 mixer is peeled
 * off first, see compose: then the basis is smaller). The dense stage reads
 * Wᵀ in place (stage_wg). Backward: grad_x and gWᵀ = Σ col·goutᵀ from the
 * dense stage, then the weights' gradients are the chain's backward on the
 * same basis images with grad_y = gWᵀ (Wᵀ = chain(basis) is linear in each
 * weight, so the weights' gradients of <gWᵀ, chain(basis)> are gW projected
 * on the factors), one chunk at a time, the chunks' gradients summed at the
 * end. CPU only: the one-hot images are written by the host. */

static int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static bool axis_trivial(int64_t k, int64_t s, int64_t p0, int64_t p1) {
  return k == 1 && s == 1 && p0 == 0 && p1 == 0;
}

/* Whether peeling the leading 1x1 mixer C_in -> R costs fewer FLOPs: the
 * rest of the chain on R·KK basis images and the GEMMs of Wᵀ (2·NW·R/g·Co),
 * against the whole chain on the NW = C_in·KK images (the mixer alone
 * 2·R·KK·C_in/g per image, mostly multiplying zeros). */
static bool peel_pays(const cc_plan* p, const cc_fw* f, const fct_conv_stage* d) {
  double kk = (double)(d->kh * d->kw), rest = 0;
  int64_t h = d->kh, w = d->kw;
  for (int i = 1; i < p->S; ++i) {
    const cc_stage* c = &p->s[i];
    h -= c->st.kh - 1, w -= c->st.kw - 1;
    double k = c->kind == CC_DEPTHWISE ? (double)(c->st.kh * c->st.kw) : (double)c->K;
    rest += 2.0 * (double)(c->st.out_channels * h * w) * k;
  }
  const cc_stage* m = &p->s[0];
  double R = (double)m->st.out_channels, NW = (double)f->NW;
  double Co = (double)p->s[p->S - 1].st.out_channels;
  double peeled = R * kk * rest + 2.0 * NW * (double)m->Cog * Co;
  double whole = NW * (2.0 * R * kk * (double)m->Cig + rest);
  return peeled < whole;
}

static void compose(const cc_plan* p, cc_fw* f) {
  memset(f, 0, sizeof *f);
  const fct_conv_stage* s0 = &p->s[0].st;
  fct_conv_stage d = {1, s0->in_channels, s0->in_h, s0->in_w, p->s[p->S - 1].st.out_channels,
                      1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0};
  int nh = 0, nw = 0;
  for (int i = 0; i < p->S; ++i) {
    const fct_conv_stage* st = &p->s[i].st;
    if (st->batch != 1) return;
    if (i > 0) {
      const cc_stage* prev = &p->s[i - 1];
      if (st->in_channels != prev->st.out_channels || st->in_h != prev->geom.OH ||
          st->in_w != prev->geom.OW)
        return;
    }
    d.groups = gcd64(d.groups, st->groups);
    if (!axis_trivial(st->kh, st->stride_h, st->pad_top, st->pad_bottom)) {
      if (nh++) return;
      d.kh = st->kh, d.stride_h = st->stride_h, d.dil_h = st->dil_h;
      d.pad_top = st->pad_top, d.pad_bottom = st->pad_bottom;
    }
    if (!axis_trivial(st->kw, st->stride_w, st->pad_left, st->pad_right)) {
      if (nw++) return;
      d.kw = st->kw, d.stride_w = st->stride_w, d.dil_w = st->dil_w;
      d.pad_left = st->pad_left, d.pad_right = st->pad_right;
    }
  }
  int64_t h = d.kh, w = d.kw;
  for (int i = 0; i < p->S; ++i) {
    fct_conv_stage b = p->s[i].st;
    b.in_h = h, b.in_w = w;
    b.stride_h = b.stride_w = b.dil_h = b.dil_w = 1;
    b.pad_top = b.pad_left = b.pad_bottom = b.pad_right = 0;
    h -= b.kh - 1, w -= b.kw - 1;
    f->basis[i] = b;
  }
  cc_stage c;
  fct_context quiet = {0};
  const cc_stage* last = &p->s[p->S - 1];
  if (h != 1 || w != 1 || stage_init(&quiet, 0, &d, &c) != FCT_OK || c.geom.OH != last->geom.OH ||
      c.geom.OW != last->geom.OW)
    return;
  if (!mul3(d.in_channels, d.kh, d.kw, &f->NW) || !fct_fits_int(f->NW)) return;
  f->NB = f->NW;
  f->nbs = p->S;
  /* A leading channel mixer (CP's and Tucker's C_in -> R) is peeled off
   * when that costs fewer FLOPs (peel_pays): the basis runs the rest on the
   * R·KH·KW one-hot images [R, KH, KW], giving B [R·KH·KW, Co], and per
   * group of the mixer Wᵀ_g [Cig, KH·KW·Co] = W0_gᵀ · B_g (peel_gemms). */
  const fct_conv_stage* m0 = &p->s[0].st;
  if (p->S > 1 && p->s[0].kind == CC_DIRECT && peel_pays(p, f, &d)) {
    f->s0 = 1;
    f->nbs = p->S - 1;
    f->NB = m0->out_channels * d.kh * d.kw;
  }
  f->dense = d;
  f->Co = d.out_channels;
  f->ok = true;
}


/* A plan of n stages on N images laid out as the chain's, for the parent's
 * dtype and device: weights bound from the call's tensors (SUB_WEIGHTS),
 * one stage reading the formed Wᵀ (SUB_FORMED), or sizes only (SUB_SIZES,
 * for pricing without tensors). */
static fct_status sub_plan(fct_context* ctx, const cc_plan* parent, cc_sub_w how,
                           const DLTensor* const* weights, int n, const fct_conv_stage* st,
                           int64_t N, bool backward, bool gx, bool gw, bool keep, bool pack_x,
                           bool pack_g, const fct_backend* be, cc_plan* q) {
  memset(q, 0, sizeof *q);
  FCT_TRY(chain_init(ctx, n, st, q));
  q->dt = parent->dt;
  q->es = parent->es;
  q->cuda = parent->cuda;
  q->N = N;
  q->Cy = q->s[n - 1].st.out_channels;
  q->Py = q->s[n - 1].P;
  for (int i = 0; i < n; ++i) {
    cc_stage* c = &q->s[i];
    int64_t cols = c->kind == CC_DEPTHWISE ? c->st.kh * c->st.kw : c->K;
    if (how == SUB_FORMED) {
      c->wt = true;
      c->ld = c->st.out_channels;
      c->w.rows = c->st.in_channels * c->st.kh * c->st.kw;
      c->w.cols = c->st.out_channels;
    } else if (how == SUB_WEIGHTS) {
      fct_param_init(&c->w, weights[i], c->st.out_channels, cols, true);
    } else {
      c->w.rows = c->st.out_channels;
      c->w.cols = cols;
    }
  }
  q->backward = backward;
  q->gx = gx;
  q->gw = gw;
  q->keep = keep;
  q->pack_x = pack_x;
  q->pack_g = pack_g;
  return plan_layout(ctx, q, be);
}

/* FLOP-equivalents of a pass of plan q over n images: the stages' FLOPs,
 * their traffic (input, output and twice the im2col buffer per image) and
 * the calls (one per group and stage per chunk); a backward costs about
 * twice a forward. */
static double plan_cost(const cc_plan* q, double n, bool backward, const fct_machine* mc) {
  double flops = 0, elems = 0, chunk_calls = 0, item_calls = 0, planes = 0;
  for (int i = 0; i < q->S; ++i) {
    const cc_stage* c = &q->s[i];
    bool dw = c->kind == CC_DEPTHWISE;
    double k = dw ? (double)(c->st.kh * c->st.kw) : (double)c->K;
    flops += 2.0 * (double)c->out_numel * k;
    elems += (double)(c->in_numel + c->out_numel + 2 * c->col_numel);
    if (dw) planes += (double)(c->st.batch * c->st.in_channels);
    if (dw || c->P == 1)
      chunk_calls += dw ? 1 : (double)c->st.groups; /* whole chunks (items_mat) */
    else
      item_calls += (double)(c->st.batch * c->st.groups);
    if (c->kind == CC_IM2COL && !c->col_is_in) chunk_calls += 1;
  }
  /* Chunks of the chain's budget (not of the plan's worker count, so that
   * the choice depends on the shapes, the batch and the dtype only). */
  fct_machine m = fct_machine_for(q->cuda);
  double chunks = ceil(n * elems * (double)q->es / (2.0 * (double)m.chunk_bytes));
  if (chunks < 1) chunks = 1;
  double f = 1, t = 1;
  if (backward) f = 2, t = 2;
  /* Calls: per chunk im2col, the depthwise kernels and the GEMMs of
   * one-pixel stages (whole chunks); the other GEMMs run item by item and
   * group by group on each worker, serial BLAS calls without a pool
   * dispatch, priced at 1/50 of a dispatched call; the depthwise kernels
   * take each (item, channel) plane as a task, priced at 1/500 (measured
   * about 0.2 µs per 3x3 plane: CP's basis images are 2^18 of them at
   * rank 512 on 64 channels). */
  return f * n * flops + mc->flop_per_byte * (double)q->es * t * n * elems +
         mc->call_flops * t * (chunks * chunk_calls + n * item_calls / 50.0 + n * planes / 500.0);
}


/* Images of chunk k of the basis. */
static int64_t basis_chunk(const cc_call* c, int64_t k) {
  int64_t n0 = k * c->nb;
  return c->f.NB - n0 < c->nb ? c->f.NB - n0 : c->nb;
}

/* Whether to form W for this pass, and then the layout: [Wᵀ | gWᵀ | basis
 * chunk | its saved activations | the chunks' weight gradients | one
 * region shared by the sub-plans run one after the other]. The choice
 * prices the pass from the batch size and the shapes with the chain's
 * constants; a backward prices every gradient, so that the forward (which
 * must keep the chain's activations when the backward runs the chain) makes
 * the backward's choice. */
static fct_status fw_plan(fct_context* ctx, cc_call* c, cc_sub_w how,
                          const DLTensor* const* weights, bool backward, bool keep, bool gx,
                          bool gw) {
  const cc_plan* p = &c->p;
  c->form_w = false;
  c->cost_chain = c->cost_form_w = 0;
  compose(p, &c->f);
  if (!c->f.ok || p->cuda || p->N == 0) return FCT_OK;
  fct_machine mc = fct_machine_for(p->cuda);
  const fct_backend* be = &fct_cpu_backend;
  double NB = (double)c->f.NB, es = (double)p->es;
  c->nb = (int64_t)((double)mc.chunk_bytes / (NB * es));
  if (c->nb < 1) c->nb = 1;
  if (c->nb > c->f.NB) c->nb = c->f.NB;
  if ((ctx->flags & FCT_FLAG_SMALL_CHUNKS) && c->nb > 3) c->nb = 3;
  c->chunks = (c->f.NB + c->nb - 1) / c->nb;
  /* Price: the direction asked, or for a forward that keeps activations,
   * the backward (whose choice binds the forward). */
  bool price_bwd = backward || keep;
  cc_plan* b = &(cc_plan){0};
  cc_plan* d = &(cc_plan){0};
  FCT_TRY(sub_plan(ctx, p, SUB_SIZES, NULL, c->f.nbs, c->f.basis + c->f.s0, c->nb, false, false,
                   false, false, false, false, be, b));
  FCT_TRY(sub_plan(ctx, p, SUB_FORMED, NULL, 1, &c->f.dense, p->N, price_bwd, true, true, false,
                   false, false, be, d));
  c->bw = b->wnumel;
  /* Forming W: the one-hot images written, the basis chain, the peeled
   * mixer's GEMM (and its two in the backward, with W formed twice). */
  double NW = (double)c->f.NW, Co = (double)c->f.Co;
  double onehot = mc.flop_per_byte * es * NB * NB, peel = 0;
  if (c->f.s0)
    peel = 2.0 * NW * (double)p->s[0].Cog * Co + mc.flop_per_byte * es * (NW + NB) * Co;
  double fw_fwd = plan_cost(b, NB, false, &mc) + onehot + peel;
  double fw = price_bwd ? 2 * fw_fwd + plan_cost(b, NB, true, &mc) + onehot + 2 * peel +
                              plan_cost(d, (double)p->N, true, &mc)
                        : fw_fwd + plan_cost(d, (double)p->N, false, &mc);
  double chain = plan_cost(p, (double)p->N, price_bwd, &mc);
  bool fits = (2 * NW + 2 * NB) * Co * es + (double)c->nb * NB * es <= (double)mc.workspace_cap;
  c->cost_chain = chain;
  c->cost_form_w = fw;
  if (ctx->flags & FCT_FLAG_FORCE_FORM_W)
    c->form_w = true;
  else if (ctx->flags & FCT_FLAG_FORCE_CONTRACT)
    c->form_w = false;
  else
    c->form_w = fits && fw < chain;
  if (!c->form_w) return FCT_OK;
  /* The layout for this pass. */
  c->backward = backward;
  c->gx = gx;
  c->gw = gw;
  bool proj = backward && gw; /* the weights' gradients: the basis backward */
  const DLTensor* const* bweights = weights ? weights + c->f.s0 : NULL;
  c->bsaved = b->saved_per_image;
  size_t sub = 0;
  for (int last = 0; last < 2; ++last) {
    int64_t nc = basis_chunk(c, last ? c->chunks - 1 : 0);
    FCT_TRY(sub_plan(ctx, p, how, bweights, c->f.nbs, c->f.basis + c->f.s0, nc, false, false,
                     false, proj, false, false, be, b));
    if (b->bytes > sub) sub = b->bytes;
    if (!proj) continue;
    FCT_TRY(sub_plan(ctx, p, how, bweights, c->f.nbs, c->f.basis + c->f.s0, nc, true, false,
                     true, true, false, false, be, b));
    if (b->bytes > sub) sub = b->bytes;
  }
  FCT_TRY(sub_plan(ctx, p, SUB_FORMED, NULL, 1, &c->f.dense, p->N, backward, gx, gw, false,
                   p->pack_x, p->pack_g, be, d));
  fct_layout L;
  memset(&L, 0, sizeof L);
  int64_t wn = c->f.NW * c->f.Co; /* bounded: the dense kernel's elements times groups */
  int64_t bn = c->f.NB * c->f.Co; /* the peeled basis's output B (<= wn) */
  c->off_wt = fct_layout_take(&L, wn, p->es);
  c->off_wd = fct_layout_take(&L, wn, p->es);
  if (c->f.s0) {
    c->off_b = fct_layout_take(&L, bn, p->es);
    const cc_stage* m0 = &p->s[0];
    c->off_w0 = fct_layout_take(&L, m0->w.rows * m0->w.cols, p->es);
  }
  if (proj) {
    c->off_gwt = fct_layout_take(&L, wn, p->es);
    if (c->f.s0) c->off_gb = fct_layout_take(&L, bn, p->es);
    c->off_bsaved = fct_layout_take(&L, c->nb * c->bsaved, p->es);
    if (c->chunks > 1) c->off_part = fct_layout_take(&L, c->chunks * c->bw, p->es);
  }
  /* The one-hot chunk and the basis's region are dead while the dense
   * stage runs: its region overlaps them (a smaller workspace, and the
   * allocator hands back large blocks as fresh pages every call). */
  double eb = (double)c->nb * (double)c->f.NB * (double)p->es;
  if (eb > (double)INT64_MAX / 2)
    return fct_fail(ctx, FCT_ERR_OVERFLOW, "form W: the workspace overflows");
  size_t e_bytes = ((size_t)eb + FCT_WS_ALIGN - 1) / FCT_WS_ALIGN * FCT_WS_ALIGN;
  size_t u = e_bytes + sub > d->bytes ? e_bytes + sub : d->bytes;
  size_t off_u = fct_layout_take(&L, (int64_t)u, 1);
  c->off_e = off_u;
  c->off_sub = off_u + e_bytes;
  c->off_dense = off_u;
  return fct_layout_done(ctx, &L, &c->bytes);
}

/* Basis images [n0, n0 + nc) into E [nc, NB]: one-hot rows (host writes;
 * form W runs on the CPU only). */
static void fill_onehot(char* E, int64_t nc, int64_t NB, int64_t n0, fct_dtype dt, size_t es) {
  memset(E, 0, (size_t)(nc * NB) * es);
  for (int64_t i = 0; i < nc; ++i) {
    if (dt == FCT_F64)
      ((double*)E)[i * NB + n0 + i] = 1.0;
    else
      ((float*)E)[i * NB + n0 + i] = 1.0f;
  }
}

/* The region of the basis's sub-plans, and the dense stage's. */
static fct_exec sub_exec(const fct_exec* e, const cc_call* c) {
  fct_exec se = *e;
  se.ws = fct_ws_at(e, c->off_sub);
  return se;
}
static fct_exec dense_exec(const fct_exec* e, const cc_call* c) {
  fct_exec se = *e;
  se.ws = fct_ws_at(e, c->off_dense);
  return se;
}

/* The basis chain's forward on chunk k (E filled), writing Wᵀ's rows and,
 * when saved is not NULL, its activations. */
static fct_status basis_forward(const fct_exec* e, const cc_call* c, const DLTensor* const* weights,
                                int64_t k, char* E, char* saved) {
  int64_t nc = basis_chunk(c, k);
  fct_exec se = sub_exec(e, c);
  cc_plan* q = &(cc_plan){0};
  FCT_TRY(sub_plan(e->ctx, &c->p, SUB_WEIGHTS, weights + c->f.s0, c->f.nbs, c->f.basis + c->f.s0,
                   nc, false, false, false, saved != NULL, false, false, e->be, q));
  FCT_TRY(bind_weights(&se, q));
  cc_job* j = &(cc_job){0};
  j->e = &se;
  j->p = q;
  j->xb = E;
  j->y = at(fct_ws_at(e, c->f.s0 ? c->off_b : c->off_wt), k * c->nb * c->f.Co, e->es);
  j->saved = saved;
  j->images = forward_images;
  return run_workers(j);
}

/* The peeled mixer W0 [R, Cig] (groups g0, Rg = R / g0 rows each) and B:
 * forward (gw0 NULL) Wᵀ_g = W0_gᵀ · B_g; backward gB_g = W0_g · gWᵀ_g and
 * gW0_g = B_g · gWᵀ_gᵀ, with Wᵀ_g / gWᵀ_g [Cig, KH·KW·Co] and B_g / gB_g
 * [Rg, KH·KW·Co] views of the rows of group g. */
static fct_status peel_gemms(const fct_exec* e, const cc_call* c, const DLTensor* const* weights,
                             char* gw0) {
  const cc_stage* m0 = &c->p.s[0];
  fct_param w0;
  fct_param_init(&w0, weights[0], m0->w.rows, m0->w.cols, true);
  w0.off = c->off_w0;
  FCT_TRY(fct_param_bind(e, &w0));
  int64_t g0 = m0->st.groups, Rg = m0->Cog, Cig = m0->Cig;
  int64_t cols = c->f.dense.kh * c->f.dense.kw * c->f.Co;
  char *wt = fct_ws_at(e, c->off_wt), *b = fct_ws_at(e, c->off_b);
  char *gwt = fct_ws_at(e, c->off_gwt), *gb = fct_ws_at(e, c->off_gb);
  for (int64_t g = 0; g < g0; ++g) {
    fct_mat W0g = {at(w0.m.data, g * Rg * w0.m.rs, e->es), Rg, Cig, w0.m.rs, w0.m.cs};
    fct_mat Bg = fct_dense(at(b, g * Rg * cols, e->es), Rg, cols);
    if (!gw0) {
      fct_mat A = fct_mat_t(W0g);
      fct_mat C = fct_dense(at(wt, g * Cig * cols, e->es), Cig, cols);
      FCT_TRY(fct_x_gemm(e, &A, &Bg, &C, 0.0));
      continue;
    }
    fct_mat G = fct_dense(at(gwt, g * Cig * cols, e->es), Cig, cols);
    fct_mat GB = fct_dense(at(gb, g * Rg * cols, e->es), Rg, cols);
    FCT_TRY(fct_x_gemm(e, &W0g, &G, &GB, 0.0));
    fct_mat Gt = fct_mat_t(G);
    fct_mat GW = fct_dense(at(gw0, g * Rg * Cig, e->es), Rg, Cig);
    FCT_TRY(fct_x_gemm(e, &Bg, &Gt, &GW, 0.0));
  }
  return FCT_OK;
}

/* W [Co, K] from Wᵀ (each group's block transposed): the dense stage's
 * GEMMs read it with unit stride along K (measured faster than reading Wᵀ
 * transposed in place; gW is still written as gWᵀ). */
static fct_status dense_w(const fct_exec* e, const cc_call* c, cc_stage* d) {
  char* wd = fct_ws_at(e, c->off_wd);
  for (int64_t g = 0; g < d->st.groups; ++g) {
    int64_t shape[2] = {d->Cog, d->K}, strides[2] = {1, c->f.Co};
    FCT_TRY(fct_x_permute(e, at(d->w.m.data, g * d->K * c->f.Co + g * d->Cog, e->es), 2, shape,
                          strides, at(wd, g * d->Cog * d->K, e->es)));
  }
  d->wd = wd;
  return FCT_OK;
}

/* Wᵀ [NW, Co] from the factors. */
static fct_status form_wt(const fct_exec* e, const cc_call* c, const DLTensor* const* weights) {
  char* E = fct_ws_at(e, c->off_e);
  for (int64_t k = 0; k < c->chunks; ++k) {
    fill_onehot(E, basis_chunk(c, k), c->f.NB, k * c->nb, e->dt, e->es);
    FCT_TRY(basis_forward(e, c, weights, k, E, NULL));
  }
  return c->f.s0 ? peel_gemms(e, c, weights, NULL) : FCT_OK;
}

static fct_status fw_forward(const fct_exec* e, const cc_call* c, const DLTensor* x,
                             const DLTensor* const* weights, const DLTensor* bias, DLTensor* y) {
  FCT_TRY(form_wt(e, c, weights));
  fct_exec se = dense_exec(e, c);
  cc_plan* d = &(cc_plan){0};
  FCT_TRY(sub_plan(e->ctx, &c->p, SUB_FORMED, NULL, 1, &c->f.dense, c->p.N, false, false, false,
                   false, c->p.pack_x, false, e->be, d));
  fct_mat wt = {fct_ws_at(e, c->off_wt), c->f.NW, c->f.Co, c->f.Co, 1};
  d->s[0].w.m = wt;
  FCT_TRY(dense_w(e, c, &d->s[0]));
  cc_job* j = &(cc_job){0};
  j->e = &se;
  j->p = d;
  FCT_TRY(fct_x_dense_base(&se, x, d->pack_x, d->off_x, &j->xb));
  j->y = fct_data(y);
  j->bias = bias ? fct_data(bias) : NULL;
  j->bst = fct_vector_stride(bias);
  j->images = forward_images;
  return run_workers(j);
}

static fct_status fw_backward(const fct_exec* e, const cc_call* c, const DLTensor* grad_y,
                              const DLTensor* x, const DLTensor* const* weights,
                              DLTensor* grad_x, DLTensor* const* grad_weights,
                              DLTensor* grad_bias) {
  FCT_TRY(form_wt(e, c, weights));
  fct_exec se = dense_exec(e, c);
  cc_plan* d = &(cc_plan){0};
  FCT_TRY(sub_plan(e->ctx, &c->p, SUB_FORMED, NULL, 1, &c->f.dense, c->p.N, true, c->gx, c->gw,
                   false, c->p.pack_x, c->p.pack_g, e->be, d));
  fct_mat wt = {fct_ws_at(e, c->off_wt), c->f.NW, c->f.Co, c->f.Co, 1};
  d->s[0].w.m = wt;
  FCT_TRY(dense_w(e, c, &d->s[0]));
  char* gwt = fct_ws_at(e, c->off_gwt);
  cc_job* j = &(cc_job){0};
  j->e = &se;
  j->p = d;
  if (c->gw) FCT_TRY(fct_x_dense_base(&se, x, d->pack_x, d->off_x, &j->xb));
  FCT_TRY(fct_x_dense_base(&se, grad_y, d->pack_g, d->off_g, &j->gyb));
  if (grad_bias)
    FCT_TRY(e->be->channel_sums(e->ctx, e->device, e->dt, c->p.N, c->p.Cy, c->p.Py, j->gyb,
                                fct_data(grad_bias)));
  j->gx = grad_x ? fct_data(grad_x) : NULL;
  j->gw[0] = c->gw ? gwt : NULL;
  FCT_TRY(run_backward(j));
  if (!c->gw) return FCT_OK;
  /* The peeled mixer's gradient, and gB for the basis below. */
  if (c->f.s0) FCT_TRY(peel_gemms(e, c, weights, fct_data(grad_weights[0])));
  char* gyb = fct_ws_at(e, c->f.s0 ? c->off_gb : c->off_gwt);
  /* The projection on the factors, chunk by chunk (see the top of the
   * section); one chunk writes the gradients directly. */
  se = sub_exec(e, c);
  char* E = fct_ws_at(e, c->off_e);
  char* saved = fct_ws_at(e, c->off_bsaved);
  char* part = fct_ws_at(e, c->off_part);
  for (int64_t k = 0; k < c->chunks; ++k) {
    int64_t nc = basis_chunk(c, k);
    fill_onehot(E, nc, c->f.NB, k * c->nb, e->dt, e->es);
    FCT_TRY(basis_forward(e, c, weights, k, E, saved));
    cc_plan* q = &(cc_plan){0};
    FCT_TRY(sub_plan(e->ctx, &c->p, SUB_WEIGHTS, weights + c->f.s0, c->f.nbs,
                     c->f.basis + c->f.s0, nc, true, false, true, true, false, false, e->be, q));
    FCT_TRY(bind_weights(&se, q));
    cc_job* jb = &(cc_job){0};
    jb->e = &se;
    jb->p = q;
    jb->xb = E;
    jb->gyb = at(gyb, k * c->nb * c->f.Co, e->es);
    jb->saved = saved;
    int64_t off = k * c->bw;
    for (int s = 0; s < q->S; ++s) {
      DLTensor* g = grad_weights[c->f.s0 + s];
      jb->gw[s] = c->chunks == 1 ? fct_data(g) : at(part, off, e->es);
      off += q->s[s].w.rows * q->s[s].w.cols;
    }
    FCT_TRY(run_backward(jb));
  }
  if (c->chunks == 1) return FCT_OK;
  int64_t off = 0;
  for (int s = c->f.s0; s < c->p.S; ++s) {
    int64_t numel = c->p.s[s].w.rows * c->p.s[s].w.cols;
    fct_mat pm = {at(part, off, e->es), c->chunks, numel, c->bw, 1};
    FCT_TRY(e->be->column_sums(e->ctx, e->device, e->dt, &pm, fct_data(grad_weights[s])));
    off += numel;
  }
  return FCT_OK;
}

/* ------------------------------------------------------------------------- */
/* Plan                                                                       */
/* ------------------------------------------------------------------------- */

/* FLOPs (2 × multiply-adds) of one image through the stages. */
static double stage_flops(const cc_plan* q) {
  double f = 0;
  for (int i = 0; i < q->S; ++i) {
    const cc_stage* c = &q->s[i];
    double k = c->kind == CC_DEPTHWISE ? (double)(c->st.kh * c->st.kw) : (double)c->K;
    f += 2.0 * (double)c->out_numel * k;
  }
  return f;
}

/* The chain's plan without tensors, as fct_conv_chain_forward_workspace /
 * _backward_workspace make it for C-contiguous tensors. */
static fct_status info_plan(fct_context* ctx, int n, const fct_conv_stage* stages, int64_t batch,
                            fct_dtype dt, bool cuda, bool backward, cc_call* c) {
  cc_plan* p = &c->p;
  memset(c, 0, sizeof *c);
  FCT_TRY(chain_init(ctx, n, stages, p));
  p->dt = dt;
  p->es = fct_dtype_bytes(dt);
  p->cuda = cuda;
  p->N = batch;
  p->Cy = p->s[n - 1].st.out_channels;
  p->Py = p->s[n - 1].P;
  for (int i = 0; i < n; ++i) {
    cc_stage* s = &p->s[i];
    s->w.rows = s->st.out_channels;
    s->w.cols = s->kind == CC_DEPTHWISE ? s->st.kh * s->st.kw : s->K;
  }
  p->backward = backward;
  p->keep = backward;
  p->gx = p->gw = p->gb = backward;
  FCT_TRY(plan_layout(ctx, p, &fct_cpu_backend));
  return fw_plan(ctx, c, SUB_SIZES, NULL, backward, backward, backward, backward);
}

fct_status fct_conv_chain_plan(int n_stages, const fct_conv_stage* stages, int64_t batch,
                               DLDevice device, DLDataType dtype, uint32_t flags,
                               fct_linear_plan_info* info) {
  if (!info) return FCT_ERR_NULL_ARGUMENT;
  memset(info, 0, sizeof *info);
  fct_dtype dt = fct_dtype_of(dtype);
  if (dt == FCT_DTYPE_INVALID) return FCT_ERR_DTYPE;
  if (batch < 0) return FCT_ERR_INVALID_VALUE;
  fct_context ctx = {0};
  ctx.flags = flags;
  bool cuda = device.device_type == kDLCUDA;
  cc_call* f = &(cc_call){0};
  cc_call* b = &(cc_call){0};
  FCT_TRY(info_plan(&ctx, n_stages, stages, batch, dt, cuda, false, f));
  FCT_TRY(info_plan(&ctx, n_stages, stages, batch, dt, cuda, true, b));
  double N = (double)batch, chain = N * stage_flops(&f->p);
  double fw_fwd = 0, fw_bwd = 0;
  if (f->f.ok) {
    cc_plan* q = &(cc_plan){0};
    FCT_TRY(sub_plan(&ctx, &f->p, SUB_SIZES, NULL, f->f.nbs, f->f.basis + f->f.s0, 1, false,
                     false, false, false, false, false, &fct_cpu_backend, q));
    double basis = (double)f->f.NB * stage_flops(q);
    if (f->f.s0) basis += 2.0 * (double)f->f.NW * (double)f->p.s[0].Cog * (double)f->f.Co;
    FCT_TRY(sub_plan(&ctx, &f->p, SUB_FORMED, NULL, 1, &f->f.dense, 1, false, false, false, false,
                     false, false, &fct_cpu_backend, q));
    double dense = N * stage_flops(q);
    fw_fwd = basis + dense;
    fw_bwd = 4 * basis + 2 * dense; /* W twice, the basis backward, the dense backward */
  }
  info->forward_flops = f->form_w ? fw_fwd : chain;
  info->backward_flops = b->form_w ? fw_bwd : 2 * chain;
  info->forward_workspace = f->form_w ? f->bytes : f->p.bytes;
  info->backward_workspace = b->form_w ? b->bytes : b->p.bytes;
  if (f->f.ok)
    snprintf(info->plan, sizeof info->plan,
             "%d stages; composes into one %lldx%lld convolution (groups %lld): W [%lld, %lld] "
             "formed from %lld basis images%s in %lld chunk(s); cost chain/form_w: forward "
             "%.3g/%.3g, backward %.3g/%.3g",
             n_stages, (long long)f->f.dense.kh, (long long)f->f.dense.kw,
             (long long)f->f.dense.groups, (long long)f->f.Co, (long long)f->f.NW,
             (long long)f->f.NB, f->f.s0 ? " after the first 1x1" : "", (long long)f->chunks,
             f->cost_chain, f->cost_form_w,
             b->cost_chain, b->cost_form_w);
  else
    snprintf(info->plan, sizeof info->plan,
             "%d stages; does not compose into one convolution: the chain", n_stages);
  snprintf(info->forward_strategy, sizeof info->forward_strategy, "%s",
           f->form_w ? "form_w" : "contract");
  snprintf(info->backward_strategy, sizeof info->backward_strategy, "%s",
           b->form_w ? "form_w" : "contract");
  return FCT_OK;
}
