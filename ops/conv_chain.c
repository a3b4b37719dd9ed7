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
 */
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
  for (int i = 0; i < p->S; ++i) FCT_TRY(fct_param_bind(e, &p->s[i].w));
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

static fct_status stage_forward(const fct_exec* e, const cc_stage* c, int64_t n, const char* in,
                                char* col, char* out) {
  const char* w = c->w.m.data;
  if (c->kind == CC_DEPTHWISE)
    return e->be->depthwise_forward(e->ctx, e->device, e->dt, &c->geom, n, in, w, out);
  const char* src = in;
  int64_t item = c->st.in_channels * c->P_in; /* direct: the item is [Ci, P] */
  if (c->kind == CC_IM2COL) {
    FCT_TRY(e->be->im2col(e->ctx, e->device, e->dt, &c->geom, n, in, col));
    src = col;
    item = c->st.in_channels * c->st.kh * c->st.kw * c->P;
  }
  for (int64_t g = 0; g < c->st.groups; ++g) {
    fct_mat A = fct_dense(at(w, g * c->Cog * c->K, e->es), c->Cog, c->K);
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
  bool im2col = c->kind == CC_IM2COL;
  int64_t item = im2col ? c->st.in_channels * c->st.kh * c->st.kw * c->P
                        : c->st.in_channels * c->P_in;
  int64_t gitem = c->st.out_channels * c->P;
  if (gw) {
    const char* src = in;
    if (im2col) {
      FCT_TRY(e->be->im2col(e->ctx, e->device, e->dt, &c->geom, n, in, col));
      src = col;
    }
    /* gW_g [Cog, K] = beta·gW_g + Σ_items gout_g [Cog, P] · src_gᵀ [P, K] */
    for (int64_t g = 0; g < c->st.groups; ++g) {
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
    fct_mat A = fct_mat_t(fct_dense(at(w, g * c->Cog * c->K, e->es), c->Cog, c->K));
    fct_mat B = fct_dense(at(gout, g * c->Cog * c->P, e->es), c->Cog, c->P);
    fct_mat C = fct_dense(at(dst, g * c->K * c->P, e->es), c->K, c->P);
    FCT_TRY(fct_x_gemm_batched(e, &A, &B, &C, 0.0, n, 0, gitem, item));
  }
  if (im2col) FCT_TRY(e->be->col2im(e->ctx, e->device, e->dt, &c->geom, n, col, gin));
  return FCT_OK;
}

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
  cc_plan p;
  FCT_TRY(forward_plan(&c, x, n, stages, weights, bias, y, saved, &p));
  *bytes = p.bytes;
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
  FCT_TRY(fct_exec_begin(ctx, "x", x, &e));
  if (p.N == 0) return FCT_OK;
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
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
  cc_plan p;
  FCT_TRY(backward_plan(&c, grad_y, x, n, stages, weights, saved, grad_x, grad_weights, grad_bias,
                    &p));
  *bytes = p.bytes;
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
  for (int64_t i0 = i_begin; i0 < i_end; i0 += p->Nc) {
    int64_t nc = i_end - i0 < p->Nc ? i_end - i0 : p->Nc;
    double beta = i0 == i_begin ? 0.0 : 1.0;
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
      FCT_TRY(stage_backward(e, p, c, nc * c->st.batch, in, g, col, red, gw[s], gin, beta));
      g = gin;
    }
  }
  return FCT_OK;
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
  FCT_TRY(fct_check_workspace(ctx, p.bytes));
  if (p.check)
    FCT_TRY(fct_check_finite_grad(ctx, e.be, fct_ws_at(&e, p.off_scratch), grad_y, "conv_chain"));
  FCT_TRY(bind_weights(&e, &p));
  cc_job* j = &(cc_job){0};
  j->e = &e;
  j->p = &p;
  if (p.gw) FCT_TRY(fct_x_dense_base(&e, x, p.pack_x, p.off_x, &j->xb));
  FCT_TRY(fct_x_dense_base(&e, grad_y, p.pack_g, p.off_g, &j->gyb));
  j->saved = saved ? fct_data(saved) : NULL;
  j->gx = grad_x ? fct_data(grad_x) : NULL;
  for (int s = 0; grad_weights && s < p.S; ++s) j->gw[s] = fct_data(grad_weights[s]);
  if (grad_bias)
    FCT_TRY(e.be->channel_sums(ctx, e.device, e.dt, p.N, p.Cy, p.Py, j->gyb, fct_data(grad_bias)));
  j->images = backward_images;
  FCT_TRY(run_workers(j));
  if (p.gw && p.T > 1) {
    /* grad_weights[s] = Σ_w partial_w[s]: the partials are the rows of a
     * [T, wnumel] view with rows worker_bytes apart. */
    int64_t rs = (int64_t)(p.worker_bytes / e.es), off = 0;
    for (int s = 0; s < p.S; ++s) {
      int64_t numel = p.s[s].w.rows * p.s[s].w.cols;
      fct_mat part = {fct_ws_at(&e, p.off_worker + p.off_part) + off * (int64_t)e.es, p.T, numel,
                      rs, 1};
      FCT_TRY(e.be->column_sums(ctx, e.device, e.dt, &part, fct_data(grad_weights[s])));
      off += numel;
    }
  }
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
