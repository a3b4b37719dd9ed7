/* The CPU backend's primitives of the factorized convolutions (backend.h),
 * called through fct_cpu_backend, against naive float64 references
 * on random inputs that are never zero:
 *  - a grid of geometries: C ∈ {1,3}, H, W ∈ {1,5,7}, kernels 1x1, 3x3, 3x1,
 *    1x3, 2x2, 5x5, strides {1,2,3} and padding {0,1,2} on each axis
 *    independently (the padding after W differs from the one before), dilation
 *    {1,2} per axis, n ∈ {1,3}, float32 and float64;
 *  - outputs NaN-prefilled (an element a primitive fails to write shows) and
 *    followed by guard elements (one written past the end shows);
 *  - col2im and the depthwise backward functions also checked as adjoints:
 *    ⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩, ⟨dw(x, w), g⟩ = ⟨x, dw_bi(g, w)⟩ =
 *    ⟨w, dw_bw(x, g)⟩, and backward_weight with beta = 1 accumulating;
 *  - larger geometries under a stand-in thread pool (each block alone, in
 *    reverse order): results bitwise equal to the serial ones;
 *  - unsupported dtypes fail with FCT_ERR_DTYPE.
 * `test_conv_kernels --time` prints timings of im2col and the depthwise
 * convolution at the benchmarks' sizes instead. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "test_util.h"

#define GUARD 8
#define GUARD_VALUE 1234.5

static const fct_backend* be = &fct_cpu_backend;

/* ------------------------------------------------------------------------- */
/* Buffers: typed storage followed by GUARD sentinel elements                 */
/* ------------------------------------------------------------------------- */

typedef struct buf {
  int bits;
  int64_t n;
  char* p;
} buf;

static void put(buf* b, int64_t i, double v) {
  if (b->bits == 32) ((float*)b->p)[i] = (float)v;
  else ((double*)b->p)[i] = v;
}
static double get(const buf* b, int64_t i) {
  return b->bits == 32 ? (double)((const float*)b->p)[i] : ((const double*)b->p)[i];
}

/* fill: 0 NaN, 1 random in [-1, -0.1] U [0.1, 1]. */
static buf buf_new(int bits, int64_t n, int fill) {
  buf b = {bits, n, malloc((size_t)(n + GUARD) * (size_t)(bits / 8))};
  for (int64_t i = 0; i < n; ++i) {
    put(&b, i, fill ? tb_random() : NAN);
  }
  for (int64_t i = n; i < n + GUARD; ++i) put(&b, i, GUARD_VALUE);
  return b;
}
static bool guard_ok(const buf* b) {
  for (int64_t i = b->n; i < b->n + GUARD; ++i)
    if (get(b, i) != GUARD_VALUE) return false;
  return true;
}
static buf buf_copy(const buf* b) {
  buf c = buf_new(b->bits, b->n, 0);
  memcpy(c.p, b->p, (size_t)(b->n + GUARD) * (size_t)(b->bits / 8));
  return c;
}
static bool buf_same(const buf* a, const buf* b) {
  return a->n == b->n && memcmp(a->p, b->p, (size_t)a->n * (size_t)(a->bits / 8)) == 0;
}
static double* to_f64(const buf* b) {
  double* d = malloc((size_t)(b->n > 0 ? b->n : 1) * sizeof(double));
  for (int64_t i = 0; i < b->n; ++i) d[i] = get(b, i);
  return d;
}

/* ------------------------------------------------------------------------- */
/* Naive float64 references. Each also returns, per result element, the sum  */
/* of the absolute values of its terms (the scale of its rounding error).     */
/* ------------------------------------------------------------------------- */

static bool in_range(int64_t v, int64_t n) { return v >= 0 && v < n; }

/* col[b, c, i, j, oh, ow] = x[b, c, ih, iw] or 0. */
static void ref_im2col(const fct_conv_geom* g, int64_t n, const double* x, double* col) {
  int64_t k = 0;
  for (int64_t bc = 0; bc < n * g->C; ++bc)
    for (int64_t i = 0; i < g->kh; ++i)
      for (int64_t j = 0; j < g->kw; ++j)
        for (int64_t oh = 0; oh < g->OH; ++oh)
          for (int64_t ow = 0; ow < g->OW; ++ow, ++k) {
            int64_t ih = oh * g->sh - g->pt + i * g->dh, iw = ow * g->sw - g->pl + j * g->dw;
            col[k] = in_range(ih, g->H) && in_range(iw, g->W) ? x[(bc * g->H + ih) * g->W + iw]
                                                              : 0.0;
          }
}

/* x = Σ col over the entries that read x (the scatter form of the adjoint). */
static void ref_col2im(const fct_conv_geom* g, int64_t n, const double* col, double* x,
                       double* xabs) {
  int64_t in_n = n * g->C * g->H * g->W;
  memset(x, 0, (size_t)in_n * sizeof *x);
  memset(xabs, 0, (size_t)in_n * sizeof *xabs);
  int64_t k = 0;
  for (int64_t bc = 0; bc < n * g->C; ++bc)
    for (int64_t i = 0; i < g->kh; ++i)
      for (int64_t j = 0; j < g->kw; ++j)
        for (int64_t oh = 0; oh < g->OH; ++oh)
          for (int64_t ow = 0; ow < g->OW; ++ow, ++k) {
            int64_t ih = oh * g->sh - g->pt + i * g->dh, iw = ow * g->sw - g->pl + j * g->dw;
            if (!in_range(ih, g->H) || !in_range(iw, g->W)) continue;
            x[(bc * g->H + ih) * g->W + iw] += col[k];
            xabs[(bc * g->H + ih) * g->W + iw] += fabs(col[k]);
          }
}

/* The three depthwise maps, all as one loop over (b, c, i, j, oh, ow):
 * y[b,c,oh,ow] += w[c,i,j]·x[b,c,ih,iw], gx[b,c,ih,iw] += w·g[b,c,oh,ow],
 * gw[c,i,j] += g·x. */
static void ref_depthwise(const fct_conv_geom* g, int64_t n, const double* x, const double* w,
                          const double* go, double* y, double* yabs, double* gx, double* gxabs,
                          double* gw, double* gwabs) {
  int64_t in_n = n * g->C * g->H * g->W, out_n = n * g->C * g->OH * g->OW,
          w_n = g->C * g->kh * g->kw;
  memset(y, 0, (size_t)out_n * sizeof *y);
  memset(yabs, 0, (size_t)out_n * sizeof *y);
  memset(gx, 0, (size_t)in_n * sizeof *gx);
  memset(gxabs, 0, (size_t)in_n * sizeof *gx);
  memset(gw, 0, (size_t)w_n * sizeof *gw);
  memset(gwabs, 0, (size_t)w_n * sizeof *gw);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t c = 0; c < g->C; ++c)
      for (int64_t i = 0; i < g->kh; ++i)
        for (int64_t j = 0; j < g->kw; ++j)
          for (int64_t oh = 0; oh < g->OH; ++oh)
            for (int64_t ow = 0; ow < g->OW; ++ow) {
              int64_t ih = oh * g->sh - g->pt + i * g->dh, iw = ow * g->sw - g->pl + j * g->dw;
              if (!in_range(ih, g->H) || !in_range(iw, g->W)) continue;
              int64_t xi = ((b * g->C + c) * g->H + ih) * g->W + iw;
              int64_t oi = ((b * g->C + c) * g->OH + oh) * g->OW + ow;
              int64_t wi = (c * g->kh + i) * g->kw + j;
              y[oi] += w[wi] * x[xi];
              yabs[oi] += fabs(w[wi] * x[xi]);
              gx[xi] += w[wi] * go[oi];
              gxabs[xi] += fabs(w[wi] * go[oi]);
              gw[wi] += go[oi] * x[xi];
              gwabs[wi] += fabs(go[oi] * x[xi]);
            }
}

/* ------------------------------------------------------------------------- */
/* Comparisons                                                                */
/* ------------------------------------------------------------------------- */

static double g_tol; /* relative to the sum of |terms|: set per dtype */

/* Index of the first element of got outside ref ± tol·abs (or NaN), or -1. */
static int64_t first_bad(const buf* got, const double* ref, const double* abs_) {
  for (int64_t i = 0; i < got->n; ++i) {
    double v = get(got, i), r = ref[i];
    double bound = abs_ ? g_tol * abs_[i] : 0.0;
    if (!(fabs(v - r) <= bound)) return i;
  }
  return -1;
}

static char g_what[256]; /* the current case, for messages */

#define CHECK_CLOSE(name, got, ref, abs_)                                                   \
  do {                                                                                      \
    int64_t bad_ = first_bad(&(got), (ref), (abs_));                                   \
    CHECK(bad_ < 0, "%s %s: element %lld = %.17g, expected %.17g", name, g_what,            \
          (long long)bad_, bad_ < 0 ? 0.0 : get(&(got), bad_), bad_ < 0 ? 0.0 : (ref)[bad_]); \
    CHECK(guard_ok(&(got)), "%s %s: wrote past the end", name, g_what);                   \
  } while (0)

/* |⟨a, b⟩ − ⟨c, d⟩| <= tol·scale, the dots read from buffers. */
static double dot_bufs(const buf* a, const buf* b) {
  double s = 0;
  for (int64_t i = 0; i < a->n; ++i) s += get(a, i) * get(b, i);
  return s;
}
static double dot_abs(const double* a, const buf* b) {
  double s = 0;
  for (int64_t i = 0; i < b->n; ++i) s += fabs(a[i]) * fabs(get(b, i));
  return s;
}

/* ------------------------------------------------------------------------- */
/* One geometry                                                               */
/* ------------------------------------------------------------------------- */

/* Outputs of every primitive for one case (kept to compare runs). */
typedef struct outs {
  buf col, xi, y, gx, gw0, gw1, yb, sums;
} outs;

static void outs_free(outs* o) {
  buf* all[] = {&o->col, &o->xi, &o->y, &o->gx, &o->gw0, &o->gw1, &o->yb, &o->sums};
  for (size_t k = 0; k < sizeof all / sizeof *all; ++k) free(all[k]->p);
}

/* Inputs of one case. */
typedef struct ins {
  buf x, c, w, go, gw_init, bias;
} ins;

static void ins_free(ins* in) {
  buf* all[] = {&in->x, &in->c, &in->w, &in->go, &in->gw_init, &in->bias};
  for (size_t k = 0; k < sizeof all / sizeof *all; ++k) free(all[k]->p);
}

static ins make_inputs(int bits, const fct_conv_geom* g, int64_t n) {
  ins in;
  in.x = buf_new(bits, n * g->C * g->H * g->W, 1);
  in.c = buf_new(bits, n * g->C * g->kh * g->kw * g->OH * g->OW, 1);
  in.w = buf_new(bits, g->C * g->kh * g->kw, 1);
  in.go = buf_new(bits, n * g->C * g->OH * g->OW, 1);
  in.gw_init = buf_new(bits, g->C * g->kh * g->kw, 1);
  in.bias = buf_new(bits, 2 * g->C, 1); /* read with element stride 2 */
  return in;
}

/* Runs every primitive on `in`; statuses are checked here. */
static outs run_all(int bits, const fct_conv_geom* g, int64_t n, const ins* in) {
  fct_dtype dt = bits == 32 ? FCT_F32 : FCT_F64;
  fct_context ctx = {0};
  outs o;
  int64_t P = g->OH * g->OW;
  o.col = buf_new(bits, in->c.n, 0);
  CHECK(be->im2col(&ctx, 0, dt, g, n, in->x.p, o.col.p) == FCT_OK, "im2col %s", g_what);
  o.xi = buf_new(bits, in->x.n, 0);
  CHECK(be->col2im(&ctx, 0, dt, g, n, in->c.p, o.xi.p) == FCT_OK, "col2im %s", g_what);
  o.y = buf_new(bits, in->go.n, 0);
  CHECK(be->depthwise_forward(&ctx, 0, dt, g, n, in->x.p, in->w.p, o.y.p) == FCT_OK,
        "depthwise_forward %s", g_what);
  o.gx = buf_new(bits, in->x.n, 0);
  CHECK(be->depthwise_backward_input(&ctx, 0, dt, g, n, in->go.p, in->w.p, o.gx.p) == FCT_OK,
        "depthwise_backward_input %s", g_what);
  o.gw0 = buf_new(bits, in->w.n, 0); /* beta = 0: NaN must be ignored */
  CHECK(be->depthwise_backward_weight(&ctx, 0, dt, g, n, in->x.p, in->go.p, o.gw0.p, 0.0) ==
            FCT_OK,
        "depthwise_backward_weight %s", g_what);
  o.gw1 = buf_copy(&in->gw_init); /* beta = 1: accumulates */
  CHECK(be->depthwise_backward_weight(&ctx, 0, dt, g, n, in->x.p, in->go.p, o.gw1.p, 1.0) ==
            FCT_OK,
        "depthwise_backward_weight beta=1 %s", g_what);
  o.yb = buf_copy(&in->go);
  CHECK(be->channel_bias(&ctx, 0, dt, n, g->C, P, o.yb.p, in->bias.p, 2) == FCT_OK,
        "channel_bias %s", g_what);
  o.sums = buf_new(bits, g->C, 0);
  CHECK(be->channel_sums(&ctx, 0, dt, n, g->C, P, in->go.p, o.sums.p) == FCT_OK,
        "channel_sums %s", g_what);
  return o;
}

static void check_all(const fct_conv_geom* g, int64_t n, const ins* in,
                      const outs* o) {
  int64_t in_n = in->x.n, col_n = in->c.n, out_n = in->go.n, w_n = in->w.n;
  int64_t P = g->OH * g->OW;
  double *x = to_f64(&in->x), *c = to_f64(&in->c), *w = to_f64(&in->w), *go = to_f64(&in->go);
  double* col = malloc((size_t)(col_n + 1) * sizeof(double));
  double *xi = malloc((size_t)(in_n + 1) * sizeof(double)),
         *xiabs = malloc((size_t)(in_n + 1) * sizeof(double));
  double *y = malloc((size_t)(out_n + 1) * sizeof(double)),
         *yabs = malloc((size_t)(out_n + 1) * sizeof(double));
  double *gx = malloc((size_t)(in_n + 1) * sizeof(double)),
         *gxabs = malloc((size_t)(in_n + 1) * sizeof(double));
  double *gw = malloc((size_t)(w_n + 1) * sizeof(double)),
         *gwabs = malloc((size_t)(w_n + 1) * sizeof(double));

  /* im2col copies: exact */
  ref_im2col(g, n, x, col);
  CHECK_CLOSE("im2col", o->col, col, NULL);
  /* col2im against the reference, and as im2col's adjoint */
  ref_col2im(g, n, c, xi, xiabs);
  CHECK_CLOSE("col2im", o->xi, xi, xiabs);
  {
    double lhs = dot_bufs(&o->col, &in->c), rhs = dot_bufs(&in->x, &o->xi);
    double scale = dot_abs(col, &in->c);
    CHECK(fabs(lhs - rhs) <= g_tol * scale + 1e-300, "<im2col(x), c> = %.17g but <x, col2im(c)> = %.17g %s",
          lhs, rhs, g_what);
  }
  /* depthwise */
  ref_depthwise(g, n, x, w, go, y, yabs, gx, gxabs, gw, gwabs);
  CHECK_CLOSE("depthwise_forward", o->y, y, yabs);
  CHECK_CLOSE("depthwise_backward_input", o->gx, gx, gxabs);
  CHECK_CLOSE("depthwise_backward_weight", o->gw0, gw, gwabs);
  {
    double* gw1 = malloc((size_t)(w_n + 1) * sizeof(double));
    double* gw1abs = malloc((size_t)(w_n + 1) * sizeof(double));
    for (int64_t k = 0; k < w_n; ++k) {
      gw1[k] = get(&in->gw_init, k) + gw[k];
      gw1abs[k] = gwabs[k] + fabs(get(&in->gw_init, k));
    }
    CHECK_CLOSE("depthwise_backward_weight beta=1", o->gw1, gw1, gw1abs);
    free(gw1);
    free(gw1abs);
  }
  {
    /* ⟨dw(x, w), g⟩ = ⟨x, dw_bi(g, w)⟩ = ⟨w, dw_bw(x, g)⟩; the scale is
     * Σ |w||x||g| over the terms: Σ_o yabs[o]·|g[o]|. */
    double a = dot_bufs(&o->y, &in->go), b = dot_bufs(&in->x, &o->gx),
           cc = dot_bufs(&in->w, &o->gw0);
    double scale = dot_abs(yabs, &in->go);
    CHECK(fabs(a - b) <= g_tol * scale && fabs(a - cc) <= g_tol * scale,
          "depthwise adjoints: <dw(x), g> = %.17g, <x, dw_bi(g)> = %.17g, <w, dw_bw(x, g)> = "
          "%.17g %s",
          a, b, cc, g_what);
  }
  /* channel_bias, channel_sums over [n, C, P] */
  {
    double* yb = malloc((size_t)(out_n + 1) * sizeof(double));
    double* ybabs = malloc((size_t)(out_n + 1) * sizeof(double));
    for (int64_t k = 0; k < out_n; ++k) {
      int64_t ch = (k / (P > 0 ? P : 1)) % g->C;
      yb[k] = go[k] + get(&in->bias, 2 * ch);
      ybabs[k] = fabs(go[k]) + fabs(get(&in->bias, 2 * ch));
    }
    CHECK_CLOSE("channel_bias", o->yb, yb, ybabs);
    double *s = calloc((size_t)g->C + 1, sizeof(double)), *sabs = calloc((size_t)g->C + 1, sizeof(double));
    for (int64_t k = 0; k < out_n; ++k) {
      int64_t ch = (k / P) % g->C;
      s[ch] += go[k];
      sabs[ch] += fabs(go[k]);
    }
    CHECK_CLOSE("channel_sums", o->sums, s, sabs);
    free(yb);
    free(ybabs);
    free(s);
    free(sabs);
  }
  free(x), free(c), free(w), free(go), free(col), free(xi), free(xiabs), free(y), free(yabs);
  free(gx), free(gxabs), free(gw), free(gwabs);
}

static void describe(int bits, const fct_conv_geom* g, int64_t n) {
  snprintf(g_what, sizeof g_what,
           "[f%d n=%lld C=%lld H=%lld W=%lld k=%lldx%lld s=%lld,%lld p=%lld,%lld d=%lld,%lld "
           "out=%lldx%lld]",
           bits, (long long)n, (long long)g->C, (long long)g->H, (long long)g->W,
           (long long)g->kh, (long long)g->kw, (long long)g->sh, (long long)g->sw,
           (long long)g->pt, (long long)g->pl, (long long)g->dh, (long long)g->dw,
           (long long)g->OH, (long long)g->OW);
}

/* Output size with `before` and `after` padding; < 1 when the kernel does
 * not fit. */
static int64_t out_size(int64_t L, int64_t k, int64_t s, int64_t before, int64_t after,
                        int64_t d) {
  int64_t span = L + before + after - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

static void test_grid(void) {
  static const int64_t kernels[][2] = {{1, 1}, {3, 3}, {3, 1}, {1, 3}, {2, 2}, {5, 5}};
  static const int64_t sizes[] = {1, 5, 7};
  for (int bits = 64; bits >= 32; bits -= 32) {
    g_tol = bits == 32 ? 1e-5 : 1e-12;
    for (int64_t C = 1; C <= 3; C += 2)
      for (int hi = 0; hi < 3; ++hi)
        for (int wi = 0; wi < 3; ++wi)
          for (int ki = 0; ki < 6; ++ki)
            for (int64_t sh = 1; sh <= 3; ++sh)
              for (int64_t sw = 1; sw <= 3; ++sw)
                for (int64_t pt = 0; pt <= 2; ++pt)
                  for (int64_t pl = 0; pl <= 2; ++pl)
                    for (int64_t dh = 1; dh <= 2; ++dh)
                      for (int64_t dw = 1; dw <= 2; ++dw) {
                        fct_conv_geom g = {C, sizes[hi], sizes[wi], kernels[ki][0],
                                           kernels[ki][1], sh, sw, pt, pl, dh, dw, 0, 0};
                        /* below: symmetric; after W: a different amount */
                        g.OH = out_size(g.H, g.kh, sh, pt, pt, dh);
                        g.OW = out_size(g.W, g.kw, sw, pl, (pl + 1) % 3, dw);
                        if (g.OH < 1 || g.OW < 1) continue;
                        int64_t n = ((sh + sw + pt + pl + dh + dw + ki) & 1) ? 3 : 1;
                        describe(bits, &g, n);
                        ins in = make_inputs(bits, &g, n);
                        outs o = run_all(bits, &g, n, &in);
                        check_all(&g, n, &in, &o);
                        outs_free(&o);
                        ins_free(&in);
                      }
  }
}

/* ------------------------------------------------------------------------- */
/* Larger geometries: serial vs a stand-in pool                               */
/* ------------------------------------------------------------------------- */

static void test_pool(void) {
  static const struct {
    int64_t n;
    fct_conv_geom g; /* OH, OW filled below */
  } cases[] = {
      {3, {16, 30, 30, 3, 3, 1, 1, 1, 1, 1, 1, 0, 0}},
      {2, {8, 31, 29, 3, 1, 2, 2, 1, 0, 1, 1, 0, 0}},
      {3, {5, 40, 40, 1, 3, 1, 1, 0, 2, 1, 2, 0, 0}},
      {2, {4, 26, 33, 5, 5, 3, 2, 2, 2, 2, 1, 0, 0}},
      {4, {6, 32, 32, 2, 2, 2, 2, 0, 0, 1, 1, 0, 0}},
      {1, {1, 200, 150, 3, 3, 1, 1, 1, 1, 1, 1, 0, 0}}, /* one plane: no split over planes */
  };
  for (int bits = 64; bits >= 32; bits -= 32) {
    g_tol = bits == 32 ? 1e-5 : 1e-12;
    for (size_t k = 0; k < sizeof cases / sizeof *cases; ++k) {
      fct_conv_geom g = cases[k].g;
      int64_t n = cases[k].n;
      g.OH = out_size(g.H, g.kh, g.sh, g.pt, g.pt, g.dh);
      g.OW = out_size(g.W, g.kw, g.sw, g.pl, g.pl, g.dw);
      describe(bits, &g, n);
      ins in = make_inputs(bits, &g, n);
      fct_cpu_set_thread_pool(NULL, NULL);
      outs serial = run_all(bits, &g, n, &in);
      check_all(&g, n, &in, &serial);
      fct_cpu_set_thread_pool(tb_reverse_pool, tb_three_threads);
      tb_pool_calls = 0;
      outs pooled = run_all(bits, &g, n, &in);
      /* the first case is big enough for all eight calls to split */
      CHECK(k != 0 || tb_pool_calls == 8, "%d of 8 calls used the pool %s", tb_pool_calls, g_what);
      fct_cpu_set_thread_pool(NULL, NULL);
      check_all(&g, n, &in, &pooled);
      CHECK(buf_same(&serial.col, &pooled.col) && buf_same(&serial.xi, &pooled.xi) &&
                buf_same(&serial.y, &pooled.y) && buf_same(&serial.gx, &pooled.gx) &&
                buf_same(&serial.gw0, &pooled.gw0) && buf_same(&serial.gw1, &pooled.gw1) &&
                buf_same(&serial.yb, &pooled.yb) && buf_same(&serial.sums, &pooled.sums),
            "pooled results differ from serial ones %s", g_what);
      outs_free(&serial);
      outs_free(&pooled);
      ins_free(&in);
    }
  }
}

/* ------------------------------------------------------------------------- */
/* Empty sizes and errors                                                     */
/* ------------------------------------------------------------------------- */

static void test_edges(void) {
  fct_context ctx = {0};
  char err[256] = "";
  ctx.error = err;
  ctx.error_bytes = sizeof err;
  fct_conv_geom g = {3, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 5, 5};
  float x[75], w[27], y[75], gw[27];
  for (int k = 0; k < 75; ++k) x[k] = y[k] = 1.0f;
  for (int k = 0; k < 27; ++k) w[k] = 1.0f;
  /* n = 0: nothing written, except backward_weight with beta = 0 (zeros) */
  for (int k = 0; k < 27; ++k) gw[k] = NAN;
  CHECK(be->depthwise_backward_weight(&ctx, 0, FCT_F32, &g, 0, NULL, NULL, (char*)gw, 0.0) ==
            FCT_OK,
        "backward_weight n=0");
  bool zeros = true;
  for (int k = 0; k < 27; ++k) zeros = zeros && gw[k] == 0.0f;
  CHECK(zeros, "backward_weight n=0, beta=0 gives zeros");
  float sums[3] = {NAN, NAN, NAN};
  CHECK(be->channel_sums(&ctx, 0, FCT_F32, 0, 3, 25, NULL, (char*)sums) == FCT_OK &&
            sums[0] == 0.0f && sums[1] == 0.0f && sums[2] == 0.0f,
        "channel_sums n=0 gives zeros");
  CHECK(be->im2col(&ctx, 0, FCT_F32, &g, 0, NULL, NULL) == FCT_OK, "im2col n=0");
  CHECK(be->col2im(&ctx, 0, FCT_F32, &g, 0, NULL, NULL) == FCT_OK, "col2im n=0");
  /* unsupported dtypes */
  const fct_dtype bad[] = {FCT_BF16, FCT_F16};
  for (int k = 0; k < 2; ++k) {
    fct_dtype dt = bad[k];
    err[0] = 0;
    CHECK(be->im2col(&ctx, 0, dt, &g, 1, (char*)x, (char*)y) == FCT_ERR_DTYPE && err[0],
          "im2col dtype %d", (int)dt);
    CHECK(be->col2im(&ctx, 0, dt, &g, 1, (char*)x, (char*)y) == FCT_ERR_DTYPE,
          "col2im dtype %d", (int)dt);
    CHECK(be->depthwise_forward(&ctx, 0, dt, &g, 1, (char*)x, (char*)w, (char*)y) ==
              FCT_ERR_DTYPE,
          "depthwise_forward dtype %d", (int)dt);
    CHECK(be->depthwise_backward_input(&ctx, 0, dt, &g, 1, (char*)x, (char*)w, (char*)y) ==
              FCT_ERR_DTYPE,
          "depthwise_backward_input dtype %d", (int)dt);
    CHECK(be->depthwise_backward_weight(&ctx, 0, dt, &g, 1, (char*)x, (char*)y, (char*)gw,
                                        0.0) == FCT_ERR_DTYPE,
          "depthwise_backward_weight dtype %d", (int)dt);
    CHECK(be->channel_bias(&ctx, 0, dt, 1, 3, 25, (char*)y, (char*)w, 1) == FCT_ERR_DTYPE,
          "channel_bias dtype %d", (int)dt);
    CHECK(be->channel_sums(&ctx, 0, dt, 1, 3, 25, (char*)y, (char*)sums) == FCT_ERR_DTYPE,
          "channel_sums dtype %d", (int)dt);
  }
}

/* ------------------------------------------------------------------------- */
/* --time: the benchmarks' sizes, one float32 item                            */
/* ------------------------------------------------------------------------- */

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void time_one(const char* name, fct_conv_geom g) {
  fct_context ctx = {0};
  int64_t in_n = g.C * g.H * g.W, col_n = g.C * g.kh * g.kw * g.OH * g.OW,
          out_n = g.C * g.OH * g.OW;
  buf x = buf_new(32, in_n, 1), w = buf_new(32, g.C * g.kh * g.kw, 1);
  buf col = buf_new(32, col_n, 1), y = buf_new(32, out_n, 1), gw = buf_new(32, w.n, 1);
  double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
  for (int rep = 0; rep < 20; ++rep) {
    double t0 = now();
    be->im2col(&ctx, 0, FCT_F32, &g, 1, x.p, col.p);
    double t1 = now();
    be->col2im(&ctx, 0, FCT_F32, &g, 1, col.p, x.p);
    double t2 = now();
    be->depthwise_forward(&ctx, 0, FCT_F32, &g, 1, x.p, w.p, y.p);
    double t3 = now();
    be->depthwise_backward_input(&ctx, 0, FCT_F32, &g, 1, y.p, w.p, x.p);
    double t4 = now();
    be->depthwise_backward_weight(&ctx, 0, FCT_F32, &g, 1, x.p, y.p, gw.p, 0.0);
    double t5 = now();
    double d[5] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4};
    for (int k = 0; k < 5; ++k)
      if (d[k] < best[k]) best[k] = d[k];
  }
  printf("%s: im2col %.1f us (%.2f GB/s written), col2im %.1f us, depthwise fwd %.1f us, "
         "bwd input %.1f us, bwd weight %.1f us\n",
         name, best[0] * 1e6, (double)col_n * 4 / best[0] * 1e-9, best[1] * 1e6, best[2] * 1e6,
         best[3] * 1e6, best[4] * 1e6);
  free(x.p), free(w.p), free(col.p), free(y.p), free(gw.p);
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "--time") == 0) {
    time_one("[64,56,56] 3x3 s1 p1", (fct_conv_geom){64, 56, 56, 3, 3, 1, 1, 1, 1, 1, 1, 56, 56});
    time_one("[64,112,112] 3x3 s2 p1",
             (fct_conv_geom){64, 112, 112, 3, 3, 2, 2, 1, 1, 1, 1, 56, 56});
    time_one("[256,56,56] 3x1 s1 p(1,0)",
             (fct_conv_geom){256, 56, 56, 3, 1, 1, 1, 1, 0, 1, 1, 56, 56});
    time_one("[256,56,56] 1x3 s1 p(0,1)",
             (fct_conv_geom){256, 56, 56, 1, 3, 1, 1, 0, 1, 1, 1, 56, 56});
    return 0;
  }
  test_grid();
  test_pool();
  test_edges();
  return test_report();
}
