/*
 * lowrank_linear forward and backward against a naive float64 reference on
 * random inputs (never zeros): ranks 1 .. min(in, out), M = 1 (GEMV), an
 * empty batch, batch dims, transposed and gapped (non-foldable) strides, with
 * and without bias and saved t; then bad arguments and their status codes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowrank_reference.h"
#include "test_util.h"

typedef struct layout_case {
  const char* name;
  int x_ndim;
  int x_order[3]; /* memory order of x's dims, outermost first */
  int64_t x_gap;
  int w_transposed; /* U and V stored column-major */
} layout_case;

static void run_case(int bits, int64_t M, int64_t in, int64_t out, int64_t r, bool bias,
                     bool keep_t, const layout_case* L) {
  char label[256];
  snprintf(label, sizeof label, "f%d M=%lld in=%lld out=%lld r=%lld bias=%d t=%d %s", bits,
           (long long)M, (long long)in, (long long)out, (long long)r, bias, keep_t, L->name);
  /* x: [M, in] or [2, M/2, in] */
  int64_t xs[3], ys[3], ts[3];
  int nd = test_batch_shapes(L->x_ndim == 3, M, in, out, xs, ys);
  test_batch_shapes(L->x_ndim == 3, M, in, r, xs, ts);
  int wt[2] = {1, 0};
  int64_t us[2] = {out, r}, vs[2] = {r, in}, bs[1] = {out};
  test_tensor* x = tb_new(bits, nd, xs, L->x_order[0] || L->x_order[1] ? L->x_order : NULL,
                          L->x_gap);
  test_tensor* U = tb_new(bits, 2, us, L->w_transposed ? wt : NULL, 0);
  test_tensor* V = tb_new(bits, 2, vs, L->w_transposed ? wt : NULL, 0);
  test_tensor* b = bias ? tb_new(bits, 1, bs, NULL, 0) : NULL;
  test_tensor* g = tb_new(bits, nd, ys, NULL, 0);
  test_tensor* y = tb_output(bits, nd, ys);
  test_tensor* t = tb_output(bits, nd, ts);
  ref R = reference(x, U, V, b, g, M, in, out, r);
  double tol = bits == 64 ? 1e-12 : 2e-5 * sqrt((double)(in + out + M + 1));

  fct_context c = test_ctx(0);
  size_t bytes = 0;
  fct_status st = fct_lowrank_linear_forward_workspace(&c, &x->dl, &U->dl, &V->dl,
                                                       b ? &b->dl : NULL, &y->dl,
                                                       keep_t ? &t->dl : NULL, &bytes);
  CHECK(st == FCT_OK, "%s: forward workspace: %s", label, test_err);
  test_workspace(&c, bytes);
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, b ? &b->dl : NULL, &y->dl,
                                  keep_t ? &t->dl : NULL);
  CHECK(st == FCT_OK, "%s: forward: %s", label, test_err);
  double e = test_rel_err(y, R.y, M, out);
  CHECK(e <= tol, "%s: y error %.3g > %.3g", label, e, tol);
  if (keep_t) {
    e = test_rel_err(t, R.t, M, r);
    CHECK(e <= tol, "%s: t error %.3g", label, e);
  }

  /* Backward: all gradients, then only grad_U (which needs t), then only
   * grad_x; with the saved t when we have it, else recomputed. */
  for (int variant = 0; variant < 3; ++variant) {
    test_tensor* gx = tb_output(bits, nd, xs);
    test_tensor* gU = tb_output(bits, 2, us);
    test_tensor* gV = tb_output(bits, 2, vs);
    test_tensor* gb = tb_output(bits, 1, bs);
    bool want_x = variant != 1, want_U = variant != 2, want_V = variant == 0,
         want_b = variant == 0;
    DLTensor* ogx = want_x ? &gx->dl : NULL;
    DLTensor* ogU = want_U ? &gU->dl : NULL;
    DLTensor* ogV = want_V ? &gV->dl : NULL;
    DLTensor* ogb = want_b ? &gb->dl : NULL;
    const DLTensor* tin = keep_t ? &t->dl : NULL;
    c = test_ctx(0);
    st = fct_lowrank_linear_backward_workspace(&c, &g->dl, &x->dl, &U->dl, &V->dl, tin, ogx,
                                               ogU, ogV, ogb, &bytes);
    CHECK(st == FCT_OK, "%s: backward workspace: %s", label, test_err);
    test_workspace(&c, bytes);
    st = fct_lowrank_linear_backward(&c, &g->dl, &x->dl, &U->dl, &V->dl, tin, ogx, ogU, ogV,
                                     ogb);
    CHECK(st == FCT_OK, "%s: backward %d: %s", label, variant, test_err);
    if (want_x) {
      e = test_rel_err(gx, R.gx, M, in);
      CHECK(e <= tol, "%s: grad_x error %.3g (variant %d)", label, e, variant);
    }
    if (want_U) {
      e = test_rel_err(gU, R.gU, out, r);
      CHECK(e <= tol, "%s: grad_U error %.3g (variant %d)", label, e, variant);
    }
    if (want_V) {
      e = test_rel_err(gV, R.gV, r, in);
      CHECK(e <= tol, "%s: grad_V error %.3g", label, e);
    }
    if (want_b) {
      e = test_rel_err(gb, R.gb, 1, out);
      CHECK(e <= tol, "%s: grad_bias error %.3g", label, e);
    }
    tb_free(gx); tb_free(gU); tb_free(gV); tb_free(gb);
  }
  ref_free(&R);
  tb_free(x); tb_free(U); tb_free(V); tb_free(b); tb_free(g); tb_free(y); tb_free(t);
}

static void test_values(bool big) {
  static const layout_case layouts[] = {
      {"contiguous", 2, {0, 0, 0}, 0, 0},
      {"x col-major, U/V transposed", 2, {1, 0, 0}, 0, 1},
      {"x rows with gaps", 2, {0, 0, 0}, 3, 0},
      {"x 3-D", 3, {0, 0, 0}, 0, 0},
      {"x 3-D non-foldable", 3, {1, 0, 2}, 0, 0},
      {"x 3-D rows with gaps", 3, {0, 0, 0}, 2, 0}, /* folds: read in place */
  };
  static const int64_t shapes[][4] = {
      /* M, in, out, r */
      {6, 13, 11, 5}, {6, 13, 11, 1}, {6, 13, 11, 11}, /* r = min(in, out) */
      {1, 17, 9, 4},  {1, 9, 17, 9},                   /* M = 1: GEMV */
      {0, 8, 6, 3},                                    /* empty batch */
      {5, 8, 6, 0},  {4, 0, 6, 2},                     /* rank 0, in = 0 */
      {64, 40, 72, 16},
  };
  static const int64_t big_shapes[][4] = {
      /* large enough for every GEMM to be split across the pool's threads */
      {300, 128, 96, 40}, {1, 2048, 1024, 600}, {2, 1100, 1000, 700},
      /* grad_U [12, 8] and grad_V [8, 16] sum 12000 rows: C too small to
       * split, so k is cut into pieces (the last one shorter) */
      {12000, 16, 12, 8},
  };
  const int64_t(*sh)[4] = big ? big_shapes : shapes;
  size_t nsh = big ? sizeof big_shapes / sizeof big_shapes[0] : sizeof shapes / sizeof shapes[0];
  for (int bits = 32; bits <= 64; bits += 32)
    for (size_t s = 0; s < nsh; ++s)
      for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; ++l)
        for (int bias = 0; bias < 2; ++bias) {
          if (layouts[l].x_ndim == 3 && sh[s][0] % 2) continue;
          run_case(bits, sh[s][0], sh[s][1], sh[s][2], sh[s][3], bias, bias, &layouts[l]);
        }
}

static void test_errors(void) {
  int64_t xs[2] = {4, 6}, us[2] = {5, 3}, vs[2] = {3, 6}, ys[2] = {4, 5}, bs[1] = {5};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* U = tb_new(32, 2, us, NULL, 0);
  test_tensor* V = tb_new(32, 2, vs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  test_tensor* b = tb_new(32, 1, bs, NULL, 0);
  test_tensor* U64 = tb_new(64, 2, us, NULL, 0);
  fct_context c = test_ctx(0);
  test_workspace(&c, 1 << 16);
  fct_status st;

  st = fct_lowrank_linear_forward(&c, &x->dl, &U64->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "U", "dtype mix");

  x->dl.dtype = (DLDataType){kDLInt, 32, 1};
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "x", "int32 x");
  x->dl.dtype = (DLDataType){kDLBfloat, 16, 1};
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DTYPE, "x", "bfloat16 on cpu");
  x->dl.dtype = (DLDataType){kDLFloat, 32, 1};

  V->shape[1] = 7;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "V", "V/in mismatch");
  V->shape[1] = 6;
  U->shape[1] = 2;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "U", "U/r mismatch");
  U->shape[1] = 3;
  b->shape[0] = 4;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "bias", "bias size");
  b->shape[0] = 5;
  y->shape[1] = 4;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "y", "y shape");
  y->shape[1] = 5;
  U->dl.ndim = 3;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NDIM, "U", "U rank");
  U->dl.ndim = 2;

  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, NULL, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NULL_ARGUMENT, "V", "NULL V");
  CHECK(fct_lowrank_linear_forward(NULL, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL) ==
            FCT_ERR_NULL_ARGUMENT, "NULL ctx");

  /* Output overlapping an input; output with stride 0 (self-overlap). */
  DLTensor alias = y->dl;
  alias.data = x->dl.data;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &alias, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y overlaps x");
  y->strides[0] = 0;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y broadcast");
  y->strides[0] = 5;
  /* The saved t overlapping bias (an input) and y (the other output);
   * grad_V overlapping grad_U (two outputs). */
  int64_t ts2[2] = {4, 3};
  test_tensor* t = tb_output(32, 2, ts2);
  DLTensor t_on_b = t->dl;
  t_on_b.data = b->dl.data;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, &t_on_b);
  test_expect_fail(st, FCT_ERR_LAYOUT, "t", "t overlaps bias");
  DLTensor t_on_y = t->dl;
  t_on_y.data = y->dl.data;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, &t_on_y);
  test_expect_fail(st, FCT_ERR_LAYOUT, "y", "y overlaps t");
  test_tensor* oU = tb_output(32, 2, us);
  test_tensor* oV = tb_output(32, 2, vs);
  DLTensor oV_on_oU = oV->dl;
  oV_on_oU.data = oU->dl.data;
  st = fct_lowrank_linear_backward(&c, &y->dl, &x->dl, &U->dl, &V->dl, NULL, NULL, &oU->dl,
                                   &oV_on_oU, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_U", "grad_V overlaps grad_U");
  tb_free(t); tb_free(oU); tb_free(oV);

  /* Device mix, and CUDA without the backend. */
  U->dl.device = (DLDevice){kDLCUDA, 0};
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_DEVICE, "U", "device mix");
  U->dl.device = (DLDevice){kDLCPU, 0};
  if (!fct_cuda_available()) {
    x->dl.device = U->dl.device = V->dl.device = y->dl.device = (DLDevice){kDLCUDA, 0};
    st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
    test_expect_fail(st, FCT_ERR_UNSUPPORTED, "cuda", "cuda not loaded");
    x->dl.device = U->dl.device = V->dl.device = y->dl.device = (DLDevice){kDLCPU, 0};
  }

  /* Workspace too small. x col-major with gaps needs packing. */
  int ord[2] = {1, 0};
  test_tensor* xg = tb_new(32, 2, xs, ord, 2);
  xg->strides[0] = 2; /* rows stride 2, columns stride 6: neither dense */
  c.workspace_bytes = 4;
  st = fct_lowrank_linear_forward(&c, &xg->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_WORKSPACE, "workspace", "small workspace");
  test_workspace(&c, 1 << 16);

  /* Sizes that overflow: numel beyond int64, and a batch beyond BLAS's int. */
  int64_t huge[2] = {(int64_t)1 << 62, 8};
  DLTensor hx = x->dl;
  hx.shape = huge;
  hx.strides = NULL;
  st = fct_lowrank_linear_forward(&c, &hx, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "x", "numel overflow");
  int64_t big[2] = {(int64_t)1 << 32, 6}, bigst[2] = {0, 1};
  hx.shape = big;
  hx.strides = bigst;
  st = fct_lowrank_linear_forward(&c, &hx, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_OVERFLOW, "M=", "batch beyond int32");

  /* NaN in x with the finite check on: named; off: propagates silently. */
  int64_t i00[2] = {1, 2};
  tb_set(x, i00, NAN);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "x", "NaN in x");
  c.flags = 0;
  st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, &b->dl, &y->dl, NULL);
  CHECK(st == FCT_OK, "NaN without check: %s", test_err);
  int64_t i10[2] = {1, 0};
  CHECK(isnan(tb_get(y, i10)), "NaN propagates to y's row 1");

  /* Backward with the finite check: y (now holding NaN) as grad_y is named. */
  test_tensor* gx = tb_output(32, 2, xs);
  c.flags = FCT_FLAG_CHECK_FINITE;
  st = fct_lowrank_linear_backward(&c, &y->dl, &x->dl, &U->dl, &V->dl, NULL, &gx->dl, NULL,
                                   NULL, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "grad_y", "NaN in grad_y");
  c.flags = 0;
  tb_free(gx);

  /* Backward: grad output of the wrong shape, output aliasing an input. */
  test_tensor* gU = tb_output(32, 2, vs); /* V's shape, not U's */
  st = fct_lowrank_linear_backward(&c, &y->dl, &x->dl, &U->dl, &V->dl, NULL, NULL, &gU->dl,
                                   NULL, NULL);
  test_expect_fail(st, FCT_ERR_SHAPE, "grad_U", "grad_U shape");
  st = fct_lowrank_linear_backward(&c, &y->dl, &x->dl, &U->dl, &V->dl, NULL, &x->dl, NULL,
                                   NULL, NULL);
  test_expect_fail(st, FCT_ERR_LAYOUT, "grad_x", "grad_x aliases x");

  CHECK(strcmp(fct_status_string(9999), "unknown factorch status") == 0, "unknown status");
  CHECK(fct_version() == ((FCT_VERSION_MAJOR << 16) | (FCT_VERSION_MINOR << 8)), "version");
  tb_free(gU); tb_free(xg); tb_free(x); tb_free(U); tb_free(V); tb_free(y); tb_free(b);
  tb_free(U64);
}

/* An output large enough to be scanned for NaN in blocks on the pool: the
 * one NaN (in the last row of x) is found wherever it lands. */
static void test_big_nan_scan(void) {
  int64_t xs[2] = {600, 8}, us[2] = {450, 2}, vs[2] = {2, 8}, ys[2] = {600, 450};
  test_tensor* x = tb_new(32, 2, xs, NULL, 0);
  test_tensor* U = tb_new(32, 2, us, NULL, 0);
  test_tensor* V = tb_new(32, 2, vs, NULL, 0);
  test_tensor* y = tb_output(32, 2, ys);
  int64_t last[2] = {599, 3};
  tb_set(x, last, INFINITY);
  fct_context c = test_ctx(0);
  c.flags = FCT_FLAG_CHECK_FINITE;
  test_workspace(&c, 1 << 16);
  fct_status st = fct_lowrank_linear_forward(&c, &x->dl, &U->dl, &V->dl, NULL, &y->dl, NULL);
  test_expect_fail(st, FCT_ERR_NOT_FINITE, "x", "Inf in x, blocked scan");
  CHECK(strstr(test_err, "450 NaN/Inf") != NULL, "every value of y's last row counted: %s", test_err);
  tb_free(x); tb_free(U); tb_free(V); tb_free(y);
}

/* Workspace answers: a batched x whose leading dims fold into one row
 * stride ([2, 3, in] with gaps between its rows) is read in place, one whose
 * dims do not fold is packed (M·in elements); t [M, r] lives in the
 * workspace when it is not given, grad_t [M, r] whenever grad_x or grad_V
 * is asked for. */
static void test_workspace_sizes(void) {
  for (int bits = 32; bits <= 64; bits += 32) {
    const int64_t M = 6, in = 7, out = 5, r = 3;
    const size_t es = (size_t)bits / 8;
    int64_t xs[3] = {2, 3, in}, ys[3] = {2, 3, out}, ts[3] = {2, 3, r};
    int64_t us[2] = {out, r}, vs[2] = {r, in}, bs[1] = {out};
    int nonfold[3] = {1, 0, 2};
    test_tensor* xg = tb_new(bits, 3, xs, NULL, 2);
    test_tensor* xn = tb_new(bits, 3, xs, nonfold, 0);
    test_tensor* U = tb_new(bits, 2, us, NULL, 0);
    test_tensor* V = tb_new(bits, 2, vs, NULL, 0);
    test_tensor* g = tb_new(bits, 3, ys, NULL, 0);
    test_tensor* y = tb_output(bits, 3, ys);
    test_tensor* t = tb_output(bits, 3, ts);
    test_tensor* gx = tb_output(bits, 3, xs);
    test_tensor* gU = tb_output(bits, 2, us);
    test_tensor* gV = tb_output(bits, 2, vs);
    test_tensor* gb = tb_output(bits, 1, bs);
    fct_context c = test_ctx(0);
    size_t bytes = 1;
    fct_status st = fct_lowrank_linear_forward_workspace(&c, &xg->dl, &U->dl, &V->dl, NULL,
                                                         &y->dl, &t->dl, &bytes);
    CHECK(st == FCT_OK && bytes == 0, "f%d gapped x, t given: %zu bytes, expected 0 (%s)", bits,
          bytes, test_err);
    st = fct_lowrank_linear_forward_workspace(&c, &xg->dl, &U->dl, &V->dl, NULL, &y->dl, NULL,
                                              &bytes);
    CHECK(st == FCT_OK && bytes == M * r * es, "f%d gapped x, no t: %zu bytes, expected %zu",
          bits, bytes, (size_t)(M * r) * es);
    st = fct_lowrank_linear_forward_workspace(&c, &xn->dl, &U->dl, &V->dl, NULL, &y->dl, &t->dl,
                                              &bytes);
    CHECK(st == FCT_OK && bytes == M * in * es, "f%d non-foldable x: %zu bytes, expected %zu",
          bits, bytes, (size_t)(M * in) * es);
    st = fct_lowrank_linear_backward_workspace(&c, &g->dl, &xg->dl, &U->dl, &V->dl, &t->dl,
                                               &gx->dl, &gU->dl, &gV->dl, &gb->dl, &bytes);
    CHECK(st == FCT_OK && bytes == M * r * es,
          "f%d backward, t given: %zu bytes, expected %zu (grad_t)", bits, bytes,
          (size_t)(M * r) * es);
    st = fct_lowrank_linear_backward_workspace(&c, &g->dl, &xg->dl, &U->dl, &V->dl, NULL, NULL,
                                               &gU->dl, NULL, NULL, &bytes);
    CHECK(st == FCT_OK && bytes == M * r * es,
          "f%d backward grad_U only, no t: %zu bytes, expected %zu (t)", bits, bytes,
          (size_t)(M * r) * es);
    tb_free(xg); tb_free(xn); tb_free(U); tb_free(V); tb_free(g); tb_free(y); tb_free(t);
    tb_free(gx); tb_free(gU); tb_free(gV); tb_free(gb);
  }
}

int main(void) {
  test_values(false); /* OpenBLAS's own threads */
  fct_cpu_set_thread_pool(tb_reverse_pool, tb_three_threads);
  test_values(false);
  test_values(true);
  test_big_nan_scan();
  fct_cpu_set_thread_pool(NULL, NULL);
  test_errors();
  test_workspace_sizes();
  test_free_workspace();
  return test_report();
}
