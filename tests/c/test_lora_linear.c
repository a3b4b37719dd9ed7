/*
 * lora_linear forward and backward against a naive float64 reference on
 * random inputs (never zeros): dense, low-rank and given bases; ranks 1 and
 * min(in, out); M = 0, 1 (GEMV) and batches large enough for the thread
 * pool to split; batch dims, transposed and non-foldable strides; with and
 * without bias, saved t and dropout; every subset of gradients a caller
 * asks for (a frozen base among them). The reference draws the dropout mask
 * with its own copy of splitmix64, so a change of the op's mask shows. Then
 * bad arguments and their status codes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_tensorized.h"

/* ------------------------------------------------------------------------- */
/* Reference                                                                  */
/* ------------------------------------------------------------------------- */

/* splitmix64's output at position i + 1 of the stream seeded with seed. */
static uint64_t ref_bits(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static bool ref_keep(uint64_t seed, uint64_t i, double p) {
  if (p == 0) return true;
  return ref_bits(seed, i) >= (uint64_t)ldexp(p, 64);
}

/* c [m, n] = a [m, k] · b [k, n] (dense row-major; a or b transposed when
 * ta / tb: then a is stored [k, m], b [n, k]). */
static void mm(const double* a, const double* b, double* c, int64_t m, int64_t k, int64_t n,
               bool ta, bool tb) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t l = 0; l < k; ++l)
        s += (ta ? a[l * m + i] : a[i * k + l]) * (tb ? b[j * k + l] : b[l * n + j]);
      c[i * n + j] = s;
    }
}

static double* dense_of(const test_tensor* t, int64_t rows, int64_t cols) {
  double* d = calloc((size_t)(rows * cols + 1), sizeof *d);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d[i * cols + j] = tb_get2(t, i, j);
  return d;
}

static double* zeros(int64_t n) { return calloc((size_t)(n + 1), sizeof(double)); }

typedef struct lora_ref {
  double *t, *y, *gx, *gA, *gB, *gW, *gU, *gV, *gb;
} lora_ref;

typedef struct lora_case {
  int kind;
  int64_t M, in, out, r, rb;
  double scale, p;
  uint64_t seed;
} lora_case;

static lora_ref reference(const lora_case* c, const test_tensor* x, const test_tensor* A,
                          const test_tensor* B, const test_tensor* W, const test_tensor* U,
                          const test_tensor* V, const test_tensor* bo, const test_tensor* b,
                          const test_tensor* g) {
  int64_t M = c->M, in = c->in, out = c->out, r = c->r, rb = c->rb;
  lora_ref R;
  double* X = dense_of(x, M, in);
  double* Ad = dense_of(A, r, in);
  double* Bd = dense_of(B, out, r);
  double* G = dense_of(g, M, out);
  double* XD = zeros(M * in);
  for (int64_t i = 0; i < M * in; ++i)
    XD[i] = ref_keep(c->seed, (uint64_t)i, c->p) ? X[i] / (1 - c->p) : 0.0;
  R.t = zeros(M * r);
  mm(XD, Ad, R.t, M, in, r, false, true);
  R.y = zeros(M * out);
  double *Wd = NULL, *Ud = NULL, *Vd = NULL, *TB = NULL, *GTB = NULL;
  if (c->kind == FCT_LORA_DENSE) {
    Wd = dense_of(W, out, in);
    mm(X, Wd, R.y, M, in, out, false, true);
  } else if (c->kind == FCT_LORA_LOWRANK) {
    Ud = dense_of(U, out, rb);
    Vd = dense_of(V, rb, in);
    TB = zeros(M * rb);
    mm(X, Vd, TB, M, in, rb, false, true);
    mm(TB, Ud, R.y, M, rb, out, false, true);
    GTB = zeros(M * rb);
    mm(G, Ud, GTB, M, out, rb, false, false);
  } else {
    double* BO = dense_of(bo, M, out);
    memcpy(R.y, BO, sizeof(double) * (size_t)(M * out));
    free(BO);
  }
  double* TBt = zeros(M * out);
  mm(R.t, Bd, TBt, M, r, out, false, true);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < out; ++j)
      R.y[i * out + j] += c->scale * TBt[i * out + j] + (b ? tb_get2(b, 0, j) : 0.0);
  free(TBt);

  double* GT = zeros(M * r);
  mm(G, Bd, GT, M, out, r, false, false);
  for (int64_t i = 0; i < M * r; ++i) GT[i] *= c->scale;
  R.gB = zeros(out * r);
  mm(G, R.t, R.gB, out, M, r, true, false);
  for (int64_t i = 0; i < out * r; ++i) R.gB[i] *= c->scale;
  R.gA = zeros(r * in);
  mm(GT, XD, R.gA, r, M, in, true, false);
  R.gx = zeros(M * in);
  mm(GT, Ad, R.gx, M, r, in, false, false);
  for (int64_t i = 0; i < M * in; ++i)
    R.gx[i] = ref_keep(c->seed, (uint64_t)i, c->p) ? R.gx[i] / (1 - c->p) : 0.0;
  double* base_gx = zeros(M * in);
  R.gW = R.gU = R.gV = NULL;
  if (Wd) {
    mm(G, Wd, base_gx, M, out, in, false, false);
    R.gW = zeros(out * in);
    mm(G, X, R.gW, out, M, in, true, false);
  }
  if (Ud) {
    mm(GTB, Vd, base_gx, M, rb, in, false, false);
    R.gU = zeros(out * rb);
    mm(G, TB, R.gU, out, M, rb, true, false);
    R.gV = zeros(rb * in);
    mm(GTB, X, R.gV, rb, M, in, true, false);
  }
  for (int64_t i = 0; i < M * in; ++i) R.gx[i] += base_gx[i];
  R.gb = zeros(out);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < out; ++j) R.gb[j] += G[i * out + j];
  free(base_gx); free(GT); free(X); free(Ad); free(Bd); free(G); free(XD);
  free(Wd); free(Ud); free(Vd); free(TB); free(GTB);
  return R;
}

static void ref_free(lora_ref* R) {
  free(R->t); free(R->y); free(R->gx); free(R->gA); free(R->gB); free(R->gW); free(R->gU);
  free(R->gV); free(R->gb);
}

/* ------------------------------------------------------------------------- */
/* Harness                                                                    */
/* ------------------------------------------------------------------------- */

typedef struct layout_case {
  const char* name;
  int x_ndim;
  int x_order[3]; /* memory order of x's dims, outermost first */
  int64_t x_gap;
  int w_transposed; /* A, B and the base's weights stored column-major */
} layout_case;

static const char* kind_name(int k) {
  return k == FCT_LORA_DENSE ? "dense" : k == FCT_LORA_LOWRANK ? "lowrank" : "given";
}

/* Which gradients a backward call asks for. */
enum { G_X = 1, G_A = 2, G_B = 4, G_W = 8, G_U = 16, G_V = 32, G_BIAS = 64 };

static void run_case(int bits, const lora_case* lc, bool bias, bool keep_t,
                     const layout_case* L) {
  char label[320];
  snprintf(label, sizeof label,
           "f%d %s M=%lld in=%lld out=%lld r=%lld rb=%lld p=%g bias=%d t=%d %s", bits,
           kind_name(lc->kind), (long long)lc->M, (long long)lc->in, (long long)lc->out,
           (long long)lc->r, (long long)lc->rb, lc->p, bias, keep_t, L->name);
  int64_t M = lc->M, in = lc->in, out = lc->out, r = lc->r, rb = lc->rb;
  int64_t xs[3], ys[3], ts[3];
  int nd = test_batch_shapes(L->x_ndim == 3, M, in, out, xs, ys);
  test_batch_shapes(L->x_ndim == 3, M, in, r, xs, ts);
  int wt[2] = {1, 0};
  const int* wo = L->w_transposed ? wt : NULL;
  int64_t as[2] = {r, in}, bs2[2] = {out, r}, ws[2] = {out, in}, us[2] = {out, rb},
          vs[2] = {rb, in}, bs[1] = {out};
  test_tensor* x = tb_new(bits, nd, xs, L->x_order[0] || L->x_order[1] ? L->x_order : NULL,
                          L->x_gap);
  test_tensor* A = tb_new(bits, 2, as, wo, 0);
  test_tensor* B = tb_new(bits, 2, bs2, wo, 0);
  test_tensor* W = lc->kind == FCT_LORA_DENSE ? tb_new(bits, 2, ws, wo, 0) : NULL;
  test_tensor* U = lc->kind == FCT_LORA_LOWRANK ? tb_new(bits, 2, us, wo, 0) : NULL;
  test_tensor* V = lc->kind == FCT_LORA_LOWRANK ? tb_new(bits, 2, vs, wo, 0) : NULL;
  test_tensor* bo = lc->kind == FCT_LORA_GIVEN ? tb_new(bits, nd, ys, wo && nd == 2 ? wt : NULL, 0)
                                               : NULL;
  test_tensor* b = bias && lc->kind != FCT_LORA_GIVEN ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* g = tb_new(bits, nd, ys, NULL, L->x_gap); /* gapped rows with gapped x */
  test_tensor* y = tb_output(bits, nd, ys);
  test_tensor* t = tb_output(bits, nd, ts);
  lora_ref R = reference(lc, x, A, B, W, U, V, bo, b, g);
  double tol = bits == 64 ? 1e-12 : 3e-5 * sqrt((double)(in + out + M + 1));

  fct_lora_base base = {0};
  base.kind = lc->kind;
  base.W = W ? &W->dl : NULL;
  base.U = U ? &U->dl : NULL;
  base.V = V ? &V->dl : NULL;
  base.bias = b ? &b->dl : NULL;
  base.base_out = bo ? &bo->dl : NULL;
  fct_lora_options opts = {lc->scale, lc->p, lc->seed};

  fct_context c = test_ctx(FCT_FLAG_CHECK_FINITE);
  size_t bytes = 0;
  DLTensor* tout = keep_t ? &t->dl : NULL;
  fct_status st = fct_lora_linear_forward_workspace(&c, &x->dl, &A->dl, &B->dl, &base, &opts,
                                                    &y->dl, tout, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_lora_linear_forward(&c, &x->dl, &A->dl, &B->dl, &base, &opts, &y->dl, tout);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, R.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  if (keep_t) {
    e = test_rel_err(t, R.t, M, r);
    CHECK(e <= tol, "%s: t error %.3g", label, e);
  }

  /* Every gradient; the frozen base (x, A, B); the adapter alone (A, B: the
   * first layer of a model); the base alone; grad_x alone. */
  int all = G_X | G_A | G_B | G_BIAS |
            (lc->kind == FCT_LORA_DENSE ? G_W : lc->kind == FCT_LORA_LOWRANK ? G_U | G_V : 0);
  if (!b) all &= ~G_BIAS;
  int variants[] = {all, G_X | G_A | G_B, G_A | G_B, all & (G_W | G_U | G_V | G_BIAS), G_X, G_B};
  for (size_t v = 0; v < sizeof variants / sizeof variants[0]; ++v) {
    int want = variants[v];
    if (!want) continue;
    test_tensor* gx = tb_output(bits, nd, xs);
    test_tensor* gA = tb_output(bits, 2, as);
    test_tensor* gB = tb_output(bits, 2, bs2);
    test_tensor* gW = tb_output(bits, 2, ws);
    test_tensor* gU = tb_output(bits, 2, us);
    test_tensor* gV = tb_output(bits, 2, vs);
    test_tensor* gb = tb_output(bits, 1, bs);
    fct_lora_grads gr = {want & G_X ? &gx->dl : NULL,    want & G_A ? &gA->dl : NULL,
                         want & G_B ? &gB->dl : NULL,    want & G_W ? &gW->dl : NULL,
                         want & G_U ? &gU->dl : NULL,    want & G_V ? &gV->dl : NULL,
                         want & G_BIAS ? &gb->dl : NULL};
    const DLTensor* tin = keep_t ? &t->dl : NULL;
    c = test_ctx(FCT_FLAG_CHECK_FINITE);
    st = fct_lora_linear_backward_workspace(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts,
                                            tin, &gr, &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
    test_workspace(&c, bytes);
    st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, tin, &gr);
    CHECK(st == FCT_OK, "%s: backward %zu: %s", label, v, test_err);
    struct {
      int bit;
      const char* name;
      const test_tensor* got;
      const double* want;
      int64_t rows, cols;
    } outs[] = {{G_X, "grad_x", gx, R.gx, M, in},   {G_A, "grad_A", gA, R.gA, r, in},
                {G_B, "grad_B", gB, R.gB, out, r},  {G_W, "grad_W", gW, R.gW, out, in},
                {G_U, "grad_U", gU, R.gU, out, rb}, {G_V, "grad_V", gV, R.gV, rb, in},
                {G_BIAS, "grad_bias", gb, R.gb, 1, out}};
    for (int k = 0; k < 7; ++k) {
      if (!(want & outs[k].bit)) continue;
      e = test_rel_err(outs[k].got, outs[k].want, outs[k].rows, outs[k].cols);
      CHECK(e <= tol * 4, "%s: %s error %.3g (variant %zu)", label, outs[k].name, e, v);
    }
    tb_free(gx); tb_free(gA); tb_free(gB); tb_free(gW); tb_free(gU); tb_free(gV); tb_free(gb);
  }
  ref_free(&R);
  tb_free(x); tb_free(A); tb_free(B); tb_free(W); tb_free(U); tb_free(V); tb_free(bo);
  tb_free(b); tb_free(g); tb_free(y); tb_free(t);
}

static void test_values(bool big) {
  static const layout_case layouts[] = {
      {"contiguous", 2, {0, 0, 0}, 0, 0},
      {"x col-major, weights transposed", 2, {1, 0, 0}, 0, 1},
      {"x rows with gaps", 2, {0, 0, 0}, 3, 0},
      {"x 3-D", 3, {0, 0, 0}, 0, 0},
      {"x 3-D non-foldable", 3, {1, 0, 2}, 0, 0},
  };
  static const int64_t shapes[][5] = {
      /* M, in, out, r, rb */
      {6, 13, 11, 4, 3}, {6, 13, 11, 1, 2}, {6, 13, 11, 11, 5}, /* r = 1, min(in, out) */
      {1, 17, 9, 4, 3},  {1, 9, 17, 9, 9},                      /* M = 1: GEMV */
      {0, 8, 6, 3, 2},                                          /* empty batch */
      {64, 40, 72, 16, 8},
  };
  static const int64_t big_shapes[][5] = {
      /* large enough for every GEMM and the mask to be split across threads */
      {300, 128, 96, 16, 40}, {1, 1024, 768, 16, 64}, {130, 200, 160, 160, 20},
  };
  const int64_t(*sh)[5] = big ? big_shapes : shapes;
  size_t nsh = big ? sizeof big_shapes / sizeof big_shapes[0] : sizeof shapes / sizeof shapes[0];
  static const double ps[] = {0.0, 0.3};
  int n = 0;
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t s = 0; s < nsh; ++s)
      for (int kind = 0; kind < 3; ++kind)
        for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; ++l)
          for (int pi = 0; pi < 2; ++pi)
            for (int bias = 0; bias < 2; ++bias) {
              if (layouts[l].x_ndim == 3 && sh[s][0] % 2) continue;
              if (big && (l == 1 || l == 3 || !bias)) continue; /* a few suffice */
              lora_case lc = {kind, sh[s][0], sh[s][1], sh[s][2], sh[s][3], sh[s][4],
                              0.5 + 0.25 * (double)n, ps[pi], 0x1234567ull * (uint64_t)(n + 1)};
              ++n;
              run_case(bits, &lc, bias, (n % 3) != 0, &layouts[l]);
            }
}

/* The mask: splitmix64's first outputs for seed 0, a kept fraction of
 * 1 − p, and the same mask whatever the thread split. */
static void test_mask(void) {
  CHECK(fct_lora_dropout_bits(0, 0) == 0xE220A8397B1DCDAFull, "splitmix64(0) #1: %llx",
        (unsigned long long)fct_lora_dropout_bits(0, 0));
  CHECK(fct_lora_dropout_bits(0, 1) == 0x6E789E6AA1B965F4ull, "splitmix64(0) #2");
  CHECK(fct_lora_dropout_bits(0, 2) == 0x06C45D188009454Full, "splitmix64(0) #3");
  int64_t M = 512, in = 256, r = 256;
  int64_t xs[2] = {M, in}, as[2] = {r, in}, bs2[2] = {4, r}, ws[2] = {4, in}, ys[2] = {M, 4},
          ts[2] = {M, r};
  test_tensor* x = tb_new(64, 2, xs, NULL, 0);
  test_tensor* A = tb_new(64, 2, as, NULL, 0);
  test_tensor* B = tb_new(64, 2, bs2, NULL, 0);
  test_tensor* W = tb_new(64, 2, ws, NULL, 0);
  test_tensor* y = tb_output(64, 2, ys);
  test_tensor* t = tb_output(64, 2, ts);
  /* A = identity: t = drop(x), so the kept elements can be counted. */
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < in; ++j) tb_set(A, (int64_t[2]){i, j}, i == j ? 1.0 : 0.0);
  for (int pi = 0; pi < 3; ++pi) {
    double p = (double[]){0.1, 0.5, 0.9}[pi];
    fct_lora_base base = {FCT_LORA_DENSE, 0, &W->dl, NULL, NULL, NULL, NULL};
    fct_lora_options opts = {1.0, p, 42 + (uint64_t)pi};
    fct_context c = test_ctx(0);
    size_t bytes;
    fct_status st = fct_lora_linear_forward_workspace(&c, &x->dl, &A->dl, &B->dl, &base, &opts,
                                                      &y->dl, &t->dl, &bytes);
    test_workspace(&c, bytes);
    if (st == FCT_OK)
      st = fct_lora_linear_forward(&c, &x->dl, &A->dl, &B->dl, &base, &opts, &y->dl, &t->dl);
    CHECK(st == FCT_OK, "mask forward: %s", test_err);
    int64_t kept = 0, bad = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < in; ++j) {
        double tv = tb_get2(t, i, j), xv = tb_get2(x, i, j);
        bool k = tv != 0.0;
        kept += k;
        bad += k ? fabs(tv - xv / (1 - p)) > 1e-12 : 0;
        bad += k != ref_keep(opts.seed, (uint64_t)(i * in + j), p);
      }
    double frac = (double)kept / (double)(M * in), sd = sqrt(p * (1 - p) / (double)(M * in));
    CHECK(fabs(frac - (1 - p)) < 5 * sd, "p=%g: kept %.4f, expected %.4f", p, frac, 1 - p);
    CHECK(bad == 0, "p=%g: %lld elements differ from the reference mask", p, (long long)bad);
  }
  tb_free(x); tb_free(A); tb_free(B); tb_free(W); tb_free(y); tb_free(t);
}

/* ------------------------------------------------------------------------- */
/* Errors                                                                     */
/* ------------------------------------------------------------------------- */

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, as[2] = {3, 6}, bs2[2] = {5, 3}, ws[2] = {5, 6}, ys[2] = {4, 5},
          bs[1] = {5}, us[2] = {5, 2}, vs[2] = {2, 6};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* A = tb_new(32, 2, as, NULL, 0);
  test_tensor* B = tb_new(32, 2, bs2, NULL, 0);
  test_tensor* W = tb_new(32, 2, ws, NULL, 0);
  test_tensor* U = tb_new(32, 2, us, NULL, 0);
  test_tensor* V = tb_new(32, 2, vs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  test_tensor* b = tb_new(32, 1, bs, NULL, 0);
  test_tensor* A64 = tb_new(64, 2, as, NULL, 0);
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 16);
  fct_lora_base base = {FCT_LORA_DENSE, 0, &W->dl, NULL, NULL, NULL, NULL};
  fct_lora_options opts = {2.0, 0.0, 1};
  fct_status st;
#define FWD(xx, AA, BB) fct_lora_linear_forward(&c, xx, AA, BB, &base, &opts, &y->dl, NULL)

  st = FWD(&x->dl, &A64->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "A", "dtype mix");
  x->dl.dtype = (DLDataType){kDLBfloat, 16, 1};
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_DTYPE, "x", "bfloat16 on cpu");
  x->dl.dtype = (DLDataType){kDLFloat, 32, 1};

  A->shape[1] = 7;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "A", "A/in mismatch");
  A->shape[1] = 6;
  B->shape[1] = 2;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "B", "B/r mismatch");
  B->shape[1] = 3;
  W->shape[0] = 4;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "W", "W shape");
  W->shape[0] = 5;
  b->shape[0] = 4;
  base.bias = &b->dl;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "bias", "bias size");
  b->shape[0] = 5;
  y->shape[1] = 4;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "y shape");
  y->shape[1] = 5;
  st = FWD(&x->dl, NULL, &B->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "A", "NULL A");
  CHECK(fct_lora_linear_forward(NULL, &x->dl, &A->dl, &B->dl, &base, &opts, &y->dl, NULL) ==
            FCT_ERR_NULL_ARGUMENT, "NULL ctx");
  st = fct_lora_linear_forward(&c, &x->dl, &A->dl, &B->dl, NULL, &opts, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "base", "NULL base");
  st = fct_lora_linear_forward(&c, &x->dl, &A->dl, &B->dl, &base, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "opts", "NULL options");

  /* Options. */
  double bad_p[] = {1.0, -0.1, NAN, 2.0};
  for (int i = 0; i < 4; ++i) {
    opts.dropout = bad_p[i];
    st = FWD(&x->dl, &A->dl, &B->dl);
    test_expect_fail(st, FCT_ERR_INVALID_VALUE, "dropout", "p out of range");
  }
  opts.dropout = 0.0;
  opts.scale = INFINITY;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "scale", "infinite scale");
  opts.scale = 2.0;

  /* Bases: unknown kind, missing or extra tensors, a bias with a given base. */
  base.kind = 7;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "base.kind", "unknown kind");
  base.kind = FCT_LORA_DENSE;
  base.W = NULL;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "W", "dense without W");
  base.W = &W->dl;
  base.U = &U->dl;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "U", "dense with U");
  fct_lora_base lr = {FCT_LORA_LOWRANK, 0, NULL, &U->dl, &V->dl, NULL, NULL};
  base = lr;
  V->shape[1] = 5;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "V", "V/in mismatch");
  V->shape[1] = 6;
  V->shape[0] = 3;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "V", "V/rb mismatch");
  V->shape[0] = 2;
  st = FWD(&x->dl, &A->dl, &B->dl);
  CHECK(st == FCT_OK, "lowrank ok: %s", test_err);
  fct_lora_base given = {FCT_LORA_GIVEN, 0, NULL, NULL, NULL, NULL, NULL};
  base = given;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "base_out", "given without base_out");
  test_tensor* bo = tb_new(32, 2, xs, NULL, 0); /* [4, 6]: out is 5 */
  base.base_out = &bo->dl;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_SHAPE, "base_out", "base_out shape");
  base.base_out = &y->dl;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y aliases base_out");
  base.base_out = NULL;
  base.bias = &b->dl;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "bias", "given with bias");
  fct_lora_base dense = {FCT_LORA_DENSE, 0, &W->dl, NULL, NULL, NULL, NULL};
  base = dense;

  /* Outputs: overlap, broadcast, non-contiguous. */
  DLTensor alias = y->dl;
  alias.data = x->dl.data;
  st = fct_lora_linear_forward(&c, &x->dl, &A->dl, &B->dl, &base, &opts, &alias, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y overlaps x");
  y->strides[0] = 0;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y broadcast");
  y->strides[0] = 5;

  /* Device mix, and CUDA without the backend. */
  A->dl.device = (DLDevice){kDLCUDA, 0};
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_DEVICE, "A", "device mix");
  A->dl.device = (DLDevice){kDLCPU, 0};
  if (!fct_cuda_available()) {
    DLTensor* all[] = {&x->dl, &A->dl, &B->dl, &W->dl, &y->dl};
    for (int i = 0; i < 5; ++i) all[i]->device = (DLDevice){kDLCUDA, 0};
    st = FWD(&x->dl, &A->dl, &B->dl);
    test_expect_fail(st, FCT_ERR_UNSUPPORTED, "cuda", "cuda not loaded");
    for (int i = 0; i < 5; ++i) all[i]->device = (DLDevice){kDLCPU, 0};
  }

  /* Workspace too small (dropout needs drop(x) there). */
  opts.dropout = 0.5;
  c.workspace_bytes = 4;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 16);
  opts.dropout = 0.0;

  /* NaN in x with the finite check: named. */
  tb_set(x, (int64_t[2]){1, 2}, NAN);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = FWD(&x->dl, &A->dl, &B->dl);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "x", "NaN in x");
  c.flags = 0;
  tb_set(x, (int64_t[2]){1, 2}, 0.5);

  /* Backward: gradients the base does not have, wrong shapes, aliasing. */
  test_tensor* g = tb_new(32, 2, ys, NULL, 0);
  test_tensor* gW = tb_output(32, 2, ws);
  test_tensor* gA = tb_output(32, 2, bs2); /* B's shape, not A's */
  fct_lora_grads gr = {0};
  gr.U = &gW->dl;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, &gr);
  test_expect_fail(st, FCT_ERR_INVALID_VALUE, "grad_U", "grad_U of a dense base");
  gr.U = NULL;
  gr.A = &gA->dl;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, &gr);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_A", "grad_A shape");
  gr.A = NULL;
  gr.x = &x->dl;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, &gr);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_x", "grad_x aliases x");
  gr.x = NULL;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "grads", "NULL grads");
  g->shape[1] = 4;
  gr.W = &gW->dl;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, &gr);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_y", "grad_y shape");
  g->shape[1] = 5;
  tb_set(g, (int64_t[2]){0, 0}, INFINITY);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lora_linear_backward(&c, &g->dl, &x->dl, &A->dl, &B->dl, &base, &opts, NULL, &gr);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "grad_y", "Inf in grad_y");
  c.flags = 0;
#undef FWD
  tb_free(g); tb_free(gW); tb_free(gA); tb_free(bo);
  tb_free(x); tb_free(A); tb_free(B); tb_free(W); tb_free(U); tb_free(V); tb_free(y);
  tb_free(b); tb_free(A64);
}

int main(void) {
  test_mask();
  test_values(false); /* OpenBLAS's own threads */
  fct_cpu_set_thread_pool(tb_reverse_pool, tb_three_threads);
  test_values(false);
  test_values(true);
  test_mask();
  fct_cpu_set_thread_pool(NULL, NULL);
  test_errors();
  test_free_workspace();
  return test_report();
}
