/*
 * conv_chain (factorch.h, "Factorized convolutions") forward and backward
 * through the public API, against a naive float64 reference that applies
 * every stage by direct loops (its backward is cross-checked once against
 * central finite differences, so the reference itself is trusted):
 *  - chains: CP (1x1, depthwise kh x 1 with stride/padding/dilation on H,
 *    depthwise 1 x kw, 1x1), Tucker-2 (kxk with stride 2 and asymmetric
 *    padding), low-rank with groups = 2 on both stages, TT built as
 *    factorch/_conv_layout.py builds it (stage 0 over C_in items of one
 *    channel, then 1x1 stages over items with in_h = 1), a single stage of
 *    2 items (no saved tensor), a 1-D-like chain (in_h = 1), and a chain
 *    large enough to run in several chunks per worker;
 *  - N = 0 (empty y; weight and bias gradients must come out zero), 1, 4
 *    (with 3 pool threads one worker would get no image), 5 (uneven shares);
 *  - float32 and float64; bias or none; saved or NULL (inference);
 *    contiguous, gapped (x and grad_y rows with gaps, weights column-major:
 *    the pack paths) and channels-last layouts; every gradient subset;
 *  - outputs NaN-prefilled, the workspace exactly the queried size (ASan
 *    sees overruns) and filled with NaN bytes (a read before write shows);
 *  - everything without a thread pool and with a stand-in pool of 3 threads
 *    that runs blocks one by one in reverse order (the per-worker image split
 *    and the reduction of partial weight gradients), results deterministic;
 *  - bad arguments: the status and a message naming the argument.
 * Each result element is checked against tol · (the same reference run on
 * absolute values), the sum of the magnitudes of its terms, which bounds
 * the rounding error of any summation order.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_tensorized.h"

/* ------------------------------------------------------------------------- */
/* Stage sizes, from the header's formulas (not from the op)                  */
/* ------------------------------------------------------------------------- */

static int64_t st_oh(const fct_conv_stage* s) {
  return (s->in_h + s->pad_top + s->pad_bottom - s->dil_h * (s->kh - 1) - 1) / s->stride_h + 1;
}
static int64_t st_ow(const fct_conv_stage* s) {
  return (s->in_w + s->pad_left + s->pad_right - s->dil_w * (s->kw - 1) - 1) / s->stride_w + 1;
}
static int64_t st_in_numel(const fct_conv_stage* s) {
  return s->batch * s->in_channels * s->in_h * s->in_w;
}
static int64_t st_out_numel(const fct_conv_stage* s) {
  return s->batch * s->out_channels * st_oh(s) * st_ow(s);
}
static int64_t st_w_numel(const fct_conv_stage* s) {
  return s->out_channels * (s->in_channels / s->groups) * s->kh * s->kw;
}

/* ------------------------------------------------------------------------- */
/* Naive float64 reference                                                    */
/* ------------------------------------------------------------------------- */

/* Every term of one stage on N images, each image `batch` items [Ci, H, W]:
 *   out[n, b, oc, oh, ow] += w[oc, icl, i, j] · in[n, b, g·Cig + icl, ih, iw]
 * with g = oc / Cog, ih = oh·sh − pt + i·dh, iw = ow·sw − pl + j·dw (terms
 * outside the input read the zero padding and are skipped). The backward is
 * the adjoint of the same terms: each sends w·gout back to its input element
 * and gout·in to its weight. Any of out, gin, gw may be NULL; the caller
 * zeroes them. */
static void ref_stage(const fct_conv_stage* s, int64_t N, const double* in, const double* w,
                      double* out, const double* gout, double* gin, double* gw) {
  int64_t OH = st_oh(s), OW = st_ow(s), Cig = s->in_channels / s->groups,
          Cog = s->out_channels / s->groups;
  for (int64_t nb = 0; nb < N * s->batch; ++nb)
    for (int64_t oc = 0; oc < s->out_channels; ++oc)
      for (int64_t icl = 0; icl < Cig; ++icl) {
        int64_t ic = oc / Cog * Cig + icl;
        for (int64_t i = 0; i < s->kh; ++i)
          for (int64_t j = 0; j < s->kw; ++j) {
            int64_t wi = ((oc * Cig + icl) * s->kh + i) * s->kw + j;
            for (int64_t oh = 0; oh < OH; ++oh) {
              int64_t ih = oh * s->stride_h - s->pad_top + i * s->dil_h;
              if (ih < 0 || ih >= s->in_h) continue;
              for (int64_t ow = 0; ow < OW; ++ow) {
                int64_t iw = ow * s->stride_w - s->pad_left + j * s->dil_w;
                if (iw < 0 || iw >= s->in_w) continue;
                int64_t xi = ((nb * s->in_channels + ic) * s->in_h + ih) * s->in_w + iw;
                int64_t oi = ((nb * s->out_channels + oc) * OH + oh) * OW + ow;
                if (out) out[oi] += w[wi] * in[xi];
                if (gin) gin[xi] += w[wi] * gout[oi];
                if (gw) gw[wi] += gout[oi] * in[xi];
              }
            }
          }
      }
}

static double* zeros(int64_t n) { return calloc((size_t)n + 1, sizeof(double)); }

/* The chain's activations: act[0] = x, act[s + 1] = stage s's output (act[S]
 * before the bias); y = act[S] + bias along dim 1 of y [N, Cy, Py]. */
typedef struct ref_chain {
  int S;
  const fct_conv_stage* st;
  int64_t N, Cy, Py;
  double* act[FCT_MAX_STAGES + 1];
  double* y;
} ref_chain;

static void ref_forward(ref_chain* r, const double* x, double* const* w, const double* bias) {
  r->act[0] = (double*)x;
  for (int s = 0; s < r->S; ++s) {
    r->act[s + 1] = zeros(r->N * st_out_numel(&r->st[s]));
    ref_stage(&r->st[s], r->N, r->act[s], w[s], r->act[s + 1], NULL, NULL, NULL);
  }
  int64_t ny = r->N * r->Cy * r->Py;
  r->y = zeros(ny);
  for (int64_t k = 0; k < ny; ++k) r->y[k] = r->act[r->S][k] + (bias ? bias[k / r->Py % r->Cy] : 0);
}

/* gx (N·in_numel), gw[s] and gb (Cy) from gy, stages last to first. */
static void ref_backward(const ref_chain* r, double* const* w, const double* gy, double* gx,
                         double** gw, double* gb) {
  int64_t ny = r->N * r->Cy * r->Py;
  double* g = zeros(ny);
  memcpy(g, gy, (size_t)ny * sizeof *g);
  for (int s = r->S - 1; s >= 0; --s) {
    double* gin = zeros(r->N * st_in_numel(&r->st[s]));
    memset(gw[s], 0, (size_t)st_w_numel(&r->st[s]) * sizeof(double));
    ref_stage(&r->st[s], r->N, r->act[s], w[s], NULL, g, gin, gw[s]);
    free(g);
    g = gin;
  }
  memcpy(gx, g, (size_t)(r->N * st_in_numel(&r->st[0])) * sizeof *g);
  free(g);
  memset(gb, 0, (size_t)r->Cy * sizeof *gb);
  for (int64_t k = 0; k < ny; ++k) gb[k / r->Py % r->Cy] += gy[k];
}

static void ref_free(ref_chain* r) {
  for (int s = 1; s <= r->S; ++s) free(r->act[s]);
  free(r->y);
}

static uint64_t g_rng = 0xD1B54A32D192ED03ull;
static double rnd_value(void) { /* splitmix64 -> ±[0.1, 1] */
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  double u = (double)(z >> 11) / 9007199254740992.0, v = 0.1 + 0.9 * u;
  return (z & 1) ? -v : v;
}
static double* random_vec(int64_t n) {
  double* v = zeros(n);
  for (int64_t i = 0; i < n; ++i) v[i] = rnd_value();
  return v;
}

/* L = ⟨y, G⟩ is linear in every single input entry, so the central
 * difference (L(v + h) − L(v − h)) / 2h is its exact derivative up to
 * rounding: the reference backward must match it for x, every weight and
 * the bias, on a tiny chain with groups, stride, padding, dilation and a
 * second stage that reads the first one's output as 2 items. */
static void test_reference_against_finite_differences(void) {
  static const fct_conv_stage st[2] = {
      {1, 2, 4, 5, 4, 2, 3, 2, 1, 1, 0, 0, 1, 1, 2, 2},  /* -> [4, 2, 2] */
      {2, 2, 2, 2, 3, 2, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1},  /* 2 items -> [2, 3, 2, 2] */
  };
  const int64_t N = 2, Cy = 6, Py = 4;
  CHECK(st_out_numel(&st[0]) == st_in_numel(&st[1]) && st_out_numel(&st[1]) == Cy * Py,
        "finite differences: bad chain");
  double* x = random_vec(N * st_in_numel(&st[0]));
  double* w[2] = {random_vec(st_w_numel(&st[0])), random_vec(st_w_numel(&st[1]))};
  double* b = random_vec(Cy);
  double* G = random_vec(N * Cy * Py);
  ref_chain r = {2, st, N, Cy, Py, {0}, NULL};
  ref_forward(&r, x, w, b);
  double* gx = zeros(N * st_in_numel(&st[0]));
  double* gw[2] = {zeros(st_w_numel(&st[0])), zeros(st_w_numel(&st[1]))};
  double* gb = zeros(Cy);
  ref_backward(&r, w, G, gx, gw, gb);
  ref_free(&r);

  struct {
    const char* name;
    double* v;
    double* grad;
    int64_t n;
  } params[] = {{"x", x, gx, N * st_in_numel(&st[0])},
                {"weights[0]", w[0], gw[0], st_w_numel(&st[0])},
                {"weights[1]", w[1], gw[1], st_w_numel(&st[1])},
                {"bias", b, gb, Cy}};
  const double h = 0.25; /* exact for a linear function; large against rounding */
  for (size_t p = 0; p < sizeof params / sizeof *params; ++p) {
    double worst = 0;
    for (int64_t k = 0; k < params[p].n; ++k) {
      double L[2], v0 = params[p].v[k];
      for (int side = 0; side < 2; ++side) {
        params[p].v[k] = v0 + (side ? -h : h);
        ref_chain t = {2, st, N, Cy, Py, {0}, NULL};
        ref_forward(&t, x, w, b);
        L[side] = 0;
        for (int64_t e = 0; e < N * Cy * Py; ++e) L[side] += t.y[e] * G[e];
        ref_free(&t);
      }
      params[p].v[k] = v0;
      double fd = (L[0] - L[1]) / (2 * h), d = fabs(fd - params[p].grad[k]) / (1 + fabs(fd));
      worst = d > worst ? d : worst;
    }
    CHECK(worst < 1e-12, "reference backward vs finite differences, %s: error %.3g",
          params[p].name, worst);
  }
  free(x); free(w[0]); free(w[1]); free(b); free(G); free(gx); free(gw[0]); free(gw[1]);
  free(gb);
}

/* ------------------------------------------------------------------------- */
/* The chains                                                                 */
/* ------------------------------------------------------------------------- */

typedef struct chain_case {
  const char* name;
  int S;
  fct_conv_stage st[FCT_MAX_STAGES];
  int64_t Cy; /* y [N, Cy, rest] */
} chain_case;

/* field order: batch, in_channels, in_h, in_w, out_channels, kh, kw,
 * stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dil_h,
 * dil_w, groups */
static const chain_case k_chains[] = {
    {"cp",
     4,
     {{1, 3, 9, 8, 4, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1},
      /* depthwise 3 x 1 on H: stride 2, padding 1 above and 2 below, dilation 2 */
      {1, 4, 9, 8, 4, 3, 1, 2, 1, 1, 0, 2, 0, 2, 1, 4},
      /* depthwise 1 x 3 on W: stride 2, padding 1 left only */
      {1, 4, 4, 8, 4, 1, 3, 1, 2, 0, 1, 0, 0, 1, 1, 4},
      {1, 4, 4, 4, 5, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1}},
     5},
    {"tucker2",
     3,
     {{1, 4, 7, 6, 3, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1},
      /* 3x3, stride 2, padding top 1, left 0, bottom 0, right 2 */
      {1, 3, 7, 6, 2, 3, 3, 2, 2, 1, 0, 0, 2, 1, 1, 1},
      {1, 2, 3, 3, 6, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1}},
     6},
    {"lowrank groups=2",
     2,
     {{1, 4, 6, 7, 6, 3, 2, 1, 1, 1, 1, 1, 1, 1, 2, 2},
      {1, 6, 6, 7, 4, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 2}},
     4},
    {"single stage of 2 items",
     1,
     {{2, 2, 5, 6, 3, 3, 3, 1, 1, 0, 1, 2, 1, 1, 1, 1}},
     6},
    {"1-D (in_h = 1)",
     3,
     {{1, 3, 1, 12, 4, 1, 3, 1, 2, 0, 2, 0, 1, 1, 2, 1},
      {1, 4, 1, 6, 4, 1, 2, 1, 1, 0, 0, 0, 0, 1, 1, 4},
      {1, 4, 1, 5, 3, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1}},
     3},
};

/* The TT chain as ConvLayout.stages builds it for "tt": the spatial core on
 * each of the C_in = ∏ in_modes input channels (C_in items of 1 channel),
 * then, for k = d−1 .. 0, a 1x1 stage over ∏ in_modes[:k] items of
 * in_modes[k]·r_(k+1) channels, in_h = 1, in_w = ∏ out_modes[k+1:] · OH·OW,
 * writing r_k·out_modes[k] channels (r_0 = 1). */
static chain_case tt_chain(int d, const int64_t* in_modes, const int64_t* out_modes,
                           const int64_t* ranks /* r_0 .. r_d */, int64_t h, int64_t w,
                           const fct_conv_stage* conv /* kernel, stride, pads, dilation */) {
  chain_case c;
  memset(&c, 0, sizeof c);
  c.name = "tt";
  int64_t ci = 1, co = 1;
  for (int k = 0; k < d; ++k) ci *= in_modes[k], co *= out_modes[k];
  fct_conv_stage s0 = *conv;
  s0.batch = ci;
  s0.in_channels = 1;
  s0.in_h = h;
  s0.in_w = w;
  s0.out_channels = ranks[d];
  s0.groups = 1;
  c.st[c.S++] = s0;
  int64_t p = st_oh(&s0) * st_ow(&s0);
  for (int k = d - 1; k >= 0; --k) {
    int64_t items = 1, cols = p;
    for (int i = 0; i < k; ++i) items *= in_modes[i];
    for (int i = k + 1; i < d; ++i) cols *= out_modes[i];
    fct_conv_stage s = {items, in_modes[k] * ranks[k + 1], 1, cols, ranks[k] * out_modes[k],
                        1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1};
    c.st[c.S++] = s;
  }
  c.Cy = co;
  return c;
}

/* ------------------------------------------------------------------------- */
/* Running the op                                                             */
/* ------------------------------------------------------------------------- */

/* A workspace of exactly `bytes` (so that ASan sees a write past it), full
 * of NaN bytes (so that reading scratch before writing it shows). */
static void* g_ws;
static void set_workspace(fct_context* c, size_t bytes) {
  free(g_ws);
  g_ws = NULL;
  if (bytes && posix_memalign(&g_ws, 256, bytes) != 0) g_ws = NULL;
  if (g_ws) memset(g_ws, 0xFF, bytes);
  c->workspace = g_ws;
  c->workspace_bytes = g_ws ? bytes : 0;
}

typedef struct layout_case {
  const char* name;
  int x_order[4], w_order[4], g_order[3]; /* memory order, outermost first */
  int64_t x_gap, g_gap;
} layout_case;

static const layout_case k_layouts[] = {
    {"contiguous", {0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2}, 0, 0},
    /* rows with gaps and column-major weights: the pack paths */
    {"gapped", {0, 1, 2, 3}, {3, 2, 1, 0}, {0, 1, 2}, 3, 2},
    {"channels-last", {0, 2, 3, 1}, {0, 2, 3, 1}, {0, 2, 1}, 0, 0},
};

static double g_tol;
static char g_label[256];

/* Every element of t within tol · abs of ref (NaN fails: never written). */
static void check_close(const char* what, const test_tensor* t, const double* ref,
                        const double* abs_ref) {
  double* got = tz_to_double(t);
  int64_t n = tb_numel(t), bad = -1;
  for (int64_t i = 0; i < n && bad < 0; ++i)
    if (!(fabs(got[i] - ref[i]) <= g_tol * abs_ref[i])) bad = i;
  CHECK(bad < 0, "%s: %s element %lld = %.17g, expected %.17g (scale %.3g)", g_label, what,
        (long long)bad, bad < 0 ? 0.0 : got[bad], bad < 0 ? 0.0 : ref[bad],
        bad < 0 ? 0.0 : abs_ref[bad]);
  free(got);
}

static bool same_bits(const test_tensor* a, const test_tensor* b) {
  size_t bytes = (size_t)tb_numel(a) * (a->dl.dtype.bits / 8u);
  return tb_numel(a) == tb_numel(b) && memcmp(a->dl.data, b->dl.data, bytes) == 0;
}

static bool all_finite(const test_tensor* t) {
  double* v = tz_to_double(t);
  bool ok = true;
  for (int64_t i = 0; i < tb_numel(t); ++i) ok = ok && isfinite(v[i]);
  free(v);
  return ok;
}

/* The reference's results, on the values and on their magnitudes. */
typedef struct expected {
  double *y, *gx, *gw[FCT_MAX_STAGES], *gb;
} expected;

static void expected_free(expected* e) {
  free(e->y); free(e->gx); free(e->gb);
  for (int s = 0; s < FCT_MAX_STAGES; ++s) free(e->gw[s]);
}

static expected reference(const chain_case* cc, int64_t N, int64_t Py, const double* x,
                          double* const* w, const double* b, const double* gy) {
  expected e;
  memset(&e, 0, sizeof e);
  ref_chain r = {cc->S, cc->st, N, cc->Cy, Py, {0}, NULL};
  ref_forward(&r, x, w, b);
  e.gx = zeros(N * st_in_numel(&cc->st[0]));
  for (int s = 0; s < cc->S; ++s) e.gw[s] = zeros(st_w_numel(&cc->st[s]));
  e.gb = zeros(cc->Cy);
  ref_backward(&r, w, gy, e.gx, e.gw, e.gb);
  e.y = r.y;
  r.y = NULL;
  ref_free(&r);
  return e;
}

static double* abs_copy(const double* v, int64_t n) {
  double* a = zeros(n);
  for (int64_t i = 0; i < n; ++i) a[i] = fabs(v[i]);
  return a;
}

/* Gradient subsets of the backward. */
enum { G_ALL, G_X, G_W, G_B, G_VARIANTS };
static const char* const k_variant_names[G_VARIANTS] = {"all", "grad_x only",
                                                        "grad_weights only", "grad_bias only"};

typedef struct grads {
  test_tensor *gx, *gw[FCT_MAX_STAGES], *gb;
} grads;

static void grads_free(grads* g, int S) {
  tb_free(g->gx);
  tb_free(g->gb);
  for (int s = 0; s < S; ++s) tb_free(g->gw[s]);
}

/* FCT_FLAG_* of every op call in run_case (the strategy forced by test_form_w). */
static uint32_t g_flags;

static void run_case(const chain_case* cc, int bits, int64_t N, const layout_case* L, bool bias) {
  const int S = cc->S;
  int64_t spi = -1;
  fct_status st = fct_conv_chain_check(NULL, S, cc->st, &spi);
  int64_t want_spi = 0;
  for (int s = 0; s < S; ++s) {
    CHECK(fct_conv_stage_out_numel(&cc->st[s]) == st_out_numel(&cc->st[s]),
          "%s: fct_conv_stage_out_numel(stages[%d]) = %lld, expected %lld", cc->name, s,
          (long long)fct_conv_stage_out_numel(&cc->st[s]), (long long)st_out_numel(&cc->st[s]));
    /* a depthwise stage inside the chain is recomputed, not saved */
    const fct_conv_stage* t = &cc->st[s];
    bool dw_mid = s > 0 && t->groups > 1 && t->in_channels == t->groups &&
                  t->out_channels == t->groups;
    if (s < S - 1 && !dw_mid) want_spi += st_out_numel(t);
  }
  CHECK(st == FCT_OK && spi == want_spi, "%s: check %d, saved_per_image %lld (expected %lld)",
        cc->name, st, (long long)spi, (long long)want_spi);

  const fct_conv_stage* s0 = &cc->st[0];
  int64_t out_numel = st_out_numel(&cc->st[S - 1]), Py = out_numel / cc->Cy;
  int64_t xs[4] = {N, s0->batch * s0->in_channels, s0->in_h, s0->in_w};
  int64_t ys[3] = {N, cc->Cy, Py}, bs[1] = {cc->Cy}, ss[2] = {N, spi};
  test_tensor* x = tb_new(bits, 4, xs, L->x_order, L->x_gap);
  test_tensor* gy = tb_new(bits, 3, ys, L->g_order, L->g_gap);
  test_tensor* b = bias ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* W[FCT_MAX_STAGES];
  const DLTensor* Wdl[FCT_MAX_STAGES];
  double* Wd[FCT_MAX_STAGES];
  double* Wa[FCT_MAX_STAGES];
  for (int s = 0; s < S; ++s) {
    const fct_conv_stage* t = &cc->st[s];
    int64_t shape[4] = {t->out_channels, t->in_channels / t->groups, t->kh, t->kw};
    W[s] = tb_new(bits, 4, shape, L->w_order, 0);
    Wdl[s] = &W[s]->dl;
    Wd[s] = tz_to_double(W[s]);
    Wa[s] = abs_copy(Wd[s], st_w_numel(t));
  }
  double* xd = tz_to_double(x);
  double* gyd = tz_to_double(gy);
  double* bd = b ? tz_to_double(b) : NULL;
  double* xa = abs_copy(xd, tb_numel(x));
  double* gya = abs_copy(gyd, tb_numel(gy));
  double* ba = b ? abs_copy(bd, cc->Cy) : NULL;
  expected ref = reference(cc, N, Py, xd, Wd, bd, gyd);
  expected mag = reference(cc, N, Py, xa, Wa, ba, gya);
  /* Against the magnitudes of the terms: a few hundred units in the last
   * place of the dtype covers any summation order over these chains, while
   * a missing or doubled term is off by at least 1/(number of terms). */
  g_tol = bits == 32 ? 2e-5 : 1e-12;

  for (int pool = 0; pool < 2; ++pool) {
    fct_cpu_set_thread_pool(pool ? tb_reverse_pool : NULL, pool ? tb_three_threads : NULL);
    snprintf(g_label, sizeof g_label, "%s f%d N=%lld %s bias=%d pool=%d", cc->name, bits,
             (long long)N, L->name, bias, pool);
    /* Forward keeping the activations (training), then without (inference). */
    test_tensor* y = tb_output(bits, 3, ys);
    test_tensor* saved = S > 1 ? tb_output(bits, 2, ss) : NULL;
    test_tensor* y_inf = tb_output(bits, 3, ys);
    for (int keep = 1; keep >= 0; --keep) {
      test_tensor* out = keep ? y : y_inf;
      DLTensor* sv = keep && saved ? &saved->dl : NULL;
      fct_context c = test_ctx(g_flags);
      size_t bytes = 0;
      st = fct_conv_chain_forward_workspace(&c, &x->dl, S, cc->st, Wdl, b ? &b->dl : NULL,
                                            &out->dl, sv, &bytes);
      CHECK(st == FCT_OK, "%s: forward workspace (saved=%d): %s", g_label, keep, test_err);
      set_workspace(&c, bytes);
      tb_pool_calls = 0;
      st = fct_conv_chain_forward(&c, &x->dl, S, cc->st, Wdl, b ? &b->dl : NULL, &out->dl, sv);
      CHECK(st == FCT_OK, "%s: forward (saved=%d): %s", g_label, keep, test_err);
      check_close(keep ? "y" : "y (saved = NULL)", out, ref.y, mag.y);
      /* With more than one image each pool thread takes its own images. */
      CHECK(!pool || N < 2 || tb_pool_calls >= 1, "%s: the forward did not use the pool",
            g_label);
    }
    /* A training forward follows the backward's strategy; forming W, the
     * backward does not read saved and the forward leaves it. */
    fct_linear_plan_info info;
    DLDevice cpu = {kDLCPU, 0};
    DLDataType dtype = {kDLFloat, (uint8_t)bits, 1};
    st = fct_conv_chain_plan(S, cc->st, N, cpu, dtype, g_flags, &info);
    CHECK(st == FCT_OK, "%s: plan %d", g_label, st);
    bool form_w = !strcmp(info.backward_strategy, "form_w");
    bool composes = !strstr(info.plan, "does not compose");
    CHECK(N == 0 || !(g_flags & FCT_FLAG_FORCE_FORM_W) || form_w == composes,
          "%s: forced form_w: %s / %s", g_label, info.backward_strategy, info.plan);
    CHECK(!(g_flags & FCT_FLAG_FORCE_CONTRACT) || !form_w, "%s: forced contract: %s", g_label,
          info.backward_strategy);
    if (saved && !form_w) CHECK(all_finite(saved), "%s: saved not entirely written", g_label);

    grads first;
    memset(&first, 0, sizeof first);
    for (int v = 0; v < G_VARIANTS; ++v) {
      bool want_x = v == G_ALL || v == G_X, want_w = v == G_ALL || v == G_W,
           want_b = v == G_ALL || v == G_B;
      grads g;
      memset(&g, 0, sizeof g);
      if (want_x) g.gx = tb_output(bits, 4, xs);
      if (want_b) g.gb = tb_output(bits, 1, bs);
      DLTensor* gwdl[FCT_MAX_STAGES];
      for (int s = 0; want_w && s < S; ++s) {
        g.gw[s] = tb_output(bits, 4, W[s]->shape);
        gwdl[s] = &g.gw[s]->dl;
      }
      /* The pooled backward twice: the results must not change run to run. */
      int runs = pool && v == G_ALL ? 2 : 1;
      for (int run = 0; run < runs; ++run) {
        if (run == 1) { /* keep the first run's results, fresh NaN outputs */
          first = g;
          memset(&g, 0, sizeof g);
          g.gx = tb_output(bits, 4, xs);
          g.gb = tb_output(bits, 1, bs);
          for (int s = 0; s < S; ++s) {
            g.gw[s] = tb_output(bits, 4, W[s]->shape);
            gwdl[s] = &g.gw[s]->dl;
          }
        }
        fct_context c = test_ctx(g_flags);
        size_t bytes = 0;
        const DLTensor* sv = saved ? &saved->dl : NULL;
        st = fct_conv_chain_backward_workspace(
            &c, &gy->dl, &x->dl, S, cc->st, Wdl, sv, g.gx ? &g.gx->dl : NULL,
            want_w ? (const DLTensor* const*)gwdl : NULL, g.gb ? &g.gb->dl : NULL, &bytes);
        CHECK(st == FCT_OK, "%s: backward workspace (%s): %s", g_label, k_variant_names[v],
              test_err);
        set_workspace(&c, bytes);
        st = fct_conv_chain_backward(&c, &gy->dl, &x->dl, S, cc->st, Wdl, sv,
                                     g.gx ? &g.gx->dl : NULL, want_w ? gwdl : NULL,
                                     g.gb ? &g.gb->dl : NULL);
        CHECK(st == FCT_OK, "%s: backward (%s): %s", g_label, k_variant_names[v], test_err);
        char what[96];
        if (g.gx) {
          snprintf(what, sizeof what, "grad_x (%s)", k_variant_names[v]);
          check_close(what, g.gx, ref.gx, mag.gx);
        }
        for (int s = 0; want_w && s < S; ++s) {
          snprintf(what, sizeof what, "grad_weights[%d] (%s)", s, k_variant_names[v]);
          check_close(what, g.gw[s], ref.gw[s], mag.gw[s]);
        }
        if (g.gb) {
          snprintf(what, sizeof what, "grad_bias (%s)", k_variant_names[v]);
          check_close(what, g.gb, ref.gb, mag.gb);
        }
      }
      if (runs == 2) {
        bool same = same_bits(first.gx, g.gx) && same_bits(first.gb, g.gb);
        for (int s = 0; s < S; ++s) same = same && same_bits(first.gw[s], g.gw[s]);
        CHECK(same, "%s: two pooled backward runs differ", g_label);
        grads_free(&first, S);
      }
      grads_free(&g, S);
    }
    tb_free(y);
    tb_free(y_inf);
    tb_free(saved);
  }
  fct_cpu_set_thread_pool(NULL, NULL);

  expected_free(&ref);
  expected_free(&mag);
  for (int s = 0; s < S; ++s) tb_free(W[s]), free(Wd[s]), free(Wa[s]);
  free(xd); free(gyd); free(bd); free(xa); free(gya); free(ba);
  tb_free(x); tb_free(gy); tb_free(b);
}

static void test_values(void) {
  static const int64_t Ns[] = {0, 1, 4, 5};
  const int64_t in_modes[2] = {2, 3}, out_modes[2] = {2, 2}, ranks[3] = {1, 3, 2};
  /* the spatial core: 3x3, stride 2, padding 1, on 6x6 -> 3x3 */
  const fct_conv_stage conv = {0, 0, 0, 0, 0, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1};
  chain_case tt = tt_chain(2, in_modes, out_modes, ranks, 6, 6, &conv);
  size_t nc = sizeof k_chains / sizeof *k_chains;
  for (size_t k = 0; k <= nc; ++k) {
    const chain_case* cc = k < nc ? &k_chains[k] : &tt;
    for (int bits = 32; bits <= 64; bits += 32)
      for (size_t n = 0; n < sizeof Ns / sizeof *Ns; ++n)
        for (size_t l = 0; l < sizeof k_layouts / sizeof *k_layouts; ++l)
          for (int bias = 0; bias < 2; ++bias) run_case(cc, bits, Ns[n], &k_layouts[l], bias);
  }
}

/* Images large enough that one im2col buffer (9 rows of 400x400, float64,
 * 11.5 MB) fills the op's chunk budget: the images run one chunk each, so
 * the weight gradients accumulate over several chunks per worker (6 images,
 * 3 workers with the pool, 6 chunks without), and the saved activations are
 * addressed chunk by chunk. */
static void test_chunks(void) {
  chain_case big = {"chunked",
                    2,
                    {{1, 1, 400, 400, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                     {1, 1, 400, 400, 2, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1}},
                    2};
  g_flags = FCT_FLAG_FORCE_CONTRACT; /* the chain's chunks (the cost model forms W here) */
  run_case(&big, 64, 6, &k_layouts[0], true);
  g_flags = FCT_FLAG_FORCE_FORM_W;
  run_case(&big, 64, 6, &k_layouts[0], true);
  g_flags = 0;
}

/* Both strategies forced (FORCE_FORM_W with basis chunks of 3 images too):
 * the CP, Tucker-2, low-rank and 1-D chains compose into one convolution
 * and form W; the single stage of 2 items and TT do not and run the chain. */
static void test_form_w(void) {
  static const int64_t Ns[] = {0, 1, 5};
  static const uint32_t flags[] = {FCT_FLAG_FORCE_CONTRACT, FCT_FLAG_FORCE_FORM_W,
                                   FCT_FLAG_FORCE_FORM_W | FCT_FLAG_SMALL_CHUNKS};
  const int64_t in_modes[2] = {2, 3}, out_modes[2] = {2, 2}, ranks[3] = {1, 3, 2};
  const fct_conv_stage conv = {0, 0, 0, 0, 0, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1};
  chain_case tt = tt_chain(2, in_modes, out_modes, ranks, 6, 6, &conv);
  size_t nc = sizeof k_chains / sizeof *k_chains;
  for (size_t f = 0; f < sizeof flags / sizeof *flags; ++f) {
    g_flags = flags[f];
    for (size_t k = 0; k <= nc; ++k) {
      const chain_case* cc = k < nc ? &k_chains[k] : &tt;
      for (size_t n = 0; n < sizeof Ns / sizeof *Ns; ++n)
        for (int bias = 0; bias < 2; ++bias) run_case(cc, 64, Ns[n], &k_layouts[0], bias);
      run_case(cc, 32, 5, &k_layouts[sizeof k_layouts / sizeof *k_layouts - 1], true);
    }
  }
  g_flags = 0;
}

/* ------------------------------------------------------------------------- */
/* Bad arguments                                                              */
/* ------------------------------------------------------------------------- */

/* A valid float32 chain to break one argument at a time: 3x3 C 3 -> 4 with
 * padding 1 on 5x5, then 1x1 4 -> 2; N = 2. */
typedef struct bad_fixture {
  fct_conv_stage st[2];
  test_tensor *x, *w0, *w1, *b, *y, *saved, *gy, *gx, *gw0, *gw1, *gb;
  const DLTensor* W[2];
  DLTensor* GW[2];
} bad_fixture;

static fct_status fwd(bad_fixture* f, fct_context* c, const fct_conv_stage* st, int n) {
  return fct_conv_chain_forward(c, &f->x->dl, n, st, f->W, &f->b->dl, &f->y->dl, &f->saved->dl);
}
static fct_status bwd(bad_fixture* f, fct_context* c, const DLTensor* saved) {
  return fct_conv_chain_backward(c, &f->gy->dl, &f->x->dl, 2, f->st, f->W, saved, &f->gx->dl,
                                 f->GW, &f->gb->dl);
}

static void test_errors(void) {
  static const fct_conv_stage valid[2] = {{1, 3, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1},
                                          {1, 4, 5, 5, 2, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1}};
  bad_fixture f;
  memset(&f, 0, sizeof f);
  memcpy(f.st, valid, sizeof valid);
  int64_t xs[4] = {2, 3, 5, 5}, w0s[4] = {4, 3, 3, 3}, w1s[4] = {2, 4, 1, 1}, bs[1] = {2},
          ys[3] = {2, 2, 25}, ss[2] = {2, 100};
  f.x = tb_new(32, 4, xs, NULL, 0);
  f.w0 = tb_new(32, 4, w0s, NULL, 0);
  f.w1 = tb_new(32, 4, w1s, NULL, 0);
  f.b = tb_new(32, 1, bs, NULL, 0);
  f.y = tb_output(32, 3, ys);
  f.saved = tb_output(32, 2, ss);
  f.gy = tb_new(32, 3, ys, NULL, 0);
  f.gx = tb_output(32, 4, xs);
  f.gw0 = tb_output(32, 4, w0s);
  f.gw1 = tb_output(32, 4, w1s);
  f.gb = tb_output(32, 1, bs);
  f.W[0] = &f.w0->dl;
  f.W[1] = &f.w1->dl;
  f.GW[0] = &f.gw0->dl;
  f.GW[1] = &f.gw1->dl;

  fct_context c = test_ctx(0);
  set_workspace(&c, 1 << 20);
  fct_status st = fwd(&f, &c, f.st, 2);
  CHECK(st == FCT_OK, "valid forward: %s", test_err);
  st = bwd(&f, &c, &f.saved->dl);
  CHECK(st == FCT_OK, "valid backward: %s", test_err);

  /* The stage list, through fct_conv_chain_check and the forward. */
  fct_conv_stage bad[2];
  memcpy(bad, f.st, sizeof bad);
  bad[1].groups = 3; /* divides neither 4 nor 2 */
  st = fct_conv_chain_check(&c, 2, bad, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages[1]: groups", "groups not dividing (check)");
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages[1]: groups", "groups not dividing");
  memcpy(bad, f.st, sizeof bad);
  bad[0].kh = 8; /* 7 rows once padded */
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "stages[0]: the kernel", "kernel larger than the input");
  memcpy(bad, f.st, sizeof bad);
  bad[0].dil_w = 4; /* extent 9 > 7 */
  st = fct_conv_chain_check(&c, 2, bad, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "stages[0]: the kernel", "dilated kernel too large");
  memcpy(bad, f.st, sizeof bad);
  bad[1].in_w = 4; /* reads 80 elements per image, stage 0 writes 100 */
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "stages[1]: reads 80", "element counts between stages");
  memcpy(bad, f.st, sizeof bad);
  bad[0].stride_h = 0;
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages[0]: strides", "stride 0");
  memcpy(bad, f.st, sizeof bad);
  bad[1].pad_right = -1;
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages[1]: paddings", "negative padding");
  memcpy(bad, f.st, sizeof bad);
  bad[0].batch = 0;
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages[0]: batch", "batch 0");
  st = fwd(&f, &c, f.st, 0);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages", "no stages");
  st = fct_conv_chain_check(&c, FCT_MAX_STAGES + 1, f.st, NULL);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "stages", "too many stages");
  st = fwd(&f, &c, NULL, 2);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "stages", "NULL stages");

  /* Sizes past int64: 2^40 x 2^40 pixels (and a huge dilation). */
  memcpy(bad, f.st, sizeof bad);
  bad[0].in_h = bad[0].in_w = (int64_t)1 << 40;
  st = fct_conv_chain_check(&c, 2, bad, NULL);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "stages[0]", "2^40 x 2^40 input");
  CHECK(fct_conv_stage_out_numel(&bad[0]) == 0, "out_numel of an overflowing stage");
  st = fwd(&f, &c, bad, 2);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "stages[0]", "2^40 x 2^40 input (forward)");
  memcpy(bad, f.st, sizeof bad);
  bad[0].kh = 2;
  bad[0].dil_h = INT64_MAX; /* extent − 1 = INT64_MAX: no room for the + 1 */
  st = fct_conv_chain_check(&c, 2, bad, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "stages[0]: the kernel", "dilation INT64_MAX");
  CHECK(fct_conv_stage_out_numel(NULL) == 0, "out_numel(NULL)");
  CHECK(fct_conv_stage_out_numel(&f.st[0]) == 100, "out_numel of stage 0");

  /* Tensors. */
  f.w1->shape[3] = 2;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "weights[1]: expected [2, 4, 1, 1]", "weight shape");
  f.w1->shape[3] = 1;
  f.w0->dl.ndim = 3;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_NDIM, "weights[0]", "3-D weight");
  f.w0->dl.ndim = 4;
  f.W[1] = NULL;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "weights[1]", "NULL weight");
  f.W[1] = &f.w1->dl;
  st = fct_conv_chain_forward(&c, &f.x->dl, 2, f.st, NULL, NULL, &f.y->dl, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "weights", "NULL weights");
  f.x->dl.dtype = (DLDataType){kDLInt, 64, 1};
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_DTYPE, "x: expected dtype", "int64 x");
  f.x->dl.dtype = (DLDataType){kDLFloat, 32, 1};
  f.w0->dl.dtype = (DLDataType){kDLInt, 64, 1};
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_DTYPE, "weights[0]", "int64 weight");
  f.w0->dl.dtype = (DLDataType){kDLFloat, 64, 1};
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_DTYPE, "weights[0]", "float64 weight, float32 x");
  f.w0->dl.dtype = (DLDataType){kDLFloat, 32, 1};
  f.x->shape[3] = 4;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "x: expected [N = 2, ...] with 75", "x per-image size");
  f.x->shape[3] = 5;
  f.b->shape[0] = 3;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "bias", "bias length");
  f.b->shape[0] = 2;
  f.y->shape[2] = 24;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "y: expected [N = 2, ...] with 50", "y per-image size");
  f.y->shape[2] = 25;
  f.y->shape[0] = 3;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "y batch");
  f.y->shape[0] = 2;
  f.y->strides[1] = 26; /* not C-contiguous */
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "strided y");
  f.y->strides[1] = 25;
  f.saved->shape[1] = 99;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_SHAPE, "saved: expected a C-contiguous tensor of 200", "saved size");
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "saved", "saved size (backward)");
  f.saved->shape[1] = 100;
  st = bwd(&f, &c, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "saved: required", "backward without saved");

  /* Overlaps: outputs may share memory with nothing. */
  DLTensor alias = f.y->dl;
  alias.data = f.x->dl.data; /* y over x's first 100 elements */
  st = fct_conv_chain_forward(&c, &f.x->dl, 2, f.st, f.W, &f.b->dl, &alias, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y: expected memory disjoint from x", "y aliasing x");
  alias = f.saved->dl;
  alias.data = (float*)f.y->dl.data + 10;
  st = fct_conv_chain_forward(&c, &f.x->dl, 2, f.st, f.W, &f.b->dl, &f.y->dl, &alias);
  test_expect_fail(st, FCT_ERR_LAYOUT, "saved", "saved overlapping y");
  alias = f.gx->dl;
  alias.data = f.gy->dl.data;
  st = fct_conv_chain_backward(&c, &f.gy->dl, &f.x->dl, 2, f.st, f.W, &f.saved->dl, &alias,
                               f.GW, &f.gb->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_x", "grad_x aliasing grad_y");
  alias = f.gw1->dl;
  alias.data = f.w1->dl.data;
  DLTensor* gw_alias[2] = {&f.gw0->dl, &alias};
  st = fct_conv_chain_backward(&c, &f.gy->dl, &f.x->dl, 2, f.st, f.W, &f.saved->dl, &f.gx->dl,
                               gw_alias, &f.gb->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_weights[1]", "grad_weights[1] aliasing weights[1]");

  /* Gradient outputs. */
  f.GW[1] = NULL;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "grad_weights[1]", "NULL grad_weights[1]");
  f.GW[1] = &f.gw1->dl;
  f.gw0->strides[0] = 28; /* not C-contiguous */
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_weights[0]", "strided grad_weights[0]");
  f.gw0->strides[0] = 27;
  f.gw1->shape[1] = 3;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_weights[1]", "grad_weights[1] shape");
  f.gw1->shape[1] = 4;
  f.gb->shape[0] = 1;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_bias", "grad_bias length");
  f.gb->shape[0] = 2;
  f.gx->shape[1] = 2;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_x", "grad_x shape");
  f.gx->shape[1] = 3;
  f.gy->shape[2] = 24;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_y", "grad_y per-image size");
  f.gy->shape[2] = 25;

  /* Workspace: one byte short of the query, then none. */
  size_t bytes = 0;
  st = fct_conv_chain_forward_workspace(&c, &f.x->dl, 2, f.st, f.W, &f.b->dl, &f.y->dl,
                                        &f.saved->dl, &bytes);
  CHECK(st == FCT_OK && bytes > 0, "forward workspace query: %d %zu %s", st, bytes, test_err);
  set_workspace(&c, bytes);
  c.workspace_bytes = bytes - 1;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "forward workspace too small");
  st = fct_conv_chain_backward_workspace(&c, &f.gy->dl, &f.x->dl, 2, f.st, f.W, &f.saved->dl,
                                         &f.gx->dl, (const DLTensor* const*)f.GW, &f.gb->dl,
                                         &bytes);
  CHECK(st == FCT_OK && bytes > 0, "backward workspace query: %d %zu %s", st, bytes, test_err);
  set_workspace(&c, bytes);
  c.workspace_bytes = bytes - 1;
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "backward workspace too small");
  c.workspace = NULL;
  c.workspace_bytes = 0;
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "no workspace");
  set_workspace(&c, 1 << 20);

  /* An empty batch whose other dims multiply past int64. */
  int64_t huge[4] = {0, (int64_t)1 << 31, (int64_t)1 << 31, (int64_t)1 << 31};
  DLTensor empty = f.x->dl;
  empty.shape = huge;
  st = fct_conv_chain_forward(&c, &empty, 2, f.st, f.W, &f.b->dl, &f.y->dl, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "x: elements per image", "empty x of huge images");

  /* FCT_FLAG_CHECK_FINITE names the input holding a NaN. */
  c.flags = FCT_FLAG_CHECK_FINITE;
  int64_t at1[4] = {1, 2, 0, 0};
  tb_set(f.w1, at1, NAN);
  st = fwd(&f, &c, f.st, 2);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "weights[1]", "NaN in weights[1]");
  tb_set(f.w1, at1, 0.5);
  int64_t at2[3] = {1, 1, 7};
  tb_set(f.gy, at2, INFINITY);
  st = bwd(&f, &c, &f.saved->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "grad_y", "Inf in grad_y");
  tb_set(f.gy, at2, 0.5);
  c.flags = 0;

  /* NULL context or result pointer: a status, no crash. */
  st = fwd(&f, NULL, f.st, 2);
  CHECK(st == FCT_ERR_NULL_ARGUMENT, "NULL context: %d", st);
  st = fct_conv_chain_forward_workspace(&c, &f.x->dl, 2, f.st, f.W, &f.b->dl, &f.y->dl,
                                        &f.saved->dl, NULL);
  CHECK(st == FCT_ERR_NULL_ARGUMENT, "NULL bytes: %d", st);

  tb_free(f.x); tb_free(f.w0); tb_free(f.w1); tb_free(f.b); tb_free(f.y); tb_free(f.saved);
  tb_free(f.gy); tb_free(f.gx); tb_free(f.gw0); tb_free(f.gw1); tb_free(f.gb);
}

int main(void) {
  test_reference_against_finite_differences();
  test_values();
  test_chunks();
  test_form_w();
  test_errors();
  free(g_ws);
  return test_report();
}
